"""The run folder's protocol (run_folder.py): metrics.csv rows, the folder's status, opening it for a run, the
resume state's checks. The trainer's end-to-end use of it is in test_trainer_e2e.py."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_folder import DataChanged, FolderInUse, ResumeState, RunFolder, RunFolderError, SettingsDiffer

REPO = Path(__file__).resolve().parents[1]


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


def state(epoch=1, labeled=("a",), **settings):
    return ResumeState(epoch, dict(settings), {"w": torch.zeros(1)}, {}, {}, list(labeled), 0.5, "")


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
    folder.append_selection([[1, "a", "0.5", 1, "random"]])
    folder.write_metrics_row(dict(epoch=1, labeled=1))
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


# ----------------------------------------------------------------------------- issue 18: one owner, complete records

HOLDER = ("import sys\nfrom pathlib import Path\nfrom folder_lock import FolderLock, FolderLocked\n"
          "try:\n    lock = FolderLock(Path(sys.argv[1])).acquire()\nexcept FolderLocked as err:\n"
          "    print('refused', err.pid, flush=True)\n    sys.exit(0)\nprint('owner', flush=True)\nsys.stdin.read()\n")


def another_process(folder) -> subprocess.Popen:
    """A real second process trying to own ``folder`` (folder_lock only: no torch, fast); its first line says
    "owner" (it then holds the folder until its stdin closes) or "refused <owner's pid>"."""
    return subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_a_folder_has_one_owning_process_and_a_forked_child_takes_no_share(tmp_path):
    """The lock is the process's (a second RunFolder of the same folder in this process shares it); another process
    is refused, told this one's pid; a forked child (as a DataLoader worker) does not keep the folder owned once the
    parent gives it up."""
    folder, again = RunFolder(tmp_path), RunFolder(tmp_path)
    folder.own()
    again.own()
    other = another_process(tmp_path)
    assert other.stdout.readline().split() == ["refused", str(os.getpid())]
    other.wait(timeout=60)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # holds the descriptors it inherited until the parent closes the pipe
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    try:
        folder.release()
        again.release()
        other = another_process(tmp_path)  # while the forked child lives
        assert other.stdout.readline().strip() == "owner"
        other.communicate("", timeout=60)
    finally:
        os.close(write_end)
        os.waitpid(child, 0)


def test_images_of_a_resumed_run_are_compared_with_the_record(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.check_images({"Training": {"a.jpg": 10}}, accept_added=False) == [], "no record: an older folder"
    folder.write_images({"Training": {"a.jpg": 10, "b.jpg": 20, "c.jpg": 30}, "Validation": {"v.jpg": 5}})
    now = {"Training": {"a.jpg": 10, "b.jpg": 21, "d.jpg": 1, "e.jpg": 2}, "Validation": {"v.jpg": 5, "w.jpg": 6}}
    with pytest.raises(DataChanged) as changed:
        folder.check_images(now, accept_added=True)
    assert changed.value.changes == ["Training: 1 removed (c.jpg)", "Training: 1 resized (b.jpg 20 -> 21 bytes)",
                                     "Validation: 1 added (w.jpg)"] and not changed.value.only_added
    added = {"Training": {"a.jpg": 10, "b.jpg": 20, "c.jpg": 30, "d.jpg": 1}, "Validation": {"v.jpg": 5}}
    with pytest.raises(DataChanged, match=r"images.json\): Training: 1 added \(d.jpg\)$") as changed:
        folder.check_images(added, accept_added=False)
    assert changed.value.only_added
    assert folder.check_images(added, accept_added=True) == ["d.jpg"]


@pytest.mark.parametrize("content, problem", [
    ("[1, 2]", "it holds a JSON list, not an object"),
    ('{"epoch": 2, "round_dir": "annotate/round_002", "images": ["a.jpg"]}', "it has no pool_scores"),
    ('{"epoch": "2", "round_dir": "r", "images": [], "pool_scores": {}}', "epoch is '2', not a round number"),
    ('{"epoch": 2, "round_dir": 7, "images": [], "pool_scores": {}}', "round_dir is 7, not a folder name"),
    ('{"epoch": 2, "round_dir": "r", "images": {"0": "a.jpg"}, "pool_scores": {}}', "images is a dict, not a list"),
    ('{"epoch": 2, "round_dir": "r", "images": [0], "pool_scores": {}}', "images holds 0, not an image file name"),
    ('{"epoch": 2, "round_dir": "r", "images": [], "pool_scores": {"a": "x"}}', "pool_scores is not a mapping"),
    ('{"epoch": 2,', "unreadable: JSONDecodeError"),
])
def test_a_round_marker_edited_by_hand_is_named_with_what_is_wrong(tmp_path, content, problem):
    (tmp_path / "awaiting_masks.json").write_text(content)
    with pytest.raises(RunFolderError) as err:
        RunFolder(tmp_path).read_awaiting()
    assert str(err.value).startswith(f"{tmp_path / 'awaiting_masks.json'} is not the marker this program writes")
    assert problem in str(err.value) and "restore it; or delete it" in str(err.value)


def test_records_of_a_resumed_run_must_be_complete(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_config(dict(img_size=64))
    folder.check_records(state(epoch=0))  # a round waiting before epoch 1: config.txt only
    with pytest.raises(RunFolderError, match=r"al_selection.csv is missing \(it is written at every selection"):
        folder.check_records(state(epoch=2, labeled="ab"))
    folder.append_selection([[1, "a", "0.5", 1, "random"], [2, "b", "0.4", 1, "random"]])
    folder.write_metrics_row(dict(epoch=2, labeled=2))
    with pytest.raises(RunFolderError, match=r"metrics.csv lacks the rows of epoch 1 .*last finished epoch \(2\)"):
        folder.check_records(state(epoch=2, labeled="ab"))
    folder.write_metrics_row(dict(epoch=1, labeled=1))
    folder.check_records(state(epoch=2, labeled="ab"))
    folder.file("metrics.csv").unlink()  # and no images.json: a folder of a trainer before metrics.csv
    with pytest.raises(RunFolderError, match=r"metrics.csv is missing, as in a run folder made by a trainer.py older"):
        folder.check_records(state(epoch=2, labeled="ab"))
    folder.write_images({"Training": {"a.jpg": 1}})  # one that had both: the file was lost
    with pytest.raises(RunFolderError, match=r"metrics.csv is missing \(it is written at the end of every epoch"):
        folder.check_records(state(epoch=2, labeled="ab"))


def test_a_folder_found_new_must_still_be_new_when_it_is_created(tmp_path):
    """Two processes find the folder new and load for a while; the second to create it finds the first's run there
    (ended meanwhile, or it would be refused as owned): FolderInUse, not a second run writing into the first."""
    mine, theirs = RunFolder(tmp_path / "Skin_64"), RunFolder(tmp_path / "Skin_64")
    assert mine.open_for_run({}, (), {}, False) == (False, None) and not mine.lock.held  # nothing there to own yet
    theirs.own(create=True)
    theirs.write_config(dict(img_size=64))
    theirs.release()
    with pytest.raises(FolderInUse, match=r"already holds a run \(.*config.txt\)"):
        mine.own(create=True)
    assert not mine.lock.held
    fresh = RunFolder(tmp_path / "Skin_128")
    fresh.own(create=True)
    assert fresh.lock.held and (tmp_path / "Skin_128" / "owner.lock").is_file()


def test_a_selection_log_without_the_strategy_column_is_read_and_completed_on_resume(tmp_path):
    """al_selection.csv of a run made before the strategy column: read as it is (strategy ""), and a resume writes
    the column, every older row selected by the run's --strategy (there was no --first_round then)."""
    (tmp_path / "al_selection.csv").write_text("epoch,image,score,rank_in_pool\n1,a,0.5,1\n1,b,0.25,2\n2,c,0.1,1\n")
    folder = RunFolder(tmp_path)
    assert folder.read_selection() == [["1", "a", "0.5", "1", ""], ["1", "b", "0.25", "2", ""], ["2", "c", "0.1", "1", ""]]
    folder.reopen(ResumeState(1, {"strategy": "entropy"}, {}, {}, {}, ["a", "b"], 0.5, ""), "resumed at epoch 2")
    folder.append_selection([[2, "d", "0.3", 1, "entropy"]])
    assert rows_of(tmp_path / "al_selection.csv") == [
        dict(epoch="1", image="a", score="0.5", rank_in_pool="1", strategy="entropy"),
        dict(epoch="1", image="b", score="0.25", rank_in_pool="2", strategy="entropy"),
        dict(epoch="2", image="d", score="0.3", rank_in_pool="1", strategy="entropy")]
    (tmp_path / "al_selection.csv").write_text("epoch,image,score,rank_in_pool\n1,a,0.5\n")
    with pytest.raises(RunFolderError, match="line 2 is incomplete or damaged"):
        folder.read_selection()
