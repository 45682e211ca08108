"""lora_linear on every backend this machine runs, against the float64 reference: outputs and all gradients."""
from dataclasses import dataclass

import pytest
import torch
from conftest import DTYPE_NAMES, TOLERANCE, TRITON_DEVICE, backend_params, lora_linear_inputs, needs_triton, rel_err

import fastpeft
from fastpeft.ops.lora_linear import lora_linear_reference

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


@dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    bias: bool
    p: float
    layout: str  # "2d", "3d" (x of shape (2, M, K), M rows each), or "strided" (a column-major 2-D view)

    @property
    def id(self):
        adapter = "" if self.adapter_dtype == self.dtype else f"-A{DTYPE_NAMES[self.adapter_dtype]}"
        return (f"M{self.M}-K{self.K}-N{self.N}-r{self.r}-{DTYPE_NAMES[self.dtype]}{adapter}"
                f"{'-bias' if self.bias else ''}{f'-drop{self.p}' if self.p else ''}-{self.layout}")


# Odd shapes on purpose: M ∈ {1, 3, 17, 130}, K and N not multiples of 16, r ∈ {1, 3, 8, 16, 64};
# each dtype with and without bias and dropout, 2-D, 3-D and strided x, fp32 adapters on half bases.
CASES = [
    Case(1, 40, 33, 1, fp32, fp32, True, 0.0, "2d"),
    Case(3, 100, 50, 3, fp32, fp32, False, 0.0, "3d"),
    Case(17, 70, 97, 8, fp32, fp32, True, 0.2, "2d"),
    Case(130, 100, 33, 16, fp32, fp32, True, 0.0, "strided"),
    Case(130, 40, 50, 64, fp32, fp32, False, 0.1, "3d"),
    Case(17, 100, 33, 3, bf16, fp32, True, 0.0, "2d"),
    Case(130, 70, 50, 16, bf16, fp32, True, 0.1, "3d"),
    Case(3, 40, 97, 64, bf16, bf16, False, 0.0, "strided"),
    Case(1, 100, 50, 8, bf16, fp32, False, 0.3, "2d"),
    Case(17, 40, 33, 1, fp16, fp16, True, 0.0, "3d"),
    Case(130, 100, 97, 8, fp16, fp32, False, 0.2, "strided"),
    Case(3, 70, 33, 16, fp16, fp16, True, 0.1, "2d"),
]


def make_inputs(case, device, seed=0):
    """Fresh random inputs for ``case``; bias trains so its gradient is checked too."""
    return lora_linear_inputs(case.M, case.K, case.N, case.r, case.dtype, case.adapter_dtype, bias=case.bias,
                              layout=case.layout, device=device, seed=seed)


def run(backend, x, w, b, a, bb, dy, scaling, p, seed):
    """Outputs and gradients (y, dx, dA, dB, dbias) of one backend."""
    for t in (x, a, bb, b):
        if t is not None:
            t.grad = None
    y = fastpeft.lora_linear(x, w, b, a, bb, scaling, dropout_p=p, backend=backend, dropout_seed=seed)
    y.backward(dy)
    return [y, x.grad, a.grad, bb.grad] + ([b.grad] if b is not None else [])


def reference(backend, case, x, w, b, a, bb, dy, scaling, seed, device):
    """The same quantities from the float64 reference, on the same (rounded) inputs and the same mask."""
    def f64(t):
        return None if t is None else t.detach().double().cpu().requires_grad_(True)
    x64, w64, b64, a64, bb64 = f64(x), f64(w).detach(), f64(b), f64(a), f64(bb)
    keep = None
    if case.p:
        keep = fastpeft.dropout_mask(seed, (x.numel() // case.K, case.K), case.p, backend, device).cpu()
        keep = keep.reshape(x.shape)
    y = lora_linear_reference(x64, w64, b64, a64, bb64, scaling, keep, case.p)
    y.backward(dy.double().cpu())
    return [y, x64.grad, a64.grad, bb64.grad] + ([b64.grad] if b is not None else [])


NAMES = ["y", "dx", "dA", "dB", "dbias"]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_float64_reference(backend, device, case):
    x, w, b, a, bb, dy = make_inputs(case, device)
    scaling, seed = 1.7, 1234
    got = run(backend, x, w, b, a, bb, dy, scaling, case.p, seed)
    ref = reference(backend, case, x, w, b, a, bb, dy, scaling, seed, device)
    assert got[0].shape == (*x.shape[:-1], case.N) and got[0].dtype == case.dtype
    assert got[2].dtype == case.adapter_dtype and got[3].dtype == case.adapter_dtype
    errors = {name: rel_err(g, r) for name, g, r in zip(NAMES, got, ref, strict=False)}
    assert all(e <= TOLERANCE[case.dtype] for e in errors.values()), errors

    if backend != "torch":
        # Never worse than 2x the torch path's own error in the same dtype (plus a floor at fp32 rounding).
        x2, w2, b2, a2, bb2, dy2 = make_inputs(case, device)
        base = run("torch", x2, w2, b2, a2, bb2, dy2, scaling, case.p, seed)
        base_ref = reference("torch", case, x2, w2, b2, a2, bb2, dy2, scaling, seed, device)
        for name, g, r, bg, br in zip(NAMES, got, ref, base, base_ref, strict=False):
            assert rel_err(g, r) <= max(2 * rel_err(bg, br), 2e-7), (name, errors)


@pytest.mark.parametrize("backend,device", backend_params())
def test_eval_mode_and_no_grad_skip_dropout(backend, device):
    case = Case(17, 40, 33, 8, fp32, fp32, True, 0.5, "2d")
    x, w, b, a, bb, _ = make_inputs(case, device)
    with torch.no_grad():
        y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=0.5, training=False, backend=backend)
        ref = lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
    assert rel_err(y, ref) <= TOLERANCE[fp32]


@pytest.mark.parametrize("backend,device", backend_params())
def test_dropout_mask_reproducible_from_seed(backend, device):
    case = Case(33, 70, 20, 4, fp32, fp32, False, 0.25, "2d")
    x, w, _, a, bb, _ = make_inputs(case, device)
    m1 = fastpeft.dropout_mask(99, (33, 70), 0.25, backend, device)
    m2 = fastpeft.dropout_mask(99, (33, 70), 0.25, backend, device)
    m3 = fastpeft.dropout_mask(100, (33, 70), 0.25, backend, device)
    assert m1.dtype == torch.bool and torch.equal(m1, m2) and not torch.equal(m1, m3)
    with torch.no_grad():
        y1 = fastpeft.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.25, backend=backend, dropout_seed=99)
        y2 = fastpeft.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.25, backend=backend, dropout_seed=99)
        y3 = fastpeft.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.25, backend=backend, dropout_seed=100)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    # With no seed given, torch.manual_seed makes the draw repeatable.
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        with torch.no_grad():
            outs.append(fastpeft.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.25, backend=backend))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend,device", backend_params())
def test_every_accepted_seed_bit_changes_the_mask(backend, device):
    """Seeds are honoured in full over [0, 2**32) on both backends; larger ones are refused, not folded."""
    masks = [fastpeft.dropout_mask(seed, (9, 40), 0.5, backend, device) for seed in (7, 7 + 2**31, 2**32 - 1)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    case = Case(9, 40, 12, 2, fp32, fp32, False, 0.5, "2d")
    x, w, _, a, bb, _ = make_inputs(case, device)
    for bad in (2**32, 2**32 + 7, -1, 1.5, True):
        with pytest.raises(ValueError, match=r"dropout_seed must be None or an integer in \[0, 2\*\*32\)"):
            fastpeft.lora_linear(x, w, None, a, bb, 1.0, dropout_p=0.5, backend=backend, dropout_seed=bad)
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            fastpeft.dropout_mask(bad, (9, 40), 0.5, backend, device)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(backend, device, p):
    keep = fastpeft.dropout_mask(7, (512, 1000), p, backend, device)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("backend,device", backend_params())
def test_nan_and_inf_propagate(backend, device):
    case = Case(17, 40, 33, 8, fp32, fp32, True, 0.0, "2d")
    x, w, b, a, bb, _ = make_inputs(case, device)
    with torch.no_grad():
        x = x.detach().clone()
        x[3, 5] = float("nan")
        x[9, 1] = float("inf")
        y = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend=backend)
    assert torch.isnan(y[3]).all()
    assert not torch.isfinite(y[9]).all()
    rows = [i for i in range(17) if i not in (3, 9)]
    assert torch.isfinite(y[rows]).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_batch(backend, device):
    case = Case(1, 40, 33, 8, fp32, fp32, True, 0.0, "2d")
    _, w, b, a, bb, _ = make_inputs(case, device)
    x = torch.randn(0, 40, device=device, requires_grad=True)
    y = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend=backend)
    assert y.shape == (0, 33)
    y.sum().backward()
    assert x.grad.shape == (0, 40) and torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("backend,device", backend_params())
def test_only_needed_gradients(backend, device):
    """x without grad (a first layer) and a frozen B: only dA is computed, and it is right."""
    case = Case(17, 40, 33, 8, fp32, fp32, False, 0.1, "2d")
    x, w, _, a, bb, dy = make_inputs(case, device)
    x = x.detach()
    bb = bb.detach()
    y = fastpeft.lora_linear(x, w, None, a, bb, 0.5, dropout_p=0.1, backend=backend, dropout_seed=3)
    y.backward(dy)
    keep = fastpeft.dropout_mask(3, (17, 40), 0.1, backend, device).cpu()
    a64 = a.detach().double().cpu().requires_grad_(True)
    ref = lora_linear_reference(x.double().cpu(), w.double().cpu(), None, a64, bb.double().cpu(), 0.5, keep, 0.1)
    ref.backward(dy.double().cpu())
    assert rel_err(a.grad, a64.grad) <= TOLERANCE[fp32]


@pytest.mark.parametrize("kwargs,match", [
    ({"p": 1.0}, r"p must be a number in \[0, 1\)"),
    ({"p": -0.1}, r"p must be a number in \[0, 1\)"),
    ({"p": float("nan")}, r"p must be a number in \[0, 1\)"),
    ({"shape": (3, 4, 5)}, r"shape must be \(M, K\)"),
    ({"shape": (0, 4)}, r"shape must be \(M, K\)"),
    ({"backend": "cuda"}, r"backend must be 'torch' or 'triton'"),
])
def test_dropout_mask_checks_its_arguments(kwargs, match):
    args = {"seed": 1, "shape": (3, 4), "p": 0.5, "backend": "torch", **kwargs}
    with pytest.raises(ValueError, match=match):
        fastpeft.dropout_mask(args["seed"], args["shape"], args["p"], args["backend"])


def test_kernel_outputs_start_poisoned_in_the_tests():
    """The conftest fixture is live: every buffer a launcher allocates starts as NaN, so a kernel that skips an
    element cannot pass by the luck of fresh memory."""
    from fastpeft.checks import new_output
    assert torch.isnan(new_output((3, 5), torch.float32, "cpu")).all()
    assert (new_output((4,), torch.int8, "cpu") == -1).all()


@needs_triton
@pytest.mark.parametrize("case", [Case(17, 70, 97, 8, fp32, fp32, True, 0.2, "2d"),
                                  Case(130, 100, 33, 16, bf16, fp32, False, 0.1, "3d"),
                                  Case(70, 64, 40, 8, bf16, fp32, True, 0.2, "2d"),
                                  Case(100, 48, 72, 16, fp32, fp32, False, 0.1, "3d")], ids=lambda c: c.id)
def test_every_gemm_schedule_matches_the_reference(monkeypatch, case):
    """The fused GEMM adds the low-rank term before the K loop ("prologue"), after it ("epilogue"), or onto torch's
    base product ("cublas"), or runs persistent with TMA reads ("tma"; where rows are 16-byte aligned, else as
    "prologue"): all exact, in forward and in the dX GEMM with dropout, so auto may pick any by speed."""
    from fastpeft.kernels import lora_linear as kernels
    assert kernels.GEMM_SCHEDULES == ("prologue", "epilogue", "cublas", "tma")
    tma_calls = []
    real_tma = kernels._lora_gemm_tma
    monkeypatch.setattr(kernels, "_lora_gemm_tma", lambda *args: tma_calls.append(1) or real_tma(*args))
    for schedule in kernels.GEMM_SCHEDULES:
        monkeypatch.setenv(kernels.GEMM_SCHEDULE_ENV, schedule)
        x, w, b, a, bb, dy = make_inputs(case, TRITON_DEVICE)
        got = run("triton", x, w, b, a, bb, dy, 2.0, case.p, 5)
        want = reference("triton", case, x, w, b, a, bb, dy, 2.0, 5, TRITON_DEVICE)
        errors = {name: rel_err(g, r) for name, g, r in zip(NAMES, got, want, strict=False)}
        assert all(e <= TOLERANCE[case.dtype] for e in errors.values()), (schedule, errors)
    aligned = all(n * case.dtype.itemsize % 16 == 0 for n in (case.K, case.N))
    assert len(tma_calls) == (2 if aligned else 0)  # forward and dX ran on TMA where it can address them
    monkeypatch.setenv(kernels.GEMM_SCHEDULE_ENV, "sideways")
    with pytest.raises(ValueError, match="FASTPEFT_GEMM_SCHEDULE must be one of prologue, epilogue"):
        kernels.gemm_schedule()


def test_the_schedule_variable_keeps_its_former_name(monkeypatch):
    """$FASTPEFT_GEMM_VARIANT, the variable's former name, still fixes the schedule; set beside the new name to
    another schedule, both are refused by name."""
    from fastpeft.environment import gemm_schedule_env
    monkeypatch.delenv("FASTPEFT_GEMM_SCHEDULE", raising=False)
    monkeypatch.setenv("FASTPEFT_GEMM_VARIANT", "Epilogue")
    monkeypatch.setattr("fastpeft.environment._former_name_warned", False)
    with pytest.warns(DeprecationWarning, match="FASTPEFT_GEMM_VARIANT is the former name of FASTPEFT_GEMM_SCHEDULE"):
        assert gemm_schedule_env() == "epilogue"
    monkeypatch.setenv("FASTPEFT_GEMM_SCHEDULE", "epilogue")
    assert gemm_schedule_env() == "epilogue"
    monkeypatch.setenv("FASTPEFT_GEMM_SCHEDULE", "cublas")
    with pytest.raises(ValueError, match="FASTPEFT_GEMM_SCHEDULE='cublas' and its former name "
                                         "FASTPEFT_GEMM_VARIANT='epilogue' disagree"):
        gemm_schedule_env()
    monkeypatch.setenv("FASTPEFT_GEMM_VARIANT", "")
    assert gemm_schedule_env() == "cublas"
