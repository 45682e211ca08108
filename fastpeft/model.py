"""Whole-model helpers: put LoRA or (IA)³ on chosen ``nn.Linear`` layers and merge them back out; insert bottleneck
adapters after or beside chosen modules and take them out again."""
from __future__ import annotations

import contextlib
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backends import requested_backend
from .layers import (
    BASE_ADAPTER,
    AdaptedModule,
    BottleneckAdapter,
    Ia3Linear,
    LoraAdapter,
    LoraLinear,
    _check_adapter_name,
    _new_adapter,
    dense_linear_problem,
    linear_wrap_problem,
)
from .nf4 import DEFAULT_BLOCKSIZE, NF4Linear, quantize_nf4_weight
from .quantized import QuantizedLinear

# The layers that hold named adapters over a base layer (which is inside them: never a target of its own).
ADAPTER_LAYERS = (LoraLinear, Ia3Linear)


def _inside_lora_layer(name: str, lora_prefixes: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in lora_prefixes)


def find_targets(model: nn.Module, target_modules) -> list[str]:
    """Qualified names of the sub-modules ``target_modules`` selects.

    A string is a regular expression matched against the whole qualified name (``re.fullmatch``); a list of
    strings selects names equal to an entry or ending in ``"." + entry`` (``"q_proj"`` matches
    ``"layers.0.attn.q_proj"``). Modules inside existing LoRA layers are not candidates. A module used at several
    places of the model is selected by any of its names, and every name that matches is listed. Raises
    ``ValueError`` when the pattern, or any entry of the list, matches nothing.
    """
    modules = dict(model.named_modules(remove_duplicate=False))  # a module used at two places has both names
    lora_prefixes = [n for n, m in modules.items() if isinstance(m, ADAPTER_LAYERS)]
    names = [n for n in modules if n and not _inside_lora_layer(n, lora_prefixes)]
    linear_names = [n for n in names if isinstance(modules[n], (nn.Linear, QuantizedLinear))]
    hint = f" (the model's linear layers: {', '.join(linear_names[:12])}{', …' if len(linear_names) > 12 else ''})"
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}") from None
        matched = [n for n in names if pattern.fullmatch(n)]
        if not matched:
            raise ValueError(f"target_modules regex {target_modules!r} matches no module name{hint}")
        return matched
    if not isinstance(target_modules, Iterable) or not all(isinstance(t, str) and t for t in target_modules) \
            or not list(target_modules):
        raise ValueError("target_modules must be a regex string or a non-empty list of module names, "
                         f"got {target_modules!r}")
    suffixes = list(target_modules)
    matched = [n for n in names if any(n == t or n.endswith("." + t) for t in suffixes)]
    unmatched = [t for t in suffixes if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(f"target_modules entries {unmatched} match no module{hint}")
    return matched


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """Freeze the model's own parameters; the adapters already in it (LoRA or bottleneck) keep their flags."""
    keep = [(p, p.requires_grad) for m in model.modules() if isinstance(m, (LoraAdapter, BottleneckAdapter))
            for p in m.parameters()]
    keep += [(p, p.requires_grad) for m in model.modules() if isinstance(m, Ia3Linear) for p in m.ia3_l.values()]
    model.requires_grad_(False)
    for param, flag in keep:
        param.requires_grad_(flag)


def lora_wrap_problem(module: nn.Module) -> str | None:
    """Why a module of a model cannot be replaced by a LoraLinear (None when it can)."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        # nn.MultiheadAttention reads out_proj.weight directly, so a wrapper would be silently bypassed.
        return "the out_proj of an nn.MultiheadAttention, which bypasses its forward"
    return linear_wrap_problem(module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def unwrap_converted(model: nn.Module) -> nn.Module:
    """The model itself; for a PeftModel whose layers :func:`fastpeft.from_peft` converted, the model it returned
    (whose module names are those PEFT's files and :func:`fastpeft.to_peft` use)."""
    return model.get_base_model() if vars(model).get("_fastpeft_converted", False) else model


def shared_places(model: nn.Module, kinds) -> list[list[str]]:
    """The names of each module of the types ``kinds`` that the model uses at several places."""
    places: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, kinds):
            places.setdefault(id(m), []).append(name)
    return [names for names in places.values() if len(names) > 1]


def _inside_lora(model: nn.Module) -> dict[int, str]:
    """The modules inside LoRA layers (their bases), by identity, with a path there: one of them reachable at another
    place too must not be wrapped there (a LoRA layer inside a LoRA layer) nor quantised."""
    prefixes = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, ADAPTER_LAYERS)]
    return {id(m): n for n, m in model.named_modules(remove_duplicate=False) if _inside_lora_layer(n, prefixes)}


def _one_name_each(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` with one name per module: a module used at several places is selected once."""
    first: dict[int, str] = {}
    for name in names:
        first.setdefault(id(model.get_submodule(name)), name)
    return list(first.values())


def _replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Put each new module where the module at its name is, at every path that reaches that module: a module used
    at several places of the model is replaced at all of them, so no call site keeps running the old one."""
    new = {id(model.get_submodule(name)): module for name, module in replacements.items()}
    paths = [(name, new[id(m)]) for name, m in model.named_modules(remove_duplicate=False) if name and id(m) in new]
    for name, module in sorted(paths, key=lambda item: -item[0].count(".")):  # innermost first: paths stay valid
        _set_submodule(model, name, module)
    for inner in model.modules():  # the model and every transformers model inside it (model.model, a backbone)
        if _is_transformers_model(inner) and not isinstance(vars(inner).get("save_pretrained"),
                                                            _CheckedSavePretrained):
            vars(inner)["save_pretrained"] = _CheckedSavePretrained(inner)
    if not any(h.hook is _check_quantized_states for h in model._load_state_dict_pre_hooks.values()):
        model.register_load_state_dict_pre_hook(_check_quantized_states)


def _check_quantized_states(model, state_dict, prefix, *_) -> None:
    """Before a model loads a state dict: every NF4 layer's part of it checked, so a mismatch there refuses the load
    before any module of the model has copied anything (NF4Linear's own check runs only when its turn comes)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            problem = module.state_problem(state_dict, f"{prefix}{name}." if name else prefix)
            if problem is not None:
                raise RuntimeError(f"cannot load the state into the model (nothing was loaded): {problem}")


# The fastpeft layers a transformers checkpoint cannot hold: their module names are not the model's own.
FASTPEFT_LAYERS = (LoraLinear, Ia3Linear, AdaptedModule, QuantizedLinear)


def fastpeft_modules(model: nn.Module) -> list[str]:
    """The names of the fastpeft layers in ``model`` (LoRA, (IA)³, bottleneck adapter and NF4 layers)."""
    return [n for n, m in model.named_modules() if isinstance(m, FASTPEFT_LAYERS)]


def _is_transformers_model(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(model).__mro__)


class ModuleMethod:
    """A callable put in a module's ``__dict__`` in place of one of its methods. It holds the module weakly (no
    cycle keeps a deleted module alive) and follows it through deep copies and pickles; ``args`` are its own."""

    def __init__(self, module: nn.Module, *args):
        self.module = weakref.ref(module)
        self.args = args

    def __deepcopy__(self, memo):
        return type(self)(memo.get(id(self.module()), self.module()), *self.args)

    def __reduce__(self):
        return type(self), (self.module(), *self.args)


class _CheckedSavePretrained(ModuleMethod):
    """A transformers model's ``save_pretrained`` once fastpeft has put layers into it: refused while the model holds
    them, since transformers would write the whole model under module names that ``from_pretrained`` cannot load
    (``Trainer.save_model`` calls it too); the model's own once they are gone."""

    def __call__(self, *args, **kwargs):
        model = self.module()
        held = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, FASTPEFT_LAYERS)}
        if held:
            shown = ", ".join(list(held)[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            kinds = set(held.values())
            remedies = []
            if kinds & {"LoraLinear", "Ia3Linear"}:
                remedies.append("save LoRA and (IA)³ adapters with fastpeft.save_adapter(model, path) (PEFT's files: "
                                "PeftModel.from_pretrained and fastpeft.load_adapter load them), or "
                                "fastpeft.merge_and_unload(model) first for a plain model")
            if "AdaptedModule" in kinds:
                remedies.append("take bottleneck adapters out with fastpeft.remove_adapters(model)")
            if "NF4Linear" in kinds:
                remedies.append("NF4 layers have no transformers format: replace each by its .dequantized() "
                                "nn.Linear to save a dense model")
            raise RuntimeError(
                f"save_pretrained: the model holds fastpeft layers ({shown}), which transformers would save as a "
                f"whole model under names from_pretrained cannot load; {'; '.join(remedies)}")
        return type(model).save_pretrained(model, *args, **kwargs)



def apply_lora(model: nn.Module, target_modules, r=8, lora_alpha=8, lora_dropout=0.0, use_rslora=False,
               init_lora_weights=True, *, adapter_name="default", autocast_adapter_dtype=True,
               backend=None, use_dora=False) -> nn.Module:
    """Replace every selected ``nn.Linear`` of ``model`` with a :class:`LoraLinear`, in place; a selected layer that
    is a LoraLinear already gets ``adapter_name`` as one more named adapter (its active adapter stays).

    ``target_modules`` as in :func:`find_targets`. The model's own parameters are frozen, so only adapters train
    (adapters already in the model, LoRA or bottleneck, keep their ``requires_grad``). All layers are checked and
    built before the model is touched: a bad argument or a selected module that is not a plain ``nn.Linear``
    raises with the model unchanged. ``use_dora=True`` makes every new adapter DoRA (see :class:`LoraLinear`).
    Returns ``model``.
    """
    if backend is not None:
        requested_backend(backend)
    names = _one_name_each(model, find_targets(model, target_modules))
    inside = _inside_lora(model)
    bad = {}
    for name in names:
        module = model.get_submodule(name)
        if id(module) in inside:
            bad[name] = f"is also the base layer at {inside[id(module)]} (a LoRA layer inside a LoRA layer never runs)"
        elif isinstance(module, Ia3Linear):
            bad[name] = "an (IA)³ layer already (one method per layer)"
        elif isinstance(module, LoraLinear):
            if adapter_name in module.adapters:
                bad[name] = f"already has an adapter named {adapter_name!r}"
            elif module.merged and use_dora:  # DoRA's magnitude starts from the unmerged weight
                bad[name] = f"has adapter {module.merged_adapter!r} merged (unmerge it before adding a DoRA adapter)"
        elif (problem := lora_wrap_problem(module)) is not None:
            bad[name] = problem
    if bad:
        listed = "; ".join(f"{n}: {why}" for n, why in bad.items())
        raise TypeError(f"apply_lora: target_modules selected modules it cannot wrap ({listed})")
    # Everything is built (and so every argument checked) before the model changes; a layer's constructor freezes
    # its base, so a failure part-way puts those flags back.
    new_layers, new_adapters = {}, {}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        _build_lora(model, names, new_layers, new_adapters, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                    adapter_name, autocast_adapter_dtype, backend, use_dora)
    except BaseException:
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
    _freeze_all_but_adapters(model)
    _replace_modules(model, new_layers)
    for layer in new_layers.values():
        layer.adapters.requires_grad_(True)
    for name, adapter in new_adapters.items():  # the active adapter stays
        layer = model.get_submodule(name)
        layer.adapters[adapter_name] = adapter
        if backend is not None:
            layer.backend = backend
    return model


def _build_lora(model, names, new_layers, new_adapters, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                adapter_name, autocast_adapter_dtype, backend, use_dora):
    """apply_lora's new layers and adapters, into ``new_layers`` / ``new_adapters``, the model not yet changed."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):  # an existing LoRA layer gets one more named adapter
            _check_adapter_name(adapter_name)
            new_adapters[name] = _new_adapter(module.base_layer, r, lora_alpha, lora_dropout, use_rslora,
                                              init_lora_weights, autocast_adapter_dtype, use_dora)
        else:
            new_layers[name] = LoraLinear(module, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                                          adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                          backend=backend, use_dora=use_dora)


def apply_ia3(model: nn.Module, target_modules, feedforward_modules=None, init_ia3_weights=True, *,
              adapter_name="default", autocast_adapter_dtype=True, backend=None) -> nn.Module:
    """Replace every selected ``nn.Linear`` of ``model`` with an :class:`Ia3Linear`, in place, as HF PEFT's IA3 does;
    a selected layer that is an Ia3Linear already gets ``adapter_name`` as one more named vector.

    ``target_modules`` as in :func:`find_targets`. ``feedforward_modules`` picks the targets whose input is scaled
    (the rest scale their output), as PEFT reads it: a regex string matched against the whole qualified name, or a
    list of names each target's name may end with; every feed-forward module must be a target. The model's own
    parameters are frozen. Everything is checked and built before the model changes. Returns ``model``.
    """
    if backend is not None:
        requested_backend(backend)
    names = _one_name_each(model, find_targets(model, target_modules))
    feedforward = {name: _is_feedforward(name, feedforward_modules) for name in names}
    if feedforward_modules is not None and not isinstance(feedforward_modules, str):
        stray = [f for f in feedforward_modules if not any(name.endswith(f) for name in names)]
        if stray:
            raise ValueError(f"feedforward_modules {stray} select no target module: feedforward_modules must be a "
                             "subset of target_modules (as in PEFT's IA3Config)")
    inside = _inside_lora(model)
    bad = {}
    for name in names:
        module = model.get_submodule(name)
        if id(module) in inside:
            bad[name] = f"is also the base layer at {inside[id(module)]}"
        elif isinstance(module, Ia3Linear):
            if adapter_name in module.ia3_l:
                bad[name] = f"already has an adapter named {adapter_name!r}"
            elif module.feedforward != feedforward[name]:
                bad[name] = (f"is an (IA)³ layer scaling its {'input' if module.feedforward else 'output'}; "
                             "feedforward_modules would make the new vector scale the other side")
        elif isinstance(module, LoraLinear):
            bad[name] = "a LoRA layer already (one method per layer)"
        elif (problem := lora_wrap_problem(module)) is not None:
            bad[name] = problem
    if bad:
        listed = "; ".join(f"{n}: {why}" for n, why in bad.items())
        raise TypeError(f"apply_ia3: target_modules selected modules it cannot wrap ({listed})")
    new_layers, new_vectors = {}, {}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, Ia3Linear):
                _check_adapter_name(adapter_name)
                new_vectors[name] = module._new_vector(init_ia3_weights, autocast_adapter_dtype)
            else:
                new_layers[name] = Ia3Linear(module, feedforward[name], init_ia3_weights, adapter_name=adapter_name,
                                             autocast_adapter_dtype=autocast_adapter_dtype, backend=backend)
    except BaseException:
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
    _freeze_all_but_adapters(model)
    _replace_modules(model, new_layers)
    for layer in new_layers.values():
        layer.ia3_l.requires_grad_(True)
    for name, vector in new_vectors.items():
        layer = model.get_submodule(name)
        layer.ia3_l[adapter_name] = vector
        if backend is not None:
            layer.backend = backend
    return model


def _is_feedforward(name: str, feedforward_modules) -> bool:
    """PEFT's rule: a regex string matches the whole name; a list entry the name ends with (no dot needed)."""
    if feedforward_modules is None:
        return False
    if isinstance(feedforward_modules, str):
        try:
            return re.fullmatch(feedforward_modules, name) is not None
        except re.error as err:
            raise ValueError(f"feedforward_modules {feedforward_modules!r} is not a valid regular expression: "
                             f"{err}") from None
    if not isinstance(feedforward_modules, Iterable) or not all(isinstance(f, str) and f for f in feedforward_modules):
        raise ValueError(f"feedforward_modules must be a regex string or a list of module names, got "
                         f"{feedforward_modules!r}")
    return any(name.endswith(f) for f in feedforward_modules)


def adapter_layers(model: nn.Module) -> dict[str, LoraLinear | Ia3Linear]:
    """Every fastpeft layer holding named adapters (:class:`LoraLinear`, :class:`Ia3Linear`), by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ADAPTER_LAYERS)}


def ia3_layers(model: nn.Module) -> dict[str, Ia3Linear]:
    """Every :class:`Ia3Linear` in ``model``, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Ia3Linear)}


def layers_with_adapter(model: nn.Module, adapter_name: str) -> dict[str, LoraLinear | Ia3Linear]:
    """The adapter layers (LoRA or (IA)³) of ``model`` that have an adapter named ``adapter_name``, by name."""
    return {n: m for n, m in adapter_layers(model).items() if adapter_name in m.adapters}


def _layers_checked(model: nn.Module, adapter_name: str, action: str, error) -> list[LoraLinear]:
    """The layers having ``adapter_name``, after asking each whether ``action`` would succeed there: one refusing
    layer raises ``error`` listing them all, before any layer changes."""
    layers = layers_with_adapter(model, adapter_name)
    if not layers:
        raise KeyError(f"no LoRA layer has an adapter named {adapter_name!r} (nor any (IA)³ layer)")
    problems = {name: getattr(layer, f"{action}_problem")(adapter_name) for name, layer in layers.items()}
    problems = {name: why for name, why in problems.items() if why is not None}
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise error(f"{action}({adapter_name!r}) refused, model unchanged ({listed})")
    return list(layers.values())


def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Activate ``adapter_name`` in every LoRA or (IA)³ layer that has it; raises if none does, or (changing nothing) if
    any of them has another adapter merged."""
    for layer in _layers_checked(model, adapter_name, "set_adapter", RuntimeError):
        layer.set_adapter(adapter_name)
    return model


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Delete ``adapter_name`` from every LoRA or (IA)³ layer that has it; raises if none does, or (changing nothing) if
    it is the only adapter of any of them."""
    for layer in _layers_checked(model, adapter_name, "delete_adapter", ValueError):
        layer.delete_adapter(adapter_name)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every :class:`LoraLinear` in ``model``, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names):
    """Run ``model`` on a mixed batch inside the ``with`` block: sample i of every LoRA layer's input takes adapter
    ``adapter_names[i]`` (``"__base__"``: none), as HF PEFT's ``model(..., adapter_names=...)``; a layer without
    that adapter runs those samples through its base. Training works too: each adapter's gradients come from its
    own samples. Every name must be an adapter of some layer; no layer may have an adapter merged. The layers'
    previous setting comes back on exit. One model, one mixed batch at a time (threads sharing the model would
    share the setting). With gradient checkpointing the layers run again in backward: call ``backward()`` inside the
    block too."""
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), got {adapter_names!r}")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no fastpeft LoRA or (IA)³ layers")
    known = {n for layer in layers.values() for n in layer.adapters}
    unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in known})
    if unknown:
        raise ValueError(f"adapter_names has {unknown}, adapters of no layer of the model ({sorted(known)}; "
                         f"{BASE_ADAPTER!r} for none)")
    merged = {name: layer.merged_adapter for name, layer in layers.items() if layer.merged}
    if merged:
        raise RuntimeError(f"adapters are merged at {merged}; unmerge them before a mixed batch")
    previous = {name: layer.batch_adapter_names for name, layer in layers.items()}
    for layer in layers.values():
        layer.batch_adapter_names = list(adapter_names)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.batch_adapter_names = previous[name]


def quantize_nf4(module: nn.Module | Tensor, *, blocksize: int = DEFAULT_BLOCKSIZE, double_quant: bool = True,
                 dtype: torch.dtype | None = None, skip_modules=("lm_head",)):
    """Quantise to NF4: a weight tensor gives an :class:`NF4Weight`; an ``nn.Linear`` an :class:`NF4Linear`; any
    other module has every plain ``nn.Linear`` inside it replaced by an NF4Linear, in place (all quantised before
    the first is replaced; a layer used at several places is replaced at all of them by one NF4Linear), except those
    whose name, or last name part, is in ``skip_modules`` (the output head by default, as QLoRA leaves it), those
    inside LoRA layers (quantise before adding LoRA) and 4-bit layers already (bitsandbytes' are converted where LoRA
    goes on them); returns the module. ``dtype``: the compute dtype (default: each weight's own; inputs in another
    dtype are cast to it and the output back, as bitsandbytes does)."""
    if isinstance(module, Tensor):
        return quantize_nf4_weight(module, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module or a weight tensor, got {type(module).__name__}")
    if isinstance(module, LoraLinear):
        raise TypeError("module is a LoraLinear: quantise its base before adding LoRA (quantize_nf4 on the model, "
                        "then apply_lora)")
    if isinstance(module, nn.Linear):
        problem = dense_linear_problem(module)
        if problem is not None:
            raise TypeError(f"module cannot be quantised: it is {problem}" + (
                " (a bitsandbytes 4-bit layer is one already: NF4Linear.from_bnb converts it)"
                if type(module).__module__.startswith("bitsandbytes") else ""))
        return NF4Linear.from_linear(module, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
    skip = () if skip_modules is None else (skip_modules,) if isinstance(skip_modules, str) else tuple(skip_modules)
    lora = [n for n, m in module.named_modules() if isinstance(m, LoraLinear)]
    inside = _inside_lora(module)
    places: dict[int, list[str]] = {}  # each layer's names (a shared layer has several)
    layers: dict[int, nn.Linear] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        if (isinstance(m, nn.Linear) and dense_linear_problem(m) is None
                and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)
                and not any(name.startswith(p + ".") for p in lora) and id(m) not in inside
                and name not in skip and name.rpartition(".")[2] not in skip):
            places.setdefault(id(m), []).append(name)
            layers[id(m)] = m
    if not layers:
        raise ValueError("quantize_nf4: the module has no plain nn.Linear layers to quantise")
    built = {}
    for key, m in layers.items():
        try:
            built[key] = NF4Linear.from_linear(m, blocksize=blocksize, double_quant=double_quant, dtype=dtype)
        except (TypeError, ValueError) as err:
            raise type(err)(f"quantize_nf4: {places[key][0]}: {err} (nothing was changed)") from None
    _replace_modules(module, {places[key][0]: layer for key, layer in built.items()})
    return module


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every LoRA or (IA)³ layer's update into its base weight and put the plain ``nn.Linear`` back.

    Returns the model (or the bare ``nn.Linear`` when ``model`` itself is a LoraLinear). Base parameters
    stay frozen, as they were under LoRA. A 4-bit (NF4) base is dequantised, not requantised: its layer becomes an
    ``nn.Linear`` in the NF4 layer's compute dtype holding W + the merged update (requantising would lose most of a
    LoRA update's precision; :func:`quantize_nf4` does it on request). Those dense layers are all built before the
    model changes.
    """
    if isinstance(model, ADAPTER_LAYERS):
        return _merged_base(model)
    layers = adapter_layers(model)
    dense = {name: _dequantized_merged(layer) for name, layer in layers.items() if isinstance(layer.base_layer,
                                                                                               QuantizedLinear)}
    _replace_modules(model, {name: dense[name] if name in dense else _merged_base(layer)
                             for name, layer in layers.items()})
    return model


def _merged_base(layer: LoraLinear) -> nn.Module:
    if isinstance(layer.base_layer, QuantizedLinear):
        return _dequantized_merged(layer)
    if not layer.merged:
        layer.merge()
    return layer.base_layer


def _dequantized_merged(layer: LoraLinear | Ia3Linear) -> nn.Linear:
    """An nn.Linear with a 4-bit layer's weight dequantised and its active adapter merged (the layer unchanged)."""
    dense = layer.base_layer.dequantized()
    if isinstance(layer, Ia3Linear):
        merged = Ia3Linear(dense, layer.feedforward)
        merged.ia3_l["default"].data.copy_(layer.ia3_l[layer.active_adapter].detach())
    else:
        merged = LoraLinear.from_adapters(dense, dict(layer.adapters), layer.active_adapter)
    merged.merge()
    return dense


@dataclass(frozen=True)
class AdapterConfig:
    """Where and how bottleneck adapters go: after a module (sequential) or beside it (parallel)."""

    mode: str = "sequential"
    reduction_factor: float | None = 16
    bottleneck: int | None = None
    activation: str = "relu"
    scaling: float = 1.0
    init: str = "bert"


# The published designs. Pfeiffer: one adapter after the FFN output; Houlsby: after the attention output and after
# the FFN output (pass both names), swish; parallel (He et al.): beside the module, reduction 2, scaling 4.
ADAPTER_CONFIGS = {
    "pfeiffer": AdapterConfig("sequential", 16, None, "relu", 1.0),
    "houlsby": AdapterConfig("sequential", 16, None, "silu", 1.0),
    "parallel": AdapterConfig("parallel", 2, None, "relu", 4.0),
}


def _adapter_config(config) -> AdapterConfig:
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        if config not in ADAPTER_CONFIGS:
            raise ValueError(f"config must be one of {', '.join(ADAPTER_CONFIGS)} or an AdapterConfig/dict, "
                             f"got {config!r}")
        return ADAPTER_CONFIGS[config]
    if isinstance(config, dict):
        unknown = set(config) - set(AdapterConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown adapter config keys {sorted(unknown)}; expected some of "
                             f"{sorted(AdapterConfig.__dataclass_fields__)}")
        if "bottleneck" in config and "reduction_factor" not in config:
            config = {**config, "reduction_factor": None}
        return AdapterConfig(**config)
    raise TypeError(f"config must be a name, an AdapterConfig or a dict, got {type(config).__name__}")


def _hidden_size(name: str, module: nn.Module, mode: str, hidden_size) -> int:
    """The adapter's size for ``module``: its output size, which ``hidden_size`` (when given) must equal; a parallel
    adapter also reads the module's input, so that must have the same size."""
    out_features = getattr(module, "out_features", None)
    if hidden_size is None:
        if out_features is None:
            raise ValueError(f"cannot tell the hidden size after {name!r} ({type(module).__name__}); "
                             "pass hidden_size=")
        hidden_size = out_features
    elif out_features is not None and hidden_size != out_features:
        raise ValueError(f"hidden_size={hidden_size} does not match {name!r}, whose output has {out_features} "
                         "features")
    in_features = getattr(module, "in_features", None)
    if mode == "parallel" and in_features is not None and in_features != hidden_size:
        raise ValueError(f"a parallel adapter beside {name!r} needs equal input and output sizes, got "
                         f"{in_features} -> {hidden_size}")
    return hidden_size


def apply_adapters(model: nn.Module, after_modules, config="pfeiffer", *, hidden_size=None, backend=None) -> nn.Module:
    """Insert bottleneck adapters after (sequential) or beside (parallel) the named sub-modules, in place.

    ``after_modules`` selects modules like ``target_modules`` of :func:`apply_lora` (suffix names or a regex).
    ``config``: "pfeiffer", "houlsby", "parallel", an :class:`AdapterConfig` or a dict of its fields. The hidden
    size comes from the module's ``out_features`` unless ``hidden_size`` is given. The model's own parameters are
    frozen; adapters already in it (LoRA or bottleneck) keep their ``requires_grad``.
    Everything is checked and built before the model changes. Undo with :func:`remove_adapters`.
    """
    cfg = _adapter_config(config)
    # The parts of an AdaptedModule (its .module and .adapter) are not candidates: the module carries one already.
    adapted = {n for n, m in model.named_modules() if isinstance(m, AdaptedModule)}
    selected = _one_name_each(model, find_targets(model, after_modules))
    names = [n for n in selected if n.rpartition(".")[0] not in adapted]
    if not names:
        raise TypeError(f"apply_adapters: after_modules selects only parts of modules that carry an adapter "
                        f"already ({selected})")
    already = [n for n in names if isinstance(model.get_submodule(n), AdaptedModule)]
    if already:
        raise TypeError(f"apply_adapters: {already} already carry an adapter (remove_adapters first)")
    nested = [(outer, inner) for outer in names for inner in names if inner.startswith(outer + ".")]
    if nested:
        # Wrapping both would leave the inner adapter on the moved-away original, never run.
        listed = ", ".join(f"{inner!r} inside {outer!r}" for outer, inner in nested)
        raise ValueError(f"apply_adapters: after_modules selects modules nested in one another ({listed}); "
                         "select one of each pair")
    around = [(n, a) for n in names for a in adapted if a.startswith(n + ".") or n.startswith(a + ".")]
    if around:
        listed = ", ".join(f"{n!r} and {a!r}" for n, a in around)
        raise ValueError(f"apply_adapters: adapters nested in adapters are not supported; these selected modules "
                         f"contain, or are inside, a module that carries one already: {listed}")
    wrapped = {}
    for name in names:
        module = model.get_submodule(name)
        param = next(module.parameters(), None)
        adapter = BottleneckAdapter(_hidden_size(name, module, cfg.mode, hidden_size), cfg.bottleneck,
                                    cfg.reduction_factor, cfg.activation, cfg.scaling, cfg.init,
                                    device=param.device if param is not None else None,
                                    dtype=param.dtype if param is not None else None, backend=backend)
        wrapped[name] = AdaptedModule(module, adapter, cfg.mode)
    _freeze_all_but_adapters(model)
    _replace_modules(model, wrapped)
    for module in wrapped.values():
        module.adapter.requires_grad_(True)
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Take every bottleneck adapter out again, restoring the original modules (and so the original outputs)."""
    if isinstance(model, AdaptedModule):
        return model.module
    _replace_modules(model, {n: m.module for n, m in model.named_modules() if isinstance(m, AdaptedModule)})
    return model
