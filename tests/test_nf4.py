"""QLoRA: the NF4 format against bitsandbytes (bit for bit), LoRA over an NF4 base on every backend against the float64
reference of the dequantised weight (outputs and gradients), the kernels' dequantising loads, chunking, memory, and
bad input. Quantised models and bitsandbytes' layers: tests/test_nf4_models.py."""

import pytest
import torch
from conftest import TOLERANCE, TRITON_DEVICE, backend_params, needs_triton, rel_err
from test_lora_linear import CASES, make_inputs

import fastpeft
from fastpeft import BackendUnavailableError, NF4Linear, NF4Weight, quantize_nf4
from fastpeft import nf4 as nf4_module
from fastpeft.ops.lora_linear import lora_linear_reference

bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
SHAPES = [(64, 128), (33, 70), (7, 5), (300, 1000), (1, 1)]  # whole blocks, a short last block, an odd count


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional")


def from_bnb_state(packed, state, dtype=None):
    """Our NF4Weight over a bitsandbytes quantize_4bit result."""
    nested = {}
    if state.nested:
        nested = dict(absmax_code=state.state2.code, absmax_scale=state.state2.absmax,
                      absmax_offset=torch.as_tensor(state.offset, dtype=fp32), absmax_blocksize=state.state2.blocksize)
    return NF4Weight(packed.view(-1), state.absmax, tuple(state.shape), dtype or state.dtype, state.blocksize, **nested)


# ----------------------------------------------------------------------------------------------------------
# The format
# ----------------------------------------------------------------------------------------------------------

def test_code_books_are_bitsandbytes():
    F = bnb_functional()
    assert torch.equal(torch.tensor(nf4_module.NF4_CODE, dtype=fp32), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4_module.signed_dynamic_code(), F.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("dtype", [fp32, bf16, fp16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dequantize_is_bitsandbytes_bit_for_bit(shape, dtype, double_quant):
    """Our dequantisation of bitsandbytes' packed weight equals its dequantize_4bit exactly; our quantiser gives its
    codes, and its absmaxes (plain; double-quantised, bitsandbytes' native search may pick a neighbouring 8-bit code
    for an absmax, so those agree to the 8-bit code's resolution)."""
    F = bnb_functional()
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=dtype) * 0.05
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    theirs = F.dequantize_4bit(packed, state)
    ours = from_bnb_state(packed, state)
    assert torch.equal(ours.dequantize(), theirs)
    mine = quantize_nf4(w, double_quant=double_quant)
    assert mine.nested == double_quant and mine.dtype == dtype
    assert torch.equal(mine.packed, packed.view(-1))
    if double_quant:
        assert rel_err(mine.block_absmax(), ours.block_absmax()) < 2e-3
        assert rel_err(mine.dequantize(), theirs) < 2e-3
    else:
        assert torch.equal(mine.absmax, state.absmax) and torch.equal(mine.dequantize(), theirs)


def bnb_generic_dequantize(packed, state):
    """bitsandbytes' generic (pure torch) 4-bit dequantisation. Its CPU kernel (0.50.2) disagrees with its own
    quantize_4bit where rows of 96 straddle blocks of 64 or 128 (round-trip error 0.25-0.28 where the generic path
    and ours give 0.09); the generic path follows the flat layout the quantiser and the CUDA kernels use."""
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        pytest.skip("this bitsandbytes has no generic 4-bit dequantisation where 0.50 had it")
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional().dequantize_blockwise(state.absmax, state.state2) + state.offset
    return _dequantize_4bit_compute(packed.view(-1), absmax, _get_4bit_code("nf4", packed.device), state.blocksize,
                                    tuple(state.shape), state.dtype)


def test_other_blocksizes_and_row_chunks():
    F = bnb_functional()
    torch.manual_seed(1)
    w = torch.randn(37, 96)
    packed, state = F.quantize_4bit(w, blocksize=128, quant_type="nf4", compress_statistics=True)
    ours = from_bnb_state(packed, state)
    full = ours.dequantize()
    assert torch.equal(full, bnb_generic_dequantize(packed, state))
    assert rel_err(full, w) < 0.15
    # Row chunks start on block boundaries (96·4 = 3·128): they tile the weight exactly.
    assert ours.row_step() == 4
    chunks = list(ours.row_chunks(max_elements=500))
    assert chunks[0] == (0, 4) and chunks[-1][1] == 37
    assert torch.equal(torch.cat([ours.dequantize_rows(a, b) for a, b in chunks]), full)
    with pytest.raises(ValueError, match="does not begin a block"):
        ours.dequantize_rows(1, 3)


def test_quantisation_error_and_memory():
    """NF4 is 4.5 bits a weight (4.127 with double quantisation): at most 0.29x the bf16 weight."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024, dtype=bf16) * 0.02
    for double_quant, most in [(False, 0.29), (True, 0.26)]:
        q = quantize_nf4(w, double_quant=double_quant)
        assert q.nbytes <= most * w.numel() * w.element_size(), (double_quant, q.nbytes)
        # 16 levels per block: about 10% relative error, never a wrong sign pattern or scale
        assert 0.05 < rel_err(q.dequantize(), w) < 0.15


def test_nf4_linear_from_and_to_bitsandbytes_shares_tensors():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48).to(bf16)
    layer = bnb.nn.Linear4bit(64, 48, compute_dtype=bf16, quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")
    ours = NF4Linear.from_bnb(layer)
    assert ours.weight_packed.data_ptr() == layer.weight.data.data_ptr()
    assert ours.weight_absmax.data_ptr() == layer.weight.quant_state.absmax.data_ptr()
    x = torch.randn(5, 64, dtype=bf16)
    assert rel_err(ours(x), layer(x)) <= TOLERANCE[bf16]
    back = ours.to_bnb()
    assert torch.equal(back(x), layer(x))
    dequantized = bnb.functional.dequantize_4bit(back.weight.data, back.weight.quant_state)
    assert torch.equal(dequantized, ours.weight.dequantize())


def test_bitsandbytes_layers_that_do_not_convert():
    bnb = pytest.importorskip("bitsandbytes")
    fp4 = bnb.nn.Linear4bit(64, 32, quant_type="fp4").to("cpu")
    with pytest.raises(TypeError, match="quant_type 'fp4'"):
        fastpeft.LoraLinear(fp4)
    with pytest.raises(TypeError, match="Linear8bitLt"):
        fastpeft.LoraLinear(bnb.nn.Linear8bitLt(64, 32))
    unquantised = bnb.nn.Linear4bit(64, 32, quant_type="nf4")  # quantised only when moved to a device
    with pytest.raises(TypeError, match="not yet quantised"):
        NF4Linear.from_bnb(unquantised)


# ----------------------------------------------------------------------------------------------------------
# The op: LoRA over an NF4 weight, every backend, against the float64 reference of the dequantised weight
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_lora_over_nf4_matches_the_reference(backend, device, case):
    x, w, b, a, bb, dy = make_inputs(case, device)
    q = quantize_nf4(w, double_quant=case.M % 2 == 1)
    y = fastpeft.lora_linear(x, q, b, a, bb, 1.5, dropout_p=case.p, backend=backend, dropout_seed=5)
    y.backward(dy)
    got = [y, x.grad, a.grad, bb.grad] + ([b.grad] if b is not None else [])

    def f64(t):
        return None if t is None else t.detach().double().cpu().requires_grad_(True)
    x64, b64, a64, bb64 = f64(x), f64(b), f64(a), f64(bb)
    keep = None
    if case.p:
        keep = fastpeft.dropout_mask(5, (x.numel() // case.K, case.K), case.p, backend, device).cpu().reshape(x.shape)
    ref = lora_linear_reference(x64, q.dequantize(torch.float64).cpu(), b64, a64, bb64, 1.5, keep, case.p)
    ref.backward(dy.double().cpu())
    want = [ref, x64.grad, a64.grad, bb64.grad] + ([b64.grad] if b is not None else [])
    errors = [rel_err(g, r) for g, r in zip(got, want, strict=True)]
    assert all(e <= TOLERANCE[case.dtype] for e in errors), errors


@needs_triton
@pytest.mark.parametrize("wide", [False, True], ids=["interpreter-tiles", "128-wide-tiles"])
@pytest.mark.parametrize("shape,blocksize", [((70, 100), 64), ((33, 256), 128), ((40, 64), 32), ((100, 192), 64)],
                         ids=["unaligned", "aligned-128", "blocks-of-32", "aligned"])
@pytest.mark.parametrize("dtype", [fp32, bf16, fp16], ids=["fp32", "bf16", "fp16"])
def test_kernel_tiles_are_the_dequantised_weight_bit_for_bit(monkeypatch, dtype, shape, blocksize, wide):
    """x = I makes the forward GEMM write Wᵀ and dY = I makes the dX GEMM write W: every tile the kernels dequantise
    equals NF4Weight.dequantize() exactly, in each way the absmaxes load (per element, per column, per row and
    block; the last needs tiles wider than a block)."""
    from fastpeft.kernels import lora_linear as kernels
    if wide:
        monkeypatch.setitem(kernels.INTERPRET_GEMM, "BLOCK_N", 128)
        monkeypatch.setitem(kernels.INTERPRET_GEMM, "BLOCK_K", 64)
    torch.manual_seed(0)
    N, K = shape
    for double_quant in (False, True):
        q = quantize_nf4(torch.randn(N, K, dtype=dtype), blocksize=blocksize, double_quant=double_quant)
        q = q.to(TRITON_DEVICE)
        a = torch.randn(4, K, device=TRITON_DEVICE)
        zeros_b = torch.zeros(N, 4, device=TRITON_DEVICE)
        y = fastpeft.lora_linear(torch.eye(K, dtype=dtype, device=TRITON_DEVICE), q, None, a, zeros_b, 1.0,
                                 training=False, backend="triton")
        assert torch.equal(y.t(), q.dequantize())
        dx, *_ = kernels.lora_bwd(torch.eye(N, dtype=dtype, device=TRITON_DEVICE), None, q, a, zeros_b,
                                  torch.zeros(N, 4, device=TRITON_DEVICE), 1.0, 0.0, 0, True, False, False, False)
        assert torch.equal(dx, q.dequantize())


@needs_triton
@pytest.mark.parametrize("schedule", ["prologue", "epilogue", "cublas", "tma"])
def test_lora_over_nf4_in_every_gemm_schedule(monkeypatch, schedule):
    """Every fused-GEMM schedule runs over an NF4 base: prologue and epilogue dequantise W's tiles in the K loop, cublas
    dequantises a chunk of W's rows at a time (here several chunks) for torch's GEMM, tma runs prologue. Forward and
    dX against float64, with bias and dropout."""
    from fastpeft.kernels import lora_linear as kernels
    monkeypatch.setenv("FASTPEFT_GEMM_SCHEDULE", schedule)
    monkeypatch.setattr(kernels, "NF4_GPU_CHUNK", 1500)
    case = CASES[6]  # bf16, fp32 adapters, dropout, 3-D x
    x, w, b, a, bb, dy = make_inputs(case, TRITON_DEVICE)
    q = quantize_nf4(w)
    assert torch.equal(kernels.nf4_dequantize_rows(q, 0, case.N), q.dequantize())
    assert torch.equal(kernels.nf4_dequantize_rows(q, 32, 50), q.dequantize()[32:50])
    y = fastpeft.lora_linear(x, q, b, a, bb, 1.5, dropout_p=case.p, backend="triton", dropout_seed=5)
    y.backward(dy)
    keep = fastpeft.dropout_mask(5, (x.numel() // case.K, case.K), case.p, "triton", TRITON_DEVICE)
    x64, b64, a64, bb64 = (t.detach().double().cpu().requires_grad_(True) for t in (x, b, a, bb))
    ref = lora_linear_reference(x64, q.dequantize(torch.float64).cpu(), b64, a64, bb64, 1.5,
                                keep.cpu().reshape(x.shape), case.p)
    ref.backward(dy.double().cpu())
    for got, want in [(y, ref), (x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, bb64.grad), (b.grad, b64.grad)]:
        assert rel_err(got, want) <= TOLERANCE[case.dtype]


def test_torch_path_dequantises_a_chunk_at_a_time(monkeypatch):
    """The torch path never holds more than NF4_CHUNK dequantised elements (plus a row step): forward and backward
    give the same results as one whole-weight chunk."""
    torch.manual_seed(0)
    x, w, b, a, bb, dy = make_inputs(CASES[2], "cpu")  # with dropout
    q = quantize_nf4(w)
    expected = []
    for chunk in (1 << 30, 700):
        monkeypatch.setattr(nf4_module, "NF4_CHUNK", chunk)
        largest = []
        original = NF4Weight.dequantize_rows

        def spy(self, start, stop, dtype=None, original=original, largest=largest):
            largest.append((stop - start) * self.shape[1])
            return original(self, start, stop, dtype)
        monkeypatch.setattr(NF4Weight, "dequantize_rows", spy)
        for t in (x, a, bb, b):
            t.grad = None
        y = fastpeft.lora_linear(x, q, b, a, bb, 2.0, 0.2, dropout_seed=3, backend="torch")
        y.backward(dy)
        expected.append([y.detach(), x.grad, a.grad, bb.grad, b.grad])
        assert max(largest) <= max(chunk, q.row_step() * q.shape[1])
        assert len(largest) > (2 if chunk == 700 else 0)
    for whole, chunked in zip(*expected, strict=True):
        assert torch.allclose(whole, chunked, rtol=1e-5, atol=1e-6)


def test_backward_keeps_nothing_of_the_weights_size():
    """What autograd saves for a layer over an NF4 base: x (for dA) and S, never a dequantised copy of W."""
    torch.manual_seed(0)
    x = torch.randn(16, 256, requires_grad=True)
    q = quantize_nf4(torch.randn(512, 256))
    a = torch.randn(8, 256, requires_grad=True)
    b = torch.randn(512, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastpeft.lora_linear(x, q, None, a, b, 1.0, backend="torch").sum().backward()
    assert saved and max(t.numel() for t in saved) <= 512 * 8 + 16 * 256


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_bad_nf4_weights_are_refused_with_the_argument_named():
    q = quantize_nf4(torch.randn(8, 64), double_quant=False)
    with pytest.raises(TypeError, match="packed must be torch.uint8"):
        NF4Weight(q.packed.int(), q.absmax, (8, 64), fp32)
    with pytest.raises(ValueError, match=r"packed must have shape \(256,\)"):
        NF4Weight(q.packed[:-1], q.absmax, (8, 64), fp32)
    with pytest.raises(TypeError, match="absmax must be torch.float32"):
        NF4Weight(q.packed, q.absmax.half(), (8, 64), fp32)
    with pytest.raises(ValueError, match="absmax must have shape"):
        NF4Weight(q.packed, q.absmax, (8, 64), fp32, blocksize=128)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Weight(q.packed, q.absmax, (8, 64), fp32, blocksize=48)
    with pytest.raises(TypeError, match="dtype must be"):
        NF4Weight(q.packed, q.absmax, (8, 64), torch.int8)
    with pytest.raises(ValueError, match="shape must be"):
        NF4Weight(q.packed, q.absmax, (8, 64, 1), fp32)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(8, 64), blocksize=64.0)
    with pytest.raises(ValueError, match="beyond torch.float16's range"):
        quantize_nf4(torch.randn(8, 64) * 1e5, dtype=fp16)
    with pytest.raises(TypeError, match="with_dtype"):
        q.to(bf16)
    with pytest.raises(TypeError, match="float dtype"):
        q.dequantize(torch.int32)
    with pytest.raises(ValueError, match="bias must be a float"):
        NF4Linear(q, torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nf4(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="2-D float tensor"):
        quantize_nf4(torch.ones(4, dtype=torch.int32))


def test_lora_over_nf4_refuses_what_it_cannot_run():
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(16, 64))
    a, b = torch.randn(4, 64), torch.randn(16, 4)
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16"):
        fastpeft.lora_linear(torch.randn(2, 64, dtype=bf16), q, None, a, b, 1.0)
    with pytest.raises(ValueError, match="in_features=64"):
        fastpeft.lora_linear(torch.randn(2, 63), q, None, a[:, :63], b, 1.0)
    with pytest.raises(ValueError, match="DoRA"):
        fastpeft.lora_linear(torch.randn(2, 64), q, None, a, b, 1.0, magnitude=torch.ones(16))
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fastpeft.lora_linear(torch.randn(2, 64), q, None, a, b, 1.0, training=False, backend="cuda")
    layer = fastpeft.LoraLinear(NF4Linear(q), r=4)
    with pytest.raises(ValueError, match="DoRA"):
        layer.add_adapter("dora", use_dora=True)
    layer.add_adapter("other")
    with pytest.raises(ValueError, match="mixed-adapter batches over a 4-bit"):
        layer(torch.randn(2, 3, 64), adapter_names=["default", "other"])


def test_the_cuda_decode_launch_reads_the_packed_codes(monkeypatch):
    """What the CUDA decode kernel is handed over an NF4 base, checked on the CPU with a stand-in for fastpeft._C: the
    packed codes as W, the absmax tables, the block sizes, 16-byte code loads; and that it is never handed a K that
    is not a multiple of 32 (its reasons send those calls to the other backends)."""
    import types

    from fastpeft import cuda_ext
    calls = []

    class FakeC:
        def lora_linear_decode(self, **kwargs):
            calls.append(kwargs)
    monkeypatch.setattr(cuda_ext, "load", lambda: (FakeC(), None))
    q100 = quantize_nf4(torch.randn(48, 100))
    assert any("multiple of 32" in why for why in cuda_ext.decode_reasons(torch.randn(3, 100), q100, None,
                                                                         torch.randn(4, 100), torch.randn(48, 4)))
    monkeypatch.setattr(cuda_ext, "decode_reasons", lambda *args: [])
    monkeypatch.setattr(cuda_ext, "_counters", lambda device, stream: torch.zeros(3, dtype=torch.int32))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    for K, double_quant in ((128, True), (96, False)):
        q = quantize_nf4(torch.randn(48, K), double_quant=double_quant)
        x = torch.randn(3, K)
        cuda_ext.lora_linear_decode(x, q, None, torch.randn(4, K), torch.randn(48, 4), 1.0)
        launch = calls[-1]
        assert launch["w"] == q.packed.data_ptr() and launch["nf4_absmax"] == q.absmax.data_ptr()
        assert (launch["M"], launch["K"], launch["N"], launch["nf4_block"]) == (3, K, 48, 64)
        assert launch["nf4_code"] != 0 and launch["vector"]
        assert (launch.get("nf4_absmax_code", 0) != 0) == double_quant
        with pytest.raises(ValueError, match="neither mixed adapters nor DoRA"):
            cuda_ext.lora_linear_decode(x, q, None, torch.randn(4, K), torch.randn(48, 4), 1.0,
                                        col_scale=torch.ones(48))


# ----------------------------------------------------------------------------------------------------------
# Loading a state: all of it or nothing
# ----------------------------------------------------------------------------------------------------------

def _snapshot(module):
    return {n: t.clone() for n, t in module.state_dict().items()}


def _unchanged(module, before):
    """Every buffer and parameter bit for bit as before, in its dtype."""
    after = module.state_dict()
    return set(after) == set(before) and all(after[n].dtype == t.dtype and torch.equal(after[n], t)
                                             for n, t in before.items())


def _nf4_state(k=70, n=33, **kwargs):
    return NF4Linear.from_linear(torch.nn.Linear(k, n), **kwargs).state_dict()


def _state_with(state, **tensors):
    state = dict(state)
    state.update(tensors)
    return state


def _mismatched_states(double_quant):
    """(state, the key the error names) that an NF4Linear(70 -> 33, blocksize 64, double_quant) cannot load."""
    own = _nf4_state(double_quant=double_quant)
    other = _nf4_state(double_quant=not double_quant)
    partial = {n: t for n, t in own.items() if n != "weight_absmax"}
    dense = torch.nn.Linear(70, 33).state_dict()
    absmax = own["weight_absmax"]
    return [(other, "weight_absmax_code"),  # the other absmax format: the double quantisation's keys
            (_nf4_state(blocksize=128, double_quant=double_quant), "weight_absmax"),
            (_nf4_state(64, 40, double_quant=double_quant), "weight_packed"),  # another layer's
            (partial, "weight_absmax"),
            (dense, "weight"),
            # float absmaxes where uint8 codes are expected, and the reverse
            (_state_with(own, weight_absmax=absmax.float() if double_quant else absmax.to(torch.uint8)),
             "weight_absmax"),
            (_state_with(own, weight_packed=own["weight_packed"].float()), "weight_packed"),
            (_state_with(own, bias=torch.randn(34)), "bias")]


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "not-strict"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "plain"])
def test_nf4_linear_loads_a_state_whole_or_not_at_all(double_quant, strict):
    """A state of another NF4 format (double quantisation or not), blocksize, shape or dtype, a partial one or a dense
    layer's is refused naming the key, the layer bit for bit as before (torch would copy what it can first); a state
    of the same format loads, and one holding none of the layer's keys is nothing to load without strict."""
    torch.manual_seed(0)
    layer = NF4Linear.from_linear(torch.nn.Linear(70, 33), double_quant=double_quant)
    x = torch.randn(5, 70)
    y = layer(x)
    before = _snapshot(layer)
    for state, key in _mismatched_states(double_quant):
        with pytest.raises(RuntimeError, match=f"{key}[ :]"):
            layer.load_state_dict(state, strict=strict)
        assert _unchanged(layer, before), key
        assert torch.equal(layer(x), y), key
    source = NF4Linear.from_linear(torch.nn.Linear(70, 33), double_quant=double_quant)
    layer.load_state_dict(source.state_dict(), strict=strict)
    assert torch.equal(layer(x), source(x)) and not torch.equal(layer(x), y)
    meta = NF4Linear.from_linear(torch.nn.Linear(70, 33), double_quant=double_quant).to("meta")
    meta.load_state_dict(source.state_dict(), strict=strict, assign=True)  # meta initialisation, then the state
    assert torch.equal(meta(x), source(x))
    if not strict:
        before = _snapshot(layer)
        layer.load_state_dict({}, strict=False)
        assert _unchanged(layer, before)


def test_a_model_over_nf4_layers_refuses_a_mismatched_state_unchanged():
    """A LoRA layer over an NF4 base, and a model whose NF4 layer comes first, stay as they were when the base's state
    is of another format: the base refuses before anything after it is loaded."""
    torch.manual_seed(0)
    x = torch.randn(4, 70)
    lora = fastpeft.LoraLinear(NF4Linear.from_linear(torch.nn.Linear(70, 33)), r=4, init_lora_weights=False)
    other = fastpeft.LoraLinear(NF4Linear.from_linear(torch.nn.Linear(70, 33), double_quant=False), r=4,
                                init_lora_weights=False)
    model = torch.nn.Sequential(NF4Linear.from_linear(torch.nn.Linear(70, 33)), torch.nn.Linear(33, 8))
    other_model = torch.nn.Sequential(NF4Linear.from_linear(torch.nn.Linear(70, 33), blocksize=128),
                                      torch.nn.Linear(33, 8))
    for module, state, key in ((lora, other.state_dict(), "base_layer.weight_absmax_code"),
                               (model, other_model.state_dict(), "0.weight_absmax")):
        y, before = module(x), _snapshot(module)
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=key):
                module.load_state_dict(state, strict=strict)
            assert _unchanged(module, before) and torch.equal(module(x), y)


# ----------------------------------------------------------------------------------------------------------
# Every entry point that takes a weight, given a 4-bit one: runs it, or refuses before any work
# ----------------------------------------------------------------------------------------------------------

def test_dora_over_nf4_is_refused_on_every_path(tmp_path):
    """DoRA over a 4-bit base is refused wherever it can come in (a layer's constructor, from_adapters, another
    adapter added by apply_lora, an adapter file, the norm and the magnitude's initialisation), with nothing changed."""
    torch.manual_seed(0)
    nf4_base = NF4Linear.from_linear(torch.nn.Linear(32, 16))
    dora = fastpeft.LoraLinear(torch.nn.Linear(32, 16), r=4, use_dora=True).adapter
    with pytest.raises(ValueError, match=r"adapters\['d'\] is a DoRA adapter.*4-bit"):
        fastpeft.LoraLinear.from_adapters(nf4_base, {"d": dora}, "d")
    plain = fastpeft.LoraAdapter(32, 16, r=4)
    fastpeft.LoraLinear.from_adapters(nf4_base, {"p": plain}, "p")  # plain LoRA over it is fine

    def nf4_model():
        return torch.nn.Sequential(NF4Linear.from_linear(torch.nn.Linear(32, 32)), torch.nn.ReLU(),
                                   NF4Linear.from_linear(torch.nn.Linear(32, 16)))
    dense = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    fastpeft.save_adapter(fastpeft.apply_lora(dense, ["0", "2"], r=4, use_dora=True), tmp_path / "dora")
    bare, lora = nf4_model(), fastpeft.apply_lora(nf4_model(), ["0", "2"], r=4, init_lora_weights=False)
    x = torch.randn(3, 32)
    y = lora(x)
    with pytest.raises(ValueError, match="DoRA .* over a 4-bit"):
        fastpeft.apply_lora(lora, ["0", "2"], r=4, adapter_name="d", use_dora=True)
    for model in (bare, lora):
        with pytest.raises(fastpeft.AdapterFileError, match="0: a DoRA adapter over a 4-bit base"):
            fastpeft.load_adapter(model, tmp_path / "dora", adapter_name="d")
    assert type(bare[0]) is NF4Linear and [list(lora[i].adapters) for i in (0, 2)] == [["default"]] * 2
    assert torch.equal(lora(x), y)

    q = nf4_base.weight
    a, b = torch.randn(4, 32), torch.randn(16, 4)
    with pytest.raises(ValueError, match="weight is a 4-bit NF4Weight: DoRA"):
        fastpeft.dora_weight_norm(q, a, b, 2.0)
    with pytest.raises(ValueError, match="weight is a 4-bit NF4Weight: DoRA"):
        plain.init_magnitude(q)
    assert plain.lora_magnitude_vector is None
    layer = fastpeft.LoraLinear.from_adapters(nf4_base, {"p": plain}, "p")
    layer.adapters["d"] = dora  # by hand, past every check: refused when it would run
    layer.set_adapter("d")
    with pytest.raises(ValueError, match="adapter 'd' is a DoRA adapter over a 4-bit"):
        layer(x)


def test_ops_given_an_nf4_weight_run_it_or_refuse():
    """The references run over an NF4 weight as over its dequantised weight (the op agrees with them); a mixed batch
    over one is refused naming weight (under autocast too); an NF4Weight is a base weight, never an adapter's or a
    bias."""
    torch.manual_seed(0)
    q = quantize_nf4(torch.randn(24, 40), double_quant=False)
    x, bias, a, b = torch.randn(2, 3, 40), torch.randn(24), torch.randn(4, 40), torch.randn(24, 4)
    ref = lora_linear_reference(x, q, bias, a, b, 0.5)
    assert torch.equal(ref, lora_linear_reference(x, q.dequantize(), bias, a, b, 0.5))
    assert rel_err(fastpeft.lora_linear(x, q, bias, a, b, 0.5, backend="torch"), ref) <= TOLERANCE[fp32]
    index = torch.tensor([[0, -1, 1], [1, 0, 0]])
    mixed = fastpeft.lora_linear_mixed_reference(x, q, bias, [a, a * 2], [b, b], [0.5, 1.0], index)
    assert torch.equal(mixed, fastpeft.lora_linear_mixed_reference(x, q.dequantize(), bias, [a, a * 2], [b, b],
                                                                   [0.5, 1.0], index))
    with pytest.raises(ValueError, match="weight is a 4-bit NF4Weight: mixed-adapter batches"):
        fastpeft.lora_linear_mixed(x, q, bias, [a, a * 2], [b, b], [0.5, 1.0], index)
    with torch.autocast("cpu", dtype=bf16), pytest.raises(ValueError, match="weight is a 4-bit NF4Weight"):
        fastpeft.lora_linear_mixed(x, q, bias, [a, a * 2], [b, b], [0.5, 1.0], index)
    w = q.dequantize()
    for name, args in (("lora_A", (x, w, bias, quantize_nf4(a), b)), ("lora_B", (x, w, bias, a, quantize_nf4(b))),
                       ("bias", (x, w, quantize_nf4(bias[:, None]), a, b))):
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got NF4Weight"):
            fastpeft.lora_linear(*args, 0.5)


def test_a_quantised_model_refuses_a_mismatched_state_before_any_module_loads():
    """A model quantised by quantize_nf4 (or given LoRA over NF4 layers): a state whose later NF4 layer mismatches
    leaves even the modules before it unchanged."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)

    def build(**kwargs):
        torch.manual_seed(1)
        dense = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
        return fastpeft.quantize_nf4(dense, skip_modules=["0"], **kwargs)
    model = build()
    donor = build(double_quant=False)
    with torch.no_grad():
        donor[0].weight.add_(1.0)  # the dense layer first in the state differs
    y, before = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=r"nothing was loaded\): 2.weight_absmax_code is missing"):
            model.load_state_dict(donor.state_dict(), strict=strict)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and torch.equal(model(x), y)
    lora = fastpeft.apply_lora(build(), ["0", "2"], r=2)
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        lora.load_state_dict(fastpeft.apply_lora(donor, ["0", "2"], r=2).state_dict())
    assert all(torch.equal(v, lora.state_dict()[k]) for k, v in before.items())
    model.load_state_dict(build().state_dict())  # a matching state loads
