"""GPU-only checks (skipped without a CUDA GPU): training-sized shapes, auto dispatch, determinism."""
import pytest
import torch
from conftest import TOLERANCE, gpu, lora_linear_inputs, rel_err

import fastpeft
from fastpeft import auto, backends

pytestmark = [gpu, pytest.mark.gpu]


def _inputs(M, K, N, r, dtype, seed=0):
    """fp32 adapters on the base dtype, as LoraLinear holds them; the bias is frozen."""
    x, w, b, a, bb, dy = lora_linear_inputs(M, K, N, r, dtype, torch.float32, device="cuda", seed=seed)
    return x, w, b.detach(), a, bb, dy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_training_shape_matches_reference(dtype, p):
    M, K, N, r = 1000, 1024, 768, 16  # M on purpose not a multiple of any block
    x, w, b, a, bb, dy = _inputs(M, K, N, r, dtype)
    y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, backend="triton", dropout_seed=11)
    y.backward(dy)
    keep = fastpeft.dropout_mask(11, (M, K), p, "triton", "cuda") if p else None
    x64, a64, bb64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb))
    ref = fastpeft.lora_linear_reference(x64, w.double(), b.double(), a64, bb64, 2.0, keep, p)
    ref.backward(dy.double())
    for got, want in [(y, ref), (x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, bb64.grad)]:
        assert rel_err(got, want) <= TOLERANCE[dtype]


def test_auto_measures_on_cuda_and_keeps_the_winner(tmp_path, monkeypatch):
    """auto times the backends that can serve a call (decode-sized: cuda if built, triton, torch), keeps the winner
    in memory and on disk, and the result is right whichever won; fp64 has one candidate, nothing measured."""
    monkeypatch.setenv(auto.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(auto.MEASURE_ENV, raising=False)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    auto.forget()
    try:
        for M in (8, 2048):
            x, w, b, a, bb, _ = _inputs(M, 1024, 1024, 16, torch.bfloat16)
            with torch.no_grad():
                y = fastpeft.lora_linear(x, w, b, a, bb, 2.0)
            ref = fastpeft.lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), 2.0)
            assert rel_err(y, ref) <= TOLERANCE[torch.bfloat16]
        winners = auto.stored_winners()
        assert len(winners) == 2 and set(winners.values()) <= {"cuda", "triton", "torch"}, winners
        assert any(p.suffix == ".json" for p in tmp_path.iterdir())
        print("auto winners:", winners)
        x64 = x.double()
        fastpeft.lora_linear(x64, w.double(), None, a.double(), bb.double(), 2.0)
        assert len(auto.stored_winners()) == 2
    finally:
        auto.forget()


def test_backward_is_deterministic():
    x, w, b, a, bb, dy = _inputs(777, 512, 384, 8, torch.bfloat16)
    grads = []
    for _ in range(2):
        x.grad = a.grad = bb.grad = None
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, backend="triton", dropout_seed=3).backward(dy)
        grads.append([x.grad.clone(), a.grad.clone(), bb.grad.clone()])
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2)


decode = pytest.mark.skipif(not torch.cuda.is_available() or fastpeft.cuda_ext.load()[0] is None,
                            reason="needs a CUDA GPU and fastpeft._C")


@decode
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (3, 100, 97, 1), (16, 1000, 333, 64), (7, 4104, 130, 256),
                                     (16, 64, 4096, 8), (2, 37, 19, 3)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype,adapter", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                           (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["bf16-Afp32", "fp16", "fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_decode_kernel_matches_reference(M, K, N, r, dtype, adapter, bias):
    g = torch.Generator(device="cuda").manual_seed(M * 1000 + r)

    def rand(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dt)
    x = rand(M, K, dt=dtype)
    w = rand(N, K, dt=dtype, scale=K ** -0.5)
    b = rand(N, dt=dtype) if bias else None
    a = rand(r, K, dt=adapter, scale=K ** -0.5)
    bb = rand(N, r, dt=adapter, scale=r ** -0.5)
    y = fastpeft.cuda_ext.lora_linear_decode(x, w, b, a, bb, 1.5)
    ref = fastpeft.lora_linear_reference(x.double(), w.double(), None if b is None else b.double(), a.double(),
                                         bb.double(), 1.5)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel_err(y, ref) <= TOLERANCE[dtype]


@decode
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (16, 1000, 333, 64), (2, 37, 19, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_kernel_applies_doras_scale_as_rows_are_written(M, K, N, r, dtype):
    """DoRA at decode: the cuda backend (picked by name, inference) scales each column before the bias."""
    g = torch.Generator(device="cuda").manual_seed(M + r)

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dt)
    x, w, b = rand(M, K), rand(N, K, scale=K ** -0.5), rand(N)
    a, bb = rand(r, K, dt=torch.float32, scale=K ** -0.5), rand(N, r, dt=torch.float32, scale=r ** -0.5)
    m = fastpeft.dora_weight_norm(w, a, bb, 1.5) * (0.5 + torch.rand(N, device="cuda", generator=g))
    with torch.no_grad():
        y = fastpeft.lora_linear(x, w, b, a, bb, 1.5, backend="cuda", magnitude=m)
    ref = fastpeft.lora_linear_reference(x.double(), w.double(), b.double(), a.double(), bb.double(), 1.5,
                                         magnitude=m.double())
    assert rel_err(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_dora_training_shape_matches_reference(p):
    M, K, N, r = 1000, 1024, 768, 16
    x, w, b, a, bb, dy = _inputs(M, K, N, r, torch.bfloat16)
    m = (fastpeft.dora_weight_norm(w, a.detach(), bb.detach(), 2.0) * 1.1).requires_grad_(True)
    y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, backend="triton", dropout_seed=11, magnitude=m)
    y.backward(dy)
    keep = fastpeft.dropout_mask(11, (M, K), p, "triton", "cuda") if p else None
    x64, a64, bb64, m64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb, m))
    ref = fastpeft.lora_linear_reference(x64, w.double(), b.double(), a64, bb64, 2.0, keep, p, magnitude=m64)
    ref.backward(dy.double())
    for got, want in [(y, ref), (x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, bb64.grad), (m.grad, m64.grad)]:
        assert rel_err(got, want) <= TOLERANCE[torch.bfloat16]


@decode
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_kernel_serves_a_mixed_batch_in_one_launch(dtype):
    """Up to 16 rows, each with its own adapter (ranks that differ, base rows too): the cuda backend stacks the
    rows' adapters and each row reads its own, against the float64 reference."""
    g = torch.Generator(device="cuda").manual_seed(5)
    K, N, ranks = 1024, 768, [16, 8, 4, 16]
    x = torch.randn(16, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(dtype)
    b = torch.randn(N, device="cuda", generator=g).to(dtype)
    As = [torch.randn(r, K, device="cuda", generator=g) * K ** -0.5 for r in ranks]
    Bs = [torch.randn(N, r, device="cuda", generator=g) * r ** -0.5 for r in ranks]
    index = torch.tensor([0, 1, 2, 3, -1, 3, 2, 1, 0, 0, -1, 1, 2, 3, 3, 0], device="cuda")
    with torch.no_grad():
        y = fastpeft.lora_linear_mixed(x, w, b, As, Bs, [2.0, 1.0, 0.5, 1.5], index, backend="cuda")
    ref = fastpeft.lora_linear_mixed_reference(x.double(), w.double(), b.double(), [a.double() for a in As],
                                               [t.double() for t in Bs], [2.0, 1.0, 0.5, 1.5], index)
    assert rel_err(y, ref) <= TOLERANCE[dtype]


def test_mixed_batch_training_shape_on_triton():
    """A mixed batch of 8 sequences of 128 tokens over 5 adapters on the fused kernels (auto picks triton)."""
    g = torch.Generator(device="cuda").manual_seed(6)
    K, N, ranks = 1024, 768, [16, 8, 4, 16, 32]
    x = torch.randn(8, 128, K, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(N, K, device="cuda", generator=g) * K ** -0.5).to(torch.bfloat16)
    As = [(torch.randn(r, K, device="cuda", generator=g) * K ** -0.5).requires_grad_() for r in ranks]
    Bs = [(torch.randn(N, r, device="cuda", generator=g) * r ** -0.5).requires_grad_() for r in ranks]
    index = torch.tensor([0, 1, 2, 3, 4, -1, 4, 0], device="cuda")[:, None].expand(8, 128)
    y = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0] * 5, index)
    dy = torch.randn(y.shape, device="cuda", generator=g).to(torch.bfloat16)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    A64 = [a.detach().double().requires_grad_() for a in As]
    B64 = [t.detach().double().requires_grad_() for t in Bs]
    ref = fastpeft.lora_linear_mixed_reference(x64, w.double(), None, A64, B64, [1.0] * 5, index)
    ref.backward(dy.double())
    pairs = [(y, ref), (x.grad, x64.grad)] + [(t.grad, r.grad) for t, r in zip(As + Bs, A64 + B64, strict=True)]
    for got, want in pairs:
        assert rel_err(got, want) <= TOLERANCE[torch.bfloat16]


@decode
def test_decode_strided_rows_and_repeated_launches():
    """A row stride other than K (a slice of a wider tensor), and back-to-back launches on one stream: the
    kernel's counters must reset themselves between launches."""
    wide = torch.randn(4, 2 * 512, device="cuda", dtype=torch.bfloat16)
    x = wide[:, :512]
    w = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) / 23
    a = torch.randn(16, 512, device="cuda") / 23
    bb = torch.randn(256, 16, device="cuda") / 4
    ref = fastpeft.lora_linear_reference(x.double(), w.double(), None, a.double(), bb.double(), 2.0)
    outs = [fastpeft.cuda_ext.lora_linear_decode(x, w, None, a, bb, 2.0) for _ in range(50)]
    torch.cuda.synchronize()
    for y in outs:
        assert rel_err(y, ref) <= TOLERANCE[torch.bfloat16]
        assert torch.equal(y, outs[0])


@decode
def test_auto_picks_cuda_for_decode_inference_only():
    layer = fastpeft.LoraLinear(torch.nn.Linear(256, 128, device="cuda", dtype=torch.bfloat16), r=8,
                                init_lora_weights=False)
    x = torch.randn(2, 3, 256, device="cuda", dtype=torch.bfloat16)
    x2d = x.reshape(-1, 256)
    tensors = [x2d, layer.weight, layer.lora_A, layer.lora_B]
    with torch.no_grad():
        assert backends.select_backend("auto", tensors) == "cuda"
        y = layer(x)
    ref = fastpeft.lora_linear_reference(x.double(), layer.weight.double(), layer.bias.double(),
                                         layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
    assert y.shape == (2, 3, 128) and rel_err(y, ref) <= TOLERANCE[torch.bfloat16]
    y = layer(x)  # with grad: the cuda backend is inference-only, so auto runs triton and backward works
    y.float().sum().backward()
    assert layer.lora_A.grad is not None


@decode
@pytest.mark.parametrize("M,d,m", [(1, 4096, 64), (3, 100, 7), (16, 1000, 256), (5, 64, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "gelu_tanh"])
@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_adapter_bottleneck_decode_kernel_matches_reference(M, d, m, dtype, activation, parallel):
    g = torch.Generator(device="cuda").manual_seed(M * 100 + m)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)
    h, wd, bd = rand(M, d), rand(m, d, scale=d ** -0.5), rand(m)
    wu, bu = rand(d, m, scale=m ** -0.5), rand(d)
    res = rand(M, d) if parallel else None
    out = fastpeft.cuda_ext.adapter_bottleneck_decode(h, wd, bd, wu, bu, res, 2.0, activation)
    ref = fastpeft.adapter_bottleneck_reference(h.double(), wd.double(), bd.double(), wu.double(), bu.double(), 2.0,
                                                activation, None if res is None else res.double())
    assert out.dtype == dtype and rel_err(out, ref) <= TOLERANCE[dtype]


@decode
def test_auto_picks_cuda_for_adapter_bottleneck_decode_inference_only():
    adapter = fastpeft.BottleneckAdapter(512, bottleneck=32, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    ref = fastpeft.adapter_bottleneck_reference(h.double(), adapter.down.double(), adapter.down_bias.double(),
                                                adapter.up.double(), adapter.up_bias.double(), 1.0)
    with torch.no_grad():
        out = adapter(h)
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16]
    adapter(h).float().sum().backward()  # with grad, auto takes triton
    assert adapter.up.grad is not None


@decode
def test_opcheck_decode_ops():
    x, w, b, a, bb, _ = _inputs(5, 256, 128, 8, torch.bfloat16)
    torch.library.opcheck(fastpeft.cuda_ext.lora_linear_decode_op, (x.detach(), w, b, a.detach(), bb.detach(), 0.5))
    scale = torch.rand(w.shape[0], device="cuda") + 0.5  # DoRA's column scale
    torch.library.opcheck(fastpeft.cuda_ext.lora_linear_decode_op,
                          (x.detach(), w, b, a.detach(), bb.detach(), 0.5, scale))
    h = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    wd, wu = torch.randn(32, 256, device="cuda", dtype=torch.bfloat16), torch.randn(256, 32, device="cuda",
                                                                                      dtype=torch.bfloat16)
    torch.library.opcheck(fastpeft.cuda_ext.adapter_bottleneck_decode_op, (h, wd, None, wu, None, None, 0.5, "gelu"))


def test_compiled_model_on_gpu_has_no_graph_breaks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda().bfloat16()
    fastpeft.apply_lora(model, target_modules=["0", "2"], r=8, lora_dropout=0.1, init_lora_weights=False)
    fastpeft.apply_adapters(model, ["2"], {"reduction_factor": 8})
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    for grad in (True, False):  # training (triton) and inference (the cuda decode kernel where built)
        with torch.set_grad_enabled(grad):
            explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) <= TOLERANCE[torch.bfloat16]


@decode
def test_decode_kernels_under_cuda_graphs_match_eager():
    """Captured launches have counters of their own: two graphs captured on one stream, replayed again and again
    with new inputs, one after the other and at the same time on two streams, equal eager launches bit for bit."""
    from fastpeft import cuda_ext
    torch.manual_seed(0)
    x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device="cuda", dtype=torch.bfloat16) / 32
    a, bb = torch.randn(16, 1024, device="cuda") / 32, torch.randn(768, 16, device="cuda") / 4
    h = torch.randn(2, 768, device="cuda", dtype=torch.bfloat16)
    wd, wu = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16) / 28, torch.randn(
        768, 64, device="cuda", dtype=torch.bfloat16) / 8

    def lora(inp):
        return cuda_ext.lora_linear_decode(inp, w, None, a, bb, 2.0)

    def adapter(inp):
        return cuda_ext.adapter_bottleneck_decode(inp, wd, None, wu, None, None, 0.5, "gelu")

    lora(x), adapter(h)  # warm-up outside capture
    torch.cuda.synchronize()
    graphs, outs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()], []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for graph, fn, static in zip(graphs, (lora, adapter), (x, h), strict=True):
            with torch.cuda.graph(graph, stream=side):
                outs.append(fn(static))
    torch.cuda.current_stream().wait_stream(side)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for step in range(6):
        x.copy_(torch.randn_like(x))
        h.copy_(torch.randn_like(h))
        if step % 2:
            for graph, stream in zip(graphs, streams, strict=True):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    graph.replay()
            for stream in streams:
                torch.cuda.current_stream().wait_stream(stream)
        else:
            for graph in graphs:
                graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(outs[0], lora(x)) and torch.equal(outs[1], adapter(h)), step


@decode
def test_a_model_with_decode_layers_replays_under_reduce_overhead():
    """torch.compile(mode="reduce-overhead") (CUDA graphs) on a model whose layers run the decode kernels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.GELU(), torch.nn.Linear(512, 512)).cuda().bfloat16()
    fastpeft.apply_lora(model, target_modules=["0", "2"], r=8, init_lora_weights=False, backend="cuda")
    model.eval()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(4):
            x = torch.randn(2, 512, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(compiled(x).clone(), model(x))


def test_a_training_step_replays_under_a_cuda_graph():
    """Forward and backward of a LoRA'd model (Triton, no dropout: a captured seed would repeat its mask) captured
    once and replayed on new inputs give eager's loss and gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    fastpeft.apply_lora(model, target_modules=["0", "2"], r=8, init_lora_weights=False)
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(64, 256, device="cuda")

    def step():
        loss = model(x).square().mean()
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: autotuning, auto's measurement, first allocations
            for p in params:
                p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        for p in params:
            p.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        graphed = [static_loss.clone()] + [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        eager = [step()] + [p.grad for p in params]
        for got, want in zip(graphed, eager, strict=True):
            assert rel_err(got, want) <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# QLoRA: LoRA over a 4-bit (NF4) base
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain"])
def test_nf4_training_shape_matches_reference(p, double_quant):
    """The Triton GEMMs dequantising W's tiles (forward and dX), bf16, against the float64 reference over the
    dequantised weight; K = 1000 is not a multiple of the blocksize (the per-element absmax loads)."""
    for K in (1024, 1000):
        M, N, r = 777, 768, 16
        x, w, b, a, bb, dy = _inputs(M, K, N, r, torch.bfloat16)
        q = fastpeft.quantize_nf4(w, double_quant=double_quant)
        y = fastpeft.lora_linear(x, q, b, a, bb, 2.0, dropout_p=p, backend="triton", dropout_seed=11)
        y.backward(dy)
        keep = fastpeft.dropout_mask(11, (M, K), p, "triton", "cuda") if p else None
        x64, a64, bb64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb))
        ref = fastpeft.lora_linear_reference(x64, q.dequantize(torch.float64), b.double(), a64, bb64, 2.0, keep, p)
        ref.backward(dy.double())
        for got, want in [(y, ref), (x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, bb64.grad)]:
            assert rel_err(got, want) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_nf4_gemm_tiles_are_the_dequantised_weight_on_the_gpu(dtype):
    """x = I: the forward GEMM writes Wᵀ, dequantised tile by tile on the GPU (its rounding to bf16 is the
    hardware's), bit for bit NF4Weight.dequantize(); likewise dY = I for the dX GEMM, at autotuned tiles."""
    from fastpeft.kernels import lora_linear as kernels
    torch.manual_seed(0)
    for N, K in ((512, 1024), (300, 1000)):
        q = fastpeft.quantize_nf4(torch.randn(N, K, dtype=dtype, device="cuda"))
        a, zeros = torch.randn(16, K, device="cuda"), torch.zeros(N, 16, device="cuda")
        y = fastpeft.lora_linear(torch.eye(K, dtype=dtype, device="cuda"), q, None, a, zeros, 1.0, training=False,
                                 backend="triton")
        assert torch.equal(y.t(), q.dequantize())
        dx = kernels.lora_bwd(torch.eye(N, dtype=dtype, device="cuda"), None, q, a, zeros,
                              torch.zeros(N, 16, device="cuda"), 1.0, 0.0, 0, True, False, False, False)[0]
        assert torch.equal(dx, q.dequantize())


@decode
@pytest.mark.parametrize("M,K,N,r", [(1, 4096, 4096, 16), (5, 4096, 1000, 8), (16, 992, 333, 64), (2, 96, 19, 3)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain"])
def test_nf4_decode_kernel_reads_the_packed_weight(M, K, N, r, dtype, double_quant):
    """The cuda decode kernel over an NF4 base (16-byte code loads: K a multiple of 32), against the float64 reference
    over the dequantised weight; a K it does not serve goes to triton under auto."""
    g = torch.Generator(device="cuda").manual_seed(M + K)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    q = fastpeft.quantize_nf4((torch.randn(N, K, generator=g, device="cuda") * K ** -0.5).to(dtype),
                              double_quant=double_quant)
    b = torch.randn(N, generator=g, device="cuda").to(dtype)
    a = torch.randn(r, K, generator=g, device="cuda") * K ** -0.5
    bb = torch.randn(N, r, generator=g, device="cuda") * r ** -0.5
    with torch.no_grad():
        y = fastpeft.lora_linear(x, q, b, a, bb, 1.5, backend="cuda")
    ref = fastpeft.lora_linear_reference(x.double(), q.dequantize(torch.float64), b.double(), a.double(),
                                         bb.double(), 1.5)
    assert y.dtype == dtype and rel_err(y, ref) <= TOLERANCE[dtype]
    if M == 2:
        q70 = fastpeft.quantize_nf4(torch.randn(N, 70, device="cuda").to(dtype))
        with pytest.raises(fastpeft.BackendUnavailableError, match="multiple of 32"):
            with torch.no_grad():
                fastpeft.lora_linear(x[:, :70], q70, b, a[:, :70], bb, 1.5, backend="cuda")


@decode
@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (16, 1000, 333), (3, 37, 19)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_decode_kernel_runs_ia3(M, K, N, dtype, feedforward):
    """(IA)³ in the decode kernel: no low-rank term, the input scale applied to x as the GEMV reads it, the output
    scale after the bias; a mixed batch of tasks gathers each row's vector."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, device="cuda", generator=g).to(dtype)
    vectors = [torch.rand(K if feedforward else N, device="cuda", generator=g) + 0.5 for _ in range(3)]
    y = fastpeft.ia3_linear(x, w, b, vectors[0], feedforward, backend="cuda")
    ref = fastpeft.ia3_linear_reference(x.double(), w.double(), b.double(), vectors[0].double(), feedforward)
    assert rel_err(y, ref) <= TOLERANCE[dtype]
    index = torch.randint(-1, 3, (M,), device="cuda", generator=g)
    y = fastpeft.ia3_linear(x, w, b, vectors, feedforward, backend="cuda", adapter_index=index)
    ref = fastpeft.ia3_linear_reference(x.double(), w.double(), b.double(), [v.double() for v in vectors],
                                        feedforward, adapter_index=index)
    assert rel_err(y, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_ia3_training_shape_on_triton(feedforward):
    M, K, N = 4096, 4096, 1024
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
    vec = (torch.rand(K if feedforward else N, device="cuda") + 0.5).requires_grad_()
    y = fastpeft.ia3_linear(x, w, None, vec, feedforward, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, v64 = x.detach().double().requires_grad_(), vec.detach().double().requires_grad_()
    ref = fastpeft.ia3_linear_reference(x64, w.double(), None, v64, feedforward)
    ref.backward(dy.double())
    for got, want in ((y, ref), (x.grad, x64.grad), (vec.grad, v64.grad)):
        assert rel_err(got, want) <= TOLERANCE[torch.bfloat16]
