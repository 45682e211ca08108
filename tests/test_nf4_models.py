"""QLoRA in models: LoRA over quantised models and bitsandbytes' layers (training, saving, merging, PEFT over
bitsandbytes both ways, compute dtypes), NF4 layers moved, cast, pickled and compiled."""
import copy
import io

import pytest
import torch
from conftest import TOLERANCE, bnb_nf4_mlp, rel_err

import fastpeft
from fastpeft import NF4Linear, quantize_nf4
from fastpeft.ops.lora_linear import lora_linear_reference

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32


def _quantised_llama():
    from conftest import tiny_llama
    model = tiny_llama()
    return quantize_nf4(model)


def test_apply_lora_over_a_quantised_model_trains_and_saves(tmp_path):
    model = _quantised_llama()
    linears = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert linears and not isinstance(model.lm_head, NF4Linear)  # the output head stays dense
    fastpeft.apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    ids = torch.randint(0, 97, (2, 9))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".adapters." in n for n in trained)
    assert not any(b.requires_grad for b in model.buffers())
    fastpeft.save_adapter(model, tmp_path / "adapter")
    fresh = _quantised_llama()
    fastpeft.load_adapter(fresh, tmp_path / "adapter")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_merge_and_unload_gives_a_dequantised_linear():
    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(64, 40))
    layer = fastpeft.LoraLinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = layer(x)
        with pytest.raises(RuntimeError, match="requantise"):
            layer.merge()
        merged = fastpeft.merge_and_unload(torch.nn.Sequential(layer))[0]
        assert type(merged) is torch.nn.Linear and not merged.weight.requires_grad
        assert rel_err(merged(x), y) <= 1e-5
        expected = base.weight.dequantize() + layer.adapter.delta_weight()
        assert torch.allclose(merged.weight, expected, rtol=0, atol=1e-6)
    assert isinstance(layer.base_layer, NF4Linear)  # the LoRA layer itself is unchanged


def test_peft_over_bitsandbytes_converts_both_ways():
    """A PEFT model over bitsandbytes NF4 layers: from_peft keeps PEFT's parameters and the quantised tensors, with
    PEFT's outputs and gradients (bf16 budget); to_peft gives PEFT back its bitsandbytes layers."""
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    model = bnb_nf4_mlp()
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                            init_lora_weights=False))
    x = torch.randn(6, 64, dtype=bf16, requires_grad=True)
    ref = peft_model(x)
    ref.float().square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}
    ref_dx, x.grad = x.grad.clone(), None
    peft_model.zero_grad()
    converted = fastpeft.from_peft(peft_model)
    assert isinstance(converted[0].base_layer, NF4Linear)
    y = converted(x)
    assert rel_err(y, ref) <= TOLERANCE[bf16]
    y.float().square().sum().backward()
    assert rel_err(x.grad, ref_dx) <= TOLERANCE[bf16]
    grads = {n: p.grad for n, p in converted.named_parameters() if p.grad is not None}
    assert len(grads) == len(ref_grads) == 4
    for name, grad in ref_grads.items():
        i, kind = name.split(".")[-4], name.split(".")[-3]  # ...model.<i>.lora_<X>.default.weight
        assert rel_err(grads[f"{i}.adapters.default.{kind}"], grad) <= 2 * TOLERANCE[bf16]
    back = fastpeft.to_peft(converted)
    assert isinstance(back.base_model.model[0].base_layer, bnb.nn.Linear4bit)
    assert torch.equal(back(x), ref)  # PEFT's own code again, over the same tensors


def test_apply_lora_over_bitsandbytes_layers():
    """apply_lora on a model of bitsandbytes NF4 Linear4bit layers: each becomes a LoraLinear over an NF4Linear sharing
    its tensors, and computes the bitsandbytes layer's output plus the low-rank update."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layers = []
    for k, n in ((64, 128), (128, 32)):
        q = bnb.nn.Linear4bit(k, n, compute_dtype=fp32, quant_type="nf4")
        q.load_state_dict(torch.nn.Linear(k, n).state_dict())
        layers.append(q.to("cpu"))
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    x = torch.randn(4, 64)
    with torch.no_grad():
        hidden = layers[0](x)
    fastpeft.apply_lora(model, ["0", "2"], r=4, lora_alpha=8, init_lora_weights=False)
    first = model[0]
    assert first.base_layer.weight_packed.data_ptr() == layers[0].weight.data.data_ptr()
    with torch.no_grad():
        expected = hidden + first.scaling * (x @ first.lora_A.t()) @ first.lora_B.t()
        assert rel_err(first(x), expected) <= TOLERANCE[fp32]
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _bnb_model(compute_dtype, dtype=fp32, shapes=((64, 128), (128, 32))):
    """Two bitsandbytes NF4 layers around a ReLU (rows of whole blocks: bitsandbytes 0.50.2's CPU dequantisation
    misreads rows that straddle blocks, see bnb_generic_dequantize)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layers = []
    for k, n in shapes:
        q = bnb.nn.Linear4bit(k, n, compute_dtype=compute_dtype, quant_type="nf4")
        q.load_state_dict(torch.nn.Linear(k, n).to(dtype).state_dict())
        layers.append(q.to("cpu"))
    return torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])


@pytest.mark.parametrize("model_dtype,compute_dtype", [(bf16, fp32), (fp32, bf16), (bf16, bf16)],
                         ids=["bf16-model-fp32-compute", "fp32-model-bf16-compute", "bf16"])
def test_compute_dtype_is_bitsandbytes(model_dtype, compute_dtype):
    """As bitsandbytes' Linear4bit: x and the bias are cast to the compute dtype, the output back to x's dtype (the
    bias may stay fp32 beside a bf16 compute dtype); from_peft over such a model gives PEFT's outputs."""
    peft = pytest.importorskip("peft")
    model = _bnb_model(compute_dtype, model_dtype)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                            init_lora_weights=False))
    x = torch.randn(5, 64, dtype=model_dtype)
    with torch.no_grad():
        ref = peft_model(x)
    converted = fastpeft.from_peft(peft_model)
    with torch.no_grad():
        y = converted(x)
    assert y.dtype == ref.dtype == model_dtype

    def layer64(layer, h):
        return lora_linear_reference(h, layer.base_layer.weight.dequantize(torch.float64), layer.bias.double(),
                                     layer.lora_A.double(), layer.lora_B.double(), layer.scaling)
    with torch.no_grad():
        want = layer64(converted[2], torch.relu(layer64(converted[0], x.double())))
    # both within bf16's budget of float64 (PEFT rounds to bf16 between its base and low-rank outputs, fastpeft not)
    assert rel_err(y, want) <= TOLERANCE[bf16] and rel_err(ref, want) <= TOLERANCE[bf16]
    alone = NF4Linear.from_linear(torch.nn.Linear(64, 32), dtype=bf16)  # computes in bf16, called with fp32
    assert alone(torch.randn(3, 64)).dtype == fp32


def test_bitsandbytes_layers_repacked_for_its_cpu_kernel_are_refused():
    """bitsandbytes repacks a Linear4bit for its CPU kernel at an eval-mode forward on CPUs with AVX512-BF16 (its
    absmaxes become bf16): no longer NF4's layout, refused by name rather than misread."""
    model = _bnb_model(fp32)
    model[0].weight.quant_state.packing_format_for_cpu = True  # what that repacking marks
    with pytest.raises(TypeError, match="repacked for bitsandbytes' CPU kernel"):
        fastpeft.LoraLinear(model[0])
    before = [type(m) for m in model]
    with pytest.raises(TypeError, match="repacked"):
        fastpeft.apply_lora(model, ["0", "2"], r=4)
    assert [type(m) for m in model] == before


def test_load_adapter_into_bitsandbytes_layers(tmp_path):
    peft = pytest.importorskip("peft")
    model = _bnb_model(fp32)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                            init_lora_weights=False))
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = peft_model(x)
    peft_model.save_pretrained(tmp_path / "adapter")
    fresh = _bnb_model(fp32)
    fastpeft.load_adapter(fresh, tmp_path / "adapter")
    assert isinstance(fresh[0], fastpeft.LoraLinear) and isinstance(fresh[0].base_layer, NF4Linear)
    with torch.no_grad():
        assert rel_err(fresh(x), ref) <= TOLERANCE[fp32]


def test_quantize_nf4_over_models_with_4bit_lora_and_shared_layers():
    bnb = pytest.importorskip("bitsandbytes")
    model = _bnb_model(fp32)
    model.append(torch.nn.Linear(32, 8))
    quantize_nf4(model)  # the bitsandbytes layers are 4-bit already: left alone
    assert isinstance(model[0], bnb.nn.Linear4bit) and isinstance(model[3], NF4Linear)
    with pytest.raises(TypeError, match="from_bnb"):
        quantize_nf4(model[0])
    with pytest.raises(TypeError, match="quantise its base before adding LoRA"):
        quantize_nf4(fastpeft.LoraLinear(torch.nn.Linear(8, 8)))
    shared = torch.nn.Linear(16, 16)
    twice = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    quantize_nf4(twice, skip_modules=None)
    assert isinstance(twice[0], NF4Linear) and twice[0] is twice[2]
    broken = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        broken[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1: weight has NaN"):
        quantize_nf4(broken)
    assert all(type(m) is torch.nn.Linear for m in broken)  # nothing was changed


def test_nf4_linear_casts_moves_and_pickles():
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(64, 32))
    absmax = layer.weight_absmax.clone()
    layer.to(bf16)
    assert layer.dtype == bf16 and layer.bias.dtype == bf16
    assert torch.equal(layer.weight_absmax, absmax) and layer.weight_absmax.dtype == torch.uint8  # double-quantised
    assert layer.weight_absmax_scale.dtype == fp32 and layer.weight_absmax_offset.dtype == fp32
    assert layer(torch.randn(2, 64, dtype=bf16)).dtype == bf16
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(loaded.weight.dequantize(), layer.weight.dequantize())
    assert torch.equal(copy.deepcopy(layer).weight.dequantize(), layer.weight.dequantize())
    meta = NF4Linear.from_linear(torch.nn.Linear(70, 33)).to("meta")
    meta.to_empty(device="cpu")  # meta initialisation, then materialised (FSDP2's path)
    assert meta.weight_absmax.device.type == "cpu" and meta.weight_absmax_scale.dtype == fp32
    layer.share_memory()
    assert all(t.is_shared() for t in layer.buffers())
    state = layer.state_dict()
    assert set(state) == {"weight_packed", "weight_absmax", "weight_absmax_code", "weight_absmax_scale",
                          "weight_absmax_offset", "bias"}


def test_torch_compile_runs_nf4_layers_eagerly():
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear(NF4Linear.from_linear(torch.nn.Linear(32, 16)), r=4, init_lora_weights=False)
    x = torch.randn(3, 32)
    compiled = torch.compile(layer, backend="aot_eager")
    assert torch.allclose(compiled(x), layer(x))
