"""Bottleneck adapters: the op against float64 (outputs and every gradient), what backward saves, the module,
and inserting/removing adapters in a model."""
import copy

import pytest
import torch
from conftest import TOLERANCE, adapter_bottleneck_inputs, backend_params, fit, rel_err
from torch import nn

import fastpeft
from fastpeft.checks import ACTIVATIONS
from fastpeft.ops.adapter_bottleneck import activate, activation_grad


def make(M, d, m, dtype, lead3d=False, biases=True, parallel=False, seed=0):
    return adapter_bottleneck_inputs(M, d, m, dtype, lead3d=lead3d, biases=biases, parallel=parallel, seed=seed)


CASES = [  # (M, d, m, dtype, 3-D, biases, parallel): m ∈ {1, 7, 64, 256}, d not a multiple of 16
    (1, 40, 1, torch.float32, False, True, False),
    (17, 100, 7, torch.float32, True, False, True),
    (17, 70, 64, torch.float32, False, True, True),
    (3, 300, 256, torch.float32, True, True, False),
    (17, 100, 64, torch.bfloat16, False, True, False),
    (5, 40, 7, torch.float16, True, True, True),
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-d{c[1]}-m{c[2]}-{str(c[3])[6:]}"
                         f"{'-3d' if c[4] else ''}{'' if c[5] else '-nobias'}{'-parallel' if c[6] else ''}")
def test_matches_float64_reference(case, activation, backend, device):
    M, d, m, dtype, lead3d, biases, parallel = case
    args, dy = make(M, d, m, dtype, lead3d, biases, parallel)
    args = {k: None if v is None else v.detach().to(device).requires_grad_(True) for k, v in args.items()}
    dy = dy.to(device)
    out = fastpeft.adapter_bottleneck(**args, scaling=1.5, activation=activation, backend=backend)
    out.backward(dy)
    ref_args = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in args.items()}
    ref = fastpeft.adapter_bottleneck_reference(**ref_args, scaling=1.5, activation=activation)
    ref.backward(dy.double())
    assert out.shape == args["h"].shape and out.dtype == dtype
    assert rel_err(out, ref) <= TOLERANCE[dtype]
    for name, t in args.items():
        if t is not None:
            assert rel_err(t.grad, ref_args[name].grad) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivatives(activation):
    z = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    activate(z, activation).sum().backward()
    assert torch.allclose(activation_grad(z.detach(), activation), z.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend,device", backend_params())
def test_backward_saves_only_h_and_the_pre_activation(backend, device):
    M, d, m = 512, 96, 8  # above SMALL_CALL: below it the torch path saves act(pre) too, small there
    args, _ = make(M, d, m, torch.float32)
    args = {k: None if v is None else v.detach().to(device).requires_grad_(True) for k, v in args.items()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fastpeft.adapter_bottleneck(**args, activation="gelu", backend=backend)
    big = [tuple(t.shape) for t in saved if t.numel() >= m * d]
    assert sorted(big) == sorted([(M, d), (m, d), (d, m), (M, m)]), big
    assert sum(t.data_ptr() == args["h"].data_ptr() for t in saved) == 1  # h itself, not a copy


def test_bad_inputs():
    args, _ = make(3, 40, 4, torch.float32)
    cases = [
        (dict(w_down=torch.randn(4, 39)), ValueError, "w_down must have shape"),
        (dict(w_up=torch.randn(40, 5)), ValueError, "w_up must have shape"),
        (dict(b_down=torch.randn(5)), ValueError, "b_down must have shape"),
        (dict(b_up=torch.randn(41)), ValueError, "b_up must have shape"),
        (dict(residual=torch.randn(3, 41)), ValueError, "residual must have"),
        (dict(w_up=torch.randn(40, 4, dtype=torch.float64)), TypeError, "w_up has dtype"),
        (dict(w_down=torch.randn(4, 40, device="meta")), ValueError, "one device"),
        (dict(scaling=float("inf")), ValueError, "scaling"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
    ]
    for overrides, error, match in cases:
        with pytest.raises(error, match=match):
            fastpeft.adapter_bottleneck(**{**args, **overrides})
    if not torch.cuda.is_available():
        with pytest.raises(fastpeft.BackendUnavailableError, match="(?s)no CUDA GPU.*forward-only"):
            fastpeft.adapter_bottleneck(**args, backend="cuda")


def test_module_inits():
    torch.manual_seed(0)
    bert = fastpeft.BottleneckAdapter(256, reduction_factor=16)
    assert bert.bottleneck == 16 and bert.down.std().item() == pytest.approx(0.02, rel=0.1)
    houlsby = fastpeft.BottleneckAdapter(256, bottleneck=8, init="houlsby")
    assert houlsby.up.abs().max() <= 0.02
    zero_up = fastpeft.BottleneckAdapter(64, bottleneck=4, init="lora-like zero-up")
    h = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(zero_up(h), h)  # up = 0, biases 0: the identity
    for kwargs, match in [(dict(), "exactly one"), (dict(bottleneck=4, reduction_factor=2), "exactly one"),
                          (dict(bottleneck=0), "bottleneck must be"), (dict(reduction_factor=0), "reduction_factor"),
                          (dict(bottleneck=4, activation="tanh"), "activation"),
                          (dict(bottleneck=4, init="xavier"), "init must be")]:
        with pytest.raises(ValueError, match=match):
            fastpeft.BottleneckAdapter(64, **kwargs)


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.attn_out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = x + self.attn_out(torch.tanh(x))
        return h + self.ffn(h)


class Tiny(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("config,targets,kwargs", [
    ("pfeiffer", ["ffn.2"], {}),
    ("houlsby", ["attn_out", "ffn.2"], {}),
    ("parallel", ["ffn"], {"hidden_size": 32}),
    (dict(bottleneck=4, activation="gelu_tanh", scaling=0.5), r"blocks\.\d\.attn_out", {}),
])
def test_insert_train_remove(config, targets, kwargs):
    torch.manual_seed(0)
    model = Tiny()
    x, target = torch.randn(64, 32), torch.randn(64, 2)
    with torch.no_grad():
        original = model(x)
    fastpeft.apply_adapters(model, targets, config, **kwargs)
    adapted = [m for m in model.modules() if isinstance(m, fastpeft.AdaptedModule)]
    assert len(adapted) == 2 * (len(targets) if isinstance(targets, list) else 1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n for n in trainable)
    losses = fit(model, x, target, 25)
    assert losses[-1] < 0.9 * losses[0]
    fastpeft.remove_adapters(model)
    assert not any(isinstance(m, fastpeft.AdaptedModule) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), original)


def test_bad_configs_leave_model_unchanged():
    model = Tiny()
    before = copy.deepcopy(model.state_dict())
    for config, targets, kwargs, error, match in [
        ("adapterhub", ["ffn.2"], {}, ValueError, "config must be one of"),
        (dict(reduction=4), ["ffn.2"], {}, ValueError, "unknown adapter config keys"),
        (42, ["ffn.2"], {}, TypeError, "config must be a name"),
        ("pfeiffer", ["ffn"], {}, ValueError, "pass hidden_size"),
        ("parallel", ["ffn.0"], {}, ValueError, "equal input and output sizes"),
        ("pfeiffer", ["nothing"], {}, ValueError, "match no module"),
        (dict(bottleneck=4, activation="tanh"), ["ffn.2"], {}, ValueError, "activation"),
        # A module and its own child: the child's adapter would sit inside the moved original, never run.
        ("pfeiffer", r"blocks\.0\.ffn(\.2)?", {"hidden_size": 32}, ValueError, "nested in one another"),
        # A hidden size the module's output does not have is refused now, not at the first forward.
        ("pfeiffer", ["ffn.2"], {"hidden_size": 16}, ValueError, "hidden_size=16 does not match"),
        ("parallel", ["ffn.0"], {"hidden_size": 64}, ValueError, "equal input and output sizes"),
    ]:
        with pytest.raises(error, match=match):
            fastpeft.apply_adapters(model, targets, config, **kwargs)
    assert not any(isinstance(m, fastpeft.AdaptedModule) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fastpeft.apply_adapters(model, ["ffn.2"])
    with pytest.raises(TypeError, match="already carry an adapter"):
        fastpeft.apply_adapters(model, ["ffn.2"])


@pytest.mark.parametrize("backend,device", backend_params())
def test_autocast_runs_the_gemms_in_the_autocast_dtype_and_keeps_the_residual(backend, device):
    adapter = fastpeft.BottleneckAdapter(48, bottleneck=12, activation="gelu", backend=backend).to(device)
    h = torch.randn(5, 48, device=device, requires_grad=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = adapter(h)
        # The same adapter written with nn.Linear, AdapterHub's way: bf16 GEMMs, the fp32 residual kept.
        unfused = h + adapter.scaling * nn.functional.linear(
            nn.functional.gelu(nn.functional.linear(h, adapter.down, adapter.down_bias)), adapter.up, adapter.up_bias)
        half_residual = adapter(h.bfloat16())
    assert out.dtype == unfused.dtype == torch.float32 and half_residual.dtype == torch.bfloat16
    out.sum().backward()
    assert h.grad.dtype == torch.float32 and adapter.down.grad.dtype == torch.float32
    params = [t.detach().bfloat16().double() for t in (h, adapter.down, adapter.down_bias, adapter.up, adapter.up_bias)]
    ref = fastpeft.adapter_bottleneck_reference(*params, adapter.scaling, "gelu", residual=h.detach().double())
    assert rel_err(out, ref) <= TOLERANCE[torch.bfloat16] and rel_err(out, unfused) <= TOLERANCE[torch.bfloat16]
    # the residual is not rounded: subtracting it leaves the bf16 update alone
    update = (out - h).detach()
    assert rel_err(update, ref - h.detach().double()) <= TOLERANCE[torch.bfloat16]
