"""The annotation cost's pure part (annotation_cost.py): changed pixels, and RITM's click protocol on hand-made
masks and predictors whose every click can be checked by hand."""

import numpy as np
import pytest
from scipy import ndimage

from annotation_cost import (MAX_CLICKS, NOT_REACHED, Click, ClickOutcome, clicks, iou, next_click, pixels)


def mask(shape, *rects):
    """H x W bool with the rectangles (row0, row1, col0, col1), ends exclusive, set."""
    out = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in rects:
        out[r0:r1, c0:c1] = True
    return out


def ideal_predictor(proposal, truth, calls=None):
    """A model that does what each click asks, from the proposal and ALL clicks so far: a positive click adds the
    truth's component under it, a negative click removes the proposal's wrong component under it. ``calls``
    records what it was asked."""
    truth_parts, _ = ndimage.label(truth)
    wrong_parts, _ = ndimage.label(proposal & ~truth)

    def predict(clicks_so_far):
        if calls is not None:
            calls.append(tuple(clicks_so_far))
        out = proposal.copy()
        for click in clicks_so_far:
            parts = truth_parts if click.positive else wrong_parts
            label = parts[click.row, click.col]
            if label:
                out = out | (parts == label) if click.positive else out & (parts != label)
        return out

    return predict


# A 5 x 5 square: its deepest pixel is its centre (4, 5), 3 pixels from the outside; the eight around it are 2 away.
SQUARE = (2, 7, 3, 8)


def test_a_perfect_proposal_needs_no_click():
    truth = mask((10, 12), SQUARE)
    calls = []
    outcome = clicks(ideal_predictor(truth.copy(), truth, calls), truth)
    assert outcome == ClickOutcome(clicks=(), ious=(1.0,))
    assert outcome.clicks_to(0.85) == 0 and outcome.clicks_to(0.90) == 0
    assert calls == [()]  # the proposal only


def test_one_positive_click_at_the_deepest_error_pixel_completes_the_mask():
    truth = mask((10, 12), SQUARE)
    outcome = clicks(ideal_predictor(np.zeros_like(truth), truth), truth)
    assert outcome.clicks == (Click(4, 5, True),)  # the centre, not the edge the raster meets first (2, 3)
    assert outcome.ious == (0.0, 1.0)
    assert outcome.clicks_to(0.85) == 1 and outcome.clicks_to(0.90) == 1


def test_the_photo_border_counts_as_the_errors_edge():
    """An error in the photo's corner: its interior is 3 pixels from every edge (the padding), at (2, 2); without the
    padding the corner pixel itself would look deepest (5 pixels from the nearest non-error pixel)."""
    truth = mask((8, 8), (0, 5, 0, 5))
    assert next_click(np.zeros_like(truth), truth, np.zeros_like(truth)) == Click(2, 2, True)


def test_a_model_that_never_reaches_the_iou_is_not_reached_not_twenty():
    truth = mask((10, 12), SQUARE)
    outcome = clicks(lambda clicks_so_far: np.zeros_like(truth), truth)  # ignores every click
    assert len(outcome.clicks) == MAX_CLICKS and len(outcome.ious) == MAX_CLICKS + 1
    assert outcome.clicks_to(0.90) == NOT_REACHED and outcome.clicks_to(0.85) == NOT_REACHED
    assert NOT_REACHED != MAX_CLICKS
    # already-clicked pixels are excluded: the centre (distance 3), then the ring at distance 2 in raster order
    assert outcome.clicks[:4] == (Click(4, 5, True), Click(3, 4, True), Click(3, 5, True), Click(3, 6, True))
    assert len(set(outcome.clicks)) == MAX_CLICKS


def test_the_larger_error_decides_the_click_sign():
    truth = mask((12, 20), SQUARE)
    # only false positives (a 3 x 3 blob at rows 7-9, cols 12-14): a negative click at its centre removes it
    proposal = truth | mask(truth.shape, (7, 10, 12, 15))
    outcome = clicks(ideal_predictor(proposal, truth), truth)
    assert outcome.clicks == (Click(8, 13, False),) and outcome.ious[-1] == 1.0
    # the 5 x 5 square missed (depth 3) beats the 3 x 3 blob added (depth 2): a positive click first
    proposal = mask(truth.shape, (7, 10, 12, 15))
    outcome = clicks(ideal_predictor(proposal, truth), truth)
    assert outcome.clicks == (Click(4, 5, True), Click(8, 13, False))


def test_equal_depths_give_the_negative_click():
    truth = mask((8, 16), (2, 5, 1, 4))  # a 3 x 3 lesion missed ...
    proposal = mask(truth.shape, (2, 5, 10, 13))  # ... and a 3 x 3 blob added: both 2 pixels deep
    outcome = clicks(ideal_predictor(proposal, truth), truth)
    assert outcome.clicks == (Click(3, 11, False), Click(3, 2, True))
    assert outcome.ious == (0.0, 0.0, 1.0)


def test_the_model_predicts_from_all_clicks_so_far():
    """Two lesions: the second click completes the mask only if the model still has the first."""
    truth = mask((12, 20), SQUARE, (8, 11, 14, 17))
    calls = []
    outcome = clicks(ideal_predictor(np.zeros_like(truth), truth, calls), truth)
    first, second = Click(4, 5, True), Click(9, 15, True)
    assert outcome.clicks == (first, second)
    assert calls == [(), (first,), (first, second)]
    assert outcome.ious == pytest.approx((0.0, 25 / 34, 1.0))
    assert outcome.clicks_to(0.90) == 2


def test_clicks_to_085_and_to_090_are_counted_apart():
    truth = mask((12, 20), SQUARE, (9, 11, 15, 17))  # 25 + 4 pixels: the square alone is IoU 25/29 = 0.862
    outcome = clicks(ideal_predictor(np.zeros_like(truth), truth), truth)
    assert outcome.ious == pytest.approx((0.0, 25 / 29, 1.0))
    assert outcome.clicks_to(0.85) == 1 and outcome.clicks_to(0.90) == 2
    with pytest.raises(ValueError, match="stopped at IoU 0.9"):
        outcome.clicks_to(0.95)


def test_nothing_left_to_click_stops_the_session():
    """A one-pixel lesion missed, and a model that ignores clicks: after its one pixel is clicked there is no error
    pixel left to click."""
    truth = mask((6, 6), (2, 3, 2, 3))
    outcome = clicks(lambda clicks_so_far: np.zeros_like(truth), truth)
    assert outcome.clicks == (Click(2, 2, True),) and outcome.clicks_to(0.90) == NOT_REACHED


def test_a_prediction_of_another_size_is_an_error():
    truth = mask((6, 6), (2, 4, 2, 4))
    with pytest.raises(ValueError, match=r"shape \(3, 3\) for a truth of shape \(6, 6\)"):
        clicks(lambda clicks_so_far: np.zeros((3, 3), bool), truth)


def test_iou_and_pixel_cost_by_hand():
    truth = mask((10, 10), (0, 2, 0, 2))  # 4 pixels
    proposal = mask((10, 10), (0, 2, 1, 3))  # 4 pixels, 2 of them right
    assert iou(proposal, truth) == 2 / 6
    assert iou(np.zeros_like(truth), np.zeros_like(truth)) == 1.0
    cost = pixels(proposal, truth)
    assert cost.dice == 2 * 2 / (4 + 4) and cost.changed_fraction == (2 + 2) / 100
    assert pixels(truth, truth).changed_fraction == 0.0 and pixels(truth, truth).dice == 1.0
    # two classes: class 1 as above, class 2 empty in both (Dice 1.0); a class-2 pixel where the truth has class 1
    # is one more pixel to change
    labels = proposal.astype(np.uint8)
    labels[0, 1] = 2
    cost = pixels(labels, truth.astype(np.uint8), num_classes=2)
    assert cost.changed_fraction == 5 / 100
    assert cost.dice == pytest.approx((2 * 1 / (3 + 4) + 0.0) / 2)  # class 2: 1 predicted pixel, none true
    with pytest.raises(ValueError, match="one size"):
        pixels(proposal[:5], truth)
