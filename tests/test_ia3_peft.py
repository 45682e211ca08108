"""(IA)³ with HF PEFT: IA3 adapter files both ways (PEFT loads what fastpeft saves and the reverse, with PEFT's
logits), the files fastpeft refuses with the model unchanged, and saves killed midway. Configurations are drawn at
random: which projections are targets, which of them scale their input (feedforward_modules), lists or regular
expressions, biases or none, vectors away from their all-ones start."""
import copy
import importlib
import json
import os
import random
import signal
import time

import pytest
import safetensors.torch
import torch
from conftest import bnb_nf4_mlp, fork, rel_err, tiny_llama
from torch import nn

import fastpeft
from fastpeft import peft_fuse

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def llama(seed=0, bias=False):
    """tiny_llama's shape, with biases on every projection when ``bias``."""
    if not bias:
        return tiny_llama(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                                      attention_bias=True, mlp_bias=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(seed=1):
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))


def random_config(seed) -> dict:
    """IA3Config arguments drawn from ``seed``: 2 to 4 target projections, each an input scale with odds 1/2 (none
    for one seed in four), as lists or (one seed in three) as regular expressions."""
    rng = random.Random(seed)
    targets = rng.sample(PROJECTIONS, rng.randint(2, 4))
    feedforward = [t for t in targets if rng.random() < 0.5 and seed % 4 != 3]
    if seed % 3 == 2:
        return dict(target_modules=rf".*\.({'|'.join(targets)})",
                    feedforward_modules=rf".*\.({'|'.join(feedforward)})" if feedforward else [],
                    init_ia3_weights=False)
    return dict(target_modules=targets, feedforward_modules=feedforward, init_ia3_weights=False)


def peft_ia3(seed, bias=False, **config):
    """A PEFT IA3 Llama with random vectors (its base built from ``seed``) and that base, untouched."""
    base = llama(seed, bias)
    torch.manual_seed(seed + 100)
    return peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**(config or random_config(seed)))), base


def logits(model, ids=None):
    with torch.no_grad():
        return model.eval()(input_ids=tokens() if ids is None else ids).logits


def vector_grads(model) -> dict:
    """The gradient of every (IA)³ vector by its name in the model PEFT wraps."""
    return {n.removeprefix(PREFIX): p.grad for n, p in model.named_parameters() if "ia3_l" in n and p.grad is not None}


def backward(model):
    model.train()
    model(input_ids=tokens(), labels=tokens()).loss.backward()
    model.eval()


def peft_layers(model) -> dict:
    """PEFT's IA3 layers by name in the model PEFT wraps: (feedforward, adapters)."""
    from peft.tuners.ia3.layer import IA3Layer
    return {n.removeprefix(PREFIX): (m.is_feedforward, list(m.ia3_l)) for n, m in model.named_modules()
            if isinstance(m, IA3Layer)}


def ours_layers(model) -> dict:
    return {n: (m.feedforward, list(m.ia3_l)) for n, m in fastpeft.ia3_layers(model).items()}


# ----------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4), ids=lambda s: f"config{s}-{'bias' if s % 2 else 'nobias'}")
def test_peft_and_fastpeft_load_each_other_s_files_with_peft_s_logits_and_gradients(tmp_path, seed):
    theirs, base = peft_ia3(seed, bias=seed % 2 == 1)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert ours_layers(ours) == peft_layers(theirs) and ours_layers(ours)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-6, atol=1e-6)
    backward(ours)
    backward(theirs)
    want, got = vector_grads(theirs), vector_grads(ours)
    assert got.keys() == want.keys()
    assert all(rel_err(got[k], want[k]) <= 1e-5 for k in want)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(want)

    fastpeft.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / CONFIG).read_text())
    peft_config = json.loads((tmp_path / "peft" / CONFIG).read_text())
    assert config.keys() == peft_config.keys() and config["peft_type"] == "IA3"
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    saved = safetensors.torch.load_file(tmp_path / "ours" / WEIGHTS)
    expected = safetensors.torch.load_file(tmp_path / "peft" / WEIGHTS)
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    assert peft_layers(reloaded) == peft_layers(theirs)
    torch.testing.assert_close(logits(reloaded), logits(theirs), rtol=1e-6, atol=1e-6)


def test_a_bf16_base_loads_peft_s_file_with_fp32_vectors(tmp_path):
    theirs, base = peft_ia3(5, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False)
    theirs.to(torch.bfloat16)  # PEFT's vectors too; fastpeft keeps its own in fp32, as PEFT's autocast would
    theirs.save_pretrained(str(tmp_path))
    ours = fastpeft.load_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    layer = ours.model.layers[0].mlp.down_proj
    assert layer.ia3_l["default"].dtype == torch.float32 and layer.feedforward
    assert rel_err(logits(ours), logits(theirs)) <= 2e-2


class Nested(nn.Module):
    """Module names that end other names: ``fc`` ends ``block.fc`` as PEFT's target lists match (after a dot), and
    ``xfc`` as its feedforward lists match (any suffix)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.xfc = nn.Linear(12, 12)
        self.block = nn.Module()
        self.block.fc = nn.Linear(12, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(torch.relu(self.block.fc(torch.tanh(self.xfc(torch.tanh(self.fc(x)))))))


def test_names_ending_other_names_are_saved_as_patterns_peft_reads_exactly(tmp_path):
    torch.manual_seed(0)
    base = Nested()
    ours = fastpeft.apply_ia3(copy.deepcopy(base), r"x?fc", r"fc", init_ia3_weights=False)
    assert ours_layers(ours) == {"fc": (True, ["default"]), "xfc": (False, ["default"])}
    fastpeft.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["target_modules"] == "fc|xfc" and config["feedforward_modules"] == "fc"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert peft_layers(theirs) == ours_layers(ours)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert rel_err(theirs(x), ours(x)) <= 1e-6
    # without the clashes, plain lists of the full names
    fastpeft.save_adapter(fastpeft.apply_ia3(Nested(), ["xfc", "block.fc"], ["block.fc"]), tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert config["target_modules"] == ["block.fc", "xfc"] and config["feedforward_modules"] == ["block.fc"]


def test_a_second_adapter_loads_beside_the_first_and_runs_as_peft_s(tmp_path):
    first, base = peft_ia3(0, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                           init_ia3_weights=False)
    first.save_pretrained(str(tmp_path / "first"))
    torch.manual_seed(9)
    second = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False))
    second.save_pretrained(str(tmp_path / "second"))
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path / "first")
    fastpeft.load_adapter(ours, tmp_path / "second", adapter_name="other", backend="torch")
    layer = ours.model.layers[1].self_attn.k_proj
    assert list(layer.ia3_l) == ["default", "other"] and layer.active_adapter == "default" and layer.backend == "torch"
    torch.testing.assert_close(logits(ours), logits(first), rtol=1e-6, atol=1e-6)
    fastpeft.set_adapter(ours, "other")
    torch.testing.assert_close(logits(ours), logits(second), rtol=1e-6, atol=1e-6)
    # a name already there is replaced in place, merged or not
    ours.model.layers[0].self_attn.k_proj.merge()
    fastpeft.load_adapter(ours, tmp_path / "first", adapter_name="other")
    torch.testing.assert_close(logits(ours), logits(first), rtol=1e-5, atol=1e-6)
    assert not ours.model.layers[0].self_attn.k_proj.merged


def test_a_null_feedforward_modules_is_peft_s_table_for_the_model_type(tmp_path):
    theirs, base = peft_ia3(1, target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"],
                            init_ia3_weights=False)
    theirs.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / CONFIG).read_text())
    (tmp_path / CONFIG).write_text(json.dumps({**config, "feedforward_modules": None}))
    ours = fastpeft.load_adapter(copy.deepcopy(base), tmp_path)  # llama's feed-forward module: down_proj
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# What loading refuses, with the model unchanged
# ----------------------------------------------------------------------------------------------------------

def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_refused(model, folder, match, error=fastpeft.AdapterFileError, **kwargs):
    before = state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(error, match=match):
        fastpeft.load_adapter(model, folder, **kwargs)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = state(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], v) for k, v in after.items())


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory):
    """PEFT's files for k_proj, v_proj (output scales) and down_proj (an input scale) of tiny_llama(0)."""
    folder = tmp_path_factory.mktemp("ia3") / "peft"
    theirs, _ = peft_ia3(0, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)
    theirs.save_pretrained(str(folder))
    return folder


def edited(folder, tmp_path, config=None, tensors=None):
    """A copy of the adapter in ``folder`` with its config updated by ``config`` and its tensors by ``tensors``
    (a function of the dict of tensors)."""
    out = tmp_path / "edited"
    out.mkdir()
    base_config = json.loads((folder / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**base_config, **(config or {})}))
    loaded = safetensors.torch.load_file(folder / WEIGHTS)
    safetensors.torch.save_file(tensors(dict(loaded)) if tensors else loaded, str(out / WEIGHTS))
    return out


K0, DOWN0 = f"{PREFIX}model.layers.0.self_attn.k_proj.ia3_l", f"{PREFIX}model.layers.0.mlp.down_proj.ia3_l"

REFUSED = {
    "vector-shape-does-not-fit": (dict(tensors=lambda t: {**t, K0: torch.ones(15, 1)}),
                                  r"k_proj: ia3_l has shape \(15, 1\), but as an output scale of a 32 -> 16 layer it "
                                  r"needs \(16, 1\) \(no vector of this layer\)"),
    "feedforward-disagrees-with-the-vectors": (dict(config={"feedforward_modules": []}),
                                               r"down_proj: ia3_l has shape \(1, 64\).*other side's shape"),
    "feedforward-not-a-target": (dict(config={"feedforward_modules": ["o_proj"]}),
                                 r"feedforward_modules must be a subset of target_modules.*\['o_proj'\]"),
    "a-selected-layer-without-its-vector": (dict(tensors=lambda t: {k: v for k, v in t.items() if k != K0}),
                                            r"layers\.0\.self_attn\.k_proj: selected by the config's target_modules, "
                                            "but the file holds no vector"),
    "a-vector-the-config-does-not-select": (dict(config={"target_modules": ["k_proj", "v_proj"],
                                                         "feedforward_modules": []}),
                                            r"down_proj: not selected by the config's target_modules"),
    "excluded": (dict(config={"exclude_modules": r".*layers\.1\..*"}), r"layers\.1\.self_attn\.k_proj: not selected"),
    "an-unexpected-key": (dict(tensors=lambda t: {**t, f"{PREFIX}lm_head.weight": torch.ones(97, 32)}),
                          r"unexpected key 'base_model\.model\.lm_head\.weight'"),
    "no-module-of-that-name": (dict(tensors=lambda t: {**t, f"{PREFIX}model.layers.7.mlp.down_proj.ia3_l":
                                                       torch.ones(1, 64)}),
                               r"layers\.7\.mlp\.down_proj: no module of that name"),
    "integer-vector": (dict(tensors=lambda t: {**t, K0: torch.ones(16, 1, dtype=torch.int32)}),
                       r"must be floating point.*torch\.int32"),
    "nan": (dict(tensors=lambda t: {**t, K0: torch.full((16, 1), float("nan"))}), r"k_proj: ia3_l holds values that "
            r"are not finite in the vector's dtype float32"),
    "fp64-past-fp32-range": (dict(tensors=lambda t: {**t, K0: torch.full((16, 1), 1e300, dtype=torch.float64)}),
                             r"not finite in the vector's dtype float32"),
    "fan-in-fan-out": (dict(config={"fan_in_fan_out": True}), r"does not implement for \(IA\)³: \{'fan_in_fan_out': "
                       r"True\} \(fan_in_fan_out: transformers' Conv1D"),
    "modules-to-save": (dict(config={"modules_to_save": ["lm_head"]}), r"'modules_to_save': \['lm_head'\]"),
    "unknown-field": (dict(config={"ia3_future": {"on": 1}}), r"fields fastpeft does not know for IA3.*ia3_future"),
    "bad-regex": (dict(config={"target_modules": "("}), r"'\(' is not a valid regular expression"),
    "wrong-type": (dict(config={"init_ia3_weights": "yes"}), r"init_ia3_weights must be true or false, got 'yes'"),
    "other-tuner": (dict(config={"peft_type": "LOHA"}), r"peft_type must be 'LORA' or 'IA3', got 'LOHA'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_file_that_does_not_fit_is_refused_before_any_change(peft_folder, tmp_path, case):
    edit, match = REFUSED[case]
    assert_refused(tiny_llama(), edited(peft_folder, tmp_path, **edit), match)


def test_every_problem_is_listed_together(peft_folder, tmp_path):
    folder = edited(peft_folder, tmp_path, config={"feedforward_modules": []},
                    tensors=lambda t: {**t, K0: torch.ones(15, 1)})
    assert_refused(tiny_llama(), folder, r"(?=.*layers\.0\.self_attn\.k_proj: ia3_l has shape \(15, 1\))"
                                         r"(?=.*layers\.1\.mlp\.down_proj: ia3_l has shape \(1, 64\))")


@pytest.mark.parametrize("case", ["lora-layer-there", "ia3-layer-scaling-the-other-side", "name-on-other-layers",
                                  "bad-backend"])
def test_loading_into_adapted_layers_is_refused_where_it_cannot_be_peft_s(peft_folder, case):
    model = tiny_llama()
    error = fastpeft.AdapterFileError
    kwargs = {}
    if case == "lora-layer-there":
        fastpeft.apply_lora(model, ["k_proj"], r=2)
        match = r"layers\.0\.self_attn\.k_proj: a LoRA layer already"
    elif case == "ia3-layer-scaling-the-other-side":
        fastpeft.apply_ia3(model, ["k_proj", "v_proj", "down_proj"], ["k_proj", "down_proj"])
        match = r"k_proj: the config makes it an output scale, but the model's \(IA\)³ layer there scales its input"
    elif case == "name-on-other-layers":
        fastpeft.apply_ia3(model, ["q_proj"])
        error, match = ValueError, r"adapter named 'default' on layers the file does not hold"
    else:
        kwargs, error, match = {"backend": "tritn"}, ValueError, "backend"
    assert_refused(model, peft_folder, match, error, **kwargs)


def test_gpt2_conv1d_files_are_refused_with_the_reason(tmp_path):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]))
    theirs.save_pretrained(str(tmp_path / "gpt2"))
    assert_refused(copy.deepcopy(base), tmp_path / "gpt2", r"\{'fan_in_fan_out': True\} \(fan_in_fan_out: "
                                                           r"transformers' Conv1D")
    folder = edited(tmp_path / "gpt2", tmp_path, config={"fan_in_fan_out": False})
    assert_refused(copy.deepcopy(base), folder, r"transformer\.h\.0\.attn\.c_attn: a transformers Conv1D \(GPT-2 "
                                                r"style, weights stored transposed")


def test_a_null_feedforward_modules_is_refused_where_peft_has_no_table(tmp_path):
    model = fastpeft.apply_ia3(Nested(), ["fc"], ["fc"])
    fastpeft.save_adapter(model, tmp_path / "nested")
    folder = edited(tmp_path / "nested", tmp_path, config={"feedforward_modules": None})
    assert_refused(Nested(), folder, r"feedforward_modules is null: PEFT then takes them from its table by the "
                                     r"transformers model type, which has no entry for this model")


# ----------------------------------------------------------------------------------------------------------
# Conversions: from_peft and to_peft
# ----------------------------------------------------------------------------------------------------------

def two_adapters(seed):
    """A PEFT IA3 Llama with a second adapter on the same layers (other vectors), and its base. (A layer without the
    active adapter runs its base alone in PEFT; the conversion refuses it, as for LoRA.)"""
    theirs, base = peft_ia3(seed)
    torch.manual_seed(seed + 200)
    theirs.add_adapter("second", peft.IA3Config(**random_config(seed)))
    return theirs, base


def trainable(model) -> dict:
    return {n.removeprefix(PREFIX): p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"config{s}")
def test_from_peft_and_to_peft_keep_the_parameters_logits_and_gradients(tmp_path, seed):
    theirs, base = two_adapters(seed)
    twin = copy.deepcopy(theirs)
    params = dict(theirs.named_parameters())
    model = fastpeft.from_peft(theirs)
    assert ours_layers(model) == peft_layers(twin)
    assert all(p is params[PREFIX + n] for n, p in model.named_parameters())  # PEFT's own tensors
    assert trainable(model) == trainable(twin)
    torch.testing.assert_close(logits(model), logits(twin), rtol=1e-6, atol=1e-6)
    backward(model)
    backward(twin)
    want, got = vector_grads(twin), vector_grads(model)
    assert got.keys() == want.keys() and all(rel_err(got[k], want[k]) <= 1e-5 for k in want)
    # the old wrapper's save is refused; fastpeft's save of it writes what PEFT loads
    with pytest.raises(RuntimeError, match="fastpeft.save_adapter"):
        theirs.save_pretrained(str(tmp_path / "refused"))
    fastpeft.save_adapter(theirs, tmp_path / "ours")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(reloaded), logits(twin), rtol=1e-6, atol=1e-6)

    back = fastpeft.to_peft(model)
    assert isinstance(back, peft.PeftModel) and back.state_dict().keys() == twin.state_dict().keys()
    assert all(p is params[n] for n, p in back.named_parameters())
    assert peft_layers(back) == peft_layers(twin) and trainable(back) == trainable(twin)
    torch.testing.assert_close(logits(back), logits(twin), rtol=1e-6, atol=1e-6)
    for model in (back, twin):
        model.set_adapter("second")
    torch.testing.assert_close(logits(back), logits(twin), rtol=1e-6, atol=1e-6)
    back.save_pretrained(str(tmp_path / "back"))
    twin.save_pretrained(str(tmp_path / "twin"))
    for sub in ("", "second"):
        got = safetensors.torch.load_file(tmp_path / "back" / sub / WEIGHTS)
        want = safetensors.torch.load_file(tmp_path / "twin" / sub / WEIGHTS)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_merged_and_disabled_layers_convert_both_ways():
    theirs, _ = peft_ia3(4, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)
    theirs.merge_adapter()
    twin = copy.deepcopy(theirs)
    model = fastpeft.from_peft(theirs)
    assert {layer.merged_adapter for layer in fastpeft.ia3_layers(model).values()} == {"default"}
    torch.testing.assert_close(logits(model), logits(twin), rtol=1e-6, atol=1e-6)
    back = fastpeft.to_peft(model)
    assert all(m.merged_adapters == ["default"] for m in back.modules() if hasattr(m, "ia3_l"))
    with pytest.warns(UserWarning, match="inaccurate"):  # PEFT's unmerge, as on the twin
        back.unmerge_adapter()
        twin.unmerge_adapter()
    torch.testing.assert_close(logits(back), logits(twin), rtol=1e-6, atol=1e-6)

    layer = back.base_model.model.model.layers[0].self_attn.k_proj
    layer.enable_adapters(False)
    converted = fastpeft.from_peft(back)
    assert not converted.model.layers[0].self_attn.k_proj.adapters_enabled
    assert fastpeft.to_peft(converted).base_model.model.model.layers[0].self_attn.k_proj.disable_adapters


def test_from_peft_keeps_a_trained_base_bias_training():
    """A bias the user trains beside PEFT's vectors keeps requires_grad (Ia3Linear's constructor froze it), and gets
    PEFT's gradient."""
    theirs, _ = peft_ia3(2, bias=True, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                         init_ia3_weights=False)
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        theirs.get_base_model().model.layers[0].get_submodule(name).base_layer.bias.requires_grad_(True)
    twin = copy.deepcopy(theirs)
    want = {n.removeprefix(PREFIX): p.requires_grad for n, p in twin.named_parameters()}
    model = fastpeft.from_peft(theirs)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want
    backward(model), backward(twin)
    grads = {n.removeprefix(PREFIX): p.grad for n, p in twin.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_conversions_refuse_what_the_other_side_cannot_run_the_same():
    theirs, _ = two_adapters(1)
    theirs.base_model.set_adapter(["default", "second"])  # PEFT multiplies the vectors; an Ia3Linear runs one
    before = [(n, type(m)) for n, m in theirs.named_modules()]
    with pytest.raises(ValueError, match=r"2 active adapters \['default', 'second'\]"):
        fastpeft.from_peft(theirs)
    assert [(n, type(m)) for n, m in theirs.named_modules()] == before
    gpt2 = peft.get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)), peft.IA3Config(
        target_modules=["c_attn"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True \(transformers' Conv1D weights"):
        fastpeft.from_peft(gpt2)

    mixed = fastpeft.apply_ia3(fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2), ["k_proj"])
    before = [(n, type(m)) for n, m in mixed.named_modules()]
    with pytest.raises(ValueError, match=r"one tuner type.*LoRA layers \(model\.layers\.0\.self_attn\.q_proj"):
        fastpeft.to_peft(mixed)
    assert [(n, type(m)) for n, m in mixed.named_modules()] == before
    split = fastpeft.apply_ia3(fastpeft.apply_ia3(tiny_llama(), ["k_proj"]), ["v_proj"], adapter_name="b")
    with pytest.raises(ValueError, match="active adapters differ"):
        fastpeft.to_peft(split)


# ----------------------------------------------------------------------------------------------------------
# fuse: PEFT's IA3 model running fastpeft's op in place
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def counted(monkeypatch):
    """How many calls ran fastpeft's ia3_linear."""
    calls = []
    real = peft_fuse.ia3_linear
    monkeypatch.setattr(peft_fuse, "ia3_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("seed", range(3), ids=lambda s: f"config{s}-{'bias' if s == 1 else 'nobias'}")
def test_fused_ia3_logits_and_gradients_are_peft_s(counted, monkeypatch, seed):
    # Calls this small are differentiated by autograd over the torch path's ops; make them run the op's own backward.
    monkeypatch.setattr(importlib.import_module("fastpeft.ops.ia3_linear"), "SMALL_CALL", 0)
    plain, _ = peft_ia3(seed, bias=seed == 1)
    fused = copy.deepcopy(plain)
    assert fastpeft.fuse(fused) is fused
    layers = len(peft_layers(plain))
    backward(plain)
    backward(fused)
    assert len(counted) == layers  # every layer ran fused
    want, got = vector_grads(plain), vector_grads(fused)
    assert got.keys() == want.keys() and len(want) == layers
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
    report = fastpeft.fuse_report(fused)
    assert len(report) == layers and set(report.values()) == {None}


def test_each_call_follows_peft_s_state(counted):
    """Several active adapters run fused as the product of their vectors; merged or disabled adapters, and a layer
    without the active adapter, run PEFT's code; adapters added later run fused; unfuse restores PEFT's forward."""
    plain, _ = two_adapters(2)
    fused = fastpeft.fuse(copy.deepcopy(plain))
    layers = len(peft_layers(plain))
    for model in (plain, fused):
        model.base_model.set_adapter(["default", "second"])
    backward(plain)
    backward(fused)
    assert len(counted) == layers
    want, got = vector_grads(plain), vector_grads(fused)
    assert got.keys() == want.keys() and any("second" in k for k in want)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
    counted.clear()
    for model in (plain, fused):
        model.set_adapter("default")
        model.merge_adapter()
    torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
    assert not counted and set(fastpeft.fuse_report(fused).values()) == {"an adapter is merged"}
    with pytest.warns(UserWarning, match="inaccurate"):
        for model in (plain, fused):
            model.unmerge_adapter()
    with fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
        assert set(fastpeft.fuse_report(fused).values()) == {"adapters are disabled"}
    assert not counted
    for model in (plain, fused):
        torch.manual_seed(5)  # the same new vectors in both
        model.add_adapter("third", peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[],
                                                  init_ia3_weights=False))
        model.set_adapter("third")
    torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
    assert len(counted) == 2  # the new q_proj layers, fused; the others lack "third" and run their bases
    report = fastpeft.fuse_report(fused)
    assert [n for n, why in report.items() if why is None] == [f"{PREFIX}model.layers.{i}.self_attn.q_proj"
                                                              for i in range(2)]
    assert all("none of the active adapters ['third'] is on the layer" in why for why in report.values() if why)
    counted.clear()
    assert fastpeft.unfuse(fused) is fused
    torch.testing.assert_close(logits(fused), logits(plain), rtol=1e-5, atol=1e-5)
    assert not counted and not any("forward" in vars(m) for m in fused.modules())


def test_conv1d_layers_run_peft_s_code_when_fused(counted):
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32)
    torch.manual_seed(0)
    plain = peft.get_peft_model(transformers.GPT2LMHeadModel(config), peft.IA3Config(
        target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"], init_ia3_weights=False))
    fused = fastpeft.fuse(copy.deepcopy(plain))
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(fused, ids), logits(plain, ids))
    assert not counted
    assert all("fan_in_fan_out=True" in why for why in fastpeft.fuse_report(fused).values())


def test_4bit_bases_load_peft_s_files_run_peft_s_code_when_fused_and_are_refused_by_from_peft(counted, tmp_path):
    plain = peft.get_peft_model(bnb_nf4_mlp(), peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"],
                                                              init_ia3_weights=False))
    fused = fastpeft.fuse(copy.deepcopy(plain))
    plain.save_pretrained(str(tmp_path))
    ours = fastpeft.load_adapter(bnb_nf4_mlp(), tmp_path)  # Ia3Linear over the NF4 view of each layer
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fused(x), plain(x))
        assert rel_err(ours(x), plain(x)) <= 1e-2
    assert not counted
    assert all(why.startswith("base layer is a Linear4bit") for why in fastpeft.fuse_report(fused).values())
    with pytest.raises(ValueError, match=r"base layer is a Linear4bit.*fastpeft runs \(IA\)³ over a plain nn.Linear"):
        fastpeft.from_peft(plain)


def test_trainer_trains_a_fused_ia3_model_as_peft_s(tmp_path):
    """transformers.Trainer on the fused model: PEFT's losses, and save_model writes the adapter PEFT would."""
    data = [{"input_ids": tokens(seed)[0], "labels": tokens(seed)[0]} for seed in range(4)]
    plain, _ = peft_ia3(0, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                        init_ia3_weights=False)
    fused = fastpeft.fuse(copy.deepcopy(plain))
    losses, saved = {}, {}
    for which, model in (("plain", plain), ("fused", fused)):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / which), max_steps=3, learning_rate=1e-2,
                                              per_device_train_batch_size=2, save_strategy="no", report_to=[],
                                              use_cpu=True, logging_steps=1, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[which] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.save_model(str(tmp_path / which / "final"))
        saved[which] = safetensors.torch.load_file(tmp_path / which / "final" / WEIGHTS)
    assert len(losses["fused"]) == 3 and losses["fused"][-1] != losses["fused"][0]
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=0)
    assert saved["fused"].keys() == saved["plain"].keys() and len(saved["fused"]) == 6
    for key, tensor in saved["plain"].items():
        torch.testing.assert_close(saved["fused"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------------------
# What saving refuses; saves killed midway
# ----------------------------------------------------------------------------------------------------------

def test_save_refuses_one_name_on_lora_and_ia3_layers_and_bare_layers(tmp_path):
    model = fastpeft.apply_ia3(fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2), ["k_proj"])
    with pytest.raises(ValueError, match=r"adapter 'default' is LoRA on .*q_proj.* and \(IA\)³ on .*k_proj.*one "
                                         "tuner type per adapter"):
        fastpeft.save_adapter(model, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    with pytest.raises(ValueError, match="a bare Ia3Linear has none"):
        fastpeft.save_adapter(fastpeft.Ia3Linear(nn.Linear(4, 4)), tmp_path / "bare")
    shared = nn.Linear(4, 4)
    model = fastpeft.apply_ia3(nn.Sequential(shared, nn.ReLU(), shared), ["0"])
    with pytest.raises(ValueError, match=r"one module used at several places"):
        fastpeft.save_adapter(model, tmp_path / "shared")


@pytest.mark.parametrize("how", ["apply_ia3", "load_adapter", "from_peft"])
def test_save_pretrained_of_a_model_with_ia3_layers_is_refused_until_they_are_gone(tmp_path, how):
    """transformers would write the Ia3Linear layers under names from_pretrained cannot load (their weights then start
    random, silently): refused, as for LoRA layers, for every way (IA)³ layers get into a model."""
    if how == "apply_ia3":
        model = fastpeft.apply_ia3(tiny_llama(), ["k_proj", "down_proj"], ["down_proj"], init_ia3_weights=False)
    else:
        theirs, _ = peft_ia3(0, target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                             init_ia3_weights=False)
        if how == "from_peft":
            model = fastpeft.from_peft(theirs)
        else:
            theirs.save_pretrained(str(tmp_path / "adapter"))
            model = fastpeft.load_adapter(tiny_llama(), tmp_path / "adapter")
    with pytest.raises(RuntimeError, match=r"save_pretrained: the model holds fastpeft layers \(model.layers.0.*"
                                           r"fastpeft.save_adapter"):
        model.save_pretrained(str(tmp_path / "whole"))
    assert not (tmp_path / "whole").exists()
    want = logits(model)
    fastpeft.merge_and_unload(model)
    model.save_pretrained(str(tmp_path / "merged"))  # the model's own save, once the layers are gone
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(reloaded), want, rtol=1e-5, atol=1e-5)


LAYERS = 100
TAGS = (3, 5)  # adapter "3": every layer an output scale, every entry 3.0; adapter "5": input scales of 5.0


def tagged_model(tag):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(LAYERS)])
    fastpeft.apply_ia3(model, r"\d+", r"\d+" if tag == 5 else None)
    with torch.no_grad():
        for layer in fastpeft.ia3_layers(model).values():
            layer.ia3_l["default"].fill_(tag)
    return model


def whole_adapter(folder) -> int:
    """The tag of the adapter in ``folder``; a config of one save with the vectors of another fails to load."""
    model = fastpeft.load_adapter(nn.Sequential(*[nn.Linear(4, 4) for _ in range(LAYERS)]), folder)
    layers = fastpeft.ia3_layers(model).values()
    tags = {float(t) for layer in layers for t in layer.ia3_l["default"].detach().unique()}
    sides = {layer.feedforward for layer in layers}
    assert len(tags) == 1 and len(sides) == 1 and sides == {tags == {5.0}}, (tags, sides)
    return int(tags.pop())


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_saves_killed_at_random_instants_leave_one_whole_adapter(tmp_path):
    models = {tag: tagged_model(tag) for tag in TAGS}
    folder = tmp_path / "adapter"
    fastpeft.save_adapter(models[3], folder)
    rng = random.Random(0)

    def save_forever():
        while True:
            for tag in (5, 3):
                fastpeft.save_adapter(models[tag], folder)

    seen, kills, deadline = set(), 0, time.monotonic() + 15
    while kills < 12 and time.monotonic() < deadline:
        pid = fork(save_forever)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills += 1
        seen.add(whole_adapter(folder))
        assert sorted(os.listdir(folder)) == [CONFIG, WEIGHTS]
    assert kills >= 5 and seen == set(TAGS)
    fastpeft.save_adapter(models[5], folder)
    assert sorted(os.listdir(tmp_path)) == ["adapter"] and whole_adapter(folder) == 5
