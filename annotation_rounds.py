"""Rounds of annotation by a person (the oracles of oracles.py other than the simulation): the files of a round,
the checks of the masks the person saves, and the round accepted at ``--resume`` (that epoch's selection again,
with its masks ready).

A round folder (the trainer writes ``OUTPUT/Skin_{S}/annotate/round_{NNN}/``) holds, per selected image:

    <image file>            a copy of the image (the dataset's own file is never touched)
    <name>_proposal.png     the current model's mask at the image's original size, 0/255: a head start to correct
    <name>_overlay.jpg      the proposal's outline over the image

and ``to_annotate.csv``: image, score, rank_in_pool, save_mask_as (where a mask made in any tool is saved: the
dataset's own ``Training_GroundTruth/<name>_segmentation.png``; ``label_studio.py import`` writes Label Studio's
masks into the round folder as ``<name>_segmentation.png`` instead, and adds who annotated and how long to the
CSV). At --resume a round's mask is taken from either place (both: an error naming both); where it was accepted
is recorded (``ResumeState.mask_sources``), and every later read of it, and its check at each --resume, uses that
file. Nothing here writes into the mask folder; ``hide_masks`` turns a dataset with ground truth into one to
annotate, for a simulated annotator (the tests, the picture in docs/rounds.md).
"""
from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy.ndimage import maximum_filter, minimum_filter

from datasets_skin import (GREY_MASK_MODES, MASK_SUFFIX, DatasetError, PathLike, SampleFiles, decode_image,
                           read_image_size, read_mask, turned_mask_hint)
from run_folder import LEAD_TIME, ResumeState, RunFolder, cost_value
from safe_io import WriteError, atomic_path, atomic_write_text, csv_text

ROUND_CSV = "to_annotate.csv"
WHY_SELECTED = "why_selected.png"  # the strategy's picture of why these images were chosen, when it made one
ROUND_COLUMNS = ["image", "score", "rank_in_pool", "save_mask_as"]
PROPOSAL_SUFFIX = "_proposal.png"
OVERLAY_SUFFIX = "_overlay.jpg"
OUTLINE_RGB = (0, 255, 255)  # cyan: visible on skin tones and on dark lesions


def round_dir(folder: RunFolder, epoch: int) -> Path:
    return folder.path / "annotate" / f"round_{epoch:03d}"


def round_mask_path(round_folder: PathLike, name: str) -> Path:
    """Where the mask of image ``name`` (its file name's stem) lies in a round folder (label_studio.py writes it)."""
    return Path(round_folder) / f"{name}{MASK_SUFFIX}"


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
    atomic_write_text(round_dir / ROUND_CSV, csv_text([ROUND_COLUMNS, *rows]))
    return round_dir / ROUND_CSV


def read_round(round_dir: PathLike) -> List[dict]:
    """The rows of a round's ``to_annotate.csv``."""
    with open(Path(round_dir) / ROUND_CSV, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the masks a person saved

@dataclass
class MaskReport:
    """What ``check_masks`` found: images whose mask file is absent, problems (one line naming the file each),
    notes on masks that are accepted (e.g. 0/1 masks), and where each mask found is (image name -> file)."""

    missing: List[SampleFiles] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    found: Dict[str, Path] = field(default_factory=dict)


def mask_problem(sample: SampleFiles, path: Optional[Path] = None) -> Tuple[Optional[str], Optional[str]]:
    """(problem, note) of the existing mask file ``path`` (default: the sample's own) of ``sample``: readable by
    its mode (``datasets_skin.read_mask``, the rule of every mask reader), the image's size, binary."""
    path = sample.mask_path if path is None else Path(path)
    try:
        height, width = read_image_size(path)
        content = read_mask(path)
    except DatasetError as err:
        return f"{path}: unreadable ({err})", None
    if (height, width) != tuple(sample.orig_size):
        return (f"{path}: {width}x{height} pixels, but its image {sample.image_path.name} is "
                f"{sample.orig_size[1]}x{sample.orig_size[0]} (W x H)"
                + turned_mask_hint(sample.image_path, sample.orig_size, (height, width))), None
    if content.kind == "0/255":
        return None, None
    if content.kind == "0/1":
        return None, f"{path}: a 0/1 mask, read as 0 = skin, 1 = lesion"
    levels = "grey levels" if content.mode in GREY_MASK_MODES else f"{content.mode} levels (largest channel)"
    return f"{path}: not binary ({levels} {content.shown_levels()}; expected 0 and 255, or 0 and 1)", None


def returned_mask(sample: SampleFiles, round_folder: Optional[Path]) -> Tuple[Optional[Path], Optional[str]]:
    """(the mask file a person saved for ``sample``, None if none; a problem): in ``round_folder`` (where
    label_studio.py import writes) or in the data set's mask folder (any other tool); a mask in both is a problem
    naming both. Without ``round_folder`` only the mask folder counts."""
    places = [sample.mask_path] if round_folder is None else [round_mask_path(round_folder, sample.name),
                                                               sample.mask_path]
    found = [path for path in places if path.is_file()]
    if len(found) > 1:
        return None, (f"{found[0]} and {found[1]}: two masks of {sample.image_path.name}, one in the round folder, "
                      "one in the mask folder; delete the one that is not the annotation")
    return (found[0] if found else None), None


def check_masks(samples: Iterable[SampleFiles], round_folder: Optional[Path] = None) -> MaskReport:
    """Check the mask file of every sample, where ``returned_mask`` finds it (absent ones are listed apart: they
    may be accepted as not yet done)."""
    report = MaskReport()
    for sample in samples:
        path, clash = returned_mask(sample, round_folder)
        problem, note = mask_problem(sample, path) if path is not None else (clash, None)
        if path is None and clash is None:
            report.missing.append(sample)
        elif problem is None:
            report.found[sample.name] = path
        report.problems += [problem] if problem else []
        report.notes += [note] if note else []
    return report


def accepted_mask_path(folder: RunFolder, sample: SampleFiles, mask_sources: Mapping[str, str]) -> Path:
    """Where the mask of a labeled image was accepted: the round folder ``mask_sources`` names (relative to the run
    folder), else (a mask folder's mask, or a run folder written before the record) the data set's mask folder."""
    source = mask_sources.get(sample.name)
    return sample.mask_path if source is None else round_mask_path(folder.path / source, sample.name)


def earlier_mask_problems(folder: RunFolder, state: ResumeState, samples: Sequence[SampleFiles]) -> List[str]:
    """Every image labeled before ``state`` and its accepted mask, checked again as at acceptance (present, the
    image's size, binary): one problem naming the file each."""
    index = {sample.name: i for i, sample in enumerate(samples)}
    image_dir, problems = samples[0].image_path.parent, []
    for name in state.labeled_names:
        if name not in index:
            problems.append(f"{image_dir}/{name}.*: an image labeled in an earlier round is gone")
            continue
        path = accepted_mask_path(folder, samples[index[name]], state.mask_sources)
        if not path.is_file():
            problems.append(f"{path}: the mask of an image labeled in an earlier round is gone (training needs it)")
            continue
        problem, _ = mask_problem(samples[index[name]], path)
        problems += [f"{problem} (a mask accepted in an earlier round, read again for training)"] if problem else []
    return problems


# ----------------------------------------------------------------------------- playing the annotator

def hide_masks(mask_dir: PathLike, answers_dir: PathLike) -> Path:
    """Move every ``*_segmentation.png`` of ``mask_dir`` to ``answers_dir`` (a dataset with ground truth becomes
    one to annotate, its answers kept aside); returns ``answers_dir``."""
    answers_dir = Path(answers_dir)
    answers_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(Path(mask_dir).glob(f"*{MASK_SUFFIX}")):
        shutil.move(str(path), answers_dir / path.name)
    return answers_dir


# ----------------------------------------------------------------------------- the oracles

@dataclass
class AcceptedRound:
    """A round whose masks passed the checks at --resume: its epoch, the images to label now (in selection
    order), the pool's scores, the picture of why they were chosen (3 x H x W in [0, 1]) if the round has one,
    the masks taken from the round folder (image name -> that folder, relative to the run folder), the strategy
    that selected it, and the seconds a person spent on each of its masks where the annotation tool said
    (``round_lead_times``)."""

    epoch: int
    chosen: List[int]
    scores: Dict[int, float]
    figure: Optional[np.ndarray] = None
    mask_sources: Dict[str, str] = field(default_factory=dict)
    strategy: str = ""  # the strategy that selected it ("": a marker written before it was recorded)
    lead_times: Dict[str, float] = field(default_factory=dict)


class RoundError(Exception):
    """A round cannot go on. ``reason``: "not_following" (the waiting round is not the epoch after the saved
    state), "needs_person_oracle" (a round waits, the run was not resumed with a person's oracle), "oracle_switch" (a
    person's run resumed as the simulation, or the other way round), "masks" (``problems``
    lists every failing file; ``partial_helps``: accepting the present masks would let it continue),
    "nothing_to_select" (every image has a mask) or "bad_existing_masks" (masks already in the mask folder)."""

    def __init__(self, reason: str, message: str, problems: Sequence[str] = (), partial_helps: bool = False):
        super().__init__(message)
        self.reason, self.problems, self.partial_helps = reason, list(problems), partial_helps


def make_mask_folder(sample: SampleFiles) -> None:
    """The dataset's mask folder, where the person saves the masks (``WriteError`` when it cannot be made)."""
    try:
        sample.mask_path.parent.mkdir(exist_ok=True)
    except OSError as err:
        raise WriteError(sample.mask_path.parent, err) from err


@dataclass
class RoundCheck:
    """What ``check_round`` found: problems (one line naming the file each), the images to label now (indices,
    selection order), their masks taken from the round folder (name -> the round folder relative to the run
    folder), notes, and whether accepting the present masks would help."""

    problems: List[str]
    chosen: List[int]
    mask_sources: Dict[str, str]
    notes: List[str]
    partial_helps: bool


def check_round(folder: RunFolder, waiting: dict, state: ResumeState, samples: Sequence[SampleFiles],
                accept_partial: bool) -> RoundCheck:
    """Check the round's images and masks (each in the round folder or the mask folder, ``returned_mask``) and the
    earlier rounds' masks (``earlier_mask_problems``). Absent masks are problems unless ``accept_partial`` and one
    mask is there."""
    index = {sample.name: i for i, sample in enumerate(samples)}
    image_dir = samples[0].image_path.parent
    requested = [Path(f).stem for f in waiting["images"]]
    problems = [f"{image_dir / f}: the image of this round is gone" for f in waiting["images"]
                if Path(f).stem not in index]
    problems += earlier_mask_problems(folder, state, samples)
    report = check_masks((samples[index[n]] for n in requested if n in index), folder.path / waiting["round_dir"])
    problems += report.problems
    absent = {s.name for s in report.missing}
    present = [index[n] for n in requested if n in index and n not in absent]
    if absent and not (accept_partial and present):
        problems += [f"{s.mask_path}: missing (the mask of {s.image_path.name}); or save it as "
                     f"{round_mask_path(folder.path / waiting['round_dir'], s.name)}" for s in report.missing]
    notes = report.notes + ([f"{len(absent)} images of round {waiting['epoch']} have no mask and go back to the "
                             f"unlabeled pool: {', '.join(sorted(absent))}"] if absent else [])
    sources = {name: waiting["round_dir"] for name, path in report.found.items()
               if path != samples[index[name]].mask_path}
    return RoundCheck(problems, present, sources, notes, bool(absent) and not accept_partial)


def accept_round(folder: RunFolder, state: ResumeState, samples: Sequence[SampleFiles], folder_oracle: bool,
                 accept_partial: bool) -> Tuple[Optional[AcceptedRound], List[str]]:
    """A resumed run: check everything it needs before anything changes (a folder run: the masks of earlier
    rounds, read again; the waiting round's masks); the round as its epoch's selection (None: no round waits), and
    notes. Raises RoundError."""
    waiting, epoch = folder.read_awaiting(), state.epoch
    if waiting is None or waiting["epoch"] <= epoch:  # no round waits (the marker of a round trained on is stale)
        problems = earlier_mask_problems(folder, state, samples) if folder_oracle else []
        if problems:
            raise RoundError("masks", f"the run in {folder.path} cannot continue: masks of earlier rounds fail "
                             "their checks; nothing was changed", problems)
        return None, []
    where = f"round {waiting['epoch']} ({folder.path / waiting['round_dir']})"
    if waiting["epoch"] != epoch + 1:
        raise RoundError("not_following", f"{folder.file('awaiting_masks.json')} ({where}) does not follow "
                         f"{folder.file('last_state.pth')} (epoch {epoch}); nothing was changed")
    if not folder_oracle:
        raise RoundError("needs_person_oracle", f"{where} waits for masks ({folder.file('awaiting_masks.json')})")
    check = check_round(folder, waiting, state, samples, accept_partial)
    if check.problems:
        raise RoundError("masks", f"{where} cannot continue; nothing was changed", check.problems, check.partial_helps)
    index = {sample.name: i for i, sample in enumerate(samples)}
    scores = {index[n]: float(v) for n, v in waiting["pool_scores"].items() if n in index}
    picture = folder.path / waiting["round_dir"] / WHY_SELECTED
    figure = np.asarray(Image.open(picture).convert("RGB")) if picture.is_file() else None
    in_round = len(check.mask_sources)
    notes = check.notes + [f"round {waiting['epoch']}: {len(check.chosen)} masks accepted, {in_round} from the round "
                           f"folder, {len(check.chosen) - in_round} from {samples[0].mask_path.parent}"]
    return AcceptedRound(waiting["epoch"], check.chosen, scores, figure, check.mask_sources,
                         waiting.get("strategy", ""), round_lead_times(folder.path / waiting["round_dir"],
                                                                       check.mask_sources)), notes


def round_lead_times(round_folder: Path, from_round: Mapping[str, str]) -> Dict[str, float]:
    """image name -> the lead_time_s that ``label_studio.py import`` wrote into the round's to_annotate.csv (the
    seconds Label Studio recorded for its annotation), for the masks accepted from the round folder (``from_round``,
    where that import writes them; a mask saved in the mask folder came from elsewhere). Empty where the CSV has no
    such column or cell, or the cell is no number >= 0."""
    try:
        rows = read_round(round_folder)
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    found = {}
    for row in rows:
        name = Path(row.get("image") or "").stem
        try:
            seconds = cost_value(LEAD_TIME, row.get(LEAD_TIME) or "")  # None when empty
        except ValueError:
            continue
        if name in from_round and seconds is not None:
            found[name] = seconds
    return found


def label_existing_masks(samples: Sequence[SampleFiles]) -> Tuple[List[int], List[str]]:
    """A new folder run: the images that already have a mask (checked as a round's) are the initial labeled set;
    the others are the pool, which must not be empty. (Their indices, notes to log.) Raises RoundError."""
    report = check_masks(samples)
    image_dir, mask_dir = samples[0].image_path.parent, samples[0].mask_path.parent
    if report.problems:
        raise RoundError("bad_existing_masks", f"masks in {mask_dir} that cannot be used", report.problems)
    if not report.missing:
        raise RoundError("nothing_to_select", f"every image in {image_dir} already has a mask in {mask_dir}, so "
                         "there is nothing to select for annotation")
    unlabeled = {s.name for s in report.missing}
    labeled = [i for i, sample in enumerate(samples) if sample.name not in unlabeled]
    return labeled, report.notes + [f"--oracle folder: {len(labeled)} images already have a mask (the initial "
                                    f"labeled set), {len(unlabeled)} are to be annotated"]


def round_instructions(round_folder: Path, epoch: int) -> List[str]:
    """What the person is told when a round is written: where the files are and where each mask goes."""
    rows = read_round(round_folder)
    lines = [f"round {epoch} waits for {len(rows)} masks. Images, the model's proposals (*{PROPOSAL_SUFFIX}) and "
             f"overlays: {round_folder}",
             "save each mask (a 0/255 PNG of the image's size; correct the proposal rather than draw from scratch) "
             f"as <name>{MASK_SUFFIX} in the round folder, or:"]
    return lines + [f"  {row['image']} -> {row['save_mask_as']}" for row in rows]


def masks_saved_early(samples: Sequence[SampleFiles], labeled_names: Sequence[str],
                      accepted: Optional[AcceptedRound]) -> List[str]:
    """A note on the masks already saved for images that no round has asked for (e.g. pool images annotated
    ahead): they are not read now, and are taken (checked as a round's) when a round selects their image."""
    if accepted is None:
        return []
    asked = set(labeled_names) | {samples[i].name for i in accepted.chosen}
    early = [s.mask_path.name for s in samples if s.name not in asked and s.mask_path.is_file()]
    return [f"{len(early)} masks are saved for images no round has selected yet; they are not used until a round "
            f"selects their image: {', '.join(early)}"] if early else []
