"""utils: Dice/CE loss against independent numpy formulas, ignore label, seeding, device selection."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import data_fixtures  # noqa: F401  (puts the repository root on sys.path)
import utils


def numpy_dice_loss(logits: np.ndarray, target: np.ndarray, smooth: float = 1e-5) -> float:
    """Reference: per class over the valid pixels of the batch, 1 - (2 sum pt + s) / (sum p^2 + sum t + s), mean."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)  # B x C x H x W
    valid = target != 255
    losses = []
    for c in range(logits.shape[1]):
        p = probs[:, c][valid]
        t = (target[valid] == c).astype(np.float64)
        losses.append(1 - (2 * (p * t).sum() + smooth) / ((p * p).sum() + t.sum() + smooth))
    return float(np.mean(losses))


def numpy_cross_entropy(logits: np.ndarray, target: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    b, h, w = np.nonzero(target != 255)
    return float(-log_probs[b, target[b, h, w], h, w].mean())


@pytest.mark.parametrize("channels", [2, 3])
def test_loss_matches_reference_formulas(channels):
    gen = torch.Generator().manual_seed(channels)
    logits = torch.randn(3, channels, 12, 10, generator=gen, dtype=torch.float64)
    target = torch.randint(0, channels, (3, 12, 10), generator=gen)
    target[0, :4] = 255  # ignored band
    total, ce, dice = utils.segmentation_loss(logits, target)
    ref_dice = numpy_dice_loss(logits.numpy(), target.numpy())
    ref_ce = numpy_cross_entropy(logits.numpy(), target.numpy())
    assert dice.item() == pytest.approx(ref_dice, rel=1e-9)
    assert ce.item() == pytest.approx(ref_ce, rel=1e-9)
    assert total.item() == pytest.approx(0.2 * ref_ce + 0.8 * ref_dice, rel=1e-9)
    total_half, _, _ = utils.segmentation_loss(logits, target, dice_weight=0.5)
    assert total_half.item() == pytest.approx(0.5 * ref_ce + 0.5 * ref_dice, rel=1e-9)


def test_ignored_pixels_do_not_matter():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, generator=gen, requires_grad=True)
    target = torch.randint(0, 2, (2, 8, 8), generator=gen)
    target[:, :, :3] = 255
    total, _, _ = utils.segmentation_loss(logits, target)
    total.backward()
    assert logits.grad[:, :, :, :3].abs().max() == 0  # no gradient where the label is 255
    assert logits.grad[:, :, :, 3:].abs().max() > 0
    changed = logits.detach().clone()
    changed[:, :, :, :3] = torch.randn(2, 2, 8, 3, generator=gen) * 10
    assert torch.allclose(utils.segmentation_loss(changed, target)[0], total.detach())


def test_dice_loss_near_zero_for_perfect_prediction_and_high_for_inverse():
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 4:10, 3:12] = 1
    perfect = torch.stack([(target == 0), (target == 1)], dim=1).float() * 40.0
    inverse = perfect.flip(1)
    loss = utils.DiceLoss_Mask(2)
    assert loss(perfect, target).item() < 1e-6
    assert loss(inverse, target).item() > 0.99
    # Uniform logits: p = 0.5 everywhere; weight [0, 1] keeps only the lesion class (|T| = 2*6*9, N = 512 pixels).
    lesion_only = loss(torch.zeros(2, 2, 16, 16), target, weight=torch.tensor([0.0, 1.0]))
    assert lesion_only.item() == pytest.approx(1 - (2 * 0.5 * 108) / (0.25 * 512 + 108), rel=1e-4)


def test_dice_loss_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="Expected 3 channels"):
        utils.DiceLoss_Mask(3)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="differ in H x W"):
        utils.DiceLoss_Mask(2)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 2 channels"):
        utils.DiceLoss_Mask(1)


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    utils.seed_everything(123)
    first = draw()
    utils.seed_everything(123)
    assert draw() == first
    utils.seed_everything(124)
    assert draw() != first


def test_select_device_without_cuda_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(utils, "_warned_no_cuda", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert utils.select_device("0") == torch.device("cpu")
        assert utils.select_device("cuda:1") == torch.device("cpu")
        assert utils.select_device("cpu") == torch.device("cpu")
    assert len(caught) == 1 and "CUDA is not available" in str(caught[0].message)


def test_select_device_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"FakeGPU{i}")
    assert utils.select_device("1") == torch.device("cuda", 1)
    assert utils.select_device("cuda:0") == torch.device("cuda", 0)
    assert utils.select_device("cuda") == torch.device("cuda", 0)
    assert utils.select_device("1,0") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"no GPU 3; devices present: 0: FakeGPU0, 1: FakeGPU1"):
        utils.select_device("3")
    with pytest.raises(ValueError, match="--gpu 'gpu0' is not understood"):
        utils.select_device("gpu0")


def test_peak_memory_is_none_off_cuda():
    utils.reset_peak_memory(torch.device("cpu"))  # a no-op, not an error
    assert utils.peak_memory_gb(torch.device("cpu")) is None
