"""The one atomic write and the one safe checkpoint load of this repository.

* ``atomic_path(path)``: a context manager giving a temporary path beside ``path``; when the block ends
  without an error the temporary file is renamed onto ``path`` (``os.replace``: readers see the old file or
  the new one, never half of one), otherwise it is removed. Every file the program writes goes through it
  (``atomic_write_text``, ``atomic_torch_save``, images, CSVs). ``replace=False`` never puts it onto an existing
  file (masks made from a person's annotation: nothing a person wrote is overwritten).
* ``atomic_folder(path)``: the same for a whole folder (the demo's synthetic data set): filled under a temporary
  name, renamed into place when complete.
* ``probe_writable(path)``: the error writing ``path`` would raise, before any work is done for it.
* ``replaced_input(output, inputs)``: the input that writing ``output`` would replace (a command's output must be
  none of its inputs).
* ``WriteError``: a write that failed for a reason of the disk (full, read-only, no permission), naming the path;
  what was half-written is removed first.
* ``load_torch_file(path)``: ``torch.load(..., weights_only=True)``; any failure is one ``CheckpointFileError``
  that names the file and says what is wrong with it (``unloadable_file_message``: pickled code, told apart from
  damage by reading the pickle's opcodes with ``pickled_code``, never by running it).

Temporary files are named ``.tmp-<name>-<random><suffix>`` (folders ``.tmp-<name>-<random>``) so that a process
killed mid-write leaves something recognisable (``stale_temp_files``), which ``remove_stale_temps`` removes. A long
name is cut so that the temporary name is no longer than the final one: it fits wherever the final name fits.
"""
from __future__ import annotations

import csv
import errno
import io
import os
import pickle
import pickletools
import shutil
import tempfile
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING  # Python 2 names in protocol-2 pickles
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Dict, FrozenSet, Iterable, Iterator, List, Optional, Sequence, Union

import torch

PathLike = Union[str, os.PathLike]
TEMP_PREFIX = ".tmp-"
TEMP_RANDOM = 8  # the random characters tempfile puts in a name
TEMP_EXTRA = len(TEMP_PREFIX) + 1 + TEMP_RANDOM  # what a temporary name adds to a stem: ".tmp-", "-", the random part
WHOLE_STEM = 50  # stems up to this long stay whole in a temporary name (at most 64 characters and the suffix)
_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then restored
os.umask(_UMASK)


class CheckpointFileError(ValueError):
    """A file that should hold a checkpoint cannot be used; the message names it and says why."""


# errno values that say the disk, not the data, stopped a write
_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
_NOT_WRITABLE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


class WriteError(OSError):
    """Writing ``path`` failed because of the disk: full (``full`` True) or not writable; nothing half-written is
    left. The message names the path and says which (an ``OSError``, so callers that catch those still do)."""

    def __init__(self, path: PathLike, err: OSError) -> None:
        self.path, self.full = Path(path), err.errno in _DISK_FULL
        named = Path(err.filename) if err.filename else None  # a folder on the way, or the file; not our temp name
        where = named if named is not None and not named.name.startswith(TEMP_PREFIX) else self.path.parent
        if self.full:
            why = f"{_DISK_FULL[err.errno]} ({err.strerror})"
        elif err.errno == errno.ENAMETOOLONG:  # no space or permission helps: say which name
            why = _name_too_long(self.path)
        else:
            why = ("" if where == self.path else f"{where} is ") + f"not writable ({refusal_reason(err)})"
        super().__init__(err.errno, f"cannot write {self.path}: {why}; nothing half-written is left", str(self.path))

    def __str__(self) -> str:
        return self.strerror

    @staticmethod
    def about_the_disk(err: BaseException) -> bool:
        """Whether ``err`` is an OSError of a full or not writable disk (not, e.g., a missing file being read)."""
        return isinstance(err, OSError) and (err.errno in _DISK_FULL or err.errno in _NOT_WRITABLE)


def _name_too_long(path: Path) -> str:
    """Which name in ``path`` is longer than its file system allows (else: the whole path is too long)."""
    folder = next((p for p in path.parents if p.is_dir()), Path("."))
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # what Linux and macOS file systems allow
    longest = max(path.parts, key=len)
    if len(longest) <= limit:
        return f"its path is {len(str(path))} characters long, longer than the system allows; choose a shorter path"
    what = "its name" if longest == path.name else f"the folder name {longest[:24]}... in it"
    return (f"{what} is {len(longest)} characters long, longer than the file system allows there ({limit}); choose a "
            "shorter name")


def refusal_reason(err: OSError) -> str:
    """Why the disk refused a write, in a few words ("the disk is full", "read-only file system", ...; else the
    system's own)."""
    return _DISK_FULL.get(err.errno) or _NOT_WRITABLE.get(err.errno) or err.strerror or str(err)


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
    try:
        tmp = _new_temp_file(path)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; written files get the usual permissions
    except OSError as err:
        raise WriteError(path, err) from err
    place = os.replace if replace else _link_if_new
    try:
        with _renamed_into_place(Path(tmp), path, lambda t: t.unlink(missing_ok=True), place) as written:
            yield written
    except OSError as err:  # the temporary file is gone already
        if WriteError.about_the_disk(err) and not isinstance(err, WriteError):
            raise WriteError(path, err) from err
        raise


def probe_writable(path: PathLike) -> None:
    """Raise the ``OSError`` that writing ``path`` with ``atomic_path`` would raise (folder not creatable, not
    writable, read-only, ``path`` a folder) by doing its first steps: the folder is created and an empty
    temporary file made beside ``path`` and removed at once; ``path`` itself is not touched."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
    os.unlink(_new_temp_file(path))


def replaced_input(output: PathLike, inputs: Iterable[PathLike]) -> Optional[Path]:
    """The first of ``inputs`` that writing ``output`` would replace: the same file on disk (the same path once
    resolved, or a symbolic or hard link to it); None when there is none. An ``output`` that does not exist yet is
    no input, so ``inputs`` (any iterable, read lazily) is then not read at all. Every command refuses an output that
    is one of its inputs (a checkpoint, an image, a mask, an export) before it does any work."""
    try:
        written = os.stat(output)
    except OSError:
        return None
    for path in inputs:
        try:
            if os.path.samestat(written, os.stat(path)):
                return Path(path)
        except OSError:  # an input that is not there cannot be replaced
            continue
    return None


def _temp_prefix(stem: str) -> str:
    """``.tmp-<stem>-``, the start of a temporary name (then tempfile's TEMP_RANDOM characters, then the suffix).
    A stem longer than WHOLE_STEM loses its last characters, so that the temporary name is no longer than the final
    name (or than WHOLE_STEM + TEMP_EXTRA + the suffix): it fits wherever the final name fits."""
    return f"{TEMP_PREFIX}{stem[:max(WHOLE_STEM, len(stem) - TEMP_EXTRA)]}-"


def _new_temp_file(path: Path) -> str:
    """An empty temporary file beside ``path`` (its folder created), named to be found by ``remove_stale_temps``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.stem), suffix=path.suffix, dir=path.parent)
    os.close(handle)
    return tmp


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def csv_text(rows: Sequence[Sequence]) -> str:
    """``rows`` as CSV text (one ``\n``-ended line each), to write with ``atomic_write_text``."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def atomic_torch_save(obj: object, path: PathLike, before_rename: Optional[Callable[[], None]] = None) -> None:
    """``torch.save(obj)`` to ``path`` atomically (``before_rename()``, if given, runs between writing and renaming).
    torch writes through a file of ours, so that a full disk is the ``OSError`` saying so (``WriteError``), not
    torch's "unexpected pos" from its own writer."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as stream:
            try:
                torch.save(obj, stream)
            except RuntimeError as err:  # torch's writer reports the failed write(); the OSError is its context
                if isinstance(err.__context__, OSError):
                    raise err.__context__ from None
                raise
        if before_rename is not None:
            before_rename()


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; when the block ends without an error it is renamed to
    ``path`` (which must not exist, or be an empty folder), otherwise it is removed. A process killed inside the
    block leaves only the temporary folder, never a half-filled ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(path.name), dir=path.parent)
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700
    with _renamed_into_place(Path(tmp), path, lambda t: shutil.rmtree(t, ignore_errors=True)) as written:
        yield written


def stale_temp_files(folder: PathLike, name: str = "") -> List[Path]:
    """Temporary files and folders that ``atomic_path``/``atomic_folder`` left in ``folder`` (not recursive) when a
    process was killed mid-write; with ``name``, only those of the target called ``name`` (a file's stem, a folder's
    name; a long one: of any target whose name starts as its temporary name does, see ``_temp_prefix``)."""
    folder = Path(folder)
    pattern = f"{_temp_prefix(name)}*" if name else f"{TEMP_PREFIX}*"
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

    Raises ``CheckpointFileError`` naming ``path`` when it does not exist or cannot be loaded (the message is
    ``unloadable_file_message``'s: pickled code, not a PyTorch file, or a damaged one).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointFileError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # a plain pickle of protocol > 2 makes torch warn before it refuses it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - garbage makes the unpickler fail in many ways (IndexError, ...)
        raise CheckpointFileError(unloadable_file_message(path, err)) from None


def first_names(names: Sequence[str], count: int = 3) -> str:
    """The first ``count`` of ``names``, and how many more: "a, b, c and 4 more" (in one-line messages)."""
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def unloadable_file_message(path: PathLike, err: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed with ``err``, in one sentence naming ``path``: it holds
    pickled code (the names it would import, found by ``pickled_code``), it is no file written by torch.save at
    all, or it is truncated or damaged. torch raises the same ``UnpicklingError`` for code and for damage, so the
    file's content decides, not the wording of torch's message. The one text of every failed checkpoint load
    (``load_torch_file``, and whoever maps another loader's error, e.g. ``sam2.build_sam``'s)."""
    path = Path(path)
    code = pickled_code(path)
    if code:
        return (f"{path} holds pickled Python objects (code), not only tensors: loading it would call "
                f"{first_names(code)}; "
                "it is refused for safety. Load only checkpoints written by this repository or the official SAM2 "
                "releases")
    if isinstance(err, pickle.UnpicklingError):
        return _unreadable(path, "it cannot be unpickled")
    detail = str(err).split(". ")[0][:120]
    return _unreadable(path, f"{type(err).__name__}: {detail}" if len(detail) > 8 else type(err).__name__)


def _unreadable(path: Path, reason: str) -> str:
    """Why ``path`` cannot be loaded: not written by torch.save at all (a zip archive, or a pickle for the legacy
    format), or a damaged one."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head.startswith((ZIP_MAGIC, PICKLE_PROTO)):
        looks_like = ("a YAML config? were a config and a checkpoint swapped?" if _looks_like_yaml_config(head)
                      else "a text file?")
        return (f"{path} is not a readable PyTorch checkpoint: it is not a file written by torch.save at all "
                f"(it starts with {head[:4]!r}; {looks_like})")
    return f"{path} is not a readable PyTorch checkpoint: it is truncated or damaged ({reason})"


def _looks_like_yaml_config(head: bytes) -> bool:
    """Whether a file's first bytes read as a YAML mapping with a top-level ``model:`` (or any ``_target_``)."""
    text = head.decode("utf-8", errors="replace")
    return "_target_:" in text or any(line.startswith("model:") for line in text.splitlines())


# --------------------------------------------------------------------------------------------------------------
# What a pickle would import (read, never run)
# --------------------------------------------------------------------------------------------------------------

ZIP_MAGIC, PICKLE_PROTO = b"PK\x03\x04", b"\x80"
# torch.save's legacy (non-zip) format is five pickles back to back (magic number, protocol, system info, the
# object, storage keys), then raw tensor bytes that must not be read as opcodes
_LEGACY_PICKLES = 5
_STRING_OPCODES = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                             "SHORT_BINSTRING"})
_MEMO_READS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_WRITES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


def allowed_pickle_globals() -> FrozenSet[str]:
    """``module.name`` of every global torch's ``weights_only`` unpickler accepts: its tensor-rebuild table
    (rebuild functions, storages, dtypes, OrderedDict, ...) plus what ``torch.serialization.add_safe_globals``
    added. The table is private to torch; should it move, the names of ``_FALLBACK_MODULES`` count instead."""
    table = getattr(torch, "_weights_only_unpickler", None)
    try:
        return frozenset(table._get_allowed_globals()) | frozenset(table._get_user_allowed_globals())
    except AttributeError:
        return frozenset()


_FALLBACK_MODULES = ("torch", "torch._utils", "torch._tensor", "torch.nn.parameter", "collections")


def _is_allowed(name: str, allowed: FrozenSet[str]) -> bool:
    return name in allowed if allowed else name.rpartition(".")[0] in _FALLBACK_MODULES


def pickled_code(path: PathLike) -> List[str]:
    """Globals (``module.name``) the pickle in ``path`` would import or call beyond ``allowed_pickle_globals`` —
    empty for a file of tensors, or for one that is no pickle at all. Read with ``pickletools``, never unpickled.

    The pickle is a zip checkpoint's ``*.pkl`` members (``data.pkl``), or the file itself (the legacy format, a
    plain pickle). GLOBAL, INST and STACK_GLOBAL name what REDUCE / NEWOBJ / BUILD then call; a STACK_GLOBAL whose
    name cannot be followed, and a copyreg extension code (EXT1/2/4), count as code too.
    """
    allowed = allowed_pickle_globals()
    found: List[str] = []
    for stream in _pickle_streams(Path(path)):
        for name in _referenced_globals(stream):
            if not _is_allowed(name, allowed) and name not in found:
                found.append(name)
    return found


def _pickle_streams(path: Path) -> Iterator[BinaryIO]:
    """Each pickle-holding part of ``path``, as a binary stream at its first opcode (nothing when unreadable)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        yield io.BytesIO(archive.read(member))
        else:
            with open(path, "rb") as stream:
                yield stream
    except (OSError, zipfile.BadZipFile, RuntimeError):  # a damaged archive: damage, not code
        return


def _referenced_globals(stream: BinaryIO) -> Iterator[str]:
    """``module.name`` of every global the pickles in ``stream`` refer to (up to ``_LEGACY_PICKLES`` back to back).
    Only pickles read through to their STOP count: bytes that merely start like one (text, tensor data) do not."""
    for _ in range(_LEGACY_PICKLES):
        try:
            names = list(_globals_of_one_pickle(stream))
        except Exception:  # noqa: BLE001 - truncated or garbage opcodes: nothing more to read
            return
        yield from names


def _python3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 (and torch's unpickler) reads it: protocol-2 pickles say ``__builtin__``."""
    module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
    return f"{module}.{name}"


def _globals_of_one_pickle(stream: io.BytesIO) -> Iterator[str]:
    """Follow one pickle's opcodes up to its STOP. ``pushed`` holds what the last opcodes put on the stack as far
    as strings go (None for anything else), enough to name the module and attribute STACK_GLOBAL pops."""
    pushed: List[Optional[str]] = []
    memo: Dict[object, Optional[str]] = {}
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            yield _python3_name(*str(arg).split(" ", 1))
        elif name == "STACK_GLOBAL":
            module, attribute = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            yield _python3_name(module, attribute) if module and attribute else "a STACK_GLOBAL of unknown name"
        elif name.startswith("EXT"):
            yield f"copyreg extension {arg}"
        if name in _MEMO_WRITES:
            memo[len(memo) if arg is None else arg] = pushed[-1] if pushed else None
        elif name in _MEMO_READS:
            pushed.append(memo.get(arg))
        elif opcode.stack_after:
            pushed.append(str(arg) if name in _STRING_OPCODES else None)
        del pushed[:-2]
