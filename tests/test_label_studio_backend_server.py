"""The ML backend (label_studio_backend.py) connected to a real Label Studio 1.23.2 (issue 28): a trainer's round
goes into a project, the backend is connected through the REST API as the trainer's ``--label_studio_backend`` will
do (``label_studio.connect_ml_backend``, interactive on), and a click comes back as its mask through the request
Label Studio's labelling page makes for a smart tool: ``POST /api/ml/{id}/interactive-annotating`` with the regions
just drawn (the server then sends the backend ``/predict`` with them as ``params.context``).

The session's server (tests/conftest.py): skipped where no ``label-studio`` executable is found (MDSAM_LABEL_STUDIO,
or the virtualenv at ~/.cache/mdsam/label-studio-1.23.2), a failure under CI=true.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("flask")
brush = pytest.importorskip("label_studio_sdk.converter.brush")

import label_studio  # noqa: E402
import label_studio_backend  # noqa: E402
from label_studio_helpers import expected_mask, hand_over, run_model, trainer_round  # noqa: E402

RECORDED = json.loads((Path(__file__).parent / "data" / "label_studio_1.23_ml_backend_requests.json").read_text())


@pytest.fixture(scope="module")
def made(label_studio):
    return trainer_round(label_studio.document_root / "backend", label_studio.document_root)


@pytest.fixture(scope="module")
def server(label_studio):
    """The session's server (tests/conftest.py; started with ML_BLOCK_LOCAL_IP=false and
    SSRF_PROTECTION_ENABLED=false, without which it refuses a backend on 127.0.0.1)."""
    return label_studio


@pytest.fixture(scope="module")
def backend_url(made, server):
    backend = label_studio_backend.Backend(made["run_dir"], server.url, None, made["root"], torch.device("cpu"))
    http = label_studio_backend.serve(backend, "127.0.0.1", 0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.port}"
    http.shutdown()


def test_a_click_on_the_labelling_page_comes_back_as_its_mask(made, server, backend_url, report_figure):
    started = time.monotonic()
    project = hand_over(server, made["round_dir"])
    connected = label_studio.connect_ml_backend(server.call, project, backend_url)
    ml = server.call("GET", f"/api/ml/{connected['id']}").json()
    assert ml["is_interactive"] and ml["state"] == "CO"  # Label Studio asked /health and /setup: connected
    run_id = made["tasks"][0]["predictions"][0]["model_version"]
    assert ml["model_version"] == run_id  # /setup's answer: the imported proposals' version
    webhooks = server.call("GET", "/api/webhooks/", params=dict(project=project)).json()
    assert [w["url"] for w in webhooks] == [f"{backend_url}/webhook"]

    task = server.call("GET", "/api/tasks/", params=dict(project=project)).json()["tasks"][1]
    click = RECORDED["predict_click"]["params"]["context"]["result"]  # as the labelling page sends it
    answer = server.call("POST", f"/api/ml/{connected['id']}/interactive-annotating",
                         json=dict(task=task["id"], context=dict(result=click))).json()
    assert "errors" not in answer, answer
    (region,) = answer["data"]["result"]
    assert answer["data"]["model_version"] == run_id
    photo = made["round_dir"] / task["data"]["mdsam_image"]
    size = Image.open(photo).size[::-1]
    mask = brush.decode_rle(region["value"]["rle"]).reshape(*size, 4)[..., 3] > 127
    x, y = click[0]["value"]["x"], click[0]["value"]["y"]
    np.testing.assert_array_equal(mask, expected_mask(run_model(made["run_dir"]), photo, [(x, y, True)]))
    report_figure(f"label studio (ML backend): project, backend connected, one click answered in "
                  f"{time.monotonic() - started:.1f} s")


def test_a_task_opened_without_a_prediction_gets_the_rounds_proposal_once(made, server, backend_url):
    """Label Studio asks /predict (no context) for a task without any prediction when it is opened and the project
    prelabels with predictions; the answer is the round's proposal, stored under the run's model_version. A task
    that holds the imported proposal is never asked for."""
    interface = (made["round_dir"] / label_studio.INTERFACE_FILE).read_text()
    project = server.call("POST", "/api/projects/", json=dict(title="opened", label_config=interface)).json()["id"]
    held, bare = made["tasks"][0], {"data": made["tasks"][1]["data"]}
    server.call("POST", f"/api/projects/{project}/import", json=[held, bare])
    label_studio.connect_ml_backend(server.call, project, backend_url)
    server.call("PATCH", f"/api/projects/{project}/", json=dict(evaluate_predictions_automatically=True))
    run_id = held["predictions"][0]["model_version"]
    for task in server.call("GET", "/api/tasks/", params=dict(project=project)).json()["tasks"]:
        opened = server.call("GET", f"/api/tasks/{task['id']}/").json()
        (prediction,) = opened["predictions"]  # one: the imported proposal, or the backend's answer
        assert prediction["model_version"] == run_id
        name = opened["data"]["mdsam_image"]
        proposal = np.asarray(Image.open(made["round_dir"] / f"{Path(name).stem}_proposal.png")) > 0
        (region,) = prediction["result"]
        mask = brush.decode_rle(region["value"]["rle"]).reshape(*proposal.shape, 4)[..., 3] > 127
        np.testing.assert_array_equal(mask, proposal)


def test_an_error_of_the_backend_is_shown_by_label_studio(made, server, backend_url):
    """A refused image: Label Studio keeps the backend's status line (its message) in the errors it returns to the
    labelling page, and the backend keeps serving."""
    interface = (made["round_dir"] / label_studio.INTERFACE_FILE).read_text()
    project = server.call("POST", "/api/projects/", json=dict(title="refusal", label_config=interface)).json()["id"]
    bad = dict(made["tasks"][0], data=dict(made["tasks"][0]["data"], image="/data/local-files/?d=../etc/passwd"))
    server.call("POST", f"/api/projects/{project}/import", json=[bad])
    connected = label_studio.connect_ml_backend(server.call, project, backend_url)
    (task,) = server.call("GET", "/api/tasks/", params=dict(project=project)).json()["tasks"]
    click = RECORDED["predict_click"]["params"]["context"]["result"]
    answer = server.call("POST", f"/api/ml/{connected['id']}/interactive-annotating",
                         json=dict(task=task["id"], context=dict(result=click))).json()
    assert "leaves the document root" in " ".join(answer["errors"]), answer
    import requests

    assert requests.get(f"{backend_url}/health", timeout=30).status_code == 200
