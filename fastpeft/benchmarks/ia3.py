"""(IA)³ side by side: fastpeft's Ia3Linear (each usable backend) beside HF PEFT's IA3 Linear and the frozen base, on
one base weight and one trained-looking vector, for an output scale (keys, values) and an input scale (PEFT's
feed-forward modules): time of forward and of forward+backward, peak memory, and what each keeps for backward."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import Ia3Linear
from .measure import _clear_grads, _ticker, peft_available
from .timing import MODES, SavedResult, _measure, _timeable, saved_mb

IA3_REFERENCE = "peft IA3"


@dataclass(frozen=True)
class Ia3Shape:
    M: int  # tokens
    K: int  # in_features
    N: int  # out_features
    feedforward: bool  # True: the input is scaled

    def __str__(self):
        return f"M={self.M} K={self.K} N={self.N}, {'input' if self.feedforward else 'output'} scale"

    def flops(self, mode: str, candidate: str) -> int:
        """The base GEMM's (and dX's in backward); the scale's M·K or M·N products are left out."""
        return 2 * self.M * self.N * self.K * (1 if mode == "fwd" else 2)


IA3_QUICK_SHAPES = [Ia3Shape(2048, 1024, 1024, False), Ia3Shape(2048, 1024, 1024, True)]
IA3_CPU_SHAPES = IA3_QUICK_SHAPES + [Ia3Shape(1024, 2048, 5632, False), Ia3Shape(1024, 5632, 2048, True)]
IA3_GPU_SHAPES = [Ia3Shape(8192, 4096, 4096, False), Ia3Shape(8192, 4096, 4096, True),
                  Ia3Shape(8192, 14336, 4096, True)]


def make_ia3_candidates(shape: Ia3Shape, dtype, device, seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    base = nn.Linear(shape.K, shape.N, bias=True, device=device, dtype=dtype).requires_grad_(False)
    ours = Ia3Linear(copy.deepcopy(base), shape.feedforward, init_ia3_weights=False)
    layers: dict[str, nn.Module] = {"nn.Linear": base}
    for backend in ("torch", "triton"):
        if backend == "torch" or _timeable(backend, base.weight):
            layer = copy.deepcopy(ours)
            layer.backend = backend
            layers[f"fastpeft (IA)³[{backend}]"] = layer
    if peft_available():
        from peft import IA3Config
        from peft.tuners.ia3 import Linear as PeftIa3Linear
        config = IA3Config(target_modules=["layer"], feedforward_modules=["layer"] if shape.feedforward else [],
                           init_ia3_weights=False)
        peft_layer = PeftIa3Linear(copy.deepcopy(base), "default", config=config, is_feedforward=shape.feedforward)
        with torch.no_grad():
            peft_layer.ia3_l["default"].copy_(ours.ia3_l["default"])
        layers[IA3_REFERENCE] = peft_layer
    for layer in layers.values():
        layer.train()
    return layers


def run_ia3(shapes, dtype=torch.float32, device="cpu", rounds: int = 15, progress=None):
    """Every candidate on every shape in both modes, interleaved, and what each keeps for backward:
    (results, saved) for ``timing.format_table`` and ``timing.format_saved_table``."""
    results, saved = [], []
    tick = _ticker(progress, len(shapes) * len(MODES))
    for shape in shapes:
        layers = make_ia3_candidates(shape, dtype, device)
        torch.manual_seed(1)
        x = torch.randn(shape.M, shape.K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(shape.M, shape.N, device=device, dtype=dtype)
        results += _measure(layers, x, dy, shape, 0.0, device, rounds, tick)
        for name, layer in layers.items():
            saved.append(SavedResult(shape, 0.0, name, saved_mb(layer, x)))
            _clear_grads(layer, x)
    return results, saved
