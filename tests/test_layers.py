"""LoraLinear: matches HF PEFT's LoRA layer on the same weights; merge/unmerge; init rules; adapter dtype."""
import copy
import math

import pytest
import torch
from conftest import TOLERANCE, backend_params, rel_err
from torch import nn

import fastpeft

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import Linear as PeftLinear  # noqa: E402


def twin_layers(backend, device, r=8, alpha=16, use_rslora=False, dtype=torch.float32, K=70, N=45):
    """A LoraLinear and a PEFT LoRA Linear over copies of one base layer, holding the same A and B."""
    torch.manual_seed(0)
    base = nn.Linear(K, N, bias=True).to(device=device, dtype=dtype)
    ours = fastpeft.LoraLinear(copy.deepcopy(base), r=r, lora_alpha=alpha, use_rslora=use_rslora,
                               init_lora_weights=False, backend=backend)
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=False)
    theirs = PeftLinear(copy.deepcopy(base), "default", config=config, r=r, lora_alpha=alpha)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    return base, ours, theirs


def forward_backward(layer, x, dy, a, b):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, a.grad.clone(), b.grad.clone()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("use_rslora", [False, True], ids=["rslora-off", "rslora-on"])
def test_matches_peft_forward_and_grads(backend, device, use_rslora):
    _, ours, theirs = twin_layers(backend, device, use_rslora=use_rslora)
    assert ours.scaling == pytest.approx(theirs.scaling["default"])
    assert ours.scaling == pytest.approx(16 / math.sqrt(8) if use_rslora else 16 / 8)
    x = torch.randn(2, 9, 70, device=device)
    dy = torch.randn(2, 9, 45, device=device)
    got = forward_backward(ours, x, dy, ours.lora_A, ours.lora_B)
    want = forward_backward(theirs, x, dy, theirs.lora_A["default"].weight, theirs.lora_B["default"].weight)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-6


@pytest.mark.parametrize("backend,device", backend_params())
def test_merged_and_unmerged_match_peft(backend, device):
    _, ours, theirs = twin_layers(backend, device)
    x = torch.randn(13, 70, device=device)
    with torch.no_grad():
        unmerged = ours(x)
        ours.merge()
        theirs.merge()
        assert ours.merged
        assert rel_err(ours.weight, theirs.base_layer.weight) <= 1e-7
        merged = ours(x)
        assert rel_err(merged, theirs(x)) <= 1e-6
        assert rel_err(merged, unmerged) <= TOLERANCE[torch.float32]
        ours.unmerge()
        theirs.unmerge()
        assert not ours.merged
        assert rel_err(ours(x), unmerged) <= TOLERANCE[torch.float32]
        assert rel_err(ours(x), theirs(x)) <= 1e-6


def test_merge_twice_warns_and_changes_nothing():
    _, ours, _ = twin_layers("torch", "cpu")
    ours.merge()
    weight = ours.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge()
    assert torch.equal(ours.weight, weight)
    ours.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        ours.unmerge()


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    _, ours, _ = twin_layers("torch", "cpu")
    with torch.no_grad():
        ours.lora_B[3, 2] = float("inf")
    before = ours.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        ours.merge(safe=True)
    assert torch.equal(ours.weight, before) and not ours.merged


def test_wraps_and_freezes_base():
    base = nn.Linear(20, 10)
    layer = fastpeft.LoraLinear(base, r=4)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (10, 4)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert (layer.in_features, layer.out_features) == (20, 10)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"adapters.default.lora_A", "adapters.default.lora_B"}
    assert fastpeft.LoraLinear(nn.Linear(4, 4).eval()).training is False  # an eval model stays in eval


def test_layer_from_existing_parameters_shares_them():
    base = nn.Linear(6, 5).requires_grad_(False)
    a, b = nn.Parameter(torch.randn(2, 6)), nn.Parameter(torch.randn(5, 2))
    adapter = fastpeft.LoraAdapter.from_parameters(a, b, lora_alpha=4, use_rslora=True)
    layer = fastpeft.LoraLinear.from_adapters(base, {"x": adapter}, "x")
    assert layer.lora_A is a and layer.lora_B is b and layer.scaling == 4 / 2 ** 0.5
    x = torch.randn(3, 6)
    assert torch.allclose(layer(x), base(x) + layer.scaling * x @ a.t() @ b.t(), atol=1e-6)
    with pytest.raises(TypeError, match="lora_A must be a 2-D nn.Parameter"):
        fastpeft.LoraAdapter.from_parameters(torch.randn(2, 6), b, 4)
    with pytest.raises(ValueError, match="does not fit lora_A"):
        fastpeft.LoraAdapter.from_parameters(a, nn.Parameter(torch.randn(5, 3)), 4)
    with pytest.raises(ValueError, match="does not fit 7 -> 5"):
        fastpeft.LoraLinear.from_adapters(nn.Linear(7, 5).requires_grad_(False), {"x": adapter}, "x")
    with pytest.raises(ValueError, match="must be frozen"):
        fastpeft.LoraLinear.from_adapters(nn.Linear(6, 5), {"x": adapter}, "x")
    with pytest.raises(KeyError, match="active_adapter 'y'"):
        fastpeft.LoraLinear.from_adapters(base, {"x": adapter}, "y")


def test_init_rules_follow_peft():
    torch.manual_seed(0)
    base = nn.Linear(300, 200)
    x = torch.randn(5, 300)
    default = fastpeft.LoraLinear(copy.deepcopy(base), r=16)
    assert torch.count_nonzero(default.lora_B) == 0 and torch.count_nonzero(default.lora_A) > 0
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=√5) on fan_in=300
    assert default.lora_A.abs().max() <= bound
    with torch.no_grad():
        assert torch.equal(default(x), base(x))  # B = 0: the layer starts as its base
    gaussian = fastpeft.LoraLinear(copy.deepcopy(base), r=16, init_lora_weights="gaussian")
    assert gaussian.lora_A.std().item() == pytest.approx(1 / 16, rel=0.1)
    assert torch.count_nonzero(gaussian.lora_B) == 0
    nonzero = fastpeft.LoraLinear(copy.deepcopy(base), r=16, init_lora_weights=False)
    assert torch.count_nonzero(nonzero.lora_B) > 0


def test_adapters_are_fp32_on_half_base_by_default():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = fastpeft.LoraLinear(copy.deepcopy(base), r=4, init_lora_weights=False)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    same = fastpeft.LoraLinear(copy.deepcopy(base), r=4, autocast_adapter_dtype=False)
    assert same.lora_A.dtype == torch.bfloat16
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = fastpeft.lora_linear_reference(x.double(), layer.weight.double(), layer.bias.double(),
                                         layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
    assert rel_err(y, ref) <= TOLERANCE[torch.bfloat16]


def test_dropout_only_in_training_mode():
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(64, 32), r=8, lora_dropout=0.5, init_lora_weights=False)
    x = torch.randn(16, 64)
    with torch.no_grad():
        layer.train()
        a, b = layer(x), layer(x)
        layer.eval()
        c, d = layer(x), layer(x)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


@pytest.mark.parametrize("backend,device", backend_params())
def test_autocast_runs_the_base_in_the_autocast_dtype(backend, device):
    _, ours, _ = twin_layers(backend, device)
    x = torch.randn(6, 70, device=device, requires_grad=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = ours(x)
        base = ours.base_layer(x)
    assert y.dtype == base.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and ours.lora_A.grad.dtype == torch.float32
    ref = fastpeft.lora_linear_reference(x.detach().bfloat16().double(), ours.weight.bfloat16().double(),
                                         ours.bias.bfloat16().double(), ours.lora_A.double(), ours.lora_B.double(),
                                         ours.scaling)
    assert rel_err(y, ref) <= TOLERANCE[torch.bfloat16]


def test_named_adapters_on_one_layer():
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(nn.Linear(16, 8), r=2, init_lora_weights=False)
    layer.add_adapter("other", r=3, lora_alpha=6, init_lora_weights=False)
    x = torch.randn(5, 16)
    with torch.no_grad():
        y_default = layer(x)
        layer.set_adapter("other")
        y_other = layer(x)
        ref = fastpeft.lora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 2.0)
        assert layer.r == 3 and torch.allclose(y_other, ref, atol=1e-6)
        assert not torch.allclose(y_default, y_other)
        layer.merge()
        assert layer.merged_adapter == "other"
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.set_adapter("default")
        assert torch.allclose(layer(x), y_other, atol=1e-5)
        layer.disable_adapters()  # unmerges first, then runs the base alone
        assert not layer.merged and torch.allclose(layer(x), layer.base_layer(x))
        layer.enable_adapters()
        layer.set_adapter("default")
        assert torch.allclose(layer(x), y_default, atol=1e-6)
    with pytest.raises(ValueError, match="exists already"):
        layer.add_adapter("other")
    with pytest.raises(KeyError, match="no adapter 'x'"):
        layer.set_adapter("x")
    layer.delete_adapter("default")
    assert layer.active_adapter == "other" and list(layer.adapters) == ["other"]
    with pytest.raises(ValueError, match="only adapter"):
        layer.delete_adapter("other")


def test_safe_merge_checks_the_rounded_weight():
    """fp16 holds at most 65504: 65000 + 1000 is finite in fp32 and inf once rounded to the weight's dtype."""
    base = nn.Linear(4, 2, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(65000.0)
    layer = fastpeft.LoraLinear(base, r=1, lora_alpha=1)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_B.copy_(torch.tensor([[1000.0], [250.0]]))  # row 0 merges to 66000: inf in fp16
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf in torch.float16; the weight was left unchanged"):
        layer.merge(safe=True)
    assert torch.equal(layer.weight, before) and not layer.merged
    layer.lora_B.data.fill_(100.0)  # 65100 rounds to a finite fp16 value: merges
    layer.merge(safe=True)
    assert layer.merged and torch.isfinite(layer.weight).all()


def test_merge_while_disabled_keeps_the_base_output_like_peft():
    torch.manual_seed(0)
    base = nn.Linear(12, 6)
    x = torch.randn(3, 12)
    ours = fastpeft.LoraLinear(copy.deepcopy(base), r=2, init_lora_weights=False)
    theirs = PeftLinear(copy.deepcopy(base), "default", config=LoraConfig(r=2, lora_alpha=8), r=2, lora_alpha=8)
    with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        ours.disable_adapters()
        theirs.enable_adapters(False)
        ours.merge()
        theirs.merge()
        want = theirs(x)
        assert torch.allclose(want, base(x), atol=1e-6)
        assert torch.allclose(ours(x), want, atol=1e-6)
        ours.enable_adapters()
        theirs.enable_adapters(True)
        assert torch.allclose(ours(x), theirs(x), atol=1e-6) and not torch.allclose(ours(x), base(x))


def test_layers_refuse_linear_subclasses_with_their_own_forward():
    class Clamped(nn.Linear):
        def forward(self, x):
            return super().forward(x).clamp(min=0)

    with pytest.raises(TypeError, match="Clamped, an nn.Linear subclass with its own forward"):
        fastpeft.LoraLinear(Clamped(4, 4))
