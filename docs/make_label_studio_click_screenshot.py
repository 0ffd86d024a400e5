"""docs/label_studio_click.png: a click's mask on Label Studio's labelling page, answered by label_studio_backend.py.

A run folder at 256 px (config.txt only: the zero-shot model) with a round of one real ISIC photo goes into a real
Label Studio server (127.0.0.1, sign-up off, telemetry off, its data in a temporary folder, started with
ML_BLOCK_LOCAL_IP=false and SSRF_PROTECTION_ENABLED=false: tests/label_studio_helpers); the backend runs in this
process and is connected to the project as the REST call of label_studio.connect_ml_backend does. Headless Debian
Chromium (driven by ``playwright``, no browser download) logs in, opens the task, turns Auto-Annotation on, picks the
smart click tool and clicks the lesion; the picture is taken once the backend's brush region is drawn. Every request
the page makes to another host is refused and counted.

The model is the official SAM2.1 hiera_t when sam2/checkpoints/sam2.1_hiera_tiny.pt is there; else a stand-in with
seeded random weights (no checkpoint is stored here), whose mask shows where the click's answer goes, not what a
trained model would outline.

    pip install playwright   # once
    python3 docs/make_label_studio_click_screenshot.py    # MDSAM_LABEL_STUDIO or the default virtualenv's server
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import annotation_rounds  # noqa: E402
import label_studio  # noqa: E402
import label_studio_backend  # noqa: E402
from datasets_skin import discover_samples  # noqa: E402
from label_studio_helpers import LabelStudioServer, label_studio_executable, labelling_page  # noqa: E402
from run_folder import RunFolder  # noqa: E402

PHOTO = REPO.parent / "shared" / "isic-sample" / "images" / "ISIC_0012660.jpg"
OFFICIAL = REPO / "sam2" / "checkpoints" / "sam2.1_hiera_tiny.pt"
OUT = REPO / "docs" / "label_studio_click.png"
SIZE = 256


def make_run(where: Path) -> Path:
    """OUTPUT/Skin_256 with config.txt and round 1 of PHOTO (its proposal: none, so the click's mask shows alone)."""
    run_dir = where / "out" / f"Skin_{SIZE}"
    RunFolder(run_dir).write_config(dict(model_cfg="sam2.1_hiera_t", img_size=SIZE, seed=0, promptmode="none",
                                         decode="full", checkpoint=str(OFFICIAL) if OFFICIAL.is_file() else "none"))
    images, masks = where / "data" / "Training_Data", where / "data" / "Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir()
    shutil.copyfile(PHOTO, images / PHOTO.name)
    (sample,) = discover_samples(images, masks, unlabeled_ok=True)
    item = annotation_rounds.RoundItem(sample, 0.42, 1, np.zeros(sample.orig_size, bool))
    round_dir = run_dir / "annotate" / "round_001"
    annotation_rounds.write_round(round_dir, [item])
    label_studio.write_round_files(round_dir, [item], "isic-sample-run", 1, where / "out")
    return run_dir


def photograph(server: LabelStudioServer, project: int, task: int, profile: Path, shot: Path) -> int:
    """Log in, open the task, Auto-Annotation on, the smart click tool, one click on the lesion; returns how many
    requests to other hosts were refused. Positions are the 1280 x 800 page's (see tests/record_ml_backend_requests)."""
    refused: list = []
    with labelling_page(server, f"/projects/{project}/data?task={task}", profile, refused) as page:
        time.sleep(3)
        page.get_by_text("Auto-Annotation").click()
        page.mouse.move(924, 617)  # the toolbar's Auto-Detect group opens
        time.sleep(1.5)
        page.mouse.click(865, 599)  # its smart click tool
        time.sleep(1)
        page.keyboard.press("2")  # the click tool's label "lesion"
        time.sleep(1)
        with page.expect_response(lambda r: "interactive-annotating" in r.url, timeout=300_000):
            page.mouse.click(560, 430)  # on the lesion, left of the image's centre
        time.sleep(5)  # the brush region is drawn after the answer
        page.screenshot(path=str(shot))
    return len(refused)


def main() -> None:
    where = Path(tempfile.mkdtemp(prefix="ls-click-screenshot-"))
    try:
        run_dir = make_run(where)
        backend = label_studio_backend.Backend(run_dir, "http://127.0.0.1:9", None, where / "out",
                                               torch.device("cpu"))
        backend.run.model()
        http = label_studio_backend.serve(backend, "127.0.0.1", 0)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        server = LabelStudioServer(label_studio_executable(), where / "server", where / "out",
                                   env=label_studio.ML_BACKEND_ENV)
        try:
            print(f"label studio up after {server.wait_until_up(1200):.0f} s")
            server.authenticate()
            round_dir = run_dir / "annotate" / "round_001"
            interface = (round_dir / label_studio.INTERFACE_FILE).read_text()
            project = server.call("POST", "/api/projects/", json=dict(title="round 1", label_config=interface)
                                  ).json()["id"]
            server.call("POST", "/api/storages/localfiles/", json=dict(project=project, path=str(round_dir),
                                                                      title="round 1", use_blob_urls=True))
            server.call("POST", f"/api/projects/{project}/import",
                        json=label_studio.read_export(round_dir / label_studio.TASKS_FILE))
            label_studio.connect_ml_backend(server.call, project, f"http://127.0.0.1:{http.port}")
            (task,) = server.call("GET", "/api/tasks/", params=dict(project=project)).json()["tasks"]
            refused = photograph(server, project, task["id"], where / "chromium", where / "shot.png")
        finally:
            server.stop()
            http.shutdown()
        Image.open(where / "shot.png").convert("RGB").quantize(128).save(OUT, optimize=True)
        model = "official SAM2.1 hiera_t" if OFFICIAL.is_file() else "random-weight stand-in"
        print(f"{OUT}: {OUT.stat().st_size // 1024} KB ({model}); requests to other hosts refused: {refused}")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
