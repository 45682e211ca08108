"""Adapter files in HF PEFT's format, both ways, and what happens with bad files (the model stays unchanged)."""
import copy
import json

import pytest
import torch
from torch import nn

import fastpeft

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(24, 24)
        self.v_proj = nn.Linear(24, 24)
        self.mlp = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 24))

    def forward(self, x):
        h = self.v_proj(torch.tanh(self.q_proj(x)))
        return self.mlp(h)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fastpeft_to_peft_to_fastpeft(tmp_path):
    torch.manual_seed(0)
    base = Net()
    x = torch.randn(5, 24)
    ours = fastpeft.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj", "mlp.2"], r=4, lora_alpha=8,
                               use_rslora=True, init_lora_weights=False)
    with torch.no_grad():
        want = ours(x)
    fastpeft.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_rslora"] is True
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    theirs.eval()
    wrapped = sorted(n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert [n.removeprefix("base_model.model.") for n in wrapped] == ["mlp.2", "q_proj", "v_proj"]
    with torch.no_grad():
        assert torch.allclose(theirs(x), want, atol=1e-6, rtol=1e-6)
    back = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)
    back.eval()
    with torch.no_grad():
        assert torch.allclose(back(x), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("adapter_name", ["default", "task_b"])
def test_load_what_peft_saved(tmp_path, adapter_name):
    torch.manual_seed(1)
    base = Net()
    config = peft.LoraConfig(r=6, lora_alpha=12, lora_dropout=0.1, target_modules=["q_proj", "mlp.0"],
                             init_lora_weights=False, rank_pattern={"mlp.0": 3})
    theirs = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=adapter_name)
    theirs.save_pretrained(str(tmp_path))
    folder = tmp_path / adapter_name if adapter_name != "default" else tmp_path
    theirs.eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        want = theirs(x)
    ours = fastpeft.load_adapter(copy.deepcopy(base), folder)
    ours.eval()
    assert isinstance(ours.mlp[0], fastpeft.LoraLinear) and ours.mlp[0].r == 3 and ours.q_proj.r == 6
    assert ours.q_proj.lora_dropout == 0.1
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n for n in trainable)
    with torch.no_grad():
        assert torch.allclose(ours(x), want, atol=1e-6, rtol=1e-6)


def test_bad_files_leave_the_model_unchanged(tmp_path):
    torch.manual_seed(2)
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2, init_lora_weights=False)
    good = tmp_path / "good"
    fastpeft.save_adapter(model, good)
    target = Net()
    before = state(target)

    def broken(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        edit(folder)
        return folder

    weights = "adapter_model.safetensors"
    cases = {
        "truncated": (lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:-20]), "cannot read"),
        "no weights": (lambda f: (f / weights).unlink(), "neither"),
        "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), "not valid JSON"),
        "not lora": (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "IA3"}'), "LORA"),
        "dora": (lambda f: (f / "adapter_config.json").write_text(
            json.dumps({**json.loads((good / "adapter_config.json").read_text()), "use_dora": True})),
            "does not support"),
    }
    for name, (edit, match) in cases.items():
        with pytest.raises(fastpeft.AdapterFileError, match=match):
            fastpeft.load_adapter(target, broken(name.replace(" ", "_"), edit))
    with pytest.raises(fastpeft.AdapterFileError, match="does not exist"):
        fastpeft.load_adapter(target, tmp_path / "nowhere")

    class Other(nn.Module):  # same names, other sizes
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(24, 30)

    other = Other()
    other_before = state(other)
    with pytest.raises(fastpeft.AdapterFileError, match="do not fit"):
        fastpeft.load_adapter(other, good)
    assert all(torch.equal(other_before[k], v) for k, v in state(other).items())
    assert not fastpeft.lora_layers(target)
    assert all(torch.equal(before[k], v) for k, v in state(target).items())


def test_save_writes_atomically_and_needs_lora(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        fastpeft.save_adapter(Net(), tmp_path)
    model = fastpeft.apply_lora(Net(), ["v_proj"], r=2)
    fastpeft.save_adapter(model, tmp_path)
    fastpeft.save_adapter(model, tmp_path)  # overwriting leaves no temp files behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_refuses_what_peft_cannot_hold(tmp_path):
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2, lora_dropout=0.1)
    fastpeft.apply_lora(model, ["v_proj"], r=2, lora_dropout=0.2)
    with pytest.raises(ValueError, match="one lora_dropout per adapter"):
        fastpeft.save_adapter(model, tmp_path / "a")
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2, use_rslora=True)
    fastpeft.apply_lora(model, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="one use_rslora per adapter"):
        fastpeft.save_adapter(model, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
