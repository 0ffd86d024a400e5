"""What correcting a proposal costs a person: the pixels to change, and the clicks of a simulated annotator.

Pure functions of masks (numpy and scipy); the model is behind a callable (``proposal_costs.py`` runs it).

``pixels``: the proposal's Dice against the truth, and the fraction of the pixels a person must change (false
positives + false negatives), at whatever resolution the two masks have (the photo's, as the trainer calls it).

``clicks``: RITM's protocol (Sofiiuk, Petrov, Konushin 2022, "Reviving Iterative Training with Mask Guidance for
Interactive Segmentation"; SAM's interactive evaluation follows it). Each click corrects the current mask's
largest error:
  1. the false negatives (truth, not predicted) and the false positives (predicted, not truth), each padded by one
     non-error pixel (so the photo's border counts as the error's edge), and their Euclidean distance transforms,
     with the pixels already clicked set to 0;
  2. the region whose maximum is larger gets the click: false negatives a positive click, false positives a
     negative one; equal maxima give the negative click;
  3. at the first pixel (raster order) holding that maximum: the error's deepest interior point;
  4. the model predicts again from all clicks so far.
It stops at IoU >= 0.90 or after 20 clicks; NoC@t is the number of clicks after which the IoU first reached t, and
"not reached" (``NOT_REACHED``) when it did not within those clicks (RITM counts such an image as 20).
Two differences from RITM, both because here a proposal exists before anyone clicks: the errors of the first click
are the proposal's (RITM starts from an empty mask and always makes a first click), so a proposal that already
reaches the IoU costs 0 clicks; and whether the previous prediction is fed back to the model as a mask prompt is
the predictor's business (``proposal_costs``: off unless asked). When every error pixel has been clicked already
(only a few pixels are wrong, yet the IoU is short of 0.90: a tiny lesion), the annotator stops, where RITM would
click an arbitrary pixel.

``run_totals``: what the images a run selected have cost so far, from their cost rows (``COST_COLUMNS``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

MAX_CLICKS = 20
STOP_IOU = 0.90
NOT_REACHED = "not reached"  # a NoC cell when the IoU was not reached within MAX_CLICKS

ClickCount = Union[int, str]  # a number of clicks, or NOT_REACHED
# One image's cost row: the proposal's Dice and changed fraction (``pixels``), NoC@85 and NoC@90 (``clicks``)
COST_COLUMNS = ("dice", "changed_fraction", "clicks_85", "clicks_90")
NOC_COLUMNS = {"clicks_85": 0.85, "clicks_90": 0.90}  # column -> the IoU its clicks reach (NoC@85, NoC@90)
# What the images selected so far cost (``run_totals``): changed pixels, clicks to 0.90, images where it was not reached
TOTAL_COLUMNS = ("changed_pixels", "clicks_90", "not_reached_90")


class Click(NamedTuple):
    """One simulated click at pixel (row, col) of the truth's grid: positive (add) or negative (remove)."""

    row: int
    col: int
    positive: bool


# clicks so far, in order (none: the proposal) -> H x W bool mask
Predictor = Callable[[Sequence[Click]], np.ndarray]


@dataclass(frozen=True)
class PixelCost:
    dice: float  # mean over the foreground classes; 1.0 for a class empty in both masks
    changed_fraction: float  # pixels whose class the person must change / all pixels


def pixels(proposal: np.ndarray, truth: np.ndarray, num_classes: int = 1) -> PixelCost:
    """The cost of correcting ``proposal`` into ``truth`` (H x W class indices, or bool for one class)."""
    proposal, truth = np.asarray(proposal), np.asarray(truth)
    if proposal.shape != truth.shape or proposal.ndim != 2:
        raise ValueError(f"proposal {proposal.shape} and truth {truth.shape} must be H x W masks of one size")
    dices = []
    for c in range(1, num_classes + 1):
        predicted, wanted = proposal == c, truth == c
        both = np.count_nonzero(predicted & wanted)
        total = np.count_nonzero(predicted) + np.count_nonzero(wanted)
        dices.append(1.0 if total == 0 else 2.0 * both / total)
    changed = np.count_nonzero(np.not_equal(proposal, truth))
    return PixelCost(float(np.mean(dices)), changed / truth.size)


def iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """|mask & truth| / |mask | truth| of two H x W bool masks; 1.0 when both are empty."""
    union = np.count_nonzero(mask | truth)
    return 1.0 if union == 0 else np.count_nonzero(mask & truth) / union


def _inner_distance(region: np.ndarray) -> np.ndarray:
    """H x W bool -> H x W float: each region pixel's Euclidean distance to the nearest pixel outside it, the
    photo's border counting as outside (the padding)."""
    if not region.any():
        return np.zeros(region.shape)
    return ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]


def next_click(mask: np.ndarray, truth: np.ndarray, clicked: np.ndarray) -> Optional[Click]:
    """The click that corrects ``mask``'s largest error (steps 1-3 of the protocol), pixels where ``clicked`` is
    True excluded; None when no error pixel is left to click. All H x W bool."""
    false_neg = _inner_distance(truth & ~mask)
    false_pos = _inner_distance(mask & ~truth)
    false_neg[clicked] = 0.0
    false_pos[clicked] = 0.0
    positive = false_neg.max() > false_pos.max()
    depth = false_neg if positive else false_pos
    flat = int(np.argmax(depth))  # the first maximum in raster order
    if depth.flat[flat] == 0.0:
        return None
    row, col = np.unravel_index(flat, depth.shape)
    return Click(int(row), int(col), bool(positive))


@dataclass(frozen=True)
class ClickOutcome:
    """The simulated session: the clicks made, and ious[n] = the IoU after n clicks (ious[0]: the proposal's)."""

    clicks: Tuple[Click, ...]
    ious: Tuple[float, ...]
    stop_iou: float = STOP_IOU

    def clicks_to(self, threshold: float) -> ClickCount:
        """NoC at ``threshold``: the clicks after which the IoU first reached it, or NOT_REACHED."""
        if threshold > self.stop_iou:
            raise ValueError(f"the session stopped at IoU {self.stop_iou}: it cannot tell the clicks to {threshold}")
        return next((n for n, value in enumerate(self.ious) if value >= threshold), NOT_REACHED)


def clicks(predict: Predictor, truth: np.ndarray, max_clicks: int = MAX_CLICKS,
           stop_iou: float = STOP_IOU) -> ClickOutcome:
    """A simulated annotator corrects ``predict``'s proposal towards ``truth`` (H x W bool) by clicks.

    ``predict(())`` is the proposal; then ``predict(clicks so far)`` once after each click, with every click made
    until then, in order (a predictor that feeds its previous prediction back as a mask prompt keeps it between
    calls). Stops at IoU >= ``stop_iou`` or after ``max_clicks`` clicks.
    """
    truth = np.asarray(truth, dtype=bool)
    clicked = np.zeros(truth.shape, dtype=bool)
    made: list = []
    mask = _checked(predict(()), truth)
    ious = [iou(mask, truth)]
    while ious[-1] < stop_iou and len(made) < max_clicks:
        click = next_click(mask, truth, clicked)
        if click is None:
            break
        made.append(click)
        clicked[click.row, click.col] = True
        mask = _checked(predict(tuple(made)), truth)
        ious.append(iou(mask, truth))
    return ClickOutcome(tuple(made), tuple(ious), stop_iou)


def _checked(mask: np.ndarray, truth: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != truth.shape:
        raise ValueError(f"predict returned a mask of shape {mask.shape} for a truth of shape {truth.shape}")
    return mask.astype(bool, copy=False)


def run_totals(rows: Sequence[Mapping[str, object]], photo_pixels: Sequence[int]) -> Dict[str, Optional[int]]:
    """What the images selected so far cost together (``TOTAL_COLUMNS``), from their cost rows and their photos'
    H x W (``photo_pixels``, one per row):

      changed_pixels  sum of changed_fraction x H x W, each image's rounded to whole pixels;
      clicks_90       sum of NoC@90, an image where it was not reached counted as MAX_CLICKS (RITM's convention:
                      the clicks spent before the annotator stopped; the image may cost more, by hand);
      not_reached_90  how many of them did not reach IoU 0.90 within MAX_CLICKS clicks.

    A total is None when some image lacks its value (not computed under that --annotation_cost, or a row written
    before the cost columns existed): a sum over part of the images would look like a cheaper run."""
    if len(rows) != len(photo_pixels):
        raise ValueError(f"{len(rows)} cost rows but {len(photo_pixels)} photo sizes")
    fractions = [row.get("changed_fraction") for row in rows]
    clicks_90 = [row.get("clicks_90") for row in rows]
    changed = None if None in fractions else sum(int(round(float(f) * n)) for f, n in zip(fractions, photo_pixels))
    if None in clicks_90:
        return dict(changed_pixels=changed, clicks_90=None, not_reached_90=None)
    missed = sum(1 for n in clicks_90 if n == NOT_REACHED)
    return dict(changed_pixels=changed, clicks_90=sum(clicks_spent(n) for n in clicks_90), not_reached_90=missed)


def clicks_spent(count: ClickCount) -> int:
    """The clicks an image's session spent: its NoC, or MAX_CLICKS where it did not reach the IoU (NOT_REACHED)."""
    return MAX_CLICKS if count == NOT_REACHED else int(count)
