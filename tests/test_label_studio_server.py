"""Rounds through a real Label Studio server (issue 19): the round's interface and tasks go in, a person's
annotation is submitted through the REST API, the JSON export comes back through ``label_studio.py import``, and
the masks written equal the submitted ones pixel for pixel; and a whole ``trainer.py --oracle folder`` run on real
ISIC photos whose rounds go out, are annotated in Label Studio, come back and train via ``--resume``, selecting and
learning exactly what the simulation (``--oracle ground_truth``) fed the same masks does.

The server is the session's (``label_studio`` in tests/conftest.py: 127.0.0.1 only, its SQLite data and HOME in
a temporary folder, sign-up disabled, Sentry, analytics and the PyPI version check off).
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainer
from annotation_rounds import hide_masks, read_round
from label_studio_helpers import (REAL_PHOTOS, RUN_ID, SAMPLE, LabelStudioServer, MadeRound, annotate_in_label_studio,
                                  listening_addresses, make_round, real_format_data)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(label_studio) -> LabelStudioServer:
    return label_studio


@pytest.fixture(scope="module")
def where(label_studio) -> Path:
    """This module's folder below the server's document root."""
    folder = label_studio.document_root / "test_label_studio_server"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def made(server, where) -> MadeRound:
    """Two synthetic ISIC-format images (320 px) and one real ISIC photo (1024 x 683) when the sample is there."""
    return make_round(where / "round", n_synthetic=2, size=320, real_photos=REAL_PHOTOS,
                      document_root=server.document_root)


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

    # the way back: the command, as docs/annotating.md gives it
    command = [sys.executable, str(REPO / "label_studio.py"), "import", "--export", str(done.export_path),
               "--round_dir", str(made.round_dir)]
    back = subprocess.run(command, capture_output=True, text=True, timeout=300)
    report_figure(f"label studio: a round of {len(names)} images out, annotated, exported and imported in "
                  f"{time.monotonic() - started:.1f} s")
    assert back.returncode == 0, back.stderr
    assert f"{names[1]} (skipped)" in back.stdout
    me = server.call("GET", "/api/current-user/whoami").json()["id"]
    with open(made.round_dir / "to_annotate.csv", newline="") as f:  # the round's CSV, with who and how long
        rows = {row[0]: [row[0]] + row[4:] for row in list(csv.reader(f))[1:]}
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


# ----------------------------------------------------------------------------- a trainer run annotated in Label Studio

RUN = ["--model_cfg", "sam2.1_hiera_t", "--checkpoint", "none", "--gpu", "cpu", "--img_size", "64",
       "--batch_size", "2", "--pool_size", "3", "--max_epochs", "2", "--val_every", "2", "--save_from_epoch", "9"]


def test_a_run_annotated_in_label_studio_learns_exactly_what_the_simulation_does(server, where, report_figure,
                                                                                 monkeypatch):
    photos = sorted((SAMPLE / "images").glob("*.jpg"))
    if len(photos) < 6:
        pytest.skip(f"the six real ISIC photos are not at {SAMPLE}")
    simulation_data = real_format_data(where / "loop" / "simulation", photos[:4], photos[4:])
    data = shutil.copytree(simulation_data, where / "loop" / "data")
    answers = hide_masks(data / "Training_GroundTruth", where / "loop" / "answers")
    truth = {p.name.replace("_segmentation.png", ".jpg"): np.asarray(Image.open(p)) > 127 for p in answers.iterdir()}
    out = where / "run"  # below the server's document root; the trainer is told the root
    monkeypatch.setenv("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", str(server.document_root))
    argv = RUN + ["--oracle", "folder", "--data_root", str(data), "--output", str(out)]
    # Two torch threads on this shared 2-core machine sum in a load-dependent order (two identical simulations then
    # differ by ~1e-5 in their final weights); one thread makes the comparison exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started, project, rounds, lead_times = time.monotonic(), None, 0, {}
    try:
        result = trainer.main(argv)
        while "round_dir" in result:
            rounds += 1
            round_dir = result["round_dir"]
            submitted = {f"{name}.jpg": truth[f"{name}.jpg"] for name in result["requested"]}
            done = annotate_in_label_studio(server, round_dir, submitted, where / "loop" / f"export_{rounds}.json",
                                            project)
            project = done.project_id
            back = subprocess.run([sys.executable, str(REPO / "label_studio.py"), "import", "--export",
                                   str(done.export_path), "--round_dir", str(round_dir)],
                                  capture_output=True, text=True, timeout=300)
            assert back.returncode == 0, back.stderr
            assert (rounds == 1) == ("tasks of earlier rounds left aside" not in back.stdout)  # one project per run
            for name, mask in submitted.items():
                written = np.asarray(Image.open(round_dir / name.replace(".jpg", "_segmentation.png")))
                np.testing.assert_array_equal(written, mask.astype(np.uint8) * 255)  # pixel for pixel
                proposal = np.asarray(Image.open(round_dir / name.replace(".jpg", "_proposal.png"))) > 0
                assert written.shape == (683, 1024) and not np.array_equal(written > 0, proposal)
            assert {row["image"]: row["lead_time_s"] for row in read_round(round_dir)} == \
                   {name: f"{seconds:.3f}" for name, seconds in done.lead_times.items()}
            lead_times.update({Path(name).stem: seconds for name, seconds in done.lead_times.items()})
            result = trainer.main(argv + ["--resume"])
        report_figure(f"label studio: a trainer run of {rounds} rounds (real ISIC photos) out, annotated, exported, "
                      f"imported and trained in {time.monotonic() - started:.0f} s")
        simulated = trainer.main(RUN + ["--data_root", str(simulation_data), "--output", str(where / "loop" / "sim")])
    finally:
        torch.set_num_threads(threads)
    run_dir, sim_dir = result["run_dir"], simulated["run_dir"]
    assert rounds == 2 and result["epochs"] == 2 and len(result["labeled"]) == 4
    # the same selections and annotation costs (the person returned the truth); the run adds Label Studio's lead times
    rows, sim_rows = (list(csv.DictReader(open(d / "al_selection.csv", newline=""))) for d in (run_dir, sim_dir))
    assert without_lead_time(rows) == without_lead_time(sim_rows)
    assert {r["image"]: float(r["lead_time_s"]) for r in rows} == pytest.approx(lead_times, abs=5e-4)
    assert len(lead_times) == 4 and all(r["lead_time_s"] == "" for r in sim_rows)
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert sorted(state["mask_sources"].values()) == ["annotate/round_001"] * 2 + ["annotate/round_002"] * 2
    want, got = (torch.load(d / "last_model.pth", weights_only=True) for d in (sim_dir, run_dir))
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list((data / "Training_GroundTruth").iterdir()), "the loop wrote into the data set"


def without_lead_time(rows: list) -> list:
    """al_selection.csv rows without the lead time (a simulation has none)."""
    return [{k: v for k, v in r.items() if k != "lead_time_s"} for r in rows]
