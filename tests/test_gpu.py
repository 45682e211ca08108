"""GPU-only checks (skipped without a CUDA GPU): training-sized shapes, auto dispatch, determinism."""
import pytest
import torch
from conftest import TOLERANCE, gpu, rel_err

import fastpeft
from fastpeft import backends

pytestmark = [gpu, pytest.mark.gpu]


def _inputs(M, K, N, r, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dt)
    x = rand(M, K).requires_grad_(True)
    w = rand(N, K, scale=K ** -0.5)
    b = rand(N)
    a = rand(r, K, dt=torch.float32, scale=K ** -0.5).requires_grad_(True)
    bb = rand(N, r, dt=torch.float32, scale=r ** -0.5).requires_grad_(True)
    return x, w, b, a, bb, rand(M, N)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "drop0.1"])
def test_training_shape_matches_reference(dtype, p):
    M, K, N, r = 1000, 1024, 768, 16  # M on purpose not a multiple of any block
    x, w, b, a, bb, dy = _inputs(M, K, N, r, dtype)
    y = fastpeft.lora_linear(x, w, b, a, bb, 2.0, dropout_p=p, backend="triton", dropout_seed=11)
    y.backward(dy)
    keep = fastpeft.dropout_mask(11, (M, K), p, "triton", "cuda") if p else None
    x64, a64, bb64 = (t.detach().double().requires_grad_(True) for t in (x, a, bb))
    ref = fastpeft.lora_linear_reference(x64, w.double(), b.double(), a64, bb64, 2.0, keep, p)
    ref.backward(dy.double())
    for got, want in [(y, ref), (x.grad, x64.grad), (a.grad, a64.grad), (bb.grad, bb64.grad)]:
        assert rel_err(got, want) <= TOLERANCE[dtype]


def test_auto_picks_triton_on_cuda():
    x = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
    assert backends.select_backend("auto", [x]) == "triton"
    assert backends.select_backend("auto", [x.double()]) == "torch"


def test_backward_is_deterministic():
    x, w, b, a, bb, dy = _inputs(777, 512, 384, 8, torch.bfloat16)
    grads = []
    for _ in range(2):
        x.grad = a.grad = bb.grad = None
        fastpeft.lora_linear(x, w, b, a, bb, 1.0, dropout_p=0.1, backend="triton", dropout_seed=3).backward(dy)
        grads.append([x.grad.clone(), a.grad.clone(), bb.grad.clone()])
    for g1, g2 in zip(*grads, strict=True):
        assert torch.equal(g1, g2)
