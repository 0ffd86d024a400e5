"""Method fidelity with the training loop (issue 8): both decoders train all their class heads and
their own high-resolution projections; the seed README's notebook snippet works verbatim."""
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import settings
import trainer
import utils
import val
from sam_lora_image_encoder_prompt import build_model
from synthetic_isic import make_synthetic_isic

SIZE = 128
DECODERS = ("sam.sam_mask_decoder.", "sam.sam_mask_decoder2.")


def why_no_gradient(name: str, num_classes: int):
    """The reason a decoder parameter (name without the decoder prefix) gets no gradient from the
    training loss, or None when it must get one:

    * ``iou_prediction_head.*``: the IoU predictions are not part of the loss (CE + Dice on the
      class logits only);
    * ``pred_obj_score_head.*``: neither is the object score;
    * ``output_hypernetworks_mlps.k.*`` for k >= num_classes: mask token k is no class channel
      (class c is token c-1), so its mask never becomes a logit the loss sees.

    Everything else must: the tokens themselves (``iou_token``, ``obj_score_token``, every row of
    ``mask_tokens``) attend to the class tokens in the two-way transformer, and conv_s0/conv_s1 are
    each decoder's own high-resolution projections.
    """
    if name.startswith("iou_prediction_head."):
        return "IoU predictions are not in the loss"
    if name.startswith("pred_obj_score_head."):
        return "object scores are not in the loss"
    match = re.match(r"output_hypernetworks_mlps\.(\d+)\.", name)
    if match and int(match.group(1)) >= num_classes:
        return f"token {match.group(1)} is no class channel for num_classes={num_classes}"
    return None


@pytest.mark.parametrize("promptmode, num_classes", [("none", 1), ("point", 1), ("none", 3)])
def test_one_training_step_reaches_every_trained_decoder_parameter(promptmode, num_classes):
    net = build_model("sam2.1_hiera_t", None, SIZE, num_classes=num_classes).train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, SIZE, SIZE, generator=gen)
    labels = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    for c in range(1, num_classes + 1):  # one rectangle per class, and a few ignored rows
        labels[:, 16 * c : 16 * c + 40, 20 * c : 20 * c + 36] = c
    labels[:, :4] = 255
    prompt_idx = -1 if promptmode == "none" else 0  # as epoch_steps.train_step maps --promptmode
    outputs = net(images, num_classes > 1, SIZE, prompt_idx, promptmode, generator=np.random.default_rng(0))
    utils.dual_decoder_loss(outputs, labels, dice_weight=0.8)["loss"].backward()

    for prefix in DECODERS:
        params = {n[len(prefix):]: p for n, p in net.named_parameters() if n.startswith(prefix)}
        assert params and all(p.requires_grad for p in params.values())
        without = {n for n, p in params.items() if p.grad is None or not p.grad.abs().max() > 0}
        expected = {n for n in params if why_no_gradient(n, num_classes)}
        assert without == expected, (
            f"{prefix}: no gradient where one is due: {sorted(without - expected)}; "
            f"a gradient where the loss cannot reach: {sorted(expected - without)}")
        assert {"conv_s0.weight", "conv_s0.bias", "conv_s1.weight", "conv_s1.bias"} <= set(params) - without
        assert any(n.startswith("iou_prediction_head.") for n in expected)  # the exception list is not vacuous


def test_seed_readme_snippet_verbatim_predicts_what_validation_predicted(tmp_path, monkeypatch):
    """A checkpoint from a short --img_size 128 run, loaded with the seed README's lines (model
    built without image_size, i.e. at the config's 1024; .cuda() left out) and called as the
    trainer calls the model, predicts what the trainer's validation predicted."""
    data = make_synthetic_isic(tmp_path / "data", n_train=4, n_val=2, n_test=0, size=160, seed=5)
    recorded = []  # (images, logits) of every validation batch, as the trainer computed them
    real_validate = val.validate

    def recording_validate(predict_fn, loader, *args, **kwargs):
        def predict(images):
            logits = predict_fn(images)
            recorded.append((images.detach().cpu().clone(), logits.detach().cpu().clone()))
            return logits

        return real_validate(predict, loader, *args, **kwargs)

    monkeypatch.setattr(val, "validate", recording_validate)
    result = trainer.main(["--demo", "--gpu", "cpu", "--img_size", str(SIZE), "--max_epochs", "1",
                           "--save_from_epoch", "1", "--batch_size", "2", "--pool_size", "2", "--val_limit", "2",
                           "--data_root", str(data), "--output", str(tmp_path / "run")])
    best = result["best_path"]
    assert best is not None and re.fullmatch(r"best_model_dice[\d.]+\.pth", best.name)
    assert len(recorded) == 1, "expected one recorded validation batch (2 images, batch size 2)"

    # ---- the seed README's notebook lines (model_cfg / ckpt: what the demo run used)
    from importlib import import_module

    from sam2.build_sam import build_sam2

    model_cfg = "sam2.1_hiera_t"
    ckpt = settings.DEMO_SETTINGS["checkpoint"]
    ckpt = None if ckpt == "none" else ckpt
    sam = build_sam2(model_cfg, ckpt)
    pkg = import_module("sam_lora_image_encoder_prompt")
    net = pkg.LoRA_Sam(sam, r=4)
    net.load_state_dict(torch.load(best))
    net.eval()
    # ---- called as the trainer calls the model
    assert net.sam.image_size == 1024
    images, validated = recorded[0]
    with torch.no_grad():
        out = net(images, True, SIZE, -1, "none")
    assert out["low_res_logits1"].shape == validated.shape
    assert (out["low_res_logits1"] - validated).abs().max().item() <= 1e-5
    assert out["masks1"].shape == (2, 2, SIZE, SIZE)
    with pytest.raises(ValueError, match="multiple of 32"):
        net(F.interpolate(images, size=(100, 100)), True, 100, -1, "none")
