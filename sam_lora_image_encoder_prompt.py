"""LoRA-adapted SAM2 with two mask decoders, and the prompts MD-SAM-AL derives from masks.

`LoRA_Sam` wraps a `SAM2Base`: it adds rank-r LoRA updates to the q and v projections of
every Hiera block (base weights frozen), keeps the prompt encoder and both mask decoders
trainable, and turns decoder outputs into class logits with SAM2's meaning kept
(channel 0 is a constant-zero background logit, channel c is mask token c-1), so that
softmax foreground probability == sigmoid(SAM2 mask logit) and the untrained model is
exactly zero-shot SAM2 (single-mask output with SAM2's stability fallback off: class c is
always token c-1, the only heads the loss trains).

``prompts_from_logits`` turns a batch of predicted masks into prompts with prompt_geometry's rules (largest
component, EDT centre point, random point, box), the one implementation of DESIGN decision 3; both the training
forward and the active-learning strategies use it.

`LoRA_Sam` also reads the reference implementation's checkpoints (its full state_dict through
`load_state_dict`, its LoRA-only file through `load_lora_parameters`), reproducing its LoRA exactly.
"""

import inspect
import logging
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from prompt_geometry import (box_from_mask, center_point_from_mask, largest_component, mask_box_to_input,
                             mask_point_to_input, random_point_from_mask)
from safe_io import CheckpointFileError, atomic_torch_save, first_names, load_torch_file, unloadable_file_message
from sam2.build_sam import (VIDEO_ONLY_STATE_GROUPS, CheckpointError, CheckpointReadError, ConfigError, build_sam2,
                            state_mismatch)
from utils import nonfinite_names

logger = logging.getLogger(__name__)

PROMPT_MODES = ("none", "point", "box", "point-box")
NO_MEM_EMBED_KEY = "sam.no_mem_embed"
# Official SAM2 point labels: 1 positive click, 0 negative click, 2 / 3 box top-left / bottom-right corner.
POSITIVE_LABEL, NEGATIVE_LABEL = 1, 0
BOX_CORNER_LABELS = (2, 3)
LORA_FILE_PREFIXES = ("sam.sam_prompt_encoder.", "sam.sam_mask_decoder.", "sam.sam_mask_decoder2.")
# "input": q/v updates as wide as the block's input, as the reference code; "output": as wide as q/v
LORA_WIDTHS = ("input", "output")

def prompt_mode_of(text: str) -> str:
    """A prompt mode by name, or in the reference trainer's integer form (its ``--promptmode`` is an int, default 0):
    0 is "none". Its training passes ``prompt_idx=-1`` whatever the integer, so there the integer has no effect, and
    what another one would do is in its unpublished sam2: those are refused (ValueError), as is any other text."""
    if text in PROMPT_MODES:
        return text
    if text.strip().lstrip("+-").isdigit():
        if int(text) == 0:
            return "none"
        raise ValueError(f"{text}: of the reference code's integer prompt modes only 0 (= none) is accepted (its "
                         "training passes no prompt whatever the integer, and what another would do is not "
                         f"published); use one of {', '.join(PROMPT_MODES)}")
    raise ValueError(f"invalid choice: {text!r} (choose from {', '.join(PROMPT_MODES)}, or 0 = none)")


# --------------------------------------------------------------------------------------
# Prompts derived from predicted masks (the geometry is prompt_geometry's)
# --------------------------------------------------------------------------------------


def foreground_mask(logits: torch.Tensor) -> torch.Tensor:
    """B x (C+1) x h x w class logits -> B x h x w bool: some foreground class beats background."""
    return logits.argmax(dim=1) != 0


SCORE_CHANNELS = ("foreground", "all")


def class_probabilities(logits: torch.Tensor, channels: str = "foreground") -> torch.Tensor:
    """B x (C+1) x h x w class logits -> float32 probability maps.

    channels "foreground": B x C x h x w softmax probabilities of the foreground classes (with the constant-zero
    background channel and C = 1 this is sigmoid(SAM2 mask logit)). "all": B x (C+1) x h x w sigmoid of every
    channel, background included (the reference's scoring; the zero background logit gives a constant 0.5).
    """
    if channels == "foreground":
        return torch.softmax(logits.float(), dim=1)[:, 1:]
    if channels == "all":
        return torch.sigmoid(logits.float())
    raise ValueError(f"channels must be one of {SCORE_CHANNELS}, got {channels!r}")


@dataclass
class MaskPrompts:
    """Prompts derived from a batch of predicted masks, in S x S input pixel coordinates.

    center_points: B x 1 x 2, random_points: B x 1 x 2, boxes: B x 4 (x0, y0, x1, y1).
    """

    center_points: torch.Tensor
    random_points: torch.Tensor
    boxes: torch.Tensor

    def as_decoder_prompts(self, mode: str, which: str) -> Dict[str, torch.Tensor]:
        """Keyword arguments for `LoRA_Sam.decode` for prompt mode `mode`.

        which = "center" or "random" picks the point; "box" uses the box alone and
        "point-box" the box plus that point.
        """
        if which not in ("center", "random"):
            raise ValueError(f"which must be 'center' or 'random', got {which!r}")
        points = self.center_points if which == "center" else self.random_points
        if mode == "point":
            return {"points": points}
        if mode == "box":
            return {"boxes": self.boxes}
        if mode == "point-box":
            return {"points": points, "boxes": self.boxes}
        raise ValueError(f"prompt mode {mode!r} carries no prompt; expected one of {PROMPT_MODES[1:]}")


def prompts_from_logits(
    logits: torch.Tensor, image_size: int, generators: Sequence[np.random.Generator]
) -> MaskPrompts:
    """Centre point, random point and box of each image's largest foreground component.

    logits: B x (C+1) x h x w class logits; generators: one per image (the same generator
    may be repeated; it is then drawn from in batch order).
    """
    if len(generators) != logits.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {logits.shape[0]} images")
    masks = foreground_mask(logits.detach()).cpu().numpy()
    shape = masks.shape[1:]
    centers, randoms, boxes = [], [], []
    for mask, generator in zip(masks, generators):
        component = largest_component(mask)
        centers.append(mask_point_to_input(center_point_from_mask(component), shape, image_size))
        randoms.append(mask_point_to_input(random_point_from_mask(component, generator), shape, image_size))
        boxes.append(mask_box_to_input(box_from_mask(component), shape, image_size))

    def to_tensor(values: List) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=logits.device)

    return MaskPrompts(
        center_points=to_tensor(centers)[:, None, :],
        random_points=to_tensor(randoms)[:, None, :],
        boxes=to_tensor(boxes),
    )


# --------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------


class LoRAQKV(nn.Module):
    """A frozen q/k/v projection plus trainable rank-r updates of its q and v parts.

    qkv(x) = W x + b, W: 3*d_out x d_in stacking q, k and v (d_out = 2 d_in in the first block of
    each Hiera stage after the first, else d_out = d_in). The updates are w outputs wide: B_q A_q x is
    added to the first w outputs (the start of q) and B_v A_v x to the last w outputs (the end of v).
      width "input": w = d_in, the reference code's layout: at a stage change the q update covers the
        first half of q and the v update the second half of v.
      width "output": w = d_out: the updates cover all of q and all of v.
    B starts at zero, so the wrapped projection initially computes exactly the original one.
    """

    def __init__(self, qkv: nn.Linear, r: int, width: str = "input"):
        super().__init__()
        if qkv.out_features % 3 != 0:
            raise ValueError(f"qkv projection has {qkv.out_features} outputs, not a multiple of 3")
        if width not in LORA_WIDTHS:
            raise ValueError(f"LoRA width must be one of {LORA_WIDTHS}, got {width!r}")
        span = qkv.in_features if width == "input" else qkv.out_features // 3
        if span > qkv.out_features // 3:
            raise ValueError(f"width 'input' needs in_features <= out_features / 3, got {qkv.in_features} -> "
                             f"{qkv.out_features}")
        self.width = width
        self.base = qkv
        self.base.requires_grad_(False)
        self.lora_a_q = nn.Linear(qkv.in_features, r, bias=False)
        self.lora_b_q = nn.Linear(r, span, bias=False)
        self.lora_a_v = nn.Linear(qkv.in_features, r, bias=False)
        self.lora_b_v = nn.Linear(r, span, bias=False)
        self.enabled = True  # False: the frozen projection alone (LoRA_Sam.lora_disabled)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for down in (self.lora_a_q, self.lora_a_v):
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        for up in (self.lora_b_q, self.lora_b_v):
            nn.init.zeros_(up.weight)

    def merged_weight(self) -> torch.Tensor:
        """3*d_out x d_in: the base weight with both low-rank updates folded in."""
        delta_q = self.lora_b_q.weight @ self.lora_a_q.weight
        delta_v = self.lora_b_v.weight @ self.lora_a_v.weight
        between = delta_q.new_zeros(self.base.out_features - 2 * self.lora_b_q.out_features, delta_q.shape[1])
        return self.base.weight + torch.cat([delta_q, between, delta_v], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ... x d_in -> ... x 3*d_out."""
        if not self.enabled:
            return self.base(x)
        if not (torch.is_grad_enabled() and self.lora_a_q.weight.requires_grad):
            # Inference: one matmul with the merged weight costs what the frozen layer costs;
            # the token-sized low-rank products below would add ~10% to the encoder.
            return F.linear(x, self.merged_weight(), self.base.bias)
        # Training: low-rank path, so gradients cost O(tokens * r), not a full weight gradient.
        # Linear's backward does not need its output, so updating it in place is safe.
        qkv = self.base(x)
        span = self.lora_b_q.out_features
        qkv[..., :span] += self.lora_b_q(self.lora_a_q(x))
        qkv[..., qkv.shape[-1] - span :] += self.lora_b_v(self.lora_a_v(x))
        return qkv

    def up_from_reference(self, up: torch.Tensor, part: str) -> torch.Tensor:
        """The reference code's B of the q or v update (d_in x r, added to the first / last d_in qkv outputs)
        -> this module's lora_b_{part} weight that adds the same: itself at width "input"; at width "output"
        placed in the first (q) or last (v) d_in rows, zeros elsewhere."""
        if self.width == "input":
            return up
        own = up.new_zeros(self.lora_b_q.out_features, up.shape[1])
        rows = slice(0, up.shape[0]) if part == "q" else slice(own.shape[0] - up.shape[0], own.shape[0])
        own[rows] = up
        return own


# --------------------------------------------------------------------------------------
# the reference code's checkpoints (Aileen0402/MD-SAM-AL, sam_lora_image_encoder_prompt.py)
# --------------------------------------------------------------------------------------

# Its full state_dict keeps each adapted block's frozen projection and updates inside attn.qkv:
# sam.image_encoder.trunk.blocks.<i>.attn.qkv.qkv.{weight,bias} and ...attn.qkv.linear_{a,b}_{q,v}.weight.
REFERENCE_QKV_KEY = re.compile(r"\.attn\.qkv\.(qkv\.(weight|bias)|linear_[ab]_[qv]\.weight)$")
# Its LoRA-only file (save_lora_parameters): w_a_<i> / w_b_<i> (at least 3 digits) for update i = the q (even i)
# and v (odd i) update of the adapted blocks in order, plus every SAM2 state_dict entry (no "sam." prefix) whose
# name contains one of REFERENCE_LORA_FILE_WORDS.
REFERENCE_LORA_KEY = re.compile(r"^w_[ab]_\d{3,}$")
REFERENCE_LORA_FILE_WORDS = ("prompt_encoder", "mask_decoder", "no_mem", "memory", "obj")
# The reference's dual-decoder SAM2 (sam2/modeling/sam2_base_1.py) is not published; we assume it names the
# second decoder as ours does.
ASSUMED_DECODER2 = "sam_mask_decoder2"


class LoRACheckpointError(RuntimeError, ValueError):
    """A checkpoint whose entries do not fit this LoRA_Sam: keys that fit nothing, missing keys, shapes."""


@dataclass(frozen=True)
class _Target:
    """Where one entry of a reference checkpoint goes: our key, the shape the file must have, and how its
    tensor becomes ours (None: as it is)."""

    key: str
    shape: Tuple[int, ...]
    convert: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


def _reference_lora_targets(module: "LoRAQKV", own_prefix: str, names: Dict[str, str]) -> Dict[str, _Target]:
    """The reference names of one block's four update matrices -> targets in `module` (at `own_prefix`).

    names: {"a_q": reference key, "b_q": ..., "a_v": ..., "b_v": ...}. The reference's A is r x d_in like ours;
    its B is d_in x r, placed by `LoRAQKV.up_from_reference`.
    """
    rank, dim = module.lora_a_q.weight.shape
    targets = {}
    for part, name in names.items():
        down, which = part.split("_")
        own = f"{own_prefix}lora_{part}.weight"
        if down == "a":
            targets[name] = _Target(own, (rank, dim))
        else:
            targets[name] = _Target(own, (dim, rank), lambda up, which=which: module.up_from_reference(up, which))
    return targets


def _without_video_groups(tensors: Dict[str, torch.Tensor], sam_prefix: str) -> Dict[str, torch.Tensor]:
    """Drop the video-only groups of upstream SAM2 (memory attention/encoder, object pointers, ...; our
    image-only SAM2 has none), with one log line."""

    def group(key: str) -> str:
        return key[len(sam_prefix):].split(".")[0] if key.startswith(sam_prefix) else ""

    video = sorted({group(k) for k in tensors if group(k) in VIDEO_ONLY_STATE_GROUPS})
    if video:
        count = sum(group(k) in VIDEO_ONLY_STATE_GROUPS for k in tensors)
        logger.info("reference checkpoint: skipping %d video-only tensors (%s)", count, ", ".join(video))
    return {k: v for k, v in tensors.items() if group(k) not in VIDEO_ONLY_STATE_GROUPS}


def _reference_misfits(tensors: Dict[str, torch.Tensor], targets: Dict[str, _Target]) -> List[str]:
    """What keeps `tensors` (reference names) from filling `targets`: one line per kind of problem."""
    unknown = sorted(k for k in tensors if k not in targets)
    missing = sorted(k for k in targets if k not in tensors)
    shapes = [f"{k}: file {tuple(v.shape)}, this model needs {targets[k].shape}"
              for k, v in sorted(tensors.items()) if k in targets and tuple(v.shape) != targets[k].shape]
    problems = []
    if unknown:
        problems.append(f"keys that fit nothing in this model ({len(unknown)}): {', '.join(unknown)}")
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if shapes:
        problems.append(f"shape mismatches: {'; '.join(shapes)}")
    return problems


def _read_reference(tensors: Dict[str, torch.Tensor], targets: Dict[str, _Target], source: str,
                    sam_prefix: str, strict: bool = True) -> Dict[str, torch.Tensor]:
    """A reference checkpoint's tensors -> ours, keyed by our names; all-or-nothing.

    Video-only groups are skipped (one log line); everything else that does not fit is one
    `LoRACheckpointError` (with strict=False only shape mismatches are; keys that fit nothing are then
    returned under their own names, for load_state_dict to report).
    """
    tensors = _without_video_groups(tensors, sam_prefix)
    problems = _reference_misfits(tensors, targets)
    if problems and (strict or any(line.startswith("shape") for line in problems)):
        raise LoRACheckpointError(
            f"{source} does not fit this LoRA_Sam: " + "; ".join(problems) + f". (Decoder 2 is read from "
            f"{sam_prefix}{ASSUMED_DECODER2}.*: the name the reference's unpublished dual-decoder SAM2 is assumed "
            "to give it. The LoRA updates are read block by block, q then v: model size, LoRA rank and lora_layer "
            "must be those the file was made with.)"
        )
    converted = {}
    for key, value in tensors.items():
        target = targets.get(key)
        if target is None:
            converted[key] = value
        else:
            converted[target.key] = value if target.convert is None else target.convert(value)
    return converted


# --------------------------------------------------------------------------------------
# LoRA_Sam
# --------------------------------------------------------------------------------------


class LoRA_Sam(nn.Module):
    """SAM2 with LoRA on its Hiera image encoder and two trainable mask decoders.

    Arguments:
      sam_model: a `SAM2Base` from `sam2.build_sam.build_sam2`; kept as `self.sam`, so
        `state_dict()` keys are `sam.<official SAM2 key>` plus the LoRA matrices
        `sam.image_encoder.trunk.blocks.<i>.attn.qkv.{lora_a_q,lora_b_q,lora_a_v,lora_b_v}.weight`
        (the frozen projection moves to `...attn.qkv.base.{weight,bias}`).
      r: LoRA rank.
      lora_layer: indices of the Hiera blocks to adapt (None: all blocks).
      lora_width: "input" (the reference code's): the q and v updates are as wide as the block's
        input, added to the first d_in outputs of q and the last d_in outputs of v; "output": as wide
        as q and v (twice as wide in the first block of a Hiera stage). See `LoRAQKV`. The B matrices'
        shapes differ accordingly; the key names do not.
      num_classes: foreground classes, 1..4 (SAM2 has four mask tokens). Outputs have
        num_classes + 1 channels: channel 0 is a constant-zero background logit, channel
        c is the raw output of mask token c-1, in train and eval mode alike. SAM2's eval-time
        single-mask fallback ("dynamic multimask via stability": an unstable token 0 is
        replaced by the best of tokens 1-3) is not used, since the loss never trains those
        tokens or the IoU head; the untrained model therefore reproduces SAM2's single-mask
        logits with that fallback off. (`SAM2ImagePredictor` keeps the official fallback.)

    The working image size is taken from each call (the images in `encode`, the features in
    `decode`, `image_size` in `forward`), not from the size `sam_model` was built with: no
    parameter depends on it, so a model built at 1024 and run at 512 predicts what a model
    built with image_size=512 predicts.

      train_no_mem_embed: whether SAM2's `no_mem_embed` (added to the image embedding) is trained, as in the
        reference code, which freezes only the image encoder; False keeps the checkpoint's value.

    Trainable: LoRA matrices, the prompt encoder, both mask decoders and (by default) `no_mem_embed`.
    Everything else in `sam_model` (image encoder weights, memory modules) is frozen.

    `load_state_dict` also reads the reference code's full state_dict (its `best_model_dice*.pth`:
    `...attn.qkv.qkv.*`, `...attn.qkv.linear_{a,b}_{q,v}.weight`), and `load_lora_parameters` its
    LoRA-only file (`w_a_000`, `w_b_000`, ...): see `_from_reference_layout` and `load_lora_parameters`.
    """

    def __init__(self, sam_model: nn.Module, r: int, lora_layer: Optional[Sequence[int]] = None, num_classes: int = 1,
                 lora_width: str = "input", train_no_mem_embed: bool = True):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if lora_width not in LORA_WIDTHS:
            raise ValueError(f"lora_width must be one of {LORA_WIDTHS}, got {lora_width!r}")
        for name in ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder", "sam_mask_decoder2"):
            if not hasattr(sam_model, name):
                raise TypeError(f"sam_model has no `{name}`: build it with sam2.build_sam.build_sam2")
        max_classes = sam_model.sam_mask_decoder.num_mask_tokens
        if not 1 <= num_classes <= max_classes:
            raise ValueError(
                f"num_classes must be between 1 and {max_classes} (one SAM2 mask token per class), got {num_classes}"
            )
        blocks = sam_model.image_encoder.trunk.blocks
        if lora_layer is None:
            lora_layer = range(len(blocks))
        lora_layer = sorted(set(int(i) for i in lora_layer))
        bad = [i for i in lora_layer if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"lora_layer {bad} out of range: the image encoder has {len(blocks)} blocks")

        sam_model.requires_grad_(False)
        for i in lora_layer:
            attn = blocks[i].attn
            if isinstance(attn.qkv, LoRAQKV):
                raise ValueError(f"block {i} already carries LoRA: wrap a freshly built SAM2 model")
            attn.qkv = LoRAQKV(attn.qkv, r, lora_width)
        for trainable in (sam_model.sam_prompt_encoder, sam_model.sam_mask_decoder, sam_model.sam_mask_decoder2):
            trainable.requires_grad_(True)
        sam_model.no_mem_embed.requires_grad_(train_no_mem_embed)

        self.sam = sam_model
        self.r = r
        self.lora_layer = lora_layer
        self.num_classes = num_classes
        self.lora_width = lora_width

    # ---- parameters ------------------------------------------------------------------

    def lora_modules(self) -> List[LoRAQKV]:
        return [m for m in self.sam.image_encoder.modules() if isinstance(m, LoRAQKV)]

    @contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """Within the block the image encoder is the pretrained one (no LoRA update is added): fixed features
        that training does not change."""
        modules = self.lora_modules()
        for module in modules:
            module.enabled = False
        try:
            yield
        finally:
            for module in modules:
                module.enabled = True

    def _is_lora_file_key(self, key: str) -> bool:
        """What our LoRA file holds: LoRA, prompt encoder, decoders, and no_mem_embed when it is trained."""
        trained_embed = key == NO_MEM_EMBED_KEY and self.sam.no_mem_embed.requires_grad
        return ".lora_" in key or key.startswith(LORA_FILE_PREFIXES) or trained_embed

    def save_lora_parameters(self, path: Union[str, os.PathLike]) -> None:
        """Write LoRA matrices, prompt encoder, both decoders and a trained no_mem_embed (tensors only,
        atomically)."""
        tensors = {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if self._is_lora_file_key(k)}
        atomic_torch_save(tensors, path)

    def load_lora_parameters(self, path: Union[str, os.PathLike]) -> None:
        """Load a LoRA-only file (weights_only; all keys must match, nothing is copied otherwise).

        Two formats: ours (`save_lora_parameters`), and the reference code's (`w_a_<i>`, `w_b_<i>`: update i
        is the q (even i) or v (odd i) update of the adapted blocks in order; the SAM2 entries whose names
        contain prompt_encoder, mask_decoder, no_mem, memory or obj, without the "sam." prefix; video-only
        groups are skipped with one log line). The reference's updates are reproduced exactly at either
        `lora_width`. Errors: `LoRACheckpointError` (a ValueError) naming the keys, `CheckpointFileError`.
        """
        tensors = load_torch_file(path)
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointFileError(f"{path} does not hold a {{name: tensor}} dictionary")
        if any(REFERENCE_LORA_KEY.match(k) for k in tensors):
            converted = _read_reference(tensors, self._reference_lora_file_targets(), str(path), sam_prefix="")
            self.load_state_dict(converted, strict=False)
            return
        # no_mem_embed is optional either way: a file written while it was frozen lacks it
        own = {k: v for k, v in self.state_dict().items() if self._is_lora_file_key(k) or k == NO_MEM_EMBED_KEY}
        extra = sorted(set(tensors) - set(own))
        if extra:
            hint = (
                " It looks like a full LoRA_Sam state_dict (e.g. best_model_dice*.pth): load it with "
                "net.load_state_dict(torch.load(path, weights_only=True))."
                if any(".attn.qkv.base." in k or REFERENCE_QKV_KEY.search(k) for k in extra)
                else ""
            )
            raise LoRACheckpointError(
                f"{path}: unexpected keys for a LoRA file: {extra[:5]}{'...' if len(extra) > 5 else ''}.{hint}")
        missing = sorted(set(own) - set(tensors) - {NO_MEM_EMBED_KEY})
        if missing:
            raise LoRACheckpointError(
                f"{path}: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''} "
                f"(saved with other lora_layer / model config?)"
            )
        for key, value in tensors.items():
            if value.shape != own[key].shape:
                raise LoRACheckpointError(f"{path}: shape mismatch for {key}: file {tuple(value.shape)}, "
                                          f"model {tuple(own[key].shape)}{self._lora_shape_hint(key, value.shape)}")
        self.load_state_dict(tensors, strict=False)

    def _lora_shape_hint(self, key: str, shape: Sequence[int]) -> str:
        """Why a LoRA matrix of our format has another shape: the other `lora_width`, or the rank."""
        if ".lora_" not in key:
            return ""
        saved = self._other_lora_width(key, shape)
        if saved is not None:
            return (f" (LoRA width: the file's update is {shape[0]} wide, as with lora_width={saved!r}; this model "
                    f"has lora_width={self.lora_width!r}: build it with lora_width={saved!r})")
        return f" (LoRA rank: file {_lora_rank(key, shape)}, model {self.r})"

    def _other_lora_width(self, key: str, shape: Sequence[int]) -> Optional[str]:
        """The other `lora_width` when `shape` is what it gives the B matrix `key` (our format), else None."""
        if ".lora_b_" not in key or _lora_rank(key, shape) != self.r:
            return None
        base = self.get_submodule(key.rsplit(".", 2)[0]).base
        rows = {"input": base.in_features, "output": base.out_features // 3}
        other = "output" if self.lora_width == "input" else "input"
        return other if shape[0] == rows[other] != rows[self.lora_width] else None

    def _lora_paths(self) -> List[str]:
        """state_dict prefix of each adapted block's `LoRAQKV`, in block order."""
        return [f"sam.image_encoder.trunk.blocks.{i}.attn.qkv" for i in self.lora_layer]

    def _reference_full_targets(self) -> Dict[str, _Target]:
        """Reference full state_dict key -> target: LoRA renamed (linear_* -> lora_*, qkv -> base), B placed
        by `LoRAQKV.up_from_reference`; every other SAM2 key by its own name."""
        targets = {k: _Target(k, tuple(v.shape)) for k, v in self.state_dict().items() if ".lora_" not in k}
        for path in self._lora_paths():
            for param in ("weight", "bias"):
                targets[f"{path}.qkv.{param}"] = targets.pop(f"{path}.base.{param}")
            names = {part: f"{path}.linear_{part}.weight" for part in ("a_q", "b_q", "a_v", "b_v")}
            targets.update(_reference_lora_targets(self.get_submodule(path), f"{path}.", names))
        return targets

    def _reference_lora_file_targets(self) -> Dict[str, _Target]:
        """Reference LoRA-file key -> target: update 2j / 2j+1 = the q / v update of the j-th adapted block;
        the SAM2 entries the reference saves (names containing REFERENCE_LORA_FILE_WORDS) by name."""
        targets = {k[len("sam."):]: _Target(k, tuple(v.shape)) for k, v in self.state_dict().items()
                   if ".lora_" not in k and any(word in k[len("sam."):] for word in REFERENCE_LORA_FILE_WORDS)}
        for j, path in enumerate(self._lora_paths()):
            names = {f"{ab}_{part}": f"w_{ab}_{2 * j + i:03d}" for i, part in enumerate("qv") for ab in "ab"}
            targets.update(_reference_lora_targets(self.get_submodule(path), f"{path}.", names))
        return targets

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """As `nn.Module.load_state_dict`; it also reads the reference code's full state_dict (its
        `best_model_dice*.pth`), rewritten by `_from_reference_layout`. (Not a load_state_dict pre-hook:
        torch calls those with strict=True whatever the caller asked for.)"""
        return super().load_state_dict(self._from_reference_layout(state_dict, strict), strict=strict, assign=assign)

    def _from_reference_layout(self, state_dict: Mapping[str, torch.Tensor], strict: bool
                               ) -> Mapping[str, torch.Tensor]:
        """A reference full state_dict -> ours (see `_reference_full_targets`; video-only groups skipped with
        one log line; what fits nothing is one `LoRACheckpointError`). Our own layout is returned as it is,
        except that LoRA matrices of the other `lora_width` are refused with that hint instead of a bare
        size mismatch."""
        if any(REFERENCE_QKV_KEY.search(name) for name in state_dict):
            return _read_reference(dict(state_dict), self._reference_full_targets(), "reference-layout state_dict",
                                   sam_prefix="sam.", strict=strict)
        own = self.state_dict()
        for name, value in state_dict.items():
            if name in own and self._other_lora_width(name, value.shape) is not None:
                raise LoRACheckpointError(f"{name}: checkpoint {tuple(value.shape)}, model {tuple(own[name].shape)}"
                                          f"{self._lora_shape_hint(name, value.shape)}")
        return state_dict

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing of the Hiera blocks while training (``--grad_ckpt``).

        Only in train mode with gradients enabled; eval, ``no_grad`` and ``inference_mode`` passes are unchanged.
        Each block then keeps only its input and is recomputed during backward (~1 extra encoder forward per
        step) -- the same loss and gradients for far less activation memory.
        """
        self.sam.image_encoder.trunk.grad_checkpointing = bool(enabled)

    def compile_image_encoder(self, **options) -> None:
        """``torch.compile`` the image encoder's Hiera trunk (nearly all of its cost) in place (``--compile``);
        state_dict keys stay the same. ``options`` go to ``torch.compile`` (e.g. ``mode="max-autotune"``).

        The first passes at each new batch shape, and in each of train/eval mode, are slow while it compiles.
        """
        self.sam.image_encoder.trunk.compile(**options)

    # ---- split API ---------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> Dict[str, object]:
        """B x 3 x S x S normalised images -> SAM2 features (one image-encoder pass).

        S is taken from `images` (any positive multiple of 32), not from the size the SAM2
        model was built with. Returns dict(image_embed=B x 256 x S/16 x S/16,
        backbone_fpn=[B x 256 x S/4 x S/4, B x 256 x S/8 x S/8, B x 256 x S/16 x S/16]): the raw
        FPN levels, which each decoder projects with its own conv_s0/conv_s1 in `decode`.
        """
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2] != images.shape[-1]:
            raise ValueError(f"expected B x 3 x S x S images, got shape {tuple(images.shape)}")
        _check_working_size(images.shape[-1])
        return self.sam.encode_backbone(images)

    def decode(
        self,
        features: Dict[str, object],
        decoder_idx: int,
        points: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Run mask decoder 1 or 2 on encoded features with optional prompts.

        The working size S is read from the features (S = 16 x the image-embedding size); the
        decoder projects the high-resolution FPN levels with its own conv_s0/conv_s1.
        points: B x N x 2 input-pixel (x, y) positive clicks, or (coords B x N x 2, labels
        B x N) with official labels. boxes: B x 4 (x0, y0, x1, y1) input pixels; as in
        the official predictor a box becomes two corner points placed before the clicks.
        mask_input: B x 1 x S/4 x S/4 mask logits of a previous prediction (SAM2's mask prompt: the official
        predictor's ``mask_input``, its low-res logits clamped to +-32, fed back as they are), or None (no mask
        prompt); another shape is a ``MaskInputError``.
        The channel layout is fixed by num_classes (see the class docstring).

        Returns dict(low_res_logits=B x (C+1) x S/4 x S/4 (channel 0 zero, channel c = mask
        token c-1, in train and eval mode alike), iou_predictions=B x C).
        """
        decoder = self._decoder(decoder_idx)
        image_embed = features["image_embed"]
        batch, grid = image_embed.shape[0], tuple(image_embed.shape[-2:])
        stride = self.sam.backbone_stride
        prompt_encoder = self.sam.sam_prompt_encoder
        _check_mask_input(mask_input, batch, grid)
        sparse, dense = prompt_encoder(
            points=_merge_points_and_boxes(points, boxes), boxes=None, masks=mask_input,
            image_embedding_size=grid, input_image_size=(grid[0] * stride, grid[1] * stride),
        )
        # Without prompts SAM2's prompt encoder returns batch 1; share it across the batch.
        # All tokens, then the first C: no stability fallback to tokens the loss never trains.
        masks, iou = decoder.predict_masks(
            image_embeddings=image_embed,
            image_pe=prompt_encoder.get_dense_pe(grid),
            sparse_prompt_embeddings=sparse.expand(batch, -1, -1),
            dense_prompt_embeddings=dense.expand(batch, -1, -1, -1),
            repeat_image=False,
            high_res_features=self.sam.project_high_res(features["backbone_fpn"], decoder),
        )[:2]
        masks, iou = masks[:, : self.num_classes], iou[:, : self.num_classes]
        background = masks.new_zeros(masks.shape[0], 1, *masks.shape[2:])
        return {"low_res_logits": torch.cat([background, masks], dim=1), "iou_predictions": iou}

    def predict_logits(
        self,
        images: Optional[torch.Tensor],
        decoder_idx: int = 1,
        points: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]] = None,
        boxes: Optional[torch.Tensor] = None,
        features: Optional[Dict[str, object]] = None,
        mask_input: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The one prediction path: decoder ``decoder_idx`` with these prompts -> B x (C+1) x S/4 x S/4 float32
        class logits.

        images: B x 3 x S x S normalised images; or pass their ``encode`` features instead (images None) to run
        several decoders on one image-encoder pass. Prompts (points, boxes, mask_input) as in ``decode``.
        Gradients and precision are the caller's (``torch.no_grad``, ``utils.autocast``).
        """
        if features is None:
            features = self.encode(images)
        return self.decode(features, decoder_idx, points=points, boxes=boxes,
                           mask_input=mask_input)["low_res_logits"].float()

    def _decoder(self, decoder_idx: int) -> nn.Module:
        if decoder_idx == 1:
            return self.sam.sam_mask_decoder
        if decoder_idx == 2:
            return self.sam.sam_mask_decoder2
        raise ValueError(f"decoder_idx must be 1 or 2, got {decoder_idx!r}")

    # ---- forward -----------------------------------------------------------------------

    def forward(
        self,
        batched_input: torch.Tensor,
        multimask_output: bool,
        image_size: int,
        prompt_idx: int = -1,
        prompt_mode: Optional[str] = None,
        generator: Optional[Union[np.random.Generator, Sequence[np.random.Generator]]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Both decoders on one image-encoder pass (the reference's call signature).

        batched_input: B x 3 x S x S normalised images, S == image_size, a multiple of 32
          (it need not be the size the SAM2 model was built with).
        multimask_output: accepted for the reference's calls, no effect: class c is always mask token c-1
          (see the class docstring).
        prompt_idx says WHICH decoder is prompted, prompt_mode WHAT KIND of prompt it gets:
          prompt_idx -1: no decoder is prompted; both run unprompted, whatever prompt_mode says.
          prompt_idx 0: decoder 1 runs unprompted; prompts derived from its mask (largest component:
            EDT-centre point, uniform random point, box) prompt decoder 2, giving `low_res_logits2`
            (centre point) and `low_res_logits2_r` (random point).
          prompt_idx 1: the mirror image (decoder 2 unprompted, decoder 1 prompted, `..._1_r`).
          prompt_mode (only read when prompt_idx is 0 or 1): "point" (also when None), "box" (box only: the
            `_r` outputs are then the same tensors as the main ones), "point-box" (box plus point); "none"
            turns prompting off like prompt_idx -1.
        generator: draws the random points: one generator per image (a list: what an image draws depends on it
          alone), or one drawn from in batch order (default: seeded from torch's global RNG).

        Returns low_res_logits{1,2} (B x (C+1) x S/4 x S/4), iou_predictions{1,2} (B x C),
        masks{1,2} (logits bilinearly upsampled to S), and for the prompted decoder p also
        low_res_logits{p}_r, iou_predictions{p}_r, masks{p}_r.
        """
        del multimask_output  # documented no-op
        _check_working_size(image_size)
        if batched_input.dim() != 4 or tuple(batched_input.shape[1:]) != (3, image_size, image_size):
            raise ValueError(
                f"image_size {image_size} does not match the input of shape {tuple(batched_input.shape)}: "
                f"pass B x 3 x {image_size} x {image_size} images, or the images' size as image_size"
            )
        mode = _check_prompt_mode(prompt_idx, prompt_mode)
        features = self.encode(batched_input)
        if mode == "none":
            outputs = {1: self.decode(features, 1), 2: self.decode(features, 2)}
        else:
            free, prompted = (1, 2) if prompt_idx == 0 else (2, 1)
            free_out = self.decode(features, free)
            if generator is None:
                generator = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
            generators = list(generator) if isinstance(generator, (list, tuple)) else \
                [generator] * batched_input.shape[0]
            prompts = prompts_from_logits(free_out["low_res_logits"], image_size, generators)
            main = self.decode(features, prompted, **prompts.as_decoder_prompts(mode, "center"))
            rand = main if mode == "box" else self.decode(features, prompted, **prompts.as_decoder_prompts(mode, "random"))
            outputs = {free: free_out, prompted: main, f"{prompted}_r": rand}
        result = {}
        for suffix, out in outputs.items():
            result[f"low_res_logits{suffix}"] = out["low_res_logits"]
            result[f"iou_predictions{suffix}"] = out["iou_predictions"]
            result[f"masks{suffix}"] = F.interpolate(
                out["low_res_logits"], size=(image_size, image_size), mode="bilinear", align_corners=False
            )
        return result


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


# Hiera halves the resolution after its stride-4 patch embedding three times, and the FPN adds each
# level to the 2x-upsampled coarser one: the input size must divide by 4 * 2**3.
SIZE_MULTIPLE = 32


def _check_working_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0 or size % SIZE_MULTIPLE:
        raise ValueError(
            f"image size {size!r} is not a positive multiple of {SIZE_MULTIPLE}: resize the images to one "
            f"(e.g. 512) and pass that size"
        )


class ReferenceCallError(ValueError):
    """A call of ``forward`` that the reference code makes with another meaning than ours (see its message)."""


def _check_prompt_mode(prompt_idx: int, prompt_mode: Optional[str]) -> str:
    if prompt_idx not in (-1, 0, 1):
        raise ValueError(f"prompt_idx must be -1 (no prompts), 0 or 1 (decoder to derive prompts from), got {prompt_idx!r}")
    if prompt_mode is not None and prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    if prompt_idx == -1:
        return "none"
    mode = prompt_mode or "point"
    if prompt_idx == 1 and mode in ("point", "point-box"):
        # The reference's select_samples calls forward(images, True, 512, 1, 'point')["low_res_logits1"] as its
        # random-point prediction (by its call site; what its unpublished sam2_base_1 does is not known); here that
        # output is decoder 1 at the centre of decoder 2's mask: a ported select_samples would compare two
        # centre-point predictions without a word.
        raise ReferenceCallError(
            f"forward(..., prompt_idx=1, prompt_mode={mode!r}): the reference code's scoring uses this call's "
            "low_res_logits1 as decoder 1's random-point prediction, but here it is the centre point of decoder 2's "
            "mask. Ask for the prediction you mean with LoRA_Sam.predict_logits(images, decoder, points=...) "
            "(active_learning_strategies.MaskDifferenceStrategy.compare makes the three predictions of the score)")
    return mode


class MaskInputError(ValueError):
    """A mask prompt (``LoRA_Sam.decode``'s ``mask_input``) of the wrong shape."""


def _check_mask_input(mask_input: Optional[torch.Tensor], batch: int, grid: Tuple[int, int]) -> None:
    """B x 1 x 4*grid x 4*grid (the S/4 low-res logits of one class per image), or None."""
    if mask_input is None:
        return
    expected = (batch, 1, 4 * grid[0], 4 * grid[1])
    if not isinstance(mask_input, torch.Tensor) or tuple(mask_input.shape) != expected:
        shape = tuple(mask_input.shape) if isinstance(mask_input, torch.Tensor) else type(mask_input).__name__
        raise MaskInputError(f"mask_input must be B x 1 x S/4 x S/4 low-res logits, here {expected} (one foreground "
                             f"channel per image at the decoder's output size), got {shape}")


def _merge_points_and_boxes(
    points: Optional[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]], boxes: Optional[torch.Tensor]
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Official predictor convention: box corners (labels 2, 3) first, then the clicks."""
    if isinstance(points, torch.Tensor):
        labels = torch.full(points.shape[:2], POSITIVE_LABEL, dtype=torch.int, device=points.device)
        points = (points, labels)
    if boxes is None:
        return points
    corners = boxes.reshape(-1, 2, 2)
    corner_labels = torch.tensor([BOX_CORNER_LABELS], dtype=torch.int, device=boxes.device).expand(corners.shape[0], -1)
    if points is None:
        return corners, corner_labels
    return torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1].int()], dim=1)


def _lora_rank(key: str, shape: Sequence[int]) -> int:
    return shape[0] if ".lora_a_" in key else shape[-1]


# --------------------------------------------------------------------------------------
# the one model factory
# --------------------------------------------------------------------------------------


class ModelInputError(ValueError):
    """A file or module the model is built from cannot be used. ``source`` says which input: "model_cfg",
    "checkpoint" (the SAM2 weights), "lora_ckpt", "weights" (a trained full state_dict) or "module"; each command
    line names its own flag for it. ``holds``: for "weights", what the file holds instead of a trained model
    (``ModelFileError.holds``), so that a command line can say which of its flags takes such a file."""

    def __init__(self, source: str, message: str, holds: Optional[str] = None) -> None:
        super().__init__(message)
        self.source, self.holds = source, holds

    def after_flag(self, flag: str, value: object) -> str:
        """"<flag> <value>: <message>" for the command line's flag of this input (the value once: left out when
        the message starts with it)."""
        shown = "" if value is None or str(self).startswith(str(value)) else f" {value}"
        return f"{flag}{shown}: {self}"


# What the program asks of a --module's LoRA_Sam besides LoRA_Sam(sam, r): the reference's has only (sam, r).
LORA_SAM_PARAMETERS = ("num_classes", "lora_width", "train_no_mem_embed")
LORA_SAM_METHODS = ("encode", "decode", "predict_logits", "set_grad_checkpointing", "lora_disabled")


def lora_sam_misfit(lora_sam_class: type) -> Optional[str]:
    """What a LoRA_Sam class (a --module's) lacks of what this program calls (its constructor's keyword parameters,
    its methods), in one sentence; None when it has them all. The reference code's LoRA_Sam (``LoRA_Sam(sam, r)``,
    built on its unpublished sam2_base_1) has none of them."""
    try:
        parameters = inspect.signature(lora_sam_class).parameters
    except (TypeError, ValueError):
        parameters = {}
    takes_any = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    lacking = [p for p in LORA_SAM_PARAMETERS if p not in parameters and not takes_any]
    methods = [m for m in LORA_SAM_METHODS if not callable(getattr(lora_sam_class, m, None))]
    if not lacking and not methods:
        return None
    said = [f"the parameter(s) {', '.join(lacking)}" if lacking else "", f"the method(s) {', '.join(methods)}"
            if methods else ""]
    return (f"its LoRA_Sam lacks {' and '.join(s for s in said if s)} that this program uses (the reference code's "
            "LoRA_Sam(sam, r) is such a class: use this repository's sam_lora_image_encoder_prompt, which reads the "
            "reference's checkpoints)")


# What build_model_from_settings reads of a run's settings.
MODEL_SETTINGS = ("model_cfg", "checkpoint", "img_size", "rank", "num_classes", "module", "lora_ckpt", "seed",
                  "lora_width", "no_mem_embed")


def build_model(model_cfg: str, checkpoint: Optional[str], img_size: int, rank: int = 4,
                num_classes: int = 1, module: str = "sam_lora_image_encoder_prompt",
                device: Union[torch.device, str] = "cpu", lora_ckpt: Optional[str] = None,
                seed: int = 0, weights: Optional[Union[str, os.PathLike]] = None,
                lora_width: str = "input", train_no_mem_embed: bool = True) -> nn.Module:
    """SAM2 (``build_sam2``) wrapped in ``LoRA_Sam`` from ``module``, on ``device``: the one model factory.

    ``checkpoint=None`` gives seeded random weights (reproducible for ``seed``); ``seed`` also fixes the LoRA A
    matrices. ``lora_width``, ``train_no_mem_embed``: see ``LoRA_Sam`` (the defaults are the reference's).
    ``lora_ckpt`` (ours or the reference's LoRA-only format, see ``LoRA_Sam.load_lora_parameters``) is loaded on
    top; ``weights`` (a full
    ``LoRA_Sam.state_dict()`` such as best_model_dice*.pth, ours or the reference's) replaces every weight. Every
    problem with an input is a ``ModelInputError`` naming its source.
    """
    state = _read_full_weights(weights, device) if weights is not None else None  # a bad file fails before building
    torch.manual_seed(seed)
    try:
        lora_sam_class = LoRA_Sam if module == __name__ else import_module(module).LoRA_Sam
    except (ImportError, AttributeError) as err:
        raise ModelInputError("module", f"{module} cannot provide LoRA_Sam ({err})") from None
    misfit = lora_sam_misfit(lora_sam_class)
    if misfit:
        raise ModelInputError("module", f"{module}: {misfit}")
    try:
        sam = build_sam2(model_cfg, checkpoint, device=str(device), mode="train", image_size=img_size)
    except ConfigError as err:
        raise ModelInputError("model_cfg", str(err)) from None
    except CheckpointReadError as err:  # sam2's own load: the message of every other load
        raise ModelInputError("checkpoint", unloadable_file_message(err.path, err.cause)) from None
    except CheckpointError as err:
        raise ModelInputError("checkpoint", f"does not fit the model config {model_cfg}: {err}") from None
    if checkpoint is not None:
        _refuse_nonfinite("checkpoint", checkpoint, sam.state_dict())
    net = lora_sam_class(sam, r=rank, num_classes=num_classes, lora_width=lora_width,
                         train_no_mem_embed=train_no_mem_embed).to(device)
    if lora_ckpt:
        try:
            net.load_lora_parameters(lora_ckpt)
        except (CheckpointFileError, ValueError) as err:
            raise ModelInputError("lora_ckpt", str(err)) from None
        lora_file = {k: v for k, v in net.state_dict().items() if net._is_lora_file_key(k)}
        _refuse_nonfinite("lora_ckpt", lora_ckpt, lora_file)
    if state is not None:
        try:
            load_model_state(net, state, weights)
        except ModelFileError as err:
            raise ModelInputError("weights", str(err), holds=err.holds) from None
    return net


def _refuse_nonfinite(source: str, path: Union[str, os.PathLike], tensors: Mapping[str, torch.Tensor]) -> None:
    """A ModelInputError naming ``path`` and its first tensors that hold NaN or inf: a model started from them
    could only produce NaN (checked once, when the model is built)."""
    bad = nonfinite_names(dict(tensors))
    if bad:
        raise ModelInputError(source, f"{path} holds NaN or inf in {first_names(bad)}: it is damaged (or saved from "
                                      "a diverged run); use an intact file")


# --------------------------------------------------------------------------------------
# trained-model files (best_model_dice*.pth: the full LoRA_Sam state dict, ours or the reference's)
# --------------------------------------------------------------------------------------


class ModelFileError(CheckpointFileError):
    """A file given as a trained model holds something else. ``holds`` says what: "resume_state" (the trainer's
    last_state.pth), "sam2_weights" (official SAM2 weights), "lora_file" (``save_lora_parameters``),
    "other_model" (a LoRA_Sam of another size, rank or class count), "no_state_dict" or "nonfinite" (a LoRA_Sam
    holding NaN or inf)."""

    def __init__(self, message: str, holds: str) -> None:
        super().__init__(message)
        self.holds = holds


TRAINED_MODEL_HINT = "a trained model is a best_model_dice*.pth the trainer saved"


def read_model_file(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """The LoRA_Sam state dict in ``path`` (weights_only). ``CheckpointFileError`` when torch cannot load it,
    ``ModelFileError`` saying what it is when it is no LoRA_Sam state dict."""
    obj = load_torch_file(path, map_location=map_location)
    if isinstance(obj, dict) and {"args", "trainable"} <= set(obj):
        raise ModelFileError(f"{path} is a trainer resume state (last_state.pth: settings, trainable weights, "
                             f"optimiser), not a model; {TRAINED_MODEL_HINT} in the same run folder", "resume_state")
    tensors = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(tensors, dict) or not tensors or not all(torch.is_tensor(v) for v in tensors.values()):
        what = f"a {type(obj).__name__}" + (f" with keys {', '.join(map(str, list(obj)[:4]))}" if isinstance(obj, dict)
                                             else "")
        raise ModelFileError(f"{path} holds {what}, not a model state dict; {TRAINED_MODEL_HINT}", "no_state_dict")
    if not any(str(k).startswith("sam.") for k in tensors):
        raise ModelFileError(f"{path} holds SAM2 weights (an official SAM2 checkpoint?), not a trained LoRA_Sam; "
                             f"{TRAINED_MODEL_HINT}", "sam2_weights")
    if not any(".attn.qkv.base." in k or REFERENCE_QKV_KEY.search(k) for k in tensors):
        raise ModelFileError(f"{path} is a LoRA file (LoRA matrices and decoders only, save_lora_parameters), not a "
                             f"whole model; {TRAINED_MODEL_HINT}", "lora_file")
    bad = nonfinite_names(tensors)
    if bad:
        raise ModelFileError(f"{path} holds NaN or inf in {len(bad)} tensor{'s' if len(bad) > 1 else ''} "
                             f"({first_names(bad)}): "
                             "a model saved after training diverged, whose scores would mean nothing; use a "
                             "checkpoint saved before the divergence", "nonfinite")
    return tensors


def load_model_state(net: LoRA_Sam, state: Dict[str, torch.Tensor], path: Union[str, os.PathLike]) -> None:
    """Load a state dict read from ``path`` (``read_model_file``) into ``net``; ``ModelFileError("other_model")``
    with one short summary (``build_sam.state_mismatch``, plus the LoRA ranks when they differ) when it does not
    fit, before anything is copied."""
    if any(REFERENCE_QKV_KEY.search(k) for k in state):  # the reference's layout: mapped, misfits in one error
        try:
            net.load_state_dict(state)
        except LoRACheckpointError as err:
            raise ModelFileError(f"{path}: {err}", "other_model") from None
        return
    found = {k: v.shape for k, v in state.items()}
    mismatch = state_mismatch(found, {k: v.shape for k, v in net.state_dict().items()})
    if mismatch:
        lora_key = next((k for k in sorted(state) if ".lora_a_q" in k), None)
        file_rank = _lora_rank(lora_key, state[lora_key].shape) if lora_key else None
        rank = f"; LoRA rank: file {file_rank}, model {net.r}" if file_rank not in (None, net.r) else ""
        raise ModelFileError(f"{path} is another model than the one built here: {mismatch}{rank}", "other_model")
    net.load_state_dict(state)


def _read_full_weights(path: Union[str, os.PathLike], device: Union[torch.device, str]) -> Dict[str, torch.Tensor]:
    try:
        return read_model_file(path, map_location=device)
    except CheckpointFileError as err:
        raise ModelInputError("weights", str(err), holds=getattr(err, "holds", None)) from None


def build_model_from_settings(settings: Mapping[str, object], device: Union[torch.device, str] = "cpu",
                              weights: Optional[Union[str, os.PathLike]] = None) -> nn.Module:
    """The model a run's settings describe: model_cfg, checkpoint ("none" = seeded random weights), img_size, rank,
    num_classes, module, lora_ckpt, seed, lora_width, no_mem_embed ("trainable" | "frozen"), each required (the
    trainer's prepared flags, or a run folder's ``{**settings.LEGACY, **config}``: a setting an older config.txt
    lacks means how that run was made, not today's default). Values may be text (config.txt's). With ``weights``
    (a trained full state_dict) the SAM2 checkpoint is not read: every weight comes from that file."""
    missing = [key for key in MODEL_SETTINGS if key not in settings]
    if missing:
        raise KeyError(f"the model settings lack {', '.join(missing)}")

    def text(key: str) -> Optional[str]:
        value = settings[key]
        return None if value is None or str(value) in ("None", "none") else str(value)

    return build_model(text("model_cfg"), None if weights is not None else text("checkpoint"),
                       int(settings["img_size"]), int(settings["rank"]), int(settings["num_classes"]),
                       text("module"), device, None if weights is not None else text("lora_ckpt"),
                       int(settings["seed"]), weights, text("lora_width"), text("no_mem_embed") == "trainable")
