"""A 4-bit NormalFloat (NF4) base weight, as QLoRA trains LoRA over: the format, the quantiser and the module.

The layout is bitsandbytes' ``Params4bit`` NF4 layout, bit for bit, so a bitsandbytes ``Linear4bit`` converts without
requantising, and back:

- the (out, in) weight is flattened row-major and cut into blocks of ``blocksize`` (64) elements, the last one
  possibly shorter; each block keeps its absolute maximum (fp32) and each element the index (0..15) of the nearest of
  the 16 NF4 values ``NF4_CODE`` to element / absmax;
- two indices per byte, the first element of a pair in the high nibble;
- double quantisation (optional): the absmaxes minus their mean (``absmax_offset``) are stored as uint8 indices into a
  256-entry signed code book (``absmax_code``, bitsandbytes' dynamic map), in blocks of 256 with an fp32 scale each
  (``absmax_scale``).

Dequantisation is ``code[q] · absmax`` in fp32, rounded once to the compute dtype; a nested absmax is
``absmax_code[q2] · absmax_scale + absmax_offset`` in fp32 first. That is 4.5 bits per weight (4.127 with double
quantisation), 0.28× (0.26×) the bf16 weight.

:class:`NF4Weight` holds the tensors; :class:`NF4Linear` is the ``nn.Linear`` stand-in over one (the base that
:class:`fastpeft.LoraLinear` takes); :func:`quantize_nf4_weight` and :meth:`NF4Linear.from_linear` quantise
(``fastpeft.quantize_nf4`` does a tensor, a layer or a whole model). The fused LoRA op reads an NF4Weight wherever a
weight goes: the Triton GEMMs dequantise W's tiles as they load them, the torch path dequantises ``NF4_CHUNK``
elements at a time.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .quantized import QuantizedLinear, QuantizedWeight

# The 16 NF4 values (quantiles of a standard normal, scaled to [-1, 1]), as fp32: bitsandbytes' table.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes reads and writes
DEFAULT_BLOCKSIZE = 64
ABSMAX_BLOCKSIZE = 256  # double quantisation's blocks of absmaxes
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # float64: references, torch path
# The torch path dequantises at most this many elements of W at a time (a row chunk, or one row step if that is
# more): its extra memory is NF4_CHUNK × 6 bytes (the codes' int32 indices, one per byte, and the fp32 products), plus
# NF4_CHUNK × 2 for a half-precision compute dtype (the rounded chunk): 6 MiB (fp32), 8 MiB (bf16), whatever the layer.
NF4_CHUNK = 1 << 20


def signed_dynamic_code() -> Tensor:
    """The 256-entry signed code book of double quantisation (bitsandbytes' dynamic map, ``signed=True``): for each
    exponent e = 0..6, the midpoints of 2^e + 1 evenly spaced points in [0.1, 1] times 10^(e-6), with both signs;
    then 0 and 1; sorted (fp32)."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (e - 6) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


_TABLES: dict = {}


def _table(name: str, device: torch.device) -> Tensor:
    """Per-device constants: "code" (16,) fp32, "pairs" (256, 2) fp32 — the two values a packed byte holds — and the
    quantiser's "bounds" (15 midpoints between NF4 values)."""
    key = (name, device)
    if key not in _TABLES:
        code = torch.tensor(NF4_CODE, dtype=torch.float32)
        if name == "code":
            value = code
        elif name == "pairs":
            byte = torch.arange(256)
            value = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)
        else:
            value = (code[:-1] + code[1:]) / 2
        _TABLES[key] = value.to(device)
    return _TABLES[key]


def nf4_code(device) -> Tensor:
    """The 16 NF4 values (fp32) on ``device``, kept per device (the kernels' code book)."""
    return _table("code", torch.device(device))


def _blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


class NF4Weight(QuantizedWeight):
    """A frozen (out_features, in_features) weight in NF4 (see the module's docstring for the layout).

    ``packed``: uint8 (⌈N·K/2⌉,). ``absmax``: fp32 (⌈N·K/blocksize⌉,), or with double quantisation uint8 indices
    into ``absmax_code`` (256,) fp32, scaled per ``absmax_blocksize`` absmaxes by ``absmax_scale`` fp32 and offset by
    ``absmax_offset`` (0-d fp32). ``dtype``: what it dequantises to and computes in (float16, bfloat16, float32;
    float64 for references). Everything is checked on construction; the tensors are used, not copied.

    Where a weight tensor goes, an NF4Weight goes: ``shape``, ``dtype``, ``device``, ``dim()`` and
    ``requires_grad`` (always False) answer as a tensor's would; :meth:`dequantize` gives the full tensor.
    """

    kernels = frozenset({"triton", "cuda"})
    label = "4-bit NF4Weight"
    base_name = "4-bit base"

    def __init__(self, packed: Tensor, absmax: Tensor, shape, dtype: torch.dtype, blocksize: int = DEFAULT_BLOCKSIZE,
                 *, absmax_code: Tensor | None = None, absmax_scale: Tensor | None = None,
                 absmax_offset: Tensor | None = None, absmax_blocksize: int = ABSMAX_BLOCKSIZE):
        if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2
                or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape)):
            raise ValueError(f"shape must be (out_features, in_features), two positive integers, got {shape!r}")
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64 (what the weight dequantises to), "
                            f"got {dtype}")
        for name, value in (("blocksize", blocksize), ("absmax_blocksize", absmax_blocksize)):
            if isinstance(value, bool) or not isinstance(value, int) or value not in BLOCKSIZES:
                raise ValueError(f"{name} must be one of {BLOCKSIZES} (an int), got {value!r}")
        numel = int(shape[0]) * int(shape[1])
        blocks = _blocks(numel, blocksize)
        _check_tensor("packed", packed, torch.uint8, ((numel + 1) // 2,), "two 4-bit codes per byte")
        nested = absmax_code is not None or absmax_scale is not None or absmax_offset is not None
        if not nested:
            _check_tensor("absmax", absmax, torch.float32, (blocks,), f"one per block of {blocksize}")
        else:
            _check_tensor("absmax", absmax, torch.uint8, (blocks,), "double-quantised: one index per block")
            _check_tensor("absmax_code", absmax_code, torch.float32, (256,), "the absmaxes' code book")
            _check_tensor("absmax_scale", absmax_scale, torch.float32, (_blocks(blocks, absmax_blocksize),),
                          f"one per {absmax_blocksize} absmaxes")
            _check_tensor("absmax_offset", absmax_offset, torch.float32, (), "the absmaxes' mean")
        named = {"packed": packed, "absmax": absmax, "absmax_code": absmax_code, "absmax_scale": absmax_scale,
                 "absmax_offset": absmax_offset}
        devices = {t.device for t in named.values() if t is not None}
        if len(devices) > 1:
            listed = ", ".join(f"{n} on {t.device}" for n, t in named.items() if t is not None)
            raise ValueError(f"an NF4 weight's tensors must be on one device, got {listed}")
        self.packed, self.absmax = packed, absmax
        self.absmax_code, self.absmax_scale, self.absmax_offset = absmax_code, absmax_scale, absmax_offset
        self.shape = torch.Size((int(shape[0]), int(shape[1])))
        self.dtype, self.blocksize, self.absmax_blocksize = dtype, int(blocksize), int(absmax_blocksize)

    # --- what code written for a weight tensor reads -----------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nested(self) -> bool:
        """Whether the absmaxes are double-quantised."""
        return self.absmax_code is not None

    def signature(self) -> tuple:
        key = (self.shape, self.dtype, self.device, self.blocksize, self.nested, self.absmax_blocksize)
        if self.device.type == "cuda":  # the decode kernel's reasons read the codes' alignment
            key += tuple(t.data_ptr() % 16 for t in self.tensors().values())
        return key

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def is_contiguous(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        """Bytes the weight takes: the packed codes, the absmaxes and the double quantisation's tables."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, Tensor]:
        """The tensors that hold the weight, by name (the double quantisation's only when it is used)."""
        named = {"packed": self.packed, "absmax": self.absmax, "absmax_code": self.absmax_code,
                 "absmax_scale": self.absmax_scale, "absmax_offset": self.absmax_offset}
        return {n: t for n, t in named.items() if t is not None}

    def with_tensors(self, **tensors) -> NF4Weight:
        """The same weight over other tensors (moved, shared, ...), checked again."""
        current = self.tensors()
        current.update(tensors)
        return NF4Weight(current.pop("packed"), current.pop("absmax"), self.shape, self.dtype, self.blocksize,
                         absmax_blocksize=self.absmax_blocksize, **current)

    def with_dtype(self, dtype: torch.dtype) -> NF4Weight:
        """The same codes computing in ``dtype`` (no copy)."""
        if dtype == self.dtype:
            return self
        return NF4Weight(self.packed, self.absmax, self.shape, dtype, self.blocksize,
                         absmax_blocksize=self.absmax_blocksize,
                         **{n: t for n, t in self.tensors().items() if n not in ("packed", "absmax")})

    def to(self, device) -> NF4Weight:
        """The weight on ``device`` (the compute dtype changes with :meth:`with_dtype`)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"NF4Weight.to takes a device; for another compute dtype use with_dtype({device})")
        return self.with_tensors(**{n: t.to(device) for n, t in self.tensors().items()})

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, "
                f"double_quant={self.nested}, device={self.device})")

    def matmul(self, x: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        return nf4_matmul(x, self, bias, out)

    def matmul_t(self, dy: Tensor, out: Tensor | None = None) -> Tensor:
        return nf4_matmul_t(dy, self, out)

    # --- dequantisation ----------------------------------------------------------------------------------------
    def block_absmax(self, first: int = 0, stop: int | None = None) -> Tensor:
        """The fp32 absmax of blocks ``first`` .. ``stop`` (all by default), double quantisation undone."""
        stop = _blocks(self.numel(), self.blocksize) if stop is None else stop
        if not self.nested:
            return self.absmax[first:stop]
        group = self.absmax_blocksize  # the scales of these blocks only, each repeated over its group
        scale = self.absmax_scale[first // group:_blocks(stop, group)].repeat_interleave(group)
        scale = scale[first % group:first % group + stop - first]
        return (self.absmax_code[self.absmax[first:stop].int()] * scale).add_(self.absmax_offset)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight in ``dtype`` (default: the weight's), exactly as bitsandbytes' ``dequantize_4bit``."""
        return self.dequantize_rows(0, self.shape[0], dtype)

    def row_step(self) -> int:
        """Row chunks starting at multiples of this begin on a block boundary."""
        return self.blocksize // math.gcd(self.shape[1], self.blocksize)

    def row_chunks(self, max_elements: int | None = None) -> Iterator[tuple[int, int]]:
        """(start, stop) row ranges covering the weight, each at most ``max_elements`` (default ``NF4_CHUNK``)
        elements or one row step, each starting on a block boundary: the torch path's unit of dequantisation."""
        max_elements = NF4_CHUNK if max_elements is None else max_elements
        step = self.row_step()
        rows = max(step, (max_elements // self.shape[1]) // step * step)
        for start in range(0, self.shape[0], rows):
            yield start, min(start + rows, self.shape[0])

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype | None = None) -> Tensor:
        """Rows ``start`` .. ``stop`` of the weight in ``dtype``; ``start`` a multiple of :meth:`row_step`."""
        dtype = self.dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a float dtype, got {dtype!r}")
        k = self.shape[1]
        first, last = start * k, stop * k
        if first % self.blocksize:
            raise ValueError(f"start row {start} does not begin a block (rows start at multiples of {self.row_step()})")
        pairs = torch.nn.functional.embedding(self.packed[first // 2:(last + 1) // 2].int(),
                                              _table("pairs", self.device))
        values = pairs.view(-1)[:last - first]
        absmax = self.block_absmax(first // self.blocksize, _blocks(last, self.blocksize))
        full = (last - first) // self.blocksize * self.blocksize
        values[:full].view(-1, self.blocksize).mul_(absmax[:full // self.blocksize, None])
        if full < last - first:  # the weight's last, shorter block
            values[full:].mul_(absmax[-1])
        return values.view(stop - start, k).to(dtype)


def _check_tensor(name, t, dtype, shape, what):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({what}), got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} ({what}), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


# ----------------------------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------------------------

def _quantize_blocks(flat: Tensor, blocksize: int, bounds: Tensor) -> tuple[Tensor, Tensor]:
    """(indices int64, absmax fp32) of fp32 ``flat`` in blocks: each element's nearest value of the sorted code book
    whose midpoints are ``bounds`` (a value on a midpoint takes the lower), scaled by its block's absmax (as
    bitsandbytes: multiplied by the reciprocal for whole blocks, divided for the last, shorter one)."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < n:
        tail = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail[None]])
        scaled = torch.cat([scaled, flat[full:] / tail])
    return torch.bucketize(scaled.clamp_(-1, 1), bounds), absmax


def quantize_nf4_weight(weight: Tensor, *, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                        dtype: torch.dtype | None = None) -> NF4Weight:
    """Quantise a float (out, in) weight to NF4 (the same codes and absmaxes as bitsandbytes' ``quantize_4bit``).

    ``double_quant``: quantise the absmaxes too (QLoRA's default, 0.127 instead of 0.5 bits per weight); ``dtype``:
    what the weight dequantises to and computes in (default: the weight's own; float64 becomes float32 unless asked).
    A non-finite weight is refused: its block would quantise to garbage.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a 2-D float tensor (out_features, in_features), got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    if weight.numel() == 0:
        raise ValueError(f"weight {tuple(weight.shape)} is empty")
    if not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (an int), got {blocksize!r}")
    dtype = dtype or (weight.dtype if weight.dtype in COMPUTE_DTYPES[:3] else torch.float32)
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise ValueError("weight has NaN or Inf values, which NF4 cannot represent")
        q, absmax = _quantize_blocks(flat, blocksize, _table("bounds", flat.device))
        if absmax.max() > torch.finfo(dtype).max:
            raise ValueError(f"weight has values up to {absmax.max().item():.4g}, beyond {dtype}'s range: it would "
                             f"dequantise to inf (quantise for a wider compute dtype)")
        if q.numel() % 2:  # the last byte's low nibble: the code of 0.0
            q = torch.cat([q, q.new_full((1,), NF4_CODE.index(0.0))])
        q = q.to(torch.uint8)
        packed = (q[0::2] << 4) | q[1::2]
        if not double_quant:
            return NF4Weight(packed, absmax, weight.shape, dtype, blocksize)
        offset = absmax.mean()
        code = signed_dynamic_code().to(flat.device)
        q2, scale = _quantize_blocks(absmax - offset, ABSMAX_BLOCKSIZE, (code[:-1] + code[1:]) / 2)
        return NF4Weight(packed, q2.to(torch.uint8), weight.shape, dtype, blocksize, absmax_code=code,
                         absmax_scale=scale, absmax_offset=offset)


# ----------------------------------------------------------------------------------------------------------
# The base alone: x Wᵀ + b over an NF4 weight (torch path, in row chunks), with its backward (dx = dy W)
# ----------------------------------------------------------------------------------------------------------

def nf4_matmul(x: Tensor, weight: NF4Weight, bias: Tensor | None = None, out: Tensor | None = None, *,
               max_elements: int | None = None, dequantize_rows=None) -> Tensor:
    """``x Wᵀ (+ bias)`` for 2-D x in the weight's dtype, W dequantised one row chunk at a time (``max_elements``,
    default ``NF4_CHUNK``; by ``dequantize_rows(weight, start, stop)`` if given, e.g. a kernel), each chunk's product
    written into its columns of the result (``out`` if given)."""
    out = x.new_empty((x.shape[0], weight.shape[0])) if out is None else out
    for start, stop in weight.row_chunks(max_elements):
        w = (weight.dequantize_rows(start, stop, x.dtype) if dequantize_rows is None
             else dequantize_rows(weight, start, stop))
        if bias is None:
            torch.mm(x, w.t(), out=out[:, start:stop])
        else:
            torch.addmm(bias[start:stop], x, w.t(), out=out[:, start:stop])
    return out


def nf4_matmul_t(dy: Tensor, weight: NF4Weight, out: Tensor | None = None, *, max_elements: int | None = None,
                 dequantize_rows=None) -> Tensor:
    """``dy W`` (dy (M, N) → (M, K)), W dequantised one row chunk at a time (as in :func:`nf4_matmul`) and
    accumulated into ``out`` (which, if given, is added to)."""
    for start, stop in weight.row_chunks(max_elements):
        w = (weight.dequantize_rows(start, stop, dy.dtype) if dequantize_rows is None
             else dequantize_rows(weight, start, stop))
        if out is None:
            out = torch.mm(dy[:, start:stop], w)
        else:
            out.addmm_(dy[:, start:stop], w)
    if out is None:
        raise AssertionError("an NF4 weight has at least one row")
    return out


class _NF4Linear(torch.autograd.Function):
    """x Wᵀ + b over a frozen NF4 W: saves nothing of W's size (backward dequantises again, chunk by chunk)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight
        return nf4_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        dx = nf4_matmul_t(dy, ctx.weight) if ctx.needs_input_grad[0] else None
        dbias = dy.sum(0) if ctx.needs_input_grad[2] else None
        return dx, None, dbias


def nf4_linear(x: Tensor, weight: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` over an NF4 weight, differentiable in x and bias: computed in the weight's dtype (under autocast,
    the autocast dtype), x and the bias cast to it, and returned in x's dtype (the autocast dtype under autocast), as
    bitsandbytes' ``Linear4bit`` does with its ``compute_dtype``."""
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != weight.shape[1] or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a float tensor of shape (..., in_features={weight.shape[1]}), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    dtype = out_dtype = weight.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = out_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        out_dtype = x.dtype
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the NF4 weight on {weight.device}")
    if bias is not None:
        bias = bias.to(dtype)
    x2d = x.reshape(-1, x.shape[-1]).to(dtype)
    y = _NF4Linear.apply(x2d, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------------------

_STATS = ("weight_absmax", "weight_absmax_code", "weight_absmax_scale", "weight_absmax_offset")


class NF4Linear(QuantizedLinear):
    """``nn.Linear`` with its weight in NF4 (frozen): what :class:`fastpeft.LoraLinear` trains LoRA over.

    The weight's tensors are buffers (``weight_packed``, ``weight_absmax`` and, with double quantisation,
    ``weight_absmax_code``, ``weight_absmax_scale``, ``weight_absmax_offset``), so ``state_dict`` and ``.to(device)``
    carry them; a dtype cast (``model.to(torch.bfloat16)``, ``.half()``) changes the compute dtype and the bias, never
    the absmaxes. ``weight`` is the :class:`NF4Weight` over those buffers. Make one with :func:`quantize_nf4`,
    :meth:`from_bnb` (a bitsandbytes ``Linear4bit``, no requantisation) or from an NF4Weight.
    """

    def __init__(self, weight: NF4Weight, bias: Tensor | None = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.dtype, self.blocksize, self.absmax_blocksize = weight.dtype, weight.blocksize, weight.absmax_blocksize
        for name, t in weight.tensors().items():
            self.register_buffer(f"weight_{name}", t)
        if bias is not None:
            if not isinstance(bias, Tensor) or tuple(bias.shape) != (self.out_features,) \
                    or not bias.dtype.is_floating_point:
                raise ValueError(f"bias must be a float ({self.out_features},) tensor, got "
                                 f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
            if bias.device != weight.device:
                raise ValueError(f"bias is on {bias.device} but the weight on {weight.device}")
            # (any float dtype: it is cast to the compute dtype as the layer runs, as bitsandbytes does)
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach(),
                                                                            requires_grad=bias.requires_grad)
        self.bias = bias

    @property
    def weight(self) -> NF4Weight:
        """The NF4Weight over the buffers (kept while the buffers and the compute dtype stay the same: it holds them,
        so their ids are not reused meanwhile)."""
        tensors = {name[len("weight_"):]: t for name, t in self._buffers.items()
                   if name.startswith("weight_") and t is not None}
        key = (self.dtype, *((name, id(t)) for name, t in tensors.items()))
        cached = self.__dict__.get("_weight_view")
        if cached is not None and cached[0] == key:
            return cached[1]
        weight = NF4Weight(tensors.pop("packed"), tensors.pop("absmax"), (self.out_features, self.in_features),
                           self.dtype, self.blocksize, absmax_blocksize=self.absmax_blocksize, **tensors)
        self.__dict__["_weight_view"] = (key, weight)
        return weight

    def forward(self, x: Tensor) -> Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        # The absmaxes keep their dtype whatever the cast (their bits are the format): a buffer that ``fn`` gave
        # another dtype is the original moved to fn's device instead. A float cast becomes the compute dtype.
        stats = {name: self._buffers[name] for name in _STATS if self._buffers.get(name) is not None}
        probe = fn(torch.empty(0, dtype=self.dtype, device=self._buffers["weight_packed"].device))
        super()._apply(fn, recurse)
        for name, original in stats.items():
            applied = self._buffers[name]
            if applied.dtype != original.dtype:
                self._buffers[name] = original.to(applied.device)
        if probe.dtype in COMPUTE_DTYPES:
            self.dtype = probe.dtype
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # torch copies every tensor it finds, casting it to the buffer's dtype, and reports missing or mismatched keys
        # only afterwards: a state of another format (double quantisation or not, another blocksize or shape) would
        # be half loaded, fp32 absmaxes cast into uint8 codes. Part of an NF4 weight means nothing, so the layer's
        # whole state is checked first, and refused before anything is copied (strict or not: torch passes strict
        # only at the end). A model fastpeft put NF4 layers into checks them all before any module loads
        # (model._check_quantized_states).
        problem = self.state_problem(state_dict, prefix)
        if problem is not None:
            raise RuntimeError(f"cannot load the NF4Linear's state (nothing of it was loaded): {problem}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def state_problem(self, state_dict, prefix) -> str | None:
        """Why the layer cannot load its part of ``state_dict`` (None when it can, or when that holds none of the
        weight's keys: torch then reports them missing, or without ``strict`` loads none)."""
        ours = {name: t for name, t in self._buffers.items() if name.startswith("weight_") and t is not None}

        def form(names):
            if set(names) == {"weight_packed", *_STATS}:
                return "with double quantisation"
            return "without double quantisation" if set(names) == {"weight_packed", "weight_absmax"} else "incomplete"
        if prefix + "weight" in state_dict:
            return (f"{prefix}weight is a dense (or bitsandbytes) layer's weight, where this layer holds an NF4 weight "
                    f"({', '.join(ours)}): load it into an nn.Linear and quantise that (fastpeft.quantize_nf4)")
        given = [name for name in ("weight_packed", *_STATS) if prefix + name in state_dict]
        if not given:
            return None
        for name in ("weight_packed", *_STATS):
            if (name in ours) != (name in given):
                return (f"{prefix}{name} is {'missing from' if name in ours else 'in'} the state, whose NF4 weight has "
                        f"{', '.join(given)} ({form(given)}), where this layer's has {', '.join(ours)} "
                        f"({form(ours)})")
        for name in given:
            t, want = state_dict[prefix + name], ours[name]
            if not isinstance(t, Tensor):
                return f"{prefix}{name}: expected a tensor, got {type(t).__name__}"
            if t.dtype != want.dtype or t.shape != want.shape:
                return (f"{prefix}{name}: expected {want.dtype} of shape {tuple(want.shape)}, got {t.dtype} of shape "
                        f"{tuple(t.shape)}" + ("" if t.shape == want.shape else
                                               " (the state of another shape or blocksize)"))
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None and bias is not None and getattr(bias, "shape", None) != self.bias.shape:
            return f"{prefix}bias: expected shape {tuple(self.bias.shape)}, got {tuple(getattr(bias, 'shape', ()))}"
        return None

    @torch.no_grad()
    def dequantized(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantised weight (in the compute dtype) and the same bias values."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(self.dtype).clone(), requires_grad=self.bias.requires_grad)
        return linear.train(self.training)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                    dtype: torch.dtype | None = None) -> NF4Linear:
        """Quantise an ``nn.Linear`` (its bias is kept as it is, frozen)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = quantize_nf4_weight(linear.weight, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
        bias = None
        if linear.bias is not None:
            bias = nn.Parameter(linear.bias.detach().to(weight.dtype), requires_grad=False)
        return cls(weight, bias).train(linear.training)

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> NF4Linear:
        """The NF4Linear holding a bitsandbytes ``Linear4bit``'s quantised weight and bias themselves (no copy, no
        requantisation; the bias keeps its ``requires_grad``). The compute dtype is the layer's ``compute_dtype``
        (else its quant state's dtype). Refuses FP4, int8 and not-yet-quantised layers."""
        problem = bnb_problem(layer)
        if problem is not None:
            raise TypeError(f"layer cannot become an NF4Linear: {problem}")
        state = layer.weight.quant_state
        nested = {}
        if state.nested:
            nested = dict(absmax_code=state.state2.code, absmax_scale=state.state2.absmax,
                          absmax_offset=torch.as_tensor(state.offset, dtype=torch.float32, device=state.absmax.device),
                          absmax_blocksize=state.state2.blocksize)
        dtype = getattr(layer, "compute_dtype", None) or state.dtype
        weight = NF4Weight(layer.weight.data.view(torch.uint8).reshape(-1), state.absmax, tuple(state.shape), dtype,
                           state.blocksize, **nested)
        return cls(weight, layer.bias).train(layer.training)

    @torch.no_grad()
    def to_bnb(self) -> nn.Module:
        """A bitsandbytes ``Linear4bit`` (NF4) over this layer's tensors (shared, not copied); needs bitsandbytes."""
        try:
            import bitsandbytes as bnb
            from bitsandbytes.functional import QuantState
        except ImportError:
            raise ImportError("NF4Linear.to_bnb needs the bitsandbytes package (pip install bitsandbytes)") from None
        w = self.weight
        state2 = None
        if w.nested:
            state2 = QuantState(absmax=w.absmax_scale, code=w.absmax_code, blocksize=w.absmax_blocksize,
                                dtype=torch.float32)
        state = QuantState(absmax=w.absmax, shape=w.shape, code=_table("code", w.device), blocksize=w.blocksize,
                           quant_type="nf4", dtype=w.dtype, offset=w.absmax_offset, state2=state2)
        layer = bnb.nn.Linear4bit(self.in_features, self.out_features, bias=self.bias is not None,
                                  compute_dtype=w.dtype, compress_statistics=w.nested, quant_type="nf4",
                                  device="meta")
        layer.weight = bnb.nn.Params4bit(w.packed.view(-1, 1), requires_grad=False, quant_state=state,
                                         blocksize=w.blocksize, compress_statistics=w.nested, quant_type="nf4",
                                         bnb_quantized=True)
        layer.bias = self.bias
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, blocksize={self.blocksize}, double_quant={self.weight.nested}")


def is_bnb_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes ``Linear4bit`` (without importing bitsandbytes)."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def bnb_problem(layer: nn.Module) -> str | None:
    """Why a bitsandbytes layer cannot become an :class:`NF4Linear` (None when it can)."""
    if not is_bnb_4bit(layer):
        kind = type(layer)
        if kind.__module__.startswith("bitsandbytes"):
            return f"a bitsandbytes {kind.__name__} (only NF4 Linear4bit layers convert; int8 layers do not)"
        return f"a {kind.__name__}, not a bitsandbytes Linear4bit"
    state = getattr(layer.weight, "quant_state", None)
    if state is None:
        return "a bitsandbytes Linear4bit not yet quantised (bitsandbytes quantises it when moved to a device)"
    if getattr(state, "packing_format_for_cpu", False):
        return ("a bitsandbytes Linear4bit repacked for bitsandbytes' CPU kernel (done at its first eval-mode forward "
                "on a CPU with AVX512-BF16; the repacking rounds the absmaxes to bf16, so the quantised weight is no "
                "longer NF4's layout): convert it before running it in eval mode, or reload it")
    if state.quant_type != "nf4":
        return f"a bitsandbytes Linear4bit of quant_type {state.quant_type!r} (only 'nf4' converts)"
    code = getattr(state, "code", None)
    if code is not None and not torch.equal(code.float().cpu(), _table("code", torch.device("cpu"))):
        return "a bitsandbytes Linear4bit whose code book is not NF4's"
    linear4bit = next(c for c in type(layer).__mro__ if c.__name__ == "Linear4bit")
    if type(layer).forward is not linear4bit.forward:
        return f"a {type(layer).__name__}, a Linear4bit subclass with its own forward"
    return None
