"""Files written whole and the locks their writers take: the primitives under the ``auto`` winners' file and the
adapter folders. Imports nothing from fastpeft.

- :func:`write_new_file` creates a file that must not exist yet, writes it and syncs it to the disk.
- :func:`write_file_atomically` replaces a file whole: a reader (and the disk after a crash) sees the old content or
  the new one, never a part; its temporary file is removed whenever the write fails.
- :func:`fsync_dir` makes the entries of a folder (a rename into it, a new file) durable.
- :func:`locked` and :func:`locked_folder` hold an exclusive ``flock`` on a lock file or on a folder itself: the
  kernel drops it when the holder dies, so a killed writer never leaves a stale lock. ``timeout=None`` waits as long
  as it takes; a number of seconds waits at most that long, then raises :class:`LockTimeout`.

Files are created with mode 0o666 less the umask (0644 under umask 022) unless a mode is given.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: no file locks (writing works)
    fcntl = None

FILE_LOCKS = fcntl is not None  # whether this system has the locks of locked() and locked_folder()
_POLL = 0.01  # seconds between tries of a lock that is waited for with a timeout
_NAME_TRIES = 100  # temporary names tried before giving up (each one is 64 random bits: a clash is a fluke)


class LockTimeout(TimeoutError):
    """Another process held the lock for the whole timeout."""


def write_new_file(path, data: bytes, *, mode: int = 0o666) -> None:
    """Create the file ``path`` (FileExistsError when something is there), write ``data``, flush and fsync it. On any
    failure the file is removed again. ``mode`` is reduced by the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def fsync_dir(path) -> None:
    """Sync the folder ``path`` itself: the names in it (renames, new and deleted entries) reach the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path, data: bytes, *, prefix: str | None = None, mode: int = 0o666) -> None:
    """Replace the file ``path`` with ``data`` in one atomic step: write a temporary file beside it (named ``prefix``
    and 16 random hex digits; by default ``.<name>.``), fsync it, rename it over ``path``, fsync the folder. Readers
    see the whole old content or the whole new one, also after a crash; the temporary file is removed whenever the
    write fails (a killed process can leave it: its name starts with ``prefix``)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    prefix = f".{name}." if prefix is None else prefix
    for _ in range(_NAME_TRIES):
        temporary = os.path.join(folder, prefix + secrets.token_hex(8))
        try:
            write_new_file(temporary, data, mode=mode)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {path} after {_NAME_TRIES} tries")
    try:
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(folder or ".")


def _take(path, open_fd: Callable[[], int], timeout: float | None) -> int:
    """An open descriptor of ``path`` holding its exclusive lock. Retaken when ``path`` was replaced or removed while
    the lock was waited for, so that the lock is always on what the path names now."""
    if fcntl is None:
        raise OSError(f"locking {path} needs a POSIX system (file locks)")
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        fd = open_fd()
        try:
            if deadline is None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise LockTimeout(f"{path} is locked by another process (waited {timeout:g} s)") from None
                        time.sleep(_POLL)
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    return fd
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def locked(path, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the lock file ``path`` (created when missing, never deleted) for the ``with`` block.
    ``timeout=None`` waits as long as it takes; a number of seconds (0: one try) raises :class:`LockTimeout` when
    another process holds the lock that long. OSError where the system has no file locks."""
    fd = _take(path, lambda: os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666), timeout)
    try:
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked_folder(folder, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``folder`` itself (it must exist) for the ``with`` block; when a folder
    was swapped in at that path meanwhile, the lock is taken on the new one. ``timeout`` as for :func:`locked`."""
    fd = _take(folder, lambda: os.open(folder, os.O_RDONLY | os.O_DIRECTORY), timeout)
    try:
        yield
    finally:
        os.close(fd)
