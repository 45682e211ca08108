"""Mixed-adapter batches: lora_linear_mixed against its float64 reference (outputs and every gradient, ranks that
differ, DoRA, dropout, both ways of grouping rows), LoraLinear(x, adapter_names=...), fastpeft.mixed_batch on a tiny
Llama against HF PEFT's adapter_names forward, several adapters trained at once, and bad input."""
import copy
import dataclasses
import importlib

import pytest
import torch
from conftest import TRITON_DEVICE, needs_triton, rel_err, tiny_llama
from torch import nn

import fastpeft

mixed = importlib.import_module("fastpeft.ops.lora_linear_mixed")
peft = pytest.importorskip("peft")


def adapters(K, N, ranks, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    As = [(torch.randn(r, K, generator=g) * K ** -0.5).to(dtype).requires_grad_() for r in ranks]
    Bs = [(torch.randn(N, r, generator=g) * r ** -0.5).to(dtype).requires_grad_() for r in ranks]
    return As, Bs


def f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


@pytest.mark.parametrize("layout", ["runs", "scattered", "all-base", "one-adapter"])
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_reference_with_every_gradient(layout, dora, bias):
    B, T, K, N, ranks = 6, 5, 24, 20, [2, 4, 3, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, K, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g) / 5
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    As, Bs = adapters(K, N, ranks)
    magnitudes = [None] * 4
    if dora:
        magnitudes[1] = (fastpeft.dora_weight_norm(w, As[1].detach(), Bs[1].detach(), 1.5) * 1.2).requires_grad_()
        magnitudes[3] = (fastpeft.dora_weight_norm(w, As[3].detach(), Bs[3].detach(), 0.7) * 0.9).requires_grad_()
    index = {"runs": torch.tensor([0, 3, -1, 1, 1, 0]).repeat_interleave(T).reshape(B, T),
             "scattered": torch.randint(-1, 4, (B, T), generator=g),
             "all-base": torch.full((B, T), -1),
             "one-adapter": torch.full((B, T), 2)}[layout]
    scalings = [0.5, 1.5, 2.0, 0.7]
    y = fastpeft.lora_linear_mixed(x, w, b, As, Bs, scalings, index, magnitudes=magnitudes)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x64, b64 = f64(x), f64(b)
    A64, B64, m64 = [f64(t) for t in As], [f64(t) for t in Bs], [f64(t) for t in magnitudes]
    ref = fastpeft.lora_linear_mixed_reference(x64, w.double(), b64, A64, B64, scalings, index, magnitudes=m64)
    ref.backward(dy.double())
    pairs = [(y, ref), (x.grad, x64.grad)] + ([(b.grad, b64.grad)] if bias else [])
    pairs += [(a.grad, r.grad) for a, r in zip(As + Bs, A64 + B64, strict=True)]
    pairs += [(m.grad, r.grad) for m, r in zip(magnitudes, m64, strict=True) if m is not None]
    for got, want in pairs:
        if want is None or not want.abs().sum():  # an adapter with no rows: exactly zero
            assert torch.equal(got, torch.zeros_like(got))
        else:
            assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_samples_of_one_adapter_each_take_batched_gemms(monkeypatch, p, dtype):
    """One adapter per sample of >= 16 rows (a batch of sequences): the batched path, ranks padded, base samples,
    per-adapter dropout from one draw; every gradient against the reference with the same masks."""
    calls = []
    real = mixed._MixedLoraLinearBlocks.apply
    monkeypatch.setattr(mixed._MixedLoraLinearBlocks, "apply", lambda *a: calls.append(1) or real(*a))
    B, T, K, N, ranks = 7, 16, 24, 20, [2, 4, 3]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(N, K, generator=g) / 5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype).requires_grad_()
    As, Bs = adapters(K, N, ranks)  # fp32 adapters, on a bf16 base too
    samples = torch.tensor([0, 2, -1, 1, 1, 0, 2])
    index = samples[:, None].expand(B, T)
    scalings, ps = [0.5, 1.5, 2.0], [p, 0.0, p / 2]
    y = fastpeft.lora_linear_mixed(x, w, b, As, Bs, scalings, index, ps, training=True, dropout_seed=9)
    assert calls == [1]
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    keep = None
    if p:
        row_p = torch.tensor([ps[a] if a >= 0 else 0.0 for a in samples.tolist()], dtype=torch.float64)
        keep = [~mixed._row_drop_mask(9, (B, T, K), row_p, "cpu")] * 3
    x64, b64 = f64(x), f64(b)
    A64, B64 = [f64(t) for t in As], [f64(t) for t in Bs]
    ref = fastpeft.lora_linear_mixed_reference(x64, w.double(), b64, A64, B64, scalings, index, keep, ps)
    ref.backward(dy.double())
    budget = 1e-5 if dtype == torch.float32 else 1e-2
    pairs = [(y, ref), (x.grad, x64.grad), (b.grad, b64.grad)]
    pairs += [(t.grad, r.grad) for t, r in zip(As + Bs, A64 + B64, strict=True)]
    for got, want in pairs:
        assert rel_err(got, want) <= budget


def test_each_adapter_gets_its_own_dropout_mask_and_rate():
    K, N = 64, 16
    x = torch.randn(40, K)
    w = torch.randn(N, K)
    As, Bs = adapters(K, N, [4, 4])
    index = torch.tensor([0] * 20 + [1] * 20)
    torch.manual_seed(0)
    y = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], index, [0.0, 0.5], training=True)
    y_eval = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], index, [0.0, 0.5], training=False)
    assert torch.allclose(y[:20], y_eval[:20], atol=1e-6)  # adapter 0: no dropout
    assert not torch.allclose(y[20:], y_eval[20:], atol=1e-3)  # adapter 1: half its inputs dropped
    again = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], index, [0.0, 0.5], dropout_seed=5)
    torch.testing.assert_close(again, fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], index, [0.0, 0.5],
                                                                 dropout_seed=5))


def test_rows_are_grouped_as_runs_or_gathered():
    runs = mixed.group_rows(torch.tensor([0, 0, 1, 1, -1, 0]))
    assert [(g.adapter, g.rows) for g in runs] == [(0, slice(0, 2)), (1, slice(2, 4)), (0, slice(5, 6))]
    scattered = mixed.group_rows(torch.tensor([0, 1] * 10))
    assert [g.adapter for g in scattered] == [0, 1]
    assert torch.equal(scattered[0].rows, torch.arange(0, 20, 2))


def test_a_layer_takes_peft_adapter_names():
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(16, 12), r=2, init_lora_weights=False, adapter_name="a")
    layer.add_adapter("b", r=4, lora_alpha=3, init_lora_weights=False, use_dora=True)
    x = torch.randn(3, 5, 16)
    y = layer(x, adapter_names=["b", "__base__", "a"])
    alone = {}
    for name in ("a", "b"):
        layer.set_adapter(name)
        alone[name] = layer(x)
    torch.testing.assert_close(y[0], alone["b"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1], layer.base_layer(x[1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[2], alone["a"][2], rtol=1e-5, atol=1e-6)


def peft_four_adapters():
    targets = ["q_proj", "v_proj", "o_proj", "up_proj"]
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                                             init_lora_weights=False), adapter_name="a")
    for name, r, alpha, where in (("b", 4, 8, targets), ("c", 8, 4, ["q_proj", "v_proj"]), ("d", 3, 6, targets)):
        model.add_adapter(name, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=where,
                                                init_lora_weights=False))
    return model.eval()


@pytest.mark.parametrize("tokens", [7, 16])  # 16: each sequence through the batched path
def test_model_mixed_batch_equals_peft_adapter_names(tokens):
    theirs = peft_four_adapters()
    ids = torch.randint(0, 97, (6, tokens), generator=torch.Generator().manual_seed(2))
    names = ["a", "__base__", "c", "d", "b", "c"]
    with torch.no_grad():
        want = theirs(input_ids=ids, adapter_names=names).logits
    ours = fastpeft.from_peft(copy.deepcopy(theirs))
    with torch.no_grad(), fastpeft.mixed_batch(ours, names):
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(layer.batch_adapter_names is None for layer in fastpeft.lora_layers(ours).values())
    with torch.no_grad():  # outside the block: the active adapter again, as PEFT runs without adapter_names
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [6, 16])
def test_several_adapters_train_together_as_each_alone(tokens):
    """Each adapter's gradients from a mixed batch equal those of training it alone on its own samples."""
    model = tiny_llama()
    for name, r in (("a", 2), ("b", 4), ("c", 3), ("d", 2)):
        fastpeft.apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=r, init_lora_weights=False, adapter_name=name)
    model.train()
    ids = torch.randint(0, 97, (8, tokens), generator=torch.Generator().manual_seed(3))
    names = ["a", "b", "c", "d", "d", "c", "b", "a"]

    def loss_of(m, rows):
        logits = m(input_ids=ids[rows]).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[rows].flatten(), reduction="sum")
    with fastpeft.mixed_batch(model, names):
        loss_of(model, list(range(8))).backward()
    together = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert len(together) == 4 * 3 * 2 * 2  # every adapter's A and B on every layer
    for name in "abcd":
        model.zero_grad()
        fastpeft.set_adapter(model, name)
        loss_of(model, [i for i, n in enumerate(names) if n == name]).backward()
        for pname, p in model.named_parameters():
            if f"adapters.{name}." in pname:
                assert rel_err(together[pname], p.grad) <= 1e-5, pname


@pytest.mark.parametrize("call,error,match", [
    (lambda layer, x: layer(x, adapter_names=["a", "a"]), ValueError, "x has 3 samples, adapter_names has 2"),
    (lambda layer, x: layer(x, adapter_names=["a", "zz", "a"]), ValueError, r"\['zz'\], not adapters of this layer"),
    (lambda layer, x: layer(x, adapter_names="a"), TypeError, "adapter_names must be a list"),
    (lambda layer, x: layer(x[0], adapter_names=["a"] * 16), ValueError, "needs x of shape"),
])
def test_bad_adapter_names_are_named(call, error, match):
    layer = fastpeft.LoraLinear(nn.Linear(16, 12), r=2, adapter_name="a")
    with pytest.raises(error, match=match):
        call(layer, torch.randn(3, 16))


def test_the_base_name_is_no_adapter_name():
    """"__base__" in adapter_names means the base layer, so no adapter may carry that name, by any way of adding one."""
    match = "adapter_name '__base__' is reserved"
    base = nn.Linear(16, 12)
    with pytest.raises(ValueError, match=match):
        fastpeft.LoraLinear(base, r=2, adapter_name="__base__")
    layer = fastpeft.LoraLinear(base, r=2, adapter_name="a")
    with pytest.raises(ValueError, match=match):
        layer.add_adapter("__base__", r=2)
    with pytest.raises(ValueError, match=match):
        fastpeft.LoraLinear.from_adapters(base, {"__base__": layer.adapters["a"]}, "__base__")
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 12))
    with pytest.raises(ValueError, match=match):
        fastpeft.apply_lora(model, ["0"], r=2, adapter_name="__base__")
    assert all(type(m) is nn.Linear for m in model)
    fastpeft.apply_lora(model, ["0"], r=2, adapter_name="a")
    with pytest.raises(ValueError, match=match):
        fastpeft.apply_lora(model, ["0", "1"], r=2, adapter_name="__base__")
    assert list(model[0].adapters) == ["a"] and type(model[1]) is nn.Linear
    assert list(layer.adapters) == ["a"]


def test_bad_functional_input_is_named_and_changes_nothing():
    K, N = 8, 6
    x, w = torch.randn(4, K), torch.randn(N, K)
    As, Bs = adapters(K, N, [2, 3])
    with pytest.raises(ValueError, match=r"adapter_index values must be in \[-1, 1\]"):
        fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.tensor([0, 2, 1, -1]))
    with pytest.raises(ValueError, match="adapter_index must have x's leading shape"):
        fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="adapter_index must be an integer tensor"):
        fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.zeros(4))
    with pytest.raises(ValueError, match=r"adapter 1: lora_B must have shape \(out_features=6, r=3\)"):
        fastpeft.lora_linear_mixed(x, w, None, As, [Bs[0], Bs[0]], [1.0, 1.0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="scalings must be a list of 2 entries"):
        fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0], torch.zeros(4, dtype=torch.long))
    with pytest.raises(fastpeft.BackendUnavailableError, match="(?s)backend 'cuda' cannot run.*forward-only"):
        fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.zeros(4, dtype=torch.long), backend="cuda")


def test_mixed_batch_refuses_unknown_names_and_merged_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    fastpeft.apply_lora(model, ["0", "1"], r=2, adapter_name="a")
    with pytest.raises(ValueError, match=r"\['nope'\], adapters of no layer"):
        with fastpeft.mixed_batch(model, ["a", "nope"]):
            pass
    model[1].merge()
    with pytest.raises(RuntimeError, match="unmerge them before a mixed batch"):
        with fastpeft.mixed_batch(model, ["a", "a"]):
            pass
    assert all(layer.batch_adapter_names is None for layer in fastpeft.lora_layers(model).values())


def test_batched_path_edges_absent_adapters_all_base_and_no_double_backward():
    K, N = 8, 6
    w = torch.randn(N, K)
    As = [torch.randn(2, K, requires_grad=True), torch.randn(4, K, requires_grad=True)]
    Bs = [torch.randn(N, 2, requires_grad=True), torch.randn(N, 4, requires_grad=True)]
    x = torch.randn(2, 16, K, requires_grad=True)
    y = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.zeros(2, 16, dtype=torch.long))
    y.sum().backward()  # adapter 1 (rank 4, above the padding of the ranks present) has no samples: zeros
    assert torch.equal(As[1].grad, torch.zeros_like(As[1])) and torch.equal(Bs[1].grad, torch.zeros_like(Bs[1]))
    base = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.full((2, 16), -1))
    torch.testing.assert_close(base, x @ w.t())
    with pytest.raises(RuntimeError, match="lora_linear_mixed: double backward"):
        y = fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 1.0], torch.zeros(2, 16, dtype=torch.long))
        torch.autograd.grad(y.sum(), x, create_graph=True)
    empty = fastpeft.lora_linear_mixed_reference(torch.randn(0, 5, K), w, None, As, Bs, [1.0, 1.0],
                                                 torch.zeros(0, 5, dtype=torch.long))
    assert empty.shape == (0, 5, N)


@pytest.mark.parametrize("tokens", [4, 16])
def test_mixed_batch_under_autocast(tokens):
    layer = fastpeft.LoraLinear(nn.Linear(16, 12), r=2, adapter_name="a", init_lora_weights=False)
    layer.add_adapter("b", r=4, init_lora_weights=False)
    x = torch.randn(3, tokens, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, adapter_names=["a", "b", "__base__"])
    assert y.dtype == torch.bfloat16
    want = layer(x, adapter_names=["a", "b", "__base__"])
    assert rel_err(y, want) <= 1e-2


@needs_triton
@pytest.mark.parametrize("B,T,K,N,ranks,p,dtype", [
    (6, 5, 40, 36, [2, 4, 3], 0.0, torch.float32),   # rows scattered over three adapters and the base
    (5, 16, 48, 40, [4, 16], 0.0, torch.float32),    # ranks padded to the largest
    (4, 9, 40, 36, [3, 5], 0.3, torch.float32),      # dropout per adapter, masks regenerated in backward
    (6, 7, 32, 40, [4, 8, 2], 0.0, torch.bfloat16),  # fp32 adapters on a bf16 base
], ids=["scattered", "padded-ranks", "dropout", "bf16"])
def test_triton_tiles_match_the_reference(B, T, K, N, ranks, p, dtype):
    """The fused kernels with per-tile adapter tables: shrink, seeded GEMM, dY pass, dA and the dX GEMM each read a
    tile's rows and adapter from the tables; every gradient against float64 with the kernels' own masks."""
    device = TRITON_DEVICE
    g = torch.Generator().manual_seed(B * T)
    x = torch.randn(B, T, K, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(N, K, generator=g) / 5).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=g).to(device=device, dtype=dtype).requires_grad_()
    As, Bs = adapters(K, N, ranks, seed=B)
    As = [a.detach().to(device).requires_grad_() for a in As]
    Bs = [t.detach().to(device).requires_grad_() for t in Bs]
    scalings, ps = [0.5 + i for i in range(len(ranks))], [p] * len(ranks)
    index = torch.randint(-1, len(ranks), (B, T), generator=g).to(device)
    y = fastpeft.lora_linear_mixed(x, w, b, As, Bs, scalings, index, ps, backend="triton", dropout_seed=3)
    dy = torch.randn(y.shape, generator=g).to(device=device, dtype=dtype)
    y.backward(dy)
    keep = None
    if p:
        keep = [fastpeft.dropout_mask(3, (B * T, K), p, "triton", device).reshape(B, T, K).cpu()] * len(ranks)
    x64, b64 = f64(x).cpu(), f64(b).cpu()
    x64.retain_grad()
    b64.retain_grad()
    A64 = [t.detach().double().cpu().requires_grad_() for t in As]
    B64 = [t.detach().double().cpu().requires_grad_() for t in Bs]
    ref = fastpeft.lora_linear_mixed_reference(x64, w.double().cpu(), b64, A64, B64, scalings, index.cpu(), keep, ps)
    ref.backward(dy.double().cpu())
    budget = 1e-5 if dtype == torch.float32 else 1e-2
    pairs = [(y, ref), (x.grad, x64.grad), (b.grad, b64.grad)]
    pairs += [(t.grad, r.grad) for t, r in zip(As + Bs, A64 + B64, strict=True)]
    for got, want in pairs:
        if want is None:  # an adapter without rows
            assert not got.abs().sum()
        else:
            assert rel_err(got, want) <= budget


@needs_triton
def test_triton_refuses_dora_in_a_mixed_batch_by_name():
    K, N = 8, 6
    x, w = torch.randn(2, 4, K), torch.randn(N, K)
    As, Bs = adapters(K, N, [2])
    m = fastpeft.dora_weight_norm(w, As[0].detach(), Bs[0].detach(), 1.0)
    with pytest.raises(fastpeft.BackendUnavailableError, match="DoRA adapters in a mixed batch run on the torch"):
        fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0], torch.zeros(2, 4, dtype=torch.long), backend="triton",
                                   magnitudes=[m])


def test_the_cuda_decode_launch_gets_the_stacked_sizes(monkeypatch):
    """What the CUDA decode kernel is handed for a mixed batch, checked on the CPU with a stand-in for fastpeft._C:
    the layer's N, and R = adapters present × the largest rank (the stack's rows), not the stacked B's shape."""
    import types

    from fastpeft import cuda_ext
    calls = []

    class FakeC:
        def lora_linear_decode(self, **kwargs):
            calls.append(kwargs)
    monkeypatch.setattr(cuda_ext, "load", lambda: (FakeC(), None))
    monkeypatch.setattr(cuda_ext, "decode_reasons", lambda *args: [])
    monkeypatch.setattr(cuda_ext, "_counters", lambda device, stream: torch.zeros(3, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    K, N = 64, 48
    As, Bs = adapters(K, N, [16, 8, 4, 2])
    y = mixed._decode(torch.randn(5, K), torch.randn(N, K), torch.randn(N), As, Bs, [1.0, 2.0, 3.0, 4.0],
                      torch.tensor([0, 1, 2, -1, 1]))
    assert y.shape == (5, N)
    launch = calls[-1]
    assert (launch["M"], launch["K"], launch["N"], launch["R"], launch["adapter_rank"]) == (5, K, N, 3 * 16, 16)


def test_the_mixed_op_chooses_its_backend_from_its_table(monkeypatch):
    """The backend of a mixed batch is decided by select_backend over MIXED_BACKENDS, as for every op: a reason the
    table's entry gives is what refuses an explicit backend, and the entry's forward is what runs."""
    K, N = 8, 6
    x, w = torch.randn(4, K), torch.randn(N, K)
    As, Bs = adapters(K, N, [2, 3])
    index = torch.tensor([0, 1, -1, 1])
    ran = []
    entry = mixed.MIXED_BACKENDS["torch"]
    monkeypatch.setitem(mixed.MIXED_BACKENDS, "torch", dataclasses.replace(
        entry, forward=lambda call: ran.append(call.index.tolist()) or entry.forward(call),
        reasons=lambda *call: ["refused by the table"] if len(call[1]) > 2 else []))
    want = fastpeft.lora_linear_mixed_reference(x, w, None, As, Bs, [1.0, 2.0], index)
    torch.testing.assert_close(fastpeft.lora_linear_mixed(x, w, None, As, Bs, [1.0, 2.0], index, backend="torch"), want)
    assert ran == [[0, 1, -1, 1]]
    As3, Bs3 = adapters(K, N, [2, 3, 1])
    with pytest.raises(fastpeft.BackendUnavailableError, match="backend 'torch' cannot run this call:\n  - refused by"):
        fastpeft.lora_linear_mixed(x, w, None, As3, Bs3, [1.0, 2.0, 3.0], index, backend="torch")
