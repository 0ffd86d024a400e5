"""Helpers of the Label Studio tests: a round made from real-format data, Label Studio's export format (as a
1.23 server writes it), and a real Label Studio server on 127.0.0.1 with its REST API.

The server (``LabelStudioServer``) is Label Studio 1.23.2 in a virtualenv of its own (it pins old requests/pytz
and pulls Django): ``$MDSAM_LABEL_STUDIO`` names its ``label-studio`` executable, else the one ``.ci/run``
installs under ``${MDSAM_CACHE:-~/.cache/mdsam}/label-studio-1.23.2`` is used (``label_studio_executable``).
tests/conftest.py starts one per test session (``label_studio``) from a database migrated once
(``migrated_data``); tests that stop or restart a server start their own from a copy of that database
(``fresh_label_studio``). Nothing a server does leaves the machine: it listens on 127.0.0.1, keeps its data
(SQLite) and its HOME in a temporary folder, and runs with Sentry, analytics and the PyPI version check off.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np

import annotation_rounds
import label_studio
from datasets_skin import MASK_SUFFIX, decode_image, decode_mask, discover_samples, find_split, normalize_image
from synthetic_isic import make_synthetic_isic

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "isic-sample"  # six real ISIC-2017 photos (1024 x 683)
REAL_PHOTOS = sorted((SAMPLE / "images").glob("*.jpg"))[:1]  # with their masks in SAMPLE / "masks"

RUN_ID, ROUND = "run-under-test", 3


# ----------------------------------------------------------------------------- a round

@dataclass
class MadeRound:
    """A round folder with the Label Studio files; ``answers``: image file name -> its true mask (H x W bool),
    hidden from the data set as for a person to annotate; ``items`` as the trainer would give them."""

    data_root: Path
    round_dir: Path
    document_root: Path
    items: List[annotation_rounds.RoundItem]
    answers: Dict[str, np.ndarray]


def shifted(mask: np.ndarray) -> np.ndarray:
    """A proposal that is wrong in a way a person corrects: the mask moved right by a tenth of its width."""
    return np.roll(mask, max(1, mask.shape[1] // 10), axis=1)


def make_round(where: Path, n_synthetic: int = 3, size: int = 300, real_photos: List[Path] = (),
               empty_proposal: Optional[int] = None, document_root: Optional[Path] = None) -> MadeRound:
    """Synthetic ISIC-format images (``size`` px wide JPEGs) plus copies of ``real_photos`` (with their masks from
    the sibling ``masks`` folder) as an unlabeled data set under ``where/data``; a round of all of them (ranks in
    name order, scores decreasing) written as the trainer does under ``where/root`` (the document root), or, given
    a ``document_root`` that holds ``where`` (a server's), under ``where``."""
    data = make_synthetic_isic(where / "data", n_train=n_synthetic, n_val=1, size=size, seed=11)
    image_dir, mask_dir = find_split(data, "Training")
    for photo in real_photos:
        shutil.copyfile(photo, image_dir / photo.name)
        mask_name = f"{photo.stem}{MASK_SUFFIX}"
        shutil.copyfile(photo.parent.parent / "masks" / mask_name, mask_dir / mask_name)
    hidden = annotation_rounds.hide_masks(mask_dir, where / "answers")
    samples = discover_samples(image_dir, mask_dir, unlabeled_ok=True)
    answers = {s.image_path.name: decode_mask(hidden / s.mask_path.name, None).astype(bool) for s in samples}
    items = [annotation_rounds.RoundItem(s, 1.0 - 0.125 * rank, rank + 1,
                                         np.zeros(s.orig_size, bool) if rank == empty_proposal
                                         else shifted(answers[s.image_path.name]))
             for rank, s in enumerate(samples)]
    root = document_root or where / "root"
    round_dir = (where if document_root else root) / "out" / "Skin_512" / "annotate" / f"round_{ROUND:03d}"
    annotation_rounds.write_round(round_dir, items)
    label_studio.write_round_files(round_dir, items, RUN_ID, ROUND, root)
    return MadeRound(data, round_dir, root, items, answers)


def real_format_data(root: Path, training: List[Path], validation: List[Path]) -> Path:
    """The ISIC photos ``training`` / ``validation`` with their masks (the sibling ``masks`` folder), in the README
    layout under ``root``."""
    for split, photos in (("Training", training), ("Validation", validation)):
        (root / f"{split}_Data").mkdir(parents=True)
        (root / f"{split}_GroundTruth").mkdir()
        for photo in photos:
            shutil.copyfile(photo, root / f"{split}_Data" / photo.name)
            mask = f"{photo.stem}{MASK_SUFFIX}"
            shutil.copyfile(photo.parent.parent / "masks" / mask, root / f"{split}_GroundTruth" / mask)
    return root


# ----------------------------------------------------------------------------- a trainer's round and its model

BACKEND_SIZE = 64
BACKEND_RUN = ["--model_cfg", "sam2.1_hiera_t", "--checkpoint", "none", "--gpu", "cpu", "--img_size",
               str(BACKEND_SIZE), "--batch_size", "3", "--pool_size", "4", "--max_epochs", "2", "--val_every", "2",
               "--save_from_epoch", "9"]


def trainer_round(where: Path, document_root: Optional[Path] = None) -> dict:
    """``trainer.py --oracle folder`` on synthetic photos (200 px wide, 0.66-0.8 as high): round 1 waits for a
    person, last_state.pth holds the model that proposed its masks, the round's Label Studio tasks point at its
    copies (URLs relative to ``document_root``, which holds ``where``; default: the --output folder). ``root``: the
    document root the URLs are relative to."""
    import pytest

    import trainer

    data = make_synthetic_isic(where / "data", n_train=4, n_val=1, size=200, seed=5)
    annotation_rounds.hide_masks(data / "Training_GroundTruth", where / "answers")  # the person's to make
    with pytest.MonkeyPatch.context() as patch:
        if document_root is None:
            patch.delenv(label_studio.DOCUMENT_ROOT_VARIABLE, raising=False)
        else:
            patch.setenv(label_studio.DOCUMENT_ROOT_VARIABLE, str(document_root))
        result = trainer.main(BACKEND_RUN + ["--oracle", "folder", "--data_root", str(data), "--output",
                                             str(where / "out")])
    tasks = json.loads((result["round_dir"] / label_studio.TASKS_FILE).read_text())
    return dict(where=where, out=where / "out", run_dir=result["run_dir"], round_dir=result["round_dir"],
                tasks=tasks, data=data, root=document_root or where / "out")


def run_model(run_dir: Path, weights: str = "last_state.pth"):
    """``trainer_round``'s model built here: hiera_t with the run's seeded random weights (config.txt: checkpoint
    none, seed 0), the trained tensors of last_state.pth over it (or a whole last_model.pth)."""
    import torch

    from sam_lora_image_encoder_prompt import build_model

    net = build_model("sam2.1_hiera_t", None, BACKEND_SIZE, seed=0).eval()
    state = torch.load(run_dir / weights, weights_only=True)
    if weights == "last_state.pth":
        net.load_state_dict(state["trainable"], strict=False)
    else:
        net.load_state_dict(state)
    return net


def expected_mask(net, photo: Path, clicks=(), box=None, decoder: int = 1, size: int = BACKEND_SIZE) -> np.ndarray:
    """What LoRA_Sam.predict_logits gives for Label Studio's prompts: clicks (x %, y %, positive) and a box
    (x %, y %, width %, height %) -> input pixels x * S / 100, y * S / 100 (the photo's W and H cancel); labels 1
    positive, 0 negative; the logits upsampled bilinearly to the photo's H x W, lesion where logit > 0."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    width, height = Image.open(photo).size
    image = normalize_image(decode_image(photo, size))[None]  # the run's decode (full) and resize
    points = None
    if clicks:
        points = (torch.tensor([[[x * size / 100, y * size / 100] for x, y, _ in clicks]], dtype=torch.float32),
                  torch.tensor([[1 if positive else 0 for _, _, positive in clicks]]))
    boxes = None
    if box is not None:
        x, y, w, h = box
        boxes = torch.tensor([[x * size / 100, y * size / 100, (x + w) * size / 100, (y + h) * size / 100]])
    with torch.no_grad():
        logits = net.predict_logits(image, decoder, points=points, boxes=boxes)
    upsampled = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    return (upsampled[0, 1] > 0).numpy()


# ----------------------------------------------------------------------------- Label Studio's formats

def brush_region(mask: np.ndarray, alpha: int = 255, size: Optional[tuple] = None, label: str = "lesion") -> dict:
    """A brush region as Label Studio stores it: RGBA pixels (cyan, ``alpha`` on the mask) RLE-encoded by the
    SDK; ``size`` (H, W) overrides the declared image size."""
    from label_studio_sdk.converter import brush

    height, width = size or mask.shape
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask] = (0, 255, 255, alpha)
    return dict(id=f"r{int(mask.sum())}", type="brushlabels", from_name="lesion_mask", to_name="image",
                original_width=width, original_height=height, image_rotation=0, origin="manual",
                value=dict(format="rle", rle=brush.encode_rle(rgba.ravel()), brushlabels=[label]))


def annotation(regions: List[dict], annotation_id: int = 1, completed_by: int = 1, lead_time: float = 7.25,
               cancelled: bool = False) -> dict:
    """One annotation in a JSON export (the fields a 1.23 export holds that the import reads)."""
    return dict(id=annotation_id, completed_by=completed_by, was_cancelled=cancelled, ground_truth=False,
                lead_time=lead_time, result=regions)


def export_of(round_dir: Path, annotations: Dict[str, List[dict]]) -> List[dict]:
    """A JSON export of the round's tasks: those with annotations (image file name -> its annotations), as a
    server exports them (tasks without any annotation are left out)."""
    tasks = label_studio.read_export(round_dir / label_studio.TASKS_FILE)
    return [dict(id=100 + number, data=task["data"], predictions=task["predictions"], drafts=[],
                 annotations=annotations[task["data"]["mdsam_image"]])
            for number, task in enumerate(tasks) if task["data"]["mdsam_image"] in annotations]


# ----------------------------------------------------------------------------- a real server

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening_addresses(port: int) -> List[str]:
    """The local addresses (hex, as /proc/net/tcp* write them) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    found.append(local.rsplit(":", 1)[0])
    return found


LABEL_STUDIO_VERSION = "1.23.2"
INSTALLED_MARKER = ".mdsam-installed"  # .ci/run writes it into the virtualenv after a successful install


def label_studio_executable() -> Optional[str]:
    """The ``label-studio`` executable the tests use: $MDSAM_LABEL_STUDIO, else the one in the virtualenv
    .ci/run installs (``${MDSAM_CACHE:-~/.cache/mdsam}/label-studio-1.23.2``, complete when its marker is there);
    None when there is neither."""
    if os.environ.get("MDSAM_LABEL_STUDIO"):
        return os.environ["MDSAM_LABEL_STUDIO"]
    cache = Path(os.environ.get("MDSAM_CACHE") or Path.home() / ".cache" / "mdsam")
    venv = cache / f"label-studio-{LABEL_STUDIO_VERSION}"
    executable = venv / "bin" / "label-studio"
    return str(executable) if (venv / INSTALLED_MARKER).is_file() and executable.is_file() else None


def server_environment(where: Path, document_root: Path) -> Dict[str, str]:
    """The environment of a server whose HOME and data lie in ``where``: Local Files served from
    ``document_root``, sign-up disabled, nothing sent off the machine (no Sentry, analytics or PyPI version
    check), and an ML backend on 127.0.0.1 allowed (ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED: see
    docs/annotating.md for what that permits)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO_")}
    return {**inherited, "HOME": str(where / "home"), "LABEL_STUDIO_BASE_DATA_DIR": str(where / "data"),
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "0", "LATEST_VERSION_CHECK": "0",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", **label_studio.ML_BACKEND_ENV}


def migrated_data(executable: str, where: Path, timeout_s: float) -> Path:
    """A new data folder (SQLite database migrated, the user ``LabelStudioServer.EMAIL`` created, the secret key
    its tokens are signed with) made by ``label-studio init``: copied, it starts a server in seconds."""
    (where / "home").mkdir(parents=True, exist_ok=True)
    command = [executable, "init", "--no-browser", "--data-dir", str(where / "data"),
               "--username", LabelStudioServer.EMAIL, "--password", LabelStudioServer.PASSWORD]
    done = subprocess.run(command, env=server_environment(where, where), capture_output=True, text=True,
                          timeout=timeout_s, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not (where / "data" / "label_studio.sqlite3").is_file():
        raise RuntimeError(f"label-studio init exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return where / "data"


class LabelStudioServer:
    """``label-studio start`` on 127.0.0.1 with its own data folder (a copy of ``data``, a ``migrated_data``
    folder; without it a new database is migrated at the first start), SQLite, telemetry off and sign-up
    disabled. ``token`` is a personal access token (a refresh token) and ``api`` a requests session authenticated
    by it (refresh token -> access token)."""

    EMAIL, PASSWORD = "annotator@example.org", "round-trip-Passw0rd"

    def __init__(self, executable: str, where: Path, document_root: Path, data: Optional[Path] = None,
                 port: Optional[int] = None, env: Optional[Dict[str, str]] = None) -> None:
        self.executable, self.where, self.document_root = executable, where, document_root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**server_environment(where, document_root), **(env or {})}
        (where / "home").mkdir(parents=True, exist_ok=True)
        if data is not None and not (where / "data").exists():
            shutil.copytree(data, where / "data")
        self.new_user = data is None
        self.api = self.token = self.process = self.log = None
        self.start()

    def start(self) -> None:
        """Start the server (again, after ``stop``: the same data, port and address)."""
        user = ["--username", self.EMAIL, "--password", self.PASSWORD] if self.new_user else []
        self.log = open(self.where / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [self.executable, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.where / "data"), *user],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.new_user = False

    def log_tail(self) -> str:
        return (self.where / "server.log").read_text(errors="replace")[-3000:]

    def wait_until_up(self, timeout_s: float) -> float:
        """Seconds until /health answered (the first start migrates a new SQLite database)."""
        import requests

        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"label-studio exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return time.monotonic() - start
            except requests.ConnectionError:
                pass
            time.sleep(1)
        raise RuntimeError(f"label-studio did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def login(self, email: str, password: str):
        """A browser-like session logged in through the login form (with its CSRF token)."""
        import requests

        session = requests.Session()
        session.get(f"{self.url}/user/login/", timeout=30)
        session.post(f"{self.url}/user/login/", allow_redirects=False, timeout=30,
                     data=dict(email=email, password=password, csrfmiddlewaretoken=session.cookies.get("csrftoken")),
                     headers={"Referer": f"{self.url}/user/login/"})
        return session

    def authenticate(self) -> None:
        """Personal access token: created once by the logged-in user (POST /api/token/, the refresh token),
        exchanged for a short-lived access token (POST /api/token/refresh/), sent as 'Authorization: Bearer'."""
        import requests

        session = self.login(self.EMAIL, self.PASSWORD)
        made = session.post(f"{self.url}/api/token/", timeout=30,
                            headers={"X-CSRFToken": session.cookies.get("csrftoken"), "Referer": f"{self.url}/"})
        made.raise_for_status()
        self.token = made.json()["token"]
        self.api = requests.Session()
        self.refresh_access()

    def refresh_access(self) -> None:
        """A new access token from the refresh token (an access token lives 5 minutes)."""
        import requests

        access = requests.post(f"{self.url}/api/token/refresh/", json={"refresh": self.token}, timeout=30)
        access.raise_for_status()
        self.api.headers["Authorization"] = f"Bearer {access.json()['access']}"

    def call(self, method: str, path: str, **kwargs):
        response = self.api.request(method, f"{self.url}{path}", timeout=120, **kwargs)
        if response.status_code == 401:  # the access token expired
            self.refresh_access()
            response = self.api.request(method, f"{self.url}{path}", timeout=120, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text[:500]}"
        return response

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def labelling_page(server: LabelStudioServer, page_path: str, profile: Path, refused: List[str],
                   canvas: bool = True) -> Iterator:
    """Headless Debian Chromium (driven by ``playwright``, no browser download; 1280 x 800) logged in to ``server``
    and showing ``page_path`` once it has loaded (its canvas too, with ``canvas``): yields the playwright page.
    Every request to another host is refused and its URL appended to ``refused``."""
    from playwright.sync_api import sync_playwright

    def only_local(route):
        if route.request.url.startswith((server.url, "blob:", "data:")):
            return route.continue_()
        refused.append(route.request.url)
        return route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=shutil.which("chromium") or "/usr/bin/chromium", headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 800})
        try:
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(f"{server.url}/user/login/")
            page.fill("input[name=email]", server.EMAIL)
            page.fill("input[name=password]", server.PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            page.goto(f"{server.url}{page_path}")
            if canvas:
                page.wait_for_selector("canvas", timeout=120_000)
            page.wait_for_load_state("networkidle")
            yield page
        finally:
            browser.close()


def hand_over(server: LabelStudioServer, round_dir: Path, project_id: Optional[int] = None) -> int:
    """What docs/annotating.md has a person do for a round by hand: a project with the round's interface (unless
    ``project_id``, the run's project, is given), a Local Files storage on the round folder, the round's tasks
    imported."""
    if project_id is None:
        interface = (round_dir / label_studio.INTERFACE_FILE).read_text()
        project_id = server.call("POST", "/api/projects/", json=dict(title=round_dir.name, label_config=interface)
                                 ).json()["id"]
    server.call("POST", "/api/storages/localfiles/",
                json=dict(project=project_id, path=str(round_dir), title=round_dir.name, use_blob_urls=True))
    tasks = json.loads((round_dir / label_studio.TASKS_FILE).read_text())
    server.call("POST", f"/api/projects/{project_id}/import", json=tasks)
    return project_id


@dataclass
class AnnotatedRound:
    """A round annotated in Label Studio: its project, the masks submitted (image -> H x W bool; None: skipped),
    the export written, and the seconds each annotation is said to have taken."""

    project_id: int
    submitted: Dict[str, Optional[np.ndarray]]
    lead_times: Dict[str, float]
    export_path: Path


def annotate_task(server: LabelStudioServer, task_id: int, mask: Optional[np.ndarray], lead_time: float) -> dict:
    """What a person's Submit or Skip in the labelling view posts for a task: ``mask`` (H x W bool) as one brush
    region corrected from the proposal (RLE encoded by Label Studio's SDK); all False: the proposal's region
    deleted, no region; None: Skip (a cancelled annotation). Returns the annotation made."""
    from label_studio_sdk.converter import brush

    task = server.call("GET", f"/api/tasks/{task_id}/").json()
    if mask is None:
        body = dict(result=[], was_cancelled=True, lead_time=lead_time)
    else:
        height, width = mask.shape
        region = dict(id="stroke", type="brushlabels", from_name=label_studio.BRUSH_TAG,
                      to_name=label_studio.IMAGE_TAG, original_width=width, original_height=height,
                      image_rotation=0, origin="manual",
                      value=dict(format="rle", rle=brush.mask2rle(mask.astype(np.uint8) * 255),
                                 brushlabels=[label_studio.LESION_LABEL]))
        body = dict(result=[region] if mask.any() else [], lead_time=lead_time,
                    parent_prediction=task["predictions"][0]["id"])
    return server.call("POST", f"/api/tasks/{task_id}/annotations/", json=body).json()


def annotate_in_label_studio(server: LabelStudioServer, round_dir: Path, submitted: Dict[str, Optional[np.ndarray]],
                             export_path: Path, project_id: Optional[int] = None) -> AnnotatedRound:
    """The hand-over of any round folder with Label Studio files (this test's, or one the trainer wrote): a
    project with the round's interface (or ``project_id``, the run's project), a Local Files storage on the round
    folder, its tasks imported, each image's ``submitted`` mask posted as an annotation (None: skipped), and the
    project's JSON export written to ``export_path``. Then ``label_studio.py import`` and ``trainer.py --resume``."""
    project_id = hand_over(server, round_dir, project_id)
    this_round = {t["data"]["mdsam_round"] for t in json.loads((round_dir / label_studio.TASKS_FILE).read_text())}
    lead_times = {}
    for task in server.call("GET", "/api/tasks/", params=dict(project=project_id, page_size=1000)).json()["tasks"]:
        if task["data"]["mdsam_round"] not in this_round:  # the run's project: earlier rounds are annotated
            continue
        name = task["data"]["mdsam_image"]
        lead_times[name] = 5.0 + len(lead_times)
        annotate_task(server, task["id"], submitted[name], lead_times[name])
    export = server.call("GET", f"/api/projects/{project_id}/export", params=dict(exportType="JSON"))
    export_path.write_bytes(export.content)
    return AnnotatedRound(project_id, submitted, lead_times, export_path)
