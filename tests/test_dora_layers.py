"""DoRA layers: LoraLinear(use_dora=True) and apply_lora(use_dora=True) against HF PEFT's DoRA (outputs and gradients,
on a layer and on a tiny transformers Llama), PEFT's files and models both ways, merge / unmerge, the eval-mode norm
cache, DoRA beside plain LoRA adapters, and torch.compile."""
import copy
import importlib

import pytest
import torch
from conftest import needs_triton, rel_err, tiny_llama
from torch import nn

import fastpeft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
op = importlib.import_module("fastpeft.ops.lora_linear")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def ids(seed=1):
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))


def trained_looking(model, seed=3):
    """Move every DoRA magnitude off its initial norms, so the column scale is not 1 anywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return model


def peft_dora_llama(r=4, **extra):
    config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=TARGETS, use_dora=True, init_lora_weights=False,
                             **extra)
    return trained_looking(peft.get_peft_model(tiny_llama(), config, adapter_name="task"))


def grads_by_name(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def fastpeft_name(peft_name):
    """A PEFT parameter name as the converted fastpeft model names it."""
    name = peft_name.removeprefix("base_model.model.")
    for kind in ("lora_A", "lora_B"):
        name = name.replace(f".{kind}.task.weight", f".adapters.task.{kind}")
    return name.replace(".lora_magnitude_vector.task.weight", ".adapters.task.lora_magnitude_vector")


def test_a_dora_layer_starts_as_its_base_and_as_peft_initialises():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    layer = fastpeft.LoraLinear(copy.deepcopy(base), r=4, lora_alpha=8, use_dora=True)
    m = layer.lora_magnitude_vector
    assert layer.use_dora and m.shape == (24,) and m.requires_grad and m.dtype == torch.float32
    torch.testing.assert_close(m.detach(), torch.linalg.vector_norm(base.weight.detach(), dim=1))
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        fastpeft.LoraLinear(nn.Linear(4, 4), use_dora="yes")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_equals_peft_dora_forward_and_gradients(dtype):
    torch.manual_seed(0)
    base = nn.Linear(48, 40).to(dtype)
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=6, lora_alpha=12, target_modules=["0"], use_dora=True,
                                                 init_lora_weights=False), adapter_name="task")
    trained_looking(theirs)
    ours = fastpeft.from_peft(copy.deepcopy(theirs))
    assert isinstance(ours[0], fastpeft.LoraLinear) and ours[0].use_dora
    x = torch.randn(3, 7, 48).to(dtype)
    for training in (True, False):
        theirs.train(training)
        ours.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = theirs(xa), ours(xb)
        budget = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(yb, ya) <= budget
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        assert rel_err(xb.grad, xa.grad) <= budget
        want = grads_by_name(theirs)
        got = grads_by_name(ours)
        for name, grad in want.items():
            assert rel_err(got[fastpeft_name(name)], grad) <= budget, name
        theirs.zero_grad()
        ours.zero_grad()


def test_llama_from_peft_equals_peft_and_trains_the_same_parameters():
    theirs = peft_dora_llama()
    tokens = ids()
    ours = fastpeft.from_peft(copy.deepcopy(theirs))
    layers = fastpeft.lora_layers(ours)
    assert len(layers) == 2 * len(TARGETS) and all(layer.use_dora for layer in layers.values())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits,
                                   rtol=1e-5, atol=1e-5)
    theirs.train()
    ours.train()
    theirs(input_ids=tokens, labels=tokens).loss.backward()
    ours(input_ids=tokens, labels=tokens).loss.backward()
    want, got = grads_by_name(theirs), grads_by_name(ours)
    assert len(want) == len(got) == 3 * len(layers)  # A, B and m of every layer
    for name, grad in want.items():
        assert rel_err(got[fastpeft_name(name)], grad) <= 1e-4, name


def test_from_peft_holds_the_same_magnitude_parameter():
    theirs = peft_dora_llama()
    peft_m = theirs.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["task"].weight
    ours = fastpeft.from_peft(theirs)
    assert ours.model.layers[0].self_attn.q_proj.adapters["task"].lora_magnitude_vector is peft_m


def test_files_both_ways_with_peft(tmp_path):
    theirs = peft_dora_llama()
    tokens = ids()
    with torch.no_grad():
        want = theirs(input_ids=tokens).logits
    theirs.save_pretrained(tmp_path / "peft")
    ours = fastpeft.load_adapter(tiny_llama(), tmp_path / "peft" / "task" if (tmp_path / "peft" / "task").exists()
                                 else tmp_path / "peft", adapter_name="task")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)
    assert all(layer.use_dora for layer in fastpeft.lora_layers(ours).values())
    fastpeft.save_adapter(ours, tmp_path / "ours", adapter_name="task")
    from safetensors.torch import load_file
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == 2 * len(TARGETS)
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert back.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_to_peft_carries_the_magnitude_and_the_outputs():
    model = tiny_llama()
    fastpeft.apply_lora(model, TARGETS, r=4, lora_alpha=8, init_lora_weights=False, use_dora=True)
    trained_looking(model)
    tokens = ids()
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    magnitudes = [layer.lora_magnitude_vector for layer in fastpeft.lora_layers(model).values()]
    theirs = fastpeft.to_peft(model)
    assert theirs.peft_config["default"].use_dora
    held = [m.lora_magnitude_vector["default"].weight for m in theirs.modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(held) == len(magnitudes) and all(a is b for a, b in zip(held, magnitudes, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_load_refuses_a_dora_file_without_magnitudes(tmp_path):
    theirs = peft_dora_llama()
    theirs.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    path = tmp_path / "task" if (tmp_path / "task").exists() else tmp_path
    tensors = load_file(path / "adapter_model.safetensors")
    bad = {k: v for k, v in tensors.items() if not k.endswith("q_proj.lora_magnitude_vector")}
    save_file(bad, path / "adapter_model.safetensors")
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fastpeft.AdapterFileError, match="needs lora_A and lora_B and lora_magnitude_vector"):
        fastpeft.load_adapter(model, path)
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    huge = {**tensors, key: tensors[key].double().index_fill(0, torch.tensor([2]), 1e39)}  # inf once in fp32
    save_file(huge, path / "adapter_model.safetensors")
    with pytest.raises(fastpeft.AdapterFileError, match="not finite in the adapter's dtype"):
        fastpeft.load_adapter(model, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # A magnitude that training took below zero is PEFT's to write and fastpeft's to load and run.
    negative = {**tensors, key: -tensors[key]}
    save_file(negative, path / "adapter_model.safetensors")
    fastpeft.load_adapter(model, path)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids()).logits).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge_like_peft(dtype):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(48, 40).to(dtype)),
                                 peft.LoraConfig(r=6, lora_alpha=12, target_modules=["0"], use_dora=True,
                                                 init_lora_weights=False))
    trained_looking(theirs)
    ours = fastpeft.from_peft(copy.deepcopy(theirs))
    layer = ours[0]
    original = layer.weight.detach().clone()
    x = torch.randn(5, 48).to(dtype)
    with torch.no_grad():
        want = layer(x)
        theirs.base_model.model[0].merge()
        layer.merge(safe=True)
    torch.testing.assert_close(layer.weight, theirs.base_model.model[0].base_layer.weight, rtol=0, atol=0)
    with torch.no_grad():
        merged = layer(x)
    assert rel_err(merged, want) <= (1e-5 if dtype == torch.float32 else 1e-2)
    layer.unmerge()
    assert rel_err(layer.weight, original) <= (1e-6 if dtype == torch.float32 else 4e-3)


def test_merge_keeps_rows_of_magnitude_zero_and_safe_merge_refuses_overflow():
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector[3] = 0.0
    original = layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight[3], torch.zeros(16))  # scaled by 0, as PEFT merges it
    layer.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=1e-6, atol=1e-6)
    assert torch.equal(layer.weight[3], original[3])  # restored, where dividing by 0 could not
    half = fastpeft.LoraLinear(nn.Linear(16, 8).half(), r=2, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        half.lora_magnitude_vector[1] = 1e6
    before = half.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        half.merge(safe=True)
    assert torch.equal(half.weight, before) and not half.merged


def test_eval_mode_keeps_the_norm_until_w_a_or_b_change(monkeypatch):
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, init_lora_weights=False, use_dora=True).eval()
    calls = []
    real = fastpeft.layers.dora_weight_norm
    monkeypatch.setattr(fastpeft.layers, "dora_weight_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = layer(x)
        layer(x)
        assert len(calls) == 1
        layer.lora_magnitude_vector.mul_(2)  # m is not in the norm: kept, and the output follows m
        torch.testing.assert_close(layer(x) - layer.bias, 2 * (y - layer.bias))
        assert len(calls) == 1
        layer.lora_A.add_(0.1)  # an optimizer step on A: recomputed
        z = layer(x)
        assert len(calls) == 2
        want = op.lora_linear_reference(x.double(), layer.weight.double(), layer.bias.double(),
                                        layer.lora_A.double(), layer.lora_B.double(), layer.scaling,
                                        magnitude=layer.lora_magnitude_vector.double())
        torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-6)
        layer.train()(x)  # training computes it each call, in the op
        assert len(calls) == 2


def test_dora_and_plain_lora_adapters_mix_in_one_layer_and_model():
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, init_lora_weights=False, use_dora=True, adapter_name="d")
    layer.add_adapter("plain", r=3, init_lora_weights=False)
    x = torch.randn(4, 16)
    y_dora = layer(x)
    layer.set_adapter("plain")
    y_plain = layer(x)
    a = layer.adapter
    torch.testing.assert_close(y_plain, fastpeft.lora_linear_reference(x, layer.weight, layer.bias, a.lora_A,
                                                                       a.lora_B, a.scaling))
    assert not torch.allclose(y_dora, y_plain)
    model = tiny_llama()
    fastpeft.apply_lora(model, ["q_proj"], r=4, init_lora_weights=False, use_dora=True, adapter_name="d")
    fastpeft.apply_lora(model, ["q_proj", "v_proj"], r=2, init_lora_weights=False, adapter_name="p")
    q = model.model.layers[0].self_attn.q_proj
    assert q.adapters["d"].use_dora and not q.adapters["p"].use_dora


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_compiled_dora_layer_has_no_graph_break_and_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(64, 48), r=4, init_lora_weights=False, use_dora=True, backend=backend)
    trained_looking(layer)
    x = torch.randn(2, 300, 64, requires_grad=True)  # above SMALL_CALL: the fused op itself
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_eager = layer(x)
    y_eager.square().mean().backward()
    eager = [p.grad.clone() for p in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    for p in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        p.grad = None
    y_compiled = compiled(x)
    y_compiled.square().mean().backward()
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-5)
    for got, want in zip((x.grad, layer.lora_A.grad, layer.lora_B.grad, layer.lora_magnitude_vector.grad), eager,
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def dora_reference(layer, x):
    """The layer's output by the float reference, from its active adapter's tensors as they are now."""
    a = layer.adapter
    return op.lora_linear_reference(x, layer.weight, layer.bias, a.lora_A, a.lora_B, a.scaling,
                                    magnitude=a.lora_magnitude_vector)


def test_eval_norms_follow_changes_that_bypass_version_counters():
    """A fused optimizer step (or a ``.data`` edit) changes A and B without bumping their version counters: the
    norms kept for eval mode are dropped whenever the layer switches mode, as training and evaluation alternate."""
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=4, lora_alpha=8, use_dora=True)
    x = torch.randn(4, 16)
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer.lora_B.data.add_(0.5)  # what a fused kernel does: new values, the same version
        layer.lora_A.data.mul_(2.0)
    layer.eval()
    want = dora_reference(layer, x)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        layer.lora_B.data.mul_(3.0)  # in eval mode: seen after forget_norm (or a mode switch)
    layer.adapter.forget_norm()
    torch.testing.assert_close(layer(x), dora_reference(layer, x), rtol=1e-5, atol=1e-6)


def test_a_trained_magnitude_may_cross_zero_but_a_callers_may_not():
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=4, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector[3] = -0.25  # as an optimizer may leave it (PEFT runs it too)
    x = torch.randn(4, 16)
    for training in (True, False):
        layer.train(training)
        with torch.no_grad():
            y = layer(x)
        a = layer.adapter
        want = op.lora_linear_reference(x, layer.weight, layer.bias, a.lora_A, a.lora_B, a.scaling,
                                        magnitude=a.lora_magnitude_vector)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="magnitude must be finite and >= 0"):
        fastpeft.lora_linear(x, layer.weight, layer.bias, a.lora_A, a.lora_B, a.scaling,
                             magnitude=a.lora_magnitude_vector.detach())


def test_eval_dora_under_functorch_and_inference_mode():
    """Tensors without storage (torch.func) or without version counters (inference mode) are not kept, and work."""
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, init_lora_weights=False, use_dora=True, backend="torch").eval()
    params = {k: v.detach() for k, v in layer.named_parameters() if v.requires_grad}
    x = torch.randn(4, 16)
    grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    y = layer(x)
    y.sum().backward()
    for name, g in grads.items():
        torch.testing.assert_close(g, dict(layer.named_parameters())[name].grad, rtol=1e-5, atol=1e-6)
    with torch.inference_mode():
        fresh = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, init_lora_weights=False, use_dora=True).eval()
        assert torch.isfinite(fresh(x)).all() and torch.isfinite(fresh(x)).all()


def test_a_parametrized_or_pruned_magnitude_is_used():
    import torch.nn.utils.parametrize as parametrize
    import torch.nn.utils.prune as prune

    class Abs(nn.Module):
        def forward(self, m):
            return m.abs()
    x = torch.randn(4, 16)
    for change in ("parametrize", "prune"):
        torch.manual_seed(0)
        layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, use_dora=True, init_lora_weights=False)
        with torch.no_grad():
            layer.lora_magnitude_vector.mul_(-2)
        if change == "parametrize":
            parametrize.register_parametrization(layer.adapter, "lora_magnitude_vector", Abs())
        else:
            prune.l1_unstructured(layer.adapter, "lora_magnitude_vector", 0.25)
        a = layer.adapter
        want = op.lora_linear_reference(x, layer.weight, layer.bias, a.lora_A, a.lora_B, a.scaling,
                                        magnitude=a.lora_magnitude_vector)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_apply_lora_that_fails_part_way_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(0, 4))  # DoRA cannot start on a layer without inputs
    with pytest.raises(ValueError, match="in_features=0"):
        fastpeft.apply_lora(model, ["0", "1"], r=2, use_dora=True)
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) is nn.Linear for m in model)


def test_training_in_eval_mode_with_a_fused_optimizer_uses_fresh_norms():
    """A fused AdamW step changes A and B without bumping their version counters; a model trained in eval mode (no
    dropout wanted, an RL policy) must still see the new norms on every step, as PEFT does."""
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=4, lora_alpha=8, use_dora=True, init_lora_weights=False).eval()
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, fused=True)
    x = torch.randn(4, 16)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).pow(2).sum().backward()
        optimizer.step()
    want = dora_reference(layer, x)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_kept_norms_follow_an_optimizer_step(fused):
    """Backward, a no-grad eval forward (keeps the norms), an optimizer step whose kernels leave version counters
    alone (fused AdamW), another no-grad forward: the output is the reference's for the new A and B."""
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(32, 24), r=4, use_dora=True, init_lora_weights=False).eval()
    x = torch.randn(5, 32)
    layer(x).pow(2).sum().backward()
    with torch.no_grad():
        layer(x)
    optimizer = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=fused,
                                  foreach=None if fused else False)
    optimizer.step()
    want = dora_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_kept_norms_follow_a_step_whose_closure_runs_the_layer():
    """A no-grad forward inside ``step(closure)`` (logging a metric) keeps norms of the weights before the update."""
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(16, 12), r=4, use_dora=True, init_lora_weights=False).eval()
    x = torch.randn(5, 16)
    optimizer = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.1, fused=True)

    def closure():
        optimizer.zero_grad()
        loss = layer(x).pow(2).sum()
        loss.backward()
        with torch.no_grad():
            layer(x)
        return loss
    optimizer.step(closure)
    want = dora_reference(layer, x)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)


def test_frozen_adapters_keep_their_norms_across_optimizer_steps():
    """An optimizer stepping other parameters cannot change frozen A and B: their eval norms stay kept."""
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(32, 24), r=4, use_dora=True, init_lora_weights=False).eval()
    layer.requires_grad_(False)
    x = torch.randn(5, 32)
    layer(x)
    kept = layer.adapter._norm_cache
    other = nn.Parameter(torch.randn(3))
    other.grad = torch.ones(3)
    torch.optim.AdamW([other], fused=True).step()
    layer(x)
    assert layer.adapter._norm_cache is kept


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="use_rslora must be a bool"):
        fastpeft.LoraLinear(nn.Linear(8, 4), r=4, use_rslora="false")
    w = torch.randn(6, 8)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    with pytest.raises(ValueError, match="weight_sq must be a float32 or float64"):
        fastpeft.dora_weight_norm(w, a, b, 1.0, weight_sq=torch.ones(6, dtype=torch.float16))
    with pytest.raises(ValueError, match="weight_sq must be finite and >= 0"):
        fastpeft.dora_weight_norm(w, a, b, 1.0, weight_sq=-torch.ones(6))
