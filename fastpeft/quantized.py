"""The quantised-weight protocol: what the ops, the layers and the model tools ask of a frozen base weight stored in
a compressed format, so that a format is one module per layer of the stack (this protocol's implementation in
``fastpeft``, a dequantising tile load in ``kernels``, a decode reader in ``csrc``), not edits across it.

NF4 (``fastpeft.nf4``: :class:`~fastpeft.nf4.NF4Weight`, :class:`~fastpeft.nf4.NF4Linear`) is the implementation.
The ops, the layers, the model tools and PEFT interop read only what is declared here; a format's own kernels (its
tile load, its decode reader, named in ``kernels``) read its fields. A format without kernels runs on the torch
backend; the others refuse it with the reason.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class QuantizedWeight:
    """A frozen (out_features, in_features) weight in a compressed format, taken by the ops where a weight tensor
    goes. ``shape``, ``dtype`` (what it computes in), ``device``, ``dim()`` and ``requires_grad`` (always False)
    answer as a tensor's would. A format implements the methods below."""

    requires_grad = False
    kernels: frozenset = frozenset()  # the backends whose kernels read this format ("triton", "cuda"); torch runs any
    label = "quantised weight"  # how messages name the format ("4-bit NF4Weight")
    base_name = "quantised base"  # and a layer over it ("4-bit base")
    shape: torch.Size
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def dim(self) -> int:
        return 2

    def signature(self) -> tuple:
        """What a call's checks and backend decision read of the weight (format, geometry, dtype, device): hashable."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The full (out, in) weight in ``dtype`` (default: the weight's): the references' view of it."""
        raise NotImplementedError

    def with_dtype(self, dtype: torch.dtype) -> QuantizedWeight:
        """The same weight computing in ``dtype`` (no copy of the stored codes)."""
        raise NotImplementedError

    def matmul(self, x: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        """``x Wᵀ (+ bias)`` for 2-D x in the weight's dtype, never holding the whole weight in full precision."""
        raise NotImplementedError

    def matmul_t(self, dy: Tensor, out: Tensor | None = None) -> Tensor:
        """``dy W`` for 2-D dy (M, out_features), accumulated into ``out`` when given."""
        raise NotImplementedError


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose ``weight`` is a :class:`QuantizedWeight`: what LoRA trains over. A format's layer
    subclasses it and implements :meth:`dequantized`."""

    weight: QuantizedWeight

    def dequantized(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantised weight and the same bias."""
        raise NotImplementedError

    def state_problem(self, state_dict: dict, prefix: str) -> str | None:
        """Why this layer cannot load its part of ``state_dict`` (None when it can): checked before anything of a
        model is copied, so a mismatched state is refused whole."""
        raise NotImplementedError
