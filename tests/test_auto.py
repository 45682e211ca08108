"""``auto`` by measurement: the candidates timed once per shape class, the winner kept in memory and on disk.

On a CPU ``auto`` has one candidate (the torch path), so these tests make the Triton interpreter a second candidate
and time the backends with a fake clock: each backend's forward advances it by a set cost.
"""
import dataclasses
import importlib
import json
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
    """Two backends on the CPU (triton first in rule order; it has four GEMM schedules), a fake timer, a private
    cache folder, an empty memory; ``clock.cost`` sets what each table entry's forward costs (default 5 ms)."""
    fake = FakeClock()
    fake.cost = {"torch": 5e-3, "triton:prologue": 2e-3, "triton:epilogue": 1e-3, "triton:cublas": 3e-3}
    monkeypatch.setenv(auto.CACHE_DIR_ENV, str(tmp_path))
    for variable in (auto.MEASURE_ENV, backends.ENV_VAR, "FASTPEFT_GEMM_SCHEDULE"):
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
    # One untimed and ROUNDS timed calls of each candidate (triton's four GEMM schedules and torch), then the call
    # itself on the winner; the plain "triton" entry is never measured, its schedules are.
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


def test_a_gemm_schedule_fixed_by_hand_is_the_only_triton_candidate(clock, monkeypatch):
    monkeypatch.setenv("FASTPEFT_GEMM_SCHEDULE", "cublas")
    lora_op.lora_linear(*lora_call()[0])
    once = 1 + auto.ROUNDS
    assert clock.calls == {"torch": once, "triton": once + 1}  # the plain entry runs $FASTPEFT_GEMM_SCHEDULE's


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
    ("FASTPEFT_GEMM_SCHEDULE", "sideways", "FASTPEFT_GEMM_SCHEDULE must be one of prologue, epilogue, cublas, tma, "
                                          "got 'sideways'"),
    ("FASTPEFT_AUTOTUNE", "off", "FASTPEFT_AUTOTUNE must be one of 1, 0 (or unset); got 'off'"),
])
def test_a_bad_setting_is_refused_before_anything_is_measured(clock, monkeypatch, variable, value, message):
    """Neither measures on regardless (a bad FASTPEFT_AUTO_MEASURE) nor fails each candidate that reads it while
    measured (a bad FASTPEFT_GEMM_SCHEDULE, or FASTPEFT_AUTOTUNE where the kernels are first imported then, which
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


def test_winners_are_kept_per_candidate_set(clock, monkeypatch):
    """A winner measured among fewer candidates (a GEMM schedule fixed by hand) never stands for the full set."""
    monkeypatch.setenv("FASTPEFT_GEMM_SCHEDULE", "cublas")
    clock.cost["triton"] = 9e-3  # the plain entry, running the schedule fixed by hand: slower than torch's 5 ms
    lora_op.lora_linear(*lora_call()[0])
    assert list(auto.stored_winners().values()) == ["torch"]
    monkeypatch.delenv("FASTPEFT_GEMM_SCHEDULE")
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
    assert set(clock.calls) == {"triton:prologue"} and not auto.stored_winners()  # rule order: the first schedule
    keep = lora_op.dropout_mask(123, (16, 64), 0.5, "triton")
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref = lora_op.lora_linear_reference(ref_inputs[0], w.double(), None, ref_inputs[1], ref_inputs[2], 0.5, keep, 0.5)
    ref.sum().backward()
    for got, want in zip((x.grad, a.grad, b.grad), ref_inputs, strict=True):
        torch.testing.assert_close(got.double(), want.grad, rtol=1e-4, atol=1e-4)
