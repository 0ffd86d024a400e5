#!/usr/bin/env python3
"""SAM2 in the annotator's hand: a Label Studio ML backend that answers the annotator's clicks and boxes with the
run's latest model (docs/ml_backend.md).

    python3 label_studio_backend.py --run OUTPUT/Skin_512 --port 9090        # listens on 127.0.0.1

Label Studio's ML backend protocol, as a 1.23 server speaks it (tests/data/label_studio_1.23_ml_backend_requests.json
holds its real request bodies):

    GET  /health   -> {"status": "UP"}                 asked before every /setup
    POST /setup    -> {"model_version": the run's id}   on connecting, and before Label Studio asks for predictions
    POST /predict  -> {"results": [one prediction per task]}
    POST /webhook  -> {}                                the project's events (Label Studio adds the webhook itself);
                                                        nothing to do: training is trainer.py's

``/predict`` without a context (a task opened that has no prediction): the run's proposal, decoder 1 without a
prompt, as the trainer's round computes it; nothing for a task that holds the run's imported proposal (the same
``model_version``, so Label Studio never shows two). With a context (the labelling page's smart tools: Label Studio's
frontend posts ``/api/ml/{id}/interactive-annotating`` with the regions just drawn, and the server sends them here):
the clicks (``keypointlabels``, x/y in percent of the photo, ``is_positive`` false for an Alt+click) and the box
(``rectanglelabels``) prompt the model at once, and the answer is one brush region at the photo's size.

The model is the run's (``config.txt``, built by the one loader) with its newest weights, read-only: reloaded when
``last_state.pth`` or ``last_model.pth`` changes, never written to, the folder's lock never taken. An image is read
from the run's round folders when the task's Local Files path lies in one of them, else fetched from Label Studio
with the token (``LABEL_STUDIO_API_KEY`` or ``--label_studio_token_file``), which is sent to ``--label_studio_url``'s
host only. Every refusal or failure is an error response whose status line carries the message (Label Studio shows
that line, not the body); the server keeps serving.

Its dependencies (Flask) are optional, like the SDK's: requirements-labelstudio.txt. Nothing the trainer imports
imports this module.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import parse_qs, urlsplit

import numpy as np
import torch

import label_studio
import val
from label_studio_api import TOKEN_VARIABLE
from datasets_skin import DatasetError, decode_image, normalize_image, read_image_size
from run_folder import LAST_MODEL, STATE, RunFolder, RunFolderError
from sam2.build_sam import state_mismatch
from proposal_costs import interactive_decoder
from sam_lora_image_encoder_prompt import prompt_mode_of

log = logging.getLogger("label_studio_backend")

FLASK_HINT = "pip install -r requirements-labelstudio.txt"
ROUND_FOLDER = re.compile(r"round_\d{3,}")
DEFAULT_CACHE_ENTRIES = 8


class BackendError(Exception):
    """A request the backend cannot answer; ``status`` is the HTTP status of its error response."""

    status = 500


class RequestError(BackendError):
    """The request's body is not what Label Studio sends (no tasks, a region without coordinates, ...)."""

    status = 400


class ImageRefused(BackendError):
    """The task's image lies where the backend does not read: a path with ``..``, a link out of the round folders,
    a URL on another host than --label_studio_url, or Label Studio's without a token."""

    status = 403


class ImageUnreadable(BackendError):
    """The task's image cannot be read or decoded (missing, damaged, not an image, refused by Label Studio)."""

    status = 422


class ModelUnusable(BackendError):
    """The run's model cannot be built or its weights not loaded (another model's weights, a damaged file)."""

    status = 500


# ----------------------------------------------------------------------------- the run's model

def newest_weights(run_dir: Path) -> Optional[Path]:
    """The run's newest weights: last_state.pth or last_model.pth, whichever was written last (last_state.pth while
    a run is under way, last_model.pth when it has ended; a run resumed after its end writes last_state.pth again);
    None before the first epoch ended (the zero-shot model)."""
    written = [path for path in (run_dir / LAST_MODEL, run_dir / STATE) if path.is_file()]
    return max(written, key=lambda path: path.stat().st_mtime_ns, default=None)


def file_stamp(path: Optional[Path]) -> Optional[Tuple[str, int, int]]:
    """What tells a file's versions apart cheaply (name, mtime, size): the trainer replaces its files by renames."""
    if path is None:
        return None
    try:
        status = path.stat()
    except OSError:
        return None
    return path.name, status.st_mtime_ns, status.st_size


class RunModel:
    """The model of a run folder with its newest weights, read-only (``model()`` reloads when they changed).

    The settings are config.txt's (compare_strategies.read_config: an absent key is its settings.LEGACY value), the
    model the one loader's (compare_strategies.load_run_model): last_model.pth is a full state dict, last_state.pth
    holds the trained tensors (loaded over the model of the run's settings, as a resume does), no file at all is the
    zero-shot model."""

    def __init__(self, run_dir: Path, device: torch.device) -> None:
        from compare_strategies import read_config  # pylint: disable=import-outside-toplevel

        self.run_dir, self.device = Path(run_dir), device
        if not (self.run_dir / "config.txt").is_file():
            raise RunFolderError(f"{self.run_dir} has no config.txt: not a run folder of trainer.py (give the "
                                 "OUTPUT/Skin_{img_size} folder of a run)")
        self.settings = read_config(self.run_dir)
        self.img_size = int(self.settings["img_size"])
        self.use_draft = self.settings.get("decode") == "draft"
        # decoder 2 where the run trained it on prompts, else decoder 1: the cost of annotation's choice
        self.decoder = interactive_decoder(prompt_mode_of(self.settings.get("promptmode", "none")))
        self.net, self.stamp, self.weights = None, None, None

    def model_version(self) -> str:
        """The run's id (label_studio.RUN_ID_FILE, the model_version of its imported proposals; read, never made),
        else the run folder's name."""
        path = self.run_dir / "annotate" / label_studio.RUN_ID_FILE
        return path.read_text().strip() if path.is_file() else self.run_dir.name

    def model(self):
        """The LoRA_Sam of the newest weights (in eval mode); reloaded when they changed since the last call."""
        weights = newest_weights(self.run_dir)
        stamp = file_stamp(weights)
        if self.net is None or stamp != self.stamp:
            self.net = self.load(weights)  # a failure is the request's error; the next request tries again
            self.stamp, self.weights = stamp, weights
            log.info("model: %s", weights.name if weights else "zero-shot (no weights written yet)")
        return self.net

    def load(self, weights: Optional[Path]):
        from compare_strategies import CompareError, load_run_model  # pylint: disable=import-outside-toplevel

        try:
            if weights is not None and weights.name == LAST_MODEL:
                return load_run_model(self.settings, self.device, weights)
            net = load_run_model(self.settings, self.device)
            if weights is not None:
                self.load_trained(net, weights)
            return net
        except CompareError as err:
            raise ModelUnusable(f"the model of {self.run_dir}: {err}") from None

    def load_trained(self, net, path: Path) -> None:
        """last_state.pth's trained tensors over ``net`` (the frozen weights are the run's --checkpoint's)."""
        try:
            trainable = RunFolder(self.run_dir).load_state().trainable
        except RunFolderError as err:
            raise ModelUnusable(str(err)) from None
        own = {name: p.shape for name, p in net.named_parameters() if p.requires_grad}
        mismatch = state_mismatch({k: v.shape for k, v in trainable.items()}, own)
        if mismatch:
            raise ModelUnusable(f"{path} holds the weights of another model than the one its config.txt describes "
                                f"({self.settings.get('model_cfg')}): {mismatch}")
        net.load_state_dict(trainable, strict=False)


# ----------------------------------------------------------------------------- where a task's image comes from

@dataclass(frozen=True)
class ImageSource:
    """A task's image: a file of the run's round folders (``path``), or a path on Label Studio to fetch (``url``:
    path and query, relative to --label_studio_url). ``key`` tells images apart in the embedding cache."""

    key: str
    path: Optional[Path] = None
    url: Optional[str] = None


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` is on ``base``'s scheme, host and port (the token's only destination)."""
    a, b = urlsplit(url), urlsplit(base)
    default = {"http": 80, "https": 443}
    return (a.scheme, a.hostname, a.port or default.get(a.scheme)) == (b.scheme, b.hostname,
                                                                       b.port or default.get(b.scheme))


def image_source(url: str, run_dir: Path, document_root: Path, label_studio_url: str) -> ImageSource:
    """Where the task's image ``url`` (its ``data.image``) is read from; ``ImageRefused`` where it may not be.

    A Local Files URL (``/data/local-files/?d=PATH``, PATH relative to Label Studio's document root) naming a file
    of the run's round folders (RUN/annotate/round_NNN/) is read from there: no ``..`` in PATH, and its real path
    (links followed) must still be such a file. Any other path of Label Studio is fetched from it, with the token;
    a URL on another host is refused (the token goes to --label_studio_url's host only)."""
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        if not same_origin(url, label_studio_url):
            raise ImageRefused(f"the task's image {url} is not on Label Studio ({label_studio_url}); the backend reads "
                               "the run's round folders and fetches from --label_studio_url only")
    local = parse_qs(parts.query).get("d") if parts.path.rstrip("/").endswith("/data/local-files") else None
    if local:
        relative = local[0]  # parse_qs unquoted it once, as Label Studio does
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise ImageRefused(f"the task's Local Files path {relative!r} leaves the document root ('..' or an "
                               "absolute path): refused")
        path = Path(os.path.abspath(document_root)) / relative
        rounds = Path(os.path.abspath(run_dir)) / "annotate"
        if path.parent.parent == rounds and ROUND_FOLDER.fullmatch(path.parent.name):
            real, real_rounds = path.resolve(), rounds.resolve()
            if real.parent.parent != real_rounds or not ROUND_FOLDER.fullmatch(real.parent.name):
                raise ImageRefused(f"{path} is a link to {real}, outside the run's round folders: refused")
            return ImageSource(f"file:{real}", path=real)
    query = f"?{parts.query}" if parts.query else ""
    return ImageSource(f"url:{parts.path}{query}", url=f"{parts.path}{query}")


def read_token(token_file: Optional[Path]) -> Optional[str]:
    """The Label Studio token: ``--label_studio_token_file`` (refused when its group or others may read or write
    it: ``chmod 600``), else LABEL_STUDIO_API_KEY, else None. Never printed."""
    if token_file is None:
        return os.environ.get(TOKEN_VARIABLE) or None
    try:
        mode = token_file.stat().st_mode
        token = token_file.read_text().strip() if not mode & (stat.S_IRWXG | stat.S_IRWXO) else None
    except OSError as err:
        raise PermissionError(f"cannot use {token_file}: {err}") from None
    if token is None:
        raise PermissionError(f"{token_file} may be read by others (mode {stat.filemode(mode)}); "
                              f"`chmod 600 {token_file}`")
    if not token:
        raise PermissionError(f"{token_file} is empty; put the personal access token of Label Studio there")
    return token


@functools.lru_cache(maxsize=2)
def sdk_client(label_studio_url: str, token: str):
    """Label Studio's SDK client of the server and token, made once: its first request exchanges a personal access
    token for an access token, which it keeps (and refreshes when it expires)."""
    from label_studio_sdk import LabelStudio  # pylint: disable=import-outside-toplevel

    return LabelStudio(base_url=label_studio_url, api_key=token)


def fetch_from_label_studio(label_studio_url: str, token: Optional[str], path: str) -> bytes:
    """The bytes Label Studio serves at ``path`` (path and query), asked with the token through Label Studio's SDK
    client (it exchanges a personal access token for an access token, and a legacy token it sends as is)."""
    if not token:
        raise ImageRefused(f"the task's image {path} is not in the run's round folders, and no token to fetch it from "
                           f"Label Studio: set {TOKEN_VARIABLE} or --label_studio_token_file")
    parts = urlsplit(path)
    client = sdk_client(label_studio_url.rstrip("/"), token)
    try:
        # the SDK has no call for a task's file; its HTTP client adds the token's header (and refreshes it)
        response = client._client_wrapper.httpx_client.request(  # pylint: disable=protected-access
            parts.path.lstrip("/"), method="GET", params={k: v[0] for k, v in parse_qs(parts.query).items()})
    except Exception as err:  # noqa: BLE001 - httpx's and the SDK's errors alike: the message says which
        raise ImageUnreadable(f"cannot fetch {path} from {label_studio_url}: {type(err).__name__}") from None
    if response.status_code != 200:
        raise ImageUnreadable(f"Label Studio answered {response.status_code} for the task's image {path}")
    return response.content


# ----------------------------------------------------------------------------- prompts from Label Studio's regions

@dataclass
class Prompts:
    """The annotator's prompts in the photo's pixels: clicks N x 2 (x, y) with labels N (1 positive, 0 negative,
    SAM2's), and a box (x0, y0, x1, y1) or None."""

    points: np.ndarray
    labels: np.ndarray
    box: Optional[np.ndarray]

    def empty(self) -> bool:
        return len(self.points) == 0 and self.box is None


def number(value: dict, key: str, where: str) -> float:
    got = value.get(key)
    if isinstance(got, bool) or not isinstance(got, (int, float)) or not np.isfinite(got):
        raise RequestError(f"{where}: its value.{key} is {got!r}, not a number")
    return float(got)


def prompts_of(regions: Sequence[dict], photo_size: Tuple[int, int]) -> Prompts:
    """The clicks and box of a context's regions (Label Studio's ``params.context.result``): x, y, width and height
    are percentages of the photo (``photo_size``, H x W), as Label Studio's converters read them; ``is_positive``
    false is a negative click (absent, as in a region restored from a draft: positive). Of several boxes the last
    drawn counts (SAM2 takes one box per prompt). Other regions (a brush stroke) are not prompts."""
    height, width = photo_size
    points, labels, boxes = [], [], []
    for place, region in enumerate(regions):
        kind = str(region.get("type", "")).lower() if isinstance(region, dict) else ""
        if kind not in label_studio.PROMPT_TYPES:
            continue
        where, value = f"context region {place + 1} ({kind})", region.get("value") or {}
        if value.get("rotation"):
            raise RequestError(f"{where}: a rotated box ({value['rotation']} degrees); draw it unrotated")
        x, y = number(value, "x", where) / 100 * width, number(value, "y", where) / 100 * height
        if kind == "keypointlabels":
            points.append((x, y))
            labels.append(0 if region.get("is_positive") is False else 1)
        else:
            boxes.append((x, y, x + number(value, "width", where) / 100 * width,
                          y + number(value, "height", where) / 100 * height))
    return Prompts(np.array(points, np.float64).reshape(-1, 2), np.array(labels, np.int64),
                   np.array(boxes[-1], np.float64) if boxes else None)


def to_model_input(prompts: Prompts, photo_size: Tuple[int, int], img_size: int
                   ) -> Tuple[Optional[Tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor]]:
    """Photo pixels -> the model's input pixels as SAM2's predictor maps them (x * S / W, y * S / H): (coords
    1 x N x 2, labels 1 x N) or None, and the box 1 x 4 or None."""
    height, width = photo_size
    scale = np.array([img_size / width, img_size / height])
    points = None
    if len(prompts.points):
        points = (torch.tensor(prompts.points * scale, dtype=torch.float32)[None],
                  torch.tensor(prompts.labels, dtype=torch.int64)[None])
    box = None if prompts.box is None else torch.tensor(prompts.box * np.tile(scale, 2), dtype=torch.float32)[None]
    return points, box


# ----------------------------------------------------------------------------- the backend

@dataclass
class Encoded:
    """One task's image as the model saw it: the image encoder's features and the photo's size (H, W)."""

    features: Dict[str, object]
    photo_size: Tuple[int, int]


def features_bytes(features: Dict[str, object]) -> int:
    """The memory one cache entry's tensors take (each storage once: the embedding is also an FPN level)."""
    tensors = [features["image_embed"], *features["backbone_fpn"]]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class Backend:
    """What answers Label Studio: the run's model, the embedding cache (least recently used first out, at most
    ``cache_entries`` tasks), where images come from. One request at a time (one model, one CPU or GPU)."""

    def __init__(self, run_dir: Path, label_studio_url: str, token: Optional[str], document_root: Path,
                 device: torch.device, cache_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        self.run = RunModel(run_dir, device)
        self.label_studio_url, self.token = label_studio_url, token
        self.document_root, self.device, self.cache_entries = Path(document_root), device, cache_entries
        self.cache: "OrderedDict[Tuple, Encoded]" = OrderedDict()
        self.lock = threading.Lock()

    # ---- the protocol

    def setup(self) -> dict:
        return {"model_version": self.run.model_version()}

    def predict(self, body: dict) -> dict:
        """``/predict``: one prediction per task (``{"result": [...], "model_version": ...}``); without a context,
        none at all when every task holds the run's imported proposal."""
        tasks = body.get("tasks") if isinstance(body, dict) else None
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, dict) for t in tasks):
            raise RequestError("the request holds no tasks (Label Studio sends {\"tasks\": [...], ...})")
        context = (body.get("params") or {}).get("context")
        regions = context.get("result") if isinstance(context, dict) else None
        version = self.run.model_version()
        with self.lock:
            if regions:
                return {"results": [self.prediction(self.answer_prompts(tasks[0], regions), version)]}
            held = [self.holds_proposal(task, version) for task in tasks]
            if all(held):
                return {"results": []}
            # Label Studio 1.23 sends no task holding a prediction of the version /setup gave, so a batch mixing
            # both is not one of its requests; its tasks that hold the proposal would get an empty prediction
            return {"results": [self.prediction(None if holds else self.answer_prompts(task, []), version)
                                for task, holds in zip(tasks, held)]}

    # ---- answers

    @staticmethod
    def holds_proposal(task: dict, version: str) -> bool:
        """Whether the task holds the run's proposal (a prediction of its model_version, imported with the round)."""
        predictions = task.get("predictions") or []  # Label Studio sends them whole
        return any(isinstance(p, dict) and p.get("model_version") == version for p in predictions)

    @staticmethod
    def prediction(mask: Optional[np.ndarray], version: str) -> dict:
        """A prediction of one brush region holding ``mask`` (H x W bool at the photo's size); none when empty."""
        result = []
        if mask is not None and mask.any():
            result = [dict(label_studio.brush_result(mask), id=uuid.uuid4().hex[:10])]
        return {"result": result, "model_version": version}

    def answer_prompts(self, task: dict, regions: Sequence[dict]) -> np.ndarray:
        """The task's mask (H x W bool at the photo's size) for the prompts of ``regions``; without a prompt the
        run's proposal (decoder 1, as the trainer's round)."""
        image = (task.get("data") or {}).get(label_studio.IMAGE_TAG)
        if not isinstance(image, str) or not image:
            raise RequestError(f"task {task.get('id')}: its data has no '{label_studio.IMAGE_TAG}' URL")
        net = self.run.model()
        encoded = self.encoded(image_source(image, self.run.run_dir, self.document_root, self.label_studio_url), net)
        prompts = prompts_of(regions, encoded.photo_size)
        points, box = to_model_input(prompts, encoded.photo_size, self.run.img_size)
        points = None if points is None else tuple(t.to(self.device) for t in points)
        box = None if box is None else box.to(self.device)
        decoder = 1 if prompts.empty() else self.run.decoder
        with torch.no_grad():
            logits = net.predict_logits(None, decoder, points=points, boxes=box, features=encoded.features)
        return val.logits_to_label_map(logits[0], encoded.photo_size) > 0

    def encoded(self, source: ImageSource, net) -> Encoded:
        """The image's features, from the cache or one image-encoder pass (the cache is for the current weights;
        a file of the round folders is known by its stamp too)."""
        key = (source.key, file_stamp(source.path), self.run.stamp)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        for old in [k for k in self.cache if k[-1] != self.run.stamp]:  # features of replaced weights
            del self.cache[old]
        pixels, photo_size = self.photo(source)
        with torch.no_grad():
            features = net.encode(normalize_image(pixels)[None].to(self.device))
        self.cache[key] = Encoded(features, photo_size)
        while len(self.cache) > self.cache_entries:
            self.cache.popitem(last=False)
        return self.cache[key]

    def photo(self, source: ImageSource) -> Tuple[np.ndarray, Tuple[int, int]]:
        """The image as the run's preprocessing makes it (decoded, resized to img_size: datasets_skin, with the
        run's --decode), and its size H x W."""
        if source.path is not None:
            return decoded(source.path, self.run.img_size, self.run.use_draft, str(source.path))
        data = fetch_from_label_studio(self.label_studio_url, self.token, source.url)
        with tempfile.TemporaryDirectory(prefix="mdsam-backend-") as folder:
            path = Path(folder) / "image"
            path.write_bytes(data)
            return decoded(path, self.run.img_size, self.run.use_draft, source.url)


def decoded(path: Path, img_size: int, use_draft: bool, name: str) -> Tuple[np.ndarray, Tuple[int, int]]:
    try:
        size = read_image_size(path)
        return decode_image(path, img_size, use_draft), size
    except (DatasetError, OSError) as err:
        raise ImageUnreadable(f"the task's image {name} cannot be read: {str(err).replace(str(path), name)}") from None


# ----------------------------------------------------------------------------- the web server

def reason_phrase(message: str) -> str:
    """An HTTP status line's reason phrase carrying ``message`` (one line of printable ASCII): Label Studio shows
    ``<status> ... Error: <reason> for url: ...`` and drops the body."""
    text = re.sub(r"\s+", " ", message.encode("ascii", "replace").decode()).strip()
    return text[:400]


def make_app(backend: Backend):
    """The Flask application of ``backend``'s endpoints."""
    try:
        from flask import Flask, jsonify, request  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise SystemExit(f"label_studio_backend.py needs Flask ({err}); install it with `{FLASK_HINT}`") from None

    app = Flask("label_studio_backend")

    def error_response(status: int, message: str):
        response = jsonify(error=message, errors=[message])
        response.status = f"{status} {reason_phrase(message)}"
        return response

    @app.errorhandler(BackendError)
    def refused(err: BackendError):
        log.warning("%s: %s", type(err).__name__, err)
        return error_response(err.status, str(err))

    @app.errorhandler(Exception)
    def failed(err: Exception):
        status = getattr(err, "code", None)
        if isinstance(status, int) and status < 500:  # Flask's own (404, 405, a body that is no JSON)
            return error_response(status, getattr(err, "description", str(err)))
        log.exception("the request failed")
        return error_response(500, f"the backend failed: {type(err).__name__}: {err}")

    @app.get("/health")
    @app.get("/")
    def health():
        return jsonify(status="UP", model_class="MD-SAM-AL " + backend.run.settings.get("model_cfg", ""))

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup())  # its body holds the project creator's token: never read, never logged

    @app.post("/predict")
    def predict():
        return jsonify(backend.predict(request.get_json(force=True, silent=False)))

    @app.post("/webhook")
    def webhook():
        return jsonify({})

    return app


def serve(backend: Backend, host: str, port: int):
    """A threaded werkzeug server of ``make_app(backend)`` (not yet serving: call ``serve_forever``)."""
    from werkzeug.serving import make_server  # pylint: disable=import-outside-toplevel

    return make_server(host, port, make_app(backend), threaded=True)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="A Label Studio ML backend answering clicks and boxes with a run's "
                                                 "latest model (docs/ml_backend.md).")
    parser.add_argument("--run", required=True, type=Path, help="the run folder: OUTPUT/Skin_{img_size}")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--port", default=9090, type=int)
    parser.add_argument("--label_studio_url", default="http://127.0.0.1:8080",
                        help="the Label Studio server; the token is sent there and nowhere else")
    parser.add_argument("--label_studio_token_file", type=Path,
                        help=f"a file (mode 600) holding the token; else the environment's {TOKEN_VARIABLE}")
    parser.add_argument("--document_root", type=Path,
                        help=f"Label Studio's {label_studio.DOCUMENT_ROOT_VARIABLE} (default: this environment's, "
                             "else the run's --output folder, as the trainer's rounds)")
    parser.add_argument("--cache_entries", default=DEFAULT_CACHE_ENTRIES, type=int,
                        help="tasks whose image embedding is kept (least recently used first out)")
    parser.add_argument("--gpu", default=None, help="a CUDA device index; default: the first GPU, else the CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's, one per core); on a CPU shared with other work, "
                             "1 answers a click several times faster (docs/performance.md)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cache_entries < 1:
        parser.exit(2, "label_studio_backend.py: --cache_entries must be at least 1\n")
    if args.threads is not None:
        if args.threads < 1:
            parser.exit(2, "label_studio_backend.py: --threads must be at least 1\n")
        torch.set_num_threads(args.threads)
    try:
        token = read_token(args.label_studio_token_file)
    except PermissionError as err:
        parser.exit(2, f"label_studio_backend.py: --label_studio_token_file: {err}\n")
    device = torch.device(f"cuda:{args.gpu}" if args.gpu is not None else "cuda") if torch.cuda.is_available() \
        else torch.device("cpu")
    root = args.document_root or label_studio.document_root(args.run.parent)
    try:
        backend = Backend(args.run, args.label_studio_url, token, root, device, args.cache_entries)
        backend.run.model()
    except (RunFolderError, ModelUnusable) as err:
        parser.exit(2, f"label_studio_backend.py: --run: {err}\n")
    server = serve(backend, args.host, args.port)
    print(f"MD-SAM-AL backend of {args.run} ({backend.run.settings['model_cfg']}, {backend.run.img_size} px, decoder "
          f"{backend.run.decoder} for clicks, model_version {backend.run.model_version()}) on "
          f"http://{args.host}:{server.port}; images from {root}, else {args.label_studio_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
