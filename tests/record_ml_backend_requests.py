"""Record what a real Label Studio 1.23.2 sends to an ML backend, into tests/data/ (the fixtures of
tests/test_label_studio_backend.py). Run by hand when Label Studio changes; nothing here runs in CI.

A capture backend on 127.0.0.1 answers Label Studio's calls (``/health``, ``/setup``, ``/predict``, ``/webhook``)
and keeps each request body. A real server (tests/label_studio_helpers, started with ML_BLOCK_LOCAL_IP=false and
SSRF_PROTECTION_ENABLED=false so that it may call a backend on this machine) gets a round of one real, non-square
ISIC photo (with the proposal) and one synthetic image (without); the backend is connected as a person would
(interactive preannotations on). Opening the task without a prediction makes Label Studio's plain ``/predict``;
headless Chromium then opens the photo's task, turns auto-annotation on and uses the smart tools as an annotator
does: a click, an Alt+click (negative) and a box. Label Studio's frontend sends each to the server
(``POST /api/ml/{id}/interactive-annotating``), and the server sends the backend the ``/predict`` recorded here.

    python3 tests/record_ml_backend_requests.py      # MDSAM_LABEL_STUDIO or the default virtualenv's label-studio

The legacy token Label Studio puts into ``/setup`` (``access_token``) and the project's token in a webhook's body
are replaced by "<redacted>" in the file.
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import label_studio  # noqa: E402
from label_studio_helpers import (LabelStudioServer, free_port, label_studio_executable, labelling_page,  # noqa: E402
                                  make_round)

PHOTO = REPO.parent / "shared" / "isic-sample" / "images" / "ISIC_0012660.jpg"  # 1024 x 683
OUT = Path(__file__).parent / "data"
FIXTURE = "label_studio_1.23_ml_backend_requests.json"


class Capture(BaseHTTPRequestHandler):
    """Keeps (path, body) of every request in ``seen``; answers as a backend that knows no model."""

    seen: list = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, None))
        self.answer({"status": "UP", "model_class": "capture"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.seen.append((self.path, body))
        if self.path == "/setup":
            self.answer({"model_version": "capture"})
        elif self.path == "/predict":
            tasks = body.get("tasks") or [{}]
            self.answer({"results": [{"result": [], "model_version": "capture", "score": 0.0} for _ in tasks]})
        else:
            self.answer({})


def redacted(body: dict) -> dict:
    """The body without the server's secrets: /setup's legacy token, the project's token in a webhook's body."""
    if "access_token" in body:
        body = {**body, "access_token": "<redacted>"}
    if isinstance(body.get("project"), dict) and "token" in body["project"]:
        body = {**body, "project": {**body["project"], "token": "<redacted>"}}
    return body


def browse(server: LabelStudioServer, project: int, task: int, profile: Path) -> None:
    """Log in, open the task, turn auto-annotation on and use the smart tools (the toolbar's Auto-Detect group):
    a click (positive), an Alt+click (negative), a box. Positions are the 1280 x 800 page's, found by looking at
    its screenshots; label 2 is the click tool's "lesion", label 3 the box tool's."""
    with labelling_page(server, f"/projects/{project}/data?task={task}", profile, []) as page:
        time.sleep(3)
        page.get_by_text("Auto-Annotation").click()
        for tool, label, act in (((865, 599), "2", lambda: page.mouse.click(560, 430)),
                                 ((865, 599), "2", lambda: alt_click(page, 600, 420)),
                                 ((865, 635), "3", lambda: drag(page, (500, 330), (680, 480)))):
            page.mouse.move(924, 617)  # the Auto-Detect group opens
            time.sleep(1.5)
            page.mouse.click(*tool)
            time.sleep(1)
            page.keyboard.press(label)
            time.sleep(1)
            act()
            time.sleep(4)
        page.screenshot(path=str(profile.parent / "smart_tools.png"))


def alt_click(page, x: int, y: int) -> None:
    page.keyboard.down("Alt")
    page.mouse.click(x, y)
    page.keyboard.up("Alt")


def drag(page, start: tuple, end: tuple) -> None:
    page.mouse.move(*start)
    page.mouse.down()
    page.mouse.move(*end, steps=10)
    page.mouse.up()


def main() -> None:
    executable = label_studio_executable()
    where = Path(tempfile.mkdtemp(prefix="ls-record-"))
    backend = ThreadingHTTPServer(("127.0.0.1", free_port()), Capture)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    backend_url = f"http://127.0.0.1:{backend.server_address[1]}"
    try:
        made = make_round(where / "round", n_synthetic=1, size=320, real_photos=[PHOTO])
        server = LabelStudioServer(executable, where / "server", made.document_root, env=label_studio.ML_BACKEND_ENV)
        try:
            print(f"label studio up after {server.wait_until_up(1200):.0f} s")
            server.authenticate()
            interface = (made.round_dir / label_studio.INTERFACE_FILE).read_text()
            project = server.call("POST", "/api/projects/", json=dict(title="record", label_config=interface)
                                  ).json()["id"]
            server.call("POST", "/api/storages/localfiles/", json=dict(project=project, path=str(made.round_dir),
                                                                      title="round", use_blob_urls=True))
            tasks = json.loads((made.round_dir / label_studio.TASKS_FILE).read_text())
            photo_task = next(t for t in tasks if t["data"]["mdsam_image"] == PHOTO.name)
            bare = [{"data": t["data"]} for t in tasks if t is not photo_task]
            server.call("POST", f"/api/projects/{project}/import", json=[photo_task] + bare)
            label_studio.connect_ml_backend(server.call, project, backend_url, "MD-SAM-AL")
            listed = server.call("GET", "/api/tasks/", params=dict(project=project)).json()["tasks"]
            ids = {t["data"]["mdsam_image"]: t["id"] for t in listed}
            bare_id = next(i for name, i in ids.items() if name != PHOTO.name)
            server.call("PATCH", f"/api/projects/{project}/", json=dict(evaluate_predictions_automatically=True))
            server.call("GET", f"/api/tasks/{bare_id}/")  # a task without a prediction: Label Studio asks /predict
            browse(server, project, ids[PHOTO.name], where / "chromium")
        finally:
            server.stop()
        (where / "seen.json").write_text(json.dumps([[p, b and redacted(b)] for p, b in Capture.seen], indent=1))
        posts = [(path, redacted(body)) for path, body in Capture.seen if body is not None]
        predicts = [body for path, body in posts if path == "/predict"]
        plain = [b for b in predicts if not b["params"]["context"]]
        clicks = [b for b in predicts if b["params"]["context"]]
        assert len(plain) == 1 and len(clicks) == 3, f"{len(plain)} plain and {len(clicks)} interactive /predict"
        recorded = dict(label_studio="1.23.2", setup=next(b for p, b in posts if p == "/setup"), predict=plain[0],
                        predict_click=clicks[0], predict_clicks=clicks[1], predict_box=clicks[2],
                        webhook=next(b for p, b in posts if p == "/webhook"))
        OUT.mkdir(exist_ok=True)
        (OUT / FIXTURE).write_text(json.dumps(recorded, indent=1) + "\n")
        print(f"{OUT / FIXTURE}: {', '.join(recorded)}; every request in {where / 'seen.json'}")
    finally:
        backend.shutdown()


if __name__ == "__main__":
    main()
