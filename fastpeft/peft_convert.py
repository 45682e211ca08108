"""Hugging Face PEFT models in memory: ``from_peft`` swaps PEFT's LoRA layers for :class:`LoraLinear` and its IA3
layers for :class:`Ia3Linear`, holding the very same parameters; ``to_peft`` builds a ``PeftModel`` around fastpeft's
parameters. Neither copies a weight, so an optimizer made before a conversion keeps training the converted model.

Everything is checked before the model changes: a PEFT feature fastpeft lacks is named in the error, never dropped.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .layers import BASE_ADAPTER, AdaptedModule, Ia3Linear, LoraAdapter, LoraLinear, dense_linear_problem
from .model import ADAPTER_LAYERS, ModuleMethod, _replace_modules, adapter_layers, shared_places, unwrap_converted
from .nf4 import NF4Linear, bnb_problem
from .peft_io import peft_ia3_config, peft_lora_config


def _require_peft():
    try:
        import peft
    except ModuleNotFoundError as err:
        if err.name != "peft":  # peft is there but broken: its own error says what to fix
            raise
        raise ImportError("converting to or from HF PEFT needs the peft package (pip install peft)") from None
    return peft


def _dropout_p(module: nn.Module) -> float | None:
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p)
    return None


def _active_adapters(layer) -> list[str]:
    """The adapters a PEFT layer runs: the model-wide active names that this layer has."""
    return [name for name in layer.active_adapters if name in layer.lora_A]


def _peft_4bit_layer(layer) -> bool:
    """Whether ``layer`` is PEFT's LoRA layer for bitsandbytes 4-bit bases (``peft.tuners.lora.bnb.Linear4bit``)."""
    kind = type(layer)
    return kind.__module__ == "peft.tuners.lora.bnb" and kind.__name__ == "Linear4bit"


def _layer_problems(layer, active_only: bool = True, adapters=None) -> list[str]:
    """Why a PEFT tuner layer cannot become a LoraLinear with identical behaviour; empty when it can. Without
    ``active_only``, what its active and merged adapters are is left out (a mixed batch names its own); ``adapters``:
    the adapters whose own features are checked (default: every adapter of the layer)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
    if type(layer) is not PeftLoraLinear and not _peft_4bit_layer(layer):
        return [f"{type(layer).__module__}.{type(layer).__qualname__} (fastpeft converts LoRA on nn.Linear and on "
                "bitsandbytes NF4 layers only)"]
    adapters = list(layer.lora_A) if adapters is None else [n for n in adapters if n in layer.lora_A]
    problems = []
    base = layer.base_layer
    # (PEFT wraps a bitsandbytes layer in its generic Linear on a CPU, in its bnb.Linear4bit on a GPU)
    if type(base).__module__.startswith("bitsandbytes"):
        if (problem := bnb_problem(base)) is not None:
            problems.append(f"base layer is {problem}")
        if layer.merged_adapters:
            problems.append("an adapter is merged into a 4-bit base (requantised by PEFT); unmerge it first")
        if any(layer.use_dora.get(name) for name in layer.lora_A):
            problems.append("DoRA over a 4-bit base (fastpeft runs plain LoRA over it)")
    elif not isinstance(base, nn.Linear) or isinstance(base, nn.modules.linear.NonDynamicallyQuantizableLinear):
        problems.append(f"base layer is a {type(base).__name__}, not a plain nn.Linear")
    elif not base.weight.dtype.is_floating_point:
        problems.append(f"base weight has dtype {base.weight.dtype} (quantized bases are not supported)")
    elif base.weight.requires_grad:
        problems.append("base weight is trainable (fastpeft keeps it frozen)")
    if getattr(layer, "fan_in_fan_out", False):
        problems.append("fan_in_fan_out=True (transposed Conv1D weights)")
    if len(layer.lora_embedding_A):
        problems.append("LoRA on embeddings")
    for variant_name, variant in getattr(layer, "lora_variant", {}).items():
        if variant_name not in adapters:
            continue
        if type(variant).__name__ != "DoraLinearVariant":  # DoRA on a Linear is fastpeft's too
            problems.append(f"adapter {variant_name!r} uses the LoRA variant {type(variant).__name__}")
    for name in adapters:
        if layer.use_dora.get(name) and name in layer.merged_adapters:
            norm = getattr(layer, "_caches", {}).get(f"{name}-weight_norm")
            if norm is None or not bool((layer.lora_magnitude_vector[name].weight != 0).all()):
                problems.append(f"DoRA adapter {name!r} is merged without the norms PEFT unmerges it by, or with "
                                "rows of magnitude 0 (which no unmerge can restore); unmerge it first")
        if layer.lora_bias.get(name) or layer.lora_B[name].bias is not None or layer.lora_A[name].bias is not None:
            problems.append(f"adapter {name!r} has a LoRA bias (lora_bias=True)")
        if _dropout_p(layer.lora_dropout[name]) is None:
            problems.append(f"adapter {name!r} has dropout module {type(layer.lora_dropout[name]).__name__}")
        r, alpha, rslora = layer.r[name], layer.lora_alpha[name], layer.use_rslora.get(name, False)
        expected = alpha / (math.sqrt(r) if rslora else r)
        if not math.isclose(layer.scaling[name], expected, rel_tol=1e-12, abs_tol=0.0):
            problems.append(f"adapter {name!r} has scaling {layer.scaling[name]} instead of lora_alpha/r = {expected} "
                            "(changed by set_scale or scale_layer)")
    if not active_only:
        return problems
    active = _active_adapters(layer)
    if len(active) > 1:
        problems.append(f"{len(active)} active adapters {active} (fastpeft runs one at a time)")
    elif not active:
        problems.append(f"none of the active adapters {list(layer.active_adapters)} is on the layer")
    merged = list(layer.merged_adapters)
    if len(merged) > 1 or (merged and merged != active):
        problems.append(f"merged adapters {merged} with active {active} (fastpeft merges the active adapter only)")
    return problems


def _is_peft_ia3(layer) -> bool:
    """Whether ``layer`` is one of PEFT's IA3 layers (any kind: Linear, Conv2d, bitsandbytes, ...)."""
    from peft.tuners.ia3.layer import IA3Layer
    return isinstance(layer, IA3Layer)


def _ia3_active(layer) -> list[str]:
    """The adapters a PEFT IA3 layer runs (their vectors multiplied): the model-wide active names it has."""
    return [name for name in layer.active_adapters if name in layer.ia3_l]


def _ia3_layer_problems(layer, active_only: bool = True) -> list[str]:
    """Why a PEFT IA3 layer cannot become an Ia3Linear with identical behaviour; empty when it can. Without
    ``active_only``, what its active and merged adapters are is left out (:func:`fastpeft.fuse` runs several active
    vectors as their product, and decides merged or disabled layers per call)."""
    from peft.tuners.ia3.layer import Linear as PeftIa3Linear
    if type(layer) is not PeftIa3Linear:
        return [f"{type(layer).__module__}.{type(layer).__qualname__} (fastpeft converts (IA)³ on a plain nn.Linear "
                "only)"]
    problems = []
    base = layer.base_layer
    if layer.fan_in_fan_out or getattr(layer, "is_target_conv_1d_layer", False):
        problems.append("fan_in_fan_out=True (transformers' Conv1D weights, stored transposed)")
    elif isinstance(base, nn.modules.linear.NonDynamicallyQuantizableLinear):
        problems.append("base layer is the out_proj of an nn.MultiheadAttention, which bypasses its forward")
    elif (why := dense_linear_problem(base)) is not None:
        problems.append(f"base layer is {why} (fastpeft runs (IA)³ over a plain nn.Linear)")
    elif not base.weight.dtype.is_floating_point:
        problems.append(f"base weight has dtype {base.weight.dtype} (quantized bases are not supported)")
    elif base.weight.requires_grad:
        problems.append("base weight is trainable (fastpeft keeps it frozen)")
    if not active_only:
        return problems
    active = _ia3_active(layer)
    if len(active) > 1:
        problems.append(f"{len(active)} active adapters {active} (an Ia3Linear runs one at a time; PEFT multiplies "
                        "their vectors)")
    elif not active:
        problems.append(f"none of the active adapters {list(layer.active_adapters)} is on the layer")
    merged = list(layer.merged_adapters)
    if len(merged) > 1 or (merged and merged != active):
        problems.append(f"merged adapters {merged} with active {active} (fastpeft merges the active adapter only)")
    return problems


def _model_problems(peft_model, model) -> list[str]:
    from peft.utils.other import AuxiliaryTrainingWrapper
    problems = []
    for name, config in (getattr(peft_model, "peft_config", None) or {}).items():
        peft_type = getattr(getattr(config, "peft_type", None), "value", None)
        if peft_type not in ("LORA", "IA3"):
            problems.append(f"adapter {name!r} has tuner type {peft_type or type(config).__name__} "
                            "(fastpeft converts LoRA and IA3)")
        if name == BASE_ADAPTER:
            problems.append(f"an adapter is named {name!r}, which fastpeft reserves for the base layer in "
                            "adapter_names (rename it)")
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            problems.append(f"{name}: {type(module).__name__} (modules_to_save / trainable_token_indices)")
    return problems


def from_peft(peft_model: nn.Module, *, backend=None) -> nn.Module:
    """Swap every PEFT LoRA ``Linear`` in ``peft_model`` for a :class:`LoraLinear` and every PEFT IA3 ``Linear`` for
    an :class:`Ia3Linear`, in place, and return the model.

    ``peft_model`` is a ``peft.PeftModel`` (the underlying model, ``peft_model.get_base_model()``, is converted and
    returned) or any module holding PEFT LoRA or IA3 layers. Each new layer holds PEFT's own parameters
    (``lora_A``/``lora_B``, DoRA's magnitude; or the ``ia3_l`` vectors, with the layer's feed-forward side) and base
    layer: same tensors, same outputs, with every adapter of the layer, its active adapter, merge and enable state
    and training mode. Anything fastpeft would run differently (LoRA biases, embeddings, quantized bases, other tuner
    types, modules_to_save, several active adapters, ``fan_in_fan_out``, ...) is listed in a ``ValueError`` and
    nothing is changed. ``backend`` is set on the new layers.

    The PeftModel keeps running the converted layers in its forward, but PEFT's adapter methods on it
    (``save_pretrained``, ``state_dict``, ``add_adapter``, ``merge_and_unload``, ...) can no longer see them and
    raise ``RuntimeError`` saying what to do; the returned model's ``save_pretrained`` (what ``Trainer.save_model``
    calls) is refused while it holds fastpeft layers. Save with :func:`fastpeft.save_adapter`.
    """
    peft = _require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a peft.PeftModel or an nn.Module, got {type(peft_model).__name__}")
    if _is_retired(peft_model):
        raise ValueError("from_peft: this PeftModel was converted already; its model is "
                         "peft_model.get_base_model()")
    from peft.tuners.tuners_utils import BaseTuner
    wrapped_by = ("a PeftMixedModel (get_peft_model(mixed=True))" if type(peft_model).__name__ == "PeftMixedModel"
                  else "the tuner of a PeftModel (peft_model.base_model)" if isinstance(peft_model, BaseTuner)
                  else "the model inside a PeftModel (PEFT's peft_config is on it)"
                  if "peft_config" in vars(peft_model) and not getattr(peft_model, "_hf_peft_config_loaded", False)
                  else None)
    if wrapped_by is not None:
        # The PeftModel around it cannot be reached from here, and its PEFT methods would find no PEFT layers left:
        # a save_pretrained would write an adapter of no tensors.
        raise TypeError(f"from_peft: peft_model is {wrapped_by}; pass the PeftModel itself "
                        "(fastpeft.from_peft(peft_model)), so that its PEFT methods are told the layers moved")
    model = peft_model.get_base_model() if isinstance(peft_model, peft.PeftModel) else peft_model
    if isinstance(model, BaseTunerLayer):
        raise TypeError("peft_model is itself a PEFT layer; pass the model that contains it")
    tuner_layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    if not tuner_layers:
        raise ValueError("from_peft: the model has no PEFT layers")
    problems = _model_problems(peft_model, model)
    where: dict[str, list[str]] = {}  # each problem once, with the layers that have it
    for name, layer in tuner_layers.items():
        for problem in _ia3_layer_problems(layer) if _is_peft_ia3(layer) else _layer_problems(layer):
            where.setdefault(problem, []).append(name)
    for problem, names in where.items():
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        problems.append(f"{problem}: {shown}")
    if problems:
        raise ValueError("from_peft: the model uses PEFT features fastpeft does not support (nothing was "
                         "changed):\n  - " + "\n  - ".join(problems))
    _replace_modules(model, {name: _convert_ia3_layer(layer, backend) if _is_peft_ia3(layer)
                             else _convert_layer(layer, backend) for name, layer in tuner_layers.items()})
    # PEFT's bookkeeping on the model it wrapped; stale now, and get_peft_model would read it as existing adapters.
    vars(model).pop("peft_config", None)
    if isinstance(peft_model, peft.PeftModel):
        _retire((peft_model, peft_model.base_model), _PEFT_ADAPTER_METHODS)
        vars(peft_model)["_fastpeft_converted"] = True
    elif getattr(model, "_hf_peft_config_loaded", False):  # transformers' own PEFT methods, on the model itself
        _retire((model,), _TRANSFORMERS_ADAPTER_METHODS)
    return model


# What PEFT does with a PeftModel's adapters, on the PeftModel and on its tuner (peft_model.base_model). After
# from_peft they would find no PEFT layer and silently do nothing or write nothing (an adapter file of 0 tensors).
_PEFT_ADAPTER_METHODS = (
    "save_pretrained", "push_to_hub", "load_adapter", "add_adapter", "set_adapter", "delete_adapter",
    "disable_adapter", "enable_adapter_layers", "disable_adapter_layers", "merge_adapter", "unmerge_adapter",
    "merge_and_unload", "unload", "add_weighted_adapter", "set_requires_grad", "get_layer_status",
    "get_model_status", "create_or_update_model_card", "inject_adapter", "subtract_mutated_init", "state_dict")
# transformers' PEFT integration (model.add_adapter(LoraConfig(...))): the same methods on the model itself.
_TRANSFORMERS_ADAPTER_METHODS = (
    "load_adapter", "add_adapter", "set_adapter", "disable_adapters", "enable_adapters", "active_adapters",
    "get_adapter_state_dict", "delete_adapter")
_INSTEAD = {
    "disable_adapter": "layer.disable_adapters() on each of fastpeft.adapter_layers(model) runs the bases alone",
    "disable_adapters": "layer.disable_adapters() on each of fastpeft.adapter_layers(model) runs the bases alone",
}


class _Retired(ModuleMethod):
    """A PEFT method of a model whose PEFT layers :func:`from_peft` converted: a clear error instead of PEFT's code,
    which would find no PEFT layer. ``state_dict`` stays the module's own when a containing module collects it (a
    prefix given: DDP, a value-head wrapper); asked for directly (``get_peft_model_state_dict``) it is refused."""

    def __call__(self, *args, **kwargs):
        owner, (name,) = self.module(), self.args
        if name == "state_dict" and (kwargs.get("prefix") or (len(args) > 1 and args[1])):
            return type(owner).state_dict(owner, *args, **kwargs)
        instead = _INSTEAD.get(name, "fastpeft.set_adapter / delete_adapter / merge_and_unload act on its adapters")
        raise RuntimeError(
            f"{name}: fastpeft.from_peft converted this model's PEFT layers into fastpeft LoraLinear / "
            f"Ia3Linear layers, which PEFT's {name} cannot see (a save would write an adapter holding no tensors). "
            "Work on the model from_peft returned: fastpeft.save_adapter(model, path) writes PEFT's adapter files, "
            f"{instead}, and fastpeft.to_peft(model) makes it a PeftModel again. Its forward still runs the "
            "adapters.")


def _retire(owners, names) -> None:
    """Make the PEFT adapter methods ``names`` of each of ``owners`` raise; forward and generate keep working."""
    for owner in owners:
        for name in names:
            if callable(getattr(type(owner), name, None)):
                vars(owner)[name] = _Retired(owner, name)


def _is_retired(model) -> bool:
    return isinstance(model, nn.Module) and vars(model).get("_fastpeft_converted", False)


def _magnitude(layer, name):
    """PEFT's DoRA magnitude parameter of adapter ``name`` (None for plain LoRA)."""
    return layer.lora_magnitude_vector[name].weight if name in layer.lora_magnitude_vector else None


def _convert_layer(layer, backend) -> LoraLinear:
    adapters = {name: LoraAdapter.from_parameters(layer.lora_A[name].weight, layer.lora_B[name].weight,
                                                  layer.lora_alpha[name], _dropout_p(layer.lora_dropout[name]),
                                                  layer.use_rslora.get(name, False), _magnitude(layer, name))
                for name in layer.lora_A}
    new = LoraLinear.from_adapters(layer.base_layer, adapters, _active_adapters(layer)[0], backend=backend)
    new.merged_adapter = layer.merged_adapters[0] if layer.merged_adapters else None
    if new.merged_adapter is not None and adapters[new.merged_adapter].use_dora:  # as merge() would have kept it
        with torch.no_grad():
            norm = layer._caches[f"{new.merged_adapter}-weight_norm"].detach().float()
            factor = _magnitude(layer, new.merged_adapter).detach().float() / norm
        empty = torch.empty(0, dtype=torch.long, device=norm.device)
        new._dora_merge = (factor, empty, layer.base_layer.weight.new_empty((0, layer.in_features)), norm)
    new.adapters_enabled = not layer.disable_adapters
    new.train(layer.training)
    return new


def _convert_ia3_layer(layer, backend) -> Ia3Linear:
    """An Ia3Linear holding a PEFT IA3 Linear's base layer and its own vector parameters, in PEFT's order."""
    active = _ia3_active(layer)[0]
    flags = [(p, p.requires_grad) for p in layer.base_layer.parameters()]
    new = Ia3Linear(layer.base_layer, layer.is_feedforward, adapter_name=active, backend=backend)
    for param, flag in flags:  # the constructor freezes its base: a bias PEFT trains keeps training (as for LoRA)
        param.requires_grad_(flag)
    new.ia3_l = nn.ParameterDict(layer.ia3_l)  # the same Parameters (not copies), in PEFT's order
    new.merged_adapter = layer.merged_adapters[0] if layer.merged_adapters else None
    new.adapters_enabled = not layer.disable_adapters
    new.train(layer.training)
    return new


def _shown(names) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def to_peft(model: nn.Module):
    """Wrap ``model``'s fastpeft LoRA layers, or its (IA)³ layers, as a ``peft.PeftModel`` holding the same
    parameters; returns it.

    Every named adapter becomes a PEFT adapter (``LoraConfig`` with per-layer rank/alpha patterns, or ``IA3Config``
    naming the layers and which of them scale their input); active adapter, merge and enable state and
    ``requires_grad`` carry over. PEFT activates one adapter for the whole model, holds one tuner type, and has one
    dropout and one ``use_rslora`` per LoRA adapter: a model whose layers disagree, or holds LoRA and (IA)³ layers
    both, raises ``ValueError`` with the model unchanged (:func:`fastpeft.set_adapter` aligns the active adapters),
    and so do bottleneck adapters, which PEFT lacks. ``model`` is changed in place: it becomes the PeftModel's base
    model, whose layers run PEFT's code (a layer's fastpeft ``backend`` has no PEFT counterpart). :func:`from_peft`
    converts back.
    """
    peft = _require_peft()
    if isinstance(model, ADAPTER_LAYERS) or not isinstance(model, nn.Module):
        raise TypeError(f"model must be a module containing LoraLinear or Ia3Linear layers, got {type(model).__name__}")
    model = unwrap_converted(model)
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no fastpeft LoRA layers (nor (IA)³ layers)")
    lora = [name for name, layer in layers.items() if isinstance(layer, LoraLinear)]
    ia3 = [name for name, layer in layers.items() if isinstance(layer, Ia3Linear)]
    if lora and ia3:
        raise ValueError(f"a PeftModel holds adapters of one tuner type, and this model has LoRA layers "
                         f"({_shown(lora)}) and (IA)³ layers ({_shown(ia3)}); save each adapter with "
                         "fastpeft.save_adapter (PEFT loads each kind into a PeftModel of its own)")
    kind, word = (Ia3Linear, "(IA)³") if ia3 else (LoraLinear, "LoRA")
    shared = shared_places(model, kind)
    if shared:
        raise ValueError(f"the {word} layers at {shared} are each one module used at several places; PEFT would wrap "
                         f"it at one place only, leaving the others without {word}")
    bottlenecks = [name for name, m in model.named_modules() if isinstance(m, AdaptedModule)]
    if bottlenecks:
        raise ValueError(f"PEFT has no bottleneck adapters, so those at {bottlenecks} would be lost when PEFT saves "
                         "the model; take them out first (fastpeft.remove_adapters)")
    if ia3:
        # (PEFT's IA3 layer over a 4-bit base is its bitsandbytes one, which computes otherwise)
        quantized = [name for name, layer in layers.items() if dense_linear_problem(layer.base_layer) is not None]
        if quantized:
            raise ValueError(f"the (IA)³ layers at {quantized} are over a base that is not a plain nn.Linear (a 4-bit "
                             "or quantised one); fastpeft converts (IA)³ over plain nn.Linear bases only")
    lost = [name for name, layer in layers.items()
            if kind is LoraLinear and layer._dora_merge is not None and len(layer._dora_merge[1])
            or kind is not LoraLinear and layer.unmerge_problem() is not None]
    if lost:
        what = "DoRA adapters merged" if kind is LoraLinear else "(IA)³ vectors merged"
        raise ValueError(f"the {what} at {lost} have rows of magnitude 0 (zeros), which PEFT's unmerge cannot "
                         "restore; unmerge them first")
    active = {name: layer.active_adapter for name, layer in layers.items()}
    if len(set(active.values())) > 1:
        raise ValueError(f"PEFT activates one adapter for the whole model; the layers' active adapters differ: "
                         f"{active} (fastpeft.set_adapter(model, name) aligns them where every layer has that adapter)")
    adapter_names = list(dict.fromkeys(name for layer in layers.values() for name in layer.adapters))
    configs = {}
    for adapter_name in adapter_names:
        fields = (peft_ia3_config if ia3 else peft_lora_config)(model, adapter_name)
        fields = {k: v for k, v in fields.items() if k != "peft_type"}
        configs[adapter_name] = (peft.IA3Config if ia3 else peft.LoraConfig)(**{**fields, "inference_mode": False})
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    # A 4-bit base goes to PEFT as the bitsandbytes Linear4bit over the same tensors (PEFT's LoRA layer for it).
    bases = {name: layer.base_layer.to_bnb() if isinstance(layer.base_layer, NF4Linear) else layer.base_layer
             for name, layer in layers.items()}
    _replace_modules(model, bases)
    try:
        first, *others = adapter_names
        peft_model = peft.get_peft_model(model, configs[first], adapter_name=first)
        for adapter_name in others:
            peft_model.add_adapter(adapter_name, configs[adapter_name])
        peft_model.set_adapter(next(iter(active.values())))
        for name, layer in layers.items():
            target = model.get_submodule(name)
            (_attach_ia3 if ia3 else _attach_lora)(name, target, layer)
            if layer.merged:
                target.merged_adapters = [layer.merged_adapter]
            if not layer.adapters_enabled:
                target.enable_adapters(False)
            target.train(layer.training)
    except BaseException:
        _replace_modules(model, layers)
        raise
    finally:
        for param, flag in requires_grad:  # PEFT's set_adapter / enable_adapters retoggle them
            param.requires_grad_(flag)
    return peft_model


def _attach_lora(name: str, target, layer: LoraLinear) -> None:
    """Give the PEFT LoRA layer ``target`` that PEFT built at ``name`` the parameters of ``layer``."""
    for adapter_name, adapter in layer.adapters.items():
        target.lora_A[adapter_name].weight = adapter.lora_A
        target.lora_B[adapter_name].weight = adapter.lora_B
        if adapter.use_dora:
            target.lora_magnitude_vector[adapter_name].weight = adapter.lora_magnitude_vector
        if not math.isclose(target.scaling[adapter_name], adapter.scaling, rel_tol=1e-12):
            raise RuntimeError(f"{name}: PEFT built scaling {target.scaling[adapter_name]} for adapter "
                               f"{adapter_name!r}, fastpeft has {adapter.scaling}")
    if layer.merged and layer._dora_merge is not None:  # the norms PEFT's DoRA unmerge divides by
        target._cache_store(f"{layer.merged_adapter}-weight_norm", layer._dora_merge[3])


def _attach_ia3(name: str, target, layer: Ia3Linear) -> None:
    """Give the PEFT IA3 layer ``target`` that PEFT built at ``name`` the vectors of ``layer``."""
    if target.is_feedforward != layer.feedforward:
        raise RuntimeError(f"{name}: PEFT built a layer with is_feedforward={target.is_feedforward}, fastpeft's has "
                           f"feedforward={layer.feedforward}")
    for adapter_name, vector in layer.ia3_l.items():
        if target.ia3_l[adapter_name].shape != vector.shape:
            raise RuntimeError(f"{name}: PEFT built ia3_l {tuple(target.ia3_l[adapter_name].shape)} for adapter "
                               f"{adapter_name!r}, fastpeft has {tuple(vector.shape)}")
        target.ia3_l[adapter_name] = vector
