"""What correcting the model's proposal costs, for each image chosen in an epoch (DESIGN decision 13).

For each chosen image, from the model that chose it: the proposal (decoder 1, no prompt: the round's proposal) is
compared with the image's truth -- the ground truth in a simulation, the mask the person returned otherwise (no
truth exists before it) -- and gives one cost row (``COST_COLUMNS``):
  dice, changed_fraction: ``annotation_cost.pixels`` at the photo's resolution (the logits upsampled as validation
    upsamples them, ``val.logits_to_label_map``);
  clicks_85, clicks_90: ``annotation_cost.clicks``, RITM's protocol, the clicks answered by ``interactive_decoder``
    with all clicks so far. Simulated at the model's resolution: the truth resized as training labels are
    (``datasets_skin.resize_mask``, nearest) and the logits upsampled to S x S, so that up to 20 clicks cost 40
    distance transforms of S x S, not of the photo.
``--annotation_cost`` picks how much: "none" (no row values, nothing computed), "pixels", "clicks" (both).

One image at a time (``proposal_cost``): the costs shard by image as scoring does. The model's mode (``eval``),
gradients and precision are the caller's, as for ``val.validate``.
"""
from __future__ import annotations

from argparse import Namespace
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

import annotation_cost
import utils
from annotation_cost import COST_COLUMNS, NOC_COLUMNS, Click
from datasets_skin import resize_mask
from sam2.sam2_image_predictor import LOW_RES_LOGIT_CLAMP
from sam_lora_image_encoder_prompt import NEGATIVE_LABEL, POSITIVE_LABEL, PROMPT_MODES
from val import class_masks, logits_to_label_map

COST_MODES = ("none", "pixels", "clicks")

CostRow = Dict[str, Optional[Union[float, annotation_cost.ClickCount]]]


def interactive_decoder(prompt_mode: str) -> int:
    """The decoder that answers clicks: decoder 2 where the run trained it on prompts (--promptmode point, box or
    point-box), else decoder 1 (under "none" the two are trained alike, without prompts)."""
    if prompt_mode not in PROMPT_MODES:
        raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {prompt_mode!r}")
    return 1 if prompt_mode == "none" else 2


class ClickPredictor:
    """``annotation_cost.Predictor`` on one encoded image: no click -> the proposal (decoder 1, no prompt); clicks
    -> ``decoder`` prompted with all of them (positive / negative points at the clicked pixels of the S x S grid),
    and, with ``mask_input``, the previous prediction's low-res foreground logits (clamped to +-32, as SAM2's
    predictor returns them) as its mask prompt. Masks: foreground (some class beats background) at S x S."""

    def __init__(self, model: torch.nn.Module, features: Dict[str, object], decoder: int, mask_input: bool) -> None:
        self.model, self.features, self.decoder, self.mask_input = model, features, decoder, mask_input
        self.size = 16 * features["image_embed"].shape[-1]
        self.proposal = model.predict_logits(None, 1, features=features)  # 1 x (C+1) x S/4 x S/4
        self.logits = self.proposal  # the latest prediction

    def __call__(self, clicks: Sequence[Click]) -> np.ndarray:
        if not clicks:
            self.logits = self.proposal
        else:
            device = self.logits.device
            coords = torch.tensor([[[float(c.col), float(c.row)] for c in clicks]], device=device)
            labels = torch.tensor([[POSITIVE_LABEL if c.positive else NEGATIVE_LABEL for c in clicks]],
                                  dtype=torch.int, device=device)
            previous = None
            if self.mask_input:
                # the foreground logit: the largest foreground class's (the background logit is 0)
                previous = self.logits[:, 1:].amax(dim=1, keepdim=True).clamp(-LOW_RES_LOGIT_CLAMP,
                                                                              LOW_RES_LOGIT_CLAMP)
            self.logits = self.model.predict_logits(None, self.decoder, points=(coords, labels),
                                                    features=self.features, mask_input=previous)
        masks = class_masks(self.logits[0], (self.size, self.size))  # as validation upsamples and thresholds
        return torch.stack(masks).any(dim=0).cpu().numpy()


def proposal_cost(model: torch.nn.Module, image: torch.Tensor, truth: np.ndarray, mode: str = "pixels",
                  decoder: int = 1, mask_input: bool = False) -> CostRow:
    """One image's cost row (``COST_COLUMNS``; None where ``mode`` does not compute it; a NoC not reached within 20
    clicks is ``annotation_cost.NOT_REACHED``).

    image: 3 x S x S normalised (as the trainer's dataset gives it); truth: H x W class indices at the photo's
    size (0 background); decoder: ``interactive_decoder(--promptmode)``; mask_input: --click_mask_input.
    """
    if mode not in COST_MODES:
        raise ValueError(f"annotation cost must be one of {COST_MODES}, got {mode!r}")
    row: CostRow = dict.fromkeys(COST_COLUMNS)
    if mode == "none":
        return row
    truth = np.asarray(truth)
    if truth.ndim != 2 or truth.size == 0:
        raise ValueError(f"a truth must be an H x W mask, got shape {truth.shape}")
    if int(truth.max()) > model.num_classes:
        raise ValueError(f"a truth must hold class indices 0..{model.num_classes}, got a pixel of {int(truth.max())} "
                         "(a 0/255 mask? read masks with datasets_skin.decode_mask)")
    device = next(model.parameters()).device
    features = model.encode(image[None].to(device))
    predict = ClickPredictor(model, features, decoder, mask_input)
    pixels = annotation_cost.pixels(logits_to_label_map(predict.proposal[0], truth.shape), truth, model.num_classes)
    row.update(dice=pixels.dice, changed_fraction=pixels.changed_fraction)
    if mode == "clicks":
        label = resize_mask(truth.astype(np.uint8), predict.size) > 0
        outcome = annotation_cost.clicks(predict, label)
        row.update({column: outcome.clicks_to(threshold) for column, threshold in NOC_COLUMNS.items()})
    return row


def proposal_costs(model: torch.nn.Module, images: torch.Tensor, truths: Sequence[np.ndarray], mode: str = "pixels",
                   decoder: int = 1, mask_input: bool = False) -> List[CostRow]:
    """``proposal_cost`` of each chosen image: images B x 3 x S x S, truths B masks H_i x W_i."""
    if len(truths) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(truths)} truths")
    return [proposal_cost(model, image, truth, mode, decoder, mask_input) for image, truth in zip(images, truths)]


def run_costs(model: torch.nn.Module, images: torch.Tensor, truths: Sequence[np.ndarray], args: Namespace
              ) -> List[CostRow]:
    """``proposal_costs`` as a run computes them (the trainer's chosen images, the comparison's zero-shot validation
    images): the run's --annotation_cost, the decoder its --promptmode trained for clicks, --click_mask_input; no
    gradients, under scoring's autocast (--precision) on the model's device. The model's mode is the caller's."""
    device = next(model.parameters()).device
    with torch.no_grad(), utils.autocast(device, dtype=utils.scoring_dtype(device, args.precision)):
        return proposal_costs(model, images, truths, args.annotation_cost, interactive_decoder(args.promptmode),
                              args.click_mask_input)
