"""safe_io.load_torch_file: pickled code is told apart from damage by what the file holds (its pickle's opcodes, read
with pickletools, never run), for zip checkpoints and plain pickles, and sam2's own load error gets the same message."""
from __future__ import annotations

import errno
import io
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch

import safe_io
from safe_io import CheckpointFileError, load_torch_file, pickled_code
from sam_lora_image_encoder_prompt import ModelInputError, build_model

SYSTEM = f"{os.system.__module__}.system"  # posix.system here


class _SystemCall:
    """Pickled, this is a call of os.system(...): code. Only its pickle is ever written; it is only ever loaded
    through the safe loader, which must refuse it unrun."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def payload_checkpoint(tmp_path: Path) -> Path:
    """A zip checkpoint (torch.save) whose data.pkl holds real tensors and an os.system call."""
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _SystemCall(tmp_path / "ran")}, path)
    return path


def test_os_system_in_a_zip_checkpoint_is_called_code_not_damage(tmp_path):
    """Issue 18: torch says "unsupported GLOBAL ... is blocked" for os/posix payloads, which the old check (the word
    "global" in torch's message) took for damage."""
    path = payload_checkpoint(tmp_path)
    assert pickled_code(path) == [SYSTEM]
    with pytest.raises(CheckpointFileError) as info:
        load_torch_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} holds pickled Python objects (code)") and SYSTEM in message
    assert "refused for safety" in message and "damaged" not in message and "weights_only" not in message
    assert not (tmp_path / "ran").exists(), "the payload ran"


@pytest.mark.parametrize("protocol", [2, 4])
def test_plain_pickle_payload_is_code_and_torch_warning_is_silenced(protocol, tmp_path):
    """A raw (non-zip) pickle goes through torch's legacy path, which warns about protocols > 2 before refusing."""
    path = tmp_path / "raw.pkl"
    with open(path, "wb") as f:
        pickle.dump({"x": _SystemCall(tmp_path / "ran")}, f, protocol=protocol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointFileError, match=rf"raw\.pkl holds pickled Python objects \(code\).*{SYSTEM}"):
            load_torch_file(path)
    assert [str(w.message) for w in caught] == []
    assert not (tmp_path / "ran").exists()


def test_opcode_scan_follows_global_inst_and_stack_global(tmp_path):
    """Hand-written pickles naming os.system through each opcode that imports: GLOBAL, INST (protocol 0) and
    STACK_GLOBAL with memoised strings (protocol 4), each then called (REDUCE / INST itself)."""
    pickles = {
        "global": b"cos\nsystem\n(S'echo'\ntR.",
        "inst": b"(S'echo'\nios\nsystem\n.",
        "stack_global": b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x8c\x04echo\x94\x85R.",
    }
    for name, data in pickles.items():
        (tmp_path / name).write_bytes(data)
        assert pickled_code(tmp_path / name) == ["os.system"], name
    assert "torch._utils._rebuild_tensor_v2" in safe_io.allowed_pickle_globals()
    torch.save({"w": torch.zeros(3), "n": torch.nn.Parameter(torch.ones(1))}, tmp_path / "tensors.pt")
    torch.save({"w": torch.zeros(3)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert pickled_code(tmp_path / "tensors.pt") == [] and pickled_code(tmp_path / "legacy.pt") == []


def test_damage_and_text_keep_their_messages(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(1000)}, good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:300])
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    for name in ("truncated.pt", "legacy.pt"):
        with pytest.raises(CheckpointFileError, match=rf"{name} is not a readable PyTorch checkpoint: it is truncated "
                                                      "or damaged"):
            load_torch_file(tmp_path / name)
    (tmp_path / "notes.pt").write_text("cos\nsystem\nmy notes, not a checkpoint\n")  # starts like a GLOBAL opcode
    with pytest.raises(CheckpointFileError, match=r"notes\.pt is not a readable PyTorch checkpoint: it is not a file "
                                                  r"written by torch\.save at all \(it starts with b'cos\\n'; a text"):
        load_torch_file(tmp_path / "notes.pt")
    (tmp_path / "config.pt").write_text("# @package _global_\n\nmodel:\n  _target_: x.Y\n")
    with pytest.raises(CheckpointFileError, match=r"a YAML config\? were a config and a checkpoint swapped\?"):
        load_torch_file(tmp_path / "config.pt")


def test_sam2s_own_load_error_gets_the_message_of_every_other_load(tmp_path):
    """Issue 15 item 6: sam2 raises its own CheckpointReadError; the model factory maps it to load_torch_file's text."""
    path = payload_checkpoint(tmp_path)
    with pytest.raises(CheckpointFileError) as direct:
        load_torch_file(path)
    with pytest.raises(ModelInputError) as via_factory:
        build_model("sam2.1_hiera_t", str(path), 64, device="cpu")
    assert via_factory.value.source == "checkpoint"
    assert str(via_factory.value) == str(direct.value)
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- issue 18: a full or read-only disk

class _FullDisk(io.FileIO):
    """A file on a disk that fills up after ``room`` bytes: write() then fails as the kernel's would (ENOSPC)."""

    room = 100

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_full_disk_while_torch_saves_is_said_and_leaves_the_old_file(tmp_path, monkeypatch):
    """torch's own writer says "inline_container.cc ... unexpected pos" on a full disk; saved through our file, the
    OSError says it: one WriteError naming the file, the temporary file removed, the old file untouched."""
    path = tmp_path / "last_state.pth"
    safe_io.atomic_torch_save({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(safe_io, "open", lambda name, mode: _FullDisk(name, mode), raising=False)
    with pytest.raises(safe_io.WriteError) as err:
        safe_io.atomic_torch_save({"w": torch.zeros(1000)}, path)
    assert str(err.value) == (f"cannot write {path}: the disk is full (No space left on device); nothing "
                              "half-written is left")
    assert err.value.full and isinstance(err.value, OSError) and "unexpected pos" not in str(err.value)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last_state.pth"]


@pytest.mark.parametrize("code, said", [(errno.ENOSPC, "the disk is full"),
                                        (errno.EROFS, "not writable (read-only file system)")])
def test_text_write_on_a_full_or_read_only_disk_names_the_file(tmp_path, monkeypatch, code, said):
    path = tmp_path / "metrics.csv"

    def refused(self, text):
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(Path, "write_text", refused)
    with pytest.raises(safe_io.WriteError, match=f"cannot write {path}: .*{re.escape(said)}"):
        safe_io.atomic_write_text(path, "epoch\n1\n")
    assert not list(tmp_path.iterdir()), "the temporary file is left"


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run"))

    monkeypatch.setattr(safe_io.tempfile, "mkstemp", read_only)
    with pytest.raises(safe_io.WriteError, match=rf"cannot write {tmp_path}/run/a.txt: {tmp_path}/run is not "
                                                 r"writable \(read-only file system\)"):
        safe_io.atomic_write_text(tmp_path / "run" / "a.txt", "x")


# ----------------------------------------------------------------------------- issue 26: an output that is an input

def test_replaced_input_is_the_same_file_by_path_or_by_link(tmp_path):
    checkpoint, other = tmp_path / "best.pth", tmp_path / "copy.pth"
    checkpoint.write_bytes(b"weights")
    other.write_bytes(b"weights")  # the same bytes, another file: writing it replaces no input
    (tmp_path / "sub").mkdir()
    (tmp_path / "symlink.csv").symlink_to(checkpoint)
    os.link(checkpoint, tmp_path / "hard_link.csv")
    inputs = [tmp_path / "missing.pth", other, checkpoint]
    for output in (checkpoint, tmp_path / "sub" / ".." / "best.pth", tmp_path / "symlink.csv",
                   tmp_path / "hard_link.csv"):
        assert safe_io.replaced_input(output, inputs) == checkpoint, output
    assert safe_io.replaced_input(tmp_path / "metrics.csv", inputs) is None
    assert safe_io.replaced_input(other, [checkpoint]) is None

    def never_listed():
        raise AssertionError("an output that does not exist yet replaces nothing: the inputs are not listed")
        yield

    assert safe_io.replaced_input(tmp_path / "new.csv", never_listed()) is None


# ----------------------------------------------------------------------------- issue 26: long names

@pytest.mark.parametrize("length", [243, 255])  # a 230-character image's <stem>_segmentation.png; the longest name
def test_a_temporary_name_fits_wherever_the_final_name_fits(tmp_path, length):
    """The temporary name was the final name plus 14 characters (.tmp-, -, 8 random): a long final name that fits
    made a temporary one that did not (OSError "File name too long", said as a folder not writable)."""
    name = "x" * (length - 4) + ".png"
    with safe_io.atomic_path(tmp_path / name) as tmp:
        assert len(tmp.name) <= len(name) and tmp.suffix == ".png" and tmp.name.startswith(".tmp-xxxx")
        assert safe_io.stale_temp_files(tmp_path) == [tmp], "a temporary file left by a kill is still recognised"
        tmp.write_text("ok")
    assert (tmp_path / name).read_text() == "ok"
    safe_io.probe_writable(tmp_path / name)
    with safe_io.atomic_folder(tmp_path / ("d" * length)) as folder:
        assert len(folder.name) <= length
        assert safe_io.stale_temp_files(tmp_path, "d" * length) == [folder]
    assert (tmp_path / ("d" * length)).is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "d" * length])


def test_short_names_keep_their_whole_stem_in_the_temporary_name(tmp_path):
    with safe_io.atomic_path(tmp_path / "best_model_dice0.8732.pth") as tmp:
        assert tmp.name.startswith(".tmp-best_model_dice0.8732-") and tmp.suffix == ".pth"


def test_a_name_too_long_for_the_file_system_is_said_as_such(tmp_path):
    """Not "not writable ... free space": no space or permission helps a name over the file system's limit."""
    path = tmp_path / ("x" * 300 + ".png")
    with pytest.raises(safe_io.WriteError) as err:
        safe_io.atomic_write_text(path, "x")
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    assert str(err.value) == (f"cannot write {path}: its name is 304 characters long, longer than the file system "
                              f"allows there ({limit}); choose a shorter name; nothing half-written is left")
    assert err.value.errno == errno.ENAMETOOLONG and not safe_io.WriteError.about_the_disk(err.value)
    assert not list(tmp_path.iterdir())
