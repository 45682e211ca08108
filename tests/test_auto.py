"""``auto`` by measurement: the candidates timed once per shape class, the winner kept in memory and on disk.

On a CPU ``auto`` has one candidate (the torch path), so these tests make the Triton interpreter a second candidate
and time the backends with a fake clock: each backend's forward advances it by a set cost.
"""
import dataclasses
import importlib
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
from conftest import TRITON_DEVICE, TRITON_SKIP

from fastpeft import auto, backends

# The modules (fastpeft.ops re-exports functions of the same names).
lora_op = importlib.import_module("fastpeft.ops.lora_linear")
adapter_op = importlib.import_module("fastpeft.ops.adapter_bottleneck")

pytestmark = pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="needs Triton's interpreter as a second candidate"
                                + (f" ({TRITON_SKIP})" if TRITON_SKIP else ""))


class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.calls = {}
        self.cost = {}

    def timer(self, fn):
        start = self.now
        fn()
        return self.now - start

    def count(self, prefix):
        return sum(n for name, n in self.calls.items() if name.startswith(prefix))


@pytest.fixture
def clock(monkeypatch, tmp_path):
    """Two backends on the CPU (triton first in rule order; it has four GEMM variants), a fake timer, a private
    cache folder, an empty memory; ``clock.cost`` sets what each table entry's forward costs (default 5 ms)."""
    fake = FakeClock()
    fake.cost = {"torch": 5e-3, "triton:prologue": 2e-3, "triton:epilogue": 1e-3, "triton:cublas": 3e-3}
    monkeypatch.setenv(auto.CACHE_DIR_ENV, str(tmp_path))
    for variable in (auto.MEASURE_ENV, backends.ENV_VAR, "FASTPEFT_GEMM_VARIANT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(backends, "auto_preference", lambda device: ("triton", "torch"))
    monkeypatch.setattr(auto, "cuda_timer", fake.timer)
    for table in (lora_op.LORA_LINEAR_BACKENDS, adapter_op.ADAPTER_BOTTLENECK_BACKENDS):
        for name, entry in list(table.items()):
            def costly(*args, _forward=entry.forward, _name=name, **kwargs):
                fake.now += fake.cost.get(_name, 5e-3)
                fake.calls[_name] = fake.calls.get(_name, 0) + 1
                return _forward(*args, **kwargs)
            monkeypatch.setitem(table, name, dataclasses.replace(entry, forward=costly))
    auto.forget()
    backends.forget_decisions()  # decisions of earlier tests were made without the second candidate
    yield fake
    auto.forget()
    backends.forget_decisions()


def new_process():
    """What a new process starts with: no winners and no decided call signatures in memory."""
    auto.forget()
    backends.forget_decisions()


def lora_call(m=24, k=32, n=48, r=4, dtype=torch.float32, grad=False, **kwargs):
    x = torch.randn(m, k, dtype=dtype, requires_grad=grad)
    w = torch.randn(n, k, dtype=dtype)
    a = torch.randn(r, k, requires_grad=grad)
    b = torch.randn(n, r, requires_grad=grad)
    return (x, w, None, a, b, 0.5), kwargs


def test_measures_once_per_shape_class_and_keeps_the_fastest(clock):
    args, _ = lora_call()
    torch.testing.assert_close(lora_op.lora_linear(*args), lora_op.lora_linear_reference(*args), rtol=1e-5, atol=1e-5)
    # One untimed and ROUNDS timed calls of each candidate (triton's four GEMM variants and torch), then the call
    # itself on the winner; the plain "triton" entry is never measured, its variants are.
    once = 1 + auto.ROUNDS
    assert clock.calls == {"torch": once, "triton:prologue": once, "triton:epilogue": once + 1, "triton:cublas": once,
                           "triton:tma": once}
    assert list(auto.stored_winners().values()) == ["triton:epilogue"]

    lora_op.lora_linear(*lora_call(m=30)[0])  # M=30 is in M=24's size class (32): nothing measured
    assert clock.calls["triton:epilogue"] == once + 2 and clock.count("") == 5 * once + 2

    clock.cost["torch"] = 0.5e-3  # a new class measures anew, and rule order does not decide
    lora_op.lora_linear(*lora_call(m=100)[0])
    assert sorted(auto.stored_winners().values()) == ["torch", "triton:epilogue"]
    assert clock.calls["torch"] == 2 * once + 1


def test_a_gemm_variant_fixed_by_hand_is_the_only_triton_candidate(clock, monkeypatch):
    monkeypatch.setenv("FASTPEFT_GEMM_VARIANT", "cublas")
    lora_op.lora_linear(*lora_call()[0])
    once = 1 + auto.ROUNDS
    assert clock.calls == {"torch": once, "triton": once + 1}  # the plain entry runs $FASTPEFT_GEMM_VARIANT's


def test_the_key_separates_training_dropout_dtype_and_sizes(clock):
    keys = set()
    for kwargs in [dict(), dict(grad=True), dict(n=64), dict(r=8), dict(dtype=torch.bfloat16)]:
        args, _ = lora_call(**kwargs)
        lora_op.lora_linear(*args)
        keys = set(auto.stored_winners())
    args, _ = lora_call()
    lora_op.lora_linear(*args, dropout_p=0.1, training=True)
    assert len(auto.stored_winners()) == len(keys) + 1 == 6


def test_winners_persist_on_disk_for_the_next_process(clock, tmp_path):
    args, _ = lora_call()
    lora_op.lora_linear(*args)
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    stored = json.loads(path.read_text())
    assert stored["format"] == auto.FORMAT and list(stored["winners"].values()) == ["triton:epilogue"]

    new_process()  # memory empty, the file read on first use
    clock.cost["torch"] = 0.5e-3
    before = clock.count("")
    lora_op.lora_linear(*args)
    assert clock.count("") == before + 1 and clock.calls["triton:epilogue"] == 2 + auto.ROUNDS + 1


def test_a_corrupt_cache_file_is_measured_again_and_rewritten(clock, tmp_path):
    args, _ = lora_call()
    lora_op.lora_linear(*args)
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    for garbage in (b"\x00\xff not json", b'{"format": 1, "winners": [1, 2]}', b'{"format": 99, "winners": {}}'):
        path.write_bytes(garbage)
        new_process()
        before = clock.calls["torch"]
        lora_op.lora_linear(*args)
        assert clock.calls["torch"] == before + 1 + auto.ROUNDS
        assert list(json.loads(path.read_text())["winners"].values()) == ["triton:epilogue"]


def test_a_stored_winner_that_cannot_run_the_call_is_measured_again(clock, tmp_path):
    args, _ = lora_call()
    lora_op.lora_linear(*args)
    [path] = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    stored = json.loads(path.read_text())
    stored["winners"] = {k: "cuda" for k in stored["winners"]}  # not a candidate on this machine
    path.write_text(json.dumps(stored))
    new_process()
    before = clock.calls["torch"]
    lora_op.lora_linear(*args)
    assert clock.calls["torch"] == before + 1 + auto.ROUNDS


def test_switches_force_or_skip_the_measurement(clock, monkeypatch):
    args, _ = lora_call()
    lora_op.lora_linear(*args, backend="torch")
    assert clock.calls == {"torch": 1} and not auto.stored_winners()
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    lora_op.lora_linear(*args)
    assert clock.calls == {"torch": 2}
    monkeypatch.delenv(backends.ENV_VAR)
    monkeypatch.setenv(auto.MEASURE_ENV, "0")  # the rule order, nothing timed
    lora_op.lora_linear(*args)
    assert clock.calls == {"torch": 2, "triton": 1} and not auto.stored_winners()


@pytest.mark.parametrize("variable,value,message", [
    ("FASTPEFT_AUTO_MEASURE", "disable", "FASTPEFT_AUTO_MEASURE must be one of 1, 0 (or unset); got 'disable'"),
    ("FASTPEFT_GEMM_VARIANT", "sideways", "FASTPEFT_GEMM_VARIANT must be one of prologue, epilogue, cublas, tma, "
                                          "got 'sideways'"),
    ("FASTPEFT_AUTOTUNE", "off", "FASTPEFT_AUTOTUNE must be one of 1, 0 (or unset); got 'off'"),
])
def test_a_bad_setting_is_refused_before_anything_is_measured(clock, monkeypatch, variable, value, message):
    """Neither measures on regardless (a bad FASTPEFT_AUTO_MEASURE) nor fails each candidate that reads it while
    measured (a bad FASTPEFT_GEMM_VARIANT, or FASTPEFT_AUTOTUNE where the kernels are first imported then, which
    would leave torch chosen with a warning): the call is refused."""
    monkeypatch.setenv(variable, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError) as err:
            lora_op.lora_linear(*lora_call()[0])
    assert str(err.value) == message and clock.calls == {} and not auto.stored_winners()


def test_the_disk_cache_can_be_off(clock, monkeypatch, tmp_path):
    monkeypatch.setenv(auto.CACHE_DIR_ENV, "")
    lora_op.lora_linear(*lora_call()[0])
    assert auto.stored_winners() and not list(tmp_path.iterdir())


def test_measuring_leaves_the_call_as_it_was(clock):
    """The measured calls draw nothing from torch's generator (a dropout call without a seed draws the same one as
    when the winner was stored), touch no gradient of the caller's tensors, and the call's gradients are right."""
    args, _ = lora_call(grad=True)
    x, w, bias, a, b, s = args
    torch.manual_seed(0)
    y = lora_op.lora_linear(x, w, bias, a, b, s, dropout_p=0.3, training=True)
    state_measured = torch.get_rng_state()
    assert x.grad is None and a.grad is None and clock.calls["torch"] > 1
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]

    for t in (x, a, b):
        t.grad = None
    torch.manual_seed(0)
    y2 = lora_op.lora_linear(x, w, bias, a, b, s, dropout_p=0.3, training=True)  # stored now: nothing measured
    assert torch.equal(torch.get_rng_state(), state_measured)
    y2.sum().backward()
    torch.testing.assert_close(y2, y)
    for g, t in zip(grads, (x, a, b), strict=True):
        torch.testing.assert_close(t.grad, g)


def test_the_adapter_op_measures_too(clock):
    clock.cost["triton"] = 1e-3
    h = torch.randn(6, 32)
    wd, wu = torch.randn(8, 32), torch.randn(32, 8)
    out = adapter_op.adapter_bottleneck(h, wd, None, wu, None, 0.5, "gelu")
    torch.testing.assert_close(out, adapter_op.adapter_bottleneck_reference(h, wd, None, wu, None, 0.5, "gelu"))
    assert clock.calls["torch"] == 1 + auto.ROUNDS and clock.calls["triton"] == 2 + auto.ROUNDS
    assert list(auto.stored_winners().values()) == ["triton"]


def test_a_candidate_that_fails_is_not_chosen(clock, monkeypatch):
    table = lora_op.LORA_LINEAR_BACKENDS

    def broken(*args, **kwargs):
        raise RuntimeError("out of resources")
    healthy = dict(table)
    for name in ("triton:prologue", "triton:epilogue", "triton:tma"):
        monkeypatch.setitem(table, name, dataclasses.replace(table[name], forward=broken))
    args, _ = lora_call()
    with pytest.warns(RuntimeWarning, match="'triton:epilogue' failed while being measured"):
        y = lora_op.lora_linear(*args)
    torch.testing.assert_close(y, lora_op.lora_linear_reference(*args), rtol=1e-5, atol=1e-5)
    # The others are measured (cublas 3 ms beats torch 5 ms) and decided for this process, but not stored: a failure
    # may pass (memory held elsewhere), and a later process measures every candidate again.
    assert not auto.stored_winners() and list(backends._decisions.values()) == ["triton:cublas"]
    before = clock.count("")
    lora_op.lora_linear(*args)  # decided: no measuring again, however often it is called
    assert clock.count("") == before + 1
    for name in ("triton:prologue", "triton:epilogue", "triton:tma"):
        monkeypatch.setitem(table, name, healthy[name])
    new_process()
    lora_op.lora_linear(*args)
    assert list(auto.stored_winners().values()) == ["triton:epilogue"]


def test_nothing_is_measured_on_fake_tensors(clock):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(8, 8)
        assert auto.fastest(("k",), ["triton", "torch"], lambda name: pytest.fail("measured"), [x]) == ("triton",
                                                                                                      False)


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


def test_winners_are_kept_per_candidate_set(clock, monkeypatch):
    """A winner measured among fewer candidates (a GEMM variant fixed by hand) never stands for the full set."""
    monkeypatch.setenv("FASTPEFT_GEMM_VARIANT", "cublas")
    clock.cost["triton"] = 9e-3  # the plain entry, running the variant fixed by hand: slower than torch's 5 ms
    lora_op.lora_linear(*lora_call()[0])
    assert list(auto.stored_winners().values()) == ["torch"]
    monkeypatch.delenv("FASTPEFT_GEMM_VARIANT")
    before = clock.count("triton:")
    lora_op.lora_linear(*lora_call()[0])
    assert clock.count("triton:") > before  # the full set is measured, not the winner of the smaller one reused
    assert sorted(auto.stored_winners().values()) == ["torch", "triton:epilogue"]


def test_activation_checkpointing_gets_the_same_backend_in_forward_and_recomputation(clock):
    """Inside a non-reentrant checkpoint the measuring calls would run under its saved-tensor hooks, so nothing is
    measured there: the rule order's choice is kept for the signature, and a call of it outside the checkpoint
    before the backward (another layer, not checkpointed) takes the same backend, so the recomputation matches the
    forward (with dropout: the same mask, right gradients)."""
    from torch.utils.checkpoint import checkpoint
    clock.cost["torch"] = 0.1e-3  # torch would win a measurement
    torch.manual_seed(0)
    x = torch.randn(16, 64, requires_grad=True)
    w, a, b = torch.randn(32, 64), torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)

    def f(t):
        return lora_op.lora_linear(t, w, None, a, b, 0.5, dropout_p=0.5, dropout_seed=123)
    y = checkpoint(f, x, use_reentrant=False)
    f(x.detach().requires_grad_())  # the same signature, outside the checkpoint
    y.sum().backward()
    assert set(clock.calls) == {"triton:prologue"} and not auto.stored_winners()  # rule order: the first variant
    keep = lora_op.dropout_mask(123, (16, 64), 0.5, "triton")
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref = lora_op.lora_linear_reference(ref_inputs[0], w.double(), None, ref_inputs[1], ref_inputs[2], 0.5, keep, 0.5)
    ref.sum().backward()
    for got, want in zip((x.grad, a.grad, b.grad), ref_inputs, strict=True):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-4)
