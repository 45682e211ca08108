"""Benchmarks of the LoRA linear: one set of cases and one timing helper, shared by ``python -m fastpeft bench``,
pytest-benchmark (``pytest bench/ --benchmark-only``) and ``bench/gpu_check.sh``.

Every candidate layer runs the same shape on the same device side by side in one process: the frozen base
``nn.Linear``, fastpeft's ``LoraLinear`` on each usable backend, and HF PEFT's LoRA ``Linear`` (when ``peft`` is
installed). Times are medians; peak memory is what a call allocates above what was live before it.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..backends import not_supported_reasons
from ..layers import BottleneckAdapter, LoraLinear
from .measure import (  # noqa: F401  (the measuring helpers, for users of this module)
    MODES,
    _clear_grads,
    _ticker,
    bnb_available,
    device_description,
    import_problem,
    interleaved_times,
    make_step,
    peak_memory_mb,
    peft_available,
    progress_bar,
    try_import,
)


@dataclass(frozen=True)
class Shape:
    M: int  # tokens (batch × sequence)
    K: int  # in_features
    N: int  # out_features
    r: int

    def __str__(self):
        return f"M={self.M} K={self.K} N={self.N} r={self.r}"

    def flops(self, mode: str, candidate: str) -> int:
        """Multiply-add FLOPs (×2) of one step; backward has no dW (the base weight is frozen)."""
        M, K, N, r = self.M, self.K, self.N, self.r
        base = 2 * M * N * K * (1 if mode == "fwd" else 2)
        if candidate == "nn.Linear":
            return base
        return base + 2 * M * r * (K + N) * (1 if mode == "fwd" else 3)  # x·Aᵀ and S·Bᵀ, and their grads


@dataclass(frozen=True)
class AdapterShape:
    M: int  # tokens
    d: int  # hidden size
    m: int  # bottleneck

    def __str__(self):
        return f"M={self.M} d={self.d} m={self.m}"

    def flops(self, mode: str, candidate: str) -> int:
        """Two GEMMs forward; backward adds four (dh, da and both weight gradients)."""
        return 2 * 2 * self.M * self.d * self.m * (1 if mode == "fwd" else 3)


QUICK_SHAPES = [Shape(2048, 1024, 1024, 16)]
CPU_SHAPES = QUICK_SHAPES + [Shape(512, 4096, 4096, 16), Shape(1024, 2048, 5632, 64)]
GPU_SHAPES = [Shape(8192, 4096, 4096, 16), Shape(8192, 4096, 14336, 16), Shape(8192, 14336, 4096, 64),
              Shape(2048, 4096, 4096, 16)]

ADAPTER_QUICK_SHAPES = [AdapterShape(2048, 1024, 64)]
ADAPTER_SHAPES = ADAPTER_QUICK_SHAPES + [AdapterShape(2048, 1024, 256), AdapterShape(512, 4096, 64)]
ADAPTER_GPU_SHAPES = [AdapterShape(8192, 4096, 64), AdapterShape(8192, 4096, 256)]


def _timeable(backend: str, tensor: torch.Tensor) -> bool:
    """Whether to time ``backend`` here: it can run, and not through Triton's CPU interpreter (a test tool)."""
    return tensor.device.type == "cuda" and not not_supported_reasons(backend, [tensor])


def make_candidates(shape: Shape, dtype, device, dropout: float, seed: int = 0) -> dict[str, nn.Module]:
    """The layers to compare, all over one base weight and (LoRA ones) the same adapter values.

    Adapters are fp32 on a half-precision base in both fastpeft and PEFT (each library's default).
    """
    torch.manual_seed(seed)
    base = nn.Linear(shape.K, shape.N, bias=True, device=device, dtype=dtype).requires_grad_(False)
    alpha = 2 * shape.r
    ours = LoraLinear(copy.deepcopy(base), shape.r, alpha, dropout, init_lora_weights=False)
    layers: dict[str, nn.Module] = {"nn.Linear": base}
    for backend in ("torch", "triton"):
        if backend == "torch" or _timeable(backend, base.weight):
            layer = copy.deepcopy(ours)
            layer.backend = backend
            layers[f"fastpeft[{backend}]"] = layer
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
        config = LoraConfig(r=shape.r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False)
        peft_layer = PeftLinear(copy.deepcopy(base), "default", config=config, r=shape.r, lora_alpha=alpha)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight = nn.Parameter(ours.lora_A.detach().clone())
            peft_layer.lora_B["default"].weight = nn.Parameter(ours.lora_B.detach().clone())
        layers["peft"] = peft_layer
    for layer in layers.values():
        layer.train()
    return layers


class UnfusedAdapter(nn.Module):
    """A bottleneck adapter written the AdapterHub way: ``h + scaling · Sequential(Linear, act, Linear)(h)``."""

    ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}

    def __init__(self, d, m, activation="relu", scaling=1.0, device=None, dtype=None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, m, device=device, dtype=dtype), self.ACTS[activation](),
                                 nn.Linear(m, d, device=device, dtype=dtype))
        self.scaling = scaling

    def forward(self, h):
        return h + self.scaling * self.net(h)


def make_adapter_candidates(shape: AdapterShape, dtype, device, activation="relu", seed=0) -> dict[str, nn.Module]:
    """The unfused AdapterHub-style adapter and fastpeft's on each usable backend, all holding the same weights."""
    torch.manual_seed(seed)
    unfused = UnfusedAdapter(shape.d, shape.m, activation, 2.0, device=device, dtype=dtype)
    layers: dict[str, nn.Module] = {"unfused (AdapterHub way)": unfused.train()}
    for backend in ("torch", "triton"):
        if backend != "torch" and not _timeable(backend, unfused.net[0].weight):
            continue
        ours = BottleneckAdapter(shape.d, shape.m, activation=activation, scaling=2.0, device=device, dtype=dtype,
                                 backend=backend)
        with torch.no_grad():
            ours.down.copy_(unfused.net[0].weight)
            ours.down_bias.copy_(unfused.net[0].bias)
            ours.up.copy_(unfused.net[2].weight)
            ours.up_bias.copy_(unfused.net[2].bias)
        layers[f"fastpeft[{backend}]"] = ours.train()
    return layers


def run_adapters(shapes, dtype=torch.float32, device="cpu", rounds: int = 15, progress=None) -> list[Result]:
    """Adapters, side by side like :func:`run`: forward and forward+backward (weights and h trained)."""
    results = []
    tick = _ticker(progress, len(shapes) * len(MODES))
    for shape in shapes:
        layers = make_adapter_candidates(shape, dtype, device)
        torch.manual_seed(1)
        h = torch.randn(shape.M, shape.d, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape.M, shape.d, device=device, dtype=dtype)
        results += _measure(layers, h, dy, shape, 0.0, device, rounds, tick)
    return results


@dataclass
class Result:
    shape: Shape
    dropout: float
    candidate: str
    mode: str
    ms: float
    peak_mb: float

    @property
    def tflops(self) -> float:
        return self.shape.flops(self.mode, self.candidate) / (self.ms * 1e-3) / 1e12


def _measure(layers: dict, x, dy, shape, dropout: float, device, rounds: int, tick) -> list[Result]:
    """Every candidate layer in every mode on one input: interleaved medians, then each one's peak memory;
    ``tick()`` after each mode."""
    results = []
    for mode in MODES:
        steps = {name: make_step(layer, x, dy, mode) for name, layer in layers.items()}
        times = interleaved_times(steps, device, rounds)
        for name, step in steps.items():
            _clear_grads(layers[name], x)
            results.append(Result(shape, dropout, name, mode, statistics.median(times[name]),
                                  peak_memory_mb(step, device)))
        tick()
    return results


# Candidates with no dropout of their own: timed beside each dropout setting only so that ratios come from one run.
NO_DROPOUT = ("nn.Linear", "bnb Linear4bit")


def _cases(shapes, dropouts, make, dtype, device, progress):
    """(shape, dropout, layers, x, dy, tick) for every shape and dropout: ``make``'s candidates, one input and one
    output gradient shared by all of them, and the tick of ``progress`` for each of the modes measured on them."""
    tick = _ticker(progress, len(shapes) * len(dropouts) * len(MODES))
    for shape in shapes:
        for dropout in dropouts:
            layers = make(shape, dtype, device, dropout)
            torch.manual_seed(1)
            x = torch.randn(shape.M, shape.K, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
            yield shape, dropout, layers, x, dy, tick


def run(shapes, dtype=torch.float32, device="cpu", dropouts=(0.0,), rounds: int = 15, candidates=None,
        progress=None) -> list[Result]:
    """Measure every LoRA candidate on every shape, dropout and mode, side by side (:func:`interleaved_times`);
    each reported time is the median over the rounds."""
    results = []
    for shape, dropout, layers, x, dy, tick in _cases(shapes, dropouts, make_candidates, dtype, device, progress):
        if candidates is not None:
            layers = {k: v for k, v in layers.items() if k in candidates}
        results += _measure(layers, x, dy, shape, dropout, device, rounds, tick)
    return results


# DoRA: fastpeft's DoRA beside HF PEFT's DoRA, fastpeft's LoRA and the frozen base, on one base weight and adapter.
DORA_REFERENCE = "peft DoRA"


def make_dora_candidates(shape: Shape, dtype, device, dropout: float, seed: int = 0) -> dict[str, nn.Module]:
    """nn.Linear, fastpeft's LoRA and DoRA layers (each usable backend) and, with peft installed, PEFT's DoRA
    layer, over one base weight and one trained-looking adapter (B and m off their initial values)."""
    torch.manual_seed(seed)
    base = nn.Linear(shape.K, shape.N, bias=True, device=device, dtype=dtype).requires_grad_(False)
    alpha = 2 * shape.r
    lora = LoraLinear(copy.deepcopy(base), shape.r, alpha, dropout, init_lora_weights=False)
    dora = LoraLinear(copy.deepcopy(base), shape.r, alpha, dropout, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        dora.lora_A.copy_(lora.lora_A)
        dora.lora_B.copy_(lora.lora_B)
        dora.lora_magnitude_vector.mul_(1.0 + 0.1 * torch.rand_like(dora.lora_magnitude_vector))
    layers: dict[str, nn.Module] = {"nn.Linear": base}
    for backend in ("torch", "triton"):
        if backend == "torch" or _timeable(backend, base.weight):
            for name, layer in (("LoRA", lora), ("DoRA", dora)):
                layer = copy.deepcopy(layer)
                layer.backend = backend
                layers[f"fastpeft {name}[{backend}]"] = layer
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
        config = LoraConfig(r=shape.r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False,
                            use_dora=True)
        peft_layer = PeftLinear(copy.deepcopy(base), "default", config=config, r=shape.r, lora_alpha=alpha,
                                use_dora=True)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(dora.lora_A)
            peft_layer.lora_B["default"].weight.copy_(dora.lora_B)
            peft_layer.lora_magnitude_vector["default"].weight.copy_(dora.lora_magnitude_vector)
        layers[DORA_REFERENCE] = peft_layer
    for layer in layers.values():
        layer.train()
    return layers


def saved_mb(layer: nn.Module, x: torch.Tensor) -> float:
    """MiB of the distinct tensors autograd keeps for ``layer(x)``'s backward (parameters it keeps included)."""
    kept = {}

    def pack(t):
        kept[(t.data_ptr(), tuple(t.shape), t.dtype)] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(kept.values()) / 2**20


@dataclass
class SavedResult:
    shape: Shape
    dropout: float
    candidate: str
    saved_mb: float


def run_dora(shapes, dtype=torch.float32, device="cpu", dropouts=(0.0, 0.1), rounds: int = 15,
             progress=None) -> tuple[list[Result], list[SavedResult]]:
    """DoRA side by side (:func:`interleaved_times`): every candidate of :func:`make_dora_candidates` in both modes,
    and what each keeps for backward."""
    results, saved = [], []
    for shape, dropout, layers, x, dy, tick in _cases(shapes, dropouts, make_dora_candidates, dtype, device,
                                                      progress):
        results += _measure(layers, x, dy, shape, dropout, device, rounds, tick)
        for name, layer in layers.items():
            saved.append(SavedResult(shape, dropout, name, saved_mb(layer, x)))
            _clear_grads(layer, x)
    return results, saved


def format_saved_table(saved: list[SavedResult], reference: str = DORA_REFERENCE) -> str:
    by_key = {(r.shape, r.dropout, r.candidate): r for r in saved}
    show_dropout = any(isinstance(r.shape, Shape) for r in saved)  # (LoRA-family shapes have a dropout)
    lines = ["| shape |" + (" dropout |" if show_dropout else "") + " candidate | saved MiB | saved / " + reference
             + " |", "|---|" + ("---|" if show_dropout else "") + "---|---|---|"]
    for r in saved:
        ref = by_key.get((r.shape, r.dropout, reference))
        dropout = ("-" if r.candidate in NO_DROPOUT else f"{r.dropout:g}") if show_dropout else None
        lines.append(f"| {r.shape} |" + (f" {dropout} |" if show_dropout else "") + f" {r.candidate} | "
                     f"{r.saved_mb:.1f} | {_ratio(r.saved_mb, ref.saved_mb) if ref else '-'} |")
    return "\n".join(lines) + (
        "\n\nLower is better. saved MiB: the distinct tensors autograd keeps for backward after one forward (the "
        "frozen weight included where a layer keeps it), counted with torch.autograd.graph.saved_tensors_hooks; "
        f"saved / {reference}: relative to it on the same shape" + (
            " and dropout (as in the table above)." if show_dropout else "."))


# QLoRA: LoRA over a 4-bit (NF4) base, beside PEFT over bitsandbytes' Linear4bit, LoRA over the dense base and the
# dense base alone, all from one weight and one adapter.
NF4_REFERENCE = "peft+bnb QLoRA"


def make_nf4_candidates(shape: Shape, dtype, device, dropout: float, seed: int = 0) -> dict[str, nn.Module]:
    """nn.Linear (dense, ``dtype``), fastpeft's LoRA over it, fastpeft's LoRA over the same weight in NF4 (double
    quantised, computing in ``dtype``; each usable backend) and, with peft and bitsandbytes installed, bitsandbytes'
    Linear4bit alone and PEFT's LoRA over it (the same codes: converted from fastpeft's layer, not requantised)."""
    from ..nf4 import NF4Linear
    torch.manual_seed(seed)
    base = nn.Linear(shape.K, shape.N, bias=True, device=device, dtype=dtype).requires_grad_(False)
    alpha = 2 * shape.r
    lora = LoraLinear(copy.deepcopy(base), shape.r, alpha, dropout, init_lora_weights=False)
    quantized = NF4Linear.from_linear(base)
    layers: dict[str, nn.Module] = {"nn.Linear": base, "fastpeft LoRA[torch]": lora}
    for backend in ("torch", "triton"):
        if backend == "torch" or _timeable(backend, base.weight):
            layer = LoraLinear.from_adapters(copy.deepcopy(quantized), {"default": copy.deepcopy(lora.adapter)},
                                             "default", backend=backend)
            layers[f"fastpeft QLoRA[{backend}]"] = layer
    if peft_available() and bnb_available():
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
        bnb_layer = quantized.to_bnb()
        layers["bnb Linear4bit"] = bnb_layer
        config = LoraConfig(r=shape.r, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=False)
        peft_layer = PeftLinear(copy.deepcopy(bnb_layer), "default", config=config, r=shape.r, lora_alpha=alpha)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight = nn.Parameter(lora.lora_A.detach().clone())
            peft_layer.lora_B["default"].weight = nn.Parameter(lora.lora_B.detach().clone())
        layers[NF4_REFERENCE] = peft_layer
    for layer in layers.values():
        layer.train()
    return layers


@dataclass
class WeightBytes:
    candidate: str
    mib: float


def run_nf4(shapes, dtype=torch.float32, device="cpu", dropouts=(0.0,), rounds: int = 15,
            progress=None) -> tuple[list[Result], list[WeightBytes]]:
    """QLoRA side by side (:func:`interleaved_times`): every candidate of :func:`make_nf4_candidates` in both modes;
    and the base weight's bytes, dense against NF4 (first shape)."""
    results, sizes = [], []
    for shape, dropout, layers, x, dy, tick in _cases(shapes, dropouts, make_nf4_candidates, dtype, device, progress):
        results += _measure(layers, x, dy, shape, dropout, device, rounds, tick)
        if not sizes:
            dense = layers["nn.Linear"].weight
            nf4 = layers["fastpeft QLoRA[torch]"].base_layer.weight
            sizes = [WeightBytes(f"dense {dtype}", dense.numel() * dense.element_size() / 2**20),
                     WeightBytes("bf16", dense.numel() * 2 / 2**20),
                     WeightBytes("NF4, double-quantised absmax", nf4.nbytes / 2**20)]
    return results, sizes


def format_weight_bytes(sizes: list[WeightBytes]) -> str:
    bf16 = next(s.mib for s in sizes if s.candidate == "bf16")
    lines = ["| base weight | MiB | / bf16 |", "|---|---|---|"]
    lines += [f"| {s.candidate} | {s.mib:.3f} | {_ratio(s.mib, bf16)} |" for s in sizes]
    return "\n".join(lines) + ("\n\nLower is better. MiB: bytes of the frozen base weight (NF4: its 4-bit codes with "
                               "their absmaxes, code book and scales); / bf16: relative to the same weight in bf16.")


# Mixed-adapter batches: SEQUENCES sequences of TOKENS tokens, each sequence taking one of n adapters.
MIXED_SEQUENCES, MIXED_TOKENS = 16, 128
MIXED_ADAPTER_COUNTS = (1, 4, 16, 64)
MIXED_REFERENCE = "peft mixed"


@dataclass
class MixedResult:
    adapters: int
    mode: str  # "fwd, no grad" (serving) or "fwd+bwd" (training several adapters)
    candidate: str
    ms: float


def _mixed_layers(K, N, r, n, dtype, device):
    """nn.Linear, fastpeft's LoraLinear and (with peft) PEFT's LoRA Linear, each holding the same n adapters."""
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    ours = LoraLinear(copy.deepcopy(base), r, 2 * r, init_lora_weights=False, adapter_name="a0")
    for i in range(1, n):
        ours.add_adapter(f"a{i}", r, 2 * r, init_lora_weights=False)
    layers = {"nn.Linear": base, "fastpeft mixed": ours}
    if peft_available():
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
        config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False)
        theirs = PeftLinear(copy.deepcopy(base), "a0", config=config, r=r, lora_alpha=2 * r)
        for i in range(1, n):
            theirs.update_layer(f"a{i}", r, 2 * r, config=config)
        with torch.no_grad():
            for i in range(n):
                theirs.lora_A[f"a{i}"].weight.copy_(ours.adapters[f"a{i}"].lora_A)
                theirs.lora_B[f"a{i}"].weight.copy_(ours.adapters[f"a{i}"].lora_B)
        layers[MIXED_REFERENCE] = theirs
    return layers


def run_mixed(counts=MIXED_ADAPTER_COUNTS, K=1024, N=1024, r=16, dtype=torch.float32, device="cpu", rounds=15,
              progress=None, sequences=MIXED_SEQUENCES, tokens=MIXED_TOKENS) -> list[MixedResult]:
    """Mixed batches side by side: forward (no grad) of nn.Linear, fastpeft's and PEFT's mixed batch at each number
    of adapters (sequence i takes adapter i mod n); then training 4 adapters: one forward+backward over the mixed
    batch against 4 steps, one per adapter on its own sequences."""
    results = []
    tick = _ticker(progress, len(counts) + 1)
    x = torch.randn(sequences, tokens, K, device=device, dtype=dtype)
    for n in counts:
        layers = _mixed_layers(K, N, r, n, dtype, device)
        names = [f"a{i % n}" for i in range(sequences)]
        for layer in layers.values():
            layer.eval()

        def serve(name, layer, names=names):
            def step():
                with torch.no_grad():
                    layer(x) if name == "nn.Linear" else layer(x, adapter_names=names)
            return step
        times = interleaved_times({name: serve(name, layer) for name, layer in layers.items()}, device, rounds)
        for name, t in times.items():
            results.append(MixedResult(n, "fwd, no grad", name, statistics.median(t)))
        tick()
    layer = _mixed_layers(K, N, r, 4, dtype, device)["fastpeft mixed"].train()
    names = [f"a{i % 4}" for i in range(sequences)]
    xg = x.detach().requires_grad_(True)
    dy = torch.randn(sequences, tokens, N, device=device, dtype=dtype)

    def together():
        _clear_grads(layer, xg)
        layer(xg, adapter_names=names).backward(dy)

    def separately():
        _clear_grads(layer, xg)
        for i in range(4):
            rows = list(range(i, sequences, 4))
            layer.set_adapter(f"a{i}")
            layer(xg[rows]).backward(dy[rows])
    times = interleaved_times({"fastpeft 4 adapters together": together,
                               "fastpeft 4 adapters one after the other": separately}, device, rounds)
    for name, t in times.items():
        results.append(MixedResult(4, "fwd+bwd", name, statistics.median(t)))
    tick()
    return results


def format_mixed_table(results: list[MixedResult], sequences=MIXED_SEQUENCES, tokens=MIXED_TOKENS) -> str:
    by_key = {(r.adapters, r.mode, r.candidate): r for r in results}
    lines = ["| adapters | mode | candidate | median ms | time / base | time / peft mixed |",
             "|---|---|---|---|---|---|"]
    for r in results:
        base = by_key.get((r.adapters, r.mode, "nn.Linear"))
        ref = by_key.get((r.adapters, r.mode, MIXED_REFERENCE))
        if r.mode == "fwd+bwd":
            ref = by_key.get((r.adapters, r.mode, "fastpeft 4 adapters one after the other"))
        lines.append(f"| {r.adapters} | {r.mode} | {r.candidate} | {r.ms:.3f} | "
                     f"{_ratio(r.ms, base.ms) if base else '-'} | {_ratio(r.ms, ref.ms) if ref else '-'} |")
    return "\n".join(lines) + (
        f"\n\nLower is better. adapters: n, the adapters in one batch of {sequences} sequences of {tokens} tokens, "
        "sequence i taking adapter i mod n; median ms: median time of one call over rounds that interleave the "
        "candidates; fwd, no grad: serving (forward under torch.no_grad()); time / base: relative to the frozen "
        "nn.Linear; time / peft mixed: relative to HF PEFT's adapter_names forward. fwd+bwd: training 4 adapters, one "
        "forward+backward over the mixed batch against 4 steps each on its own sequences (the last column is relative "
        "to the 4 steps).")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 and math.isfinite(a / b) else "-"


def format_table(results: list[Result], reference: str = "peft", base_name: str = "nn.Linear") -> str:
    """A markdown table: times, peak memory, and ratios to ``reference`` (HF PEFT) and to ``base_name``, then a
    legend saying what each column means. LoRA tables have a dropout column ("-" for the base layer, which has
    none); adapter tables have none."""
    by_key = {(r.shape, r.dropout, r.mode, r.candidate): r for r in results}
    has_ref = any(r.candidate == reference for r in results)
    show_base = base_name != reference
    show_dropout = any(isinstance(r.shape, Shape) for r in results)
    head = ["shape"] + (["dropout"] if show_dropout else []) + ["mode", "candidate", "median ms", "TFLOP/s",
                                                                 "peak MiB"]
    head += ["time / base"] if show_base else []
    if has_ref:
        head += [f"time / {reference}", f"memory / {reference}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = by_key.get((r.shape, r.dropout, r.mode, base_name))
        row = [str(r.shape)]
        row += ["-" if r.candidate in NO_DROPOUT else f"{r.dropout:g}"] if show_dropout else []
        row += [r.mode, r.candidate, f"{r.ms:.3f}", f"{r.tflops:.2f}", f"{r.peak_mb:.1f}"]
        row += [_ratio(r.ms, base.ms) if base else "-"] if show_base else []
        if has_ref:
            ref = by_key.get((r.shape, r.dropout, r.mode, reference))
            row += [_ratio(r.ms, ref.ms), _ratio(r.peak_mb, ref.peak_mb)] if ref else ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + _legend(reference if has_ref else None, base_name if show_base else None,
                                                show_dropout)


def _legend(reference: str | None, base_name: str | None, show_dropout: bool) -> str:
    lines = ["Lower is better in every column but TFLOP/s. fwd: forward; fwd+bwd: forward and backward "
             "(gradients of the input and of the trainable weights; the base weight is frozen). median ms: median "
             "time of one call over rounds that interleave the candidates; peak MiB: memory one call allocates "
             "above what was live before it; TFLOP/s: useful FLOPs per second."]
    if base_name is not None:
        lines.append(f"time / base: time relative to {base_name}, the frozen base layer without LoRA "
                     "(1.00 would be LoRA at no cost).")
    if reference is not None:
        what = {"peft": "HF PEFT's LoRA Linear", DORA_REFERENCE: "HF PEFT's DoRA Linear",
                "peft IA3": "HF PEFT's IA3 Linear"}.get(reference, reference)
        lines.append(f"time / {reference}, memory / {reference}: relative to {what} on the same shape"
                     + (" and dropout" if show_dropout else "") + " (below 1.00: smaller than it).")
    if show_dropout:
        lines.append("dropout: the LoRA dropout; the base layer has none (\"-\"), and is timed beside each "
                     "setting so that every ratio comes from one run.")
    return "\n".join(lines)


# Host overhead: a layer so small that its arithmetic is negligible, timed per call in three modes, and the token
# sweep at K=N=1024 where the overhead meets the arithmetic.
OVERHEAD_SHAPE = Shape(1, 16, 16, 4)
SWEEP_TOKENS = (1, 16, 128, 1024, 4096)
OVERHEAD_MODES = ("fwd, no grad", "fwd", "fwd+bwd")


@dataclass
class OverheadResult:
    shape: Shape
    mode: str
    candidate: str
    us: float  # median wall-clock microseconds per call


def _overhead_step(layer: nn.Module, x: torch.Tensor, mode: str):
    if mode == "fwd, no grad":
        def step():
            with torch.no_grad():
                layer(x)
    elif mode == "fwd":
        def step():
            layer(x)
    else:
        def step():
            _clear_grads(layer, x)
            layer(x).sum().backward()
    return step


def _per_call_us(steps: dict, device, rounds: int, calls: int) -> dict[str, float]:
    """Median wall-clock microseconds per call of each step: rounds of ``calls`` calls, interleaved and rotated
    like :func:`interleaved_times`, the GPU synchronized at the end of each round (host time is what is measured)."""
    names = list(steps)
    cuda = torch.device(device).type == "cuda"
    for name in names:
        for _ in range(3):
            steps[name]()
    times = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            for _ in range(calls):
                steps[name]()
            if cuda:
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e6 / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def run_overhead(dtype=torch.float32, device="cpu", rounds: int = 15, tokens=SWEEP_TOKENS,
                 progress=None) -> list[OverheadResult]:
    """Per-call time of nn.Linear, fastpeft's LoraLinear (each usable backend) and HF PEFT's LoRA Linear: the tiny
    layer in every mode, then forward+backward over ``tokens`` at K=N=1024, r=16."""
    cases = [(OVERHEAD_SHAPE, mode) for mode in OVERHEAD_MODES]
    cases += [(Shape(m, 1024, 1024, 16), "fwd+bwd") for m in tokens]
    results = []
    tick = _ticker(progress, len(cases))
    for shape, mode in cases:
        layers = make_candidates(shape, dtype, device, 0.0)
        torch.manual_seed(1)
        x = torch.randn(shape.M, shape.K, device=device, dtype=dtype, requires_grad=True)
        calls = max(1, min(200, 20_000 // (shape.M * (shape.K + shape.N) // 32 + 1)))
        steps = {name: _overhead_step(layer, x, mode) for name, layer in layers.items()}
        for name, us in _per_call_us(steps, device, rounds, calls).items():
            results.append(OverheadResult(shape, mode, name, us))
        tick()
    return results


def format_overhead_table(results: list[OverheadResult], reference: str = "peft") -> str:
    by_key = {(r.shape, r.mode, r.candidate): r for r in results}
    has_ref = any(r.candidate == reference for r in results)
    head = ["shape", "mode", "candidate", "us per call", "time / base"] + ([f"time / {reference}"] if has_ref else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        base = by_key.get((r.shape, r.mode, "nn.Linear"))
        row = [str(r.shape), r.mode, r.candidate, f"{r.us:.1f}", _ratio(r.us, base.us) if base else "-"]
        if has_ref:
            ref = by_key.get((r.shape, r.mode, reference))
            row.append(_ratio(r.us, ref.us) if ref else "-")
        lines.append("| " + " | ".join(row) + " |")
    legend = ("Lower is better. us per call: median wall-clock microseconds of one call (rounds of many calls that "
              "interleave the candidates). fwd, no grad: forward under torch.no_grad(); fwd: forward recording "
              "autograd; fwd+bwd: forward, .sum() and backward. time / base: relative to nn.Linear, the frozen base "
              "layer.")
    if has_ref:
        legend += f" time / {reference}: relative to HF PEFT's LoRA Linear (below 1.00: faster)."
    return "\n".join(lines) + "\n\n" + legend
