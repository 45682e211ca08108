"""fastpeft.fuse: the user's own PeftModel, its LoRA layers running fastpeft's op in place. The fused model against
its unfused twin: outputs, gradients, the files save_pretrained writes, PEFT's adapter methods, Trainer; the calls
that run PEFT's own code; unfuse."""
import copy

import pytest
import safetensors.torch
import torch
from conftest import tiny_llama

import fastpeft
from fastpeft import peft_fuse

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tokens(seed=1):
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))


def twins(dropout=0.0, **extra):
    """A PEFT Llama and a fused copy of it (same weights)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False,
                             **extra)
    torch.manual_seed(3)
    plain = peft.get_peft_model(tiny_llama(), config)
    fused = copy.deepcopy(plain)
    assert fastpeft.fuse(fused) is fused
    return plain, fused


@pytest.fixture
def counted(monkeypatch):
    """How many calls ran fastpeft's op."""
    calls = []
    for name in ("lora_linear", "lora_linear_mixed"):
        real = getattr(peft_fuse, name)
        monkeypatch.setattr(peft_fuse, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"use_dora": True}])
def test_fused_outputs_and_gradients_are_peft_s(counted, extra):
    plain, fused = twins(**extra)
    ids = tokens()
    for model in (plain, fused):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(counted) == 2 * 7  # every LoRA layer of both blocks ran fused
    want, got = trainable_grads(plain), trainable_grads(fused)
    assert want.keys() == got.keys() and len(want) == 14 * (3 if extra.get("use_dora") else 2)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_the_model_stays_peft_s_and_saves_peft_s_files(tmp_path):
    plain, fused = twins(use_dora=True)
    assert type(fused) is type(plain) and fused.state_dict().keys() == plain.state_dict().keys()
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in plain.named_modules()]
    plain.save_pretrained(str(tmp_path / "plain"))
    fused.save_pretrained(str(tmp_path / "fused"))
    want = safetensors.torch.load_file(tmp_path / "plain" / "adapter_model.safetensors")
    got = safetensors.torch.load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(got) == 14 * 3
    assert all(torch.equal(got[k], want[k]) for k in want)
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "fused")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=tokens()).logits, plain.eval()(input_ids=tokens()).logits)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_s_methods_keep_working_and_new_adapters_run_fused(counted, dora):
    plain, fused = twins(use_dora=dora)
    ids = tokens()
    for model in (plain, fused):
        torch.manual_seed(7)  # the same new weights in both
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False, use_dora=dora))
        model.set_adapter("second")
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert len(counted) == 2 * 2  # the new adapter's layers, fused
        counted.clear()
        with fused.disable_adapter(), plain.disable_adapter():  # PEFT's own code: the base alone
            torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert not counted
        fused.set_adapter("default")
        plain.set_adapter("default")
        fused.merge_adapter()
        merged = fused(input_ids=ids).logits
        assert not counted  # merged: the base (holding the update) alone, as PEFT runs it
        fused.unmerge_adapter()
        torch.testing.assert_close(merged, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert len(counted) == 2 * 7
        mixed = ["default", "second"]
        counted.clear()
        if dora:  # PEFT refuses DoRA in a mixed batch, fused or not, in its own words (on copies: PEFT leaves its
            for model in (plain, fused):  # adapter_names hooks behind after that error)
                with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
                    copy.deepcopy(model)(input_ids=ids, adapter_names=mixed)
        else:
            torch.testing.assert_close(fused(input_ids=ids, adapter_names=mixed).logits,
                                       plain(input_ids=ids, adapter_names=mixed).logits)
            assert len(counted) == 2 * 7  # a mixed batch, fused
        unloaded = fused.merge_and_unload()
        torch.testing.assert_close(unloaded(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_fuse_report_says_which_layers_run_fused_and_why_not():
    plain, fused = twins()
    assert fastpeft.fuse_report(fused) == {n: None for n in fastpeft.fuse_report(fused)}
    assert len(fastpeft.fuse_report(fused)) == 14
    assert set(fastpeft.fuse_report(plain).values()) == {"not fused (fastpeft.fuse(peft_model) fuses it)"}
    with fused.disable_adapter():
        assert set(fastpeft.fuse_report(fused).values()) == {"adapters are disabled"}
    biased = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    fastpeft.fuse(biased)
    assert all("LoRA bias" in why for why in fastpeft.fuse_report(biased).values())
    with torch.no_grad():  # PEFT's own code runs it
        biased(input_ids=tokens())


def test_unfuse_restores_peft_s_forward(counted):
    plain, fused = twins()
    assert fastpeft.unfuse(fused) is fused
    fused.eval()(input_ids=tokens())
    assert not counted
    assert not any("forward" in m.__dict__ for m in fused.modules())
    assert "add_adapter" not in fused.__dict__


def test_fuse_takes_a_peft_model_only():
    for bad in (tiny_llama(), torch.nn.Linear(2, 2), None):
        with pytest.raises(TypeError, match="peft_model must be a peft.PeftModel"):
            fastpeft.fuse(bad)
    plain, fused = twins()
    with pytest.raises(TypeError, match="peft_model must be a peft.PeftModel"):
        fastpeft.fuse(fused.base_model)


def test_trainer_trains_and_saves_the_fused_model_as_peft_s(tmp_path):
    """transformers.Trainer on the fused model: PEFT's losses, and save_model writes the adapter PEFT would."""
    data = [{"input_ids": tokens(seed)[0], "labels": tokens(seed)[0]} for seed in range(4)]
    losses, saved = {}, {}
    for which, model in zip(("plain", "fused"), twins(), strict=True):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / which), max_steps=3, learning_rate=1e-2,
                                              per_device_train_batch_size=2, save_strategy="no", report_to=[],
                                              use_cpu=True, logging_steps=1, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses[which] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.save_model(str(tmp_path / which / "final"))
        saved[which] = safetensors.torch.load_file(tmp_path / which / "final" / "adapter_model.safetensors")
    assert len(losses["fused"]) == 3
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=0)
    assert saved["fused"].keys() == saved["plain"].keys() and len(saved["fused"]) == 14 * 2
    for key, tensor in saved["plain"].items():
        torch.testing.assert_close(saved["fused"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_mixed_batches_run_fused_with_peft_s_results_and_refusals(counted):
    """adapter_names: each sample through its adapter ("__base__", or a name a layer lacks: the base), fused, with
    PEFT's outputs and gradients, and PEFT's own refusals of a bad batch."""
    plain, fused = twins()
    for model in (plain, fused):
        torch.manual_seed(7)
        model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
        model.eval()  # (PEFT refuses adapter_names in training mode; gradients still flow)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))  # samples of >= 16 tokens too
    names = ["second", "__base__", "default"]
    for model in (plain, fused):
        model(input_ids=ids, labels=ids, adapter_names=names).loss.backward()
    assert len(counted) == 2 * 7
    want, got = trainable_grads(plain), trainable_grads(fused)
    assert want.keys() == got.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        fused(input_ids=ids, adapter_names=names[:2])
    fused.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        fused(input_ids=ids, adapter_names=names)


def test_lora_over_bitsandbytes_4bit_layers_runs_fused(counted):
    """PEFT over bitsandbytes NF4 layers: the fused layers read the packed codes in place (an NF4 view over the same
    tensors), with PEFT's outputs and gradients (bf16 budget)."""
    from conftest import TOLERANCE, bnb_nf4_mlp, rel_err
    bf16 = torch.bfloat16
    model = bnb_nf4_mlp()
    plain = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                       init_lora_weights=False))
    fused = fastpeft.fuse(copy.deepcopy(plain))
    assert set(fastpeft.fuse_report(fused).values()) == {None}
    x = torch.randn(6, 64, dtype=bf16)
    outs, grads = [], []
    for model in (plain, fused):
        xi = x.clone().requires_grad_()
        y = model(xi)
        y.float().square().sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    assert len(counted) == 2  # both layers, fused
    assert rel_err(outs[1], outs[0]) <= TOLERANCE[bf16]
    assert len(grads[1]) == 5
    for got, want in zip(grads[1], grads[0], strict=True):
        assert rel_err(got, want) <= 2 * TOLERANCE[bf16]
    with pytest.raises(ValueError, match="Length of `adapter_names`"):  # PEFT's check; a 4-bit mixed batch: PEFT's code
        fused.eval()(x, adapter_names=["default"])
    assert "a mixed batch over a 4-bit base" in peft_fuse._call_problem(fused.base_model.model[0],
                                                                        {"adapter_names": ["default"] * 6})


def _word_tokenizer():
    """A word-level tokenizer over the tiny Llama's 97 ids, built in memory (nothing to download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[UNK]"] = 96
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="w0",
                                                eos_token="w1")


def test_trl_sft_trainer_with_fuse_trains_and_saves_a_loadable_adapter(tmp_path):
    """TRL's SFTTrainer given a peft_config, its PeftModel then fused: PEFT's losses and adapter files, which PEFT
    reloads to the same logits. (B starts non-zero: from B = 0, Adam's first step is about lr·sign(g), so elements
    whose gradient is ~0 would take ±lr on a rounding difference, in PEFT's own reruns with other kernels too.)"""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    texts = [" ".join(f"w{(i * 7 + j) % 90 + 2}" for j in range(12)) for i in range(8)]
    losses = {}
    for which in ("plain", "fused"):
        args = trl.SFTConfig(output_dir=str(tmp_path / which), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                             max_length=16, seed=0, bf16=False)  # (TRL's default is bf16 autocast: fp32 compares)
        torch.manual_seed(5)
        trainer = trl.SFTTrainer(model=tiny_llama(), args=args, processing_class=_word_tokenizer(),
                                 train_dataset=datasets.Dataset.from_dict({"text": texts}),
                                 peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                             init_lora_weights=False))
        if which == "fused":
            assert fastpeft.fuse(trainer.model) is trainer.model
        trainer.train()
        losses[which] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.save_model(str(tmp_path / which / "final"))
    assert len(losses["fused"]) == 3
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=0)
    saved = {which: safetensors.torch.load_file(tmp_path / which / "final" / "adapter_model.safetensors")
             for which in losses}
    assert saved["fused"].keys() == saved["plain"].keys() and len(saved["fused"]) == 14 * 2
    for key, tensor in saved["plain"].items():
        torch.testing.assert_close(saved["fused"][key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    ids = tokens()
    with torch.no_grad():
        reloaded = {which: peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / which / "final")).eval()(
            input_ids=ids).logits for which in losses}
    torch.testing.assert_close(reloaded["fused"], reloaded["plain"], rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_delete_adapter_and_generate_on_a_fused_model(counted):
    plain, fused = twins()
    ids = tokens()
    for model in (plain, fused):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert counted  # ran fused (and again in the recomputation)
    want, got = trainable_grads(plain), trainable_grads(fused)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
    for model in (plain, fused):
        model.eval()
        torch.manual_seed(7)
        model.add_adapter("gone", peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        model.delete_adapter("gone")
    assert fused.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        out = {name: model.generate(input_ids=ids[:, :4], max_new_tokens=5, do_sample=False)
               for name, model in (("plain", plain), ("fused", fused))}
    assert torch.equal(out["fused"], out["plain"])


def test_trainer_resumes_a_fused_model_from_its_checkpoint_as_peft_s(tmp_path, counted):
    """Checkpoints of a fused model are PEFT's; resumed from one, it trains on fused and ends where its unfused twin,
    resumed the same way, ends."""
    data = [{"input_ids": tokens(seed)[0], "labels": tokens(seed)[0]} for seed in range(8)]

    def trainer(model, out, steps):
        args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, learning_rate=1e-2,
                                              per_device_train_batch_size=2, save_strategy="steps", save_steps=2,
                                              report_to=[], use_cpu=True, logging_strategy="no", seed=0)
        return transformers.Trainer(model=model, args=args, train_dataset=data)

    final = {}
    for which, model in zip(("plain", "fused"), twins(), strict=True):
        trainer(model, tmp_path / which, 2).train()
        counted.clear()
        trainer(model, tmp_path / which, 4).train(resume_from_checkpoint=str(tmp_path / which / "checkpoint-2"))
        assert bool(counted) == (which == "fused")  # still fused after PEFT loaded the checkpoint into it
        final[which] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert final["fused"].keys() == final["plain"].keys()
    for name, param in final["plain"].items():
        torch.testing.assert_close(final["fused"][name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_accelerate_s_loop_trains_a_fused_model_as_peft_s():
    accelerate = pytest.importorskip("accelerate")
    losses = {}
    for which, model in zip(("plain", "fused"), twins(), strict=True):
        accelerator = accelerate.Accelerator(cpu=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        losses[which] = []
        for seed in range(3):
            ids = tokens(seed)
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses[which].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["plain"]), rtol=1e-4, atol=0)


def test_more_of_peft_s_methods_on_a_fused_model(capsys):
    plain, fused = twins()
    for model in (plain, fused):
        model.print_trainable_parameters()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0] == printed[1]
    for model in (plain, fused):
        torch.manual_seed(7)
        model.add_adapter("b", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
        model.add_weighted_adapter(["default", "b"], [0.5, 0.5], "merged", combination_type="linear")
        model.set_adapter("merged")
        model.eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
        unloaded = {name: model.unload() for name, model in (("plain", plain), ("fused", fused))}
        assert not any("forward" in m.__dict__ for m in unloaded["fused"].modules())  # PEFT's layers are gone
        torch.testing.assert_close(unloaded["fused"](input_ids=ids).logits, unloaded["plain"](input_ids=ids).logits)


def test_a_loaded_peft_model_fuses_and_loads_more_adapters_fused(tmp_path, counted):
    """PeftModel.from_pretrained, then fuse; load_adapter of another saved adapter runs fused too, with PEFT's
    results."""
    plain, _ = twins()
    plain.save_pretrained(str(tmp_path / "a"))
    torch.manual_seed(9)
    other = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                                                              init_lora_weights=False))
    other.save_pretrained(str(tmp_path / "b"))
    loaded = {}
    for which in ("plain", "fused"):
        model = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
        if which == "fused":
            fastpeft.fuse(model)
        model.load_adapter(str(tmp_path / "b"), adapter_name="b")
        model.set_adapter("b")
        loaded[which] = model.eval()
    counted.clear()
    with torch.no_grad():
        torch.testing.assert_close(loaded["fused"](input_ids=tokens()).logits,
                                   loaded["plain"](input_ids=tokens()).logits)
    assert len(counted) == 2 * 2  # adapter b's layers (q_proj, o_proj of both blocks), fused


def _one_layer(**config):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    plain = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False, **config))
    return plain, fastpeft.fuse(copy.deepcopy(plain))


def test_a_decision_follows_every_change_the_checks_read(counted):
    """What a call's checks read is in its cache key: an adapter added after a mixed batch was decided, a base weight
    unfrozen after the first call. Each call runs as a freshly fused model would run it."""
    plain, fused = _one_layer()
    x = torch.randn(2, 16)
    with torch.no_grad():
        fused.eval()(x, adapter_names=["default", "__base__"])  # decided: fused
        for model in (plain, fused):
            torch.manual_seed(3)
            model.add_adapter("b", peft.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
            model.base_model.model[0].lora_B["b"].bias.fill_(1.0)
        torch.testing.assert_close(fused.eval()(x, adapter_names=["b", "b"]), plain.eval()(x, adapter_names=["b", "b"]))
        # an inactive adapter with a LoRA bias does not stop the active one running fused
        counted.clear()
        torch.testing.assert_close(fused(x), plain(x))
        assert counted and fastpeft.fuse_report(fused) == {"base_model.model.0": None}
    layer = fused.base_model.model[0]
    layer.train()
    layer(x).sum().backward()
    layer.base_layer.weight.requires_grad_(True)  # PEFT trains it; fastpeft's op never does: PEFT's code runs
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is not None
    assert "base weight is trainable" in fastpeft.fuse_report(fused)["base_model.model.0"]


def test_dropout_fastpeft_cannot_draw_runs_peft_s_code():
    plain, fused = _one_layer(lora_dropout=1.0)
    assert "dropout p=1.0" in fastpeft.fuse_report(fused)["base_model.model.0"]
    x = torch.randn(2, 16)
    for mode in ("train", "eval"):
        torch.testing.assert_close(getattr(fused, mode)()(x), getattr(plain, mode)()(x))
