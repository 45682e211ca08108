"""LoRA's dropout on the torch path, and the seeds every backend draws its masks from.

The torch backend draws a 16-bit uniform per element from a per-thread, per-device Generator re-seeded by each call
(the Triton kernels draw Philox in-kernel: ``kernels/lora_dropout.py``). A call's seed is the caller's
``dropout_seed`` or one drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeatable.
"""
from __future__ import annotations

import math
import numbers
import threading

import torch

from ..backends import select_backend
from ..checks import check_probability

_generators = threading.local()  # per thread and device: one Generator, re-seeded by each call


def _generator(device: torch.device) -> torch.Generator:
    by_device = _generators.__dict__.setdefault("by_device", {})
    if device not in by_device:
        by_device[device] = torch.Generator(device=device)
    return by_device[device]


def torch_drop_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The bool drop-mask (True = dropped) the torch backend draws for ``seed``.

    Each element compares a 16-bit uniform against p, so the drop probability is p rounded to a multiple of
    2⁻¹⁶. Drawing 64 random bits per four elements is about 4× faster on a CPU than ``bernoulli_``,
    whose per-element draw dominated the cost of dropout.
    """
    return torch.lt(torch_uniform16(seed, shape, device), -32768 + round(p * 65536))  # (< adds a Python wrapper)


def torch_uniform16(seed: int, shape, device) -> torch.Tensor:
    """The 16-bit uniforms (int16) behind :func:`torch_drop_mask`: element dropped when below -32768 + p·65536."""
    shape = tuple(shape)
    n = math.prod(shape)
    generator = _generator(torch.device(device))
    generator.manual_seed(seed)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    return bits.view(torch.int16)[:n].view(shape)


_SEED_BOUND = 2**31 - 1
# Seeds a caller may pass: every one gives its own mask on every backend. torch's CPU generator (mt19937) keeps
# only the low 32 bits of a seed, so seeds differing by 2**32 would draw the same mask there.
DROPOUT_SEED_LIMIT = 2**32


def seed_to_use(seed: int, dropout_p: float) -> int:
    """The dropout seed of a call: the caller's, or (negative) one drawn from torch's global generator when there is
    dropout; 0 when there is none."""
    if dropout_p > 0.0 and seed < 0:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("lora_linear with dropout is being captured in a CUDA graph: the seed drawn now would "
                               "be baked into the graph and every replay would drop the same elements. Capture with "
                               "dropout off (training=False or dropout_p=0), or pass dropout_seed= to fix the mask "
                               "knowingly")
        seed = int(torch.randint(0, _SEED_BOUND, ()).item())
    return max(seed, 0)


def check_dropout_seed(seed) -> None:
    """A caller's ``dropout_seed``: None or an integer in [0, 2**32)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < DROPOUT_SEED_LIMIT):
        raise ValueError(f"dropout_seed must be None or an integer in [0, 2**32), got {seed!r} (the torch backend's "
                         "generator takes 32 bits of seed, so larger seeds would repeat masks)")


def dropout_mask(seed: int, shape, p: float, backend: str = "torch", device="cpu") -> torch.Tensor:
    """The bool keep-mask (True = keep) that ``backend`` applies to a 2-D (M, K) input for ``dropout_seed=seed``.

    Backends draw differently (torch: its Generator; triton: in-kernel Philox at offset m·K + k), so a
    seed reproduces a mask within one backend. ``seed`` is an integer in [0, 2**32).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < DROPOUT_SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if not (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
            and all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"shape must be (M, K), two positive integers, got {shape!r}")
    check_probability("p", p)
    if backend not in _KEEP_MASKS:
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        where = None
    if where is None or where.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device (a torch.device or its name), got {device!r}")
    device = where
    select_backend(backend, [torch.empty(0, device=device)])  # one that cannot run says why
    return _KEEP_MASKS[backend](int(seed), tuple(int(n) for n in shape), float(p), device)


def _triton_keep_mask(seed, shape, p, device):
    from ..kernels import lora_linear as kernels
    return kernels.dropout_keep_mask(seed, shape, p, device)


# The dropout masks of the backends that draw them (in forward, and again in backward on triton).
_KEEP_MASKS = {"torch": lambda seed, shape, p, device: ~torch_drop_mask(seed, shape, p, device),
               "triton": _triton_keep_mask}

