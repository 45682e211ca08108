"""DoRA through lora_linear(magnitude=...): every backend against the float64 reference (outputs and the gradients
of x, A, B, m and bias), the factored row norm, zero rows, what backward keeps, and bad input."""
import dataclasses
import importlib

import pytest
import torch
from conftest import TOLERANCE, TRITON_DEVICE, backend_params, needs_triton, rel_err
from test_lora_linear import CASES, Case, make_inputs

import fastpeft
from fastpeft import BackendUnavailableError
from fastpeft.ops.lora_linear import dora_weight_norm, lora_linear_reference, weight_sq_norm

bf16, fp32 = torch.bfloat16, torch.float32
NAMES = ("y", "dx", "dA", "dB", "dm", "dbias")


def magnitude_for(case, w, device, seed=1):
    """A trained-looking magnitude: positive, not equal to the norms (so the scale is not 1), the adapters' dtype."""
    g = torch.Generator().manual_seed(seed)
    m = torch.linalg.vector_norm(w.detach().double().cpu(), dim=1) * (0.5 + torch.rand(case.N, generator=g,
                                                                                         dtype=torch.float64))
    return m.to(dtype=case.adapter_dtype, device=device).requires_grad_(True)


def run_dora(backend, case, device, seed=0, scaling=1.5):
    x, w, b, a, bb, dy = make_inputs(case, device, seed)
    m = magnitude_for(case, w, device)
    y = fastpeft.lora_linear(x, w, b, a, bb, scaling, dropout_p=case.p, backend=backend, dropout_seed=11,
                             magnitude=m)
    y.backward(dy)
    got = [y, x.grad, a.grad, bb.grad, m.grad] + ([b.grad] if b is not None else [])

    def f64(t):
        return None if t is None else t.detach().double().cpu().requires_grad_(True)
    x64, b64, a64, bb64, m64 = f64(x), f64(b), f64(a), f64(bb), f64(m)
    keep = None
    if case.p:
        keep = fastpeft.dropout_mask(11, (x.numel() // case.K, case.K), case.p, backend, device).cpu().reshape(x.shape)
    ref = lora_linear_reference(x64, w.double().cpu(), b64, a64, bb64, scaling, keep, case.p, magnitude=m64)
    ref.backward(dy.double().cpu())
    want = [ref, x64.grad, a64.grad, bb64.grad, m64.grad] + ([b64.grad] if b is not None else [])
    return got, want


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dora_matches_the_reference(backend, device, case):
    got, want = run_dora(backend, case, device)
    errors = {name: rel_err(g, r) for name, g, r in zip(NAMES, got, want, strict=False)}
    assert all(torch.isfinite(g).all() for g in got)
    assert all(e <= TOLERANCE[case.dtype] for e in errors.values()), errors


@needs_triton
@pytest.mark.parametrize("schedule", ["prologue", "epilogue", "cublas", "tma"])
def test_dora_in_every_gemm_schedule(monkeypatch, schedule):
    """The column scale is the fused GEMM's epilogue in every schedule (the cublas one adds the bias after scaling
    torch's product), in forward and in dX."""
    monkeypatch.setenv("FASTPEFT_GEMM_SCHEDULE", schedule)
    for case in (Case(70, 64, 48, 8, bf16, fp32, True, 0.2, "2d"), Case(33, 40, 24, 3, fp32, fp32, False, 0.0, "3d")):
        got, want = run_dora("triton", case, TRITON_DEVICE)
        errors = {name: rel_err(g, r) for name, g, r in zip(NAMES, got, want, strict=False)}
        assert all(e <= TOLERANCE[case.dtype] for e in errors.values()), (schedule, errors)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype,adapter_dtype", [(fp32, fp32), (bf16, fp32), (bf16, bf16)])
def test_row_norm_without_the_full_matrix(backend, device, dtype, adapter_dtype):
    """‖W + s·BA‖ per row: factored on torch (‖W‖² given or not), tile by tile on triton; fp32 throughout."""
    case = Case(5, 70, 97, 16, dtype, adapter_dtype, False, 0.0, "2d")
    _, w, _, a, bb, _ = make_inputs(case, device, seed=4)
    a, bb = a.detach(), bb.detach()
    want = torch.linalg.vector_norm(w.double() + 0.8 * (bb.double() @ a.double()), dim=1).cpu()
    for kwargs in ({}, {"weight_sq": weight_sq_norm(w)}):
        got = dora_weight_norm(w, a, bb, 0.8, backend=backend, **kwargs)
        assert got.dtype == fp32 and got.shape == (97,)
        assert rel_err(got, want) <= 1e-6


def test_row_norm_converts_a_half_weight_in_bounded_chunks(monkeypatch):
    """A bf16 weight is converted to fp32 a chunk of rows at a time (never the whole layer at once)."""
    monkeypatch.setattr(importlib.import_module("fastpeft.ops.lora_dora"), "_NORM_CHUNK", 70 * 8)
    w = torch.randn(97, 70).to(bf16)
    a, bb = torch.randn(4, 70), torch.randn(97, 4)
    converted = []
    real_to = torch.Tensor.to

    def spy(t, *args, **kwargs):
        out = real_to(t, *args, **kwargs)
        if t.dtype == bf16 and out.dtype == fp32 and t.dim() == 2:
            converted.append(t.shape[0])
        return out
    monkeypatch.setattr(torch.Tensor, "to", spy)
    got = dora_weight_norm(w, a, bb, 0.5, backend="torch")
    monkeypatch.undo()
    want = torch.linalg.vector_norm(w.double() + 0.5 * (bb.double() @ a.double()), dim=1)
    assert rel_err(got, want) <= 1e-6
    assert converted and max(converted) <= 8


@pytest.mark.parametrize("backend,device", backend_params())
def test_a_zero_row_gives_no_nan(backend, device):
    """Real models have all-zero rows of W (511 in Llama-3.1-8B's o_proj); with B's row zero (B starts at zero) the
    norm is 0, and PEFT's m / 0 gives NaN at step 0. Here outputs and gradients stay finite, m's too."""
    case = Case(17, 40, 33, 4, fp32, fp32, True, 0.0, "2d")
    x, w, b, a, bb, dy = make_inputs(case, device)
    w = w.clone()
    w[5] = 0
    with torch.no_grad():
        bb[5] = 0
    m = dora_weight_norm(w, a.detach(), bb.detach(), 1.0).requires_grad_(True)  # as a layer initialises it: 0 there
    assert m[5] == 0
    y = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend=backend, magnitude=m)
    y.backward(dy)
    for t in (y, x.grad, a.grad, bb.grad, m.grad, b.grad):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(y[:, 5], b[5].detach().expand(17))  # scale 0: the bias alone
    with torch.no_grad():  # a non-zero magnitude over a zero row: still finite (the row's output is 0 + bias)
        m2 = m.detach().clone()
        m2[5] = 1.0
        y2 = fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend=backend, magnitude=m2)
    assert torch.isfinite(y2).all()


@pytest.mark.parametrize("backend,device", backend_params())
def test_a_given_norm_is_used_as_a_constant(backend, device):
    case = Case(17, 40, 33, 4, fp32, fp32, True, 0.0, "2d")
    x, w, b, a, bb, _ = make_inputs(case, device)
    m = magnitude_for(case, w, device).detach()
    norm = torch.rand(33, device=device) + 1.0
    y = fastpeft.lora_linear(x, w, b, a, bb, 0.5, backend=backend, magnitude=m, weight_norm=norm)
    plain = fastpeft.lora_linear(x, w, None, a, bb, 0.5, backend=backend)
    torch.testing.assert_close(y, plain * (m / norm) + b, rtol=1e-5, atol=1e-5)


def saved_bytes(fn):
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs."""
    kept = {}

    def pack(t):
        kept[(t.data_ptr(), t.shape, t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


@pytest.mark.parametrize("backend,device", backend_params())
def test_backward_keeps_lora_s_tensors_plus_one_product(backend, device):
    """What backward keeps: LoRA's (x, W, S, ...) plus O(N) for the scale; a trained magnitude adds the unscaled
    product x Wᵀ + s·S Bᵀ (M×N, dm's only input that is not already kept), a frozen one adds nothing of size M."""
    M, K, N = 256, 128, 96
    case = Case(M, K, N, 8, fp32, fp32, True, 0.1, "2d")
    x, w, b, a, bb, _ = make_inputs(case, device)
    m = magnitude_for(case, w, device)
    lora = saved_bytes(lambda: fastpeft.lora_linear(x, w, b, a, bb, 1.0, 0.1, backend=backend))
    trained = saved_bytes(lambda: fastpeft.lora_linear(x, w, b, a, bb, 1.0, 0.1, backend=backend, magnitude=m))
    frozen = saved_bytes(lambda: fastpeft.lora_linear(x, w, b, a, bb, 1.0, 0.1, backend=backend,
                                                      magnitude=m.detach()))
    assert frozen <= lora + 16 * N
    assert trained <= lora + M * N * 4 + 16 * N


@pytest.mark.parametrize("backend,device", backend_params())
def test_an_untrained_magnitude_keeps_no_unscaled_product(monkeypatch, backend, device):
    """Without the magnitude's gradient (no grad, a frozen magnitude) the forward scales in place: no pre (M×N)."""
    op = importlib.import_module("fastpeft.ops.lora_linear")
    kept = []
    for name in [n for n in op.LORA_LINEAR_BACKENDS if n.partition(":")[0] == backend]:
        entry = op.LORA_LINEAR_BACKENDS[name]
        monkeypatch.setitem(op.LORA_LINEAR_BACKENDS, name, dataclasses.replace(
            entry, forward=lambda *args, real=entry.forward: kept.append(args[9]) or real(*args)))
    case = Case(300, 64, 48, 4, fp32, fp32, True, 0.0, "2d")
    x, w, b, a, bb, _ = make_inputs(case, device)
    m = magnitude_for(case, w, device)
    with torch.no_grad():
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, backend=backend, magnitude=m)
    fastpeft.lora_linear(x.detach(), w, b.detach(), a.detach(), bb.detach(), 1.0, backend=backend, magnitude=m.detach())
    assert kept == [False, False]


@pytest.mark.parametrize("change,error,match", [
    (dict(magnitude=torch.ones(32)), ValueError, r"magnitude must have shape \(out_features=33,\)"),
    (dict(magnitude=torch.ones(33, dtype=torch.float64)), TypeError, "magnitude has dtype torch.float64 but the "
                                                                     "adapters"),
    (dict(magnitude=torch.ones(33, dtype=torch.int64)), TypeError, "magnitude must be a float16"),
    (dict(magnitude=torch.ones(33).index_fill_(0, torch.tensor([4]), -1.0)), ValueError,
     "magnitude must be finite and >= 0.*row 4"),
    (dict(magnitude=torch.ones(33).index_fill_(0, torch.tensor([7]), float("nan"))), ValueError,
     "magnitude must be finite and >= 0.*row 7"),
    (dict(magnitude=[1.0] * 33), TypeError, "magnitude must be a torch.Tensor"),
    (dict(weight_norm=torch.ones(33)), ValueError, "weight_norm is DoRA's row norm: give it only with magnitude"),
    (dict(magnitude=torch.ones(33), weight_norm=torch.ones(3)), ValueError, r"weight_norm must have shape"),
    (dict(magnitude=torch.ones(33), backend="cuda"), BackendUnavailableError, "backend 'cuda' cannot run"),
])
def test_bad_dora_input_is_named(change, error, match):
    case = Case(17, 40, 33, 4, fp32, fp32, True, 0.0, "2d")
    x, w, b, a, bb, _ = make_inputs(case, "cpu")
    kwargs = {"backend": "torch", **change}
    with pytest.raises(error, match=match):
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, **kwargs)


def test_the_norms_under_the_cuda_backend_are_computed_the_torch_way(monkeypatch):
    """The cuda backend's decode kernel takes DoRA's norms as its column scale and has no kernel for them: asked for
    cuda (by argument or environment), the norms come from the torch formulation instead of a TypeError."""
    torch.manual_seed(0)
    w, a, b = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    want = fastpeft.dora_weight_norm(w, a, b, 1.5, backend="torch")
    assert torch.equal(fastpeft.dora_weight_norm(w, a, b, 1.5, backend="cuda"), want)
    monkeypatch.setenv("FASTPEFT_BACKEND", "cuda")
    assert torch.equal(fastpeft.dora_weight_norm(w, a, b, 1.5), want)
    layer = fastpeft.LoraLinear(torch.nn.Linear(8, 6), r=2, use_dora=True)  # its magnitude starts from the norms
    assert layer.lora_magnitude_vector.shape == (6,)
