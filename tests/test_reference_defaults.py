"""Faithful by default (issue 16): the original README's Quick Start, run at a tiny size, is the reference code's
regime (one optimiser step per epoch on the epoch's selection, float32, full decoding, its score formula, its
TensorBoard tags); under --promptmode none the two decoders stay identical; every new setting reads, in an older
run folder that lacks it, as the value that reproduces that run; --keep_best all keeps every improving checkpoint.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

import datasets_skin as ds
import epoch_steps
import settings
import trainer
import val
from distributed import Ranks
from run_folder import ResumeState, RunFolder, SettingsDiffer
from sam_lora_image_encoder_prompt import build_model_from_settings

# The Quick Start of the user's README (batch 4, pool 10, one class), at the tiny model and size, two epochs;
# --promptmode 0 as the reference's own default writes it; no best checkpoint (--save_from_epoch past the end).
EPOCHS = 2
QUICK_START = ["--gpu", "0", "--batch_size", "4", "--pool_size", "10", "--img_size", "64", "--num_classes", "1",
               "--max_epochs", str(EPOCHS), "--model_cfg", "sam2.1_hiera_t", "--checkpoint", "none",
               "--save_from_epoch", str(EPOCHS + 1), "--promptmode", "0"]
REFERENCE_TAG_PARTS = {"train/loss_avg": "loss", "train/loss_dec1": "loss_dec1", "train/loss_dec2": "loss_dec2",
                       "train/loss_ce_dec1": "ce_dec1", "train/loss_dice_dec1": "dice_dec1",
                       "train/loss_ce_dec2": "ce_dec2", "train/loss_dice_dec2": "dice_dec2"}


@pytest.fixture(scope="module")
def quick_start(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("quick_start")
    result = trainer.main(["--data_root", str(synthetic_root), "--output", str(out)] + QUICK_START)
    return result, RunFolder(result["run_dir"])


def test_the_quick_start_records_the_reference_regime(quick_start):
    _, folder = quick_start
    config = folder.read_config()
    want = dict(train_on="selected", precision="float32", decode="full", score_channels="all", promptmode="none",
                no_mem_embed="trainable", lora_width="input", val_protocol="isic", strategy="mask_difference")
    assert {k: config.get(k) for k in want} == want


def test_the_quick_start_takes_one_optimiser_step_per_epoch(quick_start, tensorboard, metrics_rows):
    """AdamW's step count after two epochs is 2 for every tensor it updated (no_mem_embed among them, as in the
    reference); the reference's per-batch tags hold one value per epoch, at the 0-based epoch, equal to that
    epoch's loss parts."""
    result, folder = quick_start
    state = folder.load_state()
    steps = {float(per["step"]) for per in state.optimizer["state"].values()}
    assert steps == {float(EPOCHS)} and len(state.optimizer["state"]) > len(state.trainable) / 2
    updated = {name for i, name in enumerate(state.trainable) if i in state.optimizer["state"]}  # parameter order
    assert "sam.no_mem_embed" in updated and any(".lora_b_v" in name for name in updated)
    scalars = tensorboard(result["run_dir"] / "log" / "reference")["scalars"]
    assert set(scalars) == set(REFERENCE_TAG_PARTS)
    rows = metrics_rows(result["run_dir"])
    for tag, part in REFERENCE_TAG_PARTS.items():
        assert [step for step, _ in scalars[tag]] == list(range(EPOCHS)), tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[part] for r in rows], rel=1e-6), tag
    ours = tensorboard(result["run_dir"] / "log")["scalars"]
    assert [step for step, _ in ours["train/loss_dec1"]] == list(range(1, EPOCHS + 1)), "ours stay per 1-based epoch"


def test_under_promptmode_none_both_decoders_stay_identical(quick_start, tensorboard, metrics_rows):
    """Decoder 2 starts as a copy of decoder 1; with no prompts both see the same inputs and the same loss, so they
    stay equal through training, and the loss (their mean) equals each decoder's loss."""
    result, folder = quick_start
    trainable = folder.load_state().trainable
    first = {k[len("sam.sam_mask_decoder."):]: v for k, v in trainable.items() if k.startswith("sam.sam_mask_decoder.")}
    second = {k[len("sam.sam_mask_decoder2."):]: v for k, v in trainable.items()
              if k.startswith("sam.sam_mask_decoder2.")}
    assert first and sorted(first) == sorted(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    start = build_model_from_settings({**settings.LEGACY, **folder.read_config()}).state_dict()
    assert any(not torch.equal(first[k], start["sam.sam_mask_decoder." + k]) for k in first), "training moved them"
    for row in metrics_rows(result["run_dir"]):
        assert row["loss"] == row["loss_dec1"] == row["loss_dec2"]
        assert row["ce_dec1"] == row["ce_dec2"] and row["dice_dec1"] == row["dice_dec2"]


def test_the_reference_s_integer_promptmode():
    parser = settings.build_parser()
    assert parser.parse_args(["--promptmode", "0"]).promptmode == "none"
    with pytest.raises(SystemExit):
        parser.parse_args(["--promptmode", "1"])


def test_the_reference_protocol_validates_the_first_20_by_name(tmp_path):
    parser = settings.build_parser()

    def prepared(*flags):
        argv = ["--demo", "--output", str(tmp_path), *flags]
        return settings.prepare_args(parser, parser.parse_args(argv), argv)

    assert prepared("--val_protocol", "reference").val_limit == 20
    assert prepared("--val_protocol", "reference", "--val_limit", "5").val_limit == 5
    assert prepared().val_limit is None


def test_a_run_folder_without_the_new_settings_resumes_as_it_was_made(tmp_path):
    """An older last_state.pth records none of this issue's settings: it continues with their LEGACY values (how it
    was made), and a run with today's defaults is refused, naming each of them."""
    keys = settings.resume_keys("mask_difference")
    assert {"train_on", "precision", "decode", "score_channels", "no_mem_embed", "val_protocol"} <= set(keys)
    new = ("no_mem_embed", "val_protocol", "precision", "decode", "score_channels", "lora_width")
    parser = settings.build_parser()
    now = vars(parser.parse_args([]))
    made = {k: now[k] for k in keys if k not in new} | {"train_on": "labeled"}
    folder = RunFolder(tmp_path / "Skin_512")
    folder.path.mkdir()
    folder.save_state(ResumeState(1, made, {}, {}, {}, ["a"], -1.0, ""))
    folder.write_config(made)  # the records of epoch 1, complete
    folder.append_selection([[1, "a", "0.5", 1, "mask_difference", "", "", "", "", ""]])
    folder.write_metrics_row(dict(epoch=1, labeled=1))
    as_made = dict(now, train_on="labeled", **{k: settings.LEGACY[k] for k in new})
    assert folder.open_for_run(as_made, keys, settings.LEGACY, True)[1].epoch == 1
    with pytest.raises(SettingsDiffer) as differ:
        folder.open_for_run(dict(now, train_on="labeled"), keys, settings.LEGACY, True)
    assert sorted(k for k, _, _ in differ.value.changes) == sorted(k for k in new if settings.LEGACY[k] != now[k])
    assert len(differ.value.changes) == 5  # all but val_protocol, whose default is how older runs validated
    assert settings.LEGACY["keep_best"] == "newest", "compare_strategies reads an older config.txt with it"


class FixedLogits(torch.nn.Module):
    """Decoder-1 logits that depend only on the image (its mean), at a quarter of its size."""

    def predict_logits(self, images, decoder_idx=1):
        fg = images.mean(dim=1, keepdim=True)[:, :, ::4, ::4] * 3
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


@pytest.mark.parametrize("protocol", ["isic", "reference"])
def test_val_protocol_chooses_the_validation(synthetic_root, protocol):
    images, masks = ds.find_split(synthetic_root, "Validation")
    subset = torch.utils.data.Subset(ds.ValSkinDataset(images, masks, 64), range(3))
    run = types.SimpleNamespace(
        args=types.SimpleNamespace(val_protocol=protocol, batch_size=2, num_workers=0, num_classes=1),
        val_set=subset, device=torch.device("cpu"), truths=val.GroundTruthCache(), model=FixedLogits(),
        autocast=lambda: torch.autocast("cpu", enabled=False), writer=types.SimpleNamespace(add_image=lambda *a: None),
        ranks=Ranks())
    got = epoch_steps.validate_epoch(run, 1)
    loader = torch.utils.data.DataLoader(subset, batch_size=2, collate_fn=ds.collate_val)
    predict = torch.no_grad()(FixedLogits().predict_logits)
    if protocol == "reference":
        want = val.validate_reference(predict, loader, 1, "cpu")["mean"]
    else:
        want = val.validate(predict, loader, 1, "cpu")["mean"]
    assert got == pytest.approx(want) and set(got) == set(want)
    assert set(got) == ({"dice", "hd95"} if protocol == "reference" else set(val.METRIC_NAMES))


# ----------------------------------------------------------------------------- --keep_best


def fake_run(run_dir: Path, keep_best: str) -> types.SimpleNamespace:
    """What save_checkpoints and restore use of a Run, with a one-weight model."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    return types.SimpleNamespace(
        args=types.SimpleNamespace(save_from_epoch=1, val_every=1, keep_best=keep_best, base_lr=1e-3, batch_size=1,
                                   oracle="ground_truth", annotation_cost="pixels", click_mask_input=False),
        model=model,
        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), folder=RunFolder(run_dir),
        run_dir=run_dir, resume_keys=("batch_size",), labeled_names=[], best_dice=-1.0, best_path=None,
        oracle=types.SimpleNamespace(mask_sources={}))


@pytest.mark.parametrize("keep_best", ["newest", "all"])
def test_keep_best_all_keeps_every_improving_checkpoint(tmp_path, keep_best):
    run = fake_run(tmp_path, keep_best)
    for epoch, dice in enumerate((0.5, 0.4, 0.6, 0.7), start=1):
        epoch_steps.save_checkpoints(run, epoch, {"dice": dice})
    names = [p.name for p in RunFolder(tmp_path).best_checkpoints()]
    improving = ["best_model_dice0.5000.pth", "best_model_dice0.6000.pth", "best_model_dice0.7000.pth"]
    assert names == (improving if keep_best == "all" else improving[-1:])
    # a resume drops the best checkpoint an unfinished epoch wrote, and keeps the earlier ones
    (tmp_path / "best_model_dice0.8000.pth").write_bytes(b"written by an epoch that did not finish")
    RunFolder(tmp_path).reopen(RunFolder(tmp_path).load_state(), "resumed", keep_earlier_bests=keep_best == "all")
    assert [p.name for p in RunFolder(tmp_path).best_checkpoints()] == names
