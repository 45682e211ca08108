"""The call frame every op runs in.

An op declares what is its own: the reference, the backend table (``backends.Backend`` entries: forward, backward,
reasons), its checks, its torch.library op and its eager autograd Function. Its public function gathers the arguments
into a call (a dataclass) and hands it to :meth:`FusedOp.__call__`, which does the rest the same way for every op:

1. autocast: under ``torch.autocast`` the op casts what ``nn.Linear`` would (:meth:`FusedOp.autocast`);
2. the signature cache: a call whose signature (shapes, dtypes, devices, strides on CUDA, requires_grad, grad mode,
   scalars, the backend asked for and the settings read from the environment) was checked and decided before skips
   both; compiled code decides every trace anew (a guard on the decisions would recompile whenever one is added);
3. the checks, on a signature's first call, before any work;
4. the backend: :func:`fastpeft.backends.select_backend`, the one place a backend is chosen (``auto`` measures the
   candidates through :meth:`FusedOp.measurement`, which runs the call itself);
5. the route: a forward-only kernel runs alone; small calls on the torch path run its ops under autograd; compiled
   graphs go through the registered torch.library op; eager calls without gradients run the entry's forward, and
   those with gradients the op's autograd Function (the same forward and backward, without the custom op's dispatch,
   which costs more than a small layer's arithmetic).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..backends import Backend, decision, remember_decision, requested_backend, select_backend, settings


def unkeyed(default=None):
    """A call field the signature leaves out: it changes from call to call and no check reads it (a dropout seed), or
    the frame sets it once the call is checked (x's leading dims)."""
    return dataclasses.field(default=default, metadata={"key": False})


def autocast_cast(value, dtype: torch.dtype):
    """An argument as ``torch.autocast`` casts it for a matmul: a float32, float16 or bfloat16 tensor to ``dtype``;
    anything else (float64, integers, what is no tensor) as it is, for the checks to judge."""
    if isinstance(value, Tensor) and value.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return value.to(dtype)
    return value


def _autocast_dtype(value) -> torch.dtype | None:
    """The dtype autocast computes in for ``value``'s device, None where it is off (or the device has none)."""
    if not isinstance(value, Tensor) or value.device.type not in ("cpu", "cuda", "xpu", "mps"):
        return None
    return torch.get_autocast_dtype(value.device.type) if torch.is_autocast_enabled(value.device.type) else None


def _describe(value):
    """A call argument's part of a signature: tensors by layout, shape, dtype, device, requires_grad (and on CUDA,
    where the kernels' reasons read layouts, strides and 16-byte alignment), lists item by item, other objects by type
    and value."""
    if isinstance(value, Tensor):
        key = (value.layout, value.shape, value.dtype, value.device, value.requires_grad)
        return key + (value.stride(), value.data_ptr() % 16) if value.is_cuda else key
    if isinstance(value, (list, tuple)):
        return (type(value), *map(_describe, value))
    if hasattr(value, "signature"):  # a quantised weight: its format and geometry
        return (type(value), value.signature())
    hash(value)  # unhashable: no signature (the checks then run on every call)
    return (type(value), value)


def _detached(value):
    """A copy of a call argument for measuring: tensors detached (keeping requires_grad), lists item by item."""
    if isinstance(value, Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(map(_detached, value))
    return value


class FusedOp:
    """An op's declaration and the frame its calls run in. An op module subclasses it once, sets ``name`` and
    ``backends`` and fills in the hooks below; its public function then ends with ``return OP(call, backend)``."""

    name: str
    backends: dict[str, Backend]
    # Whether a call's checks and decision may be kept for its signature: the checks that read tensor values (DoRA's
    # magnitudes, finite and >= 0) then run on a signature's first call only, as reading values costs a device sync
    # per call. An op whose decision reads values (the mixed op's index) sets False: every call is checked.
    cached = True
    measured = True  # whether auto may measure the runnable backends (else the first in preference order runs)

    # -- what an op declares ------------------------------------------------------------------------------------
    def autocast(self, call, dtype: torch.dtype):
        """The call as it runs under ``torch.autocast`` to ``dtype``."""
        return call

    def check(self, call) -> None:
        """Every input check, raising TypeError/ValueError naming the argument and what was expected."""

    def prepare(self, call):
        """The checked call in the form the backends take (x as 2-D rows)."""
        return call

    def tensors(self, call) -> list[Tensor]:
        """The tensors whose devices and dtypes every backend's general reasons read."""
        raise NotImplementedError

    def reasons_call(self, call) -> tuple:
        """The arguments of the backend entries' ``reasons``."""
        return ()

    def trainable(self, call) -> list:
        """The inputs that may take gradients (None entries allowed)."""
        raise NotImplementedError

    def measurement_key(self, call, needs_grad: bool) -> tuple:
        """The shape class ``auto`` keeps a measurement for."""
        raise NotImplementedError

    def for_measuring(self, call):
        """The call as ``auto`` measures it (a fixed dropout seed, say, so measuring draws nothing)."""
        return call

    def bind(self, name: str, call):
        """The call completed for backend ``name`` (what the backend computes before the op, like DoRA's norms)."""
        return call

    def small(self, call) -> bool:
        """On the torch path, whether autograd over its own ops is cheaper than the op's custom backward."""
        return False

    def forward(self, entry: Backend, call) -> Tensor:
        """The output of the table entry's forward (under autograd if a small torch call, else without it)."""
        raise NotImplementedError

    def registered(self, name: str, call) -> Tensor:
        """The output through the registered torch.library op (what compiled graphs keep)."""
        raise NotImplementedError

    def function(self, name: str, call) -> Tensor:
        """The output through the op's eager autograd Function."""
        raise NotImplementedError

    def finish(self, call, out: Tensor) -> Tensor:
        """The output in the caller's shape."""
        return out

    # -- the frame ----------------------------------------------------------------------------------------------
    def __call__(self, call, backend: str | None):
        dtype = _autocast_dtype(self.tensors_of(call))
        if dtype is not None:
            call = self.autocast(call, dtype)
        backend = requested_backend(backend)  # the environment read once: the signature and the choice agree
        key = None if torch.compiler.is_compiling() or not self.cached else self.signature(call, backend)
        name = decision(key) if key is not None else None
        if name is None:  # first call of this signature: every check, then (below) the backend
            self.check(call)
        call = self.prepare(call)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in self.trainable(call))
        if name is None:
            name = select_backend(backend, self.tensors(call), self.backends, self.reasons_call(call), needs_grad,
                                  (lambda: self.measurement(call, needs_grad)) if self.measured else None,
                                  None if key is None else lambda chosen: remember_decision(key, chosen))
        return self.finish(call, self.route(name, self.bind(name, call), needs_grad))

    def tensors_of(self, call):
        """The call's first field: the input whose device autocast is read on."""
        return getattr(call, dataclasses.fields(call)[0].name)

    def signature(self, call, backend: str) -> tuple | None:
        """What every check and the backend decision of a call depend on, hashable; None when the inputs are not even
        tensors (the full checks then say what is wrong)."""
        try:
            device = self.tensors_of(call).device
            return (self.name, *(_describe(getattr(call, f.name)) for f in dataclasses.fields(call)
                                 if f.metadata.get("key", True)),
                    torch.is_grad_enabled(), settings(backend, device))
        except (AttributeError, TypeError):
            return None

    def route(self, name: str, call, needs_grad: bool) -> Tensor:
        entry = self.backends[name]
        if entry.backward is None:  # a forward-only kernel: no autograd op around it
            return self.forward(entry, call)
        if name == "torch" and self.small(call):
            # A small call, eager or compiled alike: autograd over the torch path's own ops saves what its custom
            # backward would and costs less than any Python autograd node.
            return self.forward(entry, call)
        if torch.compiler.is_compiling():
            return self.registered(name, call)
        if not needs_grad:
            return self.forward(entry, call)
        return self.function(name, call)

    def measurement(self, call, needs_grad: bool):
        """(key, run) for ``auto``'s measurement of this call: its shape class, and one call on a given backend
        (forward, and backward when training) on the same inputs, detached."""
        key = self.measurement_key(call, needs_grad)
        inputs = self.for_measuring(dataclasses.replace(call, **{f.name: _detached(getattr(call, f.name))
                                                                 for f in dataclasses.fields(call)}))

        def run(name):
            with torch.enable_grad() if needs_grad else torch.no_grad():
                out = self.route(name, self.bind(name, inputs), needs_grad)
                if needs_grad:
                    out.backward(torch.ones_like(out))
        return key, run
