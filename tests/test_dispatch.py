"""The per-call path: a call signature is checked and decided once, later calls of it skip to the kernels; eager
calls bypass the custom op's dispatch and must equal the registered op (what compiled graphs run)."""
import importlib

import pytest
import torch
from conftest import TOLERANCE, TRITON_DEVICE, rel_err

import fastpeft
from fastpeft import backends

lora_op = importlib.import_module("fastpeft.ops.lora_linear")
adapter_op = importlib.import_module("fastpeft.ops.adapter_bottleneck")


def lora_args(M=5, K=24, N=16, r=4, dtype=torch.float32, grad=True):
    torch.manual_seed(0)
    x = torch.randn(M, K, dtype=dtype, requires_grad=grad)
    w, b = torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype)
    a, bb = torch.randn(r, K, requires_grad=grad), torch.randn(N, r, requires_grad=grad)
    return x, w, b, a, bb


def test_bad_input_after_a_cached_call_still_gets_its_error():
    x, w, b, a, bb = lora_args()
    fastpeft.lora_linear(x, w, b, a, bb, 0.5)
    fastpeft.lora_linear(x, w, b, a, bb, 0.5)  # decided now
    cases = [
        (dict(lora_B=torch.randn(16, 5)), ValueError, "lora_B must have shape"),
        (dict(x=x.double()), TypeError, "x has dtype"),
        (dict(scaling=float("nan")), ValueError, "scaling"),
        (dict(scaling=True), (TypeError, ValueError), "scaling"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(weight=w.clone().requires_grad_(True)), ValueError, "weight must be frozen"),
        (dict(lora_A=torch.randn(4, 24, device="meta")), ValueError, "one device"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ]
    base = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=0.5, dropout_p=0.0)
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            fastpeft.lora_linear(**{**base, **overrides})
    fastpeft.lora_linear(x, w, b, a, bb, 0.5)  # and the good call still runs

    h = torch.randn(3, 40)
    wd, wu = torch.randn(4, 40), torch.randn(40, 4)
    fastpeft.adapter_bottleneck(h, wd, None, wu, None, 1.0, "relu")
    with pytest.raises(ValueError, match="activation must be one of"):
        fastpeft.adapter_bottleneck(h, wd, None, wu, None, 1.0, "tanh")
    with pytest.raises(ValueError, match="scaling"):
        fastpeft.adapter_bottleneck(h, wd, None, wu, None, float("inf"), "relu")


def test_a_decided_signature_follows_grad_mode_and_the_environment(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x, w, b, a, bb = lora_args()
    with torch.no_grad():
        fastpeft.lora_linear(x, w, b, a, bb, 0.5)
    y = fastpeft.lora_linear(x, w, b, a, bb, 0.5)  # same tensors, grad mode on: a new signature
    y.sum().backward()
    assert a.grad is not None and x.grad is not None
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(fastpeft.BackendUnavailableError, match="backend 'cuda' cannot run"):
        fastpeft.lora_linear(x, w, b, a, bb, 0.5)
    monkeypatch.setenv(backends.ENV_VAR, "sideways")
    with pytest.raises(ValueError, match="FASTPEFT_BACKEND must be one of"):
        fastpeft.lora_linear(x, w, b, a, bb, 0.5)


def test_decisions_are_bounded(monkeypatch):
    monkeypatch.setattr(backends, "DECISIONS_LIMIT", 3)
    backends.forget_decisions()
    for m in range(1, 8):
        fastpeft.lora_linear(*lora_args(M=m, grad=False), 0.5)
        assert len(backends._decisions) <= 3


def _registered(x, w, b, a, bb, scaling, p, seed, backend):
    return lora_op.lora_linear_forward(x, w, b, a, bb, scaling, p, seed, backend)[0]


BACKENDS = ["torch"] + (["triton"] if TRITON_DEVICE == "cpu" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_calls_equal_the_registered_op(backend, p, dtype):
    """The eager path (no custom-op dispatch) gives what the registered op gives: outputs and every gradient, with
    dropout (same seed, same mask) and fp32 adapters on a bf16 base. Bit for bit where both run the same backward;
    the torch path without dropout is differentiated by autograd (its ops in another order), so there within the
    dtype's budget."""
    results = []
    for run in (fastpeft.lora_linear, None):
        x, w, b, a, bb = lora_args(M=33, K=40, N=24, r=8, dtype=dtype)
        b.requires_grad_(True)
        if run is None:
            y = _registered(x, w, b, a, bb, 0.7, p, 123, backend)
        else:
            y = run(x, w, b, a, bb, 0.7, dropout_p=p, backend=backend, dropout_seed=123)
        dy = torch.randn_like(y)
        y.backward(dy)
        results.append([y, x.grad, b.grad, a.grad, bb.grad])
    for eager, registered in zip(*results, strict=True):
        assert eager.dtype == registered.dtype
        if backend == "torch" and p == 0.0:
            assert rel_err(eager, registered) <= TOLERANCE[dtype]
        else:
            assert torch.equal(eager, registered)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_eager_calls_equal_the_registered_op(backend):
    results = []
    for eager in (True, False):
        torch.manual_seed(0)
        h = torch.randn(7, 32, requires_grad=True)
        params = [torch.randn(8, 32), torch.randn(8), torch.randn(32, 8), torch.randn(32)]
        for t in params:
            t.requires_grad_(True)
        wd, bd, wu, bu = params
        if eager:
            out = fastpeft.adapter_bottleneck(h, wd, bd, wu, bu, 0.5, "silu", backend=backend)
        else:
            out = adapter_op.adapter_bottleneck_forward(h, wd, bd, wu, bu, None, 0.5, "silu", backend)[0]
        out.backward(torch.ones_like(out))
        results.append([out, h.grad] + [t.grad for t in params])
    for eager, registered in zip(*results, strict=True):  # a small call on torch: autograd's order of ops
        assert torch.equal(eager, registered) if backend != "torch" else rel_err(eager, registered) <= 1e-6


def test_the_torch_path_saves_x_and_s_only():
    """Without dropout the torch path runs under autograd directly: what it saves for backward must still be x
    itself (for dA) and S (M×r, for dB) plus the weights, never an M×N tensor or a copy of x."""
    M, K, N, r = 64, 96, 80, 4
    x, w, b, a, bb = lora_args(M=M, K=K, N=N, r=r)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastpeft.lora_linear(x, w, b, a, bb, 0.5, backend="torch")
    shapes = sorted(tuple(t.shape) for t in saved if t.numel() >= M * r)
    assert (M, N) not in shapes and shapes.count((M, K)) == 1 and (M, r) in shapes, shapes
    assert sum(t.data_ptr() == x.data_ptr() for t in saved if t.shape == (M, K)) == 1


def test_dropout_refuses_to_draw_a_seed_into_a_cuda_graph(monkeypatch):
    """A seed drawn while a CUDA graph captures would be baked in: every replay would drop the same elements."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    x, w, b, a, bb = lora_args(grad=False)
    with pytest.raises(RuntimeError, match="captured in a CUDA graph"):
        fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, backend="torch")
    fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, backend="torch", dropout_seed=3)  # fixed knowingly
    fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, training=False, backend="torch")


def test_a_compiled_layer_never_recompiles_for_decisions_made_elsewhere():
    """Compiled code decides each trace anew and never guards on the decisions: eager calls of new signatures
    between compiled calls, and new shapes, recompile nothing."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    layer = fastpeft.LoraLinear(torch.nn.Linear(24, 16), r=4, init_lora_weights=False)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)
    x = torch.randn(5, 24)
    with torch.no_grad():
        compiled(x)
        for m in range(6, 30):
            layer(torch.randn(m, 24))  # eager: a new decided signature each
            compiled(x)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("M", [8, 64])  # below and above SMALL_CALL (K=512)
def test_double_backward_is_refused_not_wrong(M):
    x = torch.randn(M, 512, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, 512, dtype=torch.float64)
    a = torch.randn(4, 512, dtype=torch.float64, requires_grad=True)
    b = torch.randn(32, 4, dtype=torch.float64, requires_grad=True)
    y = fastpeft.lora_linear(x, w, None, a, b, 0.5)
    if x.numel() < backends.SMALL_CALL:  # autograd's own graph: the true second derivative
        (ga,) = torch.autograd.grad(y.square().sum(), a, create_graph=True)
        ref = fastpeft.lora_linear_reference(x, w, None, a, b, 0.5)
        (ga_ref,) = torch.autograd.grad(ref.square().sum(), a, create_graph=True)
        torch.testing.assert_close(torch.autograd.grad(ga.square().sum(), a)[0],
                                   torch.autograd.grad(ga_ref.square().sum(), a)[0])
    else:  # the fused backward: refused, where it once gave a silently wrong second derivative
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(y.square().sum(), a, create_graph=True)
        h = torch.randn(64, 512, dtype=torch.float64, requires_grad=True)
        wd, wu = torch.randn(8, 512, dtype=torch.float64), torch.randn(512, 8, dtype=torch.float64)
        out = fastpeft.adapter_bottleneck(h, wd, None, wu, None, 0.5, "gelu")
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(out.square().sum(), h, create_graph=True)


def test_pruned_or_parametrized_adapters_still_run():
    from torch.nn.utils import parametrize, prune
    layer = fastpeft.LoraLinear(torch.nn.Linear(16, 8), r=4, init_lora_weights=False)
    x = torch.randn(3, 16)
    prune.l1_unstructured(layer.adapter, "lora_A", 0.5)

    class Doubled(torch.nn.Module):
        def forward(self, t):
            return 2 * t
    parametrize.register_parametrization(layer.adapter, "lora_B", Doubled())
    ref = fastpeft.lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x), ref)


def test_eval_mode_dropout_is_still_checked_after_a_decided_call():
    x, w, b, a, bb = lora_args(grad=False)
    fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, training=False)
    for bad in (5.0, float("nan"), "abc"):
        with pytest.raises((TypeError, ValueError), match="dropout_p"):
            fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=bad, training=False)
    with pytest.raises(TypeError, match="training must be a Python bool"):
        fastpeft.lora_linear(x, w, b, a, bb, 0.5, dropout_p=0.1, training="no")


def test_pruning_masks_apply_at_every_step():
    """Pruning puts a forward pre-hook on the module it prunes; LoraLinear runs its adapter's and base layer's hooks
    itself (their forward never runs), so the mask applies to the trained weights at every step."""
    from torch.nn.utils import prune
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(torch.nn.Linear(64, 32), r=4, init_lora_weights=False)
    prune.l1_unstructured(layer.adapter, "lora_A", 0.5)
    optimizer = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 64)
    for _ in range(3):
        y = layer(x)
        a = layer.adapter.lora_A_orig * layer.adapter.lora_A_mask
        ref = fastpeft.lora_linear_reference(x, layer.weight, layer.bias, a, layer.lora_B, layer.scaling)
        torch.testing.assert_close(y, ref)
        y.sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_a_symbolic_scaling_compiles_in_one_graph():
    torch._dynamo.reset()
    x, w, b, a, bb = lora_args(grad=False)
    f = torch.compile(lambda x, s: fastpeft.lora_linear(x, w, b, a, bb, s), fullgraph=True, backend="aot_eager")
    for s in (0.5, 0.25, 0.125):  # a changing float becomes symbolic on recompilation
        torch.testing.assert_close(f(x, s), fastpeft.lora_linear_reference(x, w, b, a, bb, s))


def test_a_zero_feature_dimension_gets_a_clear_error():
    with pytest.raises(ValueError, match="in_features=0"):
        fastpeft.lora_linear(torch.randn(3, 0), torch.randn(5, 0), None, torch.randn(2, 0), torch.randn(5, 2), 0.5)
    with pytest.raises(ValueError, match="hidden size d"):
        fastpeft.adapter_bottleneck(torch.randn(2, 3, 0), torch.randn(4, 0), None, torch.randn(0, 4), None)
