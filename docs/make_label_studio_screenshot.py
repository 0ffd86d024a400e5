"""The README's Label Studio picture (docs/label_studio_round.png): what the annotator sees of a round.

A round of one real ISIC photo (../shared/isic-sample) goes into a real Label Studio server as the README's
commands do (127.0.0.1, sign-up off, telemetry off, its data in a temporary folder: tests/label_studio_helpers),
and headless Debian Chromium, driven by the ``playwright`` package (no browser download), logs in and photographs
the labelling view of the round's task. Every request the page makes to another host is refused and counted.
No trained checkpoint is stored here, so the proposal is a stand-in: the photo's ISIC mask moved by 1/25 of its
width, which the annotator would correct.

    pip install playwright   # once, any virtualenv that also sees this repository's requirements
    MDSAM_LABEL_STUDIO=/path/to/venv/bin/label-studio python3 docs/make_label_studio_screenshot.py
"""
from __future__ import annotations

import os
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
from datasets_skin import decode_mask, discover_samples  # noqa: E402
from label_studio_helpers import LabelStudioServer, hand_over, labelling_page  # noqa: E402

PHOTO = REPO.parent / "shared" / "isic-sample" / "images" / "ISIC_0012660.jpg"
OUT = REPO / "docs" / "label_studio_round.png"


def make_photo_round(where: Path) -> Path:
    """A data set of PHOTO without its mask, and round 1 of it under where/root (the document root)."""
    images, masks = where / "data" / "Training_Data", where / "data" / "Training_GroundTruth"
    images.mkdir(parents=True)
    masks.mkdir()
    shutil.copyfile(PHOTO, images / PHOTO.name)
    truth = decode_mask(PHOTO.parent.parent / "masks" / f"{PHOTO.stem}_segmentation.png", None).astype(bool)
    (sample,) = discover_samples(images, masks, unlabeled_ok=True)
    item = annotation_rounds.RoundItem(sample, 0.42, 1, np.roll(truth, truth.shape[1] // 25, axis=1))
    round_dir = where / "root" / "out" / "Skin_512" / "annotate" / "round_001"
    annotation_rounds.write_round(round_dir, [item])
    label_studio.write_round_files(round_dir, [item], "isic-sample-run", 1, where / "root")
    return round_dir


def photograph(server: LabelStudioServer, page_path: str, profile: Path, shot: Path) -> int:
    """Log in and screenshot ``page_path``; returns how many requests to other hosts were refused."""
    refused: list = []
    with labelling_page(server, page_path, profile, refused) as page:
        time.sleep(5)  # the brush region is drawn after the image has loaded
        page.screenshot(path=str(shot))
    return len(refused)


def main() -> None:
    where = Path(tempfile.mkdtemp(prefix="ls-screenshot-"))
    try:
        round_dir = make_photo_round(where)
        server = LabelStudioServer(os.environ["MDSAM_LABEL_STUDIO"], where / "server", where / "root")
        try:
            print(f"label studio up after {server.wait_until_up(1200):.0f} s")
            server.authenticate()
            project = hand_over(server, round_dir)
            (task,) = server.call("GET", "/api/tasks/", params=dict(project=project)).json()["tasks"]
            refused = photograph(server, f"/projects/{project}/data?task={task['id']}", where / "chromium",
                                 where / "shot.png")
        finally:
            server.stop()
        Image.open(where / "shot.png").convert("RGB").quantize(128).save(OUT, optimize=True)  # < 300 KB
        print(f"{OUT}: {OUT.stat().st_size // 1024} KB; requests to other hosts refused: {refused}")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
