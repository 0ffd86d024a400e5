"""Render docs/proposal_overlay.jpg, the picture of a proposal in docs/rounds.md, with the trainer's own --oracle
folder path.

Synthetic ISIC-style data; its training masks are hidden and played back as the annotator's answers after each
round, as a person would save them. The picture is the overlay the trainer itself wrote in the last round, for
the image of that round whose proposal is closest to its true mask (no SAM2 checkpoint is needed: without one the
model starts from seeded random weights, so its proposals come only from the rounds before). Runs on the CPU in a
few minutes:

    python3 docs/make_proposal_overlay.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import annotation_rounds  # noqa: E402
import trainer  # noqa: E402
from synthetic_isic import make_synthetic_isic  # noqa: E402

TARGET = REPO / "docs" / "proposal_overlay.jpg"


def proposal_dice(round_dir: Path, answers: Path, name: str) -> float:
    proposal = np.asarray(Image.open(round_dir / f"{name}{annotation_rounds.PROPOSAL_SUFFIX}")) > 0
    truth = np.asarray(Image.open(answers / f"{name}_segmentation.png")) > 0
    return 2 * (proposal & truth).sum() / max(1, proposal.sum() + truth.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="the picture is from this round")
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        data = make_synthetic_isic(Path(tmp) / "data", n_train=40, n_val=4, size=256, seed=11)
        answers = annotation_rounds.hide_masks(data / "Training_GroundTruth", Path(tmp) / "answers")
        argv = ["--demo", "--gpu", "cpu", "--oracle", "folder", "--data_root", str(data), "--output",
                str(Path(tmp) / "out"), "--batch_size", "4", "--pool_size", "8", "--max_epochs", str(rounds)]
        result = trainer.main(argv)
        while result["epochs"] < rounds - 1:  # the annotator saves the requested masks, then resumes
            for name in result["requested"]:
                shutil.copy(answers / f"{name}_segmentation.png", data / "Training_GroundTruth")
            result = trainer.main(argv + ["--resume"])
        shown = max(result["requested"], key=lambda name: proposal_dice(result["round_dir"], answers, name))
        shutil.copy(result["round_dir"] / f"{shown}{annotation_rounds.OVERLAY_SUFFIX}", TARGET)
    print(f"wrote {TARGET} (round {rounds}, image {shown}, the round's proposal closest to its true mask)")


if __name__ == "__main__":
    main()
