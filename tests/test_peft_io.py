"""Adapter files in HF PEFT's format, both ways, and what happens with bad files (the model stays unchanged)."""
import copy
import io
import json
import os
import stat
import time

import pytest
import safetensors.torch
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
        "truncated": (lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:-20]),
                      "not a valid safetensors file"),
        "no weights": (lambda f: (f / weights).unlink(), "neither"),
        "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), "not valid JSON"),
        "not lora": (lambda f: (f / "adapter_config.json").write_text('{"peft_type": "LOHA"}'), "'LORA' or 'IA3'"),
        "dora": (lambda f: (f / "adapter_config.json").write_text(
            json.dumps({**json.loads((good / "adapter_config.json").read_text()), "use_dora": True})),
            "needs lora_A and lora_B and lora_magnitude_vector"),
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


# ----------------------------------------------------------------------------------------------------------
# Loads refuse what they cannot honour, before anything changes.
# ----------------------------------------------------------------------------------------------------------

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture
def saved(tmp_path):
    """A good adapter folder (q_proj and mlp.0, r=2) and a function making edited copies of it."""
    torch.manual_seed(3)
    model = fastpeft.apply_lora(Net(), ["q_proj", "mlp.0"], r=2, lora_alpha=4, init_lora_weights=False)
    good = tmp_path / "good"
    fastpeft.save_adapter(model, good)
    config = json.loads((good / CONFIG).read_text())
    tensors = safetensors.torch.load_file(str(good / WEIGHTS))

    def copy_with(name, config_edit=None, tensors_edit=None, config_text=None, weights_bytes=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / CONFIG).write_text(config_text if config_text is not None
                                     else json.dumps({**config, **(config_edit or {})}))
        if weights_bytes is not None:
            (folder / weights_bytes[0]).write_bytes(weights_bytes[1])
        else:
            safetensors.torch.save_file(tensors_edit(dict(tensors)) if tensors_edit else tensors,
                                        str(folder / WEIGHTS))
        return folder

    return good, copy_with


def assert_refused(model, folder, match, **kwargs):
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(fastpeft.AdapterFileError, match=match):
        fastpeft.load_adapter(model, folder, **kwargs)
    assert [type(m) for m in model.modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(before[k], v) for k, v in state(model).items())


@pytest.mark.parametrize("edit,match", [
    ({"use_rslora": "false"}, r"use_rslora must be true or false, got 'false'"),
    ({"r": "2"}, r"r must be a positive integer"),
    ({"lora_alpha": True}, r"lora_alpha must be a finite number"),
    ({"lora_dropout": 1.5}, r"lora_dropout must be a number in \[0, 1\)"),
    ({"alpha_pattern": ["q_proj", 8]}, r"alpha_pattern must be an object of finite numbers"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern must be an object of positive integers"),
    ({"target_modules": 7}, r"target_modules must be null, a regex string or a list"),
    ({"alora_invocation_tokens": [1, 2]}, r"does not implement: \{'alora_invocation_tokens'"),
    ({"layer_replication": [[0, 1]], "target_parameters": ["q_proj.weight"]},
     r"does not implement: \{'layer_replication': \[\[0, 1\]\], 'target_parameters'"),
    ({"fan_in_fan_out": True, "modules_to_save": ["head"]}, r"'fan_in_fan_out': True, 'modules_to_save'"),
    ({"init_lora_weights": "pissa_niter_4"}, r"does not implement: \{'init_lora_weights': 'pissa_niter_4'"),
    ({"future_feature": {"on": 1}}, r"fields fastpeft does not know .*'future_feature'"),
    ({"peft_type": "LOHA"}, r"peft_type must be 'LORA' or 'IA3', got 'LOHA'"),
    ({"peft_type": "IA3"}, r"fields fastpeft does not know for IA3 .*'r': 2"),  # LoRA's fields in an IA3 config
    ({"r": 3}, r"the weights have rank 2, the config gives it rank 3"),
    ({"target_modules": ["q_proj"]}, r"mlp\.0: not selected by the config's target_modules"),
    ({"exclude_modules": r"mlp\..*"}, r"mlp\.0: not selected"),
])
def test_load_refuses_configs_it_cannot_honour(saved, edit, match):
    _, copy_with = saved
    assert_refused(Net(), copy_with("edited", config_edit=edit), match)


def test_every_config_problem_is_listed_together(saved):
    _, copy_with = saved
    folder = copy_with("many", {"use_rslora": "no", "fan_in_fan_out": True, "exclude_modules": None,
                                "layer_replication": [1]})
    with pytest.raises(fastpeft.AdapterFileError, match=r"adapter_config.json: use_rslora must .*; it uses PEFT "
                                                         r"features .*'fan_in_fan_out'.*'layer_replication'"):
        fastpeft.load_adapter(Net(), folder)


def test_exclude_modules_that_leave_the_files_layers_alone_load(saved):
    _, copy_with = saved
    model = fastpeft.load_adapter(Net(), copy_with("excluding", {"exclude_modules": ["v_proj"]}))
    assert sorted(fastpeft.lora_layers(model)) == ["mlp.0", "q_proj"]


@pytest.mark.parametrize("edit,match", [
    (lambda t: {**t, "base_model.model.q_proj.lora_A.weight": torch.ones(2, 24, dtype=torch.int64)},
     r"must be floating point, got \{'base_model.model.q_proj.lora_A.weight': 'torch.int64'\}"),
    (lambda t: {**t, "base_model.model.q_proj.lora_B.weight": torch.ones(24, 2, dtype=torch.int32)},
     r"must be floating point.*torch.int32"),
    (lambda t: {**t, "base_model.model.q_proj.base_layer.lora_A.weight": torch.ones(2, 24),
                "base_model.model.q_proj.base_layer.lora_B.weight": torch.ones(24, 2)},
     r"q_proj.base_layer: inside a LoRA layer"),
    (lambda t: {**t, "base_model.model.q_proj.lora_magnitude_vector": torch.ones(24)},
     r"q_proj: needs lora_A and lora_B \(use_dora=False\), got \['lora_A', 'lora_B', 'lora_magnitude_vector'\]"),
    (lambda t: {**t, "base_model.model.q_proj.lora_E": torch.ones(24)},
     r"unexpected key 'base_model.model.q_proj.lora_E'"),
])
def test_load_refuses_tensors_it_cannot_honour(saved, edit, match):
    _, copy_with = saved
    assert_refused(Net(), copy_with("edited", tensors_edit=edit), match)


def test_a_key_inside_an_existing_lora_layer_is_refused(saved):
    good, copy_with = saved
    model = fastpeft.load_adapter(Net(), good)
    folder = copy_with("nested", {"target_modules": None}, tensors_edit=lambda t: {
        "base_model.model.q_proj.base_layer.lora_A.weight": torch.ones(2, 24),
        "base_model.model.q_proj.base_layer.lora_B.weight": torch.ones(24, 2)})
    assert_refused(model, folder, r"q_proj.base_layer: inside a LoRA layer", adapter_name="other")


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.attn(x, x, x)[0])


def test_attention_out_proj_is_refused_as_apply_lora_does(tmp_path):
    folder = tmp_path / "attn"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                             "target_modules": ["out_proj"]}))
    safetensors.torch.save_file({"base_model.model.attn.out_proj.lora_A.weight": torch.ones(2, 8),
                                 "base_model.model.attn.out_proj.lora_B.weight": torch.ones(8, 2)},
                                str(folder / WEIGHTS))
    assert_refused(WithAttention(), folder, r"attn.out_proj: the out_proj of an nn.MultiheadAttention")


def test_a_bare_layer_is_refused_both_ways(tmp_path):
    with pytest.raises(ValueError, match="a bare LoraLinear has none"):
        fastpeft.save_adapter(fastpeft.LoraLinear(nn.Linear(4, 4)), tmp_path / "bare")
    assert not (tmp_path / "bare").exists()
    model = nn.Sequential(fastpeft.LoraLinear(nn.Linear(4, 4), r=2, init_lora_weights=False))
    fastpeft.save_adapter(model, tmp_path / "wrapped")
    with pytest.raises(ValueError, match="a bare nn.Linear cannot become a LoraLinear in place"):
        fastpeft.load_adapter(nn.Linear(4, 4), tmp_path / "wrapped")
    back = fastpeft.load_adapter(nn.Sequential(nn.Linear(4, 4)), tmp_path / "wrapped")
    assert torch.equal(back[0].lora_B, model[0].lora_B)
    back.state_dict()  # a layer never becomes its own child
    # A file whose keys name no module (as bare layers used to be saved) is refused.
    folder = tmp_path / "empty-name"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    safetensors.torch.save_file({"base_model.model..lora_A.weight": torch.ones(2, 4),
                                 "base_model.model..lora_B.weight": torch.ones(4, 2)}, str(folder / WEIGHTS))
    assert_refused(nn.Sequential(nn.Linear(4, 4)), folder, "a key names no module")


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/fastpeft-evil-was-here", "w"))


@pytest.mark.parametrize("name,payload,match", [
    ("list", lambda: _pickled([torch.ones(2)]), r"adapter_model.bin must hold a mapping of names to tensors"),
    ("not tensors", lambda: _pickled({"base_model.model.q_proj.lora_A.weight": [1.0, 2.0]}),
     r"adapter_model.bin must hold a mapping of names to tensors"),
    ("garbage", lambda: b"\x00\x01garbage" * 50, r"adapter_model.bin cannot be read as a weights-only torch file"),
    ("evil", lambda: __import__("pickle").dumps(Evil()), r"adapter_model.bin cannot be read as a weights-only"),
])
def test_bad_pickled_weights_raise_adapter_file_errors(saved, name, payload, match):
    _, copy_with = saved
    folder = copy_with(name.replace(" ", "_"), weights_bytes=("adapter_model.bin", payload()))
    assert_refused(Net(), folder, match)
    assert not os.path.exists("/tmp/fastpeft-evil-was-here")


def _pickled(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("text,match", [
    ("[" * 100000 + "]" * 100000, r"adapter_config.json is not valid JSON: RecursionError"),
    ("\xff\xfe{}", r"adapter_config.json"),
    ('{"peft_type": "LORA", "lora_alpha": NaN}', r"lora_alpha must be a finite number"),
    ("[]", r"expected a JSON object, got list"),
])
def test_bad_json_raises_adapter_file_errors(saved, text, match):
    _, copy_with = saved
    assert_refused(Net(), copy_with("json", config_text=text), match)


@pytest.mark.parametrize("key,value", [("q_proj.lora_A.weight", 1e39), ("mlp.0.lora_B.weight", -1e39),
                                       ("q_proj.lora_B.weight", float("nan")), ("mlp.0.lora_A.weight", float("inf"))])
def test_values_past_the_adapters_dtype_are_refused(saved, key, value):
    """An fp64 file whose value overflows fp32 (the adapter's dtype over an fp32 base) would load as inf."""
    _, copy_with = saved

    def edit(tensors):
        full = f"base_model.model.{key}"
        tensors = {k: v.double() for k, v in tensors.items()}
        tensors[full] = tensors[full].index_fill(1, torch.tensor([1]), value)
        return tensors
    name = key.rsplit(".", 1)[0].rpartition(".")[0]
    assert_refused(Net(), copy_with("huge", tensors_edit=edit),
                   rf"{name}: {key.split('.')[-2]} holds values that are not finite in the adapter's dtype float32")
    assert_refused(fastpeft.apply_lora(Net(), ["q_proj"], r=2), copy_with("huge2", tensors_edit=edit), "not finite")


def test_an_fp64_file_in_range_loads_into_fp32(saved):
    _, copy_with = saved
    folder = copy_with("fp64", tensors_edit=lambda tensors: {k: v.double() for k, v in tensors.items()})
    model = fastpeft.load_adapter(Net(), folder)
    assert model.q_proj.adapters["default"].lora_A.dtype == torch.float32


def test_safetensors_garbage_names_the_file(saved):
    _, copy_with = saved
    folder = copy_with("garbage", weights_bytes=(WEIGHTS, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 3))
    assert_refused(Net(), folder, r"adapter_model.safetensors is not a valid safetensors file")


@pytest.mark.parametrize("kwargs,match", [
    ({"adapter_name": "x.y"}, "adapter_name must be a non-empty string without '.'"),
    ({"adapter_name": ""}, "adapter_name must be a non-empty string"),
    ({"adapter_name": "__base__"}, "adapter_name '__base__' is reserved"),
    ({"backend": "bogus"}, "bogus"),
])
def test_bad_arguments_change_nothing(saved, kwargs, match):
    good, _ = saved
    for model in (Net(), fastpeft.apply_lora(Net(), ["q_proj"], r=2)):  # also layers that have LoRA already
        before = state(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        adapters = {n: list(m.adapters) for n, m in fastpeft.lora_layers(model).items()}
        with pytest.raises(ValueError, match=match):
            fastpeft.load_adapter(model, good, **kwargs)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert {n: list(m.adapters) for n, m in fastpeft.lora_layers(model).items()} == adapters
        assert all(torch.equal(before[k], v) for k, v in state(model).items())


def test_backend_applies_to_layers_that_had_lora_already(saved):
    good, _ = saved
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2)
    fastpeft.load_adapter(model, good, adapter_name="loaded", backend="torch")
    assert model.q_proj.backend == "torch" and model.mlp[0].backend == "torch"
    assert model.q_proj.active_adapter == "default" and model.mlp[0].active_adapter == "loaded"


def test_files_respect_the_umask_and_other_files_stay(tmp_path):
    old = os.umask(0o022)
    try:
        folder = tmp_path / "adapter"
        folder.mkdir()
        (folder / "README.md").write_text("mine")
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("a b c")
        model = fastpeft.apply_lora(Net(), ["q_proj"], r=2)
        for _ in range(2):
            fastpeft.save_adapter(model, folder)
        for name in (CONFIG, WEIGHTS):
            assert stat.S_IMODE(os.stat(folder / name).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
        assert sorted(os.listdir(folder)) == sorted([CONFIG, "README.md", WEIGHTS, "tokenizer"])
        assert (folder / "README.md").read_text() == "mine" and (folder / "tokenizer" / "vocab.txt").exists()
        assert sorted(os.listdir(tmp_path)) == ["adapter"]  # nothing left beside it either
    finally:
        os.umask(old)


@pytest.mark.parametrize("edit,match", [
    ({"target_modules": "("}, r"'\(' is not a valid regular expression"),
    ({"exclude_modules": "["}, r"'\[' is not a valid regular expression"),
    ({"rank_pattern": {"(": 2}}, r"is not a valid regular expression"),
    ({"alpha_pattern": {"*": 3}}, r"is not a valid regular expression"),
    ({"lora_alpha": 10**400}, r"lora_alpha must be a finite number"),
    ({"lora_dropout": 10**400}, r"lora_dropout must be a number"),
    ({"alpha_pattern": {"q_proj": 10**400}}, r"alpha_pattern must be an object of finite numbers"),
    ({"layers_to_transform": 0}, r"does not implement: \{'layers_to_transform': 0\}"),
    ({"kasa_config": {}}, r"does not implement: \{'kasa_config': \{\}\}"),
    ({"init_lora_weights": "OLoRA"}, r"does not implement: \{'init_lora_weights': 'OLoRA'\}"),
])
def test_load_refuses_more_configs_it_cannot_honour(saved, edit, match):
    _, copy_with = saved
    assert_refused(Net(), copy_with("edited", config_edit=edit), match)


@pytest.mark.parametrize("name,tensor", [
    ("sparse", lambda: torch.ones(2, 24).to_sparse()),
    ("meta", lambda: torch.ones(2, 24, device="meta")),
])
def test_pickled_weights_must_be_dense(saved, name, tensor):
    _, copy_with = saved
    good = safetensors.torch.load_file(str(saved[0] / WEIGHTS))
    payload = _pickled({**good, "base_model.model.q_proj.lora_A.weight": tensor()})
    assert_refused(Net(), copy_with(name, weights_bytes=("adapter_model.bin", payload)), "must be dense tensors")


def test_saving_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    folder.mkdir()
    monkeypatch.chdir(folder)
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2)
    for _ in range(2):
        fastpeft.save_adapter(model, ".")
    assert os.getcwd() == str(folder) and sorted(os.listdir(".")) == [CONFIG, WEIGHTS]
    assert fastpeft.lora_layers(fastpeft.load_adapter(Net(), "."))


def test_a_folder_that_cannot_be_swapped_has_its_files_replaced(tmp_path, monkeypatch):
    """A mount point cannot be renamed: each file is then replaced atomically on its own."""
    folder = tmp_path / "mounted"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"old")
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(folder) or real_ismount(p))
    inode = folder.stat().st_ino
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2, init_lora_weights=False)
    fastpeft.save_adapter(model, folder)
    assert folder.stat().st_ino == inode and sorted(os.listdir(folder)) == sorted([CONFIG, WEIGHTS,
                                                                                   "adapter_model.bin"])
    back = fastpeft.load_adapter(Net(), folder)
    assert torch.equal(back.q_proj.lora_B, model.q_proj.lora_B)


def test_a_killed_first_save_leaves_no_adapter(tmp_path):
    """What a save killed before its swap leaves beside the folder is not an adapter: loading says so at once."""
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2)
    fastpeft.save_adapter(model, tmp_path / "other")
    leftover = tmp_path / (fastpeft.peft_io._staging_prefix(tmp_path / "adapter") + "0123")
    os.rename(tmp_path / "other", leftover)
    start = time.monotonic()
    with pytest.raises(fastpeft.AdapterFileError, match="adapter does not exist"):
        fastpeft.load_adapter(Net(), tmp_path / "adapter")
    assert time.monotonic() - start < 2
    fastpeft.save_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_save_drops_the_old_adapters_pickled_weights_and_refuses_non_float(tmp_path):
    torch.manual_seed(8)
    base = Net()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()
    model = fastpeft.apply_lora(copy.deepcopy(base), ["v_proj"], r=6, init_lora_weights=False)
    fastpeft.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([CONFIG, WEIGHTS, "README.md"])  # PEFT's README stays
    complex_model = fastpeft.apply_lora(Net(), ["q_proj"], r=2).to(torch.complex64)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="floating point only"):
        fastpeft.save_adapter(complex_model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_folder_named_like_the_adapter_file_is_reported(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.bin").mkdir()
    assert_refused(Net(), folder, r"adapter_model.bin is not a regular file")


def test_long_folder_names_save(tmp_path):
    folder = tmp_path / ("a" * 250)
    model = fastpeft.apply_lora(Net(), ["q_proj"], r=2)
    fastpeft.save_adapter(model, folder)
    fastpeft.save_adapter(model, folder)
    assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS]


def test_loading_a_name_the_model_has_on_other_layers_is_refused(saved):
    good, _ = saved
    model = fastpeft.apply_lora(Net(), ["q_proj", "v_proj"], r=3)  # "default" on v_proj too; the file lacks it
    before = state(model)
    with pytest.raises(ValueError, match=r"adapter named 'default' on layers the file does not hold \(v_proj\)"):
        fastpeft.load_adapter(model, good)
    assert all(torch.equal(before[k], v) for k, v in state(model).items()) and not isinstance(model.mlp[0],
                                                                                            fastpeft.LoraLinear)
    fastpeft.load_adapter(model, good, adapter_name="loaded")  # under another name it loads beside it
    assert model.v_proj.active_adapter == "default" and model.q_proj.active_adapter == "default"


def test_loading_keeps_the_active_adapter_as_peft_does(saved, tmp_path):
    """Adapter "a" active on q and v; a file covering q (and a layer without LoRA) loaded as "b": q and v keep
    running "a" and give the same outputs, the new layer runs "b", and set_adapter switches q to "b"."""
    good, _ = saved
    model = fastpeft.apply_lora(Net(), ["q_proj", "v_proj"], r=3, adapter_name="a", init_lora_weights=False)
    x = torch.randn(2, 5, 24)
    before = {n: m(x) for n, m in (("q_proj", model.q_proj), ("v_proj", model.v_proj))}
    fastpeft.load_adapter(model, good, adapter_name="b")
    assert model.q_proj.active_adapter == "a" and model.v_proj.active_adapter == "a"
    assert sorted(model.q_proj.adapters) == ["a", "b"] and model.mlp[0].active_adapter == "b"
    for name, want in before.items():
        assert torch.equal(model.get_submodule(name)(x), want)
    model.q_proj.merge()  # a merged adapter other than the one loaded stays merged
    fastpeft.load_adapter(model, good, adapter_name="c")
    assert model.q_proj.merged_adapter == "a"
    model.q_proj.unmerge()
    fastpeft.set_adapter(model, "b")
    assert model.q_proj.active_adapter == "b" and model.v_proj.active_adapter == "a"
    q, b = model.q_proj, model.q_proj.adapters["b"]
    want = fastpeft.lora_linear_reference(x, q.weight, q.bias, b.lora_A, b.lora_B, b.scaling)
    torch.testing.assert_close(q(x), want)


def test_loading_keeps_other_adapters_trainable(saved):
    good, _ = saved
    model = fastpeft.apply_adapters(Net(), ["v_proj"], config=dict(bottleneck=4))
    fastpeft.apply_lora(model, ["mlp.2"], r=2, adapter_name="mine")
    fastpeft.load_adapter(model, good)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".adapter." in n for n in trainable) and any(".adapters.mine." in n for n in trainable)
    assert any(".adapters.default." in n for n in trainable)
    assert not any(n.endswith("base_layer.weight") for n in trainable)


def test_empty_lists_peft_reads_as_unset_load(saved):
    _, copy_with = saved
    model = fastpeft.load_adapter(Net(), copy_with("empty", {"modules_to_save": [], "layers_to_transform": []}))
    assert sorted(fastpeft.lora_layers(model)) == ["mlp.0", "q_proj"]
