"""Copies of run folders for tests to change (a run folder is ~370 MB even at 64 px: its checkpoints)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def _link_or_copy(src: str, dst: str) -> None:
    """Checkpoints are hard-linked: the program only ever replaces them (atomically), so the original is never
    changed. The rest is copied: logs and CSV files are appended to."""
    (os.link if src.endswith(".pth") else shutil.copy2)(src, dst)


def copy_runs(src: Path, dst: Path, ignore=None) -> Path:
    """``shutil.copytree(src, dst)`` with every ``*.pth`` hard-linked; returns dst."""
    return Path(shutil.copytree(src, dst, ignore=ignore, copy_function=_link_or_copy))


def copy_run(run_dir: Path, where: Path) -> Path:
    """A copy of the run folder ``run_dir`` (its output folder copied to ``where / "out"``, checkpoints
    hard-linked); returns the copy's run folder."""
    return copy_runs(run_dir.parent, where / "out") / run_dir.name
