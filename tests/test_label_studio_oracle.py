"""``trainer.py --oracle label_studio`` against the session's real Label Studio 1.23.2 (issue 27): each round goes to
the run's project through the API and comes back through it at ``--resume`` (no export file, no path typed by a
person), or while the trainer waits (``--wait``, a thread annotating as a person would); the model trains on
exactly the masks submitted; the token is nowhere in what the run writes or prints; the ML backend is connected to
the run's project when one is given. Real ISIC photos (the shared downscaled sample) at 64 px."""
from __future__ import annotations

import argparse
import csv
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import label_studio as ls
import label_studio_api as api
import label_studio_backend
import settings
import trainer
from annotation_rounds import hide_masks
from label_studio_helpers import annotate_task, real_format_data

RUN = ["--model_cfg", "sam2.1_hiera_t", "--checkpoint", "none", "--gpu", "cpu", "--img_size", "64",
       "--batch_size", "2", "--pool_size", "3", "--max_epochs", "2", "--val_every", "2", "--save_from_epoch", "9",
       "--oracle", "label_studio"]


@pytest.fixture(scope="module")
def photos(isic_sample):
    found = sorted((isic_sample / "images").glob("*.jpg"))
    if len(found) < 6:
        pytest.skip(f"the six real ISIC photos are not at {isic_sample}")
    return found


def unlabeled_photos(where: Path, photos) -> tuple:
    """Four training photos without their masks (the truths kept aside) and two validation photos."""
    data = real_format_data(where / "data", photos[:4], photos[4:])
    answers = hide_masks(data / "Training_GroundTruth", where / "answers")
    return data, {p.name.replace("_segmentation.png", ".jpg"): np.asarray(Image.open(p)) > 127
                  for p in answers.iterdir()}


def round_tasks(server, run_dir: Path, round_number: int) -> dict:
    """image -> its task of the round in the run's project (as the project record names it)."""
    client = api.connect(server.url, api.Token(server.token, "the test"))
    project = api.read_project_record(run_dir)["project"]
    run_id = ls.run_id(run_dir / "annotate")
    return {t["data"]["mdsam_image"]: t for t in api.find_tasks(client, project, dict(mdsam_run=run_id,
                                                                                      mdsam_round=round_number))}


def erased(mask: np.ndarray) -> np.ndarray:
    """A person's correction: the truth with its top third erased."""
    corrected = mask.copy()
    corrected[: mask.shape[0] // 3] = False
    return corrected


@pytest.fixture
def token_env(label_studio, monkeypatch, tmp_path):
    """The token in a file only its owner may read (and not in the environment); the trainer told the server's
    document root (the runs lie below it, so the server serves their round folders)."""
    monkeypatch.delenv(api.TOKEN_VARIABLE, raising=False)
    path = tmp_path / "token"
    path.write_text(label_studio.token + "\n")
    path.chmod(0o600)
    monkeypatch.setenv(ls.DOCUMENT_ROOT_VARIABLE, str(label_studio.document_root))
    return ["--label_studio_url", label_studio.url, "--label_studio_token_file", str(path)]


def test_rounds_go_out_and_come_back_through_the_api_and_the_model_trains_on_them(label_studio, token_env, photos,
                                                                                  capfd, report_figure):
    where = label_studio.document_root / "oracle"
    data, truth = unlabeled_photos(where, photos)
    argv = RUN + token_env + ["--data_root", str(data), "--output", str(where / "out")]
    started = time.monotonic()
    # round 1 is handed over as a folder round; the person switches to Label Studio (both oracles are a person):
    # the resume pushes it, and says which tasks are not done yet
    first = trainer.main([a if a != "label_studio" else "folder" for a in argv])
    run_dir, round_1 = first["run_dir"], first["round_dir"]
    with pytest.raises(SystemExit) as not_done:
        trainer.main(argv + ["--resume"])
    assert not_done.value.code == 2
    tasks = round_tasks(label_studio, run_dir, 1)
    assert sorted(tasks) == sorted(f"{n}.jpg" for n in first["requested"]) and len(tasks) == 2
    said = capfd.readouterr().err
    assert "--accept_partial: " in said and all(f"data?task={t['id']}" in said for t in tasks.values())

    # annotated as a person would: one correction with a band erased, one image skipped
    kept, skipped = sorted(tasks)
    submitted = erased(truth[kept])
    annotate_task(label_studio, tasks[kept]["id"], submitted, 12.5)
    annotate_task(label_studio, tasks[skipped]["id"], None, 3.0)
    with pytest.raises(SystemExit) as refused:  # a skip without --accept_partial: the image would be lost
        trainer.main(argv + ["--resume"])
    assert refused.value.code == 2

    # a second, bigger round, with the ML backend connected to the project for the person
    backend = label_studio_backend.Backend(run_dir, label_studio.url, None, label_studio.document_root,
                                           torch.device("cpu"))
    http = label_studio_backend.serve(backend, "127.0.0.1", 0)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        second = trainer.main(argv + ["--resume", "--accept_partial", "--label_studio_backend",
                                      f"http://127.0.0.1:{http.port}"])
    finally:
        http.shutdown()
    mask = np.asarray(Image.open(round_1 / kept.replace(".jpg", "_segmentation.png")))
    np.testing.assert_array_equal(mask, submitted.astype(np.uint8) * 255)  # pulled pixel for pixel
    assert not (round_1 / skipped.replace(".jpg", "_segmentation.png")).exists()
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    assert state["labeled_names"] == [Path(kept).stem] and state["mask_sources"] == {Path(kept).stem:
                                                                                     "annotate/round_001"}
    project = api.read_project_record(run_dir)["project"]
    assert f"{label_studio.url}/projects/{project}" in capfd.readouterr().out  # round 2: where to annotate
    backends = label_studio.call("GET", "/api/ml/", params=dict(project=project)).json()
    assert [b["url"] for b in backends] == [f"http://127.0.0.1:{http.port}"] and backends[0]["is_interactive"]

    # round 2: every image annotated with its truth; the run trains on what came back and finishes
    tasks = round_tasks(label_studio, run_dir, 2)
    assert sorted(tasks) == sorted(f"{n}.jpg" for n in second["requested"])
    for name, task in tasks.items():
        annotate_task(label_studio, task["id"], truth[name], 20.0)
    done = trainer.main(argv + ["--resume"])
    report_figure(f"label studio oracle: 2 rounds through the API (one image skipped) in "
                  f"{time.monotonic() - started:.0f} s")
    assert done["epochs"] == 2 and len(done["labeled"]) == 1 + len(tasks)
    trained_on = torch.load(run_dir / "last_state.pth", weights_only=True)["mask_sources"]
    assert sorted(trained_on.values()) == ["annotate/round_001"] + ["annotate/round_002"] * len(tasks)
    # issue 29: each selected image's lead time as Label Studio recorded it, and its cost against the mask the person
    # submitted (the round's proposal vs the correction: changed pixels / all pixels), not against the truth
    with open(run_dir / "al_selection.csv", newline="") as f:
        selected = {row["image"]: row for row in csv.DictReader(f)}
    assert {name: float(row["lead_time_s"]) for name, row in selected.items()} == \
        {Path(kept).stem: 12.5, **{Path(name).stem: 20.0 for name in tasks}}
    proposal = np.asarray(Image.open(round_1 / kept.replace(".jpg", "_proposal.png"))) > 127
    assert np.mean(proposal != submitted) != np.mean(proposal != truth[kept])
    assert float(selected[Path(kept).stem]["changed_fraction"]) == \
        pytest.approx(np.mean(proposal != submitted), abs=2e-3)

    # the token: in no file of the run, and never printed
    printed = capfd.readouterr()
    secret = label_studio.token
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    assert secret not in printed.out + printed.err


def annotate_when_pushed(server, run_dir: Path, truth: dict, rounds: int, failures: list) -> None:
    """A person at Label Studio while the trainer waits: each round's tasks, once they are there, annotated with
    the truth (round 1's first image skipped)."""
    try:
        for number in range(1, rounds + 1):
            deadline = time.monotonic() + 600
            while True:
                tasks = round_tasks(server, run_dir, number) if (run_dir / "annotate" / api.PROJECT_FILE).is_file() \
                    else {}
                if tasks and all(int(t.get("total_annotations") or 0) + int(t.get("cancelled_annotations") or 0) == 0
                                 for t in tasks.values()):
                    break
                assert time.monotonic() < deadline, f"round {number} never reached Label Studio"
                time.sleep(0.5)
            for position, (name, task) in enumerate(sorted(tasks.items())):
                skip = number == 1 and position == 0
                annotate_task(server, task["id"], None if skip else truth[name], 5.0)
    except Exception as err:  # noqa: BLE001 - reported by the test
        failures.append(err)


def test_with_wait_the_run_goes_on_while_a_person_annotates(label_studio, token_env, photos, capfd, report_figure):
    where = label_studio.document_root / "oracle_wait"
    data, truth = unlabeled_photos(where, photos)
    run_dir = where / "out" / "Skin_64"
    failures: list = []
    person = threading.Thread(target=annotate_when_pushed, args=(label_studio, run_dir, truth, 2, failures),
                              daemon=True)
    person.start()
    started = time.monotonic()
    result = trainer.main(RUN + token_env + ["--data_root", str(data), "--output", str(where / "out"), "--wait"])
    person.join(timeout=60)
    assert not failures, failures
    report_figure(f"label studio oracle: a --wait run of 2 rounds in {time.monotonic() - started:.0f} s")
    assert result["epochs"] == 2 and "round_dir" not in result  # it never stopped
    assert len(result["labeled"]) == 3  # 2 + 2 selected, 1 skipped
    with open(run_dir / "al_selection.csv", newline="") as f:  # the lead times of the rounds waited for
        assert [row["lead_time_s"] for row in csv.DictReader(f)] == ["5"] * 3
    said = (run_dir / "log.txt").read_text()
    # the progress lines the trainer logged while it polled (the first ones depend on how fast the person is)
    assert "round 1: 1 of 2 annotated, 1 skipped" in said and "round 2: 2 of 2 annotated, 0 skipped" in said
    printed = capfd.readouterr()
    assert label_studio.token not in printed.out + printed.err + said


def test_the_oracle_s_flags_are_checked_before_anything_is_written(label_studio, tmp_path, photos, capsys,
                                                                  monkeypatch):
    data, _ = unlabeled_photos(tmp_path, photos)
    monkeypatch.delenv(api.TOKEN_VARIABLE, raising=False)
    base = RUN + ["--data_root", str(data), "--output", str(tmp_path / "out"), "--label_studio_url", label_studio.url]
    good, bad = tmp_path / "token", tmp_path / "bad_token"
    for path, text in ((good, label_studio.token), (bad, "not-a-token")):
        path.write_text(text + "\n")
        path.chmod(0o600)
    cases = [([], f"${api.TOKEN_VARIABLE}: no Label Studio token"),
             (["--label_studio_url", "http://127.0.0.1:9", "--label_studio_token_file", str(good)],
              "--label_studio_url: http://127.0.0.1:9 does not answer"),
             (["--label_studio_token_file", str(bad)], f"--label_studio_token_file: {label_studio.url} refused the "
                                                        "token")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            trainer.main(base + extra)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
    for flags in (["--oracle", "folder", "--wait"], ["--oracle", "ground_truth", "--label_studio_backend", "x"]):
        with pytest.raises(SystemExit):
            trainer.main(base + flags)
        assert "needs --oracle label_studio" in capsys.readouterr().err
    parser = settings.build_parser()
    args = settings.prepare_args(parser, parser.parse_args(base + ["--wait"]), base + ["--wait"])
    settings.check_processes(args, 1)
    with pytest.raises(settings.UsageError, match="--wait under torchrun would hold every process"):
        settings.check_processes(args, 2)  # what trainer.main checks with torchrun's process count


@pytest.mark.parametrize("resume", [False, True])
def test_a_round_folder_error_names_the_trainers_flag(resume):
    """The trainer's round folders are in its --output (label_studio.py's --round_dir names them in that command);
    the SDK missing is --oracle label_studio's; what else goes wrong with a round, --resume's or --oracle's."""
    args = argparse.Namespace(resume=resume, label_studio_token_file=None)
    for err, flag in ((ls.RoundFolderError("a round folder"), "--output"),
                      (ls.MaskClashError("a mask"), "--output"),
                      (ls.SdkMissingError("no SDK"), "--oracle label_studio"),
                      (ls.LabelStudioError("other"), "--resume" if resume else "--oracle label_studio")):
        assert str(trainer.label_studio_error(args, err)).startswith(f"{flag}: "), (type(err).__name__, flag)
