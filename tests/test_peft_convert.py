"""HF PEFT both ways on a tiny Llama: from_peft / to_peft keep the very same parameters and outputs, save/load round
trips through PEFT's files, and every PEFT feature fastpeft lacks is refused with the model unchanged."""
import copy

import pytest
import torch
from conftest import TOLERANCE, rel_err, tiny_llama

import fastpeft

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(seed=1):
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def close(a, b):
    return torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def peft_llama(dropout=0.0, **extra):
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, use_rslora=True,
                             init_lora_weights=False, rank_pattern={"down_proj": 2}, **extra)
    model = peft.get_peft_model(tiny_llama(), config, adapter_name="task")
    model.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))
    return model


def peft_layer_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def test_from_peft_keeps_parameters_outputs_and_gradients():
    theirs = peft_llama()
    ids = tokens()
    want = logits(theirs, ids)
    reference = copy.deepcopy(theirs).double().train()  # gradients in float64: what both are measured against
    reference(input_ids=ids, labels=ids).loss.backward()
    ref_grads = [p.grad for p in reference.parameters() if p.requires_grad]
    theirs.train()
    theirs(input_ids=ids, labels=ids).loss.backward()
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    peft_grads = [p.grad.clone() for p in trainable]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    peft_a = {n: m.lora_A["task"].weight for n, m in theirs.base_model.model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}

    ours = fastpeft.from_peft(theirs)
    assert ours is theirs.get_base_model() and not peft_layer_names(ours)
    layers = fastpeft.lora_layers(ours)
    assert sorted(layers) == sorted(peft_a) and len(layers) == 14
    for name, layer in layers.items():
        assert layer.adapters["task"].lora_A is peft_a[name]  # the same Parameter, not a copy
        assert layer.active_adapter == "task" and layer.training
        assert layer.adapters["task"].use_rslora and layer.r == (2 if name.endswith("down_proj") else 4)
    assert sorted(n for n, m in layers.items() if "other" in m.adapters) == sorted(
        n for n in layers if n.endswith(("q_proj", "v_proj")))
    ours.eval()
    assert close(logits(ours, ids), want)

    ours.train()
    ours.zero_grad()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert [p for p in ours.parameters() if p.requires_grad] == trainable
    for param, peft_grad, ref in zip(trainable, peft_grads, ref_grads, strict=True):
        # Both are fp32 roundings of the float64 gradient: fastpeft within the fp32 budget, or within twice PEFT's
        # own error where the model's fp32 arithmetic (not the LoRA layers) dominates.
        assert rel_err(param.grad, ref) <= max(TOLERANCE[torch.float32], 2 * rel_err(peft_grad, ref))
    optimizer.step()  # an optimizer made before the conversion trains the converted model
    ours.eval()
    assert not close(logits(ours, ids), want)


def test_to_peft_and_back_keeps_the_same_tensors(tmp_path):
    model = fastpeft.apply_lora(tiny_llama(), TARGETS, r=4, lora_alpha=8, lora_dropout=0.05,
                                init_lora_weights=False)
    fastpeft.apply_lora(model, ["v_proj"], r=2, lora_alpha=2, adapter_name="second", init_lora_weights=False)
    ids = tokens()
    want = logits(model, ids)
    params = {n: (layer.adapters["default"].lora_A, layer.adapters["default"].lora_B)
              for n, layer in fastpeft.lora_layers(model).items()}

    theirs = fastpeft.to_peft(model)
    assert isinstance(theirs, peft.PeftModel) and theirs.get_base_model() is model
    assert sorted(theirs.peft_config) == ["default", "second"] and theirs.active_adapter == "default"
    for name, (a, b) in params.items():
        layer = model.get_submodule(name)
        assert layer.lora_A["default"].weight is a and layer.lora_B["default"].weight is b
        assert layer.lora_dropout["default"].p == 0.05 and a.requires_grad
    assert close(logits(theirs, ids), want)

    theirs.save_pretrained(str(tmp_path))  # PEFT's own files load into a fresh model, by PEFT and by fastpeft
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    assert close(logits(reloaded, ids), want)
    assert close(logits(fastpeft.load_adapter(tiny_llama(), tmp_path).eval(), ids), want)

    back = fastpeft.from_peft(theirs)
    for name, (a, b) in params.items():
        adapter = back.get_submodule(name).adapters["default"]
        assert adapter.lora_A is a and adapter.lora_B is b
    assert sorted(fastpeft.lora_layers(back)["model.layers.0.self_attn.v_proj"].adapters) == ["default", "second"]
    assert close(logits(back, ids), want)

    plain = fastpeft.to_peft(back).merge_and_unload()  # PEFT's own tools work on the result
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(logits(plain, ids), want, rtol=1e-5, atol=1e-5)


def test_merge_and_disable_state_carry_over_both_ways():
    theirs = peft_llama()
    ids = tokens()
    base_out = logits(tiny_llama(), ids)
    want = logits(theirs, ids)
    q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    q.merge()
    theirs.base_model.model.model.layers[1].mlp.down_proj.enable_adapters(False)
    expected = logits(theirs, ids)
    ours = fastpeft.from_peft(theirs)
    layers = fastpeft.lora_layers(ours)
    assert layers["model.layers.0.self_attn.q_proj"].merged_adapter == "task"
    assert not layers["model.layers.1.mlp.down_proj"].adapters_enabled
    assert close(logits(ours, ids), expected)
    back = fastpeft.to_peft(ours)
    assert close(logits(back, ids), expected)
    q = back.base_model.model.model.layers[0].self_attn.q_proj
    assert q.merged_adapters == ["task"]
    q.unmerge()
    back.base_model.model.model.layers[1].mlp.down_proj.enable_adapters(True)
    # merge + unmerge round the weight once each way, so this is as close as PEFT alone gets
    assert torch.allclose(logits(back, ids), want, rtol=1e-5, atol=1e-5) and not close(want, base_out)


def test_fastpeft_peft_fastpeft_files_round_trip(tmp_path):
    model = fastpeft.apply_lora(tiny_llama(), TARGETS, r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                                adapter_name="task")
    ids = tokens()
    want = logits(model, ids)
    fastpeft.save_adapter(model, tmp_path / "ours", adapter_name="task")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours"), adapter_name="task").eval()
    assert close(logits(theirs, ids), want)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = fastpeft.load_adapter(tiny_llama(), tmp_path / "theirs" / "task", adapter_name="task").eval()
    assert close(logits(back, ids), want)


def _dora_merged_with_zero_rows():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight[0] = 0.0
    layer.merge()
    return model


def _several_active():
    model = peft_llama()
    model.base_model.set_adapter(["task", "other"])
    return model


def _scaled():
    model = peft_llama()
    model.base_model.model.model.layers[0].self_attn.q_proj.set_scale("task", 0.5)
    return model


UNSUPPORTED = {
    "dora_merged": (_dora_merged_with_zero_rows, "rows of magnitude 0"),
    "lora_bias": (lambda: peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                            lora_bias=True)), "LoRA bias"),
    "embedding": (lambda: peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["embed_tokens",
                                                                                                 "q_proj"])),
                  "peft.tuners.lora.layer.Embedding"),
    "modules_to_save": (lambda: peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])), "ModulesToSaveWrapper"),
    "loha": (lambda: peft.get_peft_model(tiny_llama(), peft.LoHaConfig(target_modules=["k_proj"])),
             "tuner type LOHA"),
    "several_active": (_several_active, "2 active adapters"),
    "scaled": (_scaled, "set_scale"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_from_peft_refuses_what_it_cannot_run_the_same(case):
    build, message = UNSUPPORTED[case]
    theirs = build()
    before = {n: type(m) for n, m in theirs.named_modules()}
    with pytest.raises(ValueError, match="does not support") as err:
        fastpeft.from_peft(theirs)
    assert message in str(err.value)
    assert {n: type(m) for n, m in theirs.named_modules()} == before


def test_to_peft_refuses_what_peft_cannot_express():
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2)
    fastpeft.apply_lora(model, ["v_proj"], r=2, adapter_name="b")  # q: active default, v: active b
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="active adapters differ"):
        fastpeft.to_peft(model)
    for name, layer in fastpeft.lora_layers(model).items():
        if name.endswith("v_proj"):
            layer.add_adapter("default", lora_dropout=0.1)
    fastpeft.set_adapter(model, "default")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="one lora_dropout per adapter"):
        fastpeft.to_peft(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="no fastpeft LoRA layers"):
        fastpeft.to_peft(tiny_llama())
    fastpeft.apply_adapters(model, ["model.layers.0.mlp"], "pfeiffer", hidden_size=32)
    with pytest.raises(ValueError, match="PEFT has no bottleneck adapters"):
        fastpeft.to_peft(model)
    with pytest.raises(TypeError, match="peft_model must be"):
        fastpeft.from_peft(copy)
    with pytest.raises(ValueError, match="has no PEFT layers"):
        fastpeft.from_peft(tiny_llama())
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpeft.from_peft(peft_llama(), backend="tritn")


def test_bf16_base_with_fp32_adapters_stays_within_bf16_accuracy():
    """On half bases fastpeft runs the low-rank branch in the base dtype (fp32 accumulation) where PEFT upcasts x to
    fp32: both stay within bf16 accuracy of float64, PEFT somewhat closer (docs/peft.md, "Numerics against PEFT")."""
    theirs = peft.get_peft_model(tiny_llama().to(torch.bfloat16),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    ids = tokens()
    peft_logits = logits(theirs, ids)
    ours = fastpeft.from_peft(theirs)
    assert ours.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    our_logits = logits(ours, ids)
    exact = logits(copy.deepcopy(ours).double(), ids)  # bf16 weights are exact in float64
    assert our_logits.dtype == torch.bfloat16
    assert rel_err(our_logits, exact) < 2e-2 and rel_err(peft_logits, exact) < 2e-2


def test_the_peftmodel_left_behind_refuses_instead_of_saving_nothing(tmp_path):
    """After from_peft, PEFT's methods on the PeftModel cannot see the layers: saving, reading the state and
    changing adapters raise and write nothing; its forward still runs the adapters."""
    theirs = peft_llama()
    ids = tokens()
    want = logits(theirs, ids)
    ours = fastpeft.from_peft(theirs)
    assert close(logits(theirs, ids), want) and close(logits(ours, ids), want)
    calls = {
        "save_pretrained": lambda: theirs.save_pretrained(str(tmp_path / "saved")),
        "state_dict": lambda: peft.get_peft_model_state_dict(theirs, adapter_name="task"),
        "add_adapter": lambda: theirs.add_adapter("more", peft.LoraConfig(r=2, target_modules=["q_proj"])),
        "set_adapter": lambda: theirs.set_adapter("other"),
        "delete_adapter": lambda: theirs.delete_adapter("other"),
        "disable_adapter": lambda: theirs.disable_adapter().__enter__(),
        "merge_and_unload": lambda: theirs.merge_and_unload(),
        "unload": lambda: theirs.base_model.unload(),
        "merge_adapter": lambda: theirs.merge_adapter(),
        "load_adapter": lambda: theirs.load_adapter(str(tmp_path), adapter_name="x"),
        "add_weighted_adapter": lambda: theirs.add_weighted_adapter(["task"], [1.0], "w"),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"^{name}: fastpeft.from_peft converted .* fastpeft.save_adapter"):
            call()
    assert not (tmp_path / "saved").exists()
    assert close(logits(ours, ids), want)

    class ValueHead(torch.nn.Module):  # a module holding the wrapper collects its state as before
        def __init__(self):
            super().__init__()
            self.pretrained_model, self.v_head = theirs, torch.nn.Linear(32, 1)
    assert len(ValueHead().state_dict()) == len(ours.state_dict()) + 2
    copied = copy.deepcopy(theirs)
    with pytest.raises(RuntimeError, match="^save_pretrained: fastpeft.from_peft converted"):
        copied.save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="converted already"):
        fastpeft.from_peft(theirs)
    fastpeft.save_adapter(theirs, tmp_path / "via-wrapper", adapter_name="task")  # fastpeft's own tools see through it
    fastpeft.save_adapter(ours, tmp_path / "ours", adapter_name="task")
    for folder in ("ours", "via-wrapper"):
        back = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / folder), adapter_name="task").eval()
        assert close(logits(back, ids), want)
    again = fastpeft.to_peft(theirs)  # a PeftModel that works again (given the old one, its model)
    assert again.get_base_model() is ours
    again.save_pretrained(str(tmp_path / "again"))
    assert any((tmp_path / "again").rglob("adapter_model.safetensors"))


def test_save_pretrained_of_a_model_with_fastpeft_layers_is_refused_until_they_are_gone(tmp_path):
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj", "v_proj"], r=2, init_lora_weights=False)
    with pytest.raises(RuntimeError, match=r"save_pretrained: the model holds fastpeft layers \(model.layers.0"):
        model.save_pretrained(str(tmp_path / "whole"))
    assert not (tmp_path / "whole").exists()
    ids = tokens()
    copied = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="holds fastpeft layers"):
        copied.save_pretrained(str(tmp_path / "whole"))
    want = logits(model, ids)
    fastpeft.merge_and_unload(copied)
    copied.save_pretrained(str(tmp_path / "merged"))  # the model's own save, once the layers are gone
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.allclose(logits(reloaded, ids), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="holds fastpeft layers"):
        model.save_pretrained(str(tmp_path / "whole"))  # the copy's merge did not touch the original


@pytest.mark.parametrize("which", ["peft_model", "returned"])
def test_trainer_after_from_peft_never_saves_a_wrong_model(tmp_path, which):
    """Trainer.save_model on either object raises instead of writing an empty adapter or the whole base model."""
    theirs = peft_llama()
    ours = fastpeft.from_peft(theirs)
    data = [{"input_ids": tokens(seed)[0], "labels": tokens(seed)[0]} for seed in range(4)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                                          save_strategy="no", report_to=[], use_cpu=True, logging_strategy="no")
    trainer = transformers.Trainer(model=theirs if which == "peft_model" else ours, args=args, train_dataset=data)
    trainer.train()
    with pytest.raises(RuntimeError, match="fastpeft.save_adapter"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not list(tmp_path.glob("saved/**/*.safetensors"))
    fastpeft.save_adapter(ours, tmp_path / "adapter", adapter_name="task")
    back = fastpeft.load_adapter(tiny_llama(), tmp_path / "adapter", adapter_name="task").eval()
    assert close(logits(back, tokens()), logits(ours.eval(), tokens()))


@pytest.mark.parametrize("part", ["base_model", "get_base_model"])
def test_from_peft_on_a_part_of_a_peftmodel_is_refused(part):
    """The PeftModel around a part cannot be reached to tell its methods the layers moved: refused, nothing changed."""
    theirs = peft_llama()
    inner = theirs.base_model if part == "base_model" else theirs.get_base_model()
    before = {n: type(m) for n, m in theirs.named_modules()}
    with pytest.raises(TypeError, match="pass the PeftModel itself"):
        fastpeft.from_peft(inner)
    assert {n: type(m) for n, m in theirs.named_modules()} == before


def test_converted_models_are_freed_when_deleted():
    """The guards hold their models weakly: a deleted model is freed at once, without the cycle collector."""
    import gc
    import weakref

    def freed(build):
        model = build()
        ref = weakref.ref(model)
        del model
        return ref() is None
    gc.disable()
    try:
        assert freed(lambda: fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2))
        assert freed(lambda: fastpeft.from_peft(peft_llama()))
        peft_model = peft_llama()
        fastpeft.from_peft(peft_model)
        ref = weakref.ref(peft_model)
        del peft_model
        assert ref() is None
    finally:
        gc.enable()


def test_inner_transformers_models_refuse_save_pretrained_too(tmp_path):
    model = fastpeft.apply_lora(tiny_llama(), ["q_proj"], r=2)
    with pytest.raises(RuntimeError, match="holds fastpeft layers"):
        model.model.save_pretrained(str(tmp_path / "inner"))
    nf4 = fastpeft.quantize_nf4(tiny_llama())
    with pytest.raises(RuntimeError, match=r"NF4 layers have no transformers format: replace each by its "
                                           r"\.dequantized\(\)"):
        nf4.save_pretrained(str(tmp_path / "nf4"))
    assert not (tmp_path / "inner").exists() and not (tmp_path / "nf4").exists()
