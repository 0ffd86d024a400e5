"""A round through a real Label Studio server (issue 19): the round's interface and tasks go in, a person's
annotation is submitted through the REST API, the JSON export comes back through ``label_studio.py import``, and
the masks written equal the submitted ones pixel for pixel.

Skipped unless MDSAM_LABEL_STUDIO names a ``label-studio`` executable (installed in a virtualenv of its own):

    MDSAM_LABEL_STUDIO=/work/ls-venv/bin/label-studio python3 -m pytest -q tests/test_label_studio_server.py

The server listens on 127.0.0.1 only, keeps its SQLite data and HOME in a temporary folder, runs with sign-up
disabled and Sentry, analytics and the PyPI version check off. Its first start migrates a new database (minutes).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from label_studio_helpers import (RUN_ID, LabelStudioServer, MadeRound, annotate_in_label_studio, listening_addresses,
                                  make_round)

EXECUTABLE = os.environ.get("MDSAM_LABEL_STUDIO", "")
pytestmark = pytest.mark.skipif(not EXECUTABLE, reason="set MDSAM_LABEL_STUDIO to a label-studio executable")
REPO = Path(__file__).resolve().parents[1]
REAL_PHOTOS = sorted((REPO.parent / "shared" / "isic-sample" / "images").glob("*.jpg"))[:1]
STARTUP_S = 1200  # a first start on a busy 2-core machine migrates for minutes


@pytest.fixture(scope="module")
def where(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("label-studio")


@pytest.fixture(scope="module")
def server(where, report_figure):
    started = time.monotonic()
    running = LabelStudioServer(EXECUTABLE, where / "server", where / "round" / "root")
    try:
        report_figure(f"label studio: server up after {running.wait_until_up(STARTUP_S):.0f} s (new database)")
        running.authenticate()
        yield running
    finally:
        running.stop()
        report_figure(f"label studio: server tests took {time.monotonic() - started:.0f} s in all")


# Part 2 (the trainer's --oracle folder writes these files each round): a run whose --output is below
# server.document_root stops at a round; annotate_in_label_studio(server, round_dir, masks, export_path), then
# `label_studio.py import` and `trainer.py --resume`: the masks trained on must equal the submitted ones.


@pytest.fixture(scope="module")
def made(where) -> MadeRound:
    """Two synthetic ISIC-format images (320 px) and one real ISIC photo (1024 x 683) when the sample is there."""
    return make_round(where / "round", n_synthetic=2, size=320, real_photos=REAL_PHOTOS)


def test_the_server_listens_on_loopback_only_and_refuses_sign_up(server):
    assert set(listening_addresses(server.port)) == {"0100007F"}, "not bound to 127.0.0.1 alone"
    visitor = server.login("nobody@example.org", "whatever-123")  # a fresh browser session, not logged in
    refused = visitor.post(f"{server.url}/user/signup/", allow_redirects=False, timeout=30,
                           data=dict(email="intruder@example.org", password="Intruder-pass-1",
                                     csrfmiddlewaretoken=visitor.cookies.get("csrftoken")),
                           headers={"Referer": f"{server.url}/user/signup/"})
    assert refused.status_code == 403
    users = server.call("GET", "/api/users/").json()
    assert [u["email"] for u in users] == [LabelStudioServer.EMAIL]


def test_a_round_goes_out_is_annotated_and_comes_back_as_the_submitted_masks(server, made, where, report_figure):
    names = [item.sample.image_path.name for item in made.items]
    truth = {name: made.answers[name] for name in names}
    submitted = {name: truth[name] for name in names}
    submitted[names[1]] = None  # the annotator skips the second image
    started = time.monotonic()
    done = annotate_in_label_studio(server, made.round_dir, submitted, where / "export.json")

    # what Label Studio made of the round: the images are served from the round folder, the most uncertain first
    project = server.call("GET", f"/api/projects/{done.project_id}/").json()
    assert project["model_version"] == RUN_ID  # set by the first import: one version per run shows every round
    tasks = server.call("GET", "/api/tasks/", params=dict(project=done.project_id)).json()["tasks"]
    for task in tasks:
        served = server.call("GET", task["data"]["image"]).content
        assert served == (made.round_dir / task["data"]["mdsam_image"]).read_bytes()
    view = server.call("POST", "/api/dm/views/", json=dict(project=done.project_id,
                                                            data=dict(ordering=["tasks:predictions_score"])))
    ordered = server.call("GET", "/api/tasks/", params=dict(project=done.project_id, view=view.json()["id"]))
    assert [t["data"]["mdsam_image"] for t in ordered.json()["tasks"]] == names  # ranks 1, 2, 3

    # the way back: the command, as the README gives it
    command = [sys.executable, str(REPO / "label_studio.py"), "import", "--export", str(done.export_path),
               "--round_dir", str(made.round_dir)]
    back = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report_figure(f"label studio: a round of {len(names)} images out, annotated, exported and imported in "
                  f"{time.monotonic() - started:.1f} s")
    assert back.returncode == 0, back.stderr
    assert f"{names[1]} (skipped)" in back.stdout
    me = server.call("GET", "/api/current-user/whoami").json()["id"]
    with open(made.round_dir / "annotations.csv", newline="") as f:
        rows = {row[0]: row for row in list(csv.reader(f))[1:]}
    for name in names:
        written = made.round_dir / f"{Path(name).stem}_segmentation.png"
        if submitted[name] is None:
            assert not written.exists() and rows[name][1] == "skipped"
            continue
        mask = np.asarray(Image.open(written))
        np.testing.assert_array_equal(mask, submitted[name].astype(np.uint8) * 255)  # pixel for pixel
        proposal = next(i.proposal for i in made.items if i.sample.image_path.name == name)
        assert (mask > 0).sum() > 100 and not np.array_equal(mask > 0, proposal), "the proposal came back"
        assert rows[name][1:5] == ["annotated", written.name, str(me), f"{done.lead_times[name]:.3f}"]
    assert not list((made.data_root / "Training_GroundTruth").iterdir()), "the import wrote into the data set"
