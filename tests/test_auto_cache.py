"""The ``auto`` winners' file: concurrent and killed writers, a lock held by a stopped process, no home folder, a
huge file. These need no second backend: ``auto.fastest`` decides between two that run nothing."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

from fastpeft import auto, backends


def new_process():
    """What a new process starts with: no winners and no decided call signatures in memory."""
    auto.forget()
    backends.forget_decisions()


def _store_many(folder, prefix, count):
    os.environ[auto.CACHE_DIR_ENV] = folder
    path = auto.cache_path(torch.device("cpu"))
    for i in range(count):
        auto._store(path, f"{prefix}{i}", "torch")


def test_concurrent_writers_merge_and_a_killed_writer_leaves_a_whole_file(tmp_path):
    """Two processes storing different keys at once lose none; a writer killed at random instants leaves the file
    either as it was or with its new entry, always readable."""
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_store_many, args=(str(tmp_path), prefix, 40)) for prefix in ("a", "b")]
    for p in writers:
        p.start()
    for p in writers:
        p.join(60)
        assert p.exitcode == 0
    os.environ[auto.CACHE_DIR_ENV] = str(tmp_path)
    try:
        path = auto.cache_path(torch.device("cpu"))
        assert set(auto._read(path)) == {f"{p}{i}" for p in "ab" for i in range(40)}
        for delay in (0.002, 0.005, 0.01, 0.02, 0.05):
            writer = context.Process(target=_store_many, args=(str(tmp_path), f"k{delay}-", 10_000))
            writer.start()
            time.sleep(delay)
            os.kill(writer.pid, signal.SIGKILL)
            writer.join()
            winners = json.loads(path.read_text())["winners"]  # parses: never a torn file
            assert {f"{p}{i}" for p in "ab" for i in range(40)} <= set(winners)
    finally:
        del os.environ[auto.CACHE_DIR_ENV]


def decide(key, winner="b"):
    """One ``auto`` decision between two backends that run nothing, ``winner`` the faster: measuring costs nothing,
    so what a test times is the cache's own work."""
    costs = {"a": 2e-3, "b": 1e-3} if winner == "b" else {"a": 1e-3, "b": 2e-3}
    name = []

    def timer(fn):
        fn()
        return costs[name[-1]]
    return auto.fastest((key,), ["a", "b"], name.append, [torch.zeros(1)], timer=timer)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """A private cache folder and an empty memory; yields the cache file's path."""
    monkeypatch.setenv(auto.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(auto.MEASURE_ENV, raising=False)
    auto.forget()
    yield auto.cache_path(torch.device("cpu"))
    auto.forget()


LOCK_HOLDER = """
import fcntl, os, signal, sys
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # stopped while holding the lock (^Z, a debugger, a frozen container)
"""


def test_a_lock_held_by_a_stopped_process_delays_a_store_briefly_and_the_winner_stays_in_memory(cache, monkeypatch):
    """A process stopped while it holds the cache's lock never hangs another: its store waits ``LOCK_WAIT`` seconds,
    warns once, and keeps the winner in memory only; later stores do not wait again (nor warn), and store once the
    lock is free."""
    monkeypatch.setattr(auto, "_lock_timed_out", False)
    lock_path = cache.with_name(cache.name + ".lock")
    cache.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(auto.LOCK_WAIT + 20, holder.kill)  # a store that blocks fails the test, not hangs
    watchdog.start()
    try:
        assert holder.stdout.readline() == "locked\n"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            assert decide("first") == ("b", True)
            first = time.monotonic() - start
            start = time.monotonic()
            assert decide("second", winner="a") == ("a", True)
            second = time.monotonic() - start
        assert first < auto.LOCK_WAIT + 5 and second < 1, (first, second)
        assert [str(w.message) for w in caught] == [
            f"fastpeft auto: the cache's lock {lock_path} is held by another process (waited {auto.LOCK_WAIT:g} s): "
            "this winner is kept in memory only, and later ones are stored only when the lock is free at once"]
        assert sorted(auto.stored_winners().values()) == ["a", "b"] and not cache.exists()
    finally:
        watchdog.cancel()
        holder.send_signal(signal.SIGCONT)  # it runs on and exits: the lock is released
        holder.wait(30)
    assert decide("third") == ("b", True)
    assert list(json.loads(cache.read_text())["winners"].values()) == ["b"]


NO_HOME = """
import os, pwd
def no_entry(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = no_entry  # an arbitrary uid with no passwd entry, as some containers run
import torch
from fastpeft import auto
assert os.path.expanduser("~") == "~"
print(auto.cache_path(torch.device("cpu")))
print(auto.fastest(("k",), ["a", "b"], lambda name: None, [torch.zeros(1)], timer=lambda fn: fn() or 1e-3))
print(list(auto.stored_winners().values()))
"""


def test_without_a_home_folder_winners_are_kept_in_memory_only(tmp_path):
    """With no HOME, no XDG_CACHE_HOME and no passwd entry for the uid there is no absolute cache folder: nothing is
    written (no literal "~" folder in the working directory), the winner is kept in memory."""
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", auto.CACHE_DIR_ENV)}
    out = subprocess.run([sys.executable, "-c", NO_HOME], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["None", "('a', True)", "['a']"]
    assert not list(work.iterdir())


def test_the_cache_folder_is_absolute(cache, monkeypatch, tmp_path):
    """A relative XDG_CACHE_HOME is ignored (the XDG spec says so): the cache goes under $HOME/.cache. A relative
    FASTPEFT_CACHE_DIR is taken from the working directory; one that names an unknown home ("~/...") keeps winners
    in memory only."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")
    monkeypatch.delenv(auto.CACHE_DIR_ENV)
    path = auto.cache_path(torch.device("cpu"))
    assert path.parent == home / ".cache" / "fastpeft"
    decide("k")
    assert path.exists() and not list(work.iterdir())

    monkeypatch.setenv(auto.CACHE_DIR_ENV, "winners")
    assert auto.cache_path(torch.device("cpu")).parent == work / "winners"

    monkeypatch.delenv("HOME")
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # no home folder to be found
    for value in ("~/winners", "~"):
        monkeypatch.setenv(auto.CACHE_DIR_ENV, value)
        assert auto.cache_path(torch.device("cpu")) is None
    monkeypatch.delenv(auto.CACHE_DIR_ENV)
    assert auto.cache_path(torch.device("cpu")) is None


def write_winners(path, count, key_width=60):
    """A valid cache file of ``count`` entries, the oldest first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = ", ".join(f'"{i:0{key_width}d}": "torch"' for i in range(count))
    path.write_text(f'{{"format": {auto.FORMAT}, "winners": {{{entries}}}}}')


def test_a_huge_cache_file_slows_no_decision_and_is_bounded_by_the_next_store(cache):
    """A file past ``MAX_BYTES`` (here 400k entries, 28 MB) is not parsed: each decision stays fast and the next
    store rewrites it small. One within it but of more than ``MAX_ENTRIES`` entries keeps its newest."""
    write_winners(cache, 400_000)
    assert cache.stat().st_size > auto.MAX_BYTES
    start = time.monotonic()
    decide("new")
    assert time.monotonic() - start < 1.0
    assert len(json.loads(cache.read_text())["winners"]) == 1

    write_winners(cache, auto.MAX_ENTRIES + 100)
    assert cache.stat().st_size < auto.MAX_BYTES
    new_process()
    decide("newest")
    winners = list(json.loads(cache.read_text())["winners"])
    assert len(winners) == auto.MAX_ENTRIES and json.loads(winners[-1])[1] == "newest"
    assert winners[0] == f"{101:060d}"  # the oldest 101 are dropped
    decide("newest")  # stored already: nothing changes
    assert list(json.loads(cache.read_text())["winners"]) == winners
