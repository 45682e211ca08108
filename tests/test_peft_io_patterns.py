"""PEFT's pattern keys in adapter files (alpha_pattern, rank_pattern, target_modules): saved and loaded as PEFT
matches them, both ways."""
import copy
import json

import pytest
import safetensors.torch
import torch
from test_peft_io import CONFIG, WEIGHTS, Net, assert_refused
from torch import nn

import fastpeft

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("alpha_pattern,rank_pattern", [
    ({"q_.*": 32}, {}),
    ({"q_proj": 32, "mlp\\.0": 3}, {"mlp.0": 5}),
    ({"^q_proj": 32}, {"^mlp\\.0": 3}),
    ({"q_proj": 32, "(q|v)_proj": 1}, {}),   # PEFT: the first key matching, in the file's order, wins
])
def test_patterns_saved_by_peft_match_peft(tmp_path, alpha_pattern, rank_pattern):
    torch.manual_seed(4)
    base = Net()
    config = peft.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj", "mlp.0"],
                             alpha_pattern=alpha_pattern, rank_pattern=rank_pattern, init_lora_weights=False)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    # PEFT writes the pattern keys sorted and takes the first match in the file's order: its own load of the file
    # is what fastpeft must equal.
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = torch.randn(3, 24)
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    for name, layer in fastpeft.lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert layer.scaling == peft_layer.scaling["default"], name
        assert layer.r == peft_layer.r["default"], name
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-6, rtol=1e-6)


def test_saved_patterns_survive_names_that_end_other_names(tmp_path):
    """PEFT takes the first pattern key matching a name or a dotted suffix of it: "0.q" also matches "layers.0.q"."""
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict({"0": nn.ModuleDict({"q": nn.Linear(6, 6)})})
            self.add_module("0", nn.ModuleDict({"q": nn.Linear(6, 6)}))
            self.other = nn.Linear(6, 6)

        def forward(self, x):
            return self.layers["0"]["q"](x) + getattr(self, "0")["q"](x) + self.other(x)

    torch.manual_seed(5)
    base = Odd()
    model = fastpeft.apply_lora(copy.deepcopy(base), ["layers.0.q", "other"], r=2, lora_alpha=2,
                                init_lora_weights=False)
    fastpeft.apply_lora(model, r"0\.q", r=3, lora_alpha=7, init_lora_weights=False)
    x = torch.randn(2, 6)
    with torch.no_grad():
        want = model(x)
    fastpeft.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(theirs(x), want, atol=1e-6) and torch.allclose(ours(x), want, atol=1e-6)


def test_alpha_of_any_number_type_saves_whole(tmp_path):
    """numpy and Fraction alphas are numbers LoraAdapter accepts: they are written as JSON numbers, and a save that
    cannot be written changes nothing on disk."""
    import fractions

    import numpy as np
    torch.manual_seed(6)
    x = torch.randn(3, 24)
    first = fastpeft.apply_lora(Net(), ["q_proj"], r=2, lora_alpha=4, init_lora_weights=False)
    fastpeft.save_adapter(first, tmp_path)
    for alpha in (np.float32(2.5), fractions.Fraction(5, 2), np.int64(3)):
        model = fastpeft.apply_lora(Net(), ["q_proj"], r=2, lora_alpha=alpha, init_lora_weights=False)
        fastpeft.save_adapter(model, tmp_path)
        assert json.loads((tmp_path / CONFIG).read_text())["lora_alpha"] == float(alpha)
        back = fastpeft.load_adapter(copy.deepcopy(model), tmp_path)
        with torch.no_grad():
            assert torch.allclose(back(x), model(x), atol=1e-6)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    bad = fastpeft.apply_lora(Net(), ["q_proj"], r=2, lora_dropout=0.1)
    fastpeft.apply_lora(bad, ["v_proj"], r=2, lora_dropout=0.2)
    with pytest.raises(ValueError, match="one lora_dropout per adapter"):
        fastpeft.save_adapter(bad, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_saved_pattern_keys_are_names_not_regexes(tmp_path):
    """"fc.1" read as a regex would also match "fc_1": the saved keys are escaped, so each names one layer."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
            self.fc_1 = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc[1](x) + self.fc_1(x)

    torch.manual_seed(7)
    base = M()
    model = fastpeft.apply_lora(copy.deepcopy(base), "fc_1", r=2, lora_alpha=2, init_lora_weights=False)
    fastpeft.apply_lora(model, r"fc\.1", r=2, lora_alpha=16, init_lora_weights=False)
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = model(x)
    fastpeft.save_adapter(model, tmp_path)
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    assert ours.fc_1.lora_alpha == 2 and ours.fc[1].lora_alpha == 16
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    with torch.no_grad():
        assert torch.allclose(ours(x), want, atol=1e-6) and torch.allclose(theirs(x), want, atol=1e-6)


def test_a_pattern_key_equal_to_the_name_applies_as_in_peft(tmp_path):
    """PEFT falls back to a key equal to the module's name when no key matches as a regex ("proj(1)" does not)."""
    base = nn.Sequential()
    for name in ("proj(1)", "o"):
        base.add_module(name, nn.Linear(4, 4))
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj(1)", "o"], init_lora_weights=False,
                             rank_pattern={"proj(1)": 4}, alpha_pattern={"proj(1)": 64})
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    layer = ours.get_submodule("proj(1)")
    assert layer.r == 4 and layer.lora_alpha == 64
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_target_modules_saved_so_peft_wraps_exactly_the_saved_layers(tmp_path):
    """A saved name ("proj") that ends another module's name ("blk.proj") would make PEFT wrap that one too."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.blk = nn.Module()
            self.blk.proj = nn.Linear(4, 4)

        def forward(self, x):
            return self.blk.proj(self.proj(x))

    base = M()
    model = fastpeft.apply_lora(copy.deepcopy(base), "proj", r=2, init_lora_weights=False)
    fastpeft.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.Linear)] == [
        "base_model.model.proj"]
    assert sorted(fastpeft.lora_layers(fastpeft.load_adapter(copy.deepcopy(base), tmp_path))) == ["proj"]
    back = fastpeft.to_peft(model)  # the same rule in memory
    assert [n for n, m in back.named_modules() if isinstance(m, peft.tuners.lora.Linear)] == ["base_model.model.proj"]


def test_all_linear_selects_as_peft_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=50)
    torch.manual_seed(9)
    base = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "adapter"
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear",
                                                             init_lora_weights=False)).save_pretrained(str(folder))
    raw = json.loads((folder / CONFIG).read_text())
    raw["target_modules"] = "all-linear"  # as a user would write it; PEFT saves the expanded list
    (folder / CONFIG).write_text(json.dumps(raw))
    ours = fastpeft.load_adapter(copy.deepcopy(base), folder)
    assert "lm_head" not in fastpeft.lora_layers(ours) and len(fastpeft.lora_layers(ours)) == 7
    tensors = safetensors.torch.load_file(str(folder / WEIGHTS))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.ones(2, 16)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.ones(50, 2)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS))
    assert_refused(copy.deepcopy(base), folder, r"lm_head: not selected by the config's target_modules")
