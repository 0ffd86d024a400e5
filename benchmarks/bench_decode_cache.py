"""Decode-once cache and JPEG draft decoding: time N epochs of iterating a training dataset.

    python3 benchmarks/bench_decode_cache.py [--images DIR --masks DIR] [--img_size 512] [--epochs 5]

Default data: the six real ISIC-2017 pairs in ../shared/isic-sample (1024 px wide). Because real ISIC photos are
up to 6688 x 4439, the same six images are also re-encoded at 4096 px wide (JPEG quality 95, in a temporary
folder) to show the effect at full ISIC resolution. For each set it reports seconds per epoch (first and later
epochs) for: no cache + full decode, no cache + draft decode, cache + full decode (the default, as the reference
decodes), cache + draft decode (--decode draft), and how far the draft-decoded pixels are from the full decode.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets_skin as ds  # noqa: E402


def time_epochs(image_dir: Path, mask_dir: Path, img_size: int, epochs: int, cache: bool, draft: bool):
    dataset = ds.SemiSupervisedSkinDataset(image_dir, mask_dir, img_size, cache=cache, use_draft=draft)
    dataset.mark_labeled(range(len(dataset)))  # labeled images re-read their masks every epoch too
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        times.append(time.perf_counter() - start)
    return times


def draft_error(image_dir: Path, img_size: int):
    diffs = []
    for path in sorted(image_dir.glob("*.jpg")):
        fast = ds.decode_image(path, img_size, use_draft=True).astype(int)
        full = ds.decode_image(path, img_size, use_draft=False).astype(int)
        diffs.append(np.abs(fast - full).ravel())
    diffs = np.concatenate(diffs)
    return diffs.mean(), np.percentile(diffs, 99), diffs.max()


def upscale_copy(image_dir: Path, mask_dir: Path, width: int, out: Path):
    (out / "img").mkdir(parents=True)
    (out / "gt").mkdir()
    for path in sorted(image_dir.glob("*.jpg")):
        with Image.open(path) as im:
            height = round(im.height * width / im.width)
            im.convert("RGB").resize((width, height), Image.BICUBIC).save(out / "img" / path.name, quality=95)
        mask_path = mask_dir / f"{path.stem}{ds.MASK_SUFFIX}"
        with Image.open(mask_path) as mask:
            mask.resize((width, height), Image.NEAREST).save(out / "gt" / mask_path.name)
    return out / "img", out / "gt"


def report(label: str, image_dir: Path, mask_dir: Path, img_size: int, epochs: int) -> None:
    count = len(list(image_dir.glob("*.jpg")))
    with Image.open(next(image_dir.glob("*.jpg"))) as im:
        size = f"{im.width}x{im.height}"
    print(f"\n{label}: {count} images of {size}, img_size {img_size}, {epochs} epochs")
    rows = [("no cache, full decode", False, False), ("no cache, draft decode", False, True),
            ("cache, full decode (default)", True, False), ("cache, draft decode", True, True)]
    totals = {}
    for name, cache, draft in rows:
        times = time_epochs(image_dir, mask_dir, img_size, epochs, cache, draft)
        totals[name] = sum(times)
        later = np.mean(times[1:]) if len(times) > 1 else float("nan")
        print(f"  {name:32s} total {sum(times):7.3f} s   epoch 1 {times[0] * 1000:7.1f} ms   "
              f"later epochs {later * 1000:7.1f} ms")
    base = totals["no cache, full decode"]
    for name in ("cache, full decode (default)", "cache, draft decode"):
        print(f"  speed-up of {name} over no cache + full decode: {base / totals[name]:.1f}x over {epochs} epochs")
    mean, p99, worst = draft_error(image_dir, img_size)
    print(f"  draft vs full decode at {img_size}: mean |diff| {mean:.3f} grey levels, p99 {p99:.0f}, max {worst}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sample = REPO.parent / "shared" / "isic-sample"
    parser.add_argument("--images", type=Path, default=sample / "images")
    parser.add_argument("--masks", type=Path, default=sample / "masks")
    parser.add_argument("--img_size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--large_width", type=int, default=4096, help="width of the re-encoded copies (0: skip)")
    args = parser.parse_args()
    if not args.images.is_dir():
        sys.exit(f"error: --images {args.images} is not a folder")
    report("ISIC sample", args.images, args.masks, args.img_size, args.epochs)
    if args.large_width:
        with tempfile.TemporaryDirectory() as tmp:
            images, masks = upscale_copy(args.images, args.masks, args.large_width, Path(tmp))
            report(f"ISIC sample re-encoded at {args.large_width} px", images, masks, args.img_size, args.epochs)


if __name__ == "__main__":
    main()
