"""The quantised-weight protocol (fastpeft/quantized.py): a format written outside fastpeft — here a toy int8 one —
runs through the ops, the layers and the model helpers on the torch backend with nothing of fastpeft changed, and the
backends without a kernel for it refuse it with the reason."""
import pytest
import torch
from conftest import rel_err
from torch import nn

import fastpeft
from fastpeft.quantized import QuantizedLinear, QuantizedWeight


class Int8Weight(QuantizedWeight):
    """W ≈ codes · scale per row: int8 codes (N, K), fp32 scales (N,)."""
    label = "int8 weight"
    base_name = "int8 base"

    def __init__(self, codes, scale, dtype):
        self.codes, self.scale, self.dtype, self.shape = codes, scale, dtype, codes.shape

    @classmethod
    def quantize(cls, weight):
        scale = weight.abs().amax(1).clamp_min(1e-12) / 127
        return cls(torch.round(weight / scale[:, None]).to(torch.int8), scale.float(), weight.dtype)

    @property
    def device(self):
        return self.codes.device

    def signature(self):
        return (self.shape, self.dtype, self.device)

    def dequantize(self, dtype=None):
        return (self.codes.float() * self.scale[:, None]).to(dtype or self.dtype)

    def with_dtype(self, dtype):
        return Int8Weight(self.codes, self.scale, dtype)

    def matmul(self, x, bias=None, out=None):
        y = torch.nn.functional.linear(x, self.dequantize(x.dtype), bias)
        return y if out is None else out.copy_(y)

    def matmul_t(self, dy, out=None):
        dx = dy @ self.dequantize(dy.dtype)
        return dx if out is None else out.add_(dx)


class Int8Linear(QuantizedLinear):
    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._weight = Int8Weight.quantize(linear.weight.detach())
        self.bias = linear.bias

    @property
    def weight(self):
        return self._weight

    def forward(self, x):
        return self._weight.matmul(x.reshape(-1, x.shape[-1]), self.bias).reshape(*x.shape[:-1], -1)

    def dequantized(self):
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = nn.Parameter(self._weight.dequantize(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def state_problem(self, state_dict, prefix):
        return None


def test_a_format_from_outside_runs_through_the_op_the_layer_and_the_model():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 32, requires_grad=True)
    base = nn.Linear(32, 24)
    q = Int8Linear(base)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(24, 4, requires_grad=True)
    y = fastpeft.lora_linear(x, q.weight, base.bias.detach(), a, b, 0.5, backend="torch")
    ref = fastpeft.lora_linear_reference(x.double(), q.weight.dequantize(torch.float64), base.bias.detach().double(),
                                         a.double(), b.double(), 0.5)
    assert rel_err(y, ref) < 1e-5
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    ref.square().sum().backward()
    assert all(rel_err(g, t.grad) < 1e-5 for g, t in zip(grads, (x, a, b), strict=True))

    layer = fastpeft.LoraLinear(q, r=4, lora_alpha=8, init_lora_weights=False)  # the format's own layer is taken
    out = layer(x.detach())
    assert out.shape == (3, 5, 24) and torch.isfinite(out).all()
    model = fastpeft.apply_lora(nn.Sequential(Int8Linear(nn.Linear(32, 32)), nn.ReLU()), ["0"], r=2)
    assert isinstance(model[0], fastpeft.LoraLinear) and model(x.detach()).shape == (3, 5, 32)
    with torch.no_grad():
        model[0].adapter.lora_B.normal_()
        before = model(x.detach())
        fastpeft.merge_and_unload(model)  # dequantised, the adapter merged
    assert type(model[0]) is nn.Linear and rel_err(model(x.detach()), before) < 1e-5
    with pytest.raises(ValueError, match=r"DoRA \(use_dora=True\) over a int8 base \(Int8Linear\)"):
        fastpeft.LoraLinear(q, r=4, use_dora=True)


def test_backends_without_a_kernel_for_the_format_refuse_it_with_the_reason():
    q = Int8Weight.quantize(torch.randn(8, 16))
    x, a, b = torch.randn(4, 16), torch.randn(2, 16), torch.randn(8, 2)
    for backend in ("triton", "cuda"):
        with pytest.raises(fastpeft.BackendUnavailableError, match=f"the {backend} backend has no kernel for a "
                                                                   "int8 weight base"):
            fastpeft.lora_linear(x, q, None, a, b, 1.0, backend=backend)
    with pytest.raises(ValueError, match="weight is a int8 weight: mixed-adapter batches over a int8 base"):
        fastpeft.lora_linear_mixed(x, q, None, [a], [b], [1.0], torch.zeros(4, dtype=torch.long))


def test_a_subclass_of_a_format_layer_with_its_own_forward_is_refused():
    class Clipped(Int8Linear):
        def forward(self, x):
            return super().forward(x).clamp(-1, 1)

    with pytest.raises(TypeError, match="a Clipped, an Int8Linear subclass with its own forward"):
        fastpeft.LoraLinear(Clipped(nn.Linear(8, 8)), r=2)
