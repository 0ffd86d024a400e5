"""Segmentation metrics (ISIC conventions + HD95), the batched validation loop, and an evaluation CLI.

Metric conventions (per image, binary masks; ``pred`` and ``gt`` nonzero = lesion):
  * dice, jaccard: 1.0 when both masks are empty (the ISIC challenge scorer's convention).
  * threshold_jaccard: jaccard, or 0 when jaccard < 0.65 (ISIC 2017/2018 main metric).
  * sensitivity: 1.0 when the ground truth is empty; specificity: 1.0 when the ground truth covers the whole image.
  * accuracy: (TP + TN) / pixels.
  * hd95: 95th percentile of the symmetric boundary distances, as medpy.metric.binary.hd95 defines it (default
    connectivity 1; see ``hd95`` for how it is computed), in pixels, or in the units of ``spacing`` (e.g. mm).
    Both empty -> 0.0. Exactly one empty -> the image diagonal (the largest distance possible in the image), so
    an empty prediction is penalised in the mean instead of silently dropped.

Usage:
    python val.py --data_root DATA --split Validation --checkpoint best_model_dice0.8732.pth \
        [--model_cfg sam2/configs/sam2.1/sam2.1_hiera_l.yaml --sam_ckpt sam2/checkpoints/sam2.1_hiera_large.pt
         --img_size 512 --num_classes 1 --rank 4 --batch_size 4 --gpu 0 --output_csv metrics.csv]
    python val.py --data_root DATA --split Test --pred_dir my_predictions/   # score PNG predictions directly
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader

from datasets_skin import DatasetError, ValSkinDataset, collate_val, decode_mask, discover_samples, find_split
from safe_io import CheckpointFileError, atomic_path, load_torch_file
from sam2.build_sam import CheckpointError, ConfigNotFoundError
from sam_lora_image_encoder_prompt import build_model
from utils import DeviceError, select_device

METRIC_NAMES = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy", "hd95")
JACCARD_THRESHOLD = 0.65

Spacing = Union[None, float, Sequence[float]]


def _as_binary(mask, what: str) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D H x W mask, got shape {array.shape}.")
    return array != 0


def _spacing_vector(spacing: Spacing) -> np.ndarray:
    if spacing is None:
        return np.ones(2)
    vector = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,))
    if not np.all(vector > 0):
        raise ValueError(f"spacing must be positive, got {spacing!r}.")
    return vector


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it; the image edge counts as outside (medpy's erosion)."""
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    return mask & ~interior


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """95th-percentile Hausdorff distance between two boolean H x W masks (conventions in the module docstring).

    Same definition and value as ``medpy.metric.binary.hd95`` (connectivity 1): the 95th percentile (linear
    interpolation) of the distances from every boundary pixel of each mask to the nearest boundary pixel of the
    other. medpy gets them from distance transforms of the whole image; nearest-neighbour queries on the boundary
    points give the same numbers ~30x faster on full-size ISIC photos (0.5 s instead of 18 s at 6688 x 4439).
    The tests check equality with medpy.
    """
    pred_any, gt_any = pred.any(), gt.any()
    if not pred_any and not gt_any:
        return 0.0
    scale = _spacing_vector(spacing)
    if not pred_any or not gt_any:
        return float(np.hypot(*(np.asarray(pred.shape) * scale)))
    pred_points = np.argwhere(boundary(pred)) * scale
    gt_points = np.argwhere(boundary(gt)) * scale
    pred_to_gt, _ = cKDTree(gt_points).query(pred_points)
    gt_to_pred, _ = cKDTree(pred_points).query(gt_points)
    return float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95))


def segmentation_metrics(pred, gt, spacing: Spacing = None) -> Dict[str, float]:
    """All per-image metrics for one binary prediction against its ground truth (same H x W).

    ``pred``/``gt``: numpy arrays or tensors, nonzero = foreground. ``spacing``: pixel size (one value or
    (row, col)), only affects hd95.
    """
    pred_b, gt_b = _as_binary(pred, "pred"), _as_binary(gt, "gt")
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"Prediction {pred_b.shape} and ground truth {gt_b.shape} differ in size.")
    tp = int(np.count_nonzero(pred_b & gt_b))
    fp = int(np.count_nonzero(pred_b)) - tp
    fn = int(np.count_nonzero(gt_b)) - tp
    tn = pred_b.size - tp - fp - fn
    disagreement = tp + fp + fn
    jaccard = 1.0 if disagreement == 0 else tp / disagreement
    return dict(
        dice=1.0 if disagreement == 0 else 2 * tp / (2 * tp + fp + fn),
        jaccard=jaccard,
        threshold_jaccard=jaccard if jaccard >= JACCARD_THRESHOLD else 0.0,
        sensitivity=1.0 if tp + fn == 0 else tp / (tp + fn),
        specificity=1.0 if tn + fp == 0 else tn / (tn + fp),
        accuracy=(tp + tn) / pred_b.size,
        hd95=hd95(pred_b, gt_b, spacing),
    )


def class_metrics_row(label_map: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Spacing = None) -> dict:
    """Metrics of every foreground class 1..num_classes of ``label_map`` vs ``gt`` (both H x W class indices).

    The plain metric keys hold the mean over foreground classes; with more than one class, ``<metric>_c<k>``
    hold class k's own values.
    """
    per_class = [segmentation_metrics(label_map == c, gt == c, spacing) for c in range(1, num_classes + 1)]
    row = {m: float(np.mean([pc[m] for pc in per_class])) for m in METRIC_NAMES}
    if num_classes > 1:
        for c, pc in enumerate(per_class, start=1):
            row.update({f"{m}_c{c}": pc[m] for m in METRIC_NAMES})
    return row


def summarize(rows: Sequence[dict], num_classes: int) -> dict:
    """Means/stds over images and per-class ``(dice, hd95)`` means."""
    if not rows:
        raise ValueError("No images were evaluated (the loader was empty).")
    keys = [k for k in rows[0] if k not in ("name", "index")]
    values = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in keys}
    mean = {k: float(v.mean()) for k, v in values.items()}
    std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
    if num_classes == 1:
        per_class = [(mean["dice"], mean["hd95"])]
    else:
        per_class = [(mean[f"dice_c{c}"], mean[f"hd95_c{c}"]) for c in range(1, num_classes + 1)]
    return dict(rows=list(rows), mean=mean, std=std, per_class=per_class)


def logits_to_label_map(logits: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """One image's logits (C+1) x h x w -> uint8 class map at ``size`` (H, W).

    The logits are upsampled bilinearly (align_corners=False) to the original size and the class is the argmax
    there; with one foreground class this is "softmax foreground probability > 0.5" (ties go to background).
    """
    upsampled = F.interpolate(logits[None].float(), size=tuple(size), mode="bilinear", align_corners=False)
    return upsampled[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def validate(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[dict],
    num_classes: int,
    device: Union[str, torch.device],
    spacing: Spacing = None,
) -> dict:
    """Run ``predict_fn`` batch by batch and score every image at its original size.

    ``predict_fn(images B x 3 x S x S) -> logits B x (num_classes+1) x h x w``; ``loader`` yields batches from
    ``datasets_skin.ValSkinDataset`` collated with ``datasets_skin.collate_val`` (``image``, ``mask_orig`` list,
    ``name``, ``index``). Runs under ``torch.no_grad``; putting the model in ``eval()`` is the caller's job.

    Returns dict(rows=[{name, index, metric...}], mean={metric: float}, std={metric: float},
    per_class=[(dice, hd95) for each foreground class]).
    """
    rows: List[dict] = []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        logits = predict_fn(images)
        if logits.ndim != 4 or logits.shape[0] != images.shape[0] or logits.shape[1] != num_classes + 1:
            raise ValueError(
                f"predict_fn returned shape {tuple(logits.shape)}; expected {images.shape[0]} x "
                f"{num_classes + 1} x h x w for num_classes={num_classes}."
            )
        for i, gt in enumerate(batch["mask_orig"]):
            gt = gt.numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            label_map = logits_to_label_map(logits[i], gt.shape)
            row = dict(name=batch["name"][i], index=int(batch["index"][i]))
            row.update(class_metrics_row(label_map, gt, num_classes, spacing))
            rows.append(row)
    return summarize(rows, num_classes)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


class EvalError(RuntimeError):
    """A user-facing problem with the CLI's inputs (message names the flag or file)."""


def load_model_for_eval(
    checkpoint: Union[str, os.PathLike],
    model_cfg: str,
    sam_ckpt: Optional[str],
    img_size: int,
    num_classes: int,
    rank: int,
    device: torch.device,
    decoder: int = 1,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Build SAM2 + LoRA_Sam, load a ``best_model_dice*.pth`` state dict and return ``predict_fn`` for ``validate``.

    Every problem with the inputs is an ``EvalError`` naming the flag.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise EvalError(f"--checkpoint {str(checkpoint)!r} does not exist.")
    if sam_ckpt is not None and not Path(sam_ckpt).is_file():
        raise EvalError(f"--sam_ckpt {sam_ckpt!r} does not exist; place the official SAM2.1 checkpoint there.")
    try:
        net = build_model(model_cfg, sam_ckpt, img_size, rank=rank, num_classes=num_classes, device=device)
    except ConfigNotFoundError as err:
        raise EvalError(f"--model_cfg {model_cfg}: {err}") from None
    except (CheckpointError, CheckpointFileError) as err:
        raise EvalError(f"--sam_ckpt {sam_ckpt}: {err}") from None
    try:
        state = load_torch_file(checkpoint, map_location=device)
    except CheckpointFileError as err:
        raise EvalError(f"--checkpoint: {err}") from None
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise EvalError(
            f"--checkpoint {str(checkpoint)!r} does not fit this model (check --model_cfg, --rank, --img_size, "
            f"--num_classes): {err}"
        ) from err
    net.eval()

    def predict(images: torch.Tensor) -> torch.Tensor:
        features = net.encode(images)
        return net.decode(features, decoder)["low_res_logits"].float()

    return predict


def score_prediction_dir(
    pred_dir: Union[str, os.PathLike], image_dir: Path, mask_dir: Path, spacing: Spacing = None
) -> dict:
    """Score PNG predictions (``<name>_segmentation.png`` or ``<name>.png``, > 127 = lesion) against a split."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvalError(f"--pred_dir {str(pred_dir)!r} is not a folder.")
    samples = discover_samples(image_dir, mask_dir, check_files=False)
    missing, rows = [], []
    for sample in samples:
        candidates = [pred_dir / f"{sample.name}_segmentation.png", pred_dir / f"{sample.name}.png"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(sample.name)
            continue
        gt = decode_mask(sample.mask_path, None)
        pred = decode_mask(found, None)
        if pred.shape != gt.shape:
            raise EvalError(
                f"Prediction {str(found)!r} is {pred.shape[1]}x{pred.shape[0]} but the ground truth "
                f"{sample.mask_path.name} is {gt.shape[1]}x{gt.shape[0]} (W x H)."
            )
        row = dict(name=sample.name, index=len(rows))
        row.update(segmentation_metrics(pred, gt, spacing))
        rows.append(row)
    if missing:
        raise EvalError(
            f"{len(missing)} of {len(samples)} images have no prediction in {str(pred_dir)!r} "
            f"(expected <name>_segmentation.png or <name>.png): {', '.join(missing[:10])}"
            + (" ..." if len(missing) > 10 else "")
        )
    return summarize(rows, 1)


def write_csv(rows: Sequence[dict], path: Union[str, os.PathLike]) -> None:
    """Per-image rows to CSV, written atomically (temporary file + rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


def format_summary(result: dict) -> str:
    lines = [f"{len(result['rows'])} images"]
    for key, mean in result["mean"].items():
        lines.append(f"  {key:>18s}: {mean:.4f} ± {result['std'][key]:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a MD-SAM-AL checkpoint (or PNG predictions) on a split.")
    parser.add_argument("--data_root", required=True, help="dataset root (README or ISIC-2017 layout)")
    parser.add_argument("--split", default="Validation", choices=("Validation", "Test", "Training"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="best_model_dice*.pth saved by trainer.py")
    source.add_argument("--pred_dir", help="folder of PNG predictions to score instead of running a model")
    parser.add_argument("--model_cfg", default="sam2.1_hiera_l", help="SAM2 config the checkpoint was trained with "
                        "(YAML path, packaged name or short name such as sam2.1_hiera_t)")
    parser.add_argument("--sam_ckpt", default=None, help="official SAM2.1 weights; optional, since the checkpoint "
                        "already holds the full model")
    parser.add_argument("--img_size", type=int, default=512)
    parser.add_argument("--num_classes", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank the checkpoint was trained with")
    parser.add_argument("--decoder", type=int, default=1, choices=(1, 2), help="which decoder's masks to score")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--gpu", default="0")
    parser.add_argument("--spacing", type=float, default=None, help="pixel size (e.g. mm) for hd95; default pixels")
    parser.add_argument("--output_csv", default=None, help="per-image CSV (default: metrics_<split>.csv beside the "
                        "checkpoint or prediction folder)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = next((f"--{flag} must be positive, got {getattr(args, flag)}"
                    for flag in ("img_size", "num_classes", "batch_size", "rank") if getattr(args, flag) <= 0), None)
    if args.num_classes > 4:
        problem = f"--num_classes must be 1..4 (one SAM2 mask token per class), got {args.num_classes}"
    if args.spacing is not None and not args.spacing > 0:
        problem = f"--spacing must be a positive pixel size, got {args.spacing}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        image_dir, mask_dir = find_split(args.data_root, args.split)
        if args.pred_dir is not None:
            result = score_prediction_dir(args.pred_dir, image_dir, mask_dir, args.spacing)
            source = Path(args.pred_dir)
        else:
            try:
                device = select_device(args.gpu)
            except DeviceError as err:
                raise EvalError(f"--gpu {args.gpu}: {err}") from None
            predict_fn = load_model_for_eval(
                args.checkpoint, args.model_cfg, args.sam_ckpt, args.img_size, args.num_classes, args.rank,
                device, args.decoder,
            )
            dataset = ValSkinDataset(image_dir, mask_dir, args.img_size)
            loader = DataLoader(
                dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                collate_fn=collate_val,
            )
            result = validate(predict_fn, loader, args.num_classes, device, args.spacing)
            source = Path(args.checkpoint)
    except DatasetError as err:
        print(f"error: --data_root {args.data_root}: {err}", file=sys.stderr)
        return 2
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    output_csv = Path(args.output_csv) if args.output_csv else source.resolve().parent / f"metrics_{args.split}.csv"
    write_csv(result["rows"], output_csv)
    print(format_summary(result))
    print(f"per-image metrics written to {output_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
