"""Cost of mask-difference active-learning scoring, per image, side by side with its floor and
with the naive way of getting the same three predictions.

Measured in one run, interleaved (so load changes hit all three alike), on the same images:

  plain     one pass of the plain SAM2 image encoder (SAM2Base.encode_image, no LoRA)
  encoder   one pass of the LoRA-patched image encoder: LoRA_Sam.encode -- the floor
  scoring   MaskDifferenceStrategy.select over the images: encoder once + three decoder
            runs + prompt derivation + score, with the strategy's AMP / inference mode
  naive     three full forwards per batch, as the reference implementation scored
            (model(x, -1), model(x, 0, 'point'), model(x, 1, 'point')): encoder three times. Here the
            third call is model(x, 1, 'box'), a full forward of the same cost: model(x, 1, 'point') is
            refused (ReferenceCallError, docs/differences.md)

Targets (DESIGN): scoring <= 1.15 x encoder; naive / scoring >= 2.5.

    python3 benchmarks/bench_al_scoring.py                                   # hiera_t, 512 px, CPU
    python3 benchmarks/bench_al_scoring.py --models sam2.1_hiera_t sam2.1_hiera_l --size 1024 --device cuda

Weights are seeded random (timing does not depend on them); --checkpoint-dir loads official
checkpoints named sam2.1_hiera_{tiny,small,base_plus,large}.pt from that folder when present.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from active_learning_strategies import MaskDifferenceStrategy, SelectionContext, mask_difference_scores  # noqa: E402
from sam2.build_sam import build_sam2  # noqa: E402
from sam_lora_image_encoder_prompt import LoRA_Sam, class_probabilities  # noqa: E402
from utils import autocast  # noqa: E402

CHECKPOINT_NAMES = {
    "sam2.1_hiera_t": "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": "sam2.1_hiera_large.pt",
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["sam2.1_hiera_t"], choices=sorted(CHECKPOINT_NAMES))
    p.add_argument("--size", type=int, default=512, help="model input size (px)")
    p.add_argument("--images", type=int, default=8, help="images scored per repeat")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--checkpoint-dir", default=None, help="folder with official SAM2.1 checkpoints")
    return p.parse_args()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model, size, device, checkpoint_dir):
    """-> (plain SAM2, LoRA_Sam around an identical SAM2, weights description)."""
    ckpt = None
    if checkpoint_dir:
        path = os.path.join(checkpoint_dir, CHECKPOINT_NAMES[model])
        ckpt = path if os.path.isfile(path) else None
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_sam2(model, ckpt, device=str(device), image_size=size).to(device).eval())
    return models[0], LoRA_Sam(models[1], r=4).eval(), "official" if ckpt else "random"


def time_encoder(encode, batches, device):
    with torch.inference_mode(), autocast(device):
        for images in batches:
            encode(images)


def time_scoring(net, dataset, device, batch_size):
    MaskDifferenceStrategy().select(SelectionContext(net, dataset, list(range(len(dataset))), batch_size, device,
                                                     batch_size=batch_size))


def time_naive(net, batches, device, size):
    with torch.inference_mode(), autocast(device):
        for images in batches:
            out_no = net(images, True, size, -1)
            out_center = net(images, True, size, 0, "point")
            out_rand = net(images, True, size, 1, "box")  # (1, "point") is refused; the same cost
            mask_difference_scores(
                class_probabilities(out_no["low_res_logits1"]),
                class_probabilities(out_center["low_res_logits2"]),
                class_probabilities(out_rand["low_res_logits1"]),
            ).cpu()


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    cpu_images = torch.randn(args.images, 3, args.size, args.size, generator=gen)
    dataset = [{"image": image, "index": i} for i, image in enumerate(cpu_images)]
    batches = [cpu_images[i : i + args.batch_size].to(device) for i in range(0, args.images, args.batch_size)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.images} images of {args.size} px, batch {args.batch_size}, "
          f"median of {args.repeats} repeats; torch {torch.__version__}")
    print(f"{'model':<16} {'weights':<8} {'plain enc':>11} {'encoder':>11} {'scoring':>11} {'naive 3x':>11} "
          f"{'scoring/enc':>12} {'scoring/plain':>14} {'naive/scoring':>14}")
    for model in args.models:
        sam, net, weights = build(model, args.size, device, args.checkpoint_dir)
        runs = {
            "plain": lambda: time_encoder(sam.encode_image, batches, device),
            "encoder": lambda: time_encoder(net.encode, batches, device),
            "scoring": lambda: time_scoring(net, dataset, device, args.batch_size),
            "naive": lambda: time_naive(net, batches, device, args.size),
        }
        for run in runs.values():  # warm-up (allocator, kernels, caches)
            run()
        times = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, run in runs.items():
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
                times[key].append((time.perf_counter() - start) / args.images)
        ms = {key: 1000 * statistics.median(values) for key, values in times.items()}
        print(f"{model:<16} {weights:<8} {ms['plain']:>8.1f} ms {ms['encoder']:>8.1f} ms {ms['scoring']:>8.1f} ms "
              f"{ms['naive']:>8.1f} ms {ms['scoring'] / ms['encoder']:>11.3f}x {ms['scoring'] / ms['plain']:>13.3f}x "
              f"{ms['naive'] / ms['scoring']:>13.2f}x")
        del sam, net
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print("targets: scoring/enc <= 1.15, naive/scoring >= 2.5 (per-image times)")


if __name__ == "__main__":
    main()
