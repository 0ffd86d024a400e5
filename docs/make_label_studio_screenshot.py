"""The pictures of docs/annotating.md: the pages of Label Studio 1.23.2 a person uses for a round.

A round of two real ISIC photos (../shared/isic-sample) is written as the trainer writes it, a real Label Studio
server is started on 127.0.0.1 (sign-up off, telemetry off, its data in a temporary folder:
tests/label_studio_helpers), and headless Debian Chromium, driven by the ``playwright`` package (no browser
download), logs in and photographs:

    label_studio_token.png      Account & Settings -> Personal Access Token (a new user: Create New Token)
    label_studio_sampling.png   the project's Settings -> General: Task Sampling
    label_studio_storage.png    Settings -> Cloud Storage -> Add Source Storage: the wizard's step 3 (import method)
    label_studio_label_all.png  Label All Tasks: the round's first task, with Skip and Submit
    label_studio_round.png      a task opened from the task list (Submit only)

The round reaches the server as ``label_studio.py push`` sends it (``label_studio.push_round``: the run's project,
the images through a Local Files storage on the round folder). Every request the page makes to another host is
refused and counted. No trained checkpoint is stored here, so each proposal is a stand-in: the photo's ISIC mask
moved by 1/25 of its width, which the annotator would correct.

    pip install playwright   # once, any virtualenv that also sees this repository's requirements
    python3 docs/make_label_studio_screenshot.py   # the server of .ci/run, or MDSAM_LABEL_STUDIO=.../label-studio
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import annotation_rounds  # noqa: E402
import label_studio  # noqa: E402
import label_studio_api  # noqa: E402
from datasets_skin import decode_mask, discover_samples  # noqa: E402
from label_studio_helpers import LabelStudioServer, label_studio_executable, labelling_page  # noqa: E402

PHOTOS = [REPO.parent / "shared" / "isic-sample" / "images" / f"{name}.jpg" for name in ("ISIC_0012660",
                                                                                         "ISIC_0012109")]
DOCS = REPO / "docs"


def make_photo_round(where: Path) -> Path:
    """A data set of PHOTOS without their masks, and round 1 of them under where/root (the document root)."""
    images, masks = where / "data" / "Training_Data", where / "data" / "Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir()
    for photo in PHOTOS:
        shutil.copyfile(photo, images / photo.name)
    items = []
    for rank, sample in enumerate(discover_samples(images, masks, unlabeled_ok=True)):
        truth = decode_mask(PHOTOS[0].parent.parent / "masks" / f"{sample.name}_segmentation.png", None).astype(bool)
        items.append(annotation_rounds.RoundItem(sample, 0.42 - 0.1 * rank, rank + 1,
                                                 np.roll(truth, truth.shape[1] // 25, axis=1)))
    round_dir = where / "root" / "out" / "Skin_512" / "annotate" / "round_001"
    annotation_rounds.write_round(round_dir, items)
    label_studio.write_round_files(round_dir, items, "isic-sample-run", 1, where / "root")
    return round_dir


def save(page, name: str) -> None:
    """The page as docs/NAME (128 colours, so that a page of flat colours stays small)."""
    time.sleep(3)  # images and brush regions are drawn after the page is idle
    page.screenshot(path=str(DOCS / name))
    Image.open(DOCS / name).convert("RGB").quantize(128).save(DOCS / name, optimize=True)
    print(f"{DOCS / name}: {(DOCS / name).stat().st_size // 1024} KB")


def storage_wizard(page, url: str, project: int, round_dir: Path) -> None:
    """Settings -> Cloud Storage -> Add Source Storage, Local Files, the round folder, up to step 3 (nothing
    saved: the round's storage exists already)."""
    page.goto(f"{url}/projects/{project}/settings/storage")
    page.wait_for_load_state("networkidle")
    page.get_by_role("button", name="Add Source Storage").click()
    page.get_by_text("Local Files", exact=True).click()
    page.get_by_role("button", name="Next").click()
    title, path = page.query_selector_all(".lsf-modal-ls input")[:2]
    title.fill(round_dir.name)
    path.fill(str(round_dir))
    page.get_by_role("button", name="Test Connection").click()
    time.sleep(2)
    page.get_by_role("button", name="Next").click()
    page.get_by_text("JSON", exact=True).click()  # Common filters: JSON
    save(page, "label_studio_storage.png")


def photograph(server: LabelStudioServer, profile: Path, round_dir: Path) -> int:
    """Log in, photograph the token page, push the round, photograph its pages; returns how many requests to other
    hosts were refused."""
    refused: list = []
    with labelling_page(server, "/user/account", profile, refused, canvas=False) as page:
        page.get_by_text("Personal Access Token", exact=True).click()
        save(page, "label_studio_token.png")

        server.authenticate()  # the token the API calls use (the page above showed a user without one)
        client = label_studio_api.connect(server.url, label_studio_api.Token(server.token, "the picture script"))
        pushed = label_studio.push_round(client, round_dir)
        first = min(min(ids) for ids in pushed.created.values())
        page.goto(f"{server.url}/projects/{pushed.project_id}/settings")
        page.get_by_text("Task Sampling", exact=True).scroll_into_view_if_needed()
        save(page, "label_studio_sampling.png")
        storage_wizard(page, server.url, pushed.project_id, round_dir)
        page.goto(f"{server.url}/projects/{pushed.project_id}/data")
        page.get_by_role("button", name="Label All Tasks").click()
        page.wait_for_selector("canvas", timeout=120_000)
        page.wait_for_load_state("networkidle")
        save(page, "label_studio_label_all.png")
        page.goto(f"{server.url}/projects/{pushed.project_id}/data?task={first}")
        page.wait_for_selector("canvas", timeout=120_000)
        page.wait_for_load_state("networkidle")
        save(page, "label_studio_round.png")
    return len(refused)


def main() -> None:
    where = Path(tempfile.mkdtemp(prefix="ls-screenshot-"))
    try:
        round_dir = make_photo_round(where)
        server = LabelStudioServer(label_studio_executable(), where / "server", where / "root")
        try:
            print(f"label studio up after {server.wait_until_up(1200):.0f} s")
            refused = photograph(server, where / "chromium", round_dir)
        finally:
            server.stop()
        print(f"requests to other hosts refused: {refused}")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
