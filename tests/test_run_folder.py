"""The run folder's protocol (run_folder.py): metrics.csv rows, the folder's status, opening it for a run, the
resume state's checks. The trainer's end-to-end use of it is in test_trainer_e2e.py."""
from __future__ import annotations

import csv

import pytest
import torch

from run_folder import FolderInUse, ResumeState, RunFolder, RunFolderError, SettingsDiffer


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_metrics_rows_are_added_replaced_and_forgotten(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_metrics_row(dict(epoch=1, labeled=2, loss=0.5, dice=None, scoring_s=1.0))
    folder.write_metrics_row(dict(epoch=2, labeled=4, loss=0.4, dice=0.25, scoring_s=1.5))
    folder.write_metrics_row(dict(epoch=3, labeled=6, loss=0.3, dice=0.5, scoring_s=1.2))
    text = rows_of(tmp_path / "metrics.csv")
    assert list(text[0]) == ["epoch", "labeled", "loss", "dice", "scoring_s"]
    assert [r["epoch"] for r in text] == ["1", "2", "3"] and text[0]["dice"] == "" and text[1]["dice"] == "0.25"
    # a resumed run redoes epoch 3: the rows of unfinished epochs go, the redone epoch's row replaces them
    folder.forget_after(2)
    assert [r["epoch"] for r in rows_of(tmp_path / "metrics.csv")] == ["1", "2"]
    folder.write_metrics_row(dict(epoch=3, labeled=6, loss=0.25, dice=0.75, scoring_s=1.1))
    folder.write_metrics_row(dict(epoch=3, labeled=6, loss=0.2, dice=0.8, scoring_s=1.0))
    rows = folder.read_metrics()
    assert [(r["epoch"], r["labeled"], r["loss"], r["dice"]) for r in rows] == \
        [(1, 2, 0.5, None), (2, 4, 0.4, 0.25), (3, 6, 0.2, 0.8)]
    assert not list(tmp_path.glob(".tmp-*")), "written atomically, nothing left behind"


def test_metrics_columns_are_the_union_of_every_rows(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_metrics_row(dict(epoch=1, labeled=1, loss=0.5))
    folder.write_metrics_row(dict(epoch=2, labeled=2, loss=0.4, dice=0.3))
    assert folder.read_metrics() == [dict(epoch=1, labeled=1, loss=0.5, dice=None),
                                     dict(epoch=2, labeled=2, loss=0.4, dice=0.3)]


def state(epoch=1, **settings):
    return ResumeState(epoch, dict(settings), {"w": torch.zeros(1)}, {}, {}, ["a"], 0.5, "")


def test_status_follows_the_files(tmp_path):
    folder = RunFolder(tmp_path / "Skin_64")
    assert folder.status() == "new"
    folder.write_config(dict(img_size=64))
    assert folder.status() == "dead"  # config but no state: stopped before its first epoch ended
    folder.save_state(state())
    assert folder.status() == "interrupted"
    folder.write_awaiting(dict(epoch=2, round_dir="annotate/round_002", images=[], pool_scores={}))
    assert folder.status() == "waiting"
    (folder.path / "last_model.pth").write_bytes(b"")
    assert folder.status() == "waiting", "a round still waits"
    folder.epoch_saved()
    assert folder.status() == "finished"


def test_opening_a_folder_for_a_run(tmp_path):
    folder = RunFolder(tmp_path)
    keys, legacy = ("img_size", "pool_size", "precision"), dict(precision="mixed")
    assert folder.open_for_run(dict(img_size=64, pool_size=4, precision="float32"), keys, legacy, False) == \
        (False, None)
    # a run that died in epoch 1, recorded by an older trainer without "precision": its legacy value is how it ran
    folder.write_config(dict(img_size=64, pool_size=4))
    assert folder.open_for_run(dict(img_size=64, pool_size=4, precision="mixed"), keys, legacy, False) == (True, None)
    with pytest.raises(SettingsDiffer) as differ:
        folder.open_for_run(dict(img_size=64, pool_size=4, precision="float32"), keys, legacy, False)
    assert differ.value.dead and differ.value.changes == [("precision", "'mixed'", "'float32'")]
    # a run with a finished epoch: refused without resume, checked against the state with it
    folder.save_state(state(img_size=64, pool_size=4))
    with pytest.raises(FolderInUse):
        folder.open_for_run(dict(img_size=64, pool_size=4, precision="mixed"), keys, legacy, False)
    dead, resumed = folder.open_for_run(dict(img_size=64, pool_size=4, precision="mixed"), keys, legacy, True)
    assert not dead and resumed.epoch == 1 and resumed.labeled_names == ["a"]
    with pytest.raises(SettingsDiffer) as differ:
        folder.open_for_run(dict(img_size=64, pool_size=8, precision="mixed"), keys, legacy, True)
    assert differ.value.changes == [("pool_size", "4", "8")] and not differ.value.dead


@pytest.mark.parametrize("content", [[1, 2, 3], {"model": {}}], ids=["a list", "a model file"])
def test_a_resume_state_that_is_something_else_is_named(tmp_path, content):
    torch.save(content, tmp_path / "last_state.pth")
    with pytest.raises(RunFolderError, match=r"last_state.pth is not a resume state written by this trainer"):
        RunFolder(tmp_path).load_state()


def test_reopening_drops_what_an_unfinished_epoch_wrote(tmp_path):
    folder = RunFolder(tmp_path)
    folder.append_selection([[1, "a", "0.5", 1, "typiclust"], [2, "b", "0.4", 1, "mask_difference"]])
    folder.write_metrics_row(dict(epoch=1, labeled=1))
    folder.write_metrics_row(dict(epoch=2, labeled=2))
    (tmp_path / "best_model_dice0.5000.pth").write_bytes(b"kept")
    (tmp_path / "best_model_dice0.9000.pth").write_bytes(b"from the unfinished epoch 2")
    resumed = ResumeState(1, {}, {}, {}, {}, ["a"], 0.5, str(tmp_path / "best_model_dice0.5000.pth"))
    removed = folder.reopen(resumed, "resumed at epoch 2")
    assert [p.name for p in removed] == ["best_model_dice0.9000.pth"]
    assert [p.name for p in folder.best_checkpoints()] == ["best_model_dice0.5000.pth"]
    assert folder.read_selection() == [["1", "a", "0.5", "1", "typiclust"]]
    assert [r["epoch"] for r in folder.read_metrics()] == [1]
    assert (tmp_path / "config.txt").read_text().endswith("# resumed at epoch 2\n")


def test_a_selection_log_without_the_strategy_column_is_read_and_completed_on_resume(tmp_path):
    """al_selection.csv of a run made before the strategy column: read as it is (strategy ""), and a resume writes
    the column, every older row selected by the run's --strategy (there was no --first_round then)."""
    (tmp_path / "al_selection.csv").write_text("epoch,image,score,rank_in_pool\n1,a,0.5,1\n1,b,0.25,2\n2,c,0.1,1\n")
    folder = RunFolder(tmp_path)
    assert folder.read_selection() == [["1", "a", "0.5", "1", ""], ["1", "b", "0.25", "2", ""], ["2", "c", "0.1", "1", ""]]
    assert folder.labeled_per_epoch() == {1: 2, 2: 3}
    folder.reopen(ResumeState(1, {"strategy": "entropy"}, {}, {}, {}, ["a", "b"], 0.5, ""), "resumed at epoch 2")
    folder.append_selection([[2, "d", "0.3", 1, "entropy"]])
    assert rows_of(tmp_path / "al_selection.csv") == [
        dict(epoch="1", image="a", score="0.5", rank_in_pool="1", strategy="entropy"),
        dict(epoch="1", image="b", score="0.25", rank_in_pool="2", strategy="entropy"),
        dict(epoch="2", image="d", score="0.3", rank_in_pool="1", strategy="entropy")]
    (tmp_path / "al_selection.csv").write_text("epoch,image,score,rank_in_pool\n1,a,0.5\n")
    with pytest.raises(RunFolderError, match="line 2 is incomplete or damaged"):
        folder.read_selection()
