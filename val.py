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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch.utils.data import DataLoader

from datasets_skin import (DEFAULT_MAX_IMAGE_PIXELS, DatasetError, ImageTooLargeError, ValSkinDataset, collate_val,
                           decode_mask, discover_samples, find_split, require_a_lesion)
from safe_io import atomic_path, probe_writable, replaced_input
from sam_lora_image_encoder_prompt import SIZE_MULTIPLE, ModelInputError, build_model
from utils import DeviceError, select_device

# Why --num_classes is 1: the masks are read as lesion / background (datasets_skin.read_mask, as the reference's
# labels > 127), so a second class could never be labeled, and its Dice of 1.0 (empty in prediction and truth
# alike) would be averaged into the validation Dice that chooses the best checkpoint.
BINARY_MASKS = ("the masks are read as binary (lesion / background, as the reference code: labels > 127), so they "
                "carry one class, lesion: use --num_classes 1 (another class could never be labeled, and its "
                "vacuous Dice of 1.0 would be averaged into the validation Dice)")

METRIC_NAMES = ("dice", "jaccard", "threshold_jaccard", "sensitivity", "specificity", "accuracy", "hd95")
JACCARD_THRESHOLD = 0.65


def is_metric_column(name: str) -> bool:
    """Whether a column of a metrics table holds a metric: a name of METRIC_NAMES, or ``<metric>_c<k>`` (class k)."""
    metric, _, cls = name.rpartition("_c")
    return name in METRIC_NAMES or (metric in METRIC_NAMES and cls.isdigit())

Spacing = Union[None, float, Sequence[float]]


def _as_array(mask, what: str) -> np.ndarray:
    array = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"{what} must be a 2-D H x W mask, got shape {array.shape}.")
    return array


def _as_binary(mask, what: str) -> np.ndarray:
    return _as_array(mask, what) != 0


def _spacing_vector(spacing: Spacing) -> np.ndarray:
    if spacing is None:
        return np.ones(2)
    vector = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (2,))
    if not np.all((vector > 0) & np.isfinite(vector)):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}.")
    return vector


def _device_resident(device: Union[str, torch.device]) -> bool:
    """Whether masks on ``device`` are scored as tensors there (CUDA and other accelerators), or as numpy views
    (the CPU, where numpy's boolean operations and counts are 3-20x faster than torch's)."""
    return torch.device(device).type != "cpu"


def _working_array(mask: torch.Tensor):
    """A mask tensor as scoring uses it: itself on an accelerator, a zero-copy numpy view on the CPU."""
    return mask if _device_resident(mask.device) else mask.numpy()


def boundary(mask):
    """Pixels of ``mask`` with a 4-neighbour outside it; the image edge counts as outside (medpy's erosion).

    ``mask``: H x W bool numpy array, or tensor on any device (the result stays there).
    """
    interior = mask.clone() if isinstance(mask, torch.Tensor) else mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    interior[[0, -1], :] = False
    interior[:, [0, -1]] = False
    return mask & ~interior


def boundary_points(mask) -> np.ndarray:
    """(row, col) of every boundary pixel of an H x W bool mask (numpy, or tensor on any device): N x 2 int64 numpy.

    For a device tensor only these points come back to the host. Row-major order, as ``np.argwhere`` gives.
    """
    if isinstance(mask, torch.Tensor):
        edge = boundary(mask)
        flat = edge.flatten().nonzero().squeeze(1).cpu().numpy()
        return np.stack(np.divmod(flat, mask.shape[1]), axis=1)
    rows, cols = _content_box(mask)
    if rows.start == rows.stop:
        return np.empty((0, 2), np.int64)
    edge = boundary(mask[rows, cols])
    flat = np.flatnonzero(edge)  # ~20x faster than np.argwhere on full-size photos
    return np.stack(np.divmod(flat, edge.shape[1]), axis=1) + (rows.start, cols.start)


def _content_box(mask: np.ndarray) -> Tuple[slice, slice]:
    """The rows and columns holding foreground, widened by one pixel where the image goes on.

    Boundary pixels lie inside it, and there they are the same as in the whole mask: its sides are either the
    image's edges or a background line. A lesion covering a few percent of a photo is found ~5x faster.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return slice(0, 0), slice(0, 0)
    return slice(max(rows[0] - 1, 0), rows[-1] + 2), slice(max(cols[0] - 1, 0), cols[-1] + 2)


def _hd95_of_points(pred_points: np.ndarray, gt_points: np.ndarray, shape: Tuple[int, int], spacing: Spacing) -> float:
    """HD95 from the boundary points of two masks of ``shape`` (no points: that mask is empty)."""
    if not len(pred_points) and not len(gt_points):
        return 0.0
    scale = _spacing_vector(spacing)
    if not len(pred_points) or not len(gt_points):
        return float(np.hypot(*(np.asarray(shape) * scale)))
    pred_points, gt_points = pred_points * scale, gt_points * scale
    pred_to_gt, _ = cKDTree(gt_points).query(pred_points)
    gt_to_pred, _ = cKDTree(pred_points).query(gt_points)
    return float(np.percentile(np.concatenate([pred_to_gt, gt_to_pred]), 95))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Spacing = None) -> float:
    """95th-percentile Hausdorff distance between two boolean H x W masks (conventions in the module docstring).

    Same definition and value as ``medpy.metric.binary.hd95`` (connectivity 1): the 95th percentile (linear
    interpolation) of the distances from every boundary pixel of each mask to the nearest boundary pixel of the
    other. medpy gets them from distance transforms of the whole image; nearest-neighbour queries on the boundary
    points give the same numbers ~30x faster on full-size ISIC photos (0.5 s instead of 18 s at 6688 x 4439).
    The tests check equality with medpy.
    """
    return _hd95_of_points(boundary_points(pred), boundary_points(gt), pred.shape, spacing)


def _confusion_metrics(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    """The six pixel-count metrics (conventions in the module docstring)."""
    disagreement = tp + fp + fn
    jaccard = 1.0 if disagreement == 0 else tp / disagreement
    return dict(
        dice=1.0 if disagreement == 0 else 2 * tp / (2 * tp + fp + fn),
        jaccard=jaccard,
        threshold_jaccard=jaccard if jaccard >= JACCARD_THRESHOLD else 0.0,
        sensitivity=1.0 if tp + fn == 0 else tp / (tp + fn),
        specificity=1.0 if tn + fp == 0 else tn / (tn + fp),
        accuracy=(tp + tn) / (tp + fp + fn + tn),
    )


def _count_nonzero(*masks) -> List[int]:
    """Pixel counts of masks of one kind: numpy arrays, or tensors on one device (then one transfer for all)."""
    if isinstance(masks[0], torch.Tensor):
        return torch.stack([torch.count_nonzero(m) for m in masks]).tolist()
    return [int(np.count_nonzero(m)) for m in masks]


def _binary_metrics(pred, gt, gt_count: int, gt_points: np.ndarray, spacing: Spacing) -> Dict[str, float]:
    """All seven metrics of H x W bool ``pred`` against ``gt`` (both numpy, or both tensors on one device), given
    ``gt``'s pixel count and boundary points."""
    tp, pred_count = _count_nonzero(pred & gt, pred)
    height, width = pred.shape
    fp, fn = pred_count - tp, gt_count - tp
    row = _confusion_metrics(tp, fp, fn, height * width - tp - fp - fn)
    pred_points = boundary_points(pred)
    row["hd95"] = _hd95_of_points(pred_points, gt_points, (height, width), spacing)
    return row


def segmentation_metrics(pred, gt, spacing: Spacing = None) -> Dict[str, float]:
    """All per-image metrics for one binary prediction against its ground truth (same H x W).

    ``pred``/``gt``: numpy arrays or tensors, nonzero = foreground. ``spacing``: pixel size (one value or
    (row, col)), only affects hd95.
    """
    pred_b, gt_b = _as_binary(pred, "pred"), _as_binary(gt, "gt")
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"Prediction {pred_b.shape} and ground truth {gt_b.shape} differ in size.")
    return _binary_metrics(pred_b, gt_b, int(np.count_nonzero(gt_b)), boundary_points(gt_b), spacing)


def _class_row(per_class: Sequence[Dict[str, float]]) -> dict:
    """Per-class metric dicts -> one row: plain keys = mean over classes; with several, ``<metric>_c<k>`` too."""
    row = {m: float(np.mean([pc[m] for pc in per_class])) for m in METRIC_NAMES}
    if len(per_class) > 1:
        for c, pc in enumerate(per_class, start=1):
            row.update({f"{m}_c{c}": pc[m] for m in METRIC_NAMES})
    return row


def class_metrics_row(label_map: np.ndarray, gt: np.ndarray, num_classes: int, spacing: Spacing = None) -> dict:
    """Metrics of every foreground class 1..num_classes of ``label_map`` vs ``gt`` (both H x W class indices).

    The plain metric keys hold the mean over foreground classes; with more than one class, ``<metric>_c<k>``
    hold class k's own values.
    """
    return _class_row([segmentation_metrics(label_map == c, gt == c, spacing) for c in range(1, num_classes + 1)])


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


# --------------------------------------------------------------------------------------------------------------
# From logits to metrics at the original size (what validate does per image)
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _one_host_thread(device: torch.device) -> Iterator[None]:
    """On the CPU, run the full-size elementwise work on one torch thread (restored afterwards).

    It is memory-bound: extra OpenMP threads gain little on an idle CPU and lose much on a shared or busy one
    (measured on 2 busy cores: upsampling a 3008 x 2000 logit map took 25 ms with two threads, 9-17 ms with one).
    """
    if _device_resident(device):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Reused host buffer for upsampled logits (one slot; validate() frees it when it is done). glibc gives blocks over
# 32 MB back to the OS when freed, so a fresh one page-faults again for every photo above ~8 megapixels: upsampling
# to 4288 x 2848 took 84 ms into fresh memory and 38 ms into reused memory (one thread, busy 2-core CPU).
_host_scratch: List[torch.Tensor] = []


def _upsample(logits: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """K x h x w -> K x H x W, bilinear, align_corners=False (``F.interpolate``'s kernel). On the CPU the result
    lives in the shared scratch buffer: it is valid until the next call."""
    size = [int(s) for s in size]
    if _device_resident(logits.device):
        return F.interpolate(logits[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    numel = logits.shape[0] * size[0] * size[1]
    if not _host_scratch or _host_scratch[0].numel() < numel:
        _host_scratch[:] = [torch.empty(numel)]
    out = _host_scratch[0][:numel].view(1, logits.shape[0], *size)
    torch.ops.aten.upsample_bilinear2d.out(logits[None].contiguous(), size, False, None, None, out=out)
    return out[0]


def _greater(a: torch.Tensor, b: Union[torch.Tensor, float]) -> torch.Tensor:
    """``a > b`` elementwise; on the CPU through numpy views (5x faster than torch's comparison there)."""
    if _device_resident(a.device):
        return a > b
    return torch.from_numpy(np.greater(a.numpy(), b.numpy() if isinstance(b, torch.Tensor) else b))


def _first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """K x H x W -> H x W uint8 index of the maximum, the lowest index among equal maxima (as ``argmax``).

    A running maximum: a few elementwise passes, where ``argmax`` over the channel dimension takes ~0.25 s per
    channel of a 3008 x 2000 photo on the CPU.
    """
    labels = torch.zeros(scores.shape[1:], dtype=torch.uint8, device=scores.device)
    best = scores[0]
    for c in range(1, scores.shape[0]):
        labels.masked_fill_(_greater(scores[c], best), c)
        if c + 1 < scores.shape[0]:
            best = torch.maximum(best, scores[c])
    return labels


def class_masks(logits: torch.Tensor, size: Tuple[int, int]) -> List[torch.Tensor]:
    """One image's logits (C+1) x h x w -> C bool masks H x W (``size``), one per foreground class, on their device.

    A pixel's class is the argmax of the logits upsampled bilinearly (align_corners=False) to ``size``, i.e. the
    softmax argmax, with equal logits going to the lower class (background first). With one class and LoRA_Sam's
    constant-zero background logit this is "upsampled foreground logit > 0": one channel is upsampled and
    thresholded. Otherwise the channels are upsampled and compared (see ``_first_argmax``).
    """
    logits = logits.float()
    with _one_host_thread(logits.device):
        if logits.shape[0] == 2 and not bool(logits[0].any()):
            return [_greater(_upsample(logits[1:], size)[0], 0.0)]
        upsampled = _upsample(logits, size)
        if logits.shape[0] == 2:
            return [_greater(upsampled[1], upsampled[0])]
        labels = _first_argmax(upsampled)
        return [labels == c for c in range(1, logits.shape[0])]


def logits_to_label_map(logits: torch.Tensor, size: Tuple[int, int]) -> np.ndarray:
    """One image's logits (C+1) x h x w -> uint8 class map at ``size`` (H, W): the argmax of the bilinearly
    upsampled logits (see ``class_masks``); with one foreground class "softmax foreground probability > 0.5"."""
    labels = torch.zeros(tuple(int(s) for s in size), dtype=torch.uint8, device=logits.device)
    for c, mask in enumerate(class_masks(logits, size), start=1):
        labels.masked_fill_(mask, c)
    return labels.cpu().numpy()


@dataclass
class GroundTruth:
    """One full-size ground truth prepared for scoring (``prepare_ground_truth``).

    counts / points: per foreground class, its pixel count and boundary points (host). labels: for scoring on an
    accelerator, the H x W class indices on that device (None on the CPU: the loader's array is used).
    """

    shape: Tuple[int, int]
    counts: List[int]
    points: List[np.ndarray]
    labels: Optional[torch.Tensor] = None

    def class_mask(self, c: int, gt, like):
        """Class ``c``'s H x W bool mask of the same kind as the prediction ``like`` (numpy, or a device tensor)."""
        if not isinstance(like, torch.Tensor):
            return _as_array(gt, "gt") == c
        labels = self.labels
        if labels is None or labels.device != like.device:
            labels = torch.from_numpy(np.ascontiguousarray(_as_array(gt, "gt"))).to(like.device)
        return labels == c


def prepare_ground_truth(gt, num_classes: int, device: Union[str, torch.device] = "cpu") -> GroundTruth:
    """H x W class indices (numpy or tensor) -> ``GroundTruth`` for scoring with logits on ``device``."""
    labels = np.ascontiguousarray(_as_array(gt, "gt"))
    masks = [labels == c for c in range(1, num_classes + 1)]
    on_device = torch.from_numpy(labels).to(device) if _device_resident(device) else None
    return GroundTruth(labels.shape, [int(np.count_nonzero(m)) for m in masks], [boundary_points(m) for m in masks],
                       on_device)


class GroundTruthCache:
    """Prepared ground truths of one validation set, owned by the caller and kept for a run: pass the same object
    to every ``validate`` call, and each full-size mask is moved to the scoring device (and its boundary found)
    once per run instead of once per epoch. On an accelerator it holds H x W bytes of device memory per image."""

    def __init__(self) -> None:
        self._truths: Dict[Tuple[str, str, int], GroundTruth] = {}

    def __len__(self) -> int:
        return len(self._truths)

    def get(self, name: str, gt, num_classes: int, device: Union[str, torch.device]) -> GroundTruth:
        key = (str(name), str(torch.device(device)), int(num_classes))
        truth = self._truths.get(key)
        if truth is None:
            truth = self._truths[key] = prepare_ground_truth(gt, num_classes, device)
        elif truth.shape != tuple(np.shape(gt)):
            raise ValueError(
                f"GroundTruthCache: image {name!r} is {tuple(np.shape(gt))} but was {truth.shape} when cached; "
                f"use one cache per validation set."
            )
        return truth


def image_metrics(
    logits: torch.Tensor, gt, num_classes: int, spacing: Spacing = None, truth: Optional[GroundTruth] = None
) -> dict:
    """One image's logits (C+1) x h x w and its full-size ground truth (H x W class indices) -> its metrics row.

    What ``validate`` runs per image. The logits are upsampled to H x W, thresholded and counted on their own
    device; on an accelerator only the predicted boundary points come back to the host, for HD95 (KD-tree on
    the host, equal to medpy's). ``truth``: ``gt`` prepared (``prepare_ground_truth`` or a
    ``GroundTruthCache``); prepared here when None. Row keys as ``class_metrics_row``.
    """
    if logits.ndim != 3 or logits.shape[0] != num_classes + 1:
        raise ValueError(f"logits of one image must be {num_classes + 1} x h x w, got {tuple(logits.shape)}.")
    if truth is None:
        truth = prepare_ground_truth(gt, num_classes, logits.device)
    per_class = []
    for c, mask in enumerate(class_masks(logits, truth.shape), start=1):
        pred = _working_array(mask)
        gt_c = truth.class_mask(c, gt, pred)
        per_class.append(_binary_metrics(pred, gt_c, truth.counts[c - 1], truth.points[c - 1], spacing))
    return _class_row(per_class)


@torch.no_grad()
def validate(
    predict_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[dict],
    num_classes: int,
    device: Union[str, torch.device],
    spacing: Spacing = None,
    truths: Optional[GroundTruthCache] = None,
    gather: Optional[Callable[[Callable[[], List[dict]]], List[dict]]] = None,
) -> dict:
    """Run ``predict_fn`` batch by batch and score every image at its original size (``image_metrics``).

    ``predict_fn(images B x 3 x S x S) -> logits B x (num_classes+1) x h x w``; ``loader`` yields batches from
    ``datasets_skin.ValSkinDataset`` collated with ``datasets_skin.collate_val`` (``image``, ``mask_orig`` list,
    ``name``, ``index``). Runs under ``torch.no_grad``; putting the model in ``eval()`` is the caller's job.
    ``truths``: a ``GroundTruthCache`` kept by the caller across epochs (ground truths prepared and moved to the
    logits' device once per run); without it they are prepared in every call. ``gather``: ``loader`` holds this
    process's share of the images, and ``gather(work)`` returns every process's rows (``work()`` here) in image
    order (``distributed.Ranks.gather``), before any mean is taken.

    Returns dict(rows=[{name, index, metric...}], mean={metric: float}, std={metric: float},
    per_class=[(dice, hd95) for each foreground class]).
    """
    def score(logits: torch.Tensor, batch: dict, i: int) -> Dict[str, float]:
        gt = batch["mask_orig"][i]
        truth = None if truths is None else truths.get(batch["name"][i], gt, num_classes, logits.device)
        return image_metrics(logits[i], gt, num_classes, spacing, truth)

    def rows_here() -> List[dict]:
        try:
            return scored_rows(predict_fn, loader, num_classes, device, score)
        finally:
            _host_scratch.clear()  # up to 4 x (C+1) x H x W bytes: not kept between validations

    return summarize(rows_here() if gather is None else gather(rows_here), num_classes)


def scored_rows(predict_fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict], num_classes: int,
                device: Union[str, torch.device],
                score: Callable[[torch.Tensor, dict, int], Dict[str, float]]) -> List[dict]:
    """One row per image of ``loader``: name, index and ``score(logits, batch, i)`` of image i of its batch, the
    batch's logits (B x (num_classes+1) x h x w, checked) from ``predict_fn``."""
    rows: List[dict] = []
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        logits = predict_fn(images)
        if logits.ndim != 4 or logits.shape[0] != images.shape[0] or logits.shape[1] != num_classes + 1:
            raise ValueError(
                f"predict_fn returned shape {tuple(logits.shape)}; expected {images.shape[0]} x "
                f"{num_classes + 1} x h x w for num_classes={num_classes}."
            )
        for i, name in enumerate(batch["name"]):
            rows.append(dict(name=name, index=int(batch["index"][i]), **score(logits, batch, i)))
    return rows


# --------------------------------------------------------------------------------------------------------------
# The reference code's validation protocol (trainer.py --val_protocol reference)
# --------------------------------------------------------------------------------------------------------------

REFERENCE_VAL_IMAGES = 20  # the reference validates on the first 20 images it lists
REFERENCE_SPACING = 0.1  # the pixel size it assumes for HD95 ("mm")
REFERENCE_HD95_CAP = 100.0
SOFT_DICE_SMOOTH = 1e-5


def _reference_hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """HD95 of two H x W bool masks (``gt`` not empty) as the reference computes it: in units of 0.1 per pixel,
    capped at 100; an empty prediction scores the capped image diagonal."""
    if not pred.any():
        return min(float(np.hypot(*gt.shape)) * REFERENCE_SPACING, REFERENCE_HD95_CAP)
    value = hd95(pred, gt, REFERENCE_SPACING)
    return min(value, REFERENCE_HD95_CAP) if np.isfinite(value) else 0.0


def reference_image_metrics(logits: torch.Tensor, label, num_classes: int) -> Dict[str, float]:
    """One image as the reference's validation scores it (its val.py, test_medical_image), at the model's size.

    logits: (C+1) x h x w, upsampled bilinearly to the label's S x S (the reference's logits come at S x S; how its
    unpublished sam2 makes them is not known), then softmax; label: S x S class indices (the mask resized nearest).
    Per foreground class c: soft Dice (2 sum(p g) + 1e-5) / (sum(p) + sum(g) + 1e-5) of the probability p against
    g = (label == c), and HD95 of p > 0.5 (``_reference_hd95``); a class absent from the label scores Dice 0 and
    HD95 0, whatever is predicted. Returns the means over the foreground classes: dict(dice, hd95).
    """
    size = tuple(label.shape[-2:])
    probs = torch.softmax(F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0], 0)
    probs, label = probs.cpu(), torch.as_tensor(label).cpu()
    dices, distances = [], []
    for c in range(1, num_classes + 1):
        p, g = probs[c].double(), (label == c).double()
        present = bool(g.sum() > 0)
        dices.append(float((2 * (p * g).sum() + SOFT_DICE_SMOOTH) / (p.sum() + g.sum() + SOFT_DICE_SMOOTH))
                     if present else 0.0)
        distances.append(_reference_hd95((p > 0.5).numpy(), g.numpy() > 0) if present else 0.0)
    return dict(dice=float(np.mean(dices)), hd95=float(np.mean(distances)))


@torch.no_grad()
def validate_reference(predict_fn: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict], num_classes: int,
                       device: Union[str, torch.device],
                       gather: Optional[Callable[[Callable[[], List[dict]]], List[dict]]] = None) -> dict:
    """``validate`` with the reference's metrics (``reference_image_metrics``, against each batch's ``label``, the
    mask at the model's size) instead of ours at the original size (``gather`` as there). Returns dict(rows,
    mean={dice, hd95})."""
    def rows_here() -> List[dict]:
        return scored_rows(predict_fn, loader, num_classes, device,
                           lambda logits, batch, i: reference_image_metrics(logits[i], batch["label"][i], num_classes))

    rows = rows_here() if gather is None else gather(rows_here)
    if not rows:
        raise ValueError("No images were evaluated (the loader was empty).")
    return dict(rows=rows, mean={k: float(np.mean([r[k] for r in rows])) for k in ("dice", "hd95")})


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


class EvalError(RuntimeError):
    """A user-facing problem with the CLI's inputs (message names the flag or file)."""


MODEL_FLAGS = dict(model_cfg="--model_cfg", checkpoint="--sam_ckpt", weights="--checkpoint", module="--module")
# what to pass instead, by what a --checkpoint file holds (sam_lora_image_encoder_prompt.ModelFileError.holds)
CHECKPOINT_HINTS = {
    "sam2_weights": " (pass it as --sam_ckpt, and the trained model as --checkpoint)",
    "other_model": "; pass the --model_cfg, --rank, --num_classes and --lora_width it was trained with",
}


def load_model_for_eval(checkpoint: Union[str, os.PathLike], model_cfg: str, sam_ckpt: Optional[str], img_size: int,
                        num_classes: int, rank: int, device: torch.device, decoder: int = 1,
                        module: str = "sam_lora_image_encoder_prompt", lora_width: str = "input"
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The trained model of ``checkpoint`` (a ``best_model_dice*.pth`` full state_dict, read and checked before the
    model is built; ``build_model``, the one loader) as ``predict_fn`` for ``validate``: decoder ``decoder``, no
    prompt, float32. Every problem with the inputs is an ``EvalError`` naming the flag."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise EvalError(f"--checkpoint {str(checkpoint)!r} does not exist.")
    if sam_ckpt is not None and not Path(sam_ckpt).is_file():
        raise EvalError(f"--sam_ckpt {sam_ckpt!r} does not exist; place the official SAM2.1 checkpoint there.")
    try:  # the full state_dict holds every weight: the SAM2 checkpoint is only read when given
        net = build_model(model_cfg, sam_ckpt, img_size, rank=rank, num_classes=num_classes, module=module,
                          device=device, weights=checkpoint, lora_width=lora_width).eval()
    except ModelInputError as err:
        if err.holds == "other_model":
            raise EvalError(f"--checkpoint does not fit --model_cfg {model_cfg} --rank {rank} --num_classes "
                            f"{num_classes} --lora_width {lora_width}: {err}{CHECKPOINT_HINTS[err.holds]}") from None
        given = dict(model_cfg=model_cfg, checkpoint=sam_ckpt, weights=checkpoint, module=module)
        raise EvalError(err.after_flag(MODEL_FLAGS[err.source], given.get(err.source))
                        + CHECKPOINT_HINTS.get(err.holds, "")) from None
    return torch.no_grad()(lambda images: net.predict_logits(images, decoder))


def score_prediction_dir(
    pred_dir: Union[str, os.PathLike], image_dir: Path, mask_dir: Path, spacing: Spacing = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict:
    """Score PNG predictions (``<name>_segmentation.png`` or ``<name>.png``, read as masks are) against a split.

    A split whose ground truths are all empty is refused (``datasets_skin.NoLesionError``) before any scoring."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise EvalError(f"--pred_dir {str(pred_dir)!r} is not a folder.")
    samples = discover_samples(image_dir, mask_dir, check_files=False, max_image_pixels=max_image_pixels)
    require_a_lesion((decode_mask(s.mask_path, None) for s in samples), repr(str(mask_dir)))
    missing, rows = [], []
    for sample in samples:
        candidates = [pred_dir / f"{sample.name}_segmentation.png", pred_dir / f"{sample.name}.png"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            missing.append(sample.name)
            continue
        gt = decode_mask(sample.mask_path, None)
        try:
            pred = decode_mask(found, None)
        except DatasetError as err:
            raise EvalError(f"--pred_dir {str(pred_dir)!r}: {err}") from None
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
    parser.add_argument("--img_size", type=int, default=512, help=f"model input size, a multiple of {SIZE_MULTIPLE}")
    parser.add_argument("--num_classes", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank the checkpoint was trained with")
    parser.add_argument("--lora_width", default="input", choices=("input", "output"),
                        help="the LoRA width the checkpoint was trained with (trainer.py --lora_width)")
    parser.add_argument("--module", default="sam_lora_image_encoder_prompt",
                        help="Python module defining the LoRA_Sam the checkpoint was trained with")
    parser.add_argument("--decoder", type=int, default=1, choices=(1, 2), help="which decoder's masks to score")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--gpu", default="0")
    parser.add_argument("--spacing", type=float, default=None, help="pixel size (e.g. mm) for hd95; default pixels")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="largest image (width x height) read; larger headers are refused as possible "
                        "decompression bombs (default: where PIL refuses, %(default)s)")
    parser.add_argument("--output_csv", default=None, help="per-image CSV (default: metrics_<split>.csv beside the "
                        "checkpoint, or inside the prediction folder)")
    return parser


def flag_problem(args: argparse.Namespace) -> Optional[str]:
    """The first flag value that cannot work, as a line naming the flag; None when all can."""
    problem = next((f"--{flag} must be positive, got {getattr(args, flag)}" for flag in
                    ("img_size", "num_classes", "batch_size", "rank", "max_image_pixels") if getattr(args, flag) <= 0),
                   None)
    if problem is None and args.img_size % SIZE_MULTIPLE:
        problem = f"--img_size must be a multiple of {SIZE_MULTIPLE} (e.g. 512), got {args.img_size}"
    if args.num_workers < 0:
        problem = f"--num_workers must be 0 (load in this process) or more, got {args.num_workers}"
    if args.num_classes > 1:
        problem = f"--num_classes {args.num_classes}: {BINARY_MASKS}"
    if args.spacing is not None and not 0 < args.spacing < float("inf"):
        problem = f"--spacing must be a positive, finite pixel size (e.g. 0.1 for mm), got {args.spacing}"
    return problem


def output_path(args: argparse.Namespace) -> Path:
    """--output_csv, or metrics_<split>.csv beside the checkpoint / inside the prediction folder (so that two
    prediction folders side by side keep one CSV each)."""
    if args.output_csv:
        return Path(args.output_csv)
    folder = Path(args.pred_dir) if args.pred_dir is not None else Path(args.checkpoint).resolve().parent
    return folder / f"metrics_{args.split}.csv"


def inputs_by_flag(args: argparse.Namespace, image_dir: Path, mask_dir: Path) -> Dict[str, Iterable[Path]]:
    """The files an evaluation reads, by the flag that gives them (lazily listed): the model's files, every file of
    the split's folders, the prediction PNGs."""
    files = {f"--{flag}": [Path(getattr(args, flag))] for flag in ("checkpoint", "sam_ckpt", "model_cfg")
             if getattr(args, flag) is not None}
    files["--data_root"] = (p for folder in (image_dir, mask_dir) for p in folder.iterdir())
    files["--pred_dir"] = Path(args.pred_dir).glob("*.png") if args.pred_dir is not None else []
    return files


def check_output(args: argparse.Namespace, output_csv: Path, image_dir: Path, mask_dir: Path) -> None:
    """Refuse an output CSV that cannot be written, or that is one of the inputs, before anything is computed."""
    if args.pred_dir is not None and not Path(args.pred_dir).is_dir():
        raise EvalError(f"--pred_dir {args.pred_dir!r} is not a folder.")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise EvalError(f"--checkpoint {args.checkpoint!r} does not exist.")
    for flag, inputs in inputs_by_flag(args, image_dir, mask_dir).items():
        replaced = replaced_input(output_csv, inputs)
        if replaced is not None:
            raise EvalError(f"--output_csv {output_csv} is {replaced}, an input ({flag}): writing the metrics there "
                            "would replace it; choose another --output_csv (nothing was evaluated)")
    try:
        probe_writable(output_csv)
    except OSError as err:
        raise EvalError(f"--output_csv {output_csv}: cannot write there ({err.strerror or err}); choose another "
                        "--output_csv (nothing was evaluated)") from None


def evaluate(args: argparse.Namespace, image_dir: Path, mask_dir: Path) -> dict:
    """The CLI's evaluation: PNG predictions (--pred_dir) or a checkpoint run on the split."""
    if args.pred_dir is not None:
        return score_prediction_dir(args.pred_dir, image_dir, mask_dir, args.spacing, args.max_image_pixels)
    try:
        device = select_device(args.gpu)
    except DeviceError as err:
        raise EvalError(f"--gpu {args.gpu}: {err}") from None
    dataset = ValSkinDataset(image_dir, mask_dir, args.img_size, max_image_pixels=args.max_image_pixels)
    dataset.require_a_lesion()
    predict_fn = load_model_for_eval(
        args.checkpoint, args.model_cfg, args.sam_ckpt, args.img_size, args.num_classes, args.rank,
        device, args.decoder, args.module, args.lora_width,
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=collate_val)
    return validate(predict_fn, loader, args.num_classes, device, args.spacing)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = flag_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    output_csv = output_path(args)
    try:
        image_dir, mask_dir = find_split(args.data_root, args.split)
        check_output(args, output_csv, image_dir, mask_dir)
        result = evaluate(args, image_dir, mask_dir)
    except ImageTooLargeError as err:
        how = f"pass --max_image_pixels {err.pixels or 2 * err.limit} (or more)"
        print(f"error: --data_root {args.data_root}: {err.describe(how)}", file=sys.stderr)
        return 2
    except DatasetError as err:
        print(f"error: --data_root {args.data_root}: {err}", file=sys.stderr)
        return 2
    except EvalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result))
    try:
        write_csv(result["rows"], output_csv)
    except OSError as err:
        print(f"error: --output_csv {output_csv}: cannot write there ({err.strerror or err}); the means above are "
              "all that was kept", file=sys.stderr)
        return 2
    print(f"per-image metrics written to {output_csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
