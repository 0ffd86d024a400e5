"""The one atomic write and the one safe checkpoint load of this repository.

* ``atomic_path(path)``: a context manager giving a temporary path beside ``path``; when the block ends
  without an error the temporary file is renamed onto ``path`` (``os.replace``: readers see the old file or
  the new one, never half of one), otherwise it is removed. Every file the program writes goes through it
  (``atomic_write_text``, ``atomic_torch_save``, images, CSVs).
* ``load_torch_file(path)``: ``torch.load(..., weights_only=True)``; any failure is one ``CheckpointFileError``
  that names the file and says what is wrong with it.

Temporary files are named ``.tmp-<name>-<random><suffix>`` so that a process killed mid-write leaves
something recognisable (``stale_temp_files``).
"""
from __future__ import annotations

import os
import pickle
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Union

import torch

PathLike = Union[str, os.PathLike]
TEMP_PREFIX = ".tmp-"
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


class CheckpointFileError(ValueError):
    """A file that should hold a checkpoint cannot be used; the message names it and says why."""


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder (same suffix, so writers can infer the format); on success
    it replaces ``path``, on any error (or KeyboardInterrupt) it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj: object, path: PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def stale_temp_files(folder: PathLike) -> List[Path]:
    """Temporary files ``atomic_path`` left in ``folder`` (not recursive) when a process was killed mid-write."""
    folder = Path(folder)
    return sorted(p for p in folder.glob(f"{TEMP_PREFIX}*") if p.is_file()) if folder.is_dir() else []


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
        raise CheckpointFileError(f"{path} is not a readable PyTorch checkpoint: it is truncated or another "
                                  "kind of file (it cannot be unpickled)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError) as err:
        detail = str(err).split(". ")[0][:120]
        reason = f"{type(err).__name__}: {detail}" if len(detail) > 8 else type(err).__name__
        raise CheckpointFileError(f"{path} is not a readable PyTorch checkpoint: it is truncated or another kind "
                                  f"of file ({reason})") from None
