"""Test set-up: Triton runs under its interpreter on CPU-only machines, and kernel outputs start as NaN."""
import os

import torch

# Read when fastpeft's kernels are first imported, so it is set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastpeft import backends, checks  # noqa: E402


def _poison(out: torch.Tensor) -> None:
    out.fill_(float("nan") if out.dtype.is_floating_point else -1)


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a kernel (Triton or CUDA) is about to write starts as NaN (-1 for integers), so an element a
    kernel fails to write fails the test."""
    monkeypatch.setattr(checks, "OUTPUT_HOOK", _poison)

HAS_CUDA = torch.cuda.is_available()
# Where each backend is tested: torch on every device here; triton on the GPU, or the CPU under the interpreter.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# Where Triton cannot run (not installed, an interpreter that cannot run here), its tests skip with the reasons.
TRITON_SKIP = "; ".join(backends.backend_status()["triton"]) or None
TRITON_DEVICE = None if TRITON_SKIP else ("cuda" if HAS_CUDA else "cpu")
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason=f"Triton cannot run here: {TRITON_SKIP}")

# Relative-error budgets against the float64 reference (DESIGN.md "Numerics").
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-12}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def rel_err(out, ref):
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are 0)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    return (out - ref).norm().item() / denom if denom else (out - ref).norm().item()


def backend_params():
    """The (backend, device) pairs this machine can run, as pytest params."""
    params = [pytest.param("torch", d, id=f"torch-{d}") for d in DEVICES]
    params.append(pytest.param("triton", TRITON_DEVICE, id=f"triton-{TRITON_DEVICE or 'none'}", marks=needs_triton))
    return params


gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def fork(work) -> int:
    """Run ``work()`` in a forked child process that never returns into pytest (exit status 0 when it returns, 1 when
    it raises, with the traceback printed); returns the child's pid."""
    import traceback
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            work()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    return pid


def refused_by_cli(capsys, *args) -> str:
    """``python -m fastpeft *args``, run in this process (a subprocess would spend seconds importing torch), must
    refuse before doing anything: exit status 2, nothing on stdout. Returns what it wrote to stderr."""
    from fastpeft.__main__ import main
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's parser.error
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2 and out == "", (code, out, err)
    return err


def bnb_nf4_mlp():
    """Two bitsandbytes NF4 layers (bf16 compute; the second double-quantised) around a ReLU, 64 -> 64 -> 48."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 48)).to(torch.bfloat16)
    for i in (0, 2):
        q = bnb.nn.Linear4bit(64, model[i].out_features, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=bool(i))
        q.load_state_dict(model[i].state_dict())
        model[i] = q.to("cpu")
    return model


def tiny_llama(seed=0):
    """A two-block transformers Llama built from a config (no download), in eval mode."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def fit(model, x, target, steps):
    """``steps`` AdamW steps (lr 1e-2) on the MSE to ``target`` over the trainable parameters; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------------------------------------
# One input factory per op: fresh random data (never zeros), weights at the scale a trained layer has.
# ----------------------------------------------------------------------------------------------------------

def lora_linear_inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, *, bias=True, layout="2d",
                       device="cpu", grad=True, seed=0):
    """``(x, weight, bias, lora_A, lora_B, dy)`` for one LoRA linear call. ``layout``: "2d" (M, K); "3d"
    (2, M, K); "strided" (a column-major (M, K) view). x, the adapters and the bias require grad when ``grad``;
    the adapters have ``adapter_dtype`` (default: ``dtype``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dt, device=device)

    if layout == "3d":
        x = rand(2, M, K)
    elif layout == "strided":
        x = rand(K, M).t()  # column-major: stride (1, M)
    else:
        x = rand(M, K)
    adapter_dtype = adapter_dtype or dtype
    w = rand(N, K, scale=K ** -0.5)
    b = rand(N) if bias else None
    a = rand(r, K, dt=adapter_dtype, scale=K ** -0.5)
    bb = rand(N, r, dt=adapter_dtype, scale=r ** -0.5)
    dy = rand(*x.shape[:-1], N)
    for t in (x, a, bb, b):
        if t is not None:
            t.requires_grad_(grad)
    return x, w, b, a, bb, dy


def adapter_bottleneck_inputs(M, d, m, dtype=torch.float32, *, lead3d=False, biases=True, parallel=False,
                              device="cpu", seed=0):
    """``(args, dy)`` for one bottleneck-adapter call: args holds h, w_down, b_down, w_up, b_up and residual (None
    unless ``parallel``), all requiring grad; dy has h's shape."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device).requires_grad_(True)

    h = rand(2, M, d) if lead3d else rand(M, d)
    args = dict(h=h, w_down=rand(m, d, scale=d ** -0.5), b_down=rand(m) if biases else None,
                w_up=rand(d, m, scale=m ** -0.5), b_up=rand(d) if biases else None,
                residual=rand(*h.shape) if parallel else None)
    return args, rand(*h.shape).detach()
