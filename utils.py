"""Losses and small shared helpers: Dice/CE segmentation loss, seeding, device choice, autocast, crash points."""
from __future__ import annotations

import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = 255  # target pixels with this label take no part in either loss term


class DiceLoss_Mask(nn.Module):
    """Soft Dice loss over ``n_classes`` softmax channels (background included), ignoring pixels labelled 255.

    The reference implementation's Dice: per channel c, over the valid pixels m of the whole batch,
    ``1 - (2 sum(p_c t_c m) + eps) / (sum(p_c m) + sum(t_c m) + eps)`` (sum of p, not of p^2), then the
    mean over the channels. With class weights w the weighted per-channel losses are summed and divided by
    the channel count (as the reference does), not by sum(w). ``n_classes`` is the channel count, i.e.
    ``num_classes + 1`` for ``num_classes`` foreground classes.
    """

    def __init__(self, n_classes: int, smooth: float = 1e-5) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"DiceLoss_Mask needs at least 2 channels (background + 1 class), got {n_classes}.")
        self.n_classes = n_classes
        self.smooth = smooth

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: Optional[torch.Tensor] = None,
        softmax: bool = True,
    ) -> torch.Tensor:
        """logits: B x C x H x W (probabilities when ``softmax=False``); target: B x H x W long in [0, C) or 255."""
        if logits.shape[1] != self.n_classes:
            raise ValueError(f"Expected {self.n_classes} channels, got logits of shape {tuple(logits.shape)}.")
        if logits.shape[-2:] != target.shape[-2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in H x W.")
        intersection, denominator = dice_sums(logits.softmax(dim=1) if softmax else logits, target, self.n_classes)
        per_class = 1.0 - (2.0 * intersection + self.smooth) / (denominator + self.smooth)  # C
        if weight is None:
            return per_class.mean()
        weight = torch.as_tensor(weight, dtype=per_class.dtype, device=per_class.device)
        if weight.shape != per_class.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}; pass one weight per channel ({self.n_classes}).")
        return (per_class * weight).sum() / self.n_classes


def dice_sums(probs: torch.Tensor, target: torch.Tensor, n_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Dice's sums over the batch and the valid pixels m (target != 255), per channel c: sum(p_c t_c m) and
    sum(p_c m) + sum(t_c m). probs: B x C x H x W; target: B x H x W long in [0, C) or 255."""
    valid = (target != IGNORE_INDEX).unsqueeze(1).to(probs.dtype)  # B x 1 x H x W
    one_hot = F.one_hot(target.masked_fill(target == IGNORE_INDEX, 0).long(), n_classes)
    one_hot = one_hot.permute(0, 3, 1, 2).to(probs.dtype) * valid  # B x C x H x W
    probs = probs * valid
    dims = (0, 2, 3)
    return (probs * one_hot).sum(dims), probs.sum(dims) + one_hot.sum(dims)


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.8
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 - w) * CE + w * Dice`` for one decoder's output; returns ``(total, ce, dice)``.

    logits: B x (C+1) x H x W; target: B x H x W long in [0, C] (255 = ignore).
    """
    target = target.long()
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
    dice = DiceLoss_Mask(logits.shape[1])(logits, target)
    total = (1.0 - dice_weight) * ce + dice_weight * dice
    return total, ce, dice


def segmentation_sums(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What one decoder's loss adds up over a part of a batch: the 2C + 2 vector (Dice's sum(p t) per channel,
    its sum(p) + sum(t) per channel, the cross-entropy summed over the valid pixels, their count), so that the parts
    of a batch split across processes add up to the whole batch's (``loss_from_sums``).
    logits: B x C x H x W; target: B x H x W long in [0, C) or 255 (pixels that count for nothing)."""
    target = target.long()
    intersection, denominator = dice_sums(logits.softmax(dim=1), target, logits.shape[1])
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (target != IGNORE_INDEX).sum().to(ce.dtype)
    return torch.cat([intersection, denominator, ce[None], count[None]])


def loss_from_sums(sums: torch.Tensor, dice_weight: float, smooth: float = 1e-5
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``segmentation_loss`` from a batch's ``segmentation_sums``: ``(total, ce, dice)``, CE the mean over every
    valid pixel, Dice ``DiceLoss_Mask``'s mean over channels of 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)."""
    channels = (sums.shape[0] - 2) // 2
    intersection, denominator, ce_sum, count = sums[:channels], sums[channels:-2], sums[-2], sums[-1]
    dice = (1.0 - (2.0 * intersection + smooth) / (denominator + smooth)).mean()
    ce = ce_sum / count
    return (1.0 - dice_weight) * ce + dice_weight * dice, ce, dice


def dual_decoder_loss(outputs: Dict[str, torch.Tensor], labels: torch.Tensor, dice_weight: float,
                      sum_over_parts: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                      ) -> Dict[str, torch.Tensor]:
    """Mean of both decoders' (1-w)*CE + w*Dice (logits B x (C+1) x S/4 x S/4 upsampled to the
    B x S x S labels), under "loss", plus every part for logging.

    ``sum_over_parts``: the batch is one part of a batch split across processes (``distributed.Ranks.sum_with_grad``
    adds the parts' sums, differentiably): the loss is then that of the whole batch, from the sums of every part
    (``segmentation_sums``), never a mean of the parts' losses (Dice sums over the batch, CE is a mean over its
    valid pixels)."""
    parts: Dict[str, torch.Tensor] = {}
    logits = {d: F.interpolate(outputs[f"low_res_logits{d}"].float(), size=labels.shape[-2:], mode="bilinear",
                               align_corners=False) for d in (1, 2)}
    if sum_over_parts is not None:
        sums = sum_over_parts(torch.stack([segmentation_sums(logits[d], labels) for d in (1, 2)]))
    for d in (1, 2):
        parts[f"loss_dec{d}"], parts[f"ce_dec{d}"], parts[f"dice_dec{d}"] = segmentation_loss(
            logits[d], labels, dice_weight=dice_weight) if sum_over_parts is None else \
            loss_from_sums(sums[d - 1], dice_weight)
    parts["loss"] = 0.5 * (parts["loss_dec1"] + parts["loss_dec2"])
    return parts


def nonfinite_names(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """Names of the floating-point tensors that hold NaN or inf (one device sync for all of them)."""
    floats = {name: t for name, t in tensors.items() if torch.is_floating_point(t)}
    if not floats:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in floats.values()]).tolist()
    return [name for name, ok in zip(floats, finite) if not ok]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices). ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


class DeviceError(ValueError):
    """A device name that is not understood or not present; the message lists what is."""


_warned_no_cuda = False


def select_device(gpu: Optional[str] = "0") -> torch.device:
    """Map a GPU name ("0", "cuda:1", "cuda", "cpu", "0,1" -> first id) to a device.

    Without CUDA the answer is CPU, with one warning per process. A missing GPU index is an error that lists
    the devices present.
    """
    global _warned_no_cuda
    text = "cpu" if gpu is None else str(gpu).strip().lower()
    if text in ("", "cpu"):
        return torch.device("cpu")
    if text.startswith("cuda"):
        text = text[len("cuda"):].lstrip(":") or "0"
    first = text.split(",")[0].strip()
    if not first.isdigit():
        raise DeviceError(f"{gpu!r} is not understood; use a GPU index such as 0, 'cuda:0' or 'cpu'.")
    index = int(first)
    if not torch.cuda.is_available():
        if not _warned_no_cuda:
            warnings.warn(f"CUDA is not available; running on the CPU instead of GPU {index} (this is slow).")
            _warned_no_cuda = True
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if index >= count:
        present = ", ".join(f"{i}: {torch.cuda.get_device_name(i)}" for i in range(count))
        raise DeviceError(f"there is no GPU {index}; devices present: {present}.")
    return torch.device("cuda", index)


def amp_dtype(device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype on CUDA (bf16 where supported, else fp16 with loss scaling); None on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def scoring_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype of pool scoring on CUDA for the trainer's ``precision``: float16 with "float32" (the
    reference scores under ``torch.cuda.amp.autocast``, i.e. float16, while it trains in float32), ``amp_dtype``
    with "mixed" (how runs made before this setting scored); None (no autocast) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.float16 if precision == "float32" else amp_dtype(device)


def autocast(device: torch.device, enabled: bool = True, dtype: Optional[torch.dtype] = None) -> torch.autocast:
    """Mixed precision on CUDA when ``enabled``: ``dtype``, or ``amp_dtype`` when None; otherwise, and off CUDA,
    plain float32."""
    dtype = (dtype or amp_dtype(device)) if enabled and device.type == "cuda" else None
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on ``device`` (CUDA; a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> Optional[float]:
    """Most memory held by tensors on ``device`` since the last ``reset_peak_memory``, in GiB
    (``torch.cuda.max_memory_allocated``); None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


CRASH_ENV = "MDSAM_CRASH_AT"
PAUSE_ENV = "MDSAM_PAUSE_AT"


def crash_point(point: str, epoch: int) -> None:
    """Test hook: end the process at once (``os._exit(3)``, as a kill would) when the environment variable
    ``MDSAM_CRASH_AT`` is ``<point>:<epoch>``; or pause there while ``MDSAM_PAUSE_AT`` is ``<point>:<epoch>:<file>``:
    write ``<file>.paused`` (holding the pid), then wait until ``<file>`` exists. Makes the crash/resume and
    two-process tests deterministic instead of timed.

    Points: ``selected``, ``train_batch`` (after the first optimiser step), ``checkpoint_write`` (last_state.pth
    written to its temporary file, not yet renamed), ``epoch_end`` (trainer.py, per epoch) and ``synthetic_data``
    (synthetic_isic.py; there the number is how many image/mask pairs have been written). ``<point>:<epoch>@<rank>``
    ends only that rank of a run on several processes (torchrun's RANK), with SIGKILL."""
    crash, _, rank = os.environ.get(CRASH_ENV, "").partition("@")
    if crash == f"{point}:{epoch}" and rank in ("", os.environ.get("RANK", "0")):
        if rank:
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)
    pause = os.environ.get(PAUSE_ENV, "").split(":", 2)
    if pause[:2] == [point, str(epoch)] and len(pause) == 3:
        go = Path(pause[2])
        Path(f"{go}.paused.tmp").write_text(f"{os.getpid()}\n")
        os.replace(f"{go}.paused.tmp", f"{go}.paused")
        while not go.exists():
            time.sleep(0.02)
