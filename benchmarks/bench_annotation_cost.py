"""What --annotation_cost adds to an epoch: the cost rows of its k chosen images (proposal_costs.proposal_costs).

    python3 benchmarks/bench_annotation_cost.py [--data ../shared/isic-sample-full] [--sizes 64 512] [--k 4]

For each --size, on the first k full-size photos of --data (their images decoded and resized once beforehand, as
the trainer's dataset caches them), median over --repeats, one run:

  truths   reading the k full-size masks (datasets_skin.decode_mask): the truth the costs compare with
  encoder  k passes of the image encoder alone (LoRA_Sam.encode): the unit the additions are worth
  pixels   truths + proposal_costs(mode "pixels"): one more encoder pass per image, decoder 1, the proposal
           upsampled to the photo's size and counted
  clicks   truths + proposal_costs(mode "clicks"): pixels, then RITM's click session at the model's size
  per click  (clicks - pixels) / clicks made: one decoder call, an upsample to S x S and two distance transforms

hiera_t with seeded random weights: timing does not depend on the weights, but the number of clicks does; a random
model rarely reaches IoU 0.90, so its sessions run their 20 clicks: the clicks column is the worst case (a trained
model stops earlier: per click x clicks made). The load (/proc/loadavg) is printed beside the table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets_skin as ds  # noqa: E402
from proposal_costs import proposal_costs  # noqa: E402
from sam_lora_image_encoder_prompt import build_model  # noqa: E402


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def counting_clicks(model) -> list:
    """Wrap model.predict_logits to record each call that carries clicks; returns the record."""
    calls = []
    original = model.predict_logits

    def predict_logits(*args, **kwargs):
        calls.append(kwargs.get("points") is not None)
        return original(*args, **kwargs)

    model.predict_logits = predict_logits
    return calls


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(size: int, photos, masks, repeats: int, decoder: int) -> dict:
    model = build_model("sam2.1_hiera_t", None, size).eval()
    images = torch.stack([ds.normalize_image(ds.decode_image(p, size)) for p in photos])
    truths = [ds.decode_mask(m, None) for m in masks]
    calls = counting_clicks(model)
    runs = {
        "truths": lambda: [ds.decode_mask(m, None) for m in masks],
        "encoder": lambda: [model.encode(image[None]) for image in images],
        "pixels": lambda: proposal_costs(model, images, [ds.decode_mask(m, None) for m in masks], "pixels"),
        "clicks": lambda: proposal_costs(model, images, [ds.decode_mask(m, None) for m in masks], "clicks",
                                         decoder=decoder),
    }
    times = {name: [] for name in runs}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].append(timed(run))
        del calls[:]
        rows = proposal_costs(model, images, truths, "clicks", decoder=decoder)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    made = sum(calls)
    return dict(size=size, seconds=seconds, clicks_made=made, rows=rows,
                per_click_ms=1000 * (seconds["clicks"] - seconds["pixels"]) / max(made, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "isic-sample-full",
                        help="folder with images/ and masks/ (ISIC JPEGs and their _segmentation.png)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--k", type=int, default=4, help="images chosen per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder", type=int, default=2, choices=(1, 2), help="the decoder that answers clicks")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 gives steadier figures on a shared CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = sorted((args.data / "images").glob("*.jpg"))[: args.k]
    if len(photos) < args.k:
        sys.exit(f"need {args.k} JPEGs in {args.data / 'images'}, found {len(photos)}")
    masks = [args.data / "masks" / f"{p.stem}{ds.MASK_SUFFIX}" for p in photos]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hiera_t, random weights; k = {args.k} "
          f"photos of {args.data}; median of {args.repeats}; load before: {load()}")
    results = [measure(size, photos, masks, args.repeats, args.decoder) for size in args.sizes]
    print(f"{'S':>5} {'truths':>8} {'encoder':>8} {'pixels':>8} {'clicks':>8} {'clicks made':>12} {'per click':>10}"
          "   (seconds per epoch of k images)")
    for r in results:
        s = r["seconds"]
        print(f"{r['size']:>5} {s['truths']:>8.2f} {s['encoder']:>8.2f} {s['pixels']:>8.2f} {s['clicks']:>8.2f} "
              f"{r['clicks_made']:>12d} {r['per_click_ms']:>7.1f} ms")
    for r in results:
        print(f"S = {r['size']}: rows " + "; ".join(
            f"dice {row['dice']:.3f} changed {row['changed_fraction']:.3f} NoC85 {row['clicks_85']} "
            f"NoC90 {row['clicks_90']}" for row in r["rows"]))
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
