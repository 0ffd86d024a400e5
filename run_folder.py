"""The run folder: what one trainer run writes to ``OUTPUT/Skin_{img_size}/``, and the rules for reading it back.

    config.txt            every setting, ``key: value`` lines (``#`` lines: notes such as "resumed at epoch 3")
    al_selection.csv      epoch, image, score, rank_in_pool, strategy, then what correcting its proposal cost
                          (dice, changed_fraction, clicks_85, clicks_90: annotation_cost.COST_COLUMNS; lead_time_s
                          where the annotation tool gave it): one row per selected image (files written before the
                          strategy or the cost columns are read too, the missing cells empty)
    metrics.csv           one row per finished epoch: labeled count, loss parts, validation metrics, time split
    last_state.pth        the resume state at the end of the last finished epoch (``ResumeState``)
    last_model.pth        the full state_dict of the final model (when the run ends)
    best_model_dice*.pth  the full state_dict of the best validated epoch (of each improving one: --keep_best all)
    log.txt, log/         the log and the TensorBoard event files (log/reference/: the reference code's tags)
    pretrained_embeddings.pt  the embedding strategies' cache of the pretrained encoder's vectors (rebuilt when stale)
    awaiting_masks.json   only while a round waits for a person's masks (``--oracle folder``): a live run
    diverged.json         only after training diverged: the resume may change the learning rate
    images.json           the training and validation images the run uses: name -> bytes (a resume must find them)
    owner.lock            the lock of the process that owns the folder (``folder_lock``): one at a time

A process owns the folder before it reads it for a run (``open_for_run``) and until it ends (``release``).

Every file is written atomically (``safe_io``), so a killed run leaves the old file or the new one. A folder's
state follows from which files exist (``RunFolder.status``): the trainer and the comparison runner both ask here.
Problems are ``RunFolderError``s naming the file; the trainer adds the flags.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from annotation_cost import COST_COLUMNS, MAX_CLICKS, NOC_COLUMNS, NOT_REACHED, TOTAL_COLUMNS
from folder_lock import FolderLock, FolderLocked  # noqa: F401 - FolderLocked: open_for_run raises it
from safe_io import (CheckpointFileError, atomic_torch_save, atomic_write_text, csv_text, first_names,
                     load_torch_file, remove_stale_temps)

CONFIG = "config.txt"
SELECTION = "al_selection.csv"
METRICS = "metrics.csv"
STATE = "last_state.pth"
LAST_MODEL = "last_model.pth"
AWAITING = "awaiting_masks.json"
DIVERGED = "diverged.json"
IMAGES = "images.json"
LOG = "log.txt"
EVENTS = "log"
BEST_PATTERN = "best_model_dice*.pth"
LEAD_TIME = "lead_time_s"  # seconds a person spent on the image, where the annotation tool says (Label Studio)
SELECTION_HEADER = ["epoch", "image", "score", "rank_in_pool", "strategy", *COST_COLUMNS, LEAD_TIME]
COST_CELLS = SELECTION_HEADER[5:]  # the cells after the strategy: empty where not computed (or not given)
# Headers of older files: before the strategy column (every row is the run's --strategy), before the cost columns.
EARLIER_SELECTION_HEADERS = (SELECTION_HEADER[:4], SELECTION_HEADER[:5])
# What a run that died before finishing its first epoch may have written (log.txt stays: the log goes on).
DEAD_RUN_FILES = (CONFIG, SELECTION, METRICS, DIVERGED, IMAGES)
STATE_KEYS = ("epoch", "args", "trainable", "optimizer", "scaler", "labeled_names", "best_dice", "best_path")


class RunFolderError(Exception):
    """A file of the run folder cannot be used as it is; the message names it and says what to do."""


class FolderInUse(RunFolderError):
    """A new run was asked for in a folder that holds one (``existing``: the file that shows it)."""

    def __init__(self, folder: Path, existing: Path) -> None:
        super().__init__(f"{folder} already holds a run ({existing})")
        self.existing = existing


class SettingsDiffer(RunFolderError):
    """The folder's run was made with other settings: ``changes`` lists (key, recorded, now). ``dead``: that run
    stopped before its first epoch ended (rerunning it with its settings starts it afresh)."""

    def __init__(self, folder: Path, changes: List[Tuple[str, str, str]], dead: bool) -> None:
        what = "a run that stopped before finishing its first epoch" if dead else "a run"
        super().__init__(f"{folder} holds {what}, made with other settings")
        self.changes, self.dead = changes, dead


class LostState(RunFolderError):
    """The folder's records show finished epochs, but last_state.pth is gone (``kept``: what the run left): it can
    be neither continued nor started afresh without losing them."""

    def __init__(self, folder: Path, kept: Sequence[str]) -> None:
        super().__init__(f"{folder} holds a run whose records show a finished epoch ({', '.join(kept)}), but no "
                         f"{STATE} (deleted?), so it can be neither continued nor started afresh without losing "
                         "them; nothing was removed")
        self.kept = list(kept)


class DeadRunUnchecked(RunFolderError):
    """A run stopped before finishing its first epoch (nothing to continue), but its config.txt lacks ``missing``
    settings, so whether a command is that run's cannot be checked."""

    def __init__(self, folder: Path, missing: Sequence[str]) -> None:
        super().__init__(f"{folder} holds a run that stopped before finishing its first epoch (no {STATE}: nothing "
                         f"to continue), but its {CONFIG} lacks {first_names(list(missing))} (edited by hand?), so "
                         "whether this command is that run's cannot be checked; nothing was removed")
        self.missing = list(missing)


class DataChanged(RunFolderError):
    """The images differ from those images.json records: ``changes`` (a phrase per split and kind: added, removed,
    resized); ``only_added``: all of them are new training images (which a run may take into its unlabeled pool)."""

    def __init__(self, path: Path, changes: List[str], only_added: bool) -> None:
        super().__init__(f"the images are not those the run was made with ({path}): {'; '.join(changes)}")
        self.changes, self.only_added = changes, only_added


def run_dir_of(output: Path, img_size: int) -> Path:
    return Path(output) / f"Skin_{img_size}"


def best_checkpoint_name(dice: float) -> str:
    return f"best_model_dice{dice:.4f}.pth"


def checkpoint_dice(name: str) -> float:
    """The Dice in a best checkpoint's name (``best_checkpoint_name``); NaN for another name."""
    try:
        return float(name[len("best_model_dice"):-len(".pth")])
    except ValueError:
        return math.nan


# ----------------------------------------------------------------------------- the resume state

@dataclass
class ResumeState:
    """What ``--resume`` continues from: the state at the end of ``epoch``.

    settings: the run's settings a resume must repeat (settings.resume_keys), and those it may change that a resume
    logs when they do; trainable: the tensors training changes (LoRA, prompt encoder, decoders); optimizer /
    scaler: their state_dicts; labeled_names: the labeled images in labeling order; best_dice / best_path: the best
    validated checkpoint so far, its file name in the run folder ("" = none; see ``best_checkpoint``);
    mask_sources: labeled image -> the round folder (relative to the run folder) its mask was accepted from, for
    masks not in the data set's mask folder (``--oracle folder``; absent from files written before it: none).
    """

    epoch: int
    settings: Dict[str, object]
    trainable: Dict[str, torch.Tensor]
    optimizer: dict
    scaler: dict
    labeled_names: List[str]
    best_dice: float
    best_path: str
    mask_sources: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The file's layout (``args`` is the settings' key in every last_state.pth written so far)."""
        return dict(epoch=self.epoch, args=dict(self.settings), trainable=self.trainable, optimizer=self.optimizer,
                    scaler=self.scaler, labeled_names=list(self.labeled_names), best_dice=self.best_dice,
                    best_path=self.best_path, mask_sources=dict(self.mask_sources))

    def best_checkpoint(self, folder: Path) -> Optional[Path]:
        """The best checkpoint of this state in the run folder ``folder`` it is read from: the file of that name
        there. States written before recorded the path as given (absolute, or relative to the working directory):
        only its name counts, so a run moved or copied elsewhere touches only its own folder's files."""
        return Path(folder) / Path(self.best_path).name if self.best_path else None

    @classmethod
    def from_dict(cls, data: object, path: Path) -> "ResumeState":
        if not isinstance(data, dict) or not set(STATE_KEYS) <= set(data) \
                or not isinstance(data.get("mask_sources", {}), dict):
            raise RunFolderError(f"{path} is not a resume state written by this trainer: it holds {_held(data)}. "
                                 "The trainer writes it at the end of every epoch: restore the run's own, or start "
                                 "afresh in another output folder (a trained model is evaluated with val.py)")
        return cls(int(data["epoch"]), dict(data["args"]), data["trainable"], data["optimizer"], data["scaler"],
                   list(data["labeled_names"]), float(data["best_dice"]), str(data["best_path"] or ""),
                   {str(k): str(v) for k, v in data.get("mask_sources", {}).items()})


def _held(data: object) -> str:
    """What a file that should be a resume state holds instead, in a few words."""
    tensors = data.get("model", data) if isinstance(data, dict) else None
    if isinstance(tensors, dict) and tensors and all(torch.is_tensor(v) for v in tensors.values()):
        kind = "SAM2 weights ({'model': state dict})" if tensors is not data else "a model's weights (a state dict)"
        return f"{kind} of {len(tensors)} tensors, e.g. {next(iter(tensors))}"
    if isinstance(data, dict):
        return f"a dict with the keys {', '.join(map(str, list(data)[:5]))}" + (", ..." if len(data) > 5 else "")
    name = type(data).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}" + (f" of {len(data)} items" if isinstance(data, (list, tuple))
                                                             else "")


# ----------------------------------------------------------------------------- the images a run uses

def image_record(splits: Mapping[str, Sequence[Path]]) -> Dict[str, Dict[str, int]]:
    """What images.json records: split -> {image file name: size in bytes}. Names and sizes only: a content hash
    would read every photo at every start."""
    return {split: {path.name: path.stat().st_size for path in paths} for split, paths in splits.items()}


def image_changes(recorded: Mapping[str, Mapping[str, int]], current: Mapping[str, Mapping[str, int]]
                  ) -> List[Tuple[str, str, List[str]]]:
    """(split, "added" | "removed" | "resized", names) for every kind of difference, resized names with their
    sizes ("a.jpg 1200 -> 1300 bytes")."""
    found = []
    for split in sorted(set(recorded) | set(current)):
        was, now = recorded.get(split, {}), current.get(split, {})
        found += [(split, "added", sorted(set(now) - set(was))), (split, "removed", sorted(set(was) - set(now))),
                  (split, "resized", [f"{n} {was[n]} -> {now[n]} bytes" for n in sorted(set(was) & set(now))
                                      if was[n] != now[n]])]
    return [change for change in found if change[2]]


# ----------------------------------------------------------------------------- CSV rows

def selection_row_ok(row: List[str], columns: int) -> bool:
    try:
        if not (len(row) == columns and bool(row[1]) and int(row[0]) >= 1 and math.isfinite(float(row[2]))
                and int(row[3]) >= 1):
            return False
        selection_costs(row)  # a damaged cost cell: ValueError
        return True
    except ValueError:
        return False


def cost_cell(value: object) -> str:
    """A cost cell's text: empty for None (not computed), a count of clicks or NOT_REACHED as it is, a number with
    9 significant digits (a changed fraction times a photo's pixels stays exact to the pixel)."""
    if value is None:
        return ""
    if value == NOT_REACHED or isinstance(value, (int, np.integer)):
        return str(value)
    return f"{float(value):.9g}"


def cost_value(column: str, text: str) -> object:
    """The value of a cost cell (``cost_cell``'s text): None when empty; a NoC cell a count 0..MAX_CLICKS or
    NOT_REACHED; the others a finite number >= 0 (at most 1 for dice and changed_fraction). ValueError otherwise."""
    if not isinstance(text, str):  # e.g. a CSV row with fewer cells than columns
        raise ValueError(f"{column} has no cell")
    if text == "":
        return None
    if column in NOC_COLUMNS:
        if text == NOT_REACHED:
            return NOT_REACHED
        if not (text.isdigit() and int(text) <= MAX_CLICKS):
            raise ValueError(f"{column} {text!r} is neither 0..{MAX_CLICKS} clicks nor {NOT_REACHED!r}")
        return int(text)
    value = float(text)
    if not (math.isfinite(value) and value >= 0 and (column == LEAD_TIME or value <= 1)):
        raise ValueError(f"{column} {text!r} is out of range")
    return value


def selection_costs(row: Sequence[str]) -> Dict[str, object]:
    """The cost cells of an al_selection.csv row (``read_selection``'s) as values (``cost_value``)."""
    return {column: cost_value(column, text) for column, text in zip(COST_CELLS, row[5:])}


def _number(text: str) -> Optional[float]:
    return None if text == "" else float(text)


def _count(text: str) -> Optional[int]:
    value = _number(text)
    return None if value is None else int(value)


def changed_settings(recorded: Mapping[str, object], current: Mapping[str, object], keys: Sequence[str]
                     ) -> List[Tuple[str, str, str]]:
    """(key, recorded value, current value) for every key whose text differs; values of string settings (by the
    current value's type) are shown quoted."""
    def shown(key: str, value: object) -> str:
        return repr(None if value is None else str(value)) if isinstance(current.get(key), str) else str(value)

    return [(k, shown(k, recorded.get(k)), shown(k, current.get(k))) for k in keys
            if str(recorded.get(k)) != str(current.get(k))]


def awaiting_problem(waiting: object) -> Optional[str]:
    """What is wrong with an awaiting_masks.json's content (e.g. edited by hand), or None: an object with epoch (a
    round number), round_dir (text), images (a list of file names) and pool_scores (image name -> number)."""
    if not isinstance(waiting, dict):
        return f"it holds a JSON {type(waiting).__name__}, not an object"
    missing = [key for key in ("epoch", "round_dir", "images", "pool_scores") if key not in waiting]
    if missing:
        return f"it has no {', '.join(missing)}"
    epoch, images, scores = waiting["epoch"], waiting["images"], waiting["pool_scores"]
    if type(epoch) is not int or epoch < 1:  # noqa: E721 - True is an int, not a round number
        return f"epoch is {epoch!r}, not a round number"
    if not isinstance(waiting["round_dir"], str):
        return f"round_dir is {waiting['round_dir']!r}, not a folder name"
    if not isinstance(images, list):
        return f"images is a {type(images).__name__}, not a list of image file names"
    if not all(isinstance(name, str) for name in images):
        return f"images holds {next(n for n in images if not isinstance(n, str))!r}, not an image file name"
    if not isinstance(scores, dict) or not all(type(v) in (int, float) for v in scores.values()):  # noqa: E721
        return "pool_scores is not a mapping of image names to scores"
    return None


# ----------------------------------------------------------------------------- the folder

class RunFolder:
    """One run folder (``OUTPUT/Skin_{img_size}``) and its files; creates nothing until something is written."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = FolderLock(self.path)

    # ---- its one owner

    def own(self, create: bool = False) -> None:
        """Make this process the folder's owner until it ends or ``release``s it (``FolderLocked`` while another
        process is). A folder that does not exist yet is owned when ``create`` makes it; it must then still hold no
        run (else ``FolderInUse``: another process started one after this one found the folder new)."""
        if self.lock.held or not (create or self.path.is_dir()):
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        in_use = self.in_use() if create else None
        if in_use:
            self.release()
            raise FolderInUse(self.path, in_use)

    def release(self) -> None:
        self.lock.release()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    # ---- what the folder holds

    def in_use(self) -> Optional[Path]:
        """The first file showing that a run was started here, or None."""
        return next((self.file(n) for n in (AWAITING, CONFIG, SELECTION, STATE) if self.file(n).exists()), None)

    def status(self) -> str:
        """new | dead (stopped before its first epoch ended, nothing to continue) | waiting (a round waits for a
        person's masks) | interrupted (stopped after a finished epoch) | finished (last_model.pth written) | lost
        (its records show a finished epoch, but last_state.pth is gone: it can be neither continued nor started
        afresh without losing them)."""
        if self.file(LAST_MODEL).is_file() and not self.file(AWAITING).exists():
            return "finished"
        if self.file(AWAITING).exists():
            return "waiting"
        if self.file(STATE).is_file():
            return "interrupted"
        if not self.in_use():
            return "new"
        return "lost" if self.records_show_a_finished_epoch() else "dead"

    def records_show_a_finished_epoch(self) -> bool:
        """Whether al_selection.csv or metrics.csv holds a row of an epoch after the first (it began only once the
        epoch before it was saved), or cannot be read (then nothing may be cleared on its account either)."""
        try:
            epochs = [int(row[0]) for row in self.read_selection()] if self.file(SELECTION).exists() else []
            epochs += [row["epoch"] for row in self.read_metrics()]
        except RunFolderError:
            return True
        return max(epochs, default=0) >= 2

    def best_checkpoints(self) -> List[Path]:
        return sorted(self.path.glob(BEST_PATTERN))

    # ---- config.txt

    def write_config(self, settings: Mapping[str, object]) -> None:
        """config.txt: every setting, one ``key: value`` line each (``read_config`` reads it back)."""
        atomic_write_text(self.file(CONFIG), "".join(f"{k}: {v}\n" for k, v in sorted(settings.items())))

    def read_config(self) -> Dict[str, str]:
        """config.txt's settings as text ({} when absent); ``#`` lines are notes."""
        path = self.file(CONFIG)
        if not path.is_file():
            return {}
        pairs = (line.split(": ", 1) for line in path.read_text(errors="replace").splitlines() if ": " in line)
        return {key: value for key, value in pairs if not key.startswith("#")}

    def add_config_note(self, note: str) -> None:
        path = self.file(CONFIG)
        atomic_write_text(path, (path.read_text() if path.is_file() else "") + f"# {note}\n")

    # ---- al_selection.csv

    def read_selection(self) -> List[List[str]]:
        """The rows after the header ([] when absent), each as SELECTION_HEADER's columns (a file written before the
        strategy or the cost columns gives "" there); a blank, partial or unreadable line (a cost cell included) is a
        RunFolderError naming the file and the line."""
        path = self.file(SELECTION)
        if not path.exists():
            return []
        try:
            with open(path, newline="") as f:
                lines = list(csv.reader(f))
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise RunFolderError(f"cannot read {path} ({err})") from None
        if not lines or lines[0] not in (SELECTION_HEADER, *EARLIER_SELECTION_HEADERS):
            raise RunFolderError(f"{path} does not start with the line {','.join(SELECTION_HEADER)}; it is not a "
                                 "selection log of this trainer")
        header = lines[0]
        for number, row in enumerate(lines[1:], start=2):
            if not selection_row_ok(row, len(header)):
                what = "blank" if not row else f"incomplete or damaged ({','.join(row)!r})"
                raise RunFolderError(f"{path} line {number} is {what}; every line must be "
                                     f"{','.join(header)}: repair or delete that line, then rerun")
        return [row + [""] * (len(SELECTION_HEADER) - len(row)) for row in lines[1:]]

    def append_selection(self, rows: Sequence[Sequence]) -> None:
        """Add rows (SELECTION_HEADER's columns) by rewriting the file atomically: a kill leaves the old file or the
        new one, never a partial line (so a partial line found later is damage, not something this trainer
        wrote). A file of an older header is rewritten with the columns it lacks, empty (see ``forget_after``)."""
        if any(len(row) != len(SELECTION_HEADER) for row in rows):
            raise ValueError(f"al_selection.csv rows have the columns {', '.join(SELECTION_HEADER)}: {rows!r}")
        path = self.file(SELECTION)
        old = path.read_text() if path.exists() else csv_text([SELECTION_HEADER])
        if not old.startswith(",".join(SELECTION_HEADER) + "\n"):
            old = csv_text([SELECTION_HEADER] + self.read_selection())
        atomic_write_text(path, old + csv_text(rows))

    # ---- metrics.csv

    def read_metrics(self) -> List[Dict[str, Optional[float]]]:
        """One dict per epoch row (``epoch``, ``labeled`` and the cost totals as ints, the rest floats, None where
        empty)."""
        path = self.file(METRICS)
        if not path.is_file():
            return []
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            return [{k: (int(v) if k in ("epoch", "labeled") else _count(v) if k in TOTAL_COLUMNS else _number(v))
                     for k, v in row.items()} for row in rows]
        except (OSError, ValueError, TypeError, csv.Error) as err:
            raise RunFolderError(f"cannot read {path} ({err}); it is rewritten at the end of every epoch") from None

    def write_metrics_row(self, row: Mapping[str, Optional[float]]) -> None:
        """Add (or replace) the row of ``row["epoch"]``; the file is rewritten atomically, its columns the union
        of every row's, in the order first seen."""
        rows = [r for r in self.read_metrics() if r["epoch"] != row["epoch"]] + [dict(row)]
        self._write_metrics(sorted(rows, key=lambda r: r["epoch"]))

    def _write_metrics(self, rows: Sequence[Mapping[str, Optional[float]]]) -> None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        body = [[("" if r.get(c) is None else r[c]) for c in columns] for r in rows]
        atomic_write_text(self.file(METRICS), csv_text([columns] + body) if rows else "")

    # ---- images.json

    def read_images(self) -> Optional[Dict[str, Dict[str, int]]]:
        """The recorded images (``image_record``), or None when the folder has no images.json (an older trainer)."""
        path = self.file(IMAGES)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            if not all(isinstance(v, int) for split in record.values() for v in split.values()):
                raise ValueError("sizes are not numbers")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            raise RunFolderError(f"{path} is unreadable ({type(err).__name__}: {err}); it records the images the run "
                                 "was made with: restore it, or delete it (the data are then recorded as they are "
                                 "now); nothing was changed") from None
        return record

    def write_images(self, record: Mapping[str, Mapping[str, int]]) -> None:
        atomic_write_text(self.file(IMAGES), json.dumps(record, indent=0, sort_keys=True) + "\n")

    def check_images(self, current: Mapping[str, Mapping[str, int]], accept_added: bool) -> List[str]:
        """Compare the images a resumed run finds (``image_record``) with images.json: the new training images it
        takes into its unlabeled pool (``accept_added``); DataChanged for any other difference, and for new ones
        not accepted. A folder without images.json (an older trainer's) has nothing to compare."""
        recorded = self.read_images()
        changes = image_changes(recorded, current) if recorded is not None else []
        added = [names for split, kind, names in changes if (split, kind) == ("Training", "added")]
        refused = [c for c in changes if not (accept_added and c[:2] == ("Training", "added"))]
        if refused:
            raise DataChanged(self.file(IMAGES), [f"{split}: {len(names)} {kind} ({first_names(names)})"
                                                  for split, kind, names in refused],
                              only_added=all(c[:2] == ("Training", "added") for c in refused))
        return added[0] if added else []

    # ---- the resume state

    def save_state(self, state: ResumeState, before_rename=None) -> None:
        """last_state.pth, atomically; ``before_rename()`` runs between writing and renaming (a crash point)."""
        atomic_torch_save(state.to_dict(), self.file(STATE), before_rename)

    def load_state(self) -> ResumeState:
        path = self.file(STATE)
        if not path.is_file():
            raise RunFolderError(f"{path} does not exist, so there is no run to continue (it is written at the end "
                                 "of every epoch)")
        try:
            return ResumeState.from_dict(load_torch_file(path), path)
        except CheckpointFileError as err:
            raise RunFolderError(f"cannot read {err}") from None

    def forget_after(self, epoch: int, strategy: str = "") -> None:
        """Drop what epochs after ``epoch`` wrote to the records (a run killed mid-epoch redoes them); rows from before
        the strategy column get ``strategy`` (the run's --strategy: older runs had no other)."""
        if self.file(SELECTION).exists():
            kept = [r[:4] + [r[4] or strategy] + r[5:] for r in self.read_selection() if int(r[0]) <= epoch]
            atomic_write_text(self.file(SELECTION), csv_text([SELECTION_HEADER] + kept))
        if self.file(METRICS).exists():
            self._write_metrics([r for r in self.read_metrics() if r["epoch"] <= epoch])

    # ---- markers: a round waiting for masks, a divergence

    def read_awaiting(self) -> Optional[dict]:
        """The round that waits for masks, or None: dict(epoch, round_dir, images, pool_scores)."""
        path = self.file(AWAITING)
        if not path.is_file():
            return None
        try:
            waiting = json.loads(path.read_text())
            problem = awaiting_problem(waiting)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problem = f"unreadable: {type(err).__name__}: {err}"
        if problem:
            raise RunFolderError(f"{path} is not the marker this program writes when a round waits for masks "
                                 f"({problem}): restore it; or delete it, and the resume selects that round again "
                                 "from last_state.pth and writes it anew (masks saved meanwhile are kept); nothing "
                                 "was changed")
        return waiting

    def write_awaiting(self, waiting: Mapping[str, object]) -> None:
        atomic_write_text(self.file(AWAITING), json.dumps(dict(waiting), indent=1) + "\n")

    def diverged(self) -> bool:
        return self.file(DIVERGED).is_file()

    def write_diverged(self, record: Mapping[str, object]) -> None:
        atomic_write_text(self.file(DIVERGED), json.dumps(dict(record), indent=1) + "\n")

    def epoch_saved(self) -> None:
        """A finished epoch is in last_state.pth: the round it trained on waits no more, and the state now records
        settings that worked."""
        self.file(AWAITING).unlink(missing_ok=True)
        self.file(DIVERGED).unlink(missing_ok=True)

    # ---- opening it for a run

    def open_for_run(self, settings: Mapping[str, object], keys: Sequence[str], legacy: Mapping[str, object],
                     resume: bool) -> Tuple[bool, Optional[ResumeState]]:
        """Own the folder (``own``), then check it before a run (new, or ``resume``) with ``settings`` writes
        anything: (whether it holds a dead run to clear, the state to continue from). ``keys``: the settings a run
        must keep; ``legacy``: what a key absent from an older folder means. A dead run (see ``_dead_run``) is started
        afresh with its own settings, with or without ``resume``. Raises FolderLocked (the folder is another
        process's), FolderInUse, SettingsDiffer, RunFolderError; a refused folder is not kept owned."""
        self.own()
        try:
            return self._checked_for_run(settings, keys, legacy, resume)
        except BaseException:
            self.release()
            raise

    def _checked_for_run(self, settings: Mapping[str, object], keys: Sequence[str], legacy: Mapping[str, object],
                         resume: bool) -> Tuple[bool, Optional[ResumeState]]:
        keys = [k for k in keys if not (k == "base_lr" and self.diverged())]  # a divergence lets the rate change
        status = self.status()
        if status == "lost":
            self.read_selection(), self.read_metrics()  # damaged records: their own message
            raise LostState(self.path, [p.name for p in (self.file(SELECTION), self.file(METRICS),
                                                         *self.best_checkpoints()) if p.is_file()])
        if status == "dead":
            return self._dead_run(settings, keys, legacy), None
        in_use = self.in_use()
        if in_use and not resume:
            raise FolderInUse(self.path, in_use)
        if not resume:
            return False, None
        state = self.load_state()
        self.read_selection()
        # a setting an older state did not record (e.g. keep_best, val_limit): as config.txt has it, else LEGACY
        changes = changed_settings({**legacy, **self.read_config(), **state.settings}, settings, keys)
        if changes:
            raise SettingsDiffer(self.path, changes, dead=False)
        self.check_records(state)
        return False, state

    def check_records(self, state: ResumeState) -> None:
        """The records a run continued from ``state`` extends: config.txt, and al_selection.csv and metrics.csv
        with rows of every epoch up to ``state.epoch`` (none before epoch 1 is finished). A RunFolderError names
        the first one missing or incomplete (a resume would leave it holding part of the run's history only)."""
        finished = set(range(1, state.epoch + 1))
        records = [(CONFIG, "when the run starts", None)]
        if finished:
            records += [(SELECTION, "at every selection", lambda: {int(row[0]) for row in self.read_selection()}),
                        (METRICS, "at the end of every epoch", lambda: {row["epoch"] for row in self.read_metrics()})]
        for name, written, epochs_in in records:
            path = self.file(name)
            lacking = sorted(finished - epochs_in()) if path.is_file() and epochs_in else []
            what = "is missing" if not path.is_file() else \
                f"lacks the rows of epoch {', '.join(map(str, lacking))}" if lacking else None
            if what and name == METRICS and not path.is_file() and not self.file(IMAGES).is_file():
                raise RunFolderError(f"{path} is missing, as in a run folder made by a trainer.py older than "
                                     "metrics.csv (its per-epoch metrics are in TensorBoard only): this version cannot "
                                     "continue it with complete records; finish it with the version that made it, or "
                                     "start afresh in another output folder; nothing was changed")
            if what:
                raise RunFolderError(f"{path} {what} (it is written {written} and kept), so the records of this run "
                                     f"up to its last finished epoch ({state.epoch}) are incomplete: restore that "
                                     "file, or start afresh in another output folder; nothing was changed")
        self.check_selection_against(state)

    def check_selection_against(self, state: ResumeState) -> None:
        """al_selection.csv's rows up to ``state.epoch`` must name images the state holds as labeled, each once: a
        RunFolderError names the first row that does not (edited by hand: an image renamed or a row repeated)."""
        labeled, seen = set(state.labeled_names), {}
        rows = [row for row in self.read_selection() if int(row[0]) <= state.epoch]
        for number, row in enumerate(rows, start=2):
            image = row[1]
            if image in seen or image not in labeled:
                why = f"repeats line {seen[image]}" if image in seen else \
                    f"names {image!r}, which {STATE} does not hold as labeled (renamed?)"
                raise RunFolderError(f"{self.file(SELECTION)} line {number} ({','.join(row)}) {why}: the selection "
                                     f"log must match {STATE}; restore the line as the run wrote it; nothing was "
                                     "changed")
            seen[image] = number

    def reopen(self, state: ResumeState, note: str, keep_earlier_bests: bool = False) -> List[Path]:
        """Continue after ``state``: drop what an unfinished epoch wrote (its records' rows, a best checkpoint it
        saved, returned) and note the resume in config.txt. ``keep_earlier_bests`` (--keep_best all): every best
        checkpoint up to the state's is kept (their Dice, in the name, is not above its); else only the state's."""
        self.forget_after(state.epoch, str(state.settings.get("strategy", "")))
        keep = Path(state.best_path).name if state.best_path else None
        if keep_earlier_bests:
            ceiling = checkpoint_dice(keep) if keep else -math.inf
            stale = [p for p in self.best_checkpoints() if not checkpoint_dice(p.name) <= ceiling]
        else:
            stale = [p for p in self.best_checkpoints() if p.name != keep]
        for path in stale:
            path.unlink()
        self.add_config_note(note)
        return stale

    # ---- tidying

    def _dead_run(self, settings: Mapping[str, object], keys: Sequence[str], legacy: Mapping[str, object]) -> bool:
        """A run that stopped before finishing its first epoch (killed, a bad file, a divergence: status "dead")
        holds nothing to continue: it may be started afresh (True), with or without --resume, by the command that
        made it. Its config.txt must say so: SettingsDiffer when the settings differ, DeadRunUnchecked when it
        lacks a setting to compare (nothing is removed here)."""
        config = self.read_config()
        missing = [k for k in keys if k not in legacy and k not in config]
        if missing:
            raise DeadRunUnchecked(self.path, missing)
        changes = changed_settings({**legacy, **config}, settings, keys)
        if changes:
            raise SettingsDiffer(self.path, changes, dead=True)
        return True

    def clear_dead_run(self) -> List[Path]:
        """Remove what a dead run wrote, except log.txt; returns what was removed."""
        removed = [self.file(n) for n in DEAD_RUN_FILES if self.file(n).is_file()]
        removed += self.best_checkpoints() + sorted(self.file(EVENTS).rglob("events.out.tfevents.*"))
        for path in removed:
            path.unlink()
        return removed

    def remove_stale_temps(self) -> List[Path]:
        """Temporary files that killed writes left here (call only while no other process writes here)."""
        return remove_stale_temps(self.path)
