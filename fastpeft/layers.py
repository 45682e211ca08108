"""nn.Modules: ``LoraLinear``, a drop-in for ``nn.Linear`` that runs the fused LoRA op; ``Ia3Linear``, the same for
(IA)³; ``BottleneckAdapter`` and ``AdaptedModule`` for bottleneck adapters."""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.utils.parametrize
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .backends import requested_backend
from .checks import HALF_DTYPES, check_activation, check_finite_number, check_positive_int, check_probability
from .nf4 import NF4Linear, bnb_problem, is_bnb_4bit
from .ops.adapter_bottleneck import adapter_bottleneck
from .ops.ia3_linear import ia3_linear
from .ops.lora_dora import DORA_EPS, dora_weight_norm, weight_sq_norm
from .ops.lora_linear import lora_linear
from .ops.lora_linear_mixed import BASE_INDEX, lora_linear_mixed
from .quantized import QuantizedLinear, QuantizedWeight

BASE_ADAPTER = "__base__"  # in adapter_names: a sample that takes no adapter (HF PEFT's name)


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name must be a non-empty string without '.', got {name!r}")
    if name == BASE_ADAPTER:
        raise ValueError(f"adapter_name {name!r} is reserved: in adapter_names it means the base layer, no adapter")


def _checked_backend(backend):
    """A module's backend: None (decided per call) or a valid name, refused at construction rather than first use."""
    if backend is not None:
        requested_backend(backend)
    return backend


def linear_wrap_problem(module) -> str | None:
    """Why a LoraLinear cannot stand in for ``module`` (None when it can): it computes ``x Wᵀ + b`` from the
    stored weight itself, so the module must be an nn.Linear whose forward is exactly that and nothing more, or a 4-bit
    base: a fastpeft :class:`NF4Linear`, or a bitsandbytes NF4 ``Linear4bit`` (which becomes an NF4Linear over the
    same tensors)."""
    if is_bnb_4bit(module) or type(module).__module__.startswith("bitsandbytes"):
        problem = bnb_problem(module)
    elif isinstance(module, QuantizedLinear):
        # The format's own layer (the class right below QuantizedLinear), not a subclass of it computing otherwise.
        mro = type(module).__mro__
        layer = mro[mro.index(QuantizedLinear) - 1]
        problem = None if type(module).forward is layer.forward else (
            f"a {type(module).__name__}, an {layer.__name__} subclass with its own forward (which the adapter layer "
            "would bypass)")
    else:
        problem = dense_linear_problem(module)
    if problem is None and (module._forward_hooks or module._forward_pre_hooks):
        return "a linear layer with forward hooks, which the adapter layer would bypass"
    if problem is None and "forward" in vars(module):
        return ("a linear layer whose forward was replaced on the instance (accelerate's hooks do that), which the "
                "adapter layer would bypass")
    return problem


def dense_linear_problem(module) -> str | None:
    """Why ``module`` is not a plain ``nn.Linear`` that computes exactly ``x Wᵀ + b`` (None when it is)."""
    if not isinstance(module, nn.Linear):
        return f"a {type(module).__name__}, not an nn.Linear"
    if type(module).forward is not nn.Linear.forward:
        return (f"a {type(module).__name__}, an nn.Linear subclass with its own forward (which the adapter layer "
                "would bypass)")
    if "forward" in vars(module):
        return ("an nn.Linear whose forward was replaced on the instance (accelerate's hooks do that), which the "
                "adapter layer would bypass")
    if module._forward_hooks or module._forward_pre_hooks:
        return "an nn.Linear with forward hooks, which the adapter layer would bypass"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "a parametrized nn.Linear (its weight is computed), which merging could not update"
    return None


def _checked_base(base) -> nn.Module:
    """``base`` as a LoraLinear's base layer: an nn.Linear or NF4Linear as it is, a bitsandbytes NF4 ``Linear4bit``
    as the NF4Linear over its tensors."""
    problem = linear_wrap_problem(base)
    if problem is not None:
        raise TypeError(f"base must be an nn.Linear (without a forward of its own) or a 4-bit NF4 layer "
                        f"(fastpeft.NF4Linear, bitsandbytes Linear4bit), got {problem}")
    return NF4Linear.from_bnb(base) if is_bnb_4bit(base) else base


def _new_adapter(base: nn.Linear, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, autocast_adapter_dtype,
                 use_dora=False):
    """An adapter for ``base``: fp32 on a half-precision base when ``autocast_adapter_dtype`` (HF PEFT's default);
    with ``use_dora``, DoRA's magnitude initialised from ``base``'s weight."""
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be a bool, got {use_dora!r}")
    if use_dora and isinstance(base, QuantizedLinear):
        raise ValueError(f"DoRA (use_dora=True) over a {base.weight.base_name} ({type(base).__name__}) is not "
                         "supported: use plain LoRA over it, or dequantise the base first (its .dequantized())")
    dtype = base.weight.dtype
    if autocast_adapter_dtype and dtype in HALF_DTYPES:
        dtype = torch.float32
    adapter = LoraAdapter(base.in_features, base.out_features, r, lora_alpha, lora_dropout, use_rslora,
                          init_lora_weights, device=base.weight.device, dtype=dtype)
    if use_dora:
        adapter.init_magnitude(base.weight)
    return adapter


# Optimizer steps taken in this process. In-place optimizer kernels (AdamW(fused=True), for one) change parameters
# without bumping their version counters, so caches keyed on the versions of tensors that require grad are keyed on
# this count too. Every optimizer derived from torch.optim.Optimizer runs the global step hooks.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Before and after: a forward inside a step's closure (after its backward, before the update) is also followed.
register_optimizer_step_pre_hook(_count_optimizer_step)
register_optimizer_step_post_hook(_count_optimizer_step)


def _version_key(*tensors) -> tuple | None:
    """What identifies the values of ``tensors`` while nothing bypasses both autograd's version counters and the
    optimizers' step hooks: storage, version, shape, dtype and device of each, and for one that requires grad (an
    optimizer may step it) the optimizer steps taken; None for tensors without storage or version counter
    (functorch's, inference-mode ones)."""
    try:
        return tuple((t.data_ptr(), t._version, t.shape, t.dtype, t.device, t.requires_grad and _optimizer_steps)
                     for t in tensors)
    except RuntimeError:
        return None


class LoraAdapter(nn.Module):
    """One named LoRA adapter of a layer: ``lora_A`` (r, in_features), ``lora_B`` (out_features, r) and its scale;
    a DoRA adapter also has ``lora_magnitude_vector`` (out_features,), else that attribute is None."""

    lora_magnitude_vector: nn.Parameter | None

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                 init_lora_weights=True, device=None, dtype=None):
        super().__init__()
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(f"init_lora_weights must be True, False or 'gaussian', got {init_lora_weights!r}")
        self._set_hyperparameters(r, lora_alpha, lora_dropout, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.lora_magnitude_vector = None
        self.reset_parameters(init_lora_weights)

    @classmethod
    def from_parameters(cls, lora_A: nn.Parameter, lora_B: nn.Parameter, lora_alpha, lora_dropout=0.0,
                        use_rslora=False, lora_magnitude_vector: nn.Parameter | None = None) -> LoraAdapter:
        """An adapter holding the given parameters themselves (not copies): lora_A (r, in), lora_B (out, r) and,
        for DoRA, lora_magnitude_vector (out,)."""
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, nn.Parameter) or t.dim() != 2:
                raise TypeError(f"{name} must be a 2-D nn.Parameter, got {type(t).__name__}")
        if lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"lora_B {tuple(lora_B.shape)} does not fit lora_A {tuple(lora_A.shape)}")
        if lora_magnitude_vector is not None and (
                not isinstance(lora_magnitude_vector, nn.Parameter)
                or tuple(lora_magnitude_vector.shape) != (lora_B.shape[0],)):
            shape = tuple(getattr(lora_magnitude_vector, "shape", ()))
            raise TypeError(f"lora_magnitude_vector must be an nn.Parameter of shape ({lora_B.shape[0]},), got "
                            f"{type(lora_magnitude_vector).__name__} {shape}")
        adapter = cls.__new__(cls)
        nn.Module.__init__(adapter)
        adapter._set_hyperparameters(lora_A.shape[0], lora_alpha, lora_dropout, use_rslora)
        adapter.lora_A, adapter.lora_B = lora_A, lora_B
        adapter.lora_magnitude_vector = lora_magnitude_vector
        return adapter

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @torch.no_grad()
    def init_magnitude(self, weight: torch.Tensor) -> None:
        """Make this a DoRA adapter over base ``weight`` (out, in): m = ‖W + scaling·BA‖ per row (HF PEFT's start,
        so the layer's output is unchanged), in the adapters' dtype."""
        if isinstance(weight, QuantizedWeight):
            raise ValueError(f"weight is a {weight.label}: DoRA over a {weight.base_name} is not supported; use plain "
                             "LoRA over it, or dequantise the base first (its layer's .dequantized())")
        norm = dora_weight_norm(weight.detach(), self.lora_A.detach(), self.lora_B.detach(), self.scaling)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype),
                                                  requires_grad=self.lora_A.requires_grad)
        self._norm_cache = None

    def dora_norm(self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, backend=None
                  ) -> torch.Tensor:
        """‖W + scaling·BA‖ per row, for eval mode: kept while W, A and B keep their storage and version counters
        and no optimizer steps them (see :func:`_version_key`), until :meth:`forget_norm` (``LoraLinear.train()`` /
        ``eval()`` call it); computed afresh, and not kept, for tensors that have neither (functorch's,
        inference-mode ones)."""
        key = _version_key(weight, lora_A, lora_B)
        cached = getattr(self, "_norm_cache", None)
        if key is not None and cached is not None and cached[0] == key + (self.scaling,):
            return cached[1]
        norm = dora_weight_norm(weight.detach(), lora_A.detach(), lora_B.detach(), self.scaling, backend=backend)
        self._norm_cache = None if key is None else (key + (self.scaling,), norm)
        return norm

    def weight_sq(self, weight: torch.Tensor) -> torch.Tensor | None:
        """‖W_i‖² of the frozen base weight, for the factored norm in training: kept while W keeps its storage and
        version counter and no optimizer steps (until :meth:`forget_norm`); None for tensors that have neither."""
        key = _version_key(weight)
        if key is None:
            return None
        cached = getattr(self, "_weight_sq_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, weight_sq_norm(weight.detach()))
            self._weight_sq_cache = cached
        return cached[1]

    def forget_norm(self) -> None:
        """Drop the kept DoRA norm and ‖W‖²: the next call computes them (changes that bypass both the version
        counters and the optimizers' step hooks, ``.data`` edits, are only seen after this)."""
        self._norm_cache = None
        self._weight_sq_cache = None

    def _set_hyperparameters(self, r, lora_alpha, lora_dropout, use_rslora):
        check_positive_int("r", r)
        check_finite_number("lora_alpha", lora_alpha)
        check_probability("lora_dropout", lora_dropout)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {use_rslora!r}")
        self.r, self.lora_alpha = int(r), lora_alpha
        self.lora_dropout, self.use_rslora = float(lora_dropout), bool(use_rslora)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @torch.no_grad()
    def reset_parameters(self, init_lora_weights=True):
        """HF PEFT's rules: True → A kaiming-uniform (a=√5), B zeros (the layer starts as the base layer);
        "gaussian" → A ~ N(0, 1/r), B zeros; False → both kaiming-uniform (a non-zero update, for tests). A DoRA
        magnitude is left as it is: :meth:`init_magnitude` (which needs the base weight) resets it."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B A`` (out_features, in_features) in fp32 (or fp64 for fp64 adapters)."""
        dtype = torch.float64 if self.lora_A.dtype == torch.float64 else torch.float32
        return (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"use_rslora={self.use_rslora}, use_dora={self.use_dora}")


def _check_mixed_batch(layer, x, adapter_names, strict: bool) -> None:
    """A layer's mixed batch: x (batch, ..., in_features) and one adapter name per sample. ``strict``: every name
    must be one of ``layer.adapters`` (a direct call; from :func:`fastpeft.mixed_batch` a name the layer lacks runs
    its samples through the base, as in PEFT); no adapter may be merged."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("a mixed batch needs x of shape (batch, ..., in_features), with adapter_names naming one "
                         f"adapter per sample, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
    if len(adapter_names) != x.shape[0]:
        raise ValueError(f"adapter_names must name one adapter per sample: x has {x.shape[0]} samples, "
                         f"adapter_names has {len(adapter_names)}")
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in layer.adapters})
    if strict and unknown:
        raise ValueError(f"adapter_names has {unknown}, not adapters of this layer ({list(layer.adapters)}; "
                         f"{BASE_ADAPTER!r} for none)")
    if layer.merged:
        raise RuntimeError(f"adapter {layer.merged_adapter!r} is merged; unmerge() before a mixed batch")


def _mixed_batch_index(adapters, x, adapter_names) -> tuple[list[str], torch.Tensor]:
    """The adapters the batch uses (those of ``adapters`` it names, in first-use order) and each row's position among
    them, of x's leading shape (-1: the base alone)."""
    used = [n for n in dict.fromkeys(adapter_names) if n in adapters]
    position = {n: i for i, n in enumerate(used)}
    per_sample = torch.tensor([position.get(n, BASE_INDEX) for n in adapter_names], device=x.device)
    return used, per_sample.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])


class LoraLinear(nn.Module):
    """``nn.Linear`` plus a LoRA update, computed by one fused op: ``y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ``.

    Wraps ``base`` (sharing its weight and bias, which are frozen) and holds the adapter's ``lora_A``
    (r, in_features) and ``lora_B`` (out_features, r) parameters, stored per adapter name in ``adapters``;
    ``lora_A``/``lora_B`` are those of the active adapter. ``scaling`` = lora_alpha / r, or lora_alpha / √r
    with ``use_rslora``. Adapter weights default to fp32 on a float16/bfloat16 base (``autocast_adapter_dtype``),
    like HF PEFT. ``backend`` ("auto", "torch", "triton" or None for ``$FASTPEFT_BACKEND``) picks the kernels.

    ``use_dora=True`` makes the adapter DoRA (weight-decomposed LoRA, as HF PEFT's ``use_dora``):
    ``y = (m / ‖W + s·BA‖_row) ⊙ (x Wᵀ + s · drop(x) Aᵀ Bᵀ) + b`` with the magnitude m
    (``lora_magnitude_vector``) starting at ‖W + s·BA‖ and trained, the norm a constant in backward. The fused op
    computes the norm without the (out, in) matrix; in eval mode the layer keeps it until W, A or B change.
    """

    def __init__(self, base: nn.Linear, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                 init_lora_weights=True, *, adapter_name="default", autocast_adapter_dtype=True, backend=None,
                 use_dora=False):
        super().__init__()
        base = _checked_base(base)
        _check_adapter_name(adapter_name)
        adapter = _new_adapter(base, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                               autocast_adapter_dtype, use_dora)
        self._init_state(base, {adapter_name: adapter}, adapter_name, backend)
        base.requires_grad_(False)
        self.train(base.training)  # wrapping a layer of an eval-mode model must not switch dropout on

    @classmethod
    def from_adapters(cls, base: nn.Linear, adapters: dict[str, LoraAdapter], active_adapter: str, *,
                      backend=None) -> LoraLinear:
        """A layer around ``base`` holding the given adapters themselves (their parameters are not copied).

        ``base.weight`` must be frozen already (its bias may train); nothing is changed on ``base`` (a bitsandbytes
        NF4 ``Linear4bit`` becomes the NF4Linear over its tensors).
        """
        base = _checked_base(base)
        if base.weight.requires_grad:
            raise ValueError("base.weight must be frozen (requires_grad=False)")
        if not adapters:
            raise ValueError("adapters must hold at least one adapter")
        for name, adapter in adapters.items():
            _check_adapter_name(name)
            if not isinstance(adapter, LoraAdapter):
                raise TypeError(f"adapters[{name!r}] must be a LoraAdapter, got {type(adapter).__name__}")
            if adapter.use_dora and isinstance(base, QuantizedLinear):  # as the constructor and add_adapter refuse it
                raise ValueError(f"adapters[{name!r}] is a DoRA adapter: DoRA over a {base.weight.base_name} "
                                 f"({type(base).__name__}) is not supported; use plain LoRA over it, or dequantise "
                                 "the base first (its .dequantized())")
            a, b = adapter.lora_A, adapter.lora_B
            m = adapter.lora_magnitude_vector
            if a.shape[1] != base.in_features or b.shape[0] != base.out_features or (
                    m is not None and tuple(m.shape) != (base.out_features,)):
                raise ValueError(f"adapter {name!r} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) does not "
                                 f"fit {base.in_features} -> {base.out_features}")
        if active_adapter not in adapters:
            raise KeyError(f"active_adapter {active_adapter!r} is not one of {list(adapters)}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._init_state(base, adapters, active_adapter, backend)
        return layer

    def _init_state(self, base, adapters, active_adapter, backend):
        self.base_layer = base
        self.adapters = nn.ModuleDict(adapters)
        self.active_adapter = active_adapter
        self.merged_adapter: str | None = None  # the adapter folded into the base weight, if any
        # A merged DoRA adapter's (row factors m/‖W+ΔW‖, rows merged with factor 0, those rows as they were, norms)
        self._dora_merge: tuple | None = None
        self.adapters_enabled = True
        self.backend = _checked_backend(backend)
        self.batch_adapter_names: list[str] | None = None  # set by fastpeft.mixed_batch for a whole model

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    # The base layer's attributes, so code written for nn.Linear keeps working.
    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)

    @property
    def adapter(self) -> LoraAdapter:
        """The active adapter."""
        return self.adapters[self.active_adapter]

    lora_A = property(lambda self: self.adapter.lora_A, doc="Active adapter's A (r, in_features).")
    lora_B = property(lambda self: self.adapter.lora_B, doc="Active adapter's B (out_features, r).")
    r = property(lambda self: self.adapter.r)
    lora_alpha = property(lambda self: self.adapter.lora_alpha)
    lora_dropout = property(lambda self: self.adapter.lora_dropout)
    use_rslora = property(lambda self: self.adapter.use_rslora)
    scaling = property(lambda self: self.adapter.scaling)
    use_dora = property(lambda self: self.adapter.use_dora, doc="Whether the active adapter is DoRA.")
    lora_magnitude_vector = property(lambda self: self.adapter.lora_magnitude_vector,
                                     doc="Active adapter's DoRA magnitude (out_features,), or None.")

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x (..., in_features)``. ``adapter_names``: one adapter name per sample (x's first dim), ``"__base__"``
        for none, as HF PEFT's argument: a mixed batch, each sample through its own adapter (training too)."""
        if adapter_names is not None or self.batch_adapter_names is not None:
            return self._mixed_forward(x, adapter_names if adapter_names is not None else self.batch_adapter_names,
                                       strict=adapter_names is not None)
        if not self.adapters_enabled:
            if self.merged:  # merged while disabled: disabled means the base alone (as HF PEFT does)
                self.unmerge()
            return self.base_layer(x)
        if self.merged_adapter is not None:
            return self.base_layer(x)
        # Straight to the registries (nn.Module's attribute fallback costs about half a microsecond a lookup, a
        # tenth of a small layer's whole call); an attribute that is not a registered parameter (a pruning
        # re-parametrisation) is read the ordinary way.
        base = self._modules["base_layer"]
        a = self._modules["adapters"]._modules[self.active_adapter]
        for module in (base, a):  # their forward never runs: forward pre-hooks (pruning's masks) run here instead
            for hook in list(module._forward_pre_hooks.values()):
                hook(module, (x,))
        weight = base._parameters.get("weight")
        if weight is None:
            weight = base.weight
        bias = base._parameters["bias"] if "bias" in base._parameters else base.bias
        lora_A, lora_B = a._parameters.get("lora_A"), a._parameters.get("lora_B")
        if lora_A is None or lora_B is None:
            lora_A, lora_B = a.lora_A, a.lora_B
        magnitude = a._parameters.get("lora_magnitude_vector")
        if magnitude is None:
            magnitude = a.lora_magnitude_vector  # None for plain LoRA; computed if parametrized or pruned
        if magnitude is None:
            if isinstance(weight, QuantizedWeight):
                return self._lora_over_4bit(x, weight, bias, lora_A, lora_B, a)
            return lora_linear(x, weight, bias, lora_A, lora_B, a.scaling, a.lora_dropout, self.training,
                               backend=self.backend)
        if isinstance(weight, QuantizedWeight):  # (only an adapter put into `adapters` by hand gets here)
            raise ValueError(f"adapter {self.active_adapter!r} is a DoRA adapter over a {weight.base_name}, which is "
                             "not supported; use plain LoRA over it, or dequantise the base first "
                             "(base_layer.dequantized())")
        # DoRA. In eval mode, with A and B not being trained, the row norms are kept while W, A and B stay as they
        # are; otherwise they are computed each call (no (out, in) matrix; only the frozen W's ‖W‖² kept): A and B
        # may change every step, by optimizers whose in-place kernels leave version counters alone (fused AdamW). A
        # trained magnitude may cross zero (as in PEFT): its values are the optimizer's, not a caller's, and are not
        # checked.
        norm = None
        training_adapter = torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad)
        if torch.compiler.is_compiling():
            pass  # the op computes the norms inside the graph
        elif training_adapter:  # ‖W‖² kept (W is frozen), the rest of the factored norm each call
            a._norm_cache = None
            norm = dora_weight_norm(weight, lora_A.detach(), lora_B.detach(), a.scaling,
                                    weight_sq=a.weight_sq(weight), backend=self.backend)
        elif not self.training:
            norm = a.dora_norm(weight, lora_A, lora_B, self.backend)
        return lora_linear(x, weight, bias, lora_A, lora_B, a.scaling, a.lora_dropout, self.training,
                           backend=self.backend, magnitude=magnitude, weight_norm=norm, _trained_magnitude=True)

    def _lora_over_4bit(self, x, weight, bias, lora_A, lora_B, adapter):
        """LoRA over a 4-bit base, as bitsandbytes runs its layer: x and the bias cast to the compute dtype, the output
        back to x's dtype (autocast, where on, decides both instead)."""
        out_dtype = None
        if not torch.is_autocast_enabled(x.device.type):
            if x.dtype != weight.dtype and x.dtype.is_floating_point:
                out_dtype, x = x.dtype, x.to(weight.dtype)
            if bias is not None and bias.dtype != weight.dtype:
                bias = bias.to(weight.dtype)
        y = lora_linear(x, weight, bias, lora_A, lora_B, adapter.scaling, adapter.lora_dropout, self.training,
                        backend=self.backend)
        return y if out_dtype is None else y.to(out_dtype)

    def _mixed_forward(self, x, adapter_names, strict):
        """A mixed batch. ``strict``: every name must be one of this layer's adapters (a direct call); from
        :func:`fastpeft.mixed_batch` a name the layer lacks runs its samples through the base here, as in PEFT."""
        _check_mixed_batch(self, x, adapter_names, strict)
        if isinstance(self.base_layer, QuantizedLinear):
            raise ValueError(f"mixed-adapter batches over a {self.base_layer.weight.base_name} are not supported: "
                             "run one adapter at a time (set_adapter)")
        if not self.adapters_enabled:
            return self.base_layer(x)
        used, index = _mixed_batch_index(self.adapters, x, adapter_names)
        base = self._modules["base_layer"]
        adapters = [self.adapters[n] for n in used]
        for module in (base, *adapters):
            for hook in list(module._forward_pre_hooks.values()):
                hook(module, (x,))
        if not adapters:  # (the base's pre-hooks ran above)
            return torch.nn.functional.linear(x, base.weight, base.bias)
        return lora_linear_mixed(x, base.weight, base.bias, [a.lora_A for a in adapters], [a.lora_B for a in adapters],
                                 [a.scaling for a in adapters], index, [a.lora_dropout for a in adapters],
                                 self.training, self.backend, magnitudes=[a.lora_magnitude_vector for a in adapters],
                                 _trained_magnitudes=True)

    def train(self, mode: bool = True) -> LoraLinear:
        """As nn.Module's, dropping the DoRA norms kept for eval mode: whatever changed the weights meanwhile (a
        fused optimizer step, a ``.data`` edit) is seen by the next eval-mode call."""
        for adapter in self._modules["adapters"].values():
            adapter.forget_norm()
        return super().train(mode)

    def add_adapter(self, adapter_name: str, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
                    init_lora_weights=True, *, autocast_adapter_dtype=True, use_dora=False) -> LoraAdapter:
        """Add another named adapter (same rules as the constructor; DoRA and plain LoRA adapters mix freely); the
        active adapter does not change."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.adapters:
            raise ValueError(f"adapter {adapter_name!r} exists already (adapters: {list(self.adapters)})")
        if self.merged and use_dora:  # DoRA's magnitude starts from the unmerged weight
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged; unmerge() before adding a DoRA adapter")
        adapter = _new_adapter(self.base_layer, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                               autocast_adapter_dtype, use_dora)
        self.adapters[adapter_name] = adapter
        return adapter

    def set_adapter_problem(self, adapter_name: str) -> str | None:
        """Why :meth:`set_adapter` would refuse ``adapter_name`` (None when it would not)."""
        if adapter_name not in self.adapters:
            return f"no adapter {adapter_name!r}; adapters: {list(self.adapters)}"
        if self.merged and adapter_name != self.merged_adapter:
            return f"adapter {self.merged_adapter!r} is merged; unmerge() before activating another"
        return None

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (refused while another adapter is merged)."""
        problem = self.set_adapter_problem(adapter_name)
        if problem is not None:
            raise (KeyError if adapter_name not in self.adapters else RuntimeError)(problem)
        self.active_adapter = adapter_name

    def delete_adapter_problem(self, adapter_name: str) -> str | None:
        """Why :meth:`delete_adapter` would refuse ``adapter_name`` (None when it would not)."""
        if adapter_name not in self.adapters:
            return f"no adapter {adapter_name!r}; adapters: {list(self.adapters)}"
        if len(self.adapters) == 1:
            return f"{adapter_name!r} is the only adapter; use merge_and_unload or keep the layer"
        return None

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove a named adapter (unmerging it first if merged); the last adapter cannot be deleted."""
        problem = self.delete_adapter_problem(adapter_name)
        if problem is not None:
            raise (KeyError if adapter_name not in self.adapters else ValueError)(problem)
        if self.merged_adapter == adapter_name:
            self.unmerge()
        del self.adapters[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.adapters))

    def disable_adapters(self) -> None:
        """Run the base layer alone (unmerging first if an adapter is merged) until :meth:`enable_adapters`."""
        if self.merged:
            self.unmerge()
        self.adapters_enabled = False

    def enable_adapters(self) -> None:
        self.adapters_enabled = True

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the active adapter into the base weight; forward then runs the base layer alone.

        LoRA: W + scaling · B A. DoRA (as HF PEFT's merge): (m / ‖W + scaling·BA‖_row) ⊙ (W + scaling · B A), the bias
        unscaled. The result is formed in fp32 and rounded once to the weight's dtype. With ``safe=True`` the
        rounded result is checked first (an fp16 weight near 65504 plus a delta overflows only when rounded), and
        NaN/Inf raises ``ValueError`` leaving the weight untouched. Merging while adapters are disabled is allowed
        (as in HF PEFT); the disabled layer still runs the base alone, unmerging at its next forward.
        """
        if self.merged:
            warnings.warn("LoraLinear.merge: the adapter is already merged; nothing done", stacklevel=2)
            return
        if isinstance(self.base_layer, QuantizedLinear):
            raise RuntimeError(f"merging into a {self.base_layer.weight.base_name} would requantise it, losing the "
                               "update's precision: "
                               "fastpeft.merge_and_unload gives an nn.Linear with the dequantised weight and the "
                               "adapter merged")
        weight = self.base_layer.weight
        adapter = self.adapter
        delta = adapter.delta_weight()
        wide = torch.promote_types(weight.dtype, delta.dtype)  # fp32 at least; fp64 for an fp64 base
        summed = weight.to(wide) + delta
        dora = None
        if adapter.use_dora:
            norm = torch.linalg.vector_norm(summed, dim=1)
            factor = adapter.lora_magnitude_vector.to(wide) / norm.clamp_min(DORA_EPS)
            summed.mul_(factor[:, None])
            # Rows scaled by 0 (m = 0) cannot be divided back out: unmerge restores them from a copy.
            lost = (factor == 0).nonzero().flatten()
            dora = (factor, lost, weight[lost].clone(), norm)
        merged = summed.to(weight.dtype)
        if safe and not torch.isfinite(merged).all():
            raise ValueError("LoraLinear.merge(safe=True): the merged weight would contain NaN/Inf in "
                             f"{weight.dtype}; the weight was left unchanged")
        weight.copy_(merged)
        self.merged_adapter, self._dora_merge = self.active_adapter, dora

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the merged update out again (exact up to the rounding of the weight's dtype; DoRA's rows divided by
        the factors used in merge, rows merged with m = 0 restored as they were)."""
        if not self.merged:
            warnings.warn("LoraLinear.unmerge: the adapter is not merged; nothing done", stacklevel=2)
            return
        weight = self.base_layer.weight
        delta = self.adapters[self.merged_adapter].delta_weight()
        wide = torch.promote_types(weight.dtype, delta.dtype)
        if self._dora_merge is None:
            weight.copy_(weight.to(wide) - delta)
        else:
            factor, lost, rows, _ = self._dora_merge
            restored = weight.to(wide).div_(torch.where(factor == 0, 1.0, factor)[:, None]).sub_(delta)
            restored[lost] = rows.to(wide)
            weight.copy_(restored)
        self.merged_adapter, self._dora_merge = None, None

    def extra_repr(self) -> str:
        return (f"active_adapter={self.active_adapter!r}, merged_adapter={self.merged_adapter!r}, "
                f"adapters_enabled={self.adapters_enabled}, backend={self.backend!r}")


def ia3_vector_dtype(weight_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of an (IA)³ vector over a base weight of ``weight_dtype``: float32 on a float16/bfloat16 base when
    ``autocast_adapter_dtype`` (HF PEFT's default) and on a 4-bit base (whose dtype is its compute dtype, or its
    packed bytes'), the weight's own dtype otherwise."""
    if autocast_adapter_dtype and weight_dtype in HALF_DTYPES or not weight_dtype.is_floating_point:
        return torch.float32
    return weight_dtype


class Ia3Linear(nn.Module):
    """``nn.Linear`` with (IA)³, computed by one fused op: ``y = (x Wᵀ + b) ⊙ l`` (an output scale: keys, values), or
    ``y = (x ⊙ l) Wᵀ + b`` with ``feedforward=True`` (an input scale: PEFT's ``feedforward_modules``).

    Wraps ``base`` (sharing its frozen weight and bias) and holds one learned vector per adapter name in ``ia3_l``,
    shaped as HF PEFT keeps it, (out_features, 1) or (1, in_features), so parameter names and state-dict keys are
    PEFT's (``ia3_l.<adapter>``). The vectors start at ones (``init_ia3_weights=True``; False: random, for tests)
    and are fp32 on a float16/bfloat16 base when ``autocast_adapter_dtype`` (PEFT's default); ``ia3_l_vector`` is
    the active one, flattened. ``backend`` as for :class:`LoraLinear`.
    """

    def __init__(self, base: nn.Linear, feedforward: bool = False, init_ia3_weights: bool = True, *,
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True, backend=None):
        super().__init__()
        base = _checked_base(base)
        if not isinstance(feedforward, bool):
            raise TypeError(f"feedforward must be a bool, got {feedforward!r}")
        _check_adapter_name(adapter_name)
        self.base_layer = base
        self.feedforward = feedforward
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.ia3_l = nn.ParameterDict({adapter_name: self._new_vector(init_ia3_weights, autocast_adapter_dtype)})
        self.active_adapter = adapter_name
        self.merged_adapter: str | None = None
        self.adapters_enabled = True
        self.backend = _checked_backend(backend)
        self.batch_adapter_names: list[str] | None = None  # set by fastpeft.mixed_batch for a whole model
        base.requires_grad_(False)
        self.train(base.training)

    def _new_vector(self, init_ia3_weights, autocast_adapter_dtype) -> nn.Parameter:
        if not isinstance(init_ia3_weights, bool):
            raise TypeError(f"init_ia3_weights must be a bool, got {init_ia3_weights!r}")
        if not isinstance(autocast_adapter_dtype, bool):
            raise TypeError(f"autocast_adapter_dtype must be a bool, got {autocast_adapter_dtype!r}")
        weight = self.base_layer.weight
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        vector = torch.ones(shape) if init_ia3_weights else torch.randn(shape)
        return nn.Parameter(vector.to(device=weight.device, dtype=ia3_vector_dtype(weight.dtype,
                                                                                    autocast_adapter_dtype)))

    in_features = property(lambda self: self.base_layer.in_features)
    out_features = property(lambda self: self.base_layer.out_features)
    weight = property(lambda self: self.base_layer.weight)
    bias = property(lambda self: self.base_layer.bias)
    adapters = property(lambda self: self.ia3_l, doc="The vectors by adapter name (PEFT's shapes).")
    merged = property(lambda self: self.merged_adapter is not None)
    ia3_l_vector = property(lambda self: self.ia3_l[self.active_adapter].view(-1),
                            doc="The active adapter's vector, flattened: (out_features,) or (in_features,).")

    def forward(self, x: torch.Tensor, adapter_names: list[str] | None = None) -> torch.Tensor:
        """``x (..., in_features)``. ``adapter_names``: one adapter name per sample (``"__base__"`` for none): a batch
        of (IA)³ tasks, each sample scaled by its own task's vector in the same fused GEMM."""
        if adapter_names is not None or self.batch_adapter_names is not None:
            return self._mixed_forward(x, adapter_names if adapter_names is not None else self.batch_adapter_names,
                                       strict=adapter_names is not None)
        if not self.adapters_enabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if self.merged:
            return self.base_layer(x)
        return self._scaled(x, self.ia3_l_vector)

    def _scaled(self, x, ia3_l, index=None):
        """The op on the base's tensors: one vector, or with ``index`` a batch of tasks' vectors."""
        base = self.base_layer
        for hook in list(base._forward_pre_hooks.values()):  # (its forward never runs)
            hook(base, (x,))
        weight, bias = base.weight, base.bias
        if isinstance(weight, QuantizedWeight) and not torch.is_autocast_enabled(x.device.type) \
                and (x.dtype != weight.dtype or bias is not None and bias.dtype != weight.dtype):
            # as bitsandbytes runs its layer (whose bias may stay fp32): computed in its dtype, returned in x's
            out = ia3_linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype), ia3_l,
                             self.feedforward, self.backend, adapter_index=index)
            return out.to(x.dtype)
        return ia3_linear(x, weight, bias, ia3_l, self.feedforward, self.backend, adapter_index=index)

    def _mixed_forward(self, x, adapter_names, strict):
        _check_mixed_batch(self, x, adapter_names, strict)
        if not self.adapters_enabled:
            return self.base_layer(x)
        used, index = _mixed_batch_index(self.ia3_l, x, adapter_names)
        if not used:
            return self.base_layer(x)
        return self._scaled(x, [self.ia3_l[n].view(-1) for n in used], index)

    def add_adapter(self, adapter_name: str, init_ia3_weights: bool = True, *,
                    autocast_adapter_dtype: bool | None = None) -> nn.Parameter:
        """Add another named vector; the active adapter does not change."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.ia3_l:
            raise ValueError(f"adapter {adapter_name!r} exists already (adapters: {list(self.ia3_l)})")
        autocast = self.autocast_adapter_dtype if autocast_adapter_dtype is None else autocast_adapter_dtype
        self.ia3_l[adapter_name] = vector = self._new_vector(init_ia3_weights, autocast)
        return vector

    set_adapter_problem = LoraLinear.set_adapter_problem
    set_adapter = LoraLinear.set_adapter
    delete_adapter = LoraLinear.delete_adapter

    def delete_adapter_problem(self, adapter_name: str) -> str | None:
        """Why :meth:`delete_adapter` would refuse ``adapter_name`` (None when it would not): as for LoRA, and a merged
        adapter that cannot be unmerged (zeros in its vector), asked before any layer of a model changes."""
        problem = LoraLinear.delete_adapter_problem(self, adapter_name)
        if problem is None and self.merged_adapter == adapter_name:
            problem = self.unmerge_problem()
        return problem
    disable_adapters = LoraLinear.disable_adapters
    enable_adapters = LoraLinear.enable_adapters

    def _scales(self, name):
        """The vector of ``name`` as it scales W: a column (rows of W, output scale) or a row (columns, input), whatever
        shape it is held in (forward reads it flattened, so a flat vector must merge the same way)."""
        vector = self.ia3_l[name].detach()
        return vector.reshape(1, -1) if self.feedforward else vector.reshape(-1, 1)

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """Fold the active vector into the base: W's rows (output scale, and the bias with them, as PEFT does) or its
        columns (input scale) multiplied in fp32 and rounded once to the weight's dtype; forward then runs the base
        alone. ``safe=True`` checks the rounded result first (NaN/Inf raises ``ValueError``, nothing changed)."""
        if self.merged:
            warnings.warn("Ia3Linear.merge: the adapter is already merged; nothing done", stacklevel=2)
            return
        if isinstance(self.base_layer, QuantizedLinear):
            raise RuntimeError(f"merging into a {self.base_layer.weight.base_name} would requantise it: "
                               "fastpeft.merge_and_unload gives an nn.Linear with the dequantised weight and the "
                               "vector merged")
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = self._scales(self.active_adapter)
        if not self.adapters_enabled and bool((scale == 0).any()):  # (a disabled layer unmerges at its next call)
            raise ValueError(f"Ia3Linear.merge: adapters are disabled, and adapter {self.active_adapter!r}'s vector "
                             "has zeros: its next forward would have to unmerge what cannot be unmerged; enable "
                             "adapters first (nothing was changed)")
        wide = torch.promote_types(weight.dtype, torch.float32)
        merged = (weight.to(wide) * scale.to(wide)).to(weight.dtype)
        merged_bias = None
        if bias is not None and not self.feedforward:
            merged_bias = (bias.to(wide) * scale.view(-1).to(wide)).to(bias.dtype)
        if safe and not (torch.isfinite(merged).all() and (merged_bias is None or torch.isfinite(merged_bias).all())):
            raise ValueError(f"Ia3Linear.merge(safe=True): the merged weight would contain NaN/Inf in {weight.dtype}; "
                             "the weight was left unchanged")
        weight.copy_(merged)
        if merged_bias is not None:
            bias.copy_(merged_bias)
        self.merged_adapter = self.active_adapter

    def unmerge_problem(self) -> str | None:
        """Why :meth:`unmerge` would refuse (None when it would not): a zero in the merged vector zeroed W's rows or
        columns, which cannot be divided back out."""
        if not self.merged:
            return None
        zeros = (self._scales(self.merged_adapter).view(-1) == 0).nonzero().flatten()
        if zeros.numel():
            side = "columns" if self.feedforward else "rows"
            return (f"adapter {self.merged_adapter!r} has zeros at {zeros[:8].tolist()}"
                    f"{'…' if zeros.numel() > 8 else ''}: merging zeroed those {side} of the weight, which cannot be "
                    "recovered; reload the base weights instead")
        return None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide the merged vector back out (in fp32, rounded once: the weight as it was, up to that rounding);
        refused, changing nothing, where the vector has zeros (:meth:`unmerge_problem`)."""
        if not self.merged:
            warnings.warn("Ia3Linear.unmerge: the adapter is not merged; nothing done", stacklevel=2)
            return
        problem = self.unmerge_problem()
        if problem is not None:
            raise ValueError(f"Ia3Linear.unmerge refused: {problem}")
        weight, bias = self.base_layer.weight, self.base_layer.bias
        scale = self._scales(self.merged_adapter)
        wide = torch.promote_types(weight.dtype, torch.float32)
        weight.copy_((weight.to(wide) / scale.to(wide)).to(weight.dtype))
        if bias is not None and not self.feedforward:
            bias.copy_((bias.to(wide) / scale.view(-1).to(wide)).to(bias.dtype))
        self.merged_adapter = None

    def extra_repr(self) -> str:
        return (f"feedforward={self.feedforward}, active_adapter={self.active_adapter!r}, "
                f"merged_adapter={self.merged_adapter!r}, adapters_enabled={self.adapters_enabled}, "
                f"backend={self.backend!r}")


class BottleneckAdapter(nn.Module):
    """A bottleneck adapter: ``residual + scaling · up(act(down(h)))``, computed by :func:`adapter_bottleneck`.

    ``d``: hidden size; the bottleneck ``m`` is given directly (``bottleneck``) or as ``d // reduction_factor``.
    ``init``: "bert" (weights N(0, 0.02), zero biases), "houlsby" (near-identity: weights N(0, 0.01) truncated at
    ±2σ, zero biases) or "lora-like zero-up" (down kaiming-uniform, up zero: starts as the identity).
    """

    INITS = ("bert", "houlsby", "lora-like zero-up")

    def __init__(self, d, bottleneck=None, reduction_factor=None, activation="relu", scaling=1.0, init="bert", *,
                 device=None, dtype=None, backend=None):
        super().__init__()
        check_positive_int("d", d)
        if (bottleneck is None) == (reduction_factor is None):
            raise ValueError("give exactly one of bottleneck (m) or reduction_factor (m = d // reduction_factor)")
        if bottleneck is None:
            if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, numbers.Real) \
                    or not 0 < reduction_factor <= d:
                raise ValueError(f"reduction_factor must be a number in (0, d={d}], got {reduction_factor!r}")
            bottleneck = max(1, int(d // reduction_factor))
        check_positive_int("bottleneck", bottleneck)
        check_activation(activation)
        check_finite_number("scaling", scaling)
        if init not in self.INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, self.INITS))}, got {init!r}")
        self.d, self.bottleneck, self.activation, self.scaling = d, bottleneck, activation, float(scaling)
        self.backend = _checked_backend(backend)
        self.down = nn.Parameter(torch.empty(bottleneck, d, device=device, dtype=dtype))
        self.down_bias = nn.Parameter(torch.zeros(bottleneck, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.empty(d, bottleneck, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init="bert"):
        self.down_bias.zero_()
        self.up_bias.zero_()
        if init == "bert":
            nn.init.normal_(self.down, std=0.02)
            nn.init.normal_(self.up, std=0.02)
        elif init == "houlsby":
            nn.init.trunc_normal_(self.down, std=0.01, a=-0.02, b=0.02)
            nn.init.trunc_normal_(self.up, std=0.01, a=-0.02, b=0.02)
        else:
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
            nn.init.zeros_(self.up)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return adapter_bottleneck(h, self.down, self.down_bias, self.up, self.up_bias, self.scaling,
                                  self.activation, residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"d={self.d}, bottleneck={self.bottleneck}, activation={self.activation!r}, scaling={self.scaling}"


class AdaptedModule(nn.Module):
    """A module with a bottleneck adapter after it (``mode="sequential"``: adapter(module(x))) or beside it
    (``"parallel"``: module(x) + s·up(act(down(x)))). Tuple outputs (as transformers' blocks return) get the
    adapter on their first element. ``module`` is kept untouched, so removing the adapter restores it exactly."""

    def __init__(self, module: nn.Module, adapter: BottleneckAdapter, mode: str = "sequential"):
        super().__init__()
        if mode not in ("sequential", "parallel"):
            raise ValueError(f"mode must be 'sequential' or 'parallel', got {mode!r}")
        self.module, self.adapter, self.mode = module, adapter, mode
        self.train(module.training)

    def forward(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if self.mode == "sequential":
            adapted = self.adapter(hidden)
        else:
            adapted = self.adapter(args[0] if args else next(iter(kwargs.values())), residual=hidden)
        return (adapted,) + tuple(out[1:]) if isinstance(out, tuple) else adapted

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
