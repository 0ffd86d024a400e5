"""The Label Studio hand-over of an ``--oracle folder`` round: the files Label Studio imports as they are, and
the way back from its JSON export to masks.

Out (``write_round_files``, after ``annotation_rounds.write_round`` has written the round folder):

    label_studio_interface.xml   the labelling interface: BrushLabels on the image, one label ``lesion``
    label_studio_tasks.json      one task per selected image, the model's proposal as a prediction

Each task's image is served by a Label Studio *Local Files* storage whose path is the round folder: it holds the
copies of exactly the images of this round (and their proposals), so Label Studio can serve nothing else of the
data set (no validation photos, no masks), and a task keeps showing the file its proposal was computed on even if
the data set's folder changes. The price is one storage per round (a storage on a parent folder, e.g. the run's
``annotate/``, authorises every round below it too). URLs are ``/data/local-files/?d=<path relative to
LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT>``, so the document root is needed when the tasks are written.

The trainer (``--oracle folder``) writes them into every round folder with ``write_trainer_round``: one run id for
all rounds of a run (kept in ``annotate/label_studio_run.txt``; one Label Studio project per run, each round adds
its tasks), URLs relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT when the trainer's environment sets it, else
to the trainer's ``--output`` folder.

Back (``import_export``, or ``python3 label_studio.py import --export EXPORT.json --round_dir ROUND``): the export
becomes ``<name>_segmentation.png`` (0/255, the image's size) in the round folder, and the round's
``to_annotate.csv`` gains who annotated each image and how long it took (status, mask, completed_by, lead_time_s,
task and annotation ids). ``trainer.py --resume`` takes each mask from there. The brush RLE is encoded and decoded
by Label Studio's own SDK (``label_studio_sdk.converter.brush``); without it this module imports, and says how to
enable it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

import numpy as np
from PIL import Image

from annotation_rounds import ROUND_COLUMNS, ROUND_CSV, RoundItem, read_round, round_mask_path
from datasets_skin import SPLIT_FOLDERS, DatasetError, PathLike, decode_mask, read_image_size
from safe_io import WriteError, atomic_path, atomic_write_text, csv_text, probe_writable, refusal_reason

INTERFACE_FILE = "label_studio_interface.xml"
TASKS_FILE = "label_studio_tasks.json"
RUN_ID_FILE = "label_studio_run.txt"  # in the run's annotate/ folder: the run id of all its rounds' tasks
DOCUMENT_ROOT_VARIABLE = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
# The columns an import adds to the round's to_annotate.csv (after the trainer's ROUND_COLUMNS).
ANNOTATION_COLUMNS = ["status", "mask", "completed_by", "lead_time_s", "task_id", "annotation_id"]
IMAGE_TAG, BRUSH_TAG, LESION_LABEL = "image", "lesion_mask", "lesion"
# Keys of a task's data (besides IMAGE_TAG): what an export is checked against, and columns in Label Studio.
RUN_KEY, ROUND_KEY, NAME_KEY = "mdsam_run", "mdsam_round", "mdsam_image"
# A brush pixel is lesion when its alpha is above this: the mask files' own rule (> 127 of 255), so a
# half-transparent anti-aliased stroke edge counts as lesion from its midpoint on.
ALPHA_THRESHOLD = 127
SDK_HINT = "pip install -r requirements-labelstudio.txt"
LOCAL_FILES_URL = "/data/local-files/?d="
SKIPPED, NOT_ANNOTATED = "skipped", "not_annotated"  # an image not returned: the annotator skipped it, or no one did
MASK_FOLDER_NAMES = {masks for layouts in SPLIT_FOLDERS.values() for _, masks in layouts}


class LabelStudioError(ValueError):
    """A Label Studio hand-over that cannot be done; the message names the file or task and what to do."""


class ClassCountError(LabelStudioError):
    """The Label Studio interface has one label (lesion); another number of foreground classes is refused."""


class SdkMissingError(LabelStudioError):
    """``label-studio-sdk`` (its brush RLE) is not installed."""


class RoundFolderError(LabelStudioError):
    """The folder given is not a round folder the export can go to (not one, or inside a dataset's mask folder)."""


class ExportError(LabelStudioError):
    """The export does not fit the round: unreadable, another run or round, another image, size or interface."""


class MaskClashError(LabelStudioError):
    """Masks already exist where the export's would go; lists them all (nothing is written)."""


def brush_module():
    """``label_studio_sdk.converter.brush``, imported on first use (it takes seconds, and is optional)."""
    try:
        from label_studio_sdk.converter import brush  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise SdkMissingError(f"the Label Studio files of a round need label-studio-sdk ({err}); install it with "
                              f"`{SDK_HINT}`") from None
    return brush


# ----------------------------------------------------------------------------- out: interface and tasks

def labelling_interface(num_classes: int = 1) -> str:
    """The labelling interface (Label Studio XML): the image, one brush label ``lesion`` (cyan, as the round's
    overlays), and a header naming the image, its round and its rank in the pool."""
    if num_classes != 1:
        raise ClassCountError(f"a Label Studio round has one label (lesion), so it needs exactly one foreground "
                              f"class; got {num_classes}")
    return (f'<View>\n'
            f'  <Header value="${NAME_KEY}: round ${ROUND_KEY}, rank $rank_in_pool in the pool '
            f'(correct the proposal; no lesion: delete the region and submit)"/>\n'
            f'  <Image name="{IMAGE_TAG}" value="${IMAGE_TAG}" zoom="true" zoomControl="true"/>\n'
            f'  <BrushLabels name="{BRUSH_TAG}" toName="{IMAGE_TAG}">\n'
            f'    <Label value="{LESION_LABEL}" background="#00ffff"/>\n'
            f'  </BrushLabels>\n'
            f'</View>\n')


def local_files_url(path: PathLike, document_root: PathLike) -> str:
    """The URL under which a Local Files storage serves ``path``; raises ``RoundFolderError`` when ``path`` is not
    below ``document_root``. Paths are made absolute, not resolved: Label Studio compares them as written."""
    path, root = Path(os.path.abspath(path)), Path(os.path.abspath(document_root))
    if root not in path.parents:
        raise RoundFolderError(f"{path} is not inside the Label Studio document root {root} "
                               "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), so Label Studio cannot serve it; choose a "
                               "document root that holds the run folder")
    return LOCAL_FILES_URL + quote(path.relative_to(root).as_posix())


def brush_result(mask: np.ndarray) -> dict:
    """One brush region of Label Studio holding the H x W bool ``mask`` (RLE by the SDK, all four channels 255)."""
    height, width = mask.shape
    rle = brush_module().mask2rle(np.asarray(mask, np.uint8) * 255)
    return dict(id="proposal", type="brushlabels", from_name=BRUSH_TAG, to_name=IMAGE_TAG, origin="prediction",
                original_width=width, original_height=height, image_rotation=0,
                value=dict(format="rle", rle=[int(v) for v in rle], brushlabels=[LESION_LABEL]))


def prediction_scores(items: Sequence[RoundItem]) -> List[float]:
    """Each item's prediction score: one minus its normalised uncertainty, normalised by its place in the round's
    selection order (``rank_in_pool``, 1 = the pool's most uncertain image): k images get 0, 1/k, ..., (k-1)/k.

    Label Studio reads a prediction score as the model's confidence: it shows it as a percentage and lists low
    scores first in its ascending "prediction score" order and its uncertainty sampling, so the round is shown most
    uncertain first, in selection order. The place, not the raw score, because it is exact whatever the strategy's
    score range (mask difference, entropy, random) and needs no min-max over a handful of images (which would say
    100 % for the round's last image); the rank itself would show as "300 %". The raw score is the task's
    ``uncertainty``, its rank ``rank_in_pool``."""
    order = sorted(range(len(items)), key=lambda i: items[i].rank_in_pool)
    scores = [0.0] * len(items)
    for place, index in enumerate(order):
        scores[index] = place / len(items)
    return scores


def round_task(item: RoundItem, image_url: str, run_id: str, round_number: int, score: float) -> dict:
    """The task of one selected image: its data (URL, run, round, name, rank, uncertainty) and the proposal as a
    prediction (``score``: see ``prediction_scores``; an empty proposal is a prediction without a region)."""
    proposal = np.asarray(item.proposal, bool)
    if proposal.shape != tuple(item.sample.orig_size):
        raise ValueError(f"the proposal of {item.sample.image_path.name} is {proposal.shape} (H x W), its image "
                         f"{tuple(item.sample.orig_size)}")
    data = {IMAGE_TAG: image_url, RUN_KEY: run_id, ROUND_KEY: round_number, NAME_KEY: item.sample.image_path.name,
            "rank_in_pool": item.rank_in_pool, "uncertainty": float(item.score)}
    # one model_version per run: Label Studio shows only the predictions of the project's model version, which
    # the first import sets; a version per round would hide every later round's proposals
    prediction = dict(model_version=run_id, score=score, result=[brush_result(proposal)] if proposal.any() else [])
    return dict(data=data, predictions=[prediction])


def write_round_files(round_dir: PathLike, items: Sequence[RoundItem], run_id: str, round_number: int,
                      document_root: PathLike, num_classes: int = 1) -> Tuple[Path, Path]:
    """Write the round's interface and tasks files (each atomically; the images are the round folder's copies,
    which ``annotation_rounds.write_round`` wrote); returns their paths. ``run_id`` tells this run from any other
    (an export is checked against it), ``round_number`` is the round's epoch, ``document_root`` Label Studio's
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT."""
    round_dir = Path(round_dir)
    interface = labelling_interface(num_classes)
    local_files_url(round_dir, document_root)  # the storage's path must be below the root, not the root itself
    tasks = [round_task(item, local_files_url(round_dir / item.sample.image_path.name, document_root), run_id,
                        round_number, score) for item, score in zip(items, prediction_scores(items))]
    atomic_write_text(round_dir / INTERFACE_FILE, interface)
    atomic_write_text(round_dir / TASKS_FILE, json.dumps(tasks, indent=1) + "\n")
    return round_dir / INTERFACE_FILE, round_dir / TASKS_FILE


def document_root(default: PathLike) -> Path:
    """Label Studio's document root for a trainer's round: LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT when the
    trainer's environment sets it (it runs where the server does), else ``default`` (the trainer's output folder)."""
    return Path(os.path.abspath(os.environ.get(DOCUMENT_ROOT_VARIABLE) or default))


def run_id(annotate_dir: Path) -> str:
    """The id of the run whose rounds lie in ``annotate_dir``: made by its first round (the run folder's name and a
    random part, so that a run started afresh in the same folder is another run), kept in RUN_ID_FILE."""
    path = annotate_dir / RUN_ID_FILE
    if not path.is_file():
        atomic_write_text(path, f"{annotate_dir.parent.name}-{uuid.uuid4().hex[:12]}\n")
    return path.read_text().strip()


def write_trainer_round(round_dir: Path, items: Sequence[RoundItem], round_number: int, output: PathLike,
                        num_classes: int = 1) -> Tuple[Path, Path]:
    """``write_round_files`` for the trainer's round ``round_number`` in ``round_dir`` (OUTPUT/Skin_S/annotate/
    round_NNN): the run's id, the document root of ``document_root(output)``. Returns (tasks file, document root).
    Raises, before writing anything, ClassCountError, SdkMissingError or RoundFolderError."""
    labelling_interface(num_classes)
    brush_module()
    root = document_root(output)
    local_files_url(round_dir, root)
    tasks = write_round_files(round_dir, items, run_id(round_dir.parent), round_number, root, num_classes)[1]
    return tasks, root


# ----------------------------------------------------------------------------- back: the export to masks

@dataclass(frozen=True)
class RoundExpectation:
    """What an export of a round must match, read from the round folder: the run, the round number, each
    image's name -> (H, W) read from its copy in the folder, and the rows of its to_annotate.csv."""

    round_dir: Path
    run_id: str
    round_number: int
    sizes: Dict[str, Tuple[int, int]]
    rows: List[Dict[str, str]]


@dataclass(frozen=True)
class ReturnedMask:
    """One image's mask from the export (H x W bool), who made it and in how many seconds."""

    image: str
    mask: np.ndarray
    completed_by: str
    lead_time: Optional[float]
    task_id: object
    annotation_id: object


@dataclass
class ExportContent:
    """What an export holds for a round: the masks, the images not returned (image -> SKIPPED or
    NOT_ANNOTATED), and how many tasks of earlier rounds of the run were left aside."""

    masks: Dict[str, ReturnedMask] = field(default_factory=dict)
    not_returned: Dict[str, str] = field(default_factory=dict)
    earlier_round_tasks: int = 0


@dataclass
class ImportResult:
    """``import_export``'s result: masks written, masks already there and identical (left as they were), the
    images not returned, the tasks of earlier rounds left aside, and the round's CSV (to_annotate.csv) rewritten
    with who annotated and how long."""

    written: List[Path]
    unchanged: List[Path]
    not_returned: Dict[str, str]
    earlier_round_tasks: int
    csv_path: Path
    content: ExportContent


def read_expectation(round_dir: PathLike) -> RoundExpectation:
    """The run, round and image sizes of a round folder with Label Studio files (``RoundFolderError`` if none)."""
    round_dir = Path(round_dir)
    tasks_path = round_dir / TASKS_FILE
    if not tasks_path.is_file():
        raise RoundFolderError(f"{round_dir} has no {TASKS_FILE}: not a round folder written for Label Studio "
                               "(give the round folder whose tasks were imported into Label Studio)")
    try:
        datas = [task["data"] for task in json.loads(tasks_path.read_text())]
        run_id, round_number, names = datas[0][RUN_KEY], int(datas[0][ROUND_KEY]), [d[NAME_KEY] for d in datas]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise RoundFolderError(f"{tasks_path}: not a tasks file of a round ({type(err).__name__}: {err}); it is "
                               "written by the trainer, restore it") from None
    try:
        sizes = {name: read_image_size(round_dir / name, check_end=False) for name in names}
    except DatasetError as err:
        raise RoundFolderError(f"an image of the round is missing or unreadable: {err}") from None
    return RoundExpectation(round_dir, str(run_id), round_number, sizes, read_round_rows(round_dir, names))


def read_round_rows(round_dir: Path, names: Sequence[str]) -> List[Dict[str, str]]:
    """The rows of the round's to_annotate.csv, after checking that it lists the images of the tasks file."""
    path = round_dir / ROUND_CSV
    try:
        rows = read_round(round_dir)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise RoundFolderError(f"{path}: missing or unreadable ({type(err).__name__}: {err}); it is written by the "
                               "trainer with the round, restore it") from None
    if sorted(str(row.get("image")) for row in rows) != sorted(names) or \
            any(row.get(column) is None for row in rows for column in ROUND_COLUMNS):
        raise RoundFolderError(f"{path} does not list the images of {TASKS_FILE} in the trainer's columns "
                               f"({', '.join(ROUND_COLUMNS)}); both are written by the trainer with the round, "
                               "restore them")
    return rows


def read_export(export_path: PathLike) -> List[dict]:
    """The tasks of a Label Studio JSON export (Export -> JSON; not JSON_MIN, which drops the annotation ids)."""
    export_path = Path(export_path)
    try:
        tasks = json.loads(export_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ExportError(f"{export_path}: cannot read it as a Label Studio JSON export ({err})") from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and isinstance(t.get("data"), dict) for t in tasks):
        raise ExportError(f"{export_path}: not a Label Studio JSON export (expected a list of tasks with 'data'; "
                          "export the project as JSON, not JSON_MIN, CSV or masks)")
    return tasks


JSON_KINDS = {list: "a list", dict: "an object", str: "text", int: "a whole number"}


def json_kind(value: object) -> str:
    """What a JSON value is, in the words of the export's messages."""
    if isinstance(value, bool) or value is None:
        return "true/false" if value is not None else "null"
    return next((said for kind, said in JSON_KINDS.items() if isinstance(value, kind)),
                "a number" if isinstance(value, float) else type(value).__name__)


def check_kind(value: object, kind: type, where: str, field: str) -> None:
    """``ExportError`` naming ``where`` and ``field`` unless ``value`` is a JSON ``kind`` (a key of JSON_KINDS)."""
    if json_kind(value) != JSON_KINDS[kind]:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ExportError(f"{where}: its {field} is {json_kind(value)} ({shown}), not {JSON_KINDS[kind]}; not an "
                          "export Label Studio wrote (Export -> JSON): export the project again")


def listed(value: object, where: str, field: str) -> list:
    """An export's list ``field`` (absent or null: empty)."""
    if value is None:
        return []
    check_kind(value, list, where, field)
    return value


def task_annotations(task: dict, where: str) -> List[dict]:
    """The annotations of an exported task, each checked to be a JSON object."""
    annotations = listed(task.get("annotations"), where, "annotations")
    for number, annotation in enumerate(annotations):
        check_kind(annotation, dict, where, f"annotation {number + 1}")
    return annotations


def task_round(task: dict, expected: RoundExpectation, where: str) -> int:
    """The round number of an exported task, after checking it is a task of the expected run."""
    data = task["data"]
    if RUN_KEY not in data or ROUND_KEY not in data or NAME_KEY not in data:
        raise ExportError(f"{where}: not a task of a trainer round (its data has no {RUN_KEY}/{ROUND_KEY}/"
                          f"{NAME_KEY}); export the project the round's {TASKS_FILE} was imported into")
    check_kind(data[NAME_KEY], str, where, NAME_KEY)
    if str(data[RUN_KEY]) != expected.run_id:
        raise ExportError(f"{where}: a task of another run ({data[RUN_KEY]!r}; this round belongs to run "
                          f"{expected.run_id!r}); export the project of this run")
    round_number = data[ROUND_KEY]
    if not isinstance(round_number, int):
        raise ExportError(f"{where}: its {ROUND_KEY} is {round_number!r}, not a round number")
    if round_number > expected.round_number:
        raise ExportError(f"{where}: a task of round {round_number}, after this round {expected.round_number}; "
                          f"give the round folder of round {round_number}")
    if round_number == expected.round_number and data[NAME_KEY] not in expected.sizes:
        raise ExportError(f"{where}: image {data[NAME_KEY]} is not one of round {expected.round_number}'s images "
                          f"({', '.join(sorted(expected.sizes))})")
    return round_number


def region_mask(region: dict, size: Tuple[int, int], where: str) -> np.ndarray:
    """The H x W bool lesion pixels of one brush region (alpha > ALPHA_THRESHOLD), after checking that it belongs
    to this interface and to an image of ``size`` (H, W)."""
    if not isinstance(region, dict):
        raise ExportError(f"{where}: a region that is not a JSON object ({type(region).__name__})")
    kind, tags = str(region.get("type", "")).lower(), (region.get("from_name"), region.get("to_name"))
    value = region.get("value") or {}
    check_kind(value, dict, where, "value")
    if kind != "brushlabels" or tags != (BRUSH_TAG, IMAGE_TAG) or value.get("brushlabels") != [LESION_LABEL]:
        raise ExportError(f"{where}: a {kind or 'untyped'} region {tags[0]}->{tags[1]} labelled "
                          f"{value.get('brushlabels')}, not a '{LESION_LABEL}' brush of this interface; use the "
                          f"round's {INTERFACE_FILE}")
    height, width = size
    drawn = (region.get("original_height"), region.get("original_width"))
    for field, pixels in zip(("original_height", "original_width"), drawn):
        check_kind(pixels, int, where, field)
    if drawn != (height, width):
        raise ExportError(f"{where}: drawn on a {drawn[1]}x{drawn[0]} image, but the round's image is "
                          f"{width}x{height} (W x H)")
    if value.get("format") != "rle" or not isinstance(value.get("rle"), list):
        raise ExportError(f"{where}: a brush region without RLE (format {value.get('format')!r})")
    try:
        pixels = brush_module().decode_rle(value["rle"])
    except (ValueError, IndexError, TypeError) as err:
        raise ExportError(f"{where}: its brush RLE cannot be decoded ({type(err).__name__})") from None
    if pixels.size != height * width * 4:
        raise ExportError(f"{where}: its brush RLE holds {pixels.size} values, not {width}x{height}x4 (RGBA)")
    return pixels.reshape(height, width, 4)[..., 3] > ALPHA_THRESHOLD


def annotation_mask(task: dict, annotation: dict, expected: RoundExpectation, where: str) -> ReturnedMask:
    """The merged mask of one annotation (overlapping strokes and regions: their union; none: lesion-free)."""
    name = task["data"][NAME_KEY]
    size = expected.sizes[name]
    mask = np.zeros(size, bool)
    for number, region in enumerate(listed(annotation.get("result"), where, "result")):
        mask |= region_mask(region, size, f"{where}, region {number + 1}")
    who = annotation.get("completed_by")
    if isinstance(who, dict):  # some exports expand the user
        who = who.get("email") or who.get("id")
    lead_time = annotation.get("lead_time")
    lead_time = float(lead_time) if isinstance(lead_time, (int, float)) else None  # seconds; absent in old exports
    return ReturnedMask(name, mask, "" if who is None else str(who), lead_time, task.get("id"), annotation.get("id"))


def export_content(tasks: List[dict], expected: RoundExpectation, export_path: Path) -> ExportContent:
    """Every mask the export holds for the round, after every check (one ``ExportError`` for the first problem)."""
    content = ExportContent()
    for task in tasks:
        where = f"{export_path}: task {task.get('id')}"
        if task_round(task, expected, where) < expected.round_number:
            content.earlier_round_tasks += 1
            continue
        name = task["data"][NAME_KEY]
        where += f" ({name})"
        annotations = task_annotations(task, where)
        submitted = [a for a in annotations if not a.get("was_cancelled")]
        if len(submitted) > 1:
            raise ExportError(f"{where}: {len(submitted)} annotations (ids "
                              f"{', '.join(str(a.get('id')) for a in submitted)}); keep one in Label Studio, "
                              "delete the others, and export again")
        if not submitted:
            skipped = any(a.get("was_cancelled") for a in annotations)
            if name not in content.masks:
                content.not_returned[name] = SKIPPED if skipped else NOT_ANNOTATED
            continue
        if name in content.masks:
            raise ExportError(f"{where}: image {name} is annotated in two tasks ({content.masks[name].task_id} and "
                              f"{task.get('id')}; the round's tasks were imported twice?); delete one annotation")
        content.masks[name] = annotation_mask(task, submitted[0], expected, f"{where}, annotation "
                                                                            f"{submitted[0].get('id')}")
        content.not_returned.pop(name, None)
    if not content.masks and not content.not_returned:
        raise ExportError(f"{export_path}: no task of round {expected.round_number} ({content.earlier_round_tasks} "
                          f"of earlier rounds); import the round's {TASKS_FILE} into the project, annotate, and "
                          "export again")
    for name in expected.sizes:  # Label Studio leaves tasks without any annotation out of its exports
        if name not in content.masks:
            content.not_returned.setdefault(name, NOT_ANNOTATED)
    return content


def mask_target(round_dir: Path, image: str) -> Path:
    return round_mask_path(round_dir, Path(image).stem)


def dataset_masks(expected: RoundExpectation) -> Dict[str, Path]:
    """image -> where the round's to_annotate.csv says its mask belongs in the data set (the PNG route)."""
    return {row["image"]: Path(row["save_mask_as"]) for row in expected.rows}


def check_target(round_dir: Path, in_dataset: Dict[str, Path]) -> None:
    """Refuse a round folder inside a data set's mask folder: masks from an export never go there."""
    folder = round_dir.resolve()
    mask_dirs = {path.parent.resolve() for path in in_dataset.values()}
    inside = [d for d in (folder, *folder.parents) if d in mask_dirs or d.name in MASK_FOLDER_NAMES]
    if inside:
        raise RoundFolderError(f"{round_dir} is inside the data set's mask folder {inside[0]}: masks from Label "
                               "Studio go to the round folder (annotate/round_NNN), never into the data set")


def check_writable(round_dir: Path) -> None:
    """``RoundFolderError`` when nothing can be written into the round folder (before anything is)."""
    try:
        probe_writable(round_dir / ROUND_CSV)
    except OSError as err:
        advice = "free space there" if WriteError(round_dir, err).full else "make it writable"
        raise RoundFolderError(f"cannot write into {round_dir} ({refusal_reason(err)}): {advice} and import again; "
                               "nothing was written") from None


def same_mask(path: Path, mask: np.ndarray) -> bool:
    try:
        return np.array_equal(decode_mask(path, None).astype(bool), mask)
    except DatasetError:
        return False


def existing_masks(content: ExportContent, round_dir: Path,
                   in_dataset: Dict[str, Path]) -> Tuple[List[str], List[Path]]:
    """(clashes, one line each naming the file; masks already in the round folder equal to the export's)."""
    clashes, unchanged = [], []
    for name, returned in content.masks.items():
        target = mask_target(round_dir, name)
        if target.exists():
            if same_mask(target, returned.mask):
                unchanged.append(target)
            else:
                clashes.append(f"{target} (exists and differs from the export's annotation {returned.annotation_id})")
        if name in in_dataset and in_dataset[name].exists():
            clashes.append(f"{in_dataset[name]} (this image has a mask in the data set already; one mask per image, "
                           "in one place)")
    return clashes, unchanged


def write_masks(masks: Sequence[ReturnedMask], round_dir: Path) -> List[Path]:
    """Each mask as a 0/255 PNG in the round folder, atomically and never over an existing file."""
    written = []
    for returned in masks:
        target = mask_target(round_dir, returned.image)
        try:
            with atomic_path(target, replace=False) as tmp:
                Image.fromarray(returned.mask.astype(np.uint8) * 255).save(tmp)
        except FileExistsError:
            raise MaskClashError(f"{target} appeared while the masks were written (another import?); it was "
                                 f"kept; written before it: {', '.join(p.name for p in written) or 'none'}") from None
        written.append(target)
    return written


def round_csv_text(content: ExportContent, expected: RoundExpectation) -> str:
    """The round's to_annotate.csv with what the export says of each image: the trainer's columns as they were,
    then status, mask file, completed_by, lead_time_s, task and annotation ids (replacing an earlier import's)."""
    rows = [ROUND_COLUMNS + ANNOTATION_COLUMNS]
    for row in expected.rows:
        name, got = row["image"], content.masks.get(row["image"])
        if got is None:
            said = [content.not_returned.get(name, NOT_ANNOTATED), "", "", "", "", ""]
        else:
            lead = "" if got.lead_time is None else f"{got.lead_time:.3f}"
            said = ["annotated", mask_target(expected.round_dir, name).name, got.completed_by, lead, got.task_id,
                    got.annotation_id]
        rows.append([row[c] for c in ROUND_COLUMNS] + said)
    return csv_text(rows)


def import_export(export_path: PathLike, round_dir: PathLike) -> ImportResult:
    """A Label Studio JSON export -> ``<name>_segmentation.png`` masks in ``round_dir``, and who annotated each
    image and how long in the round's to_annotate.csv.

    Everything is checked before anything is written: the folder (a round with Label Studio files, not inside a
    data set's mask folder), the export (this run, this round's images and sizes, this interface, one annotation
    per task) and the masks already there (one ``MaskClashError`` listing every file that would be overwritten or
    duplicated; a mask equal to the export's is left as it is, so importing a later export again works)."""
    round_dir, export_path = Path(round_dir), Path(export_path)
    expected = read_expectation(round_dir)
    in_dataset = dataset_masks(expected)
    check_target(round_dir, in_dataset)
    content = export_content(read_export(export_path), expected, export_path)
    clashes, unchanged = existing_masks(content, round_dir, in_dataset)
    if clashes:
        raise MaskClashError(f"{len(clashes)} mask file(s) there already, never overwritten: "
                             f"{'; '.join(clashes)}. Move them away (or fix the annotation) and import again")
    check_writable(round_dir)
    new = [m for m in content.masks.values() if mask_target(round_dir, m.image) not in unchanged]
    written = write_masks(new, round_dir)
    atomic_write_text(round_dir / ROUND_CSV, round_csv_text(content, expected))
    return ImportResult(written, unchanged, dict(content.not_returned), content.earlier_round_tasks,
                        round_dir / ROUND_CSV, content)


# ----------------------------------------------------------------------------- command line

FLAG_OF_ERROR = {ExportError: "--export", RoundFolderError: "--round_dir", MaskClashError: "--round_dir",
                 WriteError: "--round_dir"}


def summary(result: ImportResult, round_dir: Path) -> str:
    lines = [f"mask(s) written to {round_dir}: {len(result.written)}"
             + (f", {len(result.unchanged)} already there and identical" if result.unchanged else "")
             + (f"; {result.earlier_round_tasks} tasks of earlier rounds left aside" if result.earlier_round_tasks
                else "")]
    if result.not_returned:
        lines.append(f"not returned ({len(result.not_returned)}, they go back to the pool with --accept_partial): "
                     + ", ".join(f"{name} ({why})" for name, why in result.not_returned.items()))
    lines.append(f"who annotated and how long: {result.csv_path}")
    lines.append("continue the run with: python3 trainer.py <the run's flags> --resume")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="The Label Studio hand-over of an --oracle folder round.")
    commands = parser.add_subparsers(dest="command", required=True)
    back = commands.add_parser("import", help="a Label Studio JSON export -> <name>_segmentation.png masks in "
                                              "the round folder (never over an existing mask); who and how long "
                                              "into its to_annotate.csv")
    back.add_argument("--export", required=True, type=Path, help="the project's export (Export -> JSON)")
    back.add_argument("--round_dir", required=True, type=Path,
                      help="the round folder: OUTPUT/Skin_S/annotate/round_NNN")
    args = parser.parse_args(argv)
    try:
        result = import_export(args.export, args.round_dir)
    except (LabelStudioError, WriteError) as err:  # WriteError: the disk filled up while the masks were written
        flag = next((f for kind, f in FLAG_OF_ERROR.items() if isinstance(err, kind)), None)
        parser.exit(2, f"label_studio.py import: {flag + ': ' if flag else ''}{err}\n")
    print(summary(result, args.round_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
