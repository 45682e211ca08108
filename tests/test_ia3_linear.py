"""(IA)³ through ia3_linear: both scales on every backend against the float64 reference (outputs and the gradients of
x, the vector and bias), mixed batches of tasks, what backward keeps, autocast, compile, and bad input."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import DTYPE_NAMES, TOLERANCE, backend_params, rel_err

import fastpeft
from fastpeft.ops.ia3_linear import ia3_linear_reference

bf16, fp32 = torch.bfloat16, torch.float32


@dataclasses.dataclass
class Case:
    M: int
    K: int
    N: int
    dtype: torch.dtype
    l_dtype: torch.dtype
    bias: bool
    lead3d: bool

    @property
    def id(self):
        return (f"M{self.M}-K{self.K}-N{self.N}-{DTYPE_NAMES[self.dtype]}-l{DTYPE_NAMES[self.l_dtype]}"
                f"{'-bias' if self.bias else ''}{'-3d' if self.lead3d else ''}")


CASES = [Case(37, 70, 45, fp32, fp32, True, True), Case(64, 48, 80, bf16, fp32, True, False),
         Case(5, 33, 17, bf16, bf16, False, False), Case(1, 16, 16, fp32, fp32, False, False)]


def inputs(case, device, feedforward, seed=0):
    g = torch.Generator().manual_seed(seed)
    lead = (2, case.M) if case.lead3d else (case.M,)
    x = torch.randn(*lead, case.K, generator=g).to(case.dtype).to(device).requires_grad_()
    w = (torch.randn(case.N, case.K, generator=g) / case.K ** 0.5).to(case.dtype).to(device)
    b = torch.randn(case.N, generator=g).to(case.dtype).to(device).requires_grad_() if case.bias else None
    # a trained-looking vector: around 1, one entry negative and one zero (zero rows of dx, zero columns of y)
    v = 0.5 + torch.rand(case.K if feedforward else case.N, generator=g)
    v[0], v[-1] = -0.7, 0.0
    l_vec = v.to(case.l_dtype).to(device).requires_grad_()
    dy = torch.randn(*lead, case.N, generator=g).to(case.dtype).to(device)
    return x, w, b, l_vec, dy


def f64(t):
    return None if t is None else t.detach().double().cpu().requires_grad_()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ia3_matches_the_reference(backend, device, feedforward, case):
    x, w, b, l_vec, dy = inputs(case, device, feedforward)
    y = fastpeft.ia3_linear(x, w, b, l_vec, feedforward, backend)
    y.backward(dy)
    x64, b64, l64 = f64(x), f64(b), f64(l_vec)
    ref = ia3_linear_reference(x64, w.double().cpu(), b64, l64, feedforward)
    ref.backward(dy.double().cpu())
    assert y.dtype == case.dtype and y.shape == ref.shape
    assert l_vec.grad.dtype == case.l_dtype
    pairs = {"y": (y, ref), "dx": (x.grad, x64.grad), "dl": (l_vec.grad, l64.grad)}
    if b is not None:
        pairs["dbias"] = (b.grad, b64.grad)
    errors = {k: rel_err(g, r) for k, (g, r) in pairs.items()}
    tolerance = TOLERANCE[case.dtype] * (2 if case.l_dtype == bf16 else 1)
    assert all(torch.isfinite(g).all() for g, _ in pairs.values())
    assert all(e <= tolerance for e in errors.values()), errors


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_only_the_gradients_asked_for(backend, device, feedforward):
    """A frozen input (the first layer's x) still gets dl; a frozen vector keeps nothing for it."""
    case = CASES[1]
    x, w, b, l_vec, dy = inputs(case, device, feedforward, seed=3)
    x = x.detach()
    y = fastpeft.ia3_linear(x, w, None, l_vec, feedforward, backend)
    y.backward(dy)
    ref_l = f64(l_vec)
    ia3_linear_reference(x.double().cpu(), w.double().cpu(), None, ref_l, feedforward).backward(dy.double().cpu())
    assert rel_err(l_vec.grad, ref_l.grad) <= TOLERANCE[case.dtype]
    x.requires_grad_()
    y = fastpeft.ia3_linear(x, w, b, l_vec.detach(), feedforward, backend)
    y.backward(dy)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_backward_keeps_one_activation_and_only_for_dl(feedforward):
    """Output scale: the unscaled output (M×N), which dl needs; input scale: x (M×K). Nothing at all for dl when the
    vector is frozen (beyond what dx needs: W and the vector). PEFT's IA3 keeps the same activation."""
    M, K, N = 512, 256, 384
    x = torch.randn(M, K, requires_grad=True)
    w = torch.randn(N, K)
    for trained, expected in ((True, M * (K if feedforward else N)), (False, 0)):
        l_vec = torch.rand(K if feedforward else N).requires_grad_(trained)
        saved = []

        def keep(t, saved=saved):
            saved.append(t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            fastpeft.ia3_linear(x, w, None, l_vec, feedforward, "torch")
        big = sum(t.numel() for t in saved if t.numel() >= M and t.data_ptr() != w.data_ptr())
        assert big == expected, (trained, [tuple(t.shape) for t in saved])


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_mixed_batch_of_tasks(backend, device, feedforward):
    """Each row scales by its own task's vector (-1: none), in one call; inference on triton, trained on torch."""
    case = Case(29, 40, 24, bf16, fp32, True, True)
    x, w, b, _, _ = inputs(case, device, feedforward, seed=5)
    g = torch.Generator().manual_seed(6)
    vectors = [(0.5 + torch.rand(case.K if feedforward else case.N, generator=g)).to(device) for _ in range(3)]
    index = torch.randint(-1, 3, (2, case.M), generator=g).to(device)
    index[0, :3] = torch.tensor([-1, 0, 2])
    with torch.no_grad():
        y = fastpeft.ia3_linear(x, w, b, vectors, feedforward, backend, adapter_index=index)
    ref = ia3_linear_reference(x.double().cpu(), w.double().cpu(), b.double().cpu(),
                               [v.double().cpu() for v in vectors], feedforward, adapter_index=index.cpu())
    assert rel_err(y, ref) <= TOLERANCE[case.dtype]
    # row by row, the single-task call
    for row in (0, 1, 2):
        task = int(index[0, row])
        one = fastpeft.ia3_linear(x[0, row:row + 1].detach(), w, b.detach(),
                                  vectors[task] if task >= 0 else torch.ones_like(vectors[0]), feedforward, "torch")
        assert rel_err(y[0, row:row + 1], one) <= TOLERANCE[case.dtype]


def test_mixed_batch_trains_on_torch():
    case = Case(12, 20, 16, fp32, fp32, True, False)
    x, w, b, _, dy = inputs(case, "cpu", False, seed=7)
    vectors = [torch.rand(case.N).requires_grad_() for _ in range(2)]
    index = torch.tensor([0, 1, -1, 0, 1, 1, 0, -1, 0, 0, 1, 1])
    fastpeft.ia3_linear(x, w, b, vectors, False, "torch", adapter_index=index).backward(dy)
    refs = [f64(v) for v in vectors]
    ia3_linear_reference(x.double(), w.double(), b.double(), refs, False, adapter_index=index).backward(dy.double())
    for v, r in zip(vectors, refs, strict=True):
        assert rel_err(v.grad, r.grad) <= 1e-5
    with pytest.raises(fastpeft.BackendUnavailableError, match="inference only"):
        fastpeft.ia3_linear(x, w, b, vectors, False, "triton", adapter_index=index)


def test_autocast_and_compile():
    x, w, b, l_vec, dy = inputs(CASES[0], "cpu", True, seed=8)
    with torch.autocast("cpu", dtype=bf16):
        y = fastpeft.ia3_linear(x, w, b, l_vec, True, "torch")
    assert y.dtype == bf16
    compiled = torch.compile(lambda *a: fastpeft.ia3_linear(*a, True, "torch"), backend="aot_eager", fullgraph=True)
    xc = x.detach().requires_grad_()
    out = compiled(xc, w, b, l_vec)
    out.backward(dy)
    x64, l64 = f64(x), f64(l_vec)
    ia3_linear_reference(x64, w.double(), b.double(), l64, True).backward(dy.double())
    assert rel_err(out, ia3_linear_reference(x64, w.double(), b.double(), l64, True)) <= 1e-5
    assert rel_err(xc.grad, x64.grad) <= 1e-5


@pytest.mark.parametrize("change,match", [
    (dict(ia3_l=torch.ones(7)), r"ia3_l must have shape \(out_features=16,\)"),
    (dict(ia3_l=torch.ones(16, 1)), "flattened"),
    (dict(ia3_l=torch.ones(16, dtype=torch.int64)), "ia3_l must be a float16"),
    (dict(feedforward=1), "feedforward must be a bool"),
    (dict(feedforward=np.bool_(True)), r"feedforward must be a bool .*got np.True_ \(numpy.bool"),  # (named "bool")
    (dict(x=torch.randn(3, 9)), r"x must have shape \(..., in_features=12\)"),
    (dict(bias=torch.ones(5)), "bias must have shape"),
    (dict(weight=torch.randn(16, 12, requires_grad=True)), "weight must be frozen"),
    (dict(adapter_index=torch.zeros(3, dtype=torch.long)), "with adapter_index, ia3_l must be a non-empty list"),
    (dict(ia3_l=[torch.ones(16)], adapter_index=torch.tensor([0, 1, 0])), r"adapter_index values must be in \[-1, 0\]"),
    (dict(ia3_l=[torch.ones(16)], adapter_index=torch.zeros(4, dtype=torch.long)), "x's leading shape"),
    (dict(ia3_l=[torch.ones(16), torch.ones(16, dtype=bf16)], adapter_index=torch.zeros(3, dtype=torch.long)),
     "share one dtype"),
])
def test_bad_input_is_named(change, match):
    args = dict(x=torch.randn(3, 12), weight=torch.randn(16, 12), bias=None, ia3_l=torch.ones(16), feedforward=False,
                adapter_index=None)
    args.update(change)
    with pytest.raises((TypeError, ValueError), match=match):
        fastpeft.ia3_linear(args["x"], args["weight"], args["bias"], args["ia3_l"], args["feedforward"], "torch",
                            adapter_index=args["adapter_index"])


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_over_a_4bit_base(backend, device, feedforward):
    """(IA)³ over an NF4 base: the torch path's format product, triton's dequantising K loop; gradients of x and l."""
    case = Case(24, 64, 128, bf16, fp32, True, False)
    x, w, b, l_vec, dy = inputs(case, device, feedforward, seed=9)
    b = b.detach()
    weight = fastpeft.quantize_nf4(w, blocksize=64)
    y = fastpeft.ia3_linear(x, weight, b, l_vec, feedforward, backend)
    y.backward(dy)
    x64, l64 = f64(x), f64(l_vec)
    ref = ia3_linear_reference(x64, weight.dequantize().double().cpu(), b.double().cpu(), l64, feedforward)
    ref.backward(dy.double().cpu())
    for got, want in ((y, ref), (x.grad, x64.grad), (l_vec.grad, l64.grad)):
        assert rel_err(got, want) <= TOLERANCE[bf16]


@pytest.mark.parametrize("backend,device", backend_params())
def test_compiled_graph_keeps_the_fused_op(backend, device):
    """Under torch.compile the call is the registered op with its autograd: same outputs and gradients as eager."""
    case = CASES[0]
    for feedforward in (False, True):
        x, w, b, l_vec, dy = inputs(case, device, feedforward, seed=10)
        eager = fastpeft.ia3_linear(x, w, b, l_vec, feedforward, backend)
        eager.backward(dy)
        grads = [t.grad.clone() for t in (x, b, l_vec)]
        for t in (x, b, l_vec):
            t.grad = None
        compiled = torch.compile(lambda x, w, b, v, ff=feedforward: fastpeft.ia3_linear(x, w, b, v, ff, backend),
                                 backend="aot_eager", fullgraph=True)
        out = compiled(x, w, b, l_vec)
        out.backward(dy)
        assert rel_err(out, eager) <= 1e-6
        for t, g in zip((x, b, l_vec), grads, strict=True):
            assert rel_err(t.grad, g) <= 1e-6
