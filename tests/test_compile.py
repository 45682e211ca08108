"""torch.library registration: opcheck on every op, and torch.compile(fullgraph=True) without graph breaks."""
import pytest
import torch
from conftest import adapter_bottleneck_inputs, backend_params, lora_linear_inputs, rel_err
from torch import nn

import fastpeft
from fastpeft.ops import (
    adapter_bottleneck_backward,
    adapter_bottleneck_forward,
    dora_weight_norm,
    lora_linear_backward,
    lora_linear_forward,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def lora_inputs(M=12, K=24, N=20, r=4, dtype=torch.float32, device="cpu", bias=True, grad=True):
    return lora_linear_inputs(M, K, N, r, dtype, bias=bias, device=device, grad=grad, seed=M * 1000 + K)[:5]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dora", [False, True])
def test_opcheck_lora_ops(backend, device, dropout_p, bias, dora):
    x, w, b, a, bb = lora_inputs(device=device, bias=bias)
    dora_args = ()
    if dora:  # DoRA: the magnitude (trained) and the row norms, pre kept for dm
        magnitude = (torch.rand(w.shape[0], device=device) + 0.5).requires_grad_()
        norm = dora_weight_norm(w, a.detach(), bb.detach(), 0.5)
        dora_args = (magnitude, norm, True)
    torch.library.opcheck(lora_linear_forward, (x, w, b, a, bb, 0.5, dropout_p, 7, backend, *dora_args))
    y, s, drop, seed, pre = lora_linear_forward(x, w, b, a, bb, 0.5, dropout_p, 7, backend, *dora_args)
    assert pre.numel() == (y.numel() if dora else 0)
    dy = torch.randn_like(y)
    for needs in [(True, True, True, bias), (False, True, False, False), (True, False, True, False)]:
        extra = (dora_args[0].detach(), dora_args[1], pre, needs[0]) if dora else ()
        torch.library.opcheck(lora_linear_backward,
                              (dy, x.detach(), w, a.detach(), bb.detach(), s, drop, seed, 0.5, dropout_p, backend,
                               *needs, *extra))


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_opcheck_adapter_ops(backend, device, residual, activation):
    args, _ = adapter_bottleneck_inputs(10, 24, 8, parallel=residual, device=device, seed=3)
    h, wd, bd, wu, bu, res = args.values()
    torch.library.opcheck(adapter_bottleneck_forward, (h, wd, bd, wu, bu, res, 0.7, activation, backend))
    out, pre = adapter_bottleneck_forward(h, wd, bd, wu, bu, res, 0.7, activation, backend)
    dy = torch.randn_like(out)
    detached = [t.detach() for t in (h, wd, wu)]
    for needs in [(True,) * 5, (False, True, False, True, False), (True, False, True, False, True)]:
        torch.library.opcheck(adapter_bottleneck_backward,
                              (dy, detached[0], detached[1], detached[2], pre, 0.7, activation, residual, backend,
                               *needs))


def test_ops_refuse_backends_they_do_not_serve():
    x, w, b, a, bb = lora_inputs(grad=False)
    with pytest.raises(ValueError, match="backend must be 'torch' or 'triton'"):
        lora_linear_forward(x, w, b, a, bb, 1.0, 0.0, 0, "cuda")


class TinyBlock(nn.Module):
    """Two projections with a nonlinearity between, LoRA'd, then a bottleneck adapter."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def lora_model(dropout=0.0, backend=None):
    torch.manual_seed(0)
    model = fastpeft.apply_lora(TinyBlock(), target_modules=["up", "down"], r=4, lora_alpha=8,
                                lora_dropout=dropout, init_lora_weights=False, backend=backend)
    return fastpeft.apply_adapters(model, ["down"], {"reduction_factor": 4, "activation": "gelu"}, backend=backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_explain_reports_no_graph_breaks(backend, device):
    model = lora_model(dropout=0.1, backend=backend).to(device)
    x = torch.randn(3, 5, 16, device=device)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager_with_dropout(compiler):
    torch._dynamo.reset()
    eager, compiled_model = lora_model(dropout=0.2), lora_model(dropout=0.2)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=compiler)
    x = torch.randn(4, 6, 16)
    for step in range(2):  # the second step runs the cached graph
        # The dropout seed is drawn inside the op from torch's generator, so compiled runs draw eager's masks.
        torch.manual_seed(step)
        y_eager = eager(x)
        y_eager.square().mean().backward()
        torch.manual_seed(step)
        y_compiled = compiled(x)
        y_compiled.square().mean().backward()
        assert rel_err(y_compiled, y_eager) < 1e-5
        eager_grads, compiled_grads = grads(eager), grads(compiled_model)
        assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 8
        for name, g in eager_grads.items():
            assert rel_err(compiled_grads[name], g) < 1e-5, name


def test_compile_with_the_triton_backend_under_the_interpreter():
    if fastpeft.backends.not_supported_reasons("triton", [torch.empty(1)]):
        pytest.skip("Triton cannot run CPU tensors here")
    torch._dynamo.reset()
    eager = lora_model(backend="triton")
    compiled = torch.compile(lora_model(backend="triton"), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16)
    assert rel_err(compiled(x), eager(x)) < 1e-5


@pytest.mark.parametrize("backend,device", backend_params())
def test_activation_checkpointing_recomputes_the_same_dropout(backend, device):
    """Recomputation under torch.utils.checkpoint replays the RNG state, so the op redraws the same seed."""
    layer = fastpeft.LoraLinear(nn.Linear(24, 16), r=4, lora_dropout=0.3, init_lora_weights=False,
                                backend=backend).to(device)
    x = torch.randn(6, 24, device=device, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(5)
        y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        y.square().sum().backward()
        results.append((y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
    for plain, recomputed in zip(*results, strict=True):
        assert torch.equal(plain, recomputed)


def test_a_transformers_llama_with_lora_compiles_as_one_graph():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(0)
    model = fastpeft.apply_lora(transformers.LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"], r=4,
                                lora_dropout=0.1, init_lora_weights=False)
    ids = torch.randint(0, 97, (2, 12))
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    compiled_loss = compiled(input_ids=ids, labels=ids).loss
    torch.manual_seed(3)
    eager_loss = model(input_ids=ids, labels=ids).loss
    assert rel_err(compiled_loss, eager_loss) < 1e-6


def test_compile_under_autocast_matches_eager():
    torch._dynamo.reset()
    model = lora_model(dropout=0.1)
    x = torch.randn(8, 16)

    def step(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    outputs, gradients = [], []
    for run in (compiled, step):
        model.zero_grad()
        torch.manual_seed(1)
        y = run(model)
        y.float().square().sum().backward()
        outputs.append(y)
        gradients.append(grads(model))
    assert outputs[0].dtype == torch.bfloat16 and torch.equal(outputs[0], outputs[1])
    for name, g in gradients[1].items():
        assert torch.equal(gradients[0][name], g), name


def mixed_call_inputs(device="cpu", dora=True):
    """Three adapters of different ranks (the last a DoRA one) over x (2, 9, 24): rows of each, and base rows."""
    gen = torch.Generator().manual_seed(5)
    K, N = 24, 20
    x = torch.randn(2, 9, K, generator=gen).to(device).requires_grad_()
    w = torch.randn(N, K, generator=gen).to(device) / K**0.5
    b = torch.randn(N, generator=gen).to(device).requires_grad_()
    ranks = (4, 2, 3)
    As = [torch.randn(r, K, generator=gen).to(device).requires_grad_() for r in ranks]
    Bs = [torch.randn(N, r, generator=gen).to(device).requires_grad_() for r in ranks]
    mags = [None, None, (torch.rand(N, generator=gen) + 0.5).to(device).requires_grad_() if dora else None]
    index = torch.randint(-1, 3, (2, 9), generator=gen).to(device)
    return x, w, b, As, Bs, mags, index


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_the_mixed_op_compiles_as_one_graph_and_matches_eager(backend, device, compiler):
    """The mixed op is one registered op under torch.compile(fullgraph=True): outputs and every gradient as eager,
    dropout's masks drawn from the same seed (its backward runs the forward again on that seed)."""
    torch._dynamo.reset()
    dora = backend == "torch"  # (the triton backend refuses DoRA adapters in a mixed batch)
    x, w, b, As, Bs, mags, index = mixed_call_inputs(device, dora)

    def call(x, b, As, Bs, mags):
        return fastpeft.lora_linear_mixed(x, w, b, As, Bs, [0.5, 2.0, 1.0], index, [0.2, 0.0, 0.3], backend=backend,
                                          magnitudes=mags, dropout_seed=None)

    trained = [x, b, *As, *Bs] + [m for m in mags if m is not None]
    results = []
    for fn in (call, torch.compile(call, fullgraph=True, backend=compiler)):
        for t in trained:
            t.grad = None
        torch.manual_seed(11)
        y = fn(x, b, As, Bs, mags)
        (y.square() * torch.linspace(0.5, 1.5, y.shape[-1], device=device)).sum().backward()
        results.append((y.detach(), [t.grad.clone() for t in trained]))
    (y_eager, g_eager), (y_compiled, g_compiled) = results
    assert torch.isfinite(y_eager).all() and rel_err(y_compiled, y_eager) < 1e-5
    for i, (got, want) in enumerate(zip(g_compiled, g_eager, strict=True)):
        assert rel_err(got, want) < 1e-5, i


def test_opcheck_mixed_ops():
    from fastpeft.ops.lora_linear_mixed import lora_linear_mixed_backward, lora_linear_mixed_forward
    x, w, b, As, Bs, mags, index = mixed_call_inputs()
    x2d = x.reshape(-1, x.shape[-1])
    args = (x2d, b, As, Bs, [mags[2]], w, [False, False, True], [0.5, 2.0, 1.0], [0.2, 0.0, 0.3], 7, index, "torch")
    torch.library.opcheck(lora_linear_mixed_forward, args)
    y, seed = lora_linear_mixed_forward(*args)
    detached = [[t.detach() for t in ts] for ts in (As, Bs, [mags[2]])]
    for needs in ([True] * 9, [False, True, True, False, False, True, False, True, False]):
        torch.library.opcheck(lora_linear_mixed_backward,
                              (torch.randn_like(y), x2d.detach(), b.detach(), *detached, w, [False, False, True],
                               [0.5, 2.0, 1.0], [0.2, 0.0, 0.3], seed, index, "torch", needs))


def test_a_compiled_mixed_call_still_refuses_indices_out_of_range():
    """Traced, the index's values cannot be read: the registered op checks them when it runs, with eager's message."""
    torch._dynamo.reset()
    x, w, b, As, Bs, _, _ = mixed_call_inputs(dora=False)
    compiled = torch.compile(lambda x, index: fastpeft.lora_linear_mixed(x, w, None, As, Bs, [0.5, 2.0, 1.0], index,
                                                                         training=False, backend="torch"),
                             fullgraph=True, backend="aot_eager")
    for bad in (-2, 3):
        with pytest.raises(ValueError, match=r"adapter_index values must be in \[-1, 2\]"):
            compiled(x.detach(), torch.full((2, 9), bad))
