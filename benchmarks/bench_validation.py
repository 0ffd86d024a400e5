"""Validation cost after the model, per full-size ISIC photo, against decoding the same JPEG.

    python3 benchmarks/bench_validation.py [--data ../shared/isic-sample-full] [--repeats 5] [--logit-size 128]

For every image of the sample (and one upscaled to 4288 x 2848, the ISIC-2017 size of many Nikon photos), in one
run, interleaved, median over --repeats:

  decode   PIL.Image.open(jpg).convert("RGB") of the photo (what the target is measured against)
  before   the per-image work of val.validate as of commit BEFORE_COMMIT (argmax label map + metrics), loaded
           from git history
  after    val.image_metrics -- what val.validate now calls per image -- with the ground truth prepared once per
           run (val.GroundTruthCache, as the trainer keeps it), and "cold" (prepared in the call)

Logits: 2 x S x S (LoRA_Sam's layout: zero background, foreground logit) at --logit-size (128 = the decoder's
output at --img_size 512), a smooth field whose zero crossing is the ground truth shifted by 2 low-res pixels, so
prediction and ground truth overlap and differ like a decent model's. Target (DESIGN): after / decode <= 1.0.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets_skin as ds  # noqa: E402
import val  # noqa: E402

BEFORE_COMMIT = "0b1debe"  # main before issue #10
LARGE_SIZE = (4288, 2848)  # W x H


def load_before_val():
    """val.py as of BEFORE_COMMIT, imported as a module (None without git history)."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{BEFORE_COMMIT}:val.py"], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("val_before", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, f"{BEFORE_COMMIT}:val.py", "exec"), module.__dict__)
    return module


def synthetic_logits(gt: np.ndarray, size: int) -> torch.Tensor:
    """2 x size x size logits whose foreground is ``gt`` (downscaled, blurred) shifted by 2 cells."""
    small = np.asarray(Image.fromarray(gt * 255).resize((size, size), Image.BILINEAR), np.float32) / 255
    field = (gaussian_filter(small, 1.5) - 0.5) * 20
    foreground = torch.from_numpy(np.roll(field, (2, 2), axis=(0, 1)).copy())
    return torch.stack([torch.zeros_like(foreground), foreground])


def upscaled_pair(image: Path, mask: Path, folder: Path):
    """A JPEG (quality 95) and mask upscaled to LARGE_SIZE, written to ``folder``."""
    big_image, big_mask = folder / f"{image.stem}_large.jpg", folder / f"{image.stem}_large.png"
    with Image.open(image) as im:
        im.convert("RGB").resize(LARGE_SIZE, Image.BICUBIC).save(big_image, quality=95)
    with Image.open(mask) as m:
        m.resize(LARGE_SIZE, Image.NEAREST).save(big_mask)
    return big_image, big_mask


def timed(fn, times: list) -> None:
    start = time.perf_counter()
    fn()
    times.append(1000 * (time.perf_counter() - start))


def measure(pairs, repeats: int, logit_size: int, before) -> list:
    """Per pair: dict(name, size, decode/before/after/cold medians in ms, rows equal?)."""
    cache = val.GroundTruthCache()
    cases = []
    for image, mask in pairs:
        gt = ds.decode_mask(mask, None)
        cases.append(dict(name=image.stem, image=image, gt=gt, logits=synthetic_logits(gt, logit_size),
                          times={k: [] for k in ("decode", "before", "after", "cold")}))
    runs = {
        "decode": lambda c: Image.open(c["image"]).convert("RGB"),
        "after": lambda c: val.image_metrics(c["logits"], c["gt"], 1, truth=cache.get(c["name"], c["gt"], 1, "cpu")),
        "cold": lambda c: val.image_metrics(c["logits"], c["gt"], 1),
    }
    if before is not None:
        runs["before"] = lambda c: before.class_metrics_row(
            before.logits_to_label_map(c["logits"], c["gt"].shape), c["gt"], 1)
    for case in cases:  # warm-up: file cache, allocator, the ground-truth cache
        for run in runs.values():
            run(case)
    for _ in range(repeats):
        for case in cases:
            for key, run in runs.items():
                timed(lambda: run(case), case["times"][key])
    for case in cases:
        case["ms"] = {k: statistics.median(v) if v else float("nan") for k, v in case["times"].items()}
        case["equal"] = before is None or runs["after"](case) == runs["before"](case)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "isic-sample-full",
                        help="folder with images/ and masks/ (ISIC JPEGs and their _segmentation.png)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--logit-size", type=int, default=128, help="decoder output size (img_size / 4)")
    parser.add_argument("--skip-before", action="store_true", help="do not time the old path (0.5 s per image)")
    args = parser.parse_args()
    images = sorted((args.data / "images").glob("*.jpg"))
    if not images:
        sys.exit(f"no JPEGs in {args.data / 'images'}")
    pairs = [(p, args.data / "masks" / f"{p.stem}{ds.MASK_SUFFIX}") for p in images]
    before = None if args.skip_before else load_before_val()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; logits 2 x {args.logit_size}^2; "
          f"median of {args.repeats}; before = val.py at {BEFORE_COMMIT}" + ("" if before else " (not available)"))
    with tempfile.TemporaryDirectory() as tmp:
        pairs.append(upscaled_pair(*pairs[0], Path(tmp)))
        cases = measure(pairs, args.repeats, args.logit_size, before)
    print(f"{'image':<20} {'W x H':>11} {'decode':>9} {'before':>9} {'after':>9} {'cold':>9} "
          f"{'before/dec':>10} {'after/dec':>9} {'cold/dec':>9} same")
    for c in cases:
        ms = c["ms"]
        print(f"{c['name']:<20} {c['gt'].shape[1]:>5}x{c['gt'].shape[0]:<5} {ms['decode']:>6.1f} ms "
              f"{ms['before']:>6.1f} ms {ms['after']:>6.1f} ms {ms['cold']:>6.1f} ms {ms['before'] / ms['decode']:>10.2f} "
              f"{ms['after'] / ms['decode']:>9.2f} {ms['cold'] / ms['decode']:>9.2f} {'yes' if c['equal'] else 'NO'}")
    ratios = [c["ms"]["after"] / c["ms"]["decode"] for c in cases]
    print(f"after / decode: median {statistics.median(ratios):.2f}, max {max(ratios):.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
