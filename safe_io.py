"""The one atomic write and the one safe checkpoint load of this repository.

* ``atomic_path(path)``: a context manager giving a temporary path beside ``path``; when the block ends
  without an error the temporary file is renamed onto ``path`` (``os.replace``: readers see the old file or
  the new one, never half of one), otherwise it is removed. Every file the program writes goes through it
  (``atomic_write_text``, ``atomic_torch_save``, images, CSVs). ``replace=False`` never puts it onto an existing
  file (masks made from a person's annotation: nothing a person wrote is overwritten).
* ``atomic_folder(path)``: the same for a whole folder (the demo's synthetic data set): filled under a temporary
  name, renamed into place when complete.
* ``load_torch_file(path)``: ``torch.load(..., weights_only=True)``; any failure is one ``CheckpointFileError``
  that names the file and says what is wrong with it.

Temporary files are named ``.tmp-<name>-<random><suffix>`` (folders ``.tmp-<name>-<random>``) so that a process
killed mid-write leaves something recognisable (``stale_temp_files``), which ``remove_stale_temps`` removes.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Union

import torch

PathLike = Union[str, os.PathLike]
TEMP_PREFIX = ".tmp-"
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


class CheckpointFileError(ValueError):
    """A file that should hold a checkpoint cannot be used; the message names it and says why."""


@contextmanager
def _renamed_into_place(tmp: Path, path: Path, remove: Callable[[Path], None],
                        place: Callable[[Path, Path], None] = os.replace) -> Iterator[Path]:
    """Yield ``tmp``; ``place`` it at ``path`` when the block succeeds, else ``remove`` it and re-raise."""
    try:
        yield tmp
        place(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def _link_if_new(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` only if nothing has it: a hard link fails on an existing name
    (FileExistsError), where a rename would replace it."""
    os.link(tmp, path)
    tmp.unlink()


@contextmanager
def atomic_path(path: PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers can infer the format); on success
    it replaces ``path``, on any error (or KeyboardInterrupt) it is removed and ``path`` is left as it was.

    ``replace=False`` (what a person wrote, e.g. a mask): an existing ``path`` is never replaced, not even one that
    appeared while the block ran; the block's end then raises FileExistsError and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the usual permissions
    place = os.replace if replace else _link_if_new
    with _renamed_into_place(Path(tmp), path, lambda t: t.unlink(missing_ok=True), place) as written:
        yield written


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: object, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; when the block ends without an error it is renamed to
    ``path`` (which must not exist, or be an empty folder), otherwise it is removed. A process killed inside the
    block leaves only the temporary folder, never a half-filled ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent)
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    with _renamed_into_place(Path(tmp), path, lambda t: shutil.rmtree(t, ignore_errors=True)) as written:
        yield written


def stale_temp_files(folder: PathLike, name: str = "") -> List[Path]:
    """Temporary files and folders that ``atomic_path``/``atomic_folder`` left in ``folder`` (not recursive) when a
    process was killed mid-write; with ``name``, only those of the target called ``name`` (a file's stem)."""
    folder = Path(folder)
    pattern = f"{TEMP_PREFIX}{name}-*" if name else f"{TEMP_PREFIX}*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() or p.is_dir()) if folder.is_dir() else []


def remove_stale_temps(folder: PathLike, name: str = "") -> List[Path]:
    """Remove ``stale_temp_files(folder, name)``; returns what was removed. Call it only where no other process
    is writing (a run folder at start or resume)."""
    stale = stale_temp_files(folder, name)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


def load_torch_file(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> object:
    """``torch.load(path, weights_only=True)``: tensors, containers and plain values only, never code.

    Raises ``CheckpointFileError`` naming ``path`` when it does not exist, is not a PyTorch file, or holds
    pickled code (refused for safety: such a file could run anything when loaded).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err):  # a class or function to import: pickled code
            raise CheckpointFileError(
                f"{path} holds pickled Python objects (code), not only tensors; it is refused for safety. "
                "Load only checkpoints written by this repository or the official SAM2 releases") from None
        raise CheckpointFileError(_unreadable(path, "it cannot be unpickled")) from None
    except Exception as err:  # noqa: BLE001 - garbage makes the unpickler fail in many ways (IndexError, ...)
        detail = str(err).split(". ")[0][:120]
        raise CheckpointFileError(_unreadable(path, f"{type(err).__name__}: {detail}" if len(detail) > 8
                                              else type(err).__name__)) from None


def _unreadable(path: Path, reason: str) -> str:
    """Why ``path`` cannot be loaded: not written by torch.save at all (a zip archive, or a pickle for the legacy
    format), or a damaged one."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        return (f"{path} is not a readable PyTorch checkpoint: it is not a file written by torch.save at all "
                f"(it starts with {head!r}; a text file?)")
    return f"{path} is not a readable PyTorch checkpoint: it is truncated or damaged ({reason})"
