"""utils: Dice/CE loss against independent numpy formulas, ignore label, seeding, device selection."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

import utils


def reference_dice_loss(logits: np.ndarray, target: np.ndarray, weight=None) -> float:
    """The reference implementation's DiceLoss_Mask, transcribed. For each channel c of the softmax
    (background included), with m = the pixels whose label is not 255 and t_c = (label == c):

        loss_c = 1 - (2 * sum(p_c * t_c * m) + 1e-5) / (sum(p_c * m) + sum(t_c * m) + 1e-5)

    summed over the whole batch; the loss is sum_c(w_c * loss_c) / (number of channels), w_c = 1
    without class weights (the weighted sum is divided by the channel count, not by sum(w))."""
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)  # B x C x H x W
    m = (target != 255).astype(np.float64)
    channels = logits.shape[1]
    w = np.ones(channels) if weight is None else np.asarray(weight, dtype=np.float64)
    total = 0.0
    for c in range(channels):
        p, t = probs[:, c], (target == c).astype(np.float64)
        total += w[c] * (1 - (2 * (p * t * m).sum() + 1e-5) / ((p * m).sum() + (t * m).sum() + 1e-5))
    return float(total / channels)


def numpy_cross_entropy(logits: np.ndarray, target: np.ndarray) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    b, h, w = np.nonzero(target != 255)
    return float(-log_probs[b, target[b, h, w], h, w].mean())


def random_case(channels: int, seed: int):
    """B x C x H x W float64 logits and B x H x W labels in [0, C) with 255-ignored pixels."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, channels, 12, 10, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, channels, (3, 12, 10), generator=gen)
    target[0, :4] = 255  # ignored band
    target[torch.rand(target.shape, generator=gen) < 0.1] = 255  # scattered ignored pixels
    return logits, target


@pytest.mark.parametrize("channels", [2, 4])  # 1 and 3 foreground classes (+ background)
def test_loss_matches_reference_formulas(channels):
    logits, target = random_case(channels, seed=channels)
    total, ce, dice = utils.segmentation_loss(logits, target)
    ref_dice = reference_dice_loss(logits.numpy(), target.numpy())
    ref_ce = numpy_cross_entropy(logits.numpy(), target.numpy())
    assert dice.item() == pytest.approx(ref_dice, rel=1e-9)
    assert ce.item() == pytest.approx(ref_ce, rel=1e-9)
    assert total.item() == pytest.approx(0.2 * ref_ce + 0.8 * ref_dice, rel=1e-9)
    total_half, _, _ = utils.segmentation_loss(logits, target, dice_weight=0.5)
    assert total_half.item() == pytest.approx(0.5 * ref_ce + 0.5 * ref_dice, rel=1e-9)


@pytest.mark.parametrize("channels", [2, 4])
def test_weighted_dice_divides_by_the_channel_count(channels):
    logits, target = random_case(channels, seed=10 + channels)
    weight = torch.linspace(0.5, 2.0, channels, dtype=torch.float64)
    ours = utils.DiceLoss_Mask(channels)(logits, target, weight=weight).item()
    assert ours == pytest.approx(reference_dice_loss(logits.numpy(), target.numpy(), weight.numpy()), rel=1e-9)
    # softmax=False takes probabilities as they are
    probs = logits.softmax(dim=1)
    assert utils.DiceLoss_Mask(channels)(probs, target, softmax=False).item() == pytest.approx(
        reference_dice_loss(logits.numpy(), target.numpy()), rel=1e-9)
    with pytest.raises(ValueError, match="one weight per channel"):
        utils.DiceLoss_Mask(channels)(logits, target, weight=torch.ones(channels + 1))


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
    # Uniform logits: p = 0.5 everywhere; weight [0, 1] keeps only the lesion class (|T| = 2*6*9, N = 512
    # pixels): sum p = 256, and the weighted sum is divided by the 2 channels.
    lesion_only = loss(torch.zeros(2, 2, 16, 16), target, weight=torch.tensor([0.0, 1.0]))
    assert lesion_only.item() == pytest.approx((1 - (2 * 0.5 * 108) / (0.5 * 512 + 108)) / 2, rel=1e-4)


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
    with pytest.raises(utils.DeviceError, match=r"no GPU 3; devices present: 0: FakeGPU0, 1: FakeGPU1"):
        utils.select_device("3")
    with pytest.raises(utils.DeviceError, match="'gpu0' is not understood"):
        utils.select_device("gpu0")


def test_peak_memory_is_none_off_cuda():
    utils.reset_peak_memory(torch.device("cpu"))  # a no-op, not an error
    assert utils.peak_memory_gb(torch.device("cpu")) is None


def test_scoring_precision_is_the_reference_s_float16_with_float32_training(monkeypatch):
    """--precision float32 (the default): pool scoring on CUDA under float16 autocast, as the reference's
    torch.cuda.amp.autocast; mixed: the training autocast dtype (bf16 where supported). Never on the CPU."""
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    for bf16, mixed in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert utils.scoring_dtype(cuda, "float32") == torch.float16
        assert utils.scoring_dtype(cuda, "mixed") == mixed
    cpu = torch.device("cpu")
    assert utils.scoring_dtype(cpu, "float32") is None and utils.scoring_dtype(cpu, "mixed") is None
    with utils.autocast(cpu, dtype=torch.float16):  # float32 off CUDA, whatever dtype is asked for
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
