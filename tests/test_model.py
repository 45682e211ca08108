"""apply_lora / merge_and_unload over a small multi-layer model."""
import copy
import importlib.util

import pytest
import torch
from conftest import fit
from torch import nn

import fastpeft


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return h + self.mlp(self.norm(h))


class TinyModel(nn.Module):
    def __init__(self, d=24, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def test_only_lora_parameters_train_and_loss_falls():
    torch.manual_seed(0)
    model = TinyModel()
    fastpeft.apply_lora(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)
    assert isinstance(model.layers[0].q_proj, fastpeft.LoraLinear)
    assert isinstance(model.layers[1].v_proj, fastpeft.LoraLinear)
    assert isinstance(model.layers[0].mlp[0], nn.Linear) and not isinstance(model.layers[0].mlp[0], fastpeft.LoraLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 blocks × (q, v) × (A, B)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, target = torch.randn(64, 24), torch.randn(64, 3)
    losses = fit(model, x, target, 30)
    assert losses[-1] < 0.9 * losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_regex_targets_and_merge_and_unload():
    torch.manual_seed(0)
    model = TinyModel()
    original = copy.deepcopy(model)
    fastpeft.apply_lora(model, r"layers\.\d+\.mlp\.[02]", r=4, init_lora_weights=False)
    assert len(fastpeft.lora_layers(model)) == 4
    x = torch.randn(5, 24)
    with torch.no_grad():
        with_lora = model(x)
        assert not torch.allclose(with_lora, original(x))
        merged = fastpeft.merge_and_unload(model)
        assert merged is model and not fastpeft.lora_layers(model)
        assert all(type(m) is nn.Linear for m in (model.layers[0].mlp[0], model.layers[1].mlp[2]))
        assert torch.allclose(model(x), with_lora, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_of_a_single_layer():
    layer = fastpeft.LoraLinear(nn.Linear(8, 4), r=2, init_lora_weights=False)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y = layer(x)
        plain = fastpeft.merge_and_unload(layer)
        assert type(plain) is nn.Linear and torch.allclose(plain(x), y, atol=1e-6)


def test_bad_targets_leave_model_unchanged():
    model = TinyModel()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="q_porj"):
        fastpeft.apply_lora(model, ["q_proj", "q_porj"])
    with pytest.raises(ValueError, match="matches no module"):
        fastpeft.apply_lora(model, r"nothing\.here")
    with pytest.raises(ValueError, match="regular expression"):
        fastpeft.apply_lora(model, "q_proj(")
    with pytest.raises(TypeError, match="LayerNorm"):
        fastpeft.apply_lora(model, ["q_proj", "norm"])
    with pytest.raises(ValueError, match="r must be a positive integer"):
        fastpeft.apply_lora(model, ["q_proj"], r=0)
    with pytest.raises(ValueError, match="target_modules must be"):
        fastpeft.apply_lora(model, [])
    assert not fastpeft.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_applying_the_same_adapter_twice_is_refused():
    model = TinyModel()
    fastpeft.apply_lora(model, ["q_proj"])
    # Names inside an existing LoraLinear (its base_layer) are not candidates, so nothing new matches.
    with pytest.raises(ValueError, match="match no module"):
        fastpeft.apply_lora(model, ["base_layer"])
    with pytest.raises(TypeError, match="already has an adapter named 'default'"):
        fastpeft.apply_lora(model, ["q_proj"])


def test_lora_and_bottleneck_adapters_train_together():
    model = TinyModel()
    fastpeft.apply_lora(model, ["q_proj"], r=2)
    model.layers[0].q_proj.adapters["default"].requires_grad_(False)  # a choice the next calls must keep
    fastpeft.apply_adapters(model, ["v_proj"], "pfeiffer")
    fastpeft.apply_lora(model, ["v_proj.module"], r=2, adapter_name="b")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    kinds = {n.split(".adapter")[0].rsplit(".", 1)[-1] + (".lora" if ".adapters." in n else ".bottleneck")
             for n in trainable}
    assert kinds == {"q_proj.lora", "v_proj.bottleneck", "module.lora"}
    assert not any(n.startswith("layers.0.q_proj.") for n in trainable)
    assert all(".adapter" in n for n in trainable)


def test_multihead_attention_out_proj_is_refused():
    model = nn.Sequential(nn.MultiheadAttention(16, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        fastpeft.apply_lora(model, ["out_proj"])


def test_named_adapters_over_a_model():
    torch.manual_seed(0)
    model = TinyModel()
    x = torch.randn(4, 24)
    with torch.no_grad():
        base = model(x)
    fastpeft.apply_lora(model, ["q_proj"], r=2, init_lora_weights=False)
    fastpeft.apply_lora(model, ["q_proj", "v_proj"], r=4, init_lora_weights=False, adapter_name="task_b")
    layer = model.layers[0].q_proj
    assert list(layer.adapters) == ["default", "task_b"] and layer.active_adapter == "default"
    assert list(model.layers[0].v_proj.adapters) == ["task_b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapters.default." in n for n in trainable) and any(".adapters.task_b." in n for n in trainable)
    with torch.no_grad():
        out_default = model(x)
        fastpeft.set_adapter(model, "task_b")
        out_b = model(x)
        assert layer.r == 4 and not torch.allclose(out_default, out_b)
        for lora in fastpeft.lora_layers(model).values():
            lora.disable_adapters()
        assert torch.equal(model(x), base)
        for lora in fastpeft.lora_layers(model).values():
            lora.enable_adapters()
        assert torch.equal(model(x), out_b)
    fastpeft.delete_adapter(model, "default")
    assert list(layer.adapters) == ["task_b"]
    with pytest.raises(KeyError, match="no LoRA layer has an adapter named 'nope'"):
        fastpeft.set_adapter(model, "nope")


def _two_layer_adapters():
    """q_proj of both blocks has adapters "a" and "b"; block 1's has "a" merged."""
    torch.manual_seed(0)
    model = TinyModel()
    fastpeft.apply_lora(model, ["q_proj"], r=2, init_lora_weights=False, adapter_name="a")
    fastpeft.apply_lora(model, ["q_proj"], r=2, init_lora_weights=False, adapter_name="b")
    model.layers[1].q_proj.merge()
    return model


def test_set_adapter_over_a_model_is_all_or_nothing():
    model = _two_layer_adapters()
    with pytest.raises(RuntimeError, match=r"layers\.1\.q_proj: adapter 'a' is merged"):
        fastpeft.set_adapter(model, "b")
    assert [m.active_adapter for m in fastpeft.lora_layers(model).values()] == ["a", "a"]
    model.layers[1].q_proj.unmerge()
    fastpeft.set_adapter(model, "b")
    assert [m.active_adapter for m in fastpeft.lora_layers(model).values()] == ["b", "b"]


def test_delete_adapter_over_a_model_is_all_or_nothing():
    model = _two_layer_adapters()
    model.layers[1].q_proj.delete_adapter("a")  # "b" is now the only adapter there
    with pytest.raises(ValueError, match=r"layers\.1\.q_proj: 'b' is the only adapter"):
        fastpeft.delete_adapter(model, "b")
    assert list(model.layers[0].q_proj.adapters) == ["a", "b"]
    fastpeft.delete_adapter(model, "a")
    assert list(model.layers[0].q_proj.adapters) == ["b"]


def test_apply_lora_refuses_linear_subclasses_with_their_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):  # no forward of its own: computes exactly x Wᵀ + b, so it can be wrapped
        pass

    model = nn.Sequential(Scaled(8, 8), Plain(8, 8))
    with pytest.raises(TypeError, match=r"0: a Scaled, an nn.Linear subclass with its own forward"):
        fastpeft.apply_lora(model, ["0", "1"])
    assert type(model[0]) is Scaled and type(model[1]) is Plain
    fastpeft.apply_lora(model, ["1"])
    assert isinstance(model[1], fastpeft.LoraLinear)


def test_apply_lora_on_lora_layers_checks_every_argument_first():
    torch.manual_seed(0)
    model = TinyModel()
    fastpeft.apply_lora(model, ["q_proj"], r=2)
    model.head.requires_grad_(True)  # the user trains the head too
    for kwargs, error in [({"r": 0}, ValueError), ({"lora_dropout": 2.0}, ValueError),
                          ({"backend": "no-such-backend"}, ValueError)]:
        with pytest.raises(error):
            fastpeft.apply_lora(model, ["q_proj"], adapter_name="b", **kwargs)
        assert model.head.weight.requires_grad
        assert all(list(m.adapters) == ["default"] for m in fastpeft.lora_layers(model).values())
    fastpeft.apply_lora(model, ["q_proj"], adapter_name="b", r=3, backend="torch")
    assert model.layers[0].q_proj.backend == "torch" and model.layers[0].q_proj.adapters["b"].r == 3


def test_apply_adapters_after_a_module_named_adapter():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter = nn.Linear(8, 8)

        def forward(self, x):
            return self.adapter(x)

    model = nn.Sequential(Block())
    fastpeft.apply_adapters(model, ["adapter"], config=dict(bottleneck=2))
    assert isinstance(model[0].adapter, fastpeft.AdaptedModule)
    with pytest.raises(TypeError, match="only parts of modules that carry an adapter already"):
        fastpeft.apply_adapters(model, r"0\.adapter\.module")


def test_apply_lora_refuses_linears_whose_forward_it_would_bypass():
    hooked, replaced, parametrized = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    hooked.register_forward_pre_hook(lambda module, args: (args[0] * 0,))
    replaced.forward = lambda x: x
    nn.utils.parametrizations.weight_norm(parametrized)
    for layer, match in [(hooked, "forward hooks"), (replaced, "forward was replaced on the instance"),
                         (parametrized, "parametrized nn.Linear")]:
        model = nn.Sequential(layer)
        with pytest.raises(TypeError, match=match):
            fastpeft.apply_lora(model, ["0"])
        assert model[0] is layer


def test_adapters_inside_adapters_are_refused_and_removed_innermost_first():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.Linear(8, 8)

        def forward(self, x):
            return self.ffn(x)

    model = nn.Sequential(Block())
    fastpeft.apply_adapters(model, ["ffn"], config=dict(bottleneck=2))
    with pytest.raises(ValueError, match="adapters nested in adapters are not supported"):
        fastpeft.apply_adapters(model, r"0", config=dict(bottleneck=2), hidden_size=8)
    assert type(model[0]) is Block
    # Nested by hand, they still come out whole.
    inner = model[0]
    model[0] = fastpeft.AdaptedModule(inner, fastpeft.BottleneckAdapter(8, bottleneck=2))
    fastpeft.remove_adapters(model)
    assert model[0] is inner and type(inner.ffn) is nn.Linear


class Shared(nn.Module):
    """One nn.Linear reachable under two names, run at both places."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.c = nn.Linear(8, 8)

    def forward(self, x):
        return self.c(self.b(torch.tanh(self.a(x))))


@pytest.mark.parametrize("target", ["a", "b", ["a", "b"], r"(a|b)"])
def test_a_layer_used_at_two_places_gets_lora_at_both(target):
    """Targeting a shared layer by either name (or both) wraps it once, at every place: both call sites run LoRA."""
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(3, 8)
    fastpeft.apply_lora(model, target, r=2, init_lora_weights=False)
    assert isinstance(model.a, fastpeft.LoraLinear) and model.a is model.b
    layer = model.a
    a = layer.adapter
    def lora(h):
        return fastpeft.lora_linear_reference(h, layer.weight, layer.bias, a.lora_A, a.lora_B, a.scaling)
    torch.testing.assert_close(model(x), model.c(lora(torch.tanh(lora(x)))))
    fastpeft.merge_and_unload(model)
    assert type(model.a) is nn.Linear and model.a is model.b


def test_a_shared_layer_loads_from_files_and_peft(tmp_path):
    torch.manual_seed(0)
    base = Shared()
    unshared = copy.deepcopy(base)
    unshared.b = nn.Linear(8, 8)
    fastpeft.save_adapter(fastpeft.apply_lora(unshared, ["a", "c"], r=2, init_lora_weights=False), tmp_path)
    loaded = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)  # (a deep copy keeps the sharing)
    assert isinstance(loaded.b, fastpeft.LoraLinear) and loaded.a is loaded.b
    x = torch.randn(3, 8)
    lora_a = unshared.a
    torch.testing.assert_close(loaded(x), unshared.c(lora_a(torch.tanh(lora_a(x)))))
    model = loaded
    fastpeft.apply_adapters(model, ["b"], config=dict(bottleneck=2))
    assert isinstance(model.a, fastpeft.AdaptedModule) and model.a is model.b
    fastpeft.remove_adapters(model)
    assert isinstance(model.a, fastpeft.LoraLinear) and model.a is model.b
    if importlib.util.find_spec("peft") is not None:
        with pytest.raises(ValueError, match=r"\[\['a', 'b'\]\] are each one module used at several places"):
            fastpeft.to_peft(model)
        assert isinstance(model.a, fastpeft.LoraLinear) and model.a is model.b
    with pytest.raises(ValueError, match=r"\[\['a', 'b'\]\] are each one module used at several places; PEFT's"):
        fastpeft.save_adapter(model, tmp_path / "refused")  # PEFT would load it at one place only
    assert not (tmp_path / "refused").exists()


def test_a_layer_that_is_also_a_lora_base_is_not_wrapped_again(tmp_path):
    """PEFT's layout of a shared layer targeted at one name: ``a`` is LoRA over it, ``b`` the bare layer. Wrapping
    ``b`` would put a LoRA layer inside ``a``'s (whose merge_and_unload would leave one behind): refused."""
    model = Shared()
    linear = model.a
    model.a = fastpeft.LoraLinear(linear, r=2)
    before = {n: type(m) for n, m in model.named_modules(remove_duplicate=False)}
    with pytest.raises(TypeError, match=r"b: is also the base layer at a.base_layer"):
        fastpeft.apply_lora(model, ["b"], r=2, adapter_name="x")
    other = fastpeft.apply_lora(Shared(), ["c"], r=2)
    other.b = nn.Linear(8, 8)  # (a file with a key for b, saved from a model where b is its own layer)
    fastpeft.save_adapter(fastpeft.apply_lora(other, ["b"], r=2, adapter_name="default"), tmp_path)
    with pytest.raises(fastpeft.AdapterFileError, match=r"b: also the base layer at a.base_layer"):
        fastpeft.load_adapter(model, tmp_path)
    fastpeft.quantize_nf4(model)  # the LoRA layer's base is not quantised through its other name either
    assert {n: type(m) for n, m in model.named_modules(remove_duplicate=False)} == {**before, "c": fastpeft.NF4Linear}
