"""Rounds of annotation by a person (the trainer's ``--oracle folder``): the files of a round, and the checks of
the masks the person saves.

A round folder (the trainer writes ``OUTPUT/Skin_{S}/annotate/round_{NNN}/``) holds, per selected image:

    <image file>            a copy of the image (the dataset's own file is never touched)
    <name>_proposal.png     the current model's mask at the image's original size, 0/255: a head start to correct
    <name>_overlay.jpg      the proposal's outline over the image

and ``to_annotate.csv``: image, score, rank_in_pool, save_mask_as (where the mask must be saved: the dataset's
own ``Training_GroundTruth/<name>_segmentation.png``). Nothing here writes into the mask folder; ``hide_masks``
turns a dataset with ground truth into one to annotate, for a simulated annotator (the tests, the README picture).
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter

from datasets_skin import (MASK_SUFFIX, DatasetError, PathLike, SampleFiles, decode_image, mask_kind, read_image_size,
                           to_grey)
from safe_io import atomic_path

ROUND_CSV = "to_annotate.csv"
ROUND_COLUMNS = ["image", "score", "rank_in_pool", "save_mask_as"]
PROPOSAL_SUFFIX = "_proposal.png"
OVERLAY_SUFFIX = "_overlay.jpg"
OUTLINE_RGB = (0, 255, 255)  # cyan: visible on skin tones and on dark lesions


@dataclass(frozen=True)
class RoundItem:
    """One selected image of a round: its files, its score, and the model's proposal (H x W bool, original size)."""

    sample: SampleFiles
    score: float
    rank_in_pool: int
    proposal: np.ndarray


def proposal_overlay(image: np.ndarray, proposal: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 image with the outline of the H x W ``proposal`` drawn in ``OUTLINE_RGB`` (2 px, or about
    1/300 of the longer side on large photos)."""
    mask = np.asarray(proposal, bool)
    edge = maximum_filter(mask, size=3) != minimum_filter(mask, size=3)
    thickness = max(mask.shape) // 300
    if thickness > 1:
        edge = maximum_filter(edge, size=thickness)
    out = np.array(image, np.uint8, copy=True)
    out[edge] = OUTLINE_RGB
    return out


def write_round(round_dir: PathLike, items: Sequence[RoundItem]) -> Path:
    """Write the round's files (each atomically) and its ``to_annotate.csv`` last; returns the CSV's path."""
    round_dir = Path(round_dir)
    for item in items:
        sample = item.sample
        with atomic_path(round_dir / sample.image_path.name) as tmp:
            shutil.copyfile(sample.image_path, tmp)
        with atomic_path(round_dir / f"{sample.name}{PROPOSAL_SUFFIX}") as tmp:
            Image.fromarray(np.asarray(item.proposal, np.uint8) * 255).save(tmp)
        overlay = proposal_overlay(decode_image(sample.image_path, None), item.proposal)
        with atomic_path(round_dir / f"{sample.name}{OVERLAY_SUFFIX}") as tmp:
            Image.fromarray(overlay).save(tmp, quality=90)
    rows = [[i.sample.image_path.name, f"{i.score:.6f}", i.rank_in_pool, str(i.sample.mask_path.resolve())]
            for i in items]
    with atomic_path(round_dir / ROUND_CSV) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([ROUND_COLUMNS, *rows])
    return round_dir / ROUND_CSV


def read_round(round_dir: PathLike) -> List[dict]:
    """The rows of a round's ``to_annotate.csv``."""
    with open(Path(round_dir) / ROUND_CSV, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the masks a person saved

@dataclass
class MaskReport:
    """What ``check_masks`` found: images whose mask file is absent, problems (one line naming the file each),
    and notes on masks that are accepted (e.g. 0/1 masks)."""

    missing: List[SampleFiles] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def mask_problem(sample: SampleFiles) -> Tuple[Optional[str], Optional[str]]:
    """(problem, note) of the existing mask file of ``sample``: readable, the image's size, binary."""
    path = sample.mask_path
    try:
        height, width = read_image_size(path)
        with Image.open(path) as im:
            levels = np.unique(np.asarray(to_grey(im)))
    except (DatasetError, OSError) as err:
        return f"{path}: unreadable ({err})", None
    if (height, width) != tuple(sample.orig_size):
        return (f"{path}: {width}x{height} pixels, but its image {sample.image_path.name} is "
                f"{sample.orig_size[1]}x{sample.orig_size[0]} (W x H)"), None
    kind = mask_kind(levels)
    if kind == "0/255":
        return None, None
    if kind == "0/1":
        return None, f"{path}: a 0/1 mask, read as 0 = skin, 1 = lesion"
    shown = ", ".join(str(v) for v in levels[:6]) + (", ..." if len(levels) > 6 else "")
    return f"{path}: not binary (grey levels {shown}; expected 0 and 255, or 0 and 1)", None


def check_masks(samples: Iterable[SampleFiles]) -> MaskReport:
    """Check the mask file of every sample (absent ones are listed apart: they may be accepted as not yet done)."""
    report = MaskReport()
    for sample in samples:
        if not sample.mask_path.is_file():
            report.missing.append(sample)
            continue
        problem, note = mask_problem(sample)
        if problem:
            report.problems.append(problem)
        if note:
            report.notes.append(note)
    return report


# ----------------------------------------------------------------------------- playing the annotator

def hide_masks(mask_dir: PathLike, answers_dir: PathLike) -> Path:
    """Move every ``*_segmentation.png`` of ``mask_dir`` to ``answers_dir`` (a dataset with ground truth becomes
    one to annotate, its answers kept aside); returns ``answers_dir``."""
    answers_dir = Path(answers_dir)
    answers_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(mask_dir).glob(f"*{MASK_SUFFIX}")):
        shutil.move(str(path), answers_dir / path.name)
    return answers_dir
