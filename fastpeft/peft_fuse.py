"""fastpeft inside the user's own PeftModel: :func:`fuse` makes every PEFT LoRA or IA3 layer that fastpeft can run
exactly run its forward and backward through fastpeft's fused op, in place. The model stays PEFT's: the same object,
module tree, parameters, names and ``state_dict``, so PEFT's methods, ``save_pretrained`` and the trainers keep working.

Each fused layer gets a forward of its own (an instance attribute over PEFT's method). Per call it runs fastpeft's op
(``adapter_names=`` mixed batches: its mixed op) when the call is one fastpeft runs exactly, and PEFT's own forward
otherwise: adapters disabled or merged, several active adapters, a base that is not a plain ``nn.Linear``
(offloaded, quantised, sharded), a PEFT feature fastpeft lacks (LoRA bias, other LoRA variants, scales changed by
hand, ...). Why a layer falls back is what :func:`fuse_report` lists. An IA3 layer runs ``ia3_linear`` the same
way (several active adapters as the product of their vectors, which is what PEFT scales by).
"""
from __future__ import annotations

import torch
from torch import nn

from .model import ModuleMethod
from .nf4 import NF4Linear, is_bnb_4bit
from .ops.ia3_linear import ia3_linear
from .ops.lora_linear import lora_linear
from .ops.lora_linear_mixed import BASE_INDEX, lora_linear_mixed
from .peft_convert import _dropout_p, _ia3_active, _ia3_layer_problems, _layer_problems, _peft_4bit_layer


def _peft_lora_layers(peft_model, fusable: bool = True) -> dict[str, nn.Module]:
    """PEFT's LoRA and IA3 layers of ``peft_model`` by name: those fastpeft fuses (``fusable``: LoRA on nn.Linear and
    bitsandbytes 4-bit bases, IA3's Linear), or all."""
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.ia3.layer import Linear as PeftIa3Linear
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    from peft.tuners.lora.layer import LoraLayer
    return {name: m for name, m in peft_model.named_modules() if isinstance(m, (LoraLayer, IA3Layer))
            and (not fusable or isinstance(m, PeftLoraLinear) or _peft_4bit_layer(m) or type(m) is PeftIa3Linear)}


def _is_ia3(layer) -> bool:
    from peft.tuners.ia3.layer import IA3Layer
    return isinstance(layer, IA3Layer)


def _check_peft_model(peft_model) -> None:
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError(f"fastpeft.fuse needs HF PEFT (pip install peft): {err}") from None
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel (from get_peft_model or PeftModel.from_pretrained), got "
                        f"{type(peft_model).__name__}")


def _is_dtensor(t) -> bool:
    """Whether ``t`` is a distributed tensor (torch.distributed.tensor.DTensor): fastpeft's op takes local tensors."""
    return type(t).__name__ == "DTensor" and type(t).__module__.startswith("torch.distributed")


def _call_adapters(layer, kwargs) -> tuple:
    """The adapters a call runs: a mixed batch's named ones, else the active ones."""
    if kwargs:
        return tuple(sorted({n for n in kwargs["adapter_names"] if n in layer.lora_A}))
    return tuple(layer.active_adapters)


def _call_problem(layer, kwargs) -> str | None:
    """Why a call of a PEFT LoRA layer (``kwargs``: none, or a mixed batch's ``adapter_names``) runs PEFT's code, or
    None when fastpeft runs it exactly."""
    mixed = bool(kwargs)
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "an adapter is merged"
    if _is_dtensor(layer.get_base_layer().weight):
        return "the base weight is a DTensor here (sharded outside its module's forward)"
    adapters = _call_adapters(layer, kwargs) if mixed else None
    problems = _layer_problems(layer, active_only=not mixed, adapters=adapters or tuple(layer.active_adapters))
    problems += [f"adapter {n!r} has dropout p={layer.lora_dropout[n].p} (fastpeft's dropout takes p < 1)"
                 for n in (adapters or layer.active_adapters)
                 if n in layer.lora_dropout and (_dropout_p(layer.lora_dropout[n]) or 0.0) >= 1.0]
    if mixed and is_bnb_4bit(layer.get_base_layer()):
        problems.append("a mixed batch over a 4-bit base (fastpeft's mixed op takes dense bases)")
    if problems:
        return "; ".join(problems)
    return None


class _FusedForward(ModuleMethod):
    """A PEFT LoRA layer's forward once fused: fastpeft's op for the calls it runs exactly, PEFT's forward for the
    rest. The layer's state decides per call (adapters may be added, switched, merged or disabled at any time); the
    checks of a state already seen are kept, keyed by what they read."""

    def __init__(self, module, *args):
        super().__init__(module, *args)
        self.decided: dict = {}
        self.nf4 = None  # a bitsandbytes 4-bit base's NF4 view, over its own tensors: (key, NF4Linear)

    def _state(self, layer, kwargs):
        """Everything the checks of a call read: the adapters it runs, each with what is checked of it, the base
        weight, and the layer's merged and disabled adapters."""
        names = _call_adapters(layer, kwargs)
        weight = layer.get_base_layer().weight
        return (bool(kwargs), names, tuple(layer.active_adapters), tuple(layer.merged_adapters),
                layer.disable_adapters, type(weight), id(weight), weight.requires_grad, weight.dtype,
                *(_adapter_key(layer, name) for name in names if name in layer.lora_A))

    def __call__(self, x, *args, **kwargs):
        layer = self.module()
        peft_forward = type(layer).forward
        if args or (kwargs and set(kwargs) != {"adapter_names"}) or _is_dtensor(x):
            return peft_forward(layer, x, *args, **kwargs)
        if kwargs:
            layer._check_forward_args(x, **kwargs)  # PEFT's own refusals of a mixed batch, in its words
        state = self._state(layer, kwargs)
        problem = self.decided.get(state, False)
        if problem is False:
            problem = _call_problem(layer, kwargs)
            if len(self.decided) > 64:
                self.decided.clear()
            self.decided[state] = problem
        if problem is not None:
            return peft_forward(layer, x, *args, **kwargs)
        if kwargs:
            return _fused_mixed(layer, x, kwargs["adapter_names"])
        base = layer.get_base_layer()
        if is_bnb_4bit(base):
            return _fused_over_4bit(layer, x, self.nf4_view(base))
        return _fused(layer, x)

    def nf4_view(self, base) -> NF4Linear:
        """The NF4Linear over a bitsandbytes 4-bit base's own tensors (no copy), made again when they change."""
        state = base.weight.quant_state
        key = (id(base.weight), base.weight.data_ptr(), id(state), base.compute_dtype)
        if self.nf4 is None or self.nf4[0] != key:
            self.nf4 = (key, NF4Linear.from_bnb(base))
        return self.nf4[1]


def _adapter_key(layer, name) -> tuple:
    a, b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    return (name, id(a.weight), id(b.weight), a.bias is not None, b.bias is not None, layer.scaling[name],
            id(dropout), getattr(dropout, "p", None), bool(layer.use_dora.get(name)),
            bool(layer.lora_bias.get(name)), name in getattr(layer, "lora_variant", {}))


def _active(layer) -> str:
    return layer.active_adapters[0] if len(layer.active_adapters) == 1 else next(
        n for n in layer.active_adapters if n in layer.lora_A)


def _fused_over_4bit(layer, x, nf4: NF4Linear):
    """LoRA over a bitsandbytes 4-bit base, as bitsandbytes runs its layer: x and the bias in the compute dtype, the
    output back in x's dtype (autocast, where on, decides both instead)."""
    name = _active(layer)
    weight, bias, out_dtype = nf4.weight, layer.get_base_layer().bias, None
    if not torch.is_autocast_enabled(x.device.type):
        if x.dtype != weight.dtype and x.dtype.is_floating_point:
            out_dtype, x = x.dtype, x.to(weight.dtype)
        if bias is not None and bias.dtype != weight.dtype:
            bias = bias.to(weight.dtype)
    y = lora_linear(x, weight, bias, layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name],
                    _dropout_p(layer.lora_dropout[name]), layer.training)
    return y if out_dtype is None else y.to(out_dtype)


def _fused(layer, x):
    """The active adapter of a PEFT LoRA layer through fastpeft's op, on PEFT's own tensors."""
    name = _active(layer)
    base = layer.get_base_layer()
    magnitude = None
    if layer.use_dora.get(name):
        magnitude = layer.lora_magnitude_vector[name].weight
    return lora_linear(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                       layer.scaling[name], _dropout_p(layer.lora_dropout[name]), layer.training,
                       magnitude=magnitude, _trained_magnitude=magnitude is not None)


def _fused_mixed(layer, x, adapter_names):
    """A mixed batch (PEFT's ``adapter_names``: one adapter per sample, "__base__" or a name the layer lacks for the
    base alone) through fastpeft's mixed op, on PEFT's own tensors."""
    present = [n for n in dict.fromkeys(adapter_names) if n in layer.lora_A]
    if not present:
        return layer.get_base_layer()(x)
    position = {name: i for i, name in enumerate(present)}
    per_sample = torch.tensor([position.get(n, BASE_INDEX) for n in adapter_names], device=x.device)
    index = per_sample.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    base = layer.get_base_layer()
    return lora_linear_mixed(x, base.weight, base.bias, [layer.lora_A[n].weight for n in present],
                             [layer.lora_B[n].weight for n in present], [layer.scaling[n] for n in present], index,
                             [_dropout_p(layer.lora_dropout[n]) for n in present], layer.training)


class _FusedIa3Forward(ModuleMethod):
    """A PEFT IA3 Linear's forward once fused: fastpeft's ``ia3_linear`` for the calls it runs exactly, PEFT's forward
    for the rest (extra arguments, which PEFT hands to the base layer; merged or disabled adapters; a base that is not
    a plain frozen nn.Linear; an input in another dtype than the base's outside autocast), decided per call as for
    LoRA."""

    def __init__(self, module, *args):
        super().__init__(module, *args)
        self.decided: dict = {}

    def __call__(self, x, *args, **kwargs):
        layer = self.module()
        peft_forward = type(layer).forward
        if args or kwargs or not isinstance(x, torch.Tensor) or _is_dtensor(x):
            return peft_forward(layer, x, *args, **kwargs)
        base = layer.get_base_layer()
        state = _ia3_state(layer, base)
        problem = self.decided.get(state, False)
        if problem is False:
            problem = _ia3_call_problem(layer)
            if len(self.decided) > 64:
                self.decided.clear()
            self.decided[state] = problem
        if problem is not None or (x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type)):
            return peft_forward(layer, x)  # (PEFT's own error, or its casts, for another dtype)
        return _fused_ia3(layer, x, base)


def _ia3_state(layer, base) -> tuple:
    """Everything the checks of an IA3 call read: the adapters it runs, the layer's merged and disabled adapters, and
    the base (its kind, hooks, weight identity, dtype and requires_grad)."""
    weight = base.weight
    return (tuple(layer.active_adapters), tuple(layer.merged_adapters), layer.disable_adapters,
            layer.fan_in_fan_out, type(base), id(base), bool(base._forward_hooks or base._forward_pre_hooks),
            "forward" in vars(base), type(weight), id(weight), weight.requires_grad, weight.dtype,
            *((name, id(layer.ia3_l[name])) for name in _ia3_active(layer)))


def _ia3_call_problem(layer) -> str | None:
    """Why a call of a PEFT IA3 layer runs PEFT's code, or None when fastpeft runs it exactly."""
    if layer.disable_adapters:
        return "adapters are disabled"
    if layer.merged:
        return "an adapter is merged"
    if _is_dtensor(layer.get_base_layer().weight):
        return "the base weight is a DTensor here (sharded outside its module's forward)"
    problems = _ia3_layer_problems(layer, active_only=False)
    if not _ia3_active(layer):
        problems.append(f"none of the active adapters {list(layer.active_adapters)} is on the layer (PEFT runs its "
                        "base alone)")
    return "; ".join(problems) or None


def _fused_ia3(layer, x, base):
    """The active vectors of a PEFT IA3 layer through fastpeft's op, on PEFT's own tensors: PEFT scales by the
    product of the active adapters' vectors, taken here in its order, so gradients reach each of them."""
    first, *others = _ia3_active(layer)
    scale = layer.ia3_l[first].flatten()
    for name in others:
        scale = scale * layer.ia3_l[name].flatten()
    return ia3_linear(x, base.weight, base.bias, scale, layer.is_feedforward)


class _FusingAfter(ModuleMethod):
    """A PeftModel method that adds layers (``add_adapter``, ``load_adapter``): PEFT's, then the new layers fused."""

    def __call__(self, *args, **kwargs):
        model = self.module()
        result = getattr(type(model), self.args[0])(model, *args, **kwargs)
        _fuse_layers(model)
        return result


_ADDING_METHODS = ("add_adapter", "load_adapter")


_FUSED = (_FusedForward, _FusedIa3Forward)


def _fuse_layers(peft_model) -> None:
    for layer in _peft_lora_layers(peft_model).values():
        if not isinstance(layer.__dict__.get("forward"), _FUSED):
            layer.__dict__["forward"] = (_FusedIa3Forward if _is_ia3(layer) else _FusedForward)(layer)


def fuse(peft_model):
    """Run the forward and backward of every LoRA or IA3 layer of ``peft_model`` that fastpeft can run exactly through
    fastpeft's fused op, in place, and return the same PeftModel. Its parameters, names, ``state_dict`` and methods
    stay PEFT's; a call fastpeft cannot run exactly runs PEFT's own code (:func:`fuse_report` says which layers and
    why). Adapters added later (``add_adapter``, ``load_adapter``) are fused too. :func:`unfuse` undoes it."""
    _check_peft_model(peft_model)
    _fuse_layers(peft_model)
    for method in _ADDING_METHODS:
        if not isinstance(peft_model.__dict__.get(method), _FusingAfter):
            peft_model.__dict__[method] = _FusingAfter(peft_model, method)
    return peft_model


def unfuse(peft_model):
    """Undo :func:`fuse`: every layer runs PEFT's own forward again. Returns the same PeftModel."""
    _check_peft_model(peft_model)
    for layer in _peft_lora_layers(peft_model).values():
        if isinstance(layer.__dict__.get("forward"), _FUSED):
            del layer.__dict__["forward"]
    for method in _ADDING_METHODS:
        if isinstance(peft_model.__dict__.get(method), _FusingAfter):
            del peft_model.__dict__[method]
    return peft_model


def fuse_report(peft_model) -> dict[str, str | None]:
    """For each PEFT LoRA or IA3 layer of ``peft_model`` (by module name): None where its calls run fused now, else
    why they run PEFT's code (not fused, disabled or merged adapters, or a PEFT feature fastpeft lacks)."""
    _check_peft_model(peft_model)
    fusable = _peft_lora_layers(peft_model)
    report = {}
    for name, layer in _peft_lora_layers(peft_model, fusable=False).items():
        if name not in fusable:
            report[name] = (f"a {type(layer).__module__}.{type(layer).__qualname__} layer (fastpeft fuses PEFT's "
                            "LoRA and IA3 Linear layers)")
        elif not isinstance(layer.__dict__.get("forward"), _FUSED):
            report[name] = "not fused (fastpeft.fuse(peft_model) fuses it)"
        else:
            report[name] = _ia3_call_problem(layer) if _is_ia3(layer) else _call_problem(layer, {})
    return report
