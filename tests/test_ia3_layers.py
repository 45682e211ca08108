"""Ia3Linear and apply_ia3 against HF PEFT's IA3 on the same weights (outputs and every vector's gradient), named
adapters, merge/unmerge, mixed batches of tasks, and what is refused."""
import copy

import pytest
import torch
from conftest import rel_err
from torch import nn

import fastpeft

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self, d=16, h=24, bias=True):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias)
        self.up = nn.Linear(h, 2 * h, bias=bias)
        self.down = nn.Linear(2 * h, d, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.q(x)) * self.k(x) + self.v(x)
        return self.down(torch.relu(self.up(h)))


def twins(seed, target, feedforward, dtype=torch.float32, bias=True):
    """A PEFT IA3 model and fastpeft's over the same weights, PEFT's random vectors copied into fastpeft's."""
    torch.manual_seed(seed)
    model = Block(bias=bias).to(dtype)
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(
        target_modules=target, feedforward_modules=feedforward, init_ia3_weights=False))
    ours = fastpeft.apply_ia3(copy.deepcopy(model), target, feedforward, init_ia3_weights=False)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                ours.get_parameter(name.removeprefix("base_model.model.")).copy_(p)
    return peft_model, ours


CONFIGS = [(["q", "k", "v", "up", "down"], ["down"]), (["k", "v", "up"], ["up"]), (r".*\.?(k|down)", r".*down"),
           (["v", "down"], [])]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("target,feedforward", CONFIGS, ids=["all", "kv-up", "regex", "no-ff"])
def test_matches_peft_ia3(seed, target, feedforward):
    peft_model, ours = twins(seed, target, feedforward, bias=seed != 1)
    x = torch.randn(3, 7, 16)
    want, got = peft_model(x), ours(x)
    assert rel_err(got, want) <= 1e-6
    want.square().mean().backward()
    got.square().mean().backward()
    ours_params = dict(ours.named_parameters())
    trained = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and sorted(n.removeprefix("base_model.model.") for n, _ in trained) == sorted(
        n for n, p in ours.named_parameters() if p.requires_grad)
    for name, p in trained:
        mine = ours_params[name.removeprefix("base_model.model.")]
        assert mine.shape == p.shape
        assert rel_err(mine.grad, p.grad) <= 1e-5, name


def test_bf16_base_keeps_fp32_vectors_like_peft():
    peft_model, ours = twins(3, ["k", "down"], ["down"], dtype=torch.bfloat16)
    assert ours.k.ia3_l["default"].dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    assert rel_err(ours(x), peft_model(x)) <= 1e-2


@pytest.mark.parametrize("feedforward", [False, True])
def test_merge_and_unmerge(feedforward):
    torch.manual_seed(0)
    layer = fastpeft.Ia3Linear(nn.Linear(12, 10), feedforward, init_ia3_weights=False)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    x = torch.randn(5, 12)
    y = layer(x)
    layer.merge()
    assert layer.merged and rel_err(layer(x), y) <= 1e-6
    assert rel_err(layer.bias, b if feedforward else b * layer.ia3_l_vector) <= 1e-7
    layer.unmerge()
    assert not layer.merged and rel_err(layer.weight, w) <= 1e-7 and rel_err(layer.bias, b) <= 1e-7
    assert rel_err(layer(x), y) <= 1e-6


def test_unmerge_refused_where_the_vector_has_zeros():
    layer = fastpeft.Ia3Linear(nn.Linear(6, 4))
    with torch.no_grad():
        layer.ia3_l["default"][2] = 0.0
    layer.merge()
    merged = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"zeros at \[2\].*rows of the weight"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.weight, merged)


def test_deleting_a_merged_adapter_that_cannot_be_unmerged_changes_no_layer():
    """fastpeft.delete_adapter asks every layer first: one layer's refusal (zeros in its merged vector) must not
    leave the layers before it with the adapter deleted."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    fastpeft.apply_ia3(model, ["0", "1"])
    fastpeft.apply_ia3(model, ["0", "1"], adapter_name="b")
    fastpeft.set_adapter(model, "b")
    with torch.no_grad():
        model[0].ia3_l["b"].fill_(2.0)
        model[1].ia3_l["b"][0] = 0.0
    model[0].merge()
    model[1].merge()
    weights = [layer.weight.detach().clone() for layer in model]
    with pytest.raises(ValueError, match=r"delete_adapter\('b'\) refused, model unchanged \(1: .*zeros at \[0\]"):
        fastpeft.delete_adapter(model, "b")
    for layer, weight in zip(model, weights, strict=True):
        assert list(layer.ia3_l) == ["default", "b"] and layer.merged_adapter == "b"
        assert torch.equal(layer.weight, weight)
    with pytest.raises(ValueError, match=r"zeros at \[0\]"):
        model[1].delete_adapter("b")
    model[0].delete_adapter("b")  # (unmerged first)
    assert list(model[0].ia3_l) == ["default"] and not model[0].merged


@pytest.mark.parametrize("feedforward", [False, True], ids=["output-scale", "input-scale"])
def test_a_flat_vector_merges_the_side_forward_scales(feedforward):
    """Forward reads the vector flattened; merge must scale W's rows (output) or columns (input) with it too, also on
    a square layer, where a flat (N,) vector would broadcast along the other side."""
    layer = fastpeft.Ia3Linear(nn.Linear(4, 4), feedforward=feedforward)
    layer.ia3_l["default"] = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.randn(2, 4)
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        assert rel_err(layer(x), want) <= 1e-6
        layer.unmerge()
        assert rel_err(layer(x), want) <= 1e-6


def test_safe_merge_refuses_overflow_and_changes_nothing():
    base = nn.Linear(4, 3).half()
    with torch.no_grad():
        base.weight.fill_(60000.0)
    layer = fastpeft.Ia3Linear(base)
    with torch.no_grad():
        layer.ia3_l["default"].fill_(2.0)
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge(safe=True)
    assert not layer.merged and (layer.weight == 60000.0).all()


def test_named_adapters_and_model_tools():
    torch.manual_seed(1)
    model = fastpeft.apply_ia3(Block(), ["k", "down"], ["down"], init_ia3_weights=False)
    fastpeft.apply_ia3(model, ["k", "down"], ["down"], init_ia3_weights=False, adapter_name="other")
    assert list(model.k.ia3_l) == ["default", "other"] and model.k.active_adapter == "default"
    assert set(fastpeft.ia3_layers(model)) == {"k", "down"} and set(fastpeft.adapter_layers(model)) == {"k", "down"}
    x = torch.randn(2, 3, 16)
    y_default = model(x)
    fastpeft.set_adapter(model, "other")
    y_other = model(x)
    assert not torch.allclose(y_default, y_other)
    with fastpeft.mixed_batch(model, ["default", "other"]):
        mixed = model(x)
    assert rel_err(mixed[0], y_default[0]) <= 1e-6 and rel_err(mixed[1], y_other[1]) <= 1e-6
    fastpeft.delete_adapter(model, "other")
    assert list(model.k.ia3_l) == ["default"] and rel_err(model(x), y_default) <= 1e-6
    model.k.disable_adapters()
    assert rel_err(model.k(x), model.k.base_layer(x)) == 0
    model.k.enable_adapters()
    merged = fastpeft.merge_and_unload(model)
    assert type(merged.k) is nn.Linear and rel_err(merged(x), y_default) <= 1e-6


def test_only_vectors_train():
    model = fastpeft.apply_ia3(Block(), ["q", "up"], ["up"])
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trained == ["q.ia3_l.default", "up.ia3_l.default"]
    assert model.q.ia3_l["default"].shape == (24, 1) and model.up.ia3_l["default"].shape == (1, 24)


@pytest.mark.parametrize("call,match", [
    (lambda m: fastpeft.apply_ia3(m, ["k"], ["up"]), r"feedforward_modules \['up'\] select no target"),
    (lambda m: fastpeft.apply_ia3(m, ["nope"]), "match no module"),
    (lambda m: fastpeft.apply_ia3(fastpeft.apply_lora(m, ["k"]), ["k"]), "a LoRA layer already"),
    (lambda m: fastpeft.apply_ia3(fastpeft.apply_ia3(m, ["k"]), ["k"]), "already has an adapter named 'default'"),
    (lambda m: fastpeft.apply_ia3(fastpeft.apply_ia3(m, ["k"]), ["k"], ["k"], adapter_name="x"), "other side"),
    (lambda m: fastpeft.apply_ia3(m, ["k"], "("), "not a valid regular expression"),
])
def test_bad_targets_are_refused_with_the_model_unchanged(call, match):
    model = Block()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises((TypeError, ValueError), match=match):
        call(model)
    if "LoRA" not in match and "already has" not in match and "other side" not in match:
        assert model.state_dict().keys() == before.keys()
        assert all(p.requires_grad for p in model.parameters())


def test_mixed_batch_names_checked():
    layer = fastpeft.Ia3Linear(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="not adapters of this layer"):
        layer(torch.randn(2, 3, 8), adapter_names=["default", "zzz"])
    with pytest.raises(ValueError, match="one adapter per sample"):
        layer(torch.randn(2, 3, 8), adapter_names=["default"])


def test_over_a_4bit_base_single_and_mixed():
    """An (IA)³ layer over an NF4 base computes in the base's dtype (x and an fp32 bias cast, the output back), for
    one task and for a batch of tasks alike."""
    torch.manual_seed(2)
    dense = nn.Linear(64, 32)
    layer = fastpeft.Ia3Linear(fastpeft.quantize_nf4(dense, dtype=torch.bfloat16), init_ia3_weights=False)
    layer.add_adapter("b", init_ia3_weights=False)
    x = torch.randn(2, 5, 64)
    w = layer.base_layer.weight.dequantize().float()
    want = (torch.nn.functional.linear(x.bfloat16().float(), w, dense.bias.detach().bfloat16().float())
            * layer.ia3_l_vector.detach())
    assert layer(x).dtype == torch.float32 and rel_err(layer(x), want) <= 1e-2
    mixed = layer(x, adapter_names=["default", "b"])
    assert rel_err(mixed[0], want[0]) <= 1e-2


def test_half_precision_base_with_fp32_vectors_rounds_once_as_peft():
    """bf16 base, fp32 vectors that bf16 cannot hold: x ⊙ l and y ⊙ l are taken in fp32 and rounded once, as PEFT
    computes them, so the torch path's outputs are PEFT's bit for bit."""
    peft_model, ours = twins(4, ["k", "v", "down"], ["down"], dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.rand_like(p, dtype=torch.float32) + 0.5)
                ours.get_parameter(name.removeprefix("base_model.model.")).copy_(p)
    for layer in fastpeft.ia3_layers(ours).values():
        layer.backend = "torch"
    assert {p.dtype for n, p in ours.named_parameters() if "ia3_l" in n} == {torch.float32}
    x = torch.randn(3, 7, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("k", "v"):
            assert torch.equal(getattr(ours, name)(x), getattr(peft_model.base_model.model, name)(x)), name
        h = torch.randn(3, 7, 48, dtype=torch.bfloat16)
        assert torch.equal(ours.down(h), peft_model.base_model.model.down(h))


def test_merge_while_disabled_is_refused_where_the_vector_has_zeros():
    layer = fastpeft.Ia3Linear(nn.Linear(6, 4))
    with torch.no_grad():
        layer.ia3_l["default"][1] = 0.0
    layer.disable_adapters()
    with pytest.raises(ValueError, match="adapters are disabled"):
        layer.merge()
    assert not layer.merged and torch.equal(layer(torch.ones(1, 6)), layer.base_layer(torch.ones(1, 6)))


def test_to_peft_refuses_a_merged_vector_with_zeros():
    model = fastpeft.apply_ia3(Block(), ["k"])
    with torch.no_grad():
        model.k.ia3_l["default"][0] = 0.0
    model.k.merge()
    with pytest.raises(ValueError, match="zeros"):
        fastpeft.to_peft(model)
    assert isinstance(model.k, fastpeft.Ia3Linear) and model.k.merged
