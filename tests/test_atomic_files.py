"""fastpeft.atomic_files: a write killed at any instant leaves the old or the new content, a failing write leaves no
temporary file, and a lock with a timeout gives up promptly while another process holds it."""
import os
import random
import signal
import stat
import threading
import time

import pytest
from conftest import fork

from fastpeft.atomic_files import (
    LockTimeout,
    fsync_dir,
    locked,
    locked_folder,
    write_file_atomically,
    write_new_file,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def test_a_write_killed_at_random_instants_leaves_the_old_or_the_new_content(tmp_path):
    """A child replacing the file over and over, SIGKILLed at random instants: the file always holds one of the
    contents whole (they differ in length, so a torn write shows), and what a kill leaves is a temporary file named by
    the prefix."""
    path = tmp_path / "data.bin"
    contents = [b"a" * (256 << 10), b"b" * (384 << 10) + b"end"]
    write_file_atomically(path, contents[0])
    rng = random.Random(0)

    def write_forever():
        while True:
            for data in contents[::-1]:
                write_file_atomically(path, data)

    for _ in range(20):
        pid = fork(write_forever)
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.read_bytes() in contents
    assert all(name.startswith(".data.bin.") for name in os.listdir(tmp_path) if name != "data.bin")


def test_a_successful_write_leaves_only_the_file_with_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_file_atomically(tmp_path / "f", b"one")
        write_file_atomically(tmp_path / "f", b"two")
        write_file_atomically(tmp_path / "private", b"mine", mode=0o600)
        write_new_file(tmp_path / "new", b"new")
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == ["f", "new", "private"]
    assert (tmp_path / "f").read_bytes() == b"two" and (tmp_path / "new").read_bytes() == b"new"
    modes = {name: stat.S_IMODE(os.stat(tmp_path / name).st_mode) for name in ("f", "new", "private")}
    assert modes == {"f": 0o644, "new": 0o644, "private": 0o600}
    fsync_dir(tmp_path)
    with pytest.raises(FileExistsError):
        write_new_file(tmp_path / "new", b"again")
    assert (tmp_path / "new").read_bytes() == b"new"


def test_a_failing_write_removes_its_temporary_file(tmp_path, monkeypatch):
    """A write that fails while writing, while syncing, or at the rename leaves the old file and no temporary one."""
    path = tmp_path / "f"
    write_file_atomically(path, b"old")
    with pytest.raises(TypeError):
        write_file_atomically(path, "not bytes")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "inside").write_bytes(b"")
    with pytest.raises(IsADirectoryError):
        write_file_atomically(tmp_path / "folder", b"new")  # the rename over a folder fails
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", failing_fsync)
    for write in (write_file_atomically, write_new_file):
        with pytest.raises(OSError, match="No space"):
            write(tmp_path / ("f" if write is write_file_atomically else "g"), b"new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(os.listdir(tmp_path)) == ["f", "folder"] and path.read_bytes() == b"old"
    assert os.listdir(tmp_path / "folder") == ["inside"]


def hold(path, folder=False):
    """A child process holding the lock on ``path`` until killed; returns its pid once it holds it."""
    ready, done = os.pipe()

    def work():
        os.close(ready)
        with (locked_folder if folder else locked)(path):
            os.write(done, b"x")
            time.sleep(60)
    pid = fork(work)
    os.close(done)
    assert os.read(ready, 1) == b"x"
    os.close(ready)
    return pid


@pytest.mark.parametrize("folder", [False, True], ids=["lock file", "folder"])
def test_a_lock_with_a_timeout_gives_up_promptly_while_another_process_holds_it(tmp_path, folder):
    path = tmp_path / ("folder" if folder else "f.lock")
    if folder:
        path.mkdir()
    take = locked_folder if folder else locked
    pid = hold(path, folder)
    try:
        for timeout in (0, 0.2):
            start = time.monotonic()
            with pytest.raises(LockTimeout, match="locked by another process"):
                with take(path, timeout=timeout):
                    pass
            assert timeout <= time.monotonic() - start < timeout + 2
    finally:
        os.kill(pid, signal.SIGKILL)  # the kernel drops its lock
        os.waitpid(pid, 0)
    start = time.monotonic()
    with take(path, timeout=1):
        with pytest.raises(LockTimeout):  # held: a second open of the path cannot take it either
            with take(path, timeout=0):
                pass
    with take(path):  # released on leaving the block
        pass
    assert time.monotonic() - start < 2
    assert path.is_dir() if folder else path.is_file()  # a lock file stays


def test_a_blocking_lock_waits_for_the_holder(tmp_path):
    """``timeout=None`` waits as long as the lock is held (here by another thread through its own descriptor)."""
    path = tmp_path / "f.lock"
    order = []

    def take():
        with locked(path):
            order.append("taken")
    with locked(path):
        waiter = threading.Thread(target=take)
        waiter.start()
        time.sleep(0.2)
        order.append("released")
    waiter.join(5)
    assert order == ["released", "taken"]


def test_a_lock_file_removed_while_waited_for_is_taken_where_the_path_points_now(tmp_path):
    """The holder deletes the lock file and lets go: the waiter must not hold a lock on the deleted file, which no
    later process could see, but on the file now at the path."""
    path = tmp_path / "f.lock"
    taken = threading.Event()

    def wait_and_hold():
        with locked(path, timeout=5):
            taken.set()
            time.sleep(0.5)
    with locked(path):
        waiter = threading.Thread(target=wait_and_hold)
        waiter.start()
        time.sleep(0.1)
        path.unlink()
    assert taken.wait(5)
    with pytest.raises(LockTimeout):
        with locked(path, timeout=0):
            pass
    waiter.join(5)
