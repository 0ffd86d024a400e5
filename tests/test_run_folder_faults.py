"""Issue 18 through trainer.main: a run folder has one owner, complete records and the same data; a full or
read-only disk, files that are not what their flag expects, and data that changed each end as one line naming the
file and what to do, with nothing lost. Real processes only where the case needs one: the second process on a run
folder, a kill with DataLoader workers alive."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import safe_io
import trainer
from sam_lora_image_encoder_prompt import build_model
from run_copies import copy_run
from small_runs import refused, small_argv, small_data

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """6 training / 2 validation images, 64 px wide. Read-only (tests that change it copy it)."""
    return small_data(tmp_path_factory, "faults")


def argv_of(data: Path, out: Path, *extra: str) -> list:
    return small_argv(data, out, *extra, save_from_epoch=10)


@pytest.fixture(scope="module")
def one_epoch(data, tmp_path_factory) -> Path:
    """The run folder of a run stopped after epoch 1 of 2 (max_epochs 1, so a --resume with 2 goes on). Never
    modified: tests work on copies (``copy_run``)."""
    out = tmp_path_factory.mktemp("one_epoch")
    return trainer.main(argv_of(data, out, "--max_epochs", "1"))["run_dir"]


def snapshot(folder: Path) -> dict:
    """Every file with its inode, size and mtime (the owner lock aside: taking it is no change of the run)."""
    return {p: (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "owner.lock"}


# ----------------------------------------------------------------------------- one owner (real processes)

def wait_for(path: Path, process: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``path`` exists (the paused process wrote it); fails if the process ends first."""
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, f"the run ended (rc {process.returncode}) before its pause point"
        assert time.monotonic() - start < timeout, f"no {path} after {timeout} s"
        time.sleep(0.05)


def children_of(pid: int) -> list:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_second_process_is_refused_and_a_killed_owner_with_workers_blocks_nothing(data, tmp_path, capsys):
    """A trainer (a real process, 2 DataLoader workers) paused mid-epoch 1 (MDSAM_PAUSE_AT) owns its run folder: a
    second trainer on the same --output, with or without --resume, is refused naming the folder and the owner's
    pid, and changes nothing. The owner is then SIGKILLed with its workers stopped, not dead: they inherited its
    lock descriptor, yet the folder is free at once, and --resume continues the killed run."""
    from folder_lock import FolderLock

    out, go = tmp_path / "out", tmp_path / "go"
    argv = argv_of(data, out, "--max_epochs", "1", "--num_workers", "2")
    owner = subprocess.Popen([sys.executable, "trainer.py", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=dict(os.environ, MDSAM_PAUSE_AT=f"train_batch:1:{go}"))
    workers = []
    try:
        wait_for(Path(f"{go}.paused"), owner)
        run_dir = out / "Skin_64"
        before = snapshot(run_dir)
        for extra in ([], ["--resume"]):
            line = refused(argv + extra, capsys)
            assert f"--output {out}: {run_dir} is in use by another process (pid {owner.pid} on " in line, line
            assert line.endswith("wait until it ends, or choose another --output")
        assert snapshot(run_dir) == before
        workers = children_of(owner.pid)
        assert len(workers) >= 2, "the paused training loop has no DataLoader workers"
        for worker in workers:
            os.kill(worker, signal.SIGSTOP)  # alive, holding what they inherited, until the end of the test
        owner.kill()
        owner.wait(timeout=60)
        assert all(Path(f"/proc/{w}").exists() for w in workers)
        assert FolderLock.owner_of(run_dir) is None, "the killed run's workers keep its folder owned"
    finally:
        owner.kill()
        for worker in workers:
            try:
                os.kill(worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
    result = trainer.main(argv + ["--resume"])  # stopped in epoch 1: nothing to continue, it starts afresh
    assert result["epochs"] == 1 and len(result["labeled"]) == 2


# ----------------------------------------------------------------------------- complete records

@pytest.mark.parametrize("record", ["config.txt", "al_selection.csv", "metrics.csv"])
def test_a_run_folder_missing_a_record_is_not_resumed(one_epoch, data, tmp_path, capsys, record):
    """config.txt deleted used to be rewritten as a one-line stub, al_selection.csv as a file of the resumed epochs
    only: refused, naming the file; nothing is written."""
    run_dir = copy_run(one_epoch, tmp_path)
    (run_dir / record).unlink()
    before = snapshot(run_dir)
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "2", "--resume"), capsys)
    assert line.startswith(f"trainer.py: error: --resume: {run_dir / record} is missing")
    assert "records of this run up to its last finished epoch (1) are incomplete: restore that file" in line
    assert snapshot(run_dir) == before and not (run_dir / record).exists()


# ----------------------------------------------------------------------------- files that are not what they should be

@pytest.mark.parametrize("content, held", [
    (lambda: [1, 2, 3], "it holds a list of 3 items"),
    (lambda: build_model("sam2.1_hiera_t", None, 64).state_dict(), "it holds a model's weights (a state dict) of"),
], ids=["a list", "a model"])
def test_last_state_that_is_a_list_or_a_model_is_named(one_epoch, data, tmp_path, capsys, content, held):
    run_dir = copy_run(one_epoch, tmp_path)
    (run_dir / "last_state.pth").unlink()
    torch.save(content(), run_dir / "last_state.pth")
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "2", "--resume"), capsys)
    assert f"--resume: {run_dir / 'last_state.pth'} is not a resume state written by this trainer: {held}" in line
    assert "restore the run's own, or start afresh in another output folder" in line and "KeyError" not in line


def test_last_state_of_a_model_of_another_size_is_one_line(one_epoch, data, tmp_path, capsys):
    """The trained tensors of a hiera_s run in a hiera_t run's last_state.pth (a state copied from another run, or a
    config file changed since): one line with build_sam.state_mismatch's summary, not torch's hundreds of keys."""
    run_dir = copy_run(one_epoch, tmp_path)
    state = torch.load(run_dir / "last_state.pth", weights_only=True)
    other = build_model("sam2.1_hiera_s", None, 64)
    state["trainable"] = {n: p.detach() for n, p in other.named_parameters() if p.requires_grad}
    (run_dir / "last_state.pth").unlink()
    torch.save(state, run_dir / "last_state.pth")
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "2", "--resume"), capsys)
    assert (f"--resume: {run_dir / 'last_state.pth'} holds the trained weights of another model than the one built "
            "from sam2.1_hiera_t: ") in line
    assert "16 unexpected (e.g." in line and "4 of another shape (e.g." in line and len(line) < 1000


def test_hand_edited_round_marker_is_named_at_resume(one_epoch, data, tmp_path, capsys):
    """awaiting_masks.json edited by hand (images as a dict: the old `KeyError: 0`)."""
    run_dir = copy_run(one_epoch, tmp_path)
    (run_dir / "awaiting_masks.json").write_text(json.dumps(dict(epoch=2, round_dir="annotate/round_002",
                                                                 images={"0": "ISIC_0000001.jpg"}, pool_scores={})))
    line = refused(argv_of(data, run_dir.parent, "--max_epochs", "2", "--resume"), capsys)
    assert f"--resume: {run_dir / 'awaiting_masks.json'} is not the marker this program writes when a round waits " \
           "for masks (images is a dict, not a list of image file names): restore it; or delete it" in line


@pytest.mark.parametrize("what", ["checkpoint", "yaml_without_model"])
def test_model_cfg_that_is_no_sam2_config_is_one_line(data, tmp_path, capsys, what):
    """sam2's ConfigFileError reaches the trainer as ModelInputError: config and checkpoint swapped, a YAML file of
    something else."""
    config = tmp_path / "model.yaml"
    if what == "checkpoint":
        torch.save({"model": {"w": torch.zeros(1)}}, config)
    else:
        config.write_text("trainer:\n  epochs: 3\n")
    line = refused(argv_of(data, tmp_path / "out", "--model_cfg", str(config)), capsys)
    expected = "is a PyTorch checkpoint" if what == "checkpoint" else "has no top-level 'model' node"
    assert line.startswith(f"trainer.py: error: --model_cfg {config}: SAM2 config {config} {expected}"), line
    assert line.endswith("pass a SAM2 YAML config: a path, or one of sam2.1_hiera_b+, sam2.1_hiera_l, "
                         "sam2.1_hiera_s, sam2.1_hiera_t")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the data

def test_a_validation_set_of_empty_masks_is_refused(data, tmp_path, capsys):
    """All-empty validation masks used to give Dice 1.0 and best_model_dice1.0000.pth."""
    from PIL import Image

    copy = Path(shutil.copytree(data, tmp_path / "data"))
    for mask in (copy / "Validation_GroundTruth").iterdir():
        Image.new("L", Image.open(mask).size).save(mask)
    line = refused(argv_of(copy, tmp_path / "out", "--val_limit", "2"), capsys)
    assert f"--data_root {copy}: all 2 ground-truth masks of '{copy / 'Validation_GroundTruth'}' are empty" in line
    assert not (tmp_path / "out").exists()


def test_max_image_pixels_reaches_the_datasets(data, tmp_path, capsys):
    line = refused(argv_of(data, tmp_path / "out", "--max_image_pixels", "1000"), capsys)
    assert f"--data_root {data}: '{data / 'Training_Data' / 'ISIC_0000000.jpg'}' claims" in line
    assert "more than the limit of 1,000" in line and "pass a larger --max_image_pixels" in line
    assert "--max_image_pixels must be >= 1 (got 0)" in refused(argv_of(data, tmp_path / "out", "--max_image_pixels",
                                                                         "0"), capsys)


def test_resume_with_other_images_is_refused_and_new_ones_are_taken_when_asked(one_epoch, data, tmp_path, capsys):
    """A --data_root whose training set grew used to continue silently with other selections: images added,
    removed or resized are named; --accept_new_images takes new training images into the unlabeled pool (logged,
    recorded); a folder without images.json (an older trainer's) resumes as before. (--max_epochs 1: the resumes
    have no epoch left to train, the checks are all there is.)"""
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    run_dir = copy_run(one_epoch, tmp_path)
    labeled = set(torch.load(run_dir / "last_state.pth", weights_only=True)["labeled_names"])
    unlabeled = sorted({p.stem for p in (copy / "Training_Data").iterdir()} - labeled)
    for new in ("ISIC_0000100", "ISIC_0000101"):
        shutil.copy(copy / "Training_Data" / f"{unlabeled[0]}.jpg", copy / "Training_Data" / f"{new}.jpg")
        shutil.copy(copy / "Training_GroundTruth" / f"{unlabeled[0]}_segmentation.png",
                    copy / "Training_GroundTruth" / f"{new}_segmentation.png")
    resized = copy / "Training_Data" / f"{unlabeled[1]}.jpg"
    original = resized.read_bytes()
    resized.write_bytes(original + b"\0" * 7)  # after the JPEG's end: still the same picture, 7 bytes more
    gone = copy / "Validation_Data" / "ISIC_0000007.jpg"
    moved = shutil.move(gone, tmp_path / gone.name)
    argv = argv_of(copy, run_dir.parent, "--max_epochs", "1", "--resume")  # no epoch left to train: only the checks
    before = snapshot(run_dir)
    line = refused(argv, capsys)
    assert (f"--resume: the images are not those the run was made with ({run_dir / 'images.json'}): Training: 2 "
            f"added (ISIC_0000100.jpg, ISIC_0000101.jpg); Training: 1 resized ({resized.name} {len(original)} -> "
            f"{len(original) + 7} bytes); Validation: 1 removed (ISIC_0000007.jpg)") in line
    assert "--accept_new_images" not in line
    resized.write_bytes(original)
    shutil.move(moved, gone)
    line = refused(argv, capsys)
    assert line.endswith("Training: 2 added (ISIC_0000100.jpg, ISIC_0000101.jpg); or pass --accept_new_images to "
                         "take the new training images into the unlabeled pool")
    assert snapshot(run_dir) == before
    trainer.main(argv + ["--accept_new_images"])
    assert "--accept_new_images: 2 new training images join the unlabeled pool: ISIC_0000100.jpg, ISIC_0000101.jpg" \
        in (run_dir / "log.txt").read_text()
    assert len(json.loads((run_dir / "images.json").read_text())["Training"]) == 8
    (run_dir / "images.json").unlink()  # as an older trainer's run folder: it resumes, and is recorded now
    trainer.main(argv)
    assert len(json.loads((run_dir / "images.json").read_text())["Training"]) == 8


# ----------------------------------------------------------------------------- a full or read-only disk

class _FullDisk(io.FileIO):
    """The file system fills up after the first 4 KiB of this file (inside torch's zip writer: its own writer says
    "unexpected pos" there)."""

    def write(self, data) -> int:
        if self.tell() + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_disk_full_at_the_resume_state_is_one_line_and_resume_works_after(one_epoch, data, tmp_path, capsys,
                                                                          monkeypatch, selection_rows):
    """Disk full while epoch 2 writes last_state.pth (torch's "inline_container.cc ... unexpected pos" traceback):
    one line naming the file, nothing half-written, epoch 1's state intact; with space again --resume continues from
    it, dropping what epoch 2 had recorded (--max_epochs 1 there: the run ends at the state it continues from)."""
    run_dir = copy_run(one_epoch, tmp_path)
    open_file = open

    def full_for_the_state(name, mode="r", *args, **kwargs):
        if Path(name).name.startswith(".tmp-last_state-") and "w" in mode:
            return _FullDisk(name, mode)
        return open_file(name, mode, *args, **kwargs)

    monkeypatch.setattr(safe_io, "open", full_for_the_state, raising=False)
    argv = argv_of(data, run_dir.parent, "--max_epochs", "2", "--resume")
    line = refused(argv, capsys)
    assert line == (f"trainer.py: error: cannot write {run_dir / 'last_state.pth'}: the disk is full (No space left "
                    "on device); nothing half-written is left; free space there (or make it writable), then run the "
                    "same command with --resume")
    assert not list(run_dir.glob(".tmp-*"))
    assert torch.load(run_dir / "last_state.pth", weights_only=True)["epoch"] == 1
    assert {r["epoch"] for r in selection_rows(run_dir)} == {"1", "2"}, "epoch 2 recorded its selection first"
    monkeypatch.undo()
    assert trainer.main(argv_of(data, run_dir.parent, "--max_epochs", "1", "--resume"))["epochs"] == 1
    assert {r["epoch"] for r in selection_rows(run_dir)} == {"1"} and len(selection_rows(run_dir)) == 2


def test_read_only_data_folder_under_folder_oracle_stops_before_anything_is_written(data, tmp_path, capsys,
                                                                                     monkeypatch):
    """--oracle folder on a read-only data folder: the mask folder cannot be made. It used to be an OSError traceback
    after last_state.pth was written; now one line naming the folder, before last_state.pth or the round."""
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    shutil.rmtree(copy / "Training_GroundTruth")
    mkdir = Path.mkdir

    def read_only_data(self, *args, **kwargs):
        if self == copy / "Training_GroundTruth":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_data)
    line = refused(argv_of(copy, tmp_path / "out", "--oracle", "folder"), capsys)
    assert line.startswith(f"trainer.py: error: cannot write {copy / 'Training_GroundTruth'}: not writable "
                           "(read-only file system); nothing half-written is left")
    run_dir = tmp_path / "out" / "Skin_64"
    assert not (run_dir / "last_state.pth").exists() and not (run_dir / "annotate").exists()
