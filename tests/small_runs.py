"""The small trainer runs the run-folder tests share, and how such a run is refused: hiera_t at 64 px with seeded random weights, on 6 synthetic
training and 2 validation images, two images selected from a pool of two each epoch."""
from __future__ import annotations

from pathlib import Path

import pytest

import trainer
from synthetic_isic import make_synthetic_isic

SMALL = ["--gpu", "cpu", "--img_size", "64", "--model_cfg", "sam2.1_hiera_t", "--checkpoint", "none",
         "--batch_size", "2", "--pool_size", "2", "--val_limit", "1", "--strategy", "random"]


def small_data(tmp_path_factory, name: str) -> Path:
    """6 training / 2 validation images, 64 px wide, in a new temporary folder ``name``. Read-only for the tests
    that share it (a test that changes it copies it)."""
    return make_synthetic_isic(tmp_path_factory.mktemp(name) / "data", 6, 2, 0, size=64, seed=5)


def small_argv(data: Path, out: Path, *extra: str, save_from_epoch: int) -> list:
    """trainer.py's flags of a small run on ``data`` into ``out``; best checkpoints from ``save_from_epoch`` on
    (past the run's end: none written)."""
    return SMALL + ["--save_from_epoch", str(save_from_epoch), "--data_root", str(data), "--output", str(out), *extra]


def refused(argv: list, capsys, code: int = 2) -> str:
    """The one line a trainer run that stops with exit code ``code`` ends with (after the progress bars); no
    traceback."""
    with pytest.raises(SystemExit) as stop:
        trainer.main(argv)
    assert stop.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]
