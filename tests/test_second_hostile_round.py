"""Issue 26 through trainer.main and the comparison's report: a copied run folder is independent, a finished
run is never cleared, a resume repeats what it must and logs what it may change, a damaged start or record is one
line naming the file, Ctrl-C says what was kept. One finished 2-epoch run is shared; tests work on copies."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pytest
import torch

import comparison_report as report
import trainer
from run_copies import copy_run
from run_folder import RunFolder
from safe_io import load_torch_file
from small_runs import refused, small_argv, small_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_data(tmp_path_factory, "hostile2")


def argv_of(data: Path, out: Path, *extra: str) -> list:
    return small_argv(data, out, *extra, save_from_epoch=1)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> Path:
    """A finished 2-epoch run (a best checkpoint from epoch 1 on). Never modified: tests work on copies."""
    return trainer.main(argv_of(data, tmp_path_factory.mktemp("finished"), "--max_epochs", "2"))["run_dir"]


def rewrite_state(run_dir: Path, state: dict) -> None:
    """Save a changed resume state in a copy (its checkpoints are hard links to the original's: unlink first)."""
    (run_dir / "last_state.pth").unlink()
    torch.save(state, run_dir / "last_state.pth")


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "owner.lock"}


def test_a_copied_run_folder_touches_only_its_own_files(finished, data, tmp_path):
    """Item 1: the copy's resume state names the original's best checkpoint (as states written before the fix did:
    the path as given, absolute); the copy's next best checkpoint must replace the copy's, never the original's.
    Item 3: a resume may change --val_every, and says so."""
    original = copy_run(finished, tmp_path / "a")
    stale = original / "best_model_dice0.0001.pth"
    shutil.copyfile(original / "last_model.pth", stale)
    copy = copy_run(original, tmp_path / "b")
    state_file = copy / "last_state.pth"
    state = load_torch_file(state_file)
    state.update(best_dice=-1.0, best_path=str(stale))  # as a state of an older trainer recorded it
    rewrite_state(copy, state)
    result = trainer.main(argv_of(data, copy.parent, "--max_epochs", "3", "--resume", "--val_every", "2"))
    assert stale.is_file(), "the copy removed the original's best checkpoint"
    assert len(list(original.glob("best_model_dice*.pth"))) == 2
    assert [p.parent for p in copy.glob("best_model_dice*.pth")] == [copy], "one best checkpoint, in the copy"
    assert result["best_path"].parent == copy
    assert RunFolder(copy).load_state().best_path == result["best_path"].name, "recorded relative to the folder"
    assert "--val_every is now 2 (it was 1)" in (copy / "log.txt").read_text()


@pytest.mark.parametrize("resume", [False, True])
def test_a_finished_run_without_its_state_is_never_cleared(finished, data, tmp_path, capsys, resume):
    """Item 2: last_model.pth and last_state.pth deleted; the records show finished epochs: refused, nothing
    removed (it used to be cleared as a run that stopped in its first epoch)."""
    run_dir = copy_run(finished, tmp_path)
    for name in ("last_model.pth", "last_state.pth"):
        (run_dir / name).unlink()
    before = files_of(run_dir)
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "2", *(["--resume"] if resume else [])), capsys)
    assert f"{run_dir} holds a run whose records show a finished epoch (al_selection.csv, metrics.csv, " \
           "best_model_dice" in line
    assert "restore last_state.pth to continue it with --resume, or choose another --output" in line
    assert files_of(run_dir) == before


def test_a_dead_run_with_a_setting_removed_gets_one_message(finished, data, tmp_path, capsys):
    """Item 10: a run that stopped in its first epoch, its config.txt missing a line: the plain rerun and --resume
    say the same thing, with a way out (it used to be "pass --resume", then "no run to continue")."""
    run_dir = copy_run(finished, tmp_path)
    for name in ("last_model.pth", "last_state.pth"):
        (run_dir / name).unlink()
    for name in ("al_selection.csv", "metrics.csv"):  # what a run killed in epoch 1, after its row, leaves
        lines = (run_dir / name).read_text().splitlines(keepends=True)
        (run_dir / name).write_text("".join(line for line in lines if not line.startswith("2,")))
    config = (run_dir / "config.txt").read_text().splitlines(keepends=True)
    (run_dir / "config.txt").write_text("".join(line for line in config if not line.startswith("rank:")))
    plain = refused(argv_of(data, run_dir.parent, "--max_epochs", "2"), capsys)
    again = refused(argv_of(data, run_dir.parent, "--max_epochs", "2", "--resume"), capsys)
    assert plain == again
    assert "stopped before finishing its first epoch" in plain and "config.txt lacks rank" in plain
    assert "restore those lines (the run then starts afresh), or remove the folder, or choose another --output" in plain


@pytest.mark.parametrize("flag, given, said", [("--keep_best", "newest", "--keep_best was 'all', now 'newest'"),
                                               ("--val_limit", "2", "--val_limit was 1, now 2")])
def test_a_resume_repeats_keep_best_and_val_limit(finished, data, tmp_path, capsys, flag, given, said):
    """Item 3: a resume with another --keep_best or --val_limit is refused naming both values (a text setting's
    quoted); a state written before they were resume keys takes them from config.txt (the run kept 'newest'; its
    config.txt is made to say 'all', so that the value refused can only come from there)."""
    run_dir = copy_run(finished, tmp_path)
    state = load_torch_file(run_dir / "last_state.pth")
    for key in ("keep_best", "val_limit"):
        state["args"].pop(key)  # an older state
    rewrite_state(run_dir, state)
    if flag == "--keep_best":
        config = (run_dir / "config.txt").read_text()
        assert "keep_best: newest" in config
        (run_dir / "config.txt").write_text(config.replace("keep_best: newest", "keep_best: all"))
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "3", "--resume", flag, given), capsys)
    assert said in line and line.count(" was ") == 1, line


@pytest.mark.parametrize("strategy", ["mask_difference", "random"])
def test_a_lora_start_holding_nan_is_refused_before_the_first_epoch(tmp_path, data, capsys, strategy):
    """Item 7: a RuntimeError traceback (mask_difference) or "training diverged ... lower --base_lr" (random)."""
    from sam_lora_image_encoder_prompt import build_model

    net = build_model("sam2.1_hiera_t", None, 64)
    path = tmp_path / "lora.pth"
    net.save_lora_parameters(path)
    tensors = load_torch_file(path)
    key = next(k for k in sorted(tensors) if "lora" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    torch.save(tensors, path)
    line = refused(argv_of(data, tmp_path / "out", "--lora_ckpt", str(path), "--strategy", strategy), capsys)
    assert line.startswith(f"trainer.py: error: --lora_ckpt: {path} holds NaN or inf in ")
    assert "--base_lr" not in line and not (tmp_path / "out").exists()


def test_an_output_name_over_the_file_system_limit_is_one_line(data, tmp_path, capsys):
    """Item 11: it was an OSError traceback."""
    line = refused(argv_of(data, tmp_path / ("x" * 300)), capsys)
    assert "--output" in line and "File name too long" in line and "choose another --output" in line


@pytest.mark.parametrize("edit", ["renamed", "repeated"])
def test_hand_edits_to_the_selection_log_are_refused_on_resume(finished, data, tmp_path, capsys, edit):
    """Item 17: a renamed image or a repeated row of al_selection.csv, checked against last_state.pth."""
    run_dir = copy_run(finished, tmp_path)
    path = run_dir / "al_selection.csv"
    lines = path.read_text().splitlines(keepends=True)
    if edit == "renamed":
        lines[1] = lines[1].replace("ISIC_", "ISIC_X", 1)
    else:
        lines.insert(2, lines[1])
    path.write_text("".join(lines))
    before = files_of(run_dir)
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "3", "--resume"), capsys)
    assert f"{path} line {2 if edit == 'renamed' else 3}" in line
    assert ("does not hold as labeled (renamed?)" if edit == "renamed" else "repeats line 2") in line
    assert files_of(run_dir) == before


def test_ctrl_c_says_what_was_kept_and_warnings_reach_the_log(finished, data, tmp_path, capsys, monkeypatch):
    """Item 17: Ctrl-C printed a KeyboardInterrupt traceback; images left out for lack of a mask were warned on
    stderr only, not in log.txt."""
    run_dir = copy_run(finished, tmp_path / "a")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_one_epoch", interrupt)
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "3", "--resume"), capsys, code=130)
    assert line == ("trainer.py: interrupted (Ctrl-C); last_state.pth and the best checkpoint are those of epoch 2, "
                    "untouched: run the same command with --resume to continue from there")
    lacking = Path(shutil.copytree(data, tmp_path / "data"))
    next((lacking / "Training_GroundTruth").glob("*.png")).unlink()
    line = refused(argv_of(lacking, tmp_path / "b"), capsys, code=130)
    assert "no epoch was finished, so nothing is kept to continue: run the same command again" in line
    assert "1 of 6 images" in (tmp_path / "b" / "Skin_64" / "log.txt").read_text()


def test_collect_leaves_out_a_run_whose_records_are_damaged(finished, tmp_path, capsys):
    """Item 16: a damaged metrics.csv or test_metrics.csv was a traceback; the run is left out of the report,
    named in summary.md and on stderr, and the other runs are reported."""
    jobs = []
    for seed in (1, 2, 3):
        run_dir = copy_run(finished, tmp_path / f"seed{seed}")
        (run_dir / report.TEST_CSV).write_text("name,index,dice,jaccard,threshold_jaccard,hd95\na,0,0.5,0.4,0,3\n")
        jobs.append(report.Job("random", seed, run_dir, [], argparse.Namespace()))
    (jobs[1].run_dir / "metrics.csv").write_text("epoch,labeled,dice\n1,two,0.5\n")
    (jobs[2].run_dir / report.TEST_CSV).write_text("name,index,dice\na,0,0.5\n")
    plan = report.Plan(tmp_path, ["random"], [1, 2, 3], [2], jobs, report.Job(report.ZERO_SHOT, 1, tmp_path / "z", [],
                       argparse.Namespace()), [None], 4, 6, argparse.Namespace())
    res = report.gather(plan)
    assert sorted(res.curves["random"]) == [1] and sorted(res.tests["random"]) == [1]
    left = [m for m in res.missing if "left out" in m]
    assert len(left) == 2 and "random/seed2 (left out: " in left[0] and "metrics.csv" in left[0]
    assert "random/seed3 (left out: " in left[1] and "has no column 'jaccard'" in left[1]
    assert capsys.readouterr().err.count("left out of the report") == 2


def test_a_simulated_run_is_not_resumed_by_a_person(finished, data, tmp_path, capsys):
    """Issue 27: switching between --oracle folder and label_studio on a --resume is allowed (both are a person;
    tests/test_label_studio_oracle.py); between a person and ground_truth it is refused, naming both, before
    anything is changed."""
    run_dir = copy_run(finished, tmp_path)
    before = files_of(run_dir)
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "3", "--resume", "--oracle", "folder"), capsys)
    assert line == ("trainer.py: error: --oracle folder: the run was made with --oracle ground_truth and is "
                    "resumed with --oracle folder: a person's masks and the simulation's ground truth do not mix "
                    "in one run; resume it with the oracle it was made with; nothing was changed")
    assert files_of(run_dir) == before
