"""One-shot GPU check: throughput, peak memory and autocast fidelity of pool scoring, training and validation.

    bash benchmarks/gpu_check.sh                  # on a CUDA machine (no network): one table, ~3-5 min on an H100
    python3 benchmarks/gpu_check.py --dry-run     # the same code on the CPU at toy sizes, in seconds (CI)
    python3 benchmarks/gpu_check.py --device cpu --configs l:512 --images 4 --val-images 4 --repeats 1
                                                  # CPU figures at a real size (docs/performance.md's CPU estimate)

Per configuration (default: hiera_t and hiera_l at 512 px, hiera_l at 1024 px with activation checkpointing),
seeded random weights (no checkpoint; hypernetwork outputs scaled x40 so that masks, and so scores, differ
between images), batch --batch, synthetic lesion-on-skin images. Training and validation are measured in both of the
trainer's --precision settings: float32 (the default, as the reference) and mixed (utils.autocast: bf16 where
supported, else fp16 with the gradient scaler); pool scoring as the default runs it (utils.scoring_dtype: fp16
autocast on CUDA, as the reference scores):

  enc ms/img    one image-encoder forward (LoRA_Sam.encode, under the scoring autocast): the floor of scoring
  score img/s   MaskDifferenceStrategy.select over the pool; score/enc = scoring per image / encoder (goal <= 1.15)
  train img/s   optimiser steps as the trainer takes them: both decoders (point prompts), 0.2 CE + 0.8 Dice at
                the input size, AdamW, gradient clipping 1.0; fp32 and mixed
  val img/s     decoder-1 logits + val.image_metrics at 3008 x 2000 (ground truths kept on the device); fp32, mixed
  peak GiB      torch.cuda.max_memory_allocated while training (fp32, mixed) / while scoring
  autocast-fp32 mask-difference scores of the pool under the scoring autocast and in float32: max |difference|,
                Spearman rho (--dry-run: bf16 CPU autocast, so that reduced precision is really compared)

--compile CONFIG...: a second table, the encoder forward with and without LoRA_Sam.compile_image_encoder (after
compiling; --dry-run compiles with the "eager" backend, which checks the code path only). Rows print as they
finish, as Markdown tables.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import utils  # noqa: E402
import val  # noqa: E402
from active_learning_strategies import MaskDifferenceStrategy, SelectionContext  # noqa: E402
from datasets_skin import PIXEL_MEAN, PIXEL_STD  # noqa: E402
from sam_lora_image_encoder_prompt import build_model  # noqa: E402  (the one model factory)

MODELS = {"t": "sam2.1_hiera_t", "s": "sam2.1_hiera_s", "b+": "sam2.1_hiera_b+", "l": "sam2.1_hiera_l"}
FULL_SIZE = (2000, 3008)  # H x W of a typical ISIC-2017 photo
PRECISIONS = ("float32", "mixed")  # trainer.py --precision
COLUMNS = ("model", "px", "grad ckpt", "enc ms/img", "score img/s", "score/enc", "train img/s fp32",
           "train img/s mixed", "val img/s fp32", "val img/s mixed", "peak GiB train fp32", "peak GiB train mixed",
           "peak GiB score", "autocast-fp32 max abs diff", "Spearman")
COMPILE_COLUMNS = ("model", "px", "enc ms/img eager", "enc ms/img compiled", "speed-up", "compile s")


def parse_config(text: str):
    """'l:1024:ckpt' -> ('sam2.1_hiera_l', 1024, True)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in MODELS or not parts[1].isdigit() or parts[2:] not in ([], ["ckpt"]):
        raise argparse.ArgumentTypeError(f"config {text!r}: expected MODEL:PX[:ckpt] with MODEL in {sorted(MODELS)}")
    return MODELS[parts[0]], int(parts[1]), parts[2:] == ["ckpt"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, hiera_t at 64 px, 4 images: checks the code path")
    p.add_argument("--device", default="cuda", help="cuda[:i], or cpu for CPU figures at real sizes (slow)")
    p.add_argument("--configs", nargs="+", type=parse_config, default=None, help="default: t:512 l:512 l:1024:ckpt")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=32, help="pool / training / fidelity images per configuration")
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    p.add_argument("--compile", nargs="*", type=parse_config, default=None, metavar="CONFIG",
                   help="also time the torch.compile'd encoder for these configurations (alone: t:512 l:512)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.configs, args.batch, args.images, args.val_images, args.repeats = [parse_config("t:64:ckpt")], 2, 4, 2, 1
        args.compile = None if args.compile is None else [parse_config("t:64")]
    args.configs = args.configs or [parse_config(c) for c in ("t:512", "l:512", "l:1024:ckpt")]
    if args.compile == []:
        args.compile = [parse_config(c) for c in ("t:512", "l:512")]
    args.compile = args.compile or []
    return args


def lesion_masks(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """N x 4 ellipse parameters (centre y, x in [-1, 1], radii) -> N x H x W bool masks."""
    yy = torch.linspace(-1, 1, height)[None, :, None]
    xx = torch.linspace(-1, 1, width)[None, None, :]
    cy, cx, ry, rx = (params[:, i, None, None] for i in range(4))
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def synthetic_set(count: int, size: int, seed: int):
    """-> (normalised images N x 3 x S x S, labels N x S x S long, ellipse parameters N x 4)."""
    gen = torch.Generator().manual_seed(seed)
    params = torch.cat([torch.rand(count, 2, generator=gen) * 0.8 - 0.4, torch.rand(count, 2, generator=gen) * 0.3 + 0.2], 1)
    inside = lesion_masks(params, size, size)
    skin, lesion = torch.tensor([0.85, 0.70, 0.62]), torch.tensor([0.45, 0.30, 0.20])
    rgb = torch.where(inside[:, None], lesion[None, :, None, None], skin[None, :, None, None])
    rgb = (rgb + 0.05 * torch.randn(rgb.shape, generator=gen)).clamp(0, 1)
    images = (rgb - torch.tensor(PIXEL_MEAN)[:, None, None]) / torch.tensor(PIXEL_STD)[:, None, None]
    return images, inside.long(), params


def sharpen_decoders(net, factor: float = 40.0):
    with torch.no_grad():
        for decoder in (net.sam.sam_mask_decoder, net.sam.sam_mask_decoder2):
            for mlp in decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(factor)
    return net


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def batches(tensor: torch.Tensor, size: int):
    return [tensor[i : i + size] for i in range(0, len(tensor), size)]


DEFAULT_PRECISION = "float32"  # trainer.py's default --precision: pool scoring is measured under its autocast


def encoder_seconds(net, images, batch, device, repeats) -> float:
    """Per image: one LoRA_Sam.encode pass (eval, inference mode, the scoring autocast)."""
    net.eval()
    chunks = batches(images.to(device), batch)

    def run():
        with torch.inference_mode(), utils.autocast(device, dtype=utils.scoring_dtype(device, DEFAULT_PRECISION)):
            for chunk in chunks:
                net.encode(chunk)

    return median_seconds(run, device, repeats) / len(images)


def scoring_seconds(net, images, batch, device, repeats):
    """Per image: MaskDifferenceStrategy.select over the pool (images come from the host, as from a dataset);
    and the peak memory of it."""
    context = SelectionContext(net, [{"image": image} for image in images], list(range(len(images))), batch, device,
                               batch_size=batch, seed=0, autocast_dtype=utils.scoring_dtype(device, DEFAULT_PRECISION))
    strategy = MaskDifferenceStrategy()
    utils.reset_peak_memory(device)
    seconds = median_seconds(lambda: strategy.select(context), device, repeats)
    return seconds / len(images), utils.peak_memory_gb(device)


def scoring_precision(device: torch.device):
    """The scoring autocast of the trainer's default (utils.scoring_dtype: fp16) on CUDA; bf16 autocast on the CPU,
    so that --dry-run compares real reduced-precision scores with float32 ones."""
    if device.type == "cuda":
        return utils.autocast(device, dtype=utils.scoring_dtype(device, DEFAULT_PRECISION))
    return torch.autocast("cpu", dtype=torch.bfloat16)


def score_fidelity(net, images, batch, device):
    """Scoring-autocast vs float32 mask-difference scores of the same images: (max |difference|, Spearman rho)."""
    from scipy.stats import spearmanr

    strategy = MaskDifferenceStrategy()
    net.eval()

    def scores(cast: bool) -> np.ndarray:
        out = []
        with torch.inference_mode(), (scoring_precision(device) if cast else contextlib.nullcontext()):
            for start, chunk in zip(range(0, len(images), batch), batches(images.to(device), batch)):
                indices = list(range(start, start + len(chunk)))
                out.append(strategy.score_batch(net, chunk, indices, seed=0).float().cpu())
        return torch.cat(out).numpy()

    full, mixed = scores(False), scores(True)
    rho = spearmanr(full, mixed).statistic if np.ptp(full) > 0 and np.ptp(mixed) > 0 else float("nan")
    return float(np.abs(full - mixed).max()), float(rho)


def training_seconds(net, images, labels, batch, device, repeats, precision):
    """Per image: trainer-like optimiser steps (both decoders, point prompts, CE + Dice, AdamW, clip 1.0) at the
    trainer's ``precision`` (mixed: autocast, with the gradient scaler where it is fp16); and the peak memory."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    mixed = precision == "mixed"
    scaler = torch.amp.GradScaler("cuda", enabled=mixed and utils.amp_dtype(device) == torch.float16)
    size = images.shape[-1]
    steps = list(zip(batches(images.to(device), batch), batches(labels.to(device), batch)))
    generator = np.random.default_rng(0)

    def run():
        net.train()
        for chunk, target in steps:
            with utils.autocast(device, enabled=mixed):
                outputs = net(chunk, False, size, 0, "point", generator=generator)
            loss = utils.dual_decoder_loss(outputs, target, dice_weight=0.8)["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
            scaler.step(optimizer)
            scaler.update()

    utils.reset_peak_memory(device)
    seconds = median_seconds(run, device, repeats)
    net.eval()
    return seconds / len(images), utils.peak_memory_gb(device)


def validation_seconds(net, images, params, batch, device, repeats, full_size, precision) -> float:
    """Per image: val.validate (decoder-1 logits + image_metrics at ``full_size``) at the trainer's ``precision``,
    ground truths cached."""
    gts = lesion_masks(params, *full_size).numpy().astype(np.uint8)
    loader = [dict(image=images[i : i + batch], mask_orig=list(gts[i : i + batch]),
                   name=[f"synthetic_{j}" for j in range(i, min(i + batch, len(gts)))],
                   index=list(range(i, min(i + batch, len(gts))))) for i in range(0, len(gts), batch)]
    truths = val.GroundTruthCache()

    def predict(x: torch.Tensor) -> torch.Tensor:
        with utils.autocast(device, enabled=precision == "mixed"):
            return net.predict_logits(x, 1)

    net.eval()
    return median_seconds(lambda: val.validate(predict, loader, 1, device, truths=truths), device, repeats) / len(gts)


def measure(model_cfg, size, grad_ckpt, args, device) -> dict:
    net = sharpen_decoders(build_model(model_cfg, None, size, seed=0, device=device))
    net.set_grad_checkpointing(grad_ckpt)
    images, labels, params = synthetic_set(args.images, size, seed=1)
    full_size = FULL_SIZE if not args.dry_run else (120, 180)
    row = dict(model=model_cfg.replace("sam2.1_", ""), px=size, ckpt=grad_ckpt)
    row["fidelity"] = score_fidelity(net, images, args.batch, device)
    row["enc"] = encoder_seconds(net, images, args.batch, device, args.repeats)
    row["score"], row["peak_score"] = scoring_seconds(net, images, args.batch, device, args.repeats)
    for precision in PRECISIONS:
        row[f"val {precision}"] = validation_seconds(net, images[: args.val_images], params[: args.val_images],
                                                     args.batch, device, args.repeats, full_size, precision)
    for precision in PRECISIONS:
        row[f"train {precision}"], row[f"peak_train {precision}"] = training_seconds(
            net, images, labels, args.batch, device, args.repeats, precision)
    del net
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def format_row(row: dict) -> str:
    def gib(value):
        return "-" if value is None else f"{value:.1f}"

    cells = [row["model"], str(row["px"]), "yes" if row["ckpt"] else "no", f"{1000 * row['enc']:.1f}",
             f"{1 / row['score']:.3g}", f"{row['score'] / row['enc']:.2f}",
             *(f"{1 / row[f'{step} {p}']:.3g}" for step in ("train", "val") for p in PRECISIONS),
             *(gib(row[f"peak_train {p}"]) for p in PRECISIONS), gib(row["peak_score"]),
             f"{row['fidelity'][0]:.2e}", f"{row['fidelity'][1]:.4f}"]
    return "| " + " | ".join(cells) + " |"


def compile_row(model_cfg, size, args, device) -> str:
    """Encoder forward per image, eager and torch.compile'd (the first compiled pass, timed apart, compiles)."""
    net = build_model(model_cfg, None, size, seed=0, device=device)
    images = synthetic_set(args.images, size, seed=1)[0]
    eager = encoder_seconds(net, images, args.batch, device, args.repeats)
    net.compile_image_encoder(**({"backend": "eager"} if args.dry_run else {}))
    start = time.perf_counter()
    with torch.inference_mode(), utils.autocast(device, dtype=utils.scoring_dtype(device, DEFAULT_PRECISION)):
        net.encode(images[: args.batch].to(device))
    sync(device)
    compile_s = time.perf_counter() - start
    compiled = encoder_seconds(net, images, args.batch, device, args.repeats)
    cells = [model_cfg.replace("sam2.1_", ""), str(size), f"{1000 * eager:.1f}", f"{1000 * compiled:.1f}",
             f"{eager / compiled:.2f}x", f"{compile_s:.0f}"]
    return "| " + " | ".join(cells) + " |"


def print_header(columns) -> None:
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to check the code path on the CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; batch {args.batch}; mixed autocast "
          f"{utils.amp_dtype(device) or 'off (float32)'}, scoring autocast "
          f"{utils.scoring_dtype(device, DEFAULT_PRECISION) or 'off'}; {args.images} images, validation "
          f"{args.val_images} at "
          f"{'120x180' if args.dry_run else 'x'.join(map(str, FULL_SIZE[::-1]))}; median of {args.repeats}", flush=True)
    print_header(COLUMNS)
    for model_cfg, size, grad_ckpt in args.configs:
        start = time.perf_counter()
        print(format_row(measure(model_cfg, size, grad_ckpt, args, device)), flush=True)
        print(f"  ({model_cfg} {size} px: {time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    if args.compile:
        print()
        print_header(COMPILE_COLUMNS)
    for model_cfg, size, _ in args.compile:
        print(compile_row(model_cfg, size, args, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
