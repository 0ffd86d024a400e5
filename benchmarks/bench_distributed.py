"""One run on one process or on several (torchrun): pool scoring and validation per epoch, side by side in one
invocation, and whether the selections were equal (issue 25).

    python3 benchmarks/bench_distributed.py [--data ../shared/isic-sample-full] [--img_size 256] [--epochs 3]
    python3 benchmarks/bench_distributed.py --device cuda --nproc 2 [--model sam2.1_hiera_l --img_size 1024]

Every arm runs trainer.py itself with the same flags (--model, --img_size, seeded random weights made decisive so
that scores differ between photos, --pool_size all, --batch_size 2, --decode full, validation every epoch):

  CPU (default)   1 process x 2 threads    python3 trainer.py, OMP_NUM_THREADS=2
                  1 process x 1 thread     python3 trainer.py, OMP_NUM_THREADS=1
                  2 processes x 1 thread   torchrun --standalone --nproc_per_node 2 trainer.py, OMP_NUM_THREADS=1
  --device cuda   1 process on 1 GPU, then --nproc processes on --nproc GPUs

The data: the photos of --data at their original size (the full-size ISIC-2017 sample) as the Validation split,
and as the Training split with three turned copies of each (mirrored, flipped, rotated: 24 photos, so that the pool
keeps something to choose from, and the photos each process scores change little from one epoch to the next: each
decodes a photo the first time it scores it); without --data, synthetic photos of 2048 px. The times are
trainer.py's own (metrics.csv: scoring_s, val_s); epoch 1 decodes every photo once (the decode-once cache), so the
table shows it apart from the mean of the later epochs. The load (/proc/loadavg) is printed before and after each
arm: on a busy machine the absolute times mean little, the ratios measured side by side more.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from datasets_skin import MASK_SUFFIX  # noqa: E402
from run_folder import RunFolder  # noqa: E402
from sam2.build_sam import build_sam2  # noqa: E402
from synthetic_isic import make_synthetic_isic  # noqa: E402

SAMPLE = REPO.parent / "shared" / "isic-sample-full"


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def write_data(sample: Path, root: Path) -> Path:
    """Training (each photo and three turned copies) and Validation (the photos) splits of ``sample`` (images/,
    masks/) at their original size, in the trainer's layout; without ``sample``, synthetic photos of 2048 px."""
    if not (sample / "images").is_dir():
        print(f"{sample} not found: synthetic photos of 2048 px instead")
        return make_synthetic_isic(root, 24, 6, 0, size=2048, seed=1)
    folders = {name: root / name for name in ("Training_Data", "Training_GroundTruth", "Validation_Data",
                                              "Validation_GroundTruth")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for image in sorted((sample / "images").glob("*.jpg")):
        mask = sample / "masks" / f"{image.stem}{MASK_SUFFIX}"
        for split in ("Training", "Validation"):
            os.symlink(image, folders[f"{split}_Data"] / image.name)
            os.symlink(mask, folders[f"{split}_GroundTruth"] / mask.name)
        with Image.open(image) as photo, Image.open(mask) as outline:
            for suffix, turn in (("m", ImageOps.mirror), ("f", ImageOps.flip),
                                 ("r", lambda im: im.transpose(Image.Transpose.ROTATE_180))):
                turn(photo).save(folders["Training_Data"] / f"{image.stem}{suffix}.jpg", quality=95)
                turn(outline).save(folders["Training_GroundTruth"] / f"{image.stem}{suffix}{MASK_SUFFIX}")
    return root


def decisive_checkpoint(model: str, path: Path) -> Path:
    """Seeded random SAM2 weights whose decoders' hypernetwork outputs are scaled, as the tests' ``decisive``: masks
    and scores then differ between photos (plain random weights give near-ties everywhere)."""
    sam = build_sam2(model, None, device="cpu", mode="train")
    with torch.no_grad():
        for decoder in (sam.sam_mask_decoder, sam.sam_mask_decoder2):
            for mlp in decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(40)
    torch.save({"model": sam.state_dict()}, path)
    return path


def run_arm(label: str, nproc: int, threads: int, flags: list, out: Path) -> dict:
    launcher = [sys.executable, str(REPO / "trainer.py")] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         str(REPO / "trainer.py")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    before, start = load(), time.perf_counter()
    done = subprocess.run(launcher + flags + ["--output", str(out)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{label}: trainer.py failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    folder = RunFolder(next(out.glob("Skin_*")))
    rows = folder.read_metrics()
    selection = [(row[0], row[1], row[3]) for row in folder.read_selection()]  # epoch, image, rank_in_pool
    later = rows[1:] or rows
    return dict(label=label, wall=wall, load=f"{before} -> {load()}", selection=selection,
                first_scoring=float(rows[0]["scoring_s"]), first_val=float(rows[0]["val_s"]),
                scoring=statistics.mean(float(r["scoring_s"]) for r in later),
                val=statistics.mean(float(r["val_s"]) for r in later))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=SAMPLE, help="images/ and masks/ of full-size photos")
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--img_size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun arm")
    args = p.parse_args()
    if args.device == "cuda":
        arms = [("1 process, 1 GPU", 1, 1), (f"{args.nproc} processes, {args.nproc} GPUs", args.nproc, 1)]
    else:
        arms = [("1 process x 2 threads", 1, 2), ("1 process x 1 thread", 1, 1),
                (f"{args.nproc} processes x 1 thread", args.nproc, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_data(args.data, tmp / "data")
        flags = ["--data_root", str(data), "--model_cfg", args.model,
                 "--checkpoint", str(decisive_checkpoint(args.model, tmp / "decisive.pt")),
                 "--img_size", str(args.img_size), "--batch_size", "2", "--pool_size", "all",
                 "--max_epochs", str(args.epochs), "--decode", "full", "--save_from_epoch", str(args.epochs + 1),
                 "--seed", "1", "--gpu", "0" if args.device == "cuda" else "cpu"]
        print(f"{args.model} at {args.img_size} px, {args.epochs} epochs, pool = every unlabeled photo of "
              f"{data}; {os.cpu_count()} CPU cores; load before: {load()}")
        results = [run_arm(label, nproc, threads, flags, tmp / f"arm{i}") for i, (label, nproc, threads)
                   in enumerate(arms)]
    base = results[0]
    print(f"\n| arm | scoring s/epoch (epochs 2-{args.epochs}) | validation s/epoch | speed-up scoring | speed-up "
          f"validation | epoch 1 scoring / validation s (decoding) | run wall s | selections equal | load (1, 5, 15 "
          "min) before -> after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['label']} | {r['scoring']:.2f} | {r['val']:.2f} | {base['scoring'] / r['scoring']:.2f} | "
              f"{base['val'] / r['val']:.2f} | {r['first_scoring']:.2f} / {r['first_val']:.2f} | {r['wall']:.0f} | "
              f"{'yes' if r['selection'] == base['selection'] else 'NO'} | {r['load']} |")
    reference = next((r for r in results if r["label"].startswith("1 process x 1")), None)
    if reference is not None:
        last = results[-1]
        print(f"\n{last['label']} against 1 process x 1 thread: scoring {reference['scoring'] / last['scoring']:.2f}x, "
              f"validation {reference['val'] / last['val']:.2f}x faster")


if __name__ == "__main__":
    main()
