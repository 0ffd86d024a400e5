"""Label Studio through its API (label_studio_api; label_studio's push_round, round_progress, pull_round and its
``push`` / ``pull`` commands) against a real Label Studio 1.23.2: a round pushed (its images through a Local Files
storage, or uploaded when the server cannot serve them from the round folder), annotated through the REST API as a
person would (brush RLE from Label Studio's SDK, a region erased, a task skipped), pulled without an export file
into masks equal pixel for pixel to those submitted; the SDK's token refresh; and each fault as one typed error
naming the server, the project or the task, with nothing written: a token that is missing, readable by others,
garbage, expired or revoked; a server that does not answer or restarts; a project or a task deleted by hand; the
same round pushed twice; a copied run folder.

The server is the session's (tests/conftest.py, ``label_studio``); the test that stops a server and revokes its
token starts its own from the same migrated database (``fresh_label_studio``).
"""
from __future__ import annotations

import base64
import csv
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import label_studio
import label_studio_api as api
from label_studio_helpers import REAL_PHOTOS, ROUND, RUN_ID, LabelStudioServer, MadeRound, annotate_task, make_round

@pytest.fixture(scope="module")
def server(label_studio) -> LabelStudioServer:
    return label_studio


@pytest.fixture(scope="module")
def client(server) -> api.Client:
    return api.connect(server.url, api.Token(server.token, "the test"))


@pytest.fixture
def made(server, request) -> MadeRound:
    """A round of two synthetic images (160 px) below the server's document root, in a run folder of its own."""
    where = server.document_root / "test_label_studio_api" / request.node.name
    return make_round(where, n_synthetic=2, size=160, document_root=server.document_root)


@pytest.fixture
def said(caplog):
    """What label_studio's push and pull log, as text (``said()``); caught on their own logger, since a trainer run
    earlier in the session stops the trainer's logger from passing records on."""
    logger = logging.getLogger("trainer.label_studio")
    logger.addHandler(caplog.handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # not by assignment: that would leave the logger's cache of levels as it was
    yield lambda: caplog.text
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def round_rows(round_dir: Path) -> dict:
    """image -> its row of the round's to_annotate.csv (after the trainer's four columns)."""
    with open(round_dir / "to_annotate.csv", newline="") as f:
        return {row[0]: row[4:] for row in list(csv.reader(f))[1:]}


def task_ids(client: api.Client, project_id: int) -> dict:
    """image -> the ids of its tasks of the round in the project."""
    return label_studio.tasks_by_image(api.find_tasks(client, project_id, dict(mdsam_run=RUN_ID, mdsam_round=ROUND),
                                                      "task_only"))


# ----------------------------------------------------------------------------- the token

def test_the_token_comes_from_the_environment_or_a_file_only_its_owner_can_read(tmp_path):
    with pytest.raises(api.TokenError, match=r"no Label Studio token.*Personal Access Token.*LABEL_STUDIO_API_KEY"):
        api.read_token(None, environ={})
    token = api.read_token(None, environ={"LABEL_STUDIO_API_KEY": " secret-value\n"})
    assert token.reveal() == "secret-value" and "secret-value" not in f"{token} {token!r}"
    path = tmp_path / "token"
    path.write_text("file-secret\n")
    for mode in (0o640, 0o604, 0o620):  # group or others may read (or write) it: refused, naming the fix
        path.chmod(mode)
        with pytest.raises(api.TokenError, match=rf"others may use it.*chmod 600 {path}"):
            api.read_token(path, environ={"LABEL_STUDIO_API_KEY": "env-secret"})
    path.chmod(0o600)
    assert api.read_token(path, environ={"LABEL_STUDIO_API_KEY": "env-secret"}).reveal() == "file-secret"
    path.write_text("")
    with pytest.raises(api.TokenError, match="not a token"):
        api.read_token(path)
    with pytest.raises(api.TokenError, match="cannot read the token file"):
        api.read_token(tmp_path / "absent")


def forged_access_token(server: LabelStudioServer, expired_s: float) -> str:
    """An access token signed with the server's own key (its data folder's .env), expired ``expired_s`` ago."""
    import jwt

    key = next(line.split("=", 1)[1].strip().strip("'\"") for line in
               (server.where / "data" / ".env").read_text().splitlines() if line.startswith("SECRET_KEY="))
    now = int(time.time())
    claims = dict(token_type="access", exp=now - int(expired_s), iat=now - int(expired_s) - 300, jti="0" * 32,
                  user_id="1")
    return jwt.encode(claims, key, algorithm="HS256")


def test_the_sdk_refreshes_an_expired_access_token_against_1_23_2(server, client):
    """Label Studio 1.23.2 gives 5-minute access tokens for a personal access token and refuses an expired one;
    the SDK then asks for a new one by itself. (The SDK's cached access token is set to an expired one signed with
    the server's key, so that the test needs no 5-minute wait.)"""
    import httpx
    import jwt

    tokens = client.sdk._client_wrapper._tokens_client  # the SDK's token cache  # noqa: SLF001
    access = jwt.decode(tokens.api_key, options={"verify_signature": False})
    assert access["token_type"] == "access" and access["exp"] - access["iat"] == 300
    expired = forged_access_token(server, expired_s=60)
    refused = httpx.get(f"{server.url}/api/current-user/whoami", headers={"Authorization": f"Bearer {expired}"})
    assert refused.status_code == 401  # the server refuses it ...
    tokens._set_access_token(expired)  # noqa: SLF001
    refreshes = []
    hooks = client.sdk._client_wrapper.httpx_client.httpx_client.event_hooks  # noqa: SLF001
    hooks["request"].append(lambda request: refreshes.append(request.url.path)
                            if request.url.path.endswith("/token/refresh/") else None)
    try:
        assert client.sdk.users.whoami().email == LabelStudioServer.EMAIL  # ... and the SDK gets a new one
    finally:
        hooks["request"].pop()
    assert refreshes == ["/api/token/refresh/"] and tokens.api_key != expired


def test_a_wrong_or_expired_token_and_a_server_that_does_not_answer_are_named(server):
    with pytest.raises(api.TokenError) as wrong:
        api.connect(server.url, api.Token("not-a-token-at-all", "$LABEL_STUDIO_API_KEY"))
    assert f"{server.url} refused the token from $LABEL_STUDIO_API_KEY" in str(wrong.value)
    assert "not-a-token-at-all" not in str(wrong.value)
    header, payload, _ = server.token.split(".")  # the personal access token, its expiry moved into the past
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["exp"] = int(time.time()) - 10
    stale = ".".join([header, base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("="), "x" * 43])
    with pytest.raises(api.TokenError, match="expired"):
        api.connect(server.url, api.Token(stale, "the test"))
    with pytest.raises(api.ServerUnreachableError, match=r"http://127.0.0.1:9 does not answer.*is Label Studio "):
        api.connect("http://127.0.0.1:9", api.Token(server.token, "the test"))
    with pytest.raises(api.ServerUnreachableError, match="not the address of a Label Studio server"):
        api.connect("127.0.0.1:8080", api.Token(server.token, "the test"))


# ----------------------------------------------------------------------------- a round out and back

def test_a_round_goes_out_is_annotated_as_a_person_would_and_comes_back_pixel_for_pixel(server, client,
                                                                                      report_figure):
    where = server.document_root / "test_label_studio_api" / "round_trip"
    made = make_round(where, n_synthetic=3, size=160, real_photos=REAL_PHOTOS, document_root=server.document_root)
    names = [item.sample.image_path.name for item in made.items]
    started = time.monotonic()
    pushed = label_studio.push_round(client, made.round_dir)
    assert pushed.images_from == api.LOCAL_FILES and sorted(pushed.created) == sorted(names)
    record = json.loads((made.round_dir.parent / api.PROJECT_FILE).read_text())
    assert record["project"] == pushed.project_id and record["url"] == server.url
    assert record["run_folder"] == str(made.round_dir.parent.parent) and server.token not in json.dumps(record)
    project = server.call("GET", f"/api/projects/{pushed.project_id}/").json()
    assert project["title"] == "out/Skin_512" and project["model_version"] == RUN_ID
    assert project["label_config"] == (made.round_dir / label_studio.INTERFACE_FILE).read_text().strip()
    for name, (task_id,) in pushed.created.items():
        task = server.call("GET", f"/api/tasks/{task_id}/").json()
        assert server.call("GET", task["data"]["image"]).content == (made.round_dir / name).read_bytes()
        proposal = next(i.proposal for i in made.items if i.sample.image_path.name == name)
        (region,) = task["predictions"][0]["result"]  # the proposal comes as a prediction of the run's version
        assert task["predictions"][0]["model_version"] == RUN_ID
        np.testing.assert_array_equal(label_studio.region_mask(region, proposal.shape, "t"), proposal)

    # annotated as a person would: a correction with a band erased, a proposal deleted, a skip, one left
    assert label_studio.round_progress(client, made.round_dir).line() == f"round {ROUND}: 0 of 4 annotated, 0 skipped"
    corrected = made.answers[names[0]].copy()
    corrected[: corrected.shape[0] // 4] = False  # the eraser over the top quarter
    answers = {names[0]: corrected, names[1]: np.zeros_like(made.answers[names[1]]), names[2]: None}
    lead = {name: 11.5 + i for i, name in enumerate(names)}
    made_ids = {name: annotate_task(server, pushed.created[name][0], mask, lead[name])["id"]
                for name, mask in answers.items()}
    assert label_studio.round_progress(client, made.round_dir).line() == f"round {ROUND}: 2 of 4 annotated, 1 skipped"
    csv_before = (made.round_dir / "to_annotate.csv").read_text()
    with pytest.raises(api.RoundNotDoneError) as waiting:
        label_studio.pull_round(client, made.round_dir)  # the fourth image is neither annotated nor skipped
    task_url = f"{server.url}/projects/{pushed.project_id}/data?task={pushed.created[names[3]][0]}"
    assert waiting.value.waiting == [(names[3], task_url)] and f"{names[3]} ({task_url})" in str(waiting.value)
    assert (made.round_dir / "to_annotate.csv").read_text() == csv_before
    assert not list(made.round_dir.glob("*_segmentation.png")), "a refused pull wrote masks"

    result = label_studio.pull_round(client, made.round_dir, accept_partial=True)
    report_figure(f"label studio API: a round of {len(names)} images pushed, annotated and pulled in "
                  f"{time.monotonic() - started:.1f} s")
    assert result.not_returned == {names[2]: "skipped", names[3]: "not_annotated"}
    for name in names[:2]:
        written = np.asarray(Image.open(made.round_dir / f"{Path(name).stem}_segmentation.png"))
        np.testing.assert_array_equal(written, answers[name].astype(np.uint8) * 255)  # pixel for pixel
    assert corrected.any() and not np.array_equal(corrected, made.answers[names[0]])
    me = str(client.user["id"])
    rows = round_rows(made.round_dir)
    for name in names[:3]:
        status = "skipped" if answers[name] is None else "annotated"
        mask = "" if answers[name] is None else f"{Path(name).stem}_segmentation.png"
        assert rows[name] == [status, mask, me, f"{lead[name]:.3f}", str(pushed.created[name][0]),
                              str(made_ids[name])]
    assert rows[names[3]] == ["not_annotated", "", "", "", str(pushed.created[names[3]][0]), ""]
    assert not list((made.data_root / "Training_GroundTruth").iterdir()), "the pull wrote into the data set"

    again = label_studio.pull_round(client, made.round_dir, accept_partial=True)  # the same masks: left as they are
    assert again.written == [] and len(again.unchanged) == 2


def test_the_same_round_pushed_twice_makes_no_task_twice_and_a_deleted_task_is_named_then_made_again(client, made,
                                                                                                      server):
    first = label_studio.push_round(client, made.round_dir)
    again = label_studio.push_round(client, made.round_dir)
    assert again.created == {} and again.existing == first.created
    assert task_ids(client, first.project_id) == first.created
    gone_name, (gone_id,) = sorted(first.created.items())[0]
    server.call("DELETE", f"/api/tasks/{gone_id}/")  # deleted by hand
    with pytest.raises(api.TaskGoneError, match=rf"projects/{first.project_id}: round {ROUND} has no task for "
                                                rf"{gone_name} .*label_studio.py push --round_dir"):
        label_studio.pull_round(client, made.round_dir, accept_partial=True)
    assert not list(made.round_dir.glob("*_segmentation.png"))
    third = label_studio.push_round(client, made.round_dir)
    assert list(third.created) == [gone_name] and third.created[gone_name] != [gone_id]
    assert sorted(task_ids(client, first.project_id)) == sorted(first.created)


def test_a_deleted_project_is_named_at_pull_and_push(client, made, server):
    pushed = label_studio.push_round(client, made.round_dir)
    server.call("DELETE", f"/api/projects/{pushed.project_id}/")  # deleted by hand
    for call in (lambda: label_studio.pull_round(client, made.round_dir, accept_partial=True),
                 lambda: label_studio.push_round(client, made.round_dir),
                 lambda: label_studio.round_progress(client, made.round_dir)):
        with pytest.raises(api.ProjectGoneError, match=rf"{server.url}/projects/{pushed.project_id}: the run's "
                                                       "project .* is not on the server"):
            call()
    assert not list(made.round_dir.glob("*_segmentation.png"))


def test_a_copied_run_folder_makes_a_project_of_its_own(client, made, said):
    original = label_studio.push_round(client, made.round_dir)
    run_dir = made.round_dir.parent.parent
    copy = shutil.copytree(run_dir, run_dir.parent / "Skin_512_copy")  # cp -r
    copied_round = copy / "annotate" / made.round_dir.name
    progress = label_studio.round_progress(client, copied_round)  # the copy reads its original's project
    assert progress.line().startswith(f"round {ROUND}: 0 of 2")
    pushed = label_studio.push_round(client, copied_round)
    assert pushed.project_id != original.project_id and sorted(pushed.created) == sorted(original.created)
    assert f"{copy} is a copy of the run folder {run_dir}" in said()
    assert task_ids(client, original.project_id) == original.created  # nothing written into the original's
    assert json.loads((copy / "annotate" / api.PROJECT_FILE).read_text())["project"] == pushed.project_id
    assert json.loads((run_dir / "annotate" / api.PROJECT_FILE).read_text())["project"] == original.project_id
    assert label_studio.push_round(client, made.round_dir).created == {}  # the original keeps its project


@pytest.mark.parametrize("case", ["outside the server's document root", "addresses for another root"])
def test_a_round_the_server_cannot_serve_is_uploaded(client, server, tmp_path, said, case):
    if case == "outside the server's document root":
        made, why = make_round(tmp_path / "elsewhere", n_synthetic=2, size=160), \
            "must be a subdirectory of LOCAL_FILES_DOCUMENT_ROOT"
    else:  # inside it, but the tasks' addresses relative to another root (the trainer's shell without the variable)
        made = make_round(server.document_root / "test_label_studio_api" / "other_root", n_synthetic=2, size=160)
        why = "did not serve /data/local-files/?d=out/Skin_512/annotate/round_003/"
    pushed = label_studio.push_round(client, made.round_dir)
    assert pushed.images_from == api.UPLOAD and why in pushed.why
    assert "uploaded through the import API" in said()
    for name, (task_id,) in pushed.created.items():
        with client.calling("test"):
            task = client.sdk.tasks.get(id=str(task_id))
            assert task.data["image"].startswith(f"/data/upload/{pushed.project_id}/")
            assert client.http("GET", task.data["image"].lstrip("/")).content == (made.round_dir / name).read_bytes()
    with client.calling("test"):
        assert not client.sdk.import_storage.local.list(project=pushed.project_id), "a storage that cannot serve"


def test_a_round_written_without_label_studio_files_gets_them_at_its_push(client, made, server, monkeypatch):
    for name in (label_studio.TASKS_FILE, label_studio.INTERFACE_FILE):
        (made.round_dir / name).unlink()  # the SDK was not installed when the trainer wrote the round
    monkeypatch.setenv(label_studio.DOCUMENT_ROOT_VARIABLE, str(server.document_root))  # the server's shell's
    pushed = label_studio.push_round(client, made.round_dir)
    tasks = json.loads((made.round_dir / label_studio.TASKS_FILE).read_text())
    assert sorted(t["data"]["mdsam_image"] for t in tasks) == sorted(pushed.created)
    assert {t["data"]["mdsam_round"] for t in tasks} == {ROUND} and pushed.images_from == api.LOCAL_FILES
    run_id = (made.round_dir.parent / label_studio.RUN_ID_FILE).read_text().strip()
    assert {t["data"]["mdsam_run"] for t in tasks} == {run_id}


# ----------------------------------------------------------------------------- a server that stops and restarts

def test_a_server_that_stops_is_named_and_a_restart_loses_nothing(fresh_label_studio, tmp_path):
    server = fresh_label_studio(tmp_path / "root")
    made = make_round(tmp_path / "root" / "run", n_synthetic=2, size=160, document_root=tmp_path / "root")
    client = api.connect(server.url, api.Token(server.token, "the test"))
    pushed = label_studio.push_round(client, made.round_dir)
    names = sorted(pushed.created)
    for name in names:
        annotate_task(server, pushed.created[name][0], made.answers[name], 3.0)
    server.stop()
    for call in (lambda: label_studio.pull_round(client, made.round_dir),
                 lambda: label_studio.push_round(client, made.round_dir)):
        with pytest.raises(api.ServerUnreachableError, match=rf"{server.url} does not answer"):
            call()
    assert not list(made.round_dir.glob("*_segmentation.png"))
    server.start()
    server.wait_until_up(300)
    result = label_studio.pull_round(client, made.round_dir)  # the same client: its access token outlives the restart
    assert len(result.written) == 2 and result.not_returned == {}
    server.call("POST", "/api/token/blacklist/", json=dict(refresh=server.token))  # the token revoked
    with pytest.raises(api.TokenError, match=rf"{server.url} refused the token from the test"):
        api.connect(server.url, api.Token(server.token, "the test"))
    server.stop()


# ----------------------------------------------------------------------------- the commands

def test_push_and_pull_commands_say_what_to_do_and_never_the_token(server, made, tmp_path, capsys, monkeypatch):
    printed = []

    def output():
        said = capsys.readouterr()
        printed.append(said.out + said.err)
        return said

    monkeypatch.setenv("LABEL_STUDIO_API_KEY", server.token)
    common = ["--round_dir", str(made.round_dir), "--label_studio_url", server.url]
    assert label_studio.main(["push", *common]) == 0
    said = output()
    project = json.loads((made.round_dir.parent / api.PROJECT_FILE).read_text())["project"]
    assert f"annotate in Label Studio: {server.url}/projects/{project}" in said.out
    assert f"label_studio.py pull --round_dir {made.round_dir}" in said.out
    with pytest.raises(SystemExit) as refused:
        label_studio.main(["pull", *common])
    err = output().err
    assert refused.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("label_studio.py pull: --accept_partial: ") and "neither annotated nor skipped" in err
    token_file = tmp_path / "token"
    token_file.write_text(server.token)
    token_file.chmod(0o644)
    with pytest.raises(SystemExit):
        label_studio.main(["pull", *common, "--label_studio_token_file", str(token_file)])
    err = output().err
    assert err.startswith("label_studio.py pull: --label_studio_token_file: ") and "chmod 600" in err
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", server.token[:-4] + "AAAA")  # a signature that is not the server's
    with pytest.raises(SystemExit):
        label_studio.main(["push", *common])
    err = output().err
    assert err.startswith("label_studio.py push: $LABEL_STUDIO_API_KEY: ") and "refused the token" in err
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", server.token)
    assert label_studio.main(["pull", *common, "--accept_partial"]) == 0
    assert output().out.strip().splitlines()[-1].endswith("--resume --accept_partial")
    everything = "".join(printed) + "".join(p.read_text(errors="replace") for p in
                                            made.round_dir.parent.parent.rglob("*") if p.is_file())
    assert server.token.split(".")[2] not in everything and server.token.split(".")[1] not in everything
