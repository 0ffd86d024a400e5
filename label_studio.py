"""The Label Studio hand-over of a person's round: the files Label Studio imports as they are, the way back from
its JSON export to masks, and the same round trip through Label Studio's API (no file to carry).

Out (``write_round_files``, after ``annotation_rounds.write_round`` has written the round folder):

    label_studio_interface.xml   the labelling interface: BrushLabels on the image, one label ``lesion``, and the
                                 smart tools (a click, a box) that label_studio_backend.py answers with a mask
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
task and annotation ids). ``trainer.py --resume`` takes each mask from there; the smart tools' clicks and boxes are
prompts, left aside. The brush RLE is encoded here (``mask_rle``: byte for byte the SDK's encoding, from runs of
pixels) and decoded by Label Studio's own SDK (``label_studio_sdk.converter.brush``); without it this module
imports, and says how to enable it.

An ML backend is connected to a project with ``connect_ml_backend`` (one REST call; the caller authenticates).

Through the API (``label_studio_api`` makes the calls; ``python3 label_studio.py push`` / ``pull --round_dir
ROUND``, and what ``--oracle label_studio`` calls): ``push_round`` adds the round's tasks to the run's project
(made at the first push, recorded in the run folder; a copied run folder gets its own), the images through a Local
Files storage on the round folder when the server serves them from there, else uploaded; tasks already there are
found by their ``mdsam_*`` data and never made twice. ``round_progress`` says how many are annotated and skipped.
``pull_round`` reads the round's annotations and writes them by ``write_returned``, the function ``import_export``
writes an export's with: the same masks, the same CSV columns, never over a mask.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
from PIL import Image

import label_studio_api
from annotation_rounds import PROPOSAL_SUFFIX, ROUND_COLUMNS, ROUND_CSV, RoundItem, read_round, round_mask_path
from datasets_skin import SPLIT_FOLDERS, DatasetError, PathLike, SampleFiles, decode_mask, read_image_size
from safe_io import WriteError, atomic_path, atomic_write_text, csv_text, probe_writable, refusal_reason

INTERFACE_FILE = "label_studio_interface.xml"
TASKS_FILE = "label_studio_tasks.json"
RUN_ID_FILE = "label_studio_run.txt"  # in the run's annotate/ folder: the run id of all its rounds' tasks
DOCUMENT_ROOT_VARIABLE = "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
# The columns an import adds to the round's to_annotate.csv (after the trainer's ROUND_COLUMNS).
ANNOTATION_COLUMNS = ["status", "mask", "completed_by", "lead_time_s", "task_id", "annotation_id"]
IMAGE_TAG, BRUSH_TAG, LESION_LABEL = "image", "lesion_mask", "lesion"
# The smart tools (label_studio_backend.py answers them with a brush mask): a click (positive; Alt+click negative)
# and a box. Their regions are prompts, not masks: an import leaves them aside.
CLICK_TAG, BOX_TAG = "lesion_click", "lesion_box"
PROMPT_TYPES = {"keypointlabels": CLICK_TAG, "rectanglelabels": BOX_TAG}
# Keys of a task's data (besides IMAGE_TAG): what an export is checked against, and columns in Label Studio.
RUN_KEY, ROUND_KEY, NAME_KEY = "mdsam_run", "mdsam_round", "mdsam_image"
# A brush pixel is lesion when its alpha is above this: the mask files' own rule (> 127 of 255), so a
# half-transparent anti-aliased stroke edge counts as lesion from its midpoint on.
ALPHA_THRESHOLD = 127
SDK_HINT = "pip install -r requirements-labelstudio.txt"
LOCAL_FILES_URL = "/data/local-files/?d="
SKIPPED, NOT_ANNOTATED = "skipped", "not_annotated"  # an image not returned: the annotator skipped it, or no one did
MASK_FOLDER_NAMES = {masks for layouts in SPLIT_FOLDERS.values() for _, masks in layouts}
# What a Label Studio 1.23 server needs in its environment to call an ML backend on this machine (127.0.0.1): it
# refuses local addresses for the backend and for the webhook it makes for it unless both are off. Both let the
# server's requests (ML backends, webhooks, imports from URLs) reach addresses of this machine and its network.
ML_BACKEND_ENV = {"ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false"}
log = logging.getLogger("trainer.label_studio")  # under the trainer's logger: a run's lines go to its log.txt


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
    overlays), a header naming the image, its round and its rank in the pool, and the smart tools of an ML backend
    (``label_studio_backend.py``): a click and a box labelled ``lesion`` that the backend turns into a brush mask,
    shown once auto-annotation is on (without a backend they draw nothing the import takes)."""
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
            f'  <KeyPointLabels name="{CLICK_TAG}" toName="{IMAGE_TAG}" smart="true">\n'
            f'    <Label value="{LESION_LABEL}" smart="true" background="#ff8800"/>\n'
            f'  </KeyPointLabels>\n'
            f'  <RectangleLabels name="{BOX_TAG}" toName="{IMAGE_TAG}" smart="true">\n'
            f'    <Label value="{LESION_LABEL}" smart="true" background="#ff8800"/>\n'
            f'  </RectangleLabels>\n'
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


# Label Studio's brush RLE (the SDK's ``encode_rle``/``decode_rle``): a header (the value count in 32 bits, the word
# size - 1 in 5 bits, then each of the four run-length field sizes - 1 in 4 bits), then per run a 1 (a run of one
# value), the index of the length field's size (2 bits), the length - 1 in that many bits and the value (8 bits);
# zeros up to a whole byte (a whole zero byte when already whole, as the SDK's encoder writes).
RLE_FIELD_BITS = (3, 4, 8, 16)
RLE_HEADER = f"{8 - 1:05b}" + "".join(f"{bits - 1:04b}" for bits in RLE_FIELD_BITS)


def mask_rle(mask: np.ndarray) -> List[int]:
    """The brush RLE of the H x W bool ``mask`` (every channel of RGBA 255 on the mask, 0 elsewhere): the bytes
    ``label_studio_sdk.converter.brush.mask2rle(mask * 255)`` gives, computed from the mask's runs of pixels in a
    few array operations (the SDK walks every RGBA value: 49-85 ms for a full-size ISIC mask, 1.3-6.9 ms here)."""
    flat = np.asarray(mask, bool).ravel()
    if not flat.size:
        raise ValueError("an empty mask has no brush RLE")
    ends = np.append(np.flatnonzero(flat[1:] != flat[:-1]) + 1, flat.size)
    lengths = np.diff(np.append(0, ends)).astype(np.int64) * 4  # four channels per pixel
    values = np.where(flat[ends - 1], 255, 0).astype(np.int64)
    # a run longer than 256 values: 65536 at a time, then the rest, each in the 16-bit field (as the SDK)
    chunks = np.where(lengths > 256, -(-lengths // 2 ** 16), 1)
    last = np.cumsum(chunks) - 1
    lengths, values, parts = np.repeat(lengths, chunks), np.repeat(values, chunks), np.repeat(chunks, chunks)
    within = np.arange(len(lengths)) - np.repeat(last - chunks + 1, chunks)
    lengths = np.where(lengths > 256, np.where(within < parts - 1, 2 ** 16, lengths - within * 2 ** 16), lengths)
    index = np.where(parts > 1, 3, np.searchsorted(2 ** np.array(RLE_FIELD_BITS), lengths))
    field = np.array(RLE_FIELD_BITS)[index]
    # each run: 1, the field's index (2 bits), the length - 1 (field bits), the value (8 bits), as one number
    codes = ((((4 + index) << field) + (lengths - 1)) << 8) + values
    widths = 11 + field  # at most 27 bits: each code's bits are the last ``width`` of its 32-bit big-endian form
    every = np.unpackbits(codes.astype(">u4").view(np.uint8)).reshape(-1, 32)
    bits = every[np.arange(32) >= 32 - widths[:, None]]
    header = np.array([int(b) for b in f"{flat.size * 4:032b}{RLE_HEADER}"], np.uint8)
    stream = np.concatenate([header, bits])
    stream = np.append(stream, np.zeros(8 - len(stream) % 8, np.uint8))  # a whole zero byte when whole, as the SDK
    return np.packbits(stream).tolist()


def brush_result(mask: np.ndarray) -> dict:
    """One brush region of Label Studio holding the H x W bool ``mask`` (its RLE, all four channels 255)."""
    height, width = mask.shape
    return dict(id="proposal", type="brushlabels", from_name=BRUSH_TAG, to_name=IMAGE_TAG, origin="prediction",
                original_width=width, original_height=height, image_rotation=0,
                value=dict(format="rle", rle=mask_rle(mask), brushlabels=[LESION_LABEL]))


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


def connect_ml_backend(call, project_id: int, backend_url: str, title: str = "MD-SAM-AL") -> dict:
    """Connect project ``project_id`` to the ML backend at ``backend_url`` (label_studio_backend.py) with
    interactive preannotations on; returns Label Studio's record of the connection (its ``id`` is the backend's).

    ``call(method, path, json=...)``: an authenticated call of the server's REST API returning a response (raising
    on an error status). Label Studio then asks the backend's /health and /setup, and adds a webhook to
    ``backend_url``/webhook; a server that refuses a local address needs ``ML_BACKEND_ENV``."""
    return call("POST", "/api/ml/", json=dict(url=backend_url, project=project_id, is_interactive=True,
                                              title=title)).json()


def folder_round_items(round_dir: Path) -> List[RoundItem]:
    """The items of a round read back from its folder: to_annotate.csv, the image copies, the proposals."""
    items = []
    try:
        for row in read_round(round_dir):
            image = round_dir / row["image"]
            proposal = decode_mask(round_dir / f"{image.stem}{PROPOSAL_SUFFIX}", None).astype(bool)
            sample = SampleFiles(image.stem, image, Path(row["save_mask_as"]), read_image_size(image))
            items.append(RoundItem(sample, float(row["score"]), int(row["rank_in_pool"]), proposal))
    except (OSError, csv.Error, DatasetError, KeyError, TypeError, ValueError) as err:
        raise RoundFolderError(f"{round_dir}: not a round folder the trainer wrote ({type(err).__name__}: {err}); "
                               f"give OUTPUT/Skin_S/annotate/round_NNN") from None
    if not items:
        raise RoundFolderError(f"{round_dir / ROUND_CSV} lists no image")
    return items


def write_folder_round_files(round_dir: PathLike) -> Tuple[Path, Path]:
    """The Label Studio files of a round the trainer wrote without them (label-studio-sdk was not installed then):
    its items read back from the folder, the run's id, the round number of the folder's name (round_NNN), the
    document root of ``document_root`` (the run's output folder unless LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT
    holds it). Returns their paths; raises RoundFolderError, SdkMissingError."""
    round_dir = Path(os.path.abspath(round_dir))
    number = re.fullmatch(r"round_(\d+)", round_dir.name)
    if number is None or round_dir.parent.name != "annotate":
        raise RoundFolderError(f"{round_dir} is not a round folder (OUTPUT/Skin_S/annotate/round_NNN)")
    brush_module()
    items, output = folder_round_items(round_dir), round_dir.parent.parent.parent
    root = document_root(output)
    if root != output and root not in round_dir.parents:
        root = output
    return write_round_files(round_dir, items, run_id(round_dir.parent), int(number.group(1)), root)


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
    """One image's answer in the export: its mask (H x W bool; None for a task that came back without one:
    skipped, or not annotated), who answered and in how many seconds, the task and annotation ids ("" where
    there is none)."""

    image: str
    mask: Optional[np.ndarray]
    completed_by: str
    lead_time: Optional[float]
    task_id: object
    annotation_id: object


@dataclass
class ExportContent:
    """What an export holds for a round: the masks, the images not returned (image -> SKIPPED or
    NOT_ANNOTATED) and the tasks that hold them (image -> its answer without a mask, where the export has its
    task), and how many tasks of earlier rounds of the run were left aside."""

    masks: Dict[str, ReturnedMask] = field(default_factory=dict)
    not_returned: Dict[str, str] = field(default_factory=dict)
    unreturned_tasks: Dict[str, ReturnedMask] = field(default_factory=dict)
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
    decode_rle = brush_module().decode_rle  # SdkMissingError is a ValueError: not a damaged RLE
    try:
        pixels = decode_rle(value["rle"])
    except (ValueError, IndexError, TypeError) as err:
        raise ExportError(f"{where}: its brush RLE cannot be decoded ({type(err).__name__})") from None
    if pixels.size != height * width * 4:
        raise ExportError(f"{where}: its brush RLE holds {pixels.size} values, not {width}x{height}x4 (RGBA)")
    return pixels.reshape(height, width, 4)[..., 3] > ALPHA_THRESHOLD


def is_prompt(region: object) -> bool:
    """Whether a region is a click or box of the interface's smart tools: a prompt of the ML backend, whose answer
    (a brush region) is the mask."""
    return isinstance(region, dict) and PROMPT_TYPES.get(str(region.get("type", "")).lower()) == \
        region.get("from_name") and region.get("to_name") == IMAGE_TAG


def task_answer(task: dict, annotation: Optional[dict], mask: Optional[np.ndarray] = None) -> ReturnedMask:
    """The answer ``annotation`` (None: none) of ``task``: who gave it, in how many seconds, the ids."""
    annotation = annotation or {}
    who = annotation.get("completed_by")
    if isinstance(who, dict):  # some exports expand the user
        who = who.get("email") or who.get("id")
    lead_time = annotation.get("lead_time")
    lead_time = float(lead_time) if isinstance(lead_time, (int, float)) else None  # seconds; absent in old exports
    return ReturnedMask(task["data"][NAME_KEY], mask, "" if who is None else str(who), lead_time, task.get("id"),
                        annotation.get("id", ""))


def annotation_mask(task: dict, annotation: dict, expected: RoundExpectation, where: str) -> ReturnedMask:
    """The merged mask of one annotation (overlapping strokes and regions: their union; none: lesion-free); the
    smart tools' clicks and boxes are left aside (``is_prompt``)."""
    size = expected.sizes[task["data"][NAME_KEY]]
    mask = np.zeros(size, bool)
    for number, region in enumerate(listed(annotation.get("result"), where, "result")):
        if not is_prompt(region):
            mask |= region_mask(region, size, f"{where}, region {number + 1}")
    return task_answer(task, annotation, mask)


def export_content(tasks: List[dict], expected: RoundExpectation, source: object) -> ExportContent:
    """Every mask ``tasks`` hold for the round, after every check (one ``ExportError`` for the first problem);
    ``source`` (the export file, or the project's address) names where they come from in messages."""
    content = ExportContent()
    for task in tasks:
        where = f"{source}: task {task.get('id')}"
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
            skips = [a for a in annotations if a.get("was_cancelled")]
            if name not in content.masks and content.not_returned.get(name) != SKIPPED:
                content.not_returned[name] = SKIPPED if skips else NOT_ANNOTATED
                content.unreturned_tasks[name] = task_answer(task, skips[-1] if skips else None)
            continue
        if name in content.masks:
            raise ExportError(f"{where}: image {name} is annotated in two tasks ({content.masks[name].task_id} and "
                              f"{task.get('id')}; the round's tasks were imported twice?); delete one annotation")
        content.masks[name] = annotation_mask(task, submitted[0], expected, f"{where}, annotation "
                                                                            f"{submitted[0].get('id')}")
        content.not_returned.pop(name, None)
        content.unreturned_tasks.pop(name, None)
    if not content.masks and not content.not_returned:
        raise ExportError(f"{source}: no task of round {expected.round_number} ({content.earlier_round_tasks} "
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
        name = row["image"]
        got = content.masks.get(name) or content.unreturned_tasks.get(name)
        status = "annotated" if name in content.masks else content.not_returned.get(name, NOT_ANNOTATED)
        said = [status, mask_target(expected.round_dir, name).name if name in content.masks else ""]
        if got is None:
            said += ["", "", "", ""]
        else:
            lead = "" if got.lead_time is None else f"{got.lead_time:.3f}"
            said += [got.completed_by, lead, got.task_id, got.annotation_id]
        rows.append([row[c] for c in ROUND_COLUMNS] + said)
    return csv_text(rows)


def import_export(export_path: PathLike, round_dir: PathLike) -> ImportResult:
    """A Label Studio JSON export -> ``<name>_segmentation.png`` masks in ``round_dir``, and who annotated each
    image and how long in the round's to_annotate.csv.

    Everything is checked before anything is written: the folder (a round with Label Studio files, not inside a
    data set's mask folder), the export (this run, this round's images and sizes, this interface, one annotation
    per task) and the masks already there (one ``MaskClashError`` listing every file that would be overwritten or
    duplicated; a mask equal to the export's is left as it is, so importing a later export again works)."""
    expected = target_round(round_dir)
    export_path = Path(export_path)
    return write_returned(export_content(read_export(export_path), expected, export_path), expected)


def target_round(round_dir: PathLike) -> RoundExpectation:
    """What the masks of a round folder must match (``read_expectation``), after checking that the folder is not
    inside a data set's mask folder."""
    expected = read_expectation(round_dir)
    check_target(expected.round_dir, dataset_masks(expected))
    return expected


def write_returned(content: ExportContent, expected: RoundExpectation) -> ImportResult:
    """The masks of ``content`` (an export's, or those pulled through the API) -> ``<name>_segmentation.png`` in the
    round folder, and what came back for each image into its to_annotate.csv: after the check that nothing would
    be overwritten or duplicated (one ``MaskClashError`` listing every such file; nothing written)."""
    round_dir = expected.round_dir
    clashes, unchanged = existing_masks(content, round_dir, dataset_masks(expected))
    if clashes:
        raise MaskClashError(f"{len(clashes)} mask file(s) there already, never overwritten: "
                             f"{'; '.join(clashes)}. Move them away (or fix the annotation) and import again")
    check_writable(round_dir)
    new = [m for m in content.masks.values() if mask_target(round_dir, m.image) not in unchanged]
    written = write_masks(new, round_dir)
    atomic_write_text(round_dir / ROUND_CSV, round_csv_text(content, expected))
    return ImportResult(written, unchanged, dict(content.not_returned), content.earlier_round_tasks,
                        round_dir / ROUND_CSV, content)


# ----------------------------------------------------------------------------- through Label Studio's API

def run_folder_of(round_dir: Path) -> Path:
    """The run folder of a round folder (RUN/annotate/round_NNN)."""
    return Path(os.path.abspath(round_dir)).parent.parent


def round_tasks(client: label_studio_api.Client, project_id: int, expected: RoundExpectation,
                fields: str = "all") -> List[dict]:
    """The project's tasks of the round (by their data's run and round number)."""
    return label_studio_api.find_tasks(client, project_id, {RUN_KEY: expected.run_id,
                                                            ROUND_KEY: expected.round_number}, fields)


def tasks_by_image(tasks: List[dict]) -> Dict[str, List[int]]:
    """image name -> the ids of its tasks."""
    found: Dict[str, List[int]] = {}
    for task in tasks:
        found.setdefault(task["data"][NAME_KEY], []).append(task["id"])
    return found


def local_files_root(round_dir: Path, tasks: List[dict]) -> Optional[Path]:
    """The document root the tasks' image addresses were written for (None when they are not Local Files
    addresses of the round folder's images)."""
    roots = set()
    for task in tasks:
        url = str(task["data"].get(IMAGE_TAG, ""))
        relative = parse_qs(urlsplit(url).query).get("d", [""])[0] if url.startswith(LOCAL_FILES_URL) else ""
        image = Path(os.path.abspath(round_dir / task["data"][NAME_KEY])).as_posix()
        if not relative or not image.endswith("/" + relative):
            return None
        roots.add(image[:-len(relative) - 1] or "/")
    return Path(roots.pop()) if len(roots) == 1 else None


def served_images(client: label_studio_api.Client, project_id: int, round_dir: Path,
                  tasks: List[dict]) -> Tuple[List[dict], str, str]:
    """``tasks`` with the addresses their images are served at: through a Local Files storage on the round folder
    when the server serves them from there (the addresses of the tasks file: the server on this machine, its
    document root the one they were written for), else uploaded. (tasks, LOCAL_FILES or UPLOAD, why)."""
    root = local_files_root(round_dir, tasks)
    if root is None:
        why = f"the round's {TASKS_FILE} holds no Local Files addresses of its images"
    else:
        served, why = label_studio_api.local_files_storage(client, project_id, round_dir, tasks[0]["data"][IMAGE_TAG])
        if served:
            return tasks, label_studio_api.LOCAL_FILES, f"{why}; document root {root}"
        why += (f": its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is not {root} (the root the round's addresses were "
                "written for), or it runs on another machine")
    addresses = label_studio_api.upload_files(client, project_id, [round_dir / t["data"][NAME_KEY] for t in tasks])
    tasks = [dict(t, data={**t["data"], IMAGE_TAG: addresses[t["data"][NAME_KEY]]}) for t in tasks]
    return tasks, label_studio_api.UPLOAD, f"uploaded through the import API: {why}"


@dataclass
class PushedRound:
    """A round pushed: the project's id and address, the tasks made now and those found there already (image ->
    task ids), how its images reach the server (LOCAL_FILES or UPLOAD, "" when nothing was added) and why, and
    notes (an image in several tasks)."""

    project_id: int
    project_url: str
    created: Dict[str, List[int]]
    existing: Dict[str, List[int]]
    images_from: str
    why: str
    notes: List[str] = field(default_factory=list)


def push_round(client: label_studio_api.Client, round_dir: PathLike) -> PushedRound:
    """Add the round's tasks to the run's project (``label_studio_api.ensure_project``, with the round's interface):
    each image's task of the round's tasks file (written here first for a round without one:
    ``write_folder_round_files``), the model's proposal its prediction, the image served as ``served_images``
    says. Tasks already in the project (the same run, round and image) are kept, never made twice. Logged."""
    round_dir = Path(round_dir)
    if not (round_dir / TASKS_FILE).is_file():
        write_folder_round_files(round_dir)
    expected = target_round(round_dir)
    tasks = json.loads((round_dir / TASKS_FILE).read_text())
    project_id = label_studio_api.ensure_project(client, run_folder_of(round_dir), expected.run_id,
                                                 (round_dir / INTERFACE_FILE).read_text())
    url, where = client.project_url(project_id), f"round {expected.round_number}"
    existing = tasks_by_image(round_tasks(client, project_id, expected, "task_only"))
    notes = [f"{name} has {len(ids)} tasks in {url} (ids {', '.join(map(str, ids))}): annotate one, delete the "
             "others" for name, ids in existing.items() if len(ids) > 1]
    for note in notes:
        log.warning("%s: %s", where, note)
    missing = [t for t in tasks if t["data"][NAME_KEY] not in existing]
    if not missing:
        log.info("%s: its %d tasks are in %s already; nothing added", where, len(tasks), url)
        return PushedRound(project_id, url, {}, existing, "", "nothing to add", notes)
    missing, images_from, why = served_images(client, project_id, round_dir, missing)
    label_studio_api.add_tasks(client, project_id, missing, f"the tasks of {where}")
    now = tasks_by_image(round_tasks(client, project_id, expected, "task_only"))
    created = {name: [i for i in ids if i not in existing.get(name, [])] for name, ids in now.items()}
    created = {name: ids for name, ids in created.items() if ids}
    log.info("%s: %d task(s) added to %s%s; images: %s", where, sum(map(len, created.values())), url,
             f" ({len(existing)} there already)" if existing else "", why)
    return PushedRound(project_id, url, created, existing, images_from, why, notes)


@dataclass(frozen=True)
class RoundProgress:
    """Where a round stands in Label Studio: its images annotated, skipped, left to do, and without a task."""

    round_number: int
    annotated: List[str]
    skipped: List[str]
    left: List[str]
    no_task: List[str]

    @property
    def done(self) -> bool:
        """Every image of the round annotated or skipped."""
        return not self.left and not self.no_task

    def line(self) -> str:
        total = len(self.annotated) + len(self.skipped) + len(self.left) + len(self.no_task)
        return (f"round {self.round_number}: {len(self.annotated)} of {total} annotated, {len(self.skipped)} skipped"
                + (f", {len(self.no_task)} without a task" if self.no_task else ""))


def pushed_project(client: label_studio_api.Client, round_dir: Path) -> Tuple[RoundExpectation, int]:
    """The round's expectation and the project it was pushed to, read from the run's record (a copy of the run
    folder reads the project its original pushed the round to). ``ProjectGoneError`` when the run has no project
    on this server, or its project is gone."""
    expected = target_round(round_dir)
    run_dir = run_folder_of(round_dir)
    record = label_studio_api.read_project_record(run_dir)
    if record is None or label_studio_api.normal_url(record["url"]) != client.url:
        where = "no Label Studio project" if record is None else f"its project on {record['url']}"
        raise label_studio_api.ProjectGoneError(
            f"{client.url}: round {expected.round_number} ({round_dir}) was not pushed to this server (the run has "
            f"{where}); push it first: python3 label_studio.py push --round_dir {round_dir}")
    project_id = int(record["project"])
    label_studio_api.check_project(client, project_id, run_dir)
    return expected, project_id


def round_progress(client: label_studio_api.Client, round_dir: PathLike) -> RoundProgress:
    """How many of the round's images are annotated, skipped, left (one light listing of its tasks, no results:
    Label Studio's counts of submitted and cancelled annotations)."""
    expected, project_id = pushed_project(client, Path(round_dir))
    order = ["left", SKIPPED, "annotated"]  # an image in two tasks: the furthest one counts
    state: Dict[str, str] = {}
    for task in round_tasks(client, project_id, expected, "task_only"):
        now = ("annotated" if (task.get("total_annotations") or 0) > 0 else
               SKIPPED if (task.get("cancelled_annotations") or 0) > 0 else "left")
        state[task["data"][NAME_KEY]] = max(now, state.get(task["data"][NAME_KEY], "left"), key=order.index)
    names = sorted(expected.sizes)
    return RoundProgress(expected.round_number, [n for n in names if state.get(n) == "annotated"],
                         [n for n in names if state.get(n) == SKIPPED], [n for n in names if state.get(n) == "left"],
                         [n for n in names if n not in state])


def pull_round(client: label_studio_api.Client, round_dir: PathLike, accept_partial: bool = False) -> ImportResult:
    """The round's annotations, read through the API (no export file), -> ``<name>_segmentation.png`` in the round
    folder and who answered and how long into its to_annotate.csv, by ``write_returned`` (the rules of
    ``label_studio.py import``: never over a mask). Refused, nothing written: an image without a task
    (``TaskGoneError``), tasks neither annotated nor skipped unless ``accept_partial`` (``RoundNotDoneError``,
    listing them), every check of an export (``ExportError``, ``MaskClashError``)."""
    round_dir = Path(round_dir)
    expected, project_id = pushed_project(client, round_dir)
    tasks = round_tasks(client, project_id, expected)
    source = client.project_url(project_id)
    no_task = sorted(set(expected.sizes) - set(tasks_by_image(tasks)))
    if no_task:
        raise label_studio_api.TaskGoneError(
            f"{source}: round {expected.round_number} has no task for {', '.join(no_task)} (deleted by hand?); push "
            f"the round again to make them: python3 label_studio.py push --round_dir {round_dir}")
    content = export_content(tasks, expected, source)
    waiting = [(name, client.task_url(project_id, content.unreturned_tasks[name].task_id))
               for name, why in content.not_returned.items() if why == NOT_ANNOTATED]
    if waiting and not accept_partial:
        raise label_studio_api.RoundNotDoneError(
            f"{source}: round {expected.round_number} has {len(waiting)} image(s) neither annotated nor skipped: "
            + ", ".join(f"{name} ({url})" for name, url in waiting) + "; annotate or skip them, or accept the round "
            "as it is (--accept_partial: they go back to the pool)", waiting)
    result = write_returned(content, expected)
    log.info("round %d pulled from %s: %d mask(s) written, %d already there, %d not returned",
             expected.round_number, source, len(result.written), len(result.unchanged), len(result.not_returned))
    return result


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
    lines.append("continue the run with: python3 trainer.py <the run's flags> --resume"
                 + (" --accept_partial" if result.not_returned else ""))
    return "\n".join(lines)


def push_summary(pushed, round_dir: Path) -> str:
    """What ``label_studio.py push`` says when the round is in the project: where to annotate, what next."""
    return "\n".join([f"annotate in Label Studio: {pushed.project_url} (Label All Tasks)",
                      f"then: python3 label_studio.py pull --round_dir {round_dir}"])


def api_command(args: argparse.Namespace) -> str:
    """``push`` or ``pull`` through Label Studio's API; what to print."""
    client = label_studio_api.connect(args.label_studio_url, label_studio_api.read_token(args.label_studio_token_file))
    if args.command == "push":
        return push_summary(push_round(client, args.round_dir), args.round_dir)
    return summary(pull_round(client, args.round_dir, args.accept_partial), args.round_dir)


def error_flag(err: Exception, args: argparse.Namespace, round_folder_flag: str = "--round_dir") -> Optional[str]:
    """The flag (or variable) an error of ``push`` or ``pull`` is about, for the one line the command says;
    ``round_folder_flag``: the calling command's flag that names the round folder (trainer.py's are in --output)."""
    if isinstance(err, label_studio_api.TokenError):
        return "--label_studio_token_file" if args.label_studio_token_file else f"${label_studio_api.TOKEN_VARIABLE}"
    if isinstance(err, label_studio_api.ServerUnreachableError):
        return "--label_studio_url"
    if isinstance(err, label_studio_api.RoundNotDoneError):
        return "--accept_partial"
    flag = next((f for kind, f in FLAG_OF_ERROR.items() if isinstance(err, kind) and f != "--export"), None)
    return round_folder_flag if flag == "--round_dir" else flag


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="The Label Studio hand-over of a round: by files (import) or "
                                                 "through Label Studio's API (push, pull).")
    commands = parser.add_subparsers(dest="command", required=True)
    back = commands.add_parser("import", help="a Label Studio JSON export -> <name>_segmentation.png masks in "
                                              "the round folder (never over an existing mask); who and how long "
                                              "into its to_annotate.csv")
    back.add_argument("--export", required=True, type=Path, help="the project's export (Export -> JSON)")
    push = commands.add_parser("push", help="add the round's tasks (the model's proposals as predictions) to the "
                                            "run's Label Studio project through its API; the project is made at "
                                            "the first push")
    pull = commands.add_parser("pull", help="the round's annotations through Label Studio's API -> "
                                            "<name>_segmentation.png masks in the round folder, as import does")
    pull.add_argument("--accept_partial", action="store_true",
                      help="write the masks there are while images are neither annotated nor skipped")
    for command in (back, push, pull):
        command.add_argument("--round_dir", required=True, type=Path,
                             help="the round folder: OUTPUT/Skin_S/annotate/round_NNN")
    for command in (push, pull):
        command.add_argument("--label_studio_url", default=label_studio_api.DEFAULT_URL,
                             help="the Label Studio server (default %(default)s)")
        command.add_argument("--label_studio_token_file", type=Path, default=None,
                             help="a file holding your personal access token, readable by you alone (default: "
                                  "$LABEL_STUDIO_API_KEY)")
    args = parser.parse_args(argv)
    progress = logging.StreamHandler(sys.stdout)  # what push and pull log (the project made, how images go)
    progress.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(progress)
    log.setLevel(logging.INFO)
    try:
        said = (summary(import_export(args.export, args.round_dir), args.round_dir) if args.command == "import"
                else api_command(args))
    except (LabelStudioError, label_studio_api.ApiError, WriteError) as err:  # WriteError: e.g. the disk filled up
        flag = (next((f for kind, f in FLAG_OF_ERROR.items() if isinstance(err, kind)), None)
                if args.command == "import" else error_flag(err, args))
        parser.exit(2, f"label_studio.py {args.command}: {flag + ': ' if flag else ''}{err}\n")
    finally:
        log.removeHandler(progress)
    print(said)
    return 0


if __name__ == "__main__":
    sys.exit(main())
