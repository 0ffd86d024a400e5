"""One owner per folder: the process that holds a folder's lock is the only one that may change what is in it.

A ``FolderLock`` is an exclusive ``fcntl.flock`` on the file ``owner.lock`` in the folder. The kernel drops it when
the owner's last descriptor of that file closes, so however the owner ends (finished, error, SIGKILL) the next
process finds the folder free: nothing stale is left to clean up. The file holds the owner's pid and host name, only
so that whoever is refused can be told who owns it.

Ownership is the process's: a second ``FolderLock`` of a folder this process owns already shares that ownership
(it is released when the last of them is). A forked child (a DataLoader worker) inherits its parent's
descriptors, and with them a share in the lock, which would then outlive the parent as long as the child lives.
Forked children therefore close their copies at once (``os.register_at_fork``); processes started with exec never
get them (Python's descriptors are not inheritable).

On a shared file system the lock is only as good as the file system's locking: see docs/resume.md ("What a run
folder guarantees").
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple

OWNER = "owner.lock"
_HELD: Dict[Tuple[int, int], List[int]] = {}  # (device, inode) of a lock file this process holds -> [fd, holders]


def _close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors (the lock stays the parent's)."""
    for fd, _ in _HELD.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class FolderLocked(Exception):
    """Another process owns ``folder``; ``owner`` says which ("pid 123 on host"; None before it wrote its name),
    ``pid`` its process id."""

    def __init__(self, folder: Path, owner: Optional[str]) -> None:
        self.folder, self.owner = Path(folder), owner
        self.pid = int(owner.split()[1]) if owner and owner.startswith("pid ") else None
        super().__init__(f"{folder} is in use by another process ({owner or 'one that has just started'})")


class FolderLock:
    """The lock of ``folder`` (which must exist): ``acquire`` or refuse (``FolderLocked``), ``release``; a context
    manager. ``owner_of(folder)`` says who holds a folder's lock without keeping it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._key: Optional[Tuple[int, int]] = None

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> "FolderLock":
        if self._key is not None:
            return self
        fd = os.open(self.folder / OWNER, os.O_RDWR | os.O_CREAT, 0o666)
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        if key in _HELD:  # this process owns it already: one more holder of the same lock
            os.close(fd)
            _HELD[key][1] += 1
        else:
            try:
                _lock(fd, self.folder)
            except FolderLocked:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            _HELD[key] = [fd, 1]
        self._key = key
        return self

    def release(self) -> None:
        """Give up this hold; the last holder's closes the descriptor, which drops the lock."""
        key, self._key = self._key, None
        entry = _HELD.get(key) if key is not None else None
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del _HELD[key]
                os.close(entry[0])

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()

    @classmethod
    def owner_of(cls, folder: Path) -> Optional[FolderLocked]:
        """Who owns ``folder`` now, as the refusal its owner would cause; None when it is free (or this process's),
        or does not exist. A free lock is taken for a moment, the file left as it is."""
        try:
            fd = os.open(Path(folder) / OWNER, os.O_RDWR)
        except FileNotFoundError:
            return None  # never owned, or moved meanwhile
        info = os.fstat(fd)
        try:
            if (info.st_dev, info.st_ino) not in _HELD:
                _lock(fd, Path(folder))
        except FolderLocked as err:
            return err
        finally:
            os.close(fd)
        return None


def _lock(fd: int, folder: Path) -> None:
    """Take the lock through ``fd``, or ``FolderLocked`` naming the owner."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip()
        raise FolderLocked(folder, owner or None) from None
