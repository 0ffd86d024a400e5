"""Issue 9, nothing silently wrong: a diverged run stops where it diverges and saves nothing non-finite; --resume may
then lower --base_lr; a step the fp16 gradient scaler skips is not divergence; 0/1 masks, masks with other values
and empty masks are each said once per run. (Kills, dead runs and damaged files: test_trainer_e2e.py.)"""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import epoch_steps
import settings
import trainer
from distributed import Ranks
from run_folder import AWAITING, DIVERGED, RunFolder
from small_runs import refused
from synthetic_isic import make_synthetic_isic

SMALL = ["--demo", "--gpu", "cpu", "--img_size", "64", "--batch_size", "2", "--pool_size", "2", "--val_limit", "1",
         "--strategy", "random", "--save_from_epoch", "1"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return make_synthetic_isic(tmp_path_factory.mktemp("small"), n_train=6, n_val=2, size=64, seed=5)


def all_tensors_finite(path: Path) -> bool:
    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)

    return all(bool(torch.isfinite(t).all()) for t in tensors(torch.load(path, weights_only=True))
               if torch.is_floating_point(t))


def test_diverged_run_stops_in_its_epoch_and_keeps_the_last_good_checkpoints(small_data, tmp_path, capsys,
                                                                                 monkeypatch):
    """The issue's command (--base_lr 1e3): it used to save NaN weights as the best model and exit 0."""
    argv = SMALL + ["--data_root", str(small_data), "--output", str(tmp_path), "--max_epochs", "3",
                    "--base_lr", "1e3"]
    run_dir = tmp_path / "Skin_64"
    saved = {}
    save_checkpoints = trainer.save_checkpoints

    def remember_what_epoch_1_saved(run, epoch, *args):
        save_checkpoints(run, epoch, *args)
        saved.update({p.name: p.read_bytes() for p in run_dir.glob("*.pth")})

    monkeypatch.setattr(trainer, "save_checkpoints", remember_what_epoch_1_saved)
    err = refused(argv, capsys)
    assert "training diverged in epoch 2" in err and "lower --base_lr" in err
    assert len(saved) == 2 and "last_state.pth" in saved, "epoch 1 saved its best and its state"
    assert {p.name: p.read_bytes() for p in run_dir.glob("*.pth")} == saved, "epoch 1's checkpoints were touched"
    assert all(all_tensors_finite(p) for p in run_dir.glob("*.pth")), "a checkpoint holds NaN or inf"
    record = json.loads((run_dir / DIVERGED).read_text())
    assert record["epoch"] == 2 and record["base_lr"] == 1e3
    # --base_lr may change now (other settings may not)
    err = refused(argv + ["--resume", "--pool_size", "3", "--base_lr", "1e-3"], capsys)
    assert "--pool_size was 2, now 3" in err and "base_lr" not in err


def test_resume_after_divergence_may_lower_base_lr_and_uses_it(small_data, tmp_path, capsys, monkeypatch):
    """A divergence in epoch 2 (a NaN loss, injected): --resume with a lower --base_lr continues from epoch 1's state
    with the new rate (logged, in the optimiser, in the next state); without a divergence it is refused."""
    argv = SMALL + ["--data_root", str(small_data), "--output", str(tmp_path), "--max_epochs", "2",
                    "--save_from_epoch", "10"]
    run_dir = tmp_path / "Skin_64"
    train_step = epoch_steps.train_step

    def nan_from_epoch_2(run, *args):
        parts = train_step(run, *args)
        if len(run.labeled_names) > 2:
            parts["loss"] = torch.tensor(float("nan"))
        return parts

    monkeypatch.setattr(epoch_steps, "train_step", nan_from_epoch_2)
    err = refused(argv, capsys)
    assert "training diverged in epoch 2 (training step 1): NaN or inf in loss" in err
    monkeypatch.setattr(epoch_steps, "train_step", train_step)

    result = trainer.main(argv + ["--resume", "--base_lr", "5e-4"])
    assert result["epochs"] == 2
    assert "--base_lr is now 0.0005 (it was 0.001" in (run_dir / "log.txt").read_text()
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert state["epoch"] == 2 and state["args"]["base_lr"] == 5e-4
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {5e-4}
    assert not (run_dir / DIVERGED).exists(), "the record goes with the next finished epoch"
    err = refused(argv + ["--resume", "--max_epochs", "3", "--base_lr", "1e-4"], capsys)
    assert "--base_lr was 0.0005, now 0.0001" in err


class _Tiny(torch.nn.Module):
    """Stands in for LoRA_Sam in train_step: both decoders' logits from one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, images, *args):
        logits = self.w * images[:, :2, ::4, ::4]
        return {"low_res_logits1": logits, "low_res_logits2": logits}


def test_step_skipped_by_the_fp16_gradient_scaler_is_not_divergence(tmp_path):
    """With loss scaling, inf gradients make the scaler skip the step and lower its scale: normal, the weights stay
    finite and training goes on. A non-finite loss is divergence: recorded, and the run stops naming the epoch."""
    model = _Tiny()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = types.SimpleNamespace(promptmode="none", num_classes=1, img_size=16, dice_weight=0.8, base_lr=1e-3)
    run = types.SimpleNamespace(
        args=args, device=torch.device("cpu"), model=model, optimizer=optimizer, folder=RunFolder(tmp_path),
        autocast=lambda: torch.autocast("cpu", enabled=False), ranks=Ranks(), parallel=None,
        scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))  # so large that the scaled gradients overflow
    batch = dict(image=1e3 * torch.randn(2, 3, 16, 16), label=(torch.rand(2, 16, 16) > 0.5).long(),
                 index=torch.arange(2))
    parts = epoch_steps.train_step(run, 1, batch, np.random.default_rng(0))
    assert run.scaler.get_scale() == 2.0 ** 126, "the scaler saw inf gradients, skipped the step, lowered its scale"
    assert float(model.w.detach()) == 1.0 and bool(torch.isfinite(parts["loss"]))
    epoch_steps.check_finite(run, 1, "training step 1", {"loss": parts["loss"], "w": model.w})  # no stop
    assert not (tmp_path / DIVERGED).exists()
    with pytest.raises(epoch_steps.RunStopped) as stop:
        epoch_steps.check_finite(run, 3, "training step 1", {"loss": torch.tensor(float("inf")), "w": model.w})
    message = str(trainer.stopped(args, stop.value))
    assert re.search(r"diverged in epoch 3 .*lower --base_lr \(e\.g\. 0\.0001\)", message), message
    assert json.loads((tmp_path / DIVERGED).read_text())["tensors"] == ["loss"]


def test_mask_kinds_are_each_logged_once_per_run(tmp_path):
    """0/1 training masks are read as 0/1 (one line for the run), a {0, 128, 255} validation mask gets one warning
    naming it, the empty ones are counted. (That unlabeled masks are never decoded: test_datasets_skin.py.)"""
    data = make_synthetic_isic(tmp_path / "data", n_train=4, n_val=3, size=64, seed=2)
    for path in (data / "Training_GroundTruth").iterdir():
        Image.fromarray((np.asarray(Image.open(path)) > 127).astype(np.uint8)).save(path)
    val_masks = sorted((data / "Validation_GroundTruth").iterdir())
    grey = np.asarray(Image.open(val_masks[0])).copy()
    grey[0, :5] = 128
    Image.fromarray(grey).save(val_masks[0])
    for path in val_masks[1:]:
        Image.fromarray(np.zeros_like(np.asarray(Image.open(path)))).save(path)
    result = trainer.main(SMALL + ["--data_root", str(data), "--output", str(tmp_path / "out"), "--max_epochs", "1",
                                   "--val_limit", "3", "--save_from_epoch", "10"])
    assert len(result["labeled"]) == 2
    log = (result["run_dir"] / "log.txt").read_text()
    assert log.count("are read as 0 = skin, 1 = lesion") == 1
    assert log.count("holds values other than 0 and 255") == 1 and val_masks[0].name in log
    assert log.count("of the masks read so far are empty") == 1 and "2 of the masks read so far are empty" in log


def test_run_that_diverged_in_epoch_1_may_be_rerun_with_a_lower_base_lr(tmp_path):
    """A run that diverged in epoch 1 left no last_state.pth (a dead run): a rerun may lower --base_lr while
    diverged.json says why it stopped; other settings, or --base_lr without that record, are refused."""
    parser = settings.build_parser()

    def args_of(*argv):
        argv = ["--demo", "--output", str(tmp_path), *argv]
        return settings.prepare_args(parser, parser.parse_args(argv), argv)

    def dead_run(args, run_dir):
        return trainer.open_run_folder(args, RunFolder(run_dir), settings.resume_keys(args.strategy))[0]

    run_dir = tmp_path / "Skin_128"
    run_dir.mkdir()
    first = args_of("--base_lr", "1e3")
    (run_dir / "config.txt").write_text("".join(f"{k}: {v}\n" for k, v in sorted(vars(first).items())))
    (run_dir / "al_selection.csv").write_text("epoch,image,score,rank_in_pool\n1,ISIC_0000001,0.5,1\n")
    assert dead_run(first, run_dir)
    with pytest.raises(settings.UsageError, match=r"other settings \(--base_lr was 1000.0, now 0.001\)"):
        dead_run(args_of("--base_lr", "1e-3"), run_dir)
    (run_dir / DIVERGED).write_text('{"epoch": 1}\n')
    assert dead_run(args_of("--base_lr", "1e-3"), run_dir)
    with pytest.raises(settings.UsageError, match=r"--pool_size was 6, now 8"):
        dead_run(args_of("--base_lr", "1e-3", "--pool_size", "8"), run_dir)
    (run_dir / AWAITING).write_text("{}\n")
    with pytest.raises(settings.UsageError, match="already holds a run"):  # a round waiting for masks: live
        dead_run(first, run_dir)
