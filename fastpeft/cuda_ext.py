"""The compiled extension ``fastpeft._C``: loaded defensively, its absence reported, every pointer validated.

``_C`` takes raw device pointers, sizes, strides, dtype codes and the CUDA stream, so it does not link libtorch
(one build serves every torch version). Everything is checked here before a pointer crosses: devices, dtypes,
shapes, strides and alignment; the C++ side checks every CUDA call and raises with the CUDA error string.
"""
from __future__ import annotations

import functools
import threading

import torch
from torch import Tensor

from .checks import ACTIVATION_CODES, cuda_device_reason, kernel_dtype_reason, new_output
from .nf4 import NF4Weight, nf4_code

MAX_DECODE_ROWS = 16
MAX_DECODE_RANK = 256

_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


@functools.cache
def load():
    """``(module, None)`` when ``fastpeft._C`` imports, else ``(None, reason)``."""
    try:
        from . import _C
    except ImportError as err:
        return None, (f"fastpeft._C is not built ({err}); reinstall on a machine with nvcc and an NVIDIA "
                      "driver (FASTPEFT_CUDA=auto), or with FASTPEFT_CUDA=1 to build it wherever nvcc is")
    return _C, None


def status() -> str:
    """One line for ``python -m fastpeft info``: built or not, archs, and whether a GPU answers."""
    module, reason = load()
    if module is None:
        return reason
    try:
        devices = module.device_count()
    except RuntimeError as err:
        return f"built for {module.cuda_archs}; {err}"
    return f"built for {module.cuda_archs}; {devices} CUDA device(s)"


def decode_reasons(x, weight, bias, lora_A=None, lora_B=None) -> list[str]:
    """Why the decode kernel cannot run these (2-D x) inputs; empty when it can. Without lora_A and lora_B: (IA)³,
    the kernel with no low-rank term."""
    reasons = list(filter(None, [cuda_device_reason(x.device), kernel_dtype_reason(x.dtype)]))
    if isinstance(weight, NF4Weight):
        if weight.dtype != x.dtype:
            reasons.append(f"the NF4 weight computes in {weight.dtype}, x is {x.dtype}")
        if not (x.shape[-1] % 32 == 0 and _vector_ok(x.dtype, x.shape[-1], (x, x.stride(0)),
                                                      *([(lora_A, x.shape[-1])] if lora_A is not None else []))
                and weight.packed.data_ptr() % 16 == 0 and weight.blocksize >= 32):
            reasons.append("over a 4-bit (NF4) base the cuda decode kernel loads 16 bytes of codes at a time: it needs "
                           "K a multiple of 32 and 16-byte aligned rows of x and lora_A")
    if lora_A is not None and x.dtype in _DTYPE_CODES and lora_A.dtype not in (x.dtype, torch.float32):
        reasons.append(f"adapter dtype {lora_A.dtype} must be {x.dtype} or float32")
    if x.shape[0] > MAX_DECODE_ROWS:
        reasons.append(f"the cuda decode kernel serves M <= {MAX_DECODE_ROWS} rows, got M={x.shape[0]}")
    if lora_A is not None and lora_A.shape[0] > MAX_DECODE_RANK:
        reasons.append(f"the cuda decode kernel serves r <= {MAX_DECODE_RANK}, got r={lora_A.shape[0]}")
    if x.dim() == 2 and (x.shape[1] == 0 or weight.shape[0] == 0):
        reasons.append("the cuda decode kernel needs K and N of at least 1")
    if x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1:
        reasons.append("x needs unit stride along its last dim")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            reasons.append(f"{name} must be contiguous")
    return reasons


# The decode kernels' counters (3 int32, zero between launches: the kernel's last block resets them). A launch must
# never share them with one that may run at the same time: eager launches take their stream's own; a launch
# captured in a CUDA graph takes a slot of its own, for good, from a pool made outside any capture (a graph's
# replays may run on any stream, beside other graphs).
COUNTER_WORDS = 3
GRAPH_SLOTS = 16384  # captured decode launches per device and process
_stream_counters: dict[tuple[int, int], torch.Tensor] = {}
_graph_pools: dict[int, list] = {}  # device index -> [pool (GRAPH_SLOTS, 3) int32, next free slot]
_graph_slots_lock = threading.Lock()


def _counters(device: torch.device, stream: int) -> torch.Tensor:
    """Zeroed counters that no overlapping launch uses: the stream's own, or while a CUDA graph captures, a slot
    that belongs to that captured launch alone."""
    if torch.cuda.is_current_stream_capturing():
        pool = _graph_pools.get(device.index)
        if pool is None:
            raise RuntimeError("fastpeft's cuda decode kernel is being captured in a CUDA graph before it ever ran on "
                               f"{device}: run the model once outside capture first (the usual warm-up), so that its "
                               "counters are allocated outside the graph's memory")
        with _graph_slots_lock:  # two threads capturing at once must not take one slot
            if pool[1] < GRAPH_SLOTS:
                pool[1] += 1
                return pool[0][pool[1] - 1]
            raise RuntimeError(f"fastpeft's cuda decode kernel has been captured {GRAPH_SLOTS} times on {device} in "
                               "this process, each capture keeping counters of its own; capture fewer graphs, or "
                               "use backend='triton' inside them")
    key = (device.index, stream)
    if key not in _stream_counters:
        _stream_counters[key] = torch.zeros(COUNTER_WORDS, dtype=torch.int32, device=device)
        if device.index not in _graph_pools:
            _graph_pools[device.index] = [torch.zeros(GRAPH_SLOTS, COUNTER_WORDS, dtype=torch.int32, device=device), 0]
    return _stream_counters[key]


def s_split(K: int, x_dtype: torch.dtype, adapter_dtype: torch.dtype, vector: bool) -> tuple[int, int]:
    """(k_split, k_chunk) for the decode kernel's S = x Aᵀ: K in chunks small enough that a block of S (16 rows of
    A) reads at most a quarter of what a block of W (16 rows) reads, each chunk a whole number of one warp's loads
    of A, so the S blocks are done long before the W blocks need S."""
    a_size = torch.empty((), dtype=adapter_dtype).element_size()
    x_size = torch.empty((), dtype=x_dtype).element_size()
    step = 32 * (16 // a_size if vector else 1)
    chunk = max(step, (K * x_size // (4 * a_size)) // step * step)
    return -(-K // chunk), chunk


def _vector_ok(dtype: torch.dtype, K: int, *tensors_and_strides) -> bool:
    """16-byte loads need K and x's row stride in whole 16-byte groups and 16-byte aligned pointers."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return K % vec == 0 and all(
        (t.data_ptr() % 16 == 0) and (stride % vec == 0) for t, stride in tensors_and_strides)


def _nf4_args(weight: NF4Weight, device) -> dict:
    """The decode kernel's arguments for a 4-bit base: the code book, the absmaxes and, double-quantised, theirs."""
    quant = dict(nf4_code=nf4_code(device).data_ptr(), nf4_absmax=weight.absmax.data_ptr(),
                 nf4_block=weight.blocksize, nf4_block2=weight.absmax_blocksize)
    if weight.nested:
        quant.update(nf4_absmax_code=weight.absmax_code.data_ptr(), nf4_absmax_scale=weight.absmax_scale.data_ptr(),
                     nf4_absmax_offset=weight.absmax_offset.data_ptr())
    return quant


def lora_linear_decode(x, weight, bias, lora_A, lora_B, scaling: float, col_scale=None, row_adapter=None,
                       adapter_rank: int = 0) -> torch.Tensor:
    """``x Wᵀ + b + scaling · (x Aᵀ) Bᵀ`` for 2-D x with M <= 16 rows, by the fused CUDA kernel (forward only);
    with ``col_scale`` (N,) (DoRA's m / ‖W + s·BA‖) ``col_scale ⊙ (x Wᵀ + scaling · (x Aᵀ) Bᵀ) + b``.

    x (M, K) with unit inner stride; weight (N, K), bias (N,), lora_A (R, K), lora_B (N, R) contiguous;
    fp16/bf16/fp32 base, adapters in the base dtype or fp32. Returns y (M, N) in x's dtype.
    Mixed adapters: ``row_adapter`` (M,) int32 on x's device (-1: the base alone) picks each row's adapter from
    stacks of ``adapter_rank`` each: lora_A (n·adapter_rank, K) and lora_B (n·N, adapter_rank), B pre-scaled.
    A 4-bit base: ``weight`` an :class:`~fastpeft.nf4.NF4Weight` in x's dtype, whose packed codes the kernel reads
    and dequantises as it streams them (not with ``row_adapter`` or ``col_scale``).
    """
    module, reason = load()
    if module is None:
        raise RuntimeError(reason)
    reasons = decode_reasons(x, weight, bias, lora_A, lora_B)
    nf4 = isinstance(weight, NF4Weight)
    if nf4 and (row_adapter is not None or col_scale is not None):
        reasons.append("a 4-bit (NF4) base takes neither mixed adapters nor DoRA's column scale")
    devices = {t.device for t in (x, weight, lora_A, lora_B) + ((bias,) if bias is not None else ())}
    if len(devices) > 1:
        reasons.append(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if row_adapter is not None:
        if row_adapter.dtype != torch.int32 or tuple(row_adapter.shape) != (x.shape[0],) \
                or row_adapter.device != x.device or not row_adapter.is_contiguous():
            reasons.append(f"row_adapter must be a contiguous int32 ({x.shape[0]},) tensor on {x.device}")
        if adapter_rank < 1 or lora_A.shape[0] % adapter_rank or \
                lora_B.shape != (lora_A.shape[0] // max(adapter_rank, 1) * weight.shape[0], adapter_rank):
            reasons.append("stacked lora_A (n·rank, K) and lora_B (n·N, rank) must hold whole adapters of adapter_rank")
    if col_scale is not None:
        if tuple(col_scale.shape) != (weight.shape[0],) or col_scale.device != x.device:
            reasons.append(f"col_scale must be ({weight.shape[0]},) on {x.device}, got {tuple(col_scale.shape)} on "
                           f"{col_scale.device}")
        col_scale = col_scale.to(torch.float32).contiguous()
    if reasons:
        raise ValueError("fastpeft cuda decode kernel: " + "; ".join(reasons))
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]  # (lora_B is (n·N, rank) for a stack)
    y = new_output((M, N), x.dtype, x.device)
    if M == 0:
        return y
    stream = torch.cuda.current_stream(x.device).cuda_stream
    if nf4:  # 16-byte loads of codes, 32 elements of one block (decode_reasons has checked they can run)
        vector = True
        quant = _nf4_args(weight, x.device)
    else:
        vector = _vector_ok(x.dtype, K, (x, x.stride(0)), (weight, K), (lora_A, K))
        quant = {}
    k_split, k_chunk = s_split(K, x.dtype, lora_A.dtype, vector)
    s = new_output((k_split, M, R), torch.float32, x.device)
    module.lora_linear_decode(
        x=x.data_ptr(), w=weight.packed.data_ptr() if nf4 else weight.data_ptr(),
        bias=bias.data_ptr() if bias is not None else 0,
        a=lora_A.data_ptr(), b=lora_B.data_ptr(), s=s.data_ptr(),
        counters=_counters(x.device, stream).data_ptr(), y=y.data_ptr(),
        M=M, K=K, N=N, R=R, stride_xm=x.stride(0), stride_ym=y.stride(0), k_split=k_split, k_chunk=k_chunk,
        scaling=float(scaling),
        dtype=_DTYPE_CODES[x.dtype], adapter_dtype=_DTYPE_CODES[lora_A.dtype], vector=vector,
        device=x.device.index, stream=stream, col_scale=col_scale.data_ptr() if col_scale is not None else 0,
        row_adapter=row_adapter.data_ptr() if row_adapter is not None else 0,
        adapter_rank=adapter_rank if row_adapter is not None else 0, **quant)
    return y


def ia3_linear_decode(x, weight, bias, scale, feedforward: bool, index=None) -> torch.Tensor:
    """(IA)³ for 2-D x with M <= 16 rows, by the decode kernel with no low-rank term (forward only):
    ``(x Wᵀ + b) ⊙ l`` (``feedforward=False``) or ``(x ⊙ l) Wᵀ + b``, x ⊙ l rounded to x's dtype as it is read.

    x (M, K) with unit inner stride; weight (N, K) contiguous (or an NF4Weight in x's dtype), bias (N,) or None;
    scale l (N,) or (K,), any float dtype; with ``index`` (M,) a table (T, F) whose row index[i] scales row i
    (-1: none). Returns y (M, N) in x's dtype.
    """
    module, reason = load()
    if module is None:
        raise RuntimeError(reason)
    reasons = decode_reasons(x, weight, bias)
    features = x.shape[1] if feedforward else weight.shape[0]
    if scale.shape[-1] != features or scale.device != x.device:
        reasons.append(f"the (IA)³ scale must have {features} entries on {x.device}, got {tuple(scale.shape)} on "
                       f"{scale.device}")
    if index is not None and (tuple(index.shape) != (x.shape[0],) or index.device != x.device):
        reasons.append(f"index must be ({x.shape[0]},) on {x.device}")
    if reasons:
        raise ValueError("fastpeft cuda decode kernel: " + "; ".join(reasons))
    M, K = x.shape
    N = weight.shape[0]
    y = new_output((M, N), x.dtype, x.device)
    if M == 0:
        return y
    scale = scale.to(torch.float32)
    if index is not None:  # each row's own vector (ones for -1): M <= 16 rows of F, gathered here
        scale = torch.cat([torch.ones_like(scale[:1]), scale])[index.long() + 1]
    scale = scale.contiguous()
    row_stride = scale.shape[-1] if index is not None else 0
    nf4 = isinstance(weight, NF4Weight)
    if nf4:
        quant = _nf4_args(weight, x.device)
        vector = True
    else:
        quant, vector = {}, _vector_ok(x.dtype, K, (x, x.stride(0)), (weight, K))
    sides = dict(in_scale=scale.data_ptr(), stride_in_scale=row_stride) if feedforward else dict(
        col_scale=scale.data_ptr(), stride_col_scale=row_stride, bias_first=True)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    module.lora_linear_decode(
        x=x.data_ptr(), w=weight.packed.data_ptr() if nf4 else weight.data_ptr(),
        bias=bias.data_ptr() if bias is not None else 0, a=0, b=0, s=0,
        counters=_counters(x.device, stream).data_ptr(), y=y.data_ptr(),
        M=M, K=K, N=N, R=0, stride_xm=x.stride(0), stride_ym=y.stride(0), k_split=1, k_chunk=K, scaling=0.0,
        dtype=_DTYPE_CODES[x.dtype], adapter_dtype=_DTYPE_CODES[x.dtype], vector=vector,
        device=x.device.index, stream=stream, **sides, **quant)
    return y


@torch.library.custom_op("fastpeft::ia3_linear_decode", mutates_args=())
def ia3_linear_decode_op(x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor, feedforward: bool,
                         index: Tensor | None = None) -> Tensor:
    """:func:`ia3_linear_decode` as a torch.library op, for compiled graphs (forward only)."""
    return ia3_linear_decode(x, weight, bias, scale, feedforward, index)


@ia3_linear_decode_op.register_fake
def _(x, weight, bias, scale, feedforward, index=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("fastpeft::lora_linear_decode", mutates_args=())
def lora_linear_decode_op(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                   scaling: float, col_scale: Tensor | None = None) -> Tensor:
    """:func:`lora_linear_decode` as a torch.library op, for compiled graphs (forward only)."""
    return lora_linear_decode(x, weight, bias, lora_A, lora_B, scaling, col_scale)


@lora_linear_decode_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, col_scale=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


MAX_DECODE_BOTTLENECK = 256


def adapter_bottleneck_decode_reasons(h, w_down, b_down, w_up, b_up, residual) -> list[str]:
    """Why the adapter decode kernel cannot run these (2-D h) inputs; empty when it can."""
    reasons = list(filter(None, [cuda_device_reason(h.device), kernel_dtype_reason(h.dtype)]))
    if h.shape[0] > MAX_DECODE_ROWS:
        reasons.append(f"the cuda decode kernel serves M <= {MAX_DECODE_ROWS} rows, got M={h.shape[0]}")
    if w_down.shape[0] > MAX_DECODE_BOTTLENECK:
        reasons.append(f"the cuda decode kernel serves bottlenecks m <= {MAX_DECODE_BOTTLENECK}, "
                       f"got m={w_down.shape[0]}")
    for name, t in (("h", h), ("residual", residual)):
        if t is not None and t.shape[1] > 1 and t.stride(1) != 1:
            reasons.append(f"{name} needs unit stride along its last dim")
    for name, t in (("w_down", w_down), ("w_up", w_up), ("b_down", b_down), ("b_up", b_up)):
        if t is not None and not t.is_contiguous():
            reasons.append(f"{name} must be contiguous")
    return reasons


def adapter_bottleneck_decode(h, w_down, b_down, w_up, b_up, residual, scaling: float, activation: str) -> torch.Tensor:
    """The whole bottleneck adapter for 2-D h with M <= 16 rows, by the fused CUDA kernel (forward only).

    h (M, d) and residual (M, d) or None (h) with unit inner stride; weights and biases contiguous, h's dtype.
    """
    module, reason = load()
    if module is None:
        raise RuntimeError(reason)
    reasons = adapter_bottleneck_decode_reasons(h, w_down, b_down, w_up, b_up, residual)
    tensors = [t for t in (h, w_down, b_down, w_up, b_up, residual) if t is not None]
    if len({t.device for t in tensors}) > 1:
        reasons.append(f"all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    if len({t.dtype for t in tensors}) > 1:
        reasons.append(f"all tensors must share h's dtype {h.dtype}")
    if activation not in ACTIVATION_CODES:
        reasons.append(f"activation must be one of {', '.join(ACTIVATION_CODES)}, got {activation!r}")
    if reasons:
        raise ValueError("fastpeft cuda adapter decode kernel: " + "; ".join(reasons))
    M, d = h.shape
    m = w_down.shape[0]
    out = new_output((M, d), h.dtype, h.device)
    if M == 0:
        return out
    res = h if residual is None else residual
    act = new_output((M, m), torch.float32, h.device)
    stream = torch.cuda.current_stream(h.device).cuda_stream
    vec = 16 // h.element_size()
    vector = m % vec == 0 and _vector_ok(h.dtype, d, (h, h.stride(0)), (w_down, d), (w_up, m))
    module.adapter_bottleneck_decode(
        h=h.data_ptr(), w_down=w_down.data_ptr(), b_down=b_down.data_ptr() if b_down is not None else 0,
        w_up=w_up.data_ptr(), b_up=b_up.data_ptr() if b_up is not None else 0, res=res.data_ptr(),
        act=act.data_ptr(), counters=_counters(h.device, stream).data_ptr(), out=out.data_ptr(),
        M=M, d=d, m=m, stride_hm=h.stride(0), stride_rm=res.stride(0), stride_om=out.stride(0),
        scaling=float(scaling), activation=ACTIVATION_CODES[activation], dtype=_DTYPE_CODES[h.dtype],
        vector=vector, device=h.device.index, stream=stream)
    return out


@torch.library.custom_op("fastpeft::adapter_bottleneck_decode", mutates_args=())
def adapter_bottleneck_decode_op(h: Tensor, w_down: Tensor, b_down: Tensor | None, w_up: Tensor, b_up: Tensor | None,
                      residual: Tensor | None, scaling: float, activation: str) -> Tensor:
    """:func:`adapter_bottleneck_decode` as a torch.library op, for compiled graphs (forward only)."""
    return adapter_bottleneck_decode(h, w_down, b_down, w_up, b_up, residual, scaling, activation)


@adapter_bottleneck_decode_op.register_fake
def _(h, w_down, b_down, w_up, b_up, residual, scaling, activation):
    return h.new_empty(h.shape)
