"""Merging adapters into a new one: :func:`add_weighted_adapter`, HF PEFT's ``add_weighted_adapter`` with its
arguments, combination types and results, on a PeftModel (fused by :func:`fastpeft.fuse` or not) and on fastpeft's
own models. What each combination type of LoRA adapters computes, and how, is :mod:`fastpeft.ops.merging`'s; (IA)³
adapters merge linearly, as PEFT's IA3 does: the new vector is Σ wᵢ lᵢ.

Read top to bottom: the checks of the arguments; fastpeft's models; PEFT's models; (IA)³; the public function.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import torch
from torch import Tensor, nn

from .layers import Ia3Linear, LoraAdapter, LoraLinear, _check_adapter_name, _new_adapter
from .model import ia3_layers, lora_layers, unwrap_converted
from .ops.merging import (
    COMBINATION_TYPES,
    FACTOR_TYPES,
    RULES,
    SIGN_METHODS,
    SVD_DRIVERS,
    MergeOptions,
    Term,
    merge_lora_factors,
)

# ----------------------------------------------------------------------------------------------------------
# The arguments, checked before anything changes.
# ----------------------------------------------------------------------------------------------------------

def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Request:
    adapters: list[str]
    weights: list[float]
    adapter_name: str
    combination_type: str
    svd_rank: int | None
    density: float | None
    majority_sign_method: str
    svd_clamp: float | None
    svd_full_matrices: bool
    svd_driver: str | None
    seed: int | None

    def options(self, rank: int) -> MergeOptions:
        return MergeOptions(self.combination_type, rank, self.density, self.majority_sign_method, self.svd_clamp,
                            self.svd_full_matrices, self.svd_driver)


def _checked_request(adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp, svd_full_matrices,
                     svd_driver, density, majority_sign_method, seed) -> _Request:
    """The arguments, each checked (ValueError or TypeError naming it), with PEFT's rule applied that a single
    adapter merges ``linear`` whatever the type."""
    if isinstance(adapters, str) or not isinstance(adapters, Sequence) or not adapters \
            or not all(isinstance(a, str) and a for a in adapters):
        raise TypeError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    if isinstance(weights, (torch.Tensor,)) or type(weights).__module__ == "numpy":  # PEFT takes these too
        weights = weights.tolist() if getattr(weights, "ndim", 1) == 1 else weights
    if isinstance(weights, Sequence) and not isinstance(weights, str):
        weights = [w.item() if isinstance(w, torch.Tensor) and w.numel() == 1 else w for w in weights]
    if isinstance(weights, str) or not isinstance(weights, Sequence) or not all(map(_is_real, weights)):
        raise TypeError(f"weights must be a list of finite numbers, one per adapter, got {weights!r}")
    if len(weights) != len(adapters):
        raise ValueError(f"weights must have one number per adapter: adapters has {len(adapters)} "
                         f"({list(adapters)}), weights has {len(weights)}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    _check_adapter_name(adapter_name)  # (no '.': it names modules; PEFT's own error would come after changes)
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}; got {combination_type!r}")
    if svd_rank is not None and (not isinstance(svd_rank, numbers.Integral) or isinstance(svd_rank, bool)
                                 or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer or None, got {svd_rank!r}")
    if svd_clamp is not None and not (_is_real(svd_clamp) and 0 <= svd_clamp <= 1):
        raise ValueError(f"svd_clamp must be a quantile in [0, 1] or None, got {svd_clamp!r}")
    if not isinstance(svd_full_matrices, bool):
        raise TypeError(f"svd_full_matrices must be a bool, got {svd_full_matrices!r}")
    if svd_driver not in SVD_DRIVERS:
        raise ValueError(f"svd_driver must be one of {', '.join(map(repr, SVD_DRIVERS))}; got {svd_driver!r}")
    if density is not None and not (_is_real(density) and 0 < density <= 1):
        raise ValueError(f"density must be a number in (0, 1] (the fraction of values kept), got {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an integer or None, got {seed!r}")
    kind = "linear" if len(adapters) == 1 else combination_type
    if RULES.get(kind, (None,))[0] is not None and density is None:
        raise ValueError(f"combination_type {kind!r} prunes: give density, the fraction of values kept, in (0, 1]")
    return _Request(list(adapters), [float(w) for w in weights], adapter_name, kind,
                    None if svd_rank is None else int(svd_rank), None if density is None else float(density),
                    majority_sign_method, None if svd_clamp is None else float(svd_clamp), svd_full_matrices,
                    svd_driver, None if seed is None else int(seed))


@dataclass(frozen=True)
class _PeftRules:
    """What the installed PEFT's ``add_weighted_adapter`` does where its versions differ. From 0.22 the merged adapter
    has ``use_rslora=False`` (the sources' scales are folded into its factors, so its own scale is exactly 1) and
    ``lora_bias`` when any source has one (Σ wᵢ sᵢ bᵢ), and DoRA adapters are refused; before, it took the first
    adapter's ``use_rslora`` (scale √r with lora_alpha = r) and ``use_dora``, and merged no biases."""
    folds_rslora: bool
    refuses_dora: bool
    merges_bias: bool


@functools.cache
def _peft_rules() -> _PeftRules:
    from importlib.metadata import PackageNotFoundError, version
    try:
        major, minor = (int(p) for p in version("peft").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        major, minor = 0, 22  # no PEFT (or an odd version string): the newest rules
    new = (major, minor) >= (0, 22)
    return _PeftRules(folds_rslora=new, refuses_dora=new, merges_bias=new)


def _refuse_dora(names_dora: dict[str, bool]) -> None:
    """PEFT (from 0.22) does not merge DoRA adapters; its words, naming the first one."""
    if _peft_rules().refuses_dora:
        dora = [name for name, is_dora in names_dora.items() if is_dora]
        if dora:
            raise ValueError(f"add_weighted_adapter does not support DoRA (problematic adapter '{dora[0]}'), as PEFT "
                             "does not (nothing was changed)")


def _merged_rank(request: _Request, ranks: dict[str, int]) -> int:
    """PEFT's rank of the merged adapter from each adapter's rank: the common rank (factor types, which refuse
    unequal ranks), their sum (``cat``), or ``svd_rank`` / the largest (the SVD types)."""
    kind = request.combination_type
    if kind in FACTOR_TYPES:
        if len(set(ranks.values())) != 1:
            raise ValueError(f"combination_type {kind!r} merges A and B separately, so the adapters must have one "
                             f"rank; they have {ranks} (svd, cat and the *_svd types take unequal ranks)")
        return next(iter(ranks.values()))
    if kind == "cat":
        return sum(ranks[a] for a in request.adapters)
    return request.svd_rank or max(ranks.values())


class _Generators:
    """DARE's generator on each device: None (the default generators, as PEFT) without a seed, else one per device
    seeded with it (the merge then draws the same masks whatever the global state)."""

    def __init__(self, seed: int | None):
        self.seed, self.made = seed, {}

    def __call__(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self.made:
            self.made[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.made[device]


def _problems_error(what: str, problems: dict[str, str]) -> ValueError:
    listed = "; ".join(f"{name or '<model>'}: {why}" for name, why in problems.items())
    return ValueError(f"add_weighted_adapter: {what} (nothing was changed): {listed}")


def _rank_problems(request: _Request, rank: int, layer_ranks: dict[str, dict[str, int]]) -> dict[str, str]:
    """The layers where a factor type's adapters do not all have the merged rank (PEFT reads one rank per adapter;
    a rank pattern can give a layer another)."""
    if request.combination_type not in FACTOR_TYPES:
        return {}
    return {name: f"adapters of ranks {ranks}, the merged adapter's rank being {rank}"
            for name, ranks in layer_ranks.items() if any(r != rank for r in ranks.values())}


# ----------------------------------------------------------------------------------------------------------
# fastpeft's own models: LoraLinear layers.
# ----------------------------------------------------------------------------------------------------------

def _merge_fastpeft(model: nn.Module, request: _Request) -> None:
    """The merged adapter added to every LoraLinear holding any of the adapters (each layer merging those it holds,
    as PEFT merges a layer's), with PEFT's settings: the first adapter's dropout, rsLoRA and DoRA, lora_alpha = r, a
    DoRA magnitude as PEFT's initialisation leaves it (‖W‖ by row), frozen, not active. All layers' adapters are
    built and merged before the first is added."""
    layers = {"": model} if isinstance(model, LoraLinear) else lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: add_weighted_adapter takes a PEFT PeftModel or a model with "
                         "fastpeft LoRA layers (apply_lora, from_peft, load_adapter)")
    known = list(dict.fromkeys(n for layer in layers.values() for n in layer.adapters))
    unknown = [a for a in request.adapters if a not in known]
    if unknown:
        raise ValueError(f"adapters {unknown} are not adapters of the model (it has {known})")
    if request.adapter_name in known:
        raise ValueError(f"adapter_name {request.adapter_name!r} is an adapter of the model already; pick a new name")
    _check_adapter_name(request.adapter_name)
    held = {name: [a for a in request.adapters if a in layer.adapters] for name, layer in layers.items()}
    held = {name: names for name, names in held.items() if names}
    ranks = {a: max(layers[name].adapters[a].r for name in held if a in held[name]) for a in request.adapters}
    rank = _merged_rank(request, ranks)
    first = next(layers[name].adapters[request.adapters[0]] for name in held if request.adapters[0] in held[name])
    _refuse_dora({a: any(layers[name].adapters[a].use_dora for name in held if a in held[name])
                  for a in request.adapters})
    problems = _rank_problems(request, rank, {name: {a: layers[name].adapters[a].r for a in names}
                                              for name, names in held.items()})
    for name in held:
        if first.use_dora and layers[name].merged:  # DoRA's magnitude starts from the unmerged weight
            problems[name] = (f"adapter {layers[name].merged_adapter!r} is merged, and the merged adapter would be "
                              "DoRA (as the first adapter is): unmerge it first")
    if problems:
        raise _problems_error("the adapters cannot be merged here", problems)
    # PEFT's order: every layer's new adapter is made (drawing its initialisation's random numbers), then merged.
    built: dict[str, LoraAdapter] = {}
    for name in held:
        layer = layers[name]
        adapter = _new_adapter(layer.base_layer, rank, rank, first.lora_dropout,
                               first.use_rslora and not _peft_rules().folds_rslora, True, True, first.use_dora)
        built[name] = adapter.to(dtype=layer.adapters[held[name][0]].lora_A.dtype)
    generators = _Generators(request.seed)
    merged = {}
    for name in held:
        layer = layers[name]
        terms = [Term(layer.adapters[a].lora_A, layer.adapters[a].lora_B, layer.adapters[a].scaling, w)
                 for a, w in zip(request.adapters, request.weights, strict=True) if a in layer.adapters]
        merged[name] = merge_lora_factors(terms, request.options(rank), generators(terms[0].lora_A.device))
    with torch.no_grad():
        for name, (lora_A, lora_B) in merged.items():
            adapter = built[name]
            adapter.lora_A.copy_(lora_A)
            adapter.lora_B.copy_(lora_B)
            adapter.requires_grad_(False)
    for name, adapter in built.items():
        layers[name].adapters[request.adapter_name] = adapter


# ----------------------------------------------------------------------------------------------------------
# PEFT's models: the merged adapter made by PEFT's own code (inject_adapter), so its config, modules and state-dict
# keys are PEFT's; only its factors are computed here.
# ----------------------------------------------------------------------------------------------------------

def _peft_tuner(model: nn.Module):
    """The LoraModel inside a PEFT model (a PeftModel, or a LoraModel itself), or None for any other model (a
    PeftModel :func:`fastpeft.from_peft` converted holds fastpeft's layers)."""
    if not type(model).__module__.startswith("peft.") or vars(model).get("_fastpeft_converted", False):
        return None
    from peft import PeftModel
    from peft.tuners.ia3 import IA3Model
    from peft.tuners.lora import LoraModel
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, (LoraModel, IA3Model)):
        raise TypeError(f"add_weighted_adapter merges LoRA and (IA)³ adapters; this PEFT model's tuner is a "
                        f"{type(tuner).__name__} (use its own add_weighted_adapter)")
    return tuner


def _peft_factors(layer, name: str) -> tuple[Tensor, Tensor] | None:
    """The (A, B) parameters of adapter ``name`` in a PEFT LoRA layer (None where it has none)."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return None


def _peft_layer_problem(layer) -> str | None:
    """Why fastpeft does not merge a PEFT LoRA layer (None where it does): its delta must be (B·A)·s, or its
    transpose; PEFT's convolutions and others compute theirs otherwise."""
    from peft.tuners.lora.layer import Embedding, Linear
    kind = type(layer)
    if isinstance(layer, (Linear, Embedding)) or (kind.__module__ == "peft.tuners.lora.bnb"
                                                  and kind.__name__ in ("Linear8bitLt", "Linear4bit")):
        return None
    return (f"a {kind.__module__}.{kind.__qualname__} layer (fastpeft merges LoRA on linear and embedding layers; "
            "PeftModel.add_weighted_adapter merges the others)")


def _peft_new_config(tuner, request: _Request, rank: int):
    """The merged adapter's config as PEFT makes it: the first adapter's, with r = lora_alpha = the merged rank, the
    adapters' target modules joined, and no rank or alpha patterns."""
    configs = tuner.peft_config
    kinds = {type(configs[a].target_modules) for a in request.adapters}
    if len(kinds) > 1:
        raise ValueError("add_weighted_adapter: the adapters' target_modules mix regular expressions and name lists; "
                         "PEFT cannot join them into one (nothing was changed)")
    kind = kinds.pop()
    if kind is str:
        targets = "|".join(f"({configs[a].target_modules})" for a in request.adapters)
    elif kind is set:
        targets = reduce(operator.or_, (configs[a].target_modules for a in request.adapters))
    else:
        raise TypeError(f"add_weighted_adapter: the adapters' target_modules are {kind.__name__}, where PEFT keeps a "
                        "set or a regular expression")
    changes = dict(r=rank, lora_alpha=rank, target_modules=targets, alpha_pattern={}, rank_pattern={})
    if _peft_rules().folds_rslora:
        changes.update(use_rslora=False, lora_bias=any(configs[a].lora_bias for a in request.adapters))
    return dataclasses.replace(configs[request.adapters[0]], **changes)


def _check_peft_request(tuner, request: _Request) -> tuple[int, object, dict]:
    """Everything PEFT checks, and what would leave PEFT's merge half done, before the model changes. Returns the
    merged rank, the new config and the layers to merge (by module name)."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
    from peft.utils import ModulesToSaveWrapper
    configs = tuner.peft_config
    unknown = [a for a in request.adapters if a not in configs]
    if unknown:
        raise ValueError(f"adapters {unknown} are not adapters of the model (it has {list(configs)})")
    if request.adapter_name in configs:
        # (PEFT's own add_weighted_adapter returns silently here, leaving the existing adapter as it was)
        raise ValueError(f"adapter_name {request.adapter_name!r} is an adapter of the model already; pick a new name")
    for a in request.adapters:
        peft_type = getattr(configs[a].peft_type, "value", configs[a].peft_type)
        if peft_type != "LORA":
            raise ValueError(f"adapter {a!r} is a {peft_type} adapter; add_weighted_adapter merges LoRA adapters")
        if configs[a].target_parameters:
            raise ValueError(f"add_weighted_adapter does not merge adapters targeting nn.Parameter "
                             f"(target_parameters), as PEFT does not: adapter {a!r}")
        if configs[a].lora_bias and not _peft_rules().merges_bias:
            raise ValueError(f"adapter {a!r} has a LoRA bias (lora_bias=True), which this PEFT version's merge "
                             "leaves out; PEFT 0.22 and later merge it (nothing was changed)")
    _refuse_dora({a: bool(configs[a].use_dora) for a in request.adapters})
    shared = [m for m in tuner.modules() if isinstance(m, ModulesToSaveWrapper)
              and sum(a in m.modules_to_save for a in request.adapters) > 1]
    if shared:
        raise ValueError(f"add_weighted_adapter: {len(shared)} modules_to_save module(s) belong to several of the "
                         "adapters, which cannot be merged (as PEFT refuses)")
    ranks = {a: max([configs[a].r, *configs[a].rank_pattern.values()]) for a in request.adapters}
    rank = _merged_rank(request, ranks)
    config = _peft_new_config(tuner, request, rank)
    layers, problems, layer_ranks = {}, {}, {}
    for key, module in tuner.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        held = {a: f for a in request.adapters if (f := _peft_factors(module, a)) is not None}
        if not held:
            continue
        if (problem := _peft_layer_problem(module)) is not None:
            problems[key] = problem
        layers[key] = module
        layer_ranks[key] = {a: factors[0].shape[0] for a, factors in held.items()}
    problems.update(_rank_problems(request, rank, layer_ranks))
    # Every module the new config targets gets the merged adapter, and must hold one of the adapters to merge there
    # (PEFT would inject the adapter first and fail after, leaving it half added).
    wrapped = [key + "." for key, m in tuner.model.named_modules() if isinstance(m, BaseTunerLayer)]
    for key, _ in tuner.model.named_modules():
        if not key or key in layers or any(key.startswith(prefix) for prefix in wrapped):
            continue
        found = check_target_module_exists(config, key)
        if found and not isinstance(found, _ExcludedModule):
            problems[key] = ("the merged adapter's target_modules select it, but it holds none of the adapters "
                             "(their configs differ in layers_to_transform, exclude_modules or the like)")
    if problems:
        raise _problems_error("the adapters cannot be merged in these layers", problems)
    return rank, config, layers


def _merge_peft(tuner, request: _Request) -> None:
    """The merged adapter made by PEFT's ``inject_adapter`` from PEFT's new config, then each layer's factors
    computed here in PEFT's order (so DARE draws what PEFT draws); any failure takes the adapter out again."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .peft_fuse import _fuse_layers, _FusedForward
    rank, config, layers = _check_peft_request(tuner, request)
    name = request.adapter_name
    before = {
        "layers": {id(m) for m in tuner.model.modules() if isinstance(m, BaseTunerLayer)},
        "targeted": list(getattr(tuner, "targeted_module_names", [])),
        "grad": [(p, p.requires_grad) for p in tuner.parameters()],
    }
    try:
        tuner.peft_config[name] = config
        tuner.inject_adapter(tuner.model, name)
        for module in tuner.model.modules():  # the merged adapter frozen (its own tensors, found by container)
            if isinstance(module, LoraLayer):
                for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
                    container = getattr(module, attr, {})
                    if name in container:
                        container[name].requires_grad_(False)
        generators = _Generators(request.seed)
        for key, module in tuner.model.named_modules():
            target = _peft_factors(module, name) if isinstance(module, LoraLayer) else None
            if target is None:
                continue
            if key not in layers:
                raise ValueError(f"add_weighted_adapter: PEFT put the merged adapter on {key}, which holds none of "
                                 "the adapters (nothing was changed)")
            terms = [Term(*factors, module.scaling[a], w)
                     for a, w in zip(request.adapters, request.weights, strict=True)
                     if (factors := _peft_factors(module, a)) is not None]
            transposed = bool(getattr(module, "fan_in_fan_out", False)) or name in module.lora_embedding_A
            lora_A, lora_B = merge_lora_factors(terms, request.options(rank), generators(target[0].device),
                                                transposed)
            with torch.no_grad():
                target[0].copy_(lora_A)
                target[1].copy_(lora_B)
                if module.lora_bias.get(name):  # PEFT (from 0.22): Σ wᵢ sᵢ bᵢ, apart from the factors
                    bias = torch.zeros_like(module.lora_B[name].bias)
                    for a, w in zip(request.adapters, request.weights, strict=True):
                        if a in module.lora_B and module.lora_bias.get(a):
                            bias += w * module.scaling[a] * module.lora_B[a].bias
                    module.lora_B[name].bias.copy_(bias)
    except BaseException:
        _take_out(tuner, name, before)
        raise
    if any(isinstance(vars(m).get("forward"), _FusedForward) for m in tuner.modules()):
        _fuse_layers(tuner)  # a fused model's layers run the merged adapter fused, as any adapter added to them


def _take_out(tuner, name: str, before: dict) -> None:
    """Undo a failed merge: the adapter out of every layer, layers PEFT wrapped for it unwrapped, its config, the
    targeted names and every parameter's requires_grad as they were."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    try:
        for key, module in list(tuner.model.named_modules()):
            if not isinstance(module, BaseTunerLayer):
                continue
            if id(module) not in before["layers"]:
                parent, _, child = key.rpartition(".")
                setattr(tuner.model.get_submodule(parent) if parent else tuner.model, child, module.get_base_layer())
            else:
                try:  # (a layer PEFT failed on may hold none of it)
                    module.delete_adapter(name)
                except (KeyError, AttributeError, ValueError):
                    pass
    finally:  # the rest whatever a layer did: the caller re-raises the failure that brought us here
        tuner.peft_config.pop(name, None)
        if hasattr(tuner, "targeted_module_names"):
            tuner.targeted_module_names[:] = before["targeted"]
        for param, flag in before["grad"]:
            param.requires_grad_(flag)


# ----------------------------------------------------------------------------------------------------------
# (IA)³: a weighted sum of vectors, as PEFT's IA3Model.add_weighted_adapter (which takes no combination type).
# ----------------------------------------------------------------------------------------------------------

def _check_ia3_request(request: _Request, combination_type: str) -> None:
    """(IA)³ merges linearly: the LoRA types' options are refused rather than ignored (the default type is let be)."""
    given = {"svd_rank": request.svd_rank, "svd_clamp": request.svd_clamp, "density": request.density,
             "seed": request.seed, "svd_driver": request.svd_driver}
    given = [name for name, value in given.items() if value is not None]
    given += ["majority_sign_method"] if request.majority_sign_method != "total" else []
    given += ["svd_full_matrices"] if request.svd_full_matrices is not True else []
    if combination_type not in ("linear", "svd") or given:
        what = [f"combination_type={combination_type!r}"] if combination_type not in ("linear", "svd") else []
        raise ValueError(f"(IA)³ adapters merge linearly, as PEFT's IA3 does (the new vector is Σ wᵢ lᵢ): "
                         f"{', '.join(what + [f'{n} given' for n in given])} does not apply (use "
                         "combination_type='linear' and leave the SVD and pruning options out)")


def _merge_fastpeft_ia3(layers: dict[str, Ia3Linear], request: _Request) -> None:
    """The merged vector, Σ wᵢ lᵢ over the adapters each layer holds (in fp32, then the first one's dtype), added
    frozen and not active to every Ia3Linear holding any of them; all built before the first is added."""
    known = list(dict.fromkeys(n for layer in layers.values() for n in layer.ia3_l))
    if request.adapter_name in known:
        raise ValueError(f"adapter_name {request.adapter_name!r} is an adapter of the model already; pick a new name")
    _check_adapter_name(request.adapter_name)
    built = {}
    for name, layer in layers.items():
        held = [(layer.ia3_l[a], w) for a, w in zip(request.adapters, request.weights, strict=True)
                if a in layer.ia3_l]
        if not held:
            continue
        total = sum(v.detach().float() * w for v, w in held)
        built[name] = torch.nn.Parameter(total.to(held[0][0].dtype), requires_grad=False)
    for name, vector in built.items():
        layers[name].ia3_l[request.adapter_name] = vector


def _merge_peft_ia3(tuner, request: _Request) -> None:
    """PEFT's own IA3 merge (its config, its layers, its sums), after fastpeft's checks, which refuse what PEFT lets
    pass (an existing name, where PEFT returns silently; an unknown adapter); a failure takes the adapter out again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .peft_fuse import _fuse_layers, _FusedForward
    unknown = [a for a in request.adapters if a not in tuner.peft_config]
    if unknown:
        raise ValueError(f"adapters {unknown} are not adapters of the model (it has {list(tuner.peft_config)})")
    if request.adapter_name in tuner.peft_config:
        raise ValueError(f"adapter_name {request.adapter_name!r} is an adapter of the model already; pick a new name")
    before = {"layers": {id(m) for m in tuner.model.modules() if isinstance(m, BaseTunerLayer)},
              "targeted": list(getattr(tuner, "targeted_module_names", [])),
              "grad": [(p, p.requires_grad) for p in tuner.parameters()]}
    try:
        tuner.add_weighted_adapter(request.adapters, request.weights, request.adapter_name)
    except BaseException:
        _take_out(tuner, request.adapter_name, before)
        raise
    if any(isinstance(vars(m).get("forward"), _FusedForward) for m in tuner.modules()):
        _fuse_layers(tuner)


def _model_kind(model: nn.Module, adapters: list[str]) -> str:
    """"ia3" where every named adapter is held by (IA)³ layers and none by LoRA layers, else "lora"."""
    in_ia3 = {n for layer in ia3_layers(model).values() for n in layer.ia3_l}
    in_lora = {n for layer in lora_layers(model).values() for n in layer.adapters}
    if isinstance(model, Ia3Linear):
        in_ia3 = set(model.ia3_l)
    if any(a in in_ia3 for a in adapters):
        unknown = [a for a in adapters if a not in in_ia3 and a not in in_lora]
        if unknown:
            raise ValueError(f"adapters {unknown} are not adapters of the model (its (IA)³ adapters: "
                             f"{sorted(in_ia3)})")
        both = [a for a in adapters if a in in_lora or a not in in_ia3]
        if both:
            ia3 = sorted(set(adapters) - set(both))
            raise ValueError(f"adapters {both} are not (IA)³ adapters of the model while {ia3} are: LoRA and (IA)³ "
                             "adapters cannot be merged into one (and every adapter must exist)")
        return "ia3"
    return "lora"


# ----------------------------------------------------------------------------------------------------------
# The public function.
# ----------------------------------------------------------------------------------------------------------

def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp: float | None = None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total", *,
                         seed: int | None = None) -> nn.Module:
    """Add adapter ``adapter_name``, the merge of ``adapters`` with ``weights``, to ``model``: HF PEFT's
    ``add_weighted_adapter``, with its arguments and results, on a PEFT ``PeftModel`` (fused or not) and on models
    with fastpeft LoRA layers (``apply_lora``, ``from_peft``, ``load_adapter``). Returns ``model``.

    ``combination_type``: one of :data:`COMBINATION_TYPES` (module docstring: what each computes); a single adapter
    merges ``linear``, as in PEFT. ``svd_rank``: the merged rank of the SVD types (default: the largest of the
    adapters' ranks); ``svd_clamp``: PEFT's quantile clamp of the SVD factors; ``svd_full_matrices``, ``svd_driver``:
    how PEFT's full SVD runs (the fast SVD is exact without them). ``density`` in (0, 1]: the fraction kept by the
    pruning types (``ties*``, ``dare_*``, ``magnitude_prune*``); ``majority_sign_method``: TIES' sign election,
    "total" or "frequency". ``seed``: DARE's random numbers from a generator seeded with it; None draws from torch's
    default generator, exactly what PEFT draws after the same ``torch.manual_seed``.

    On a PeftModel the adapter is created by PEFT's own code from the config PEFT would make (the first adapter's,
    r = lora_alpha = the merged rank, the adapters' target modules joined), so its modules, parameter names and
    state-dict keys are PEFT's, and ``save_pretrained`` writes it as any other; on a fused model it runs fused. On a
    fastpeft model each LoraLinear that holds any of the adapters gets it, and ``save_adapter`` writes it. As in
    PEFT the merged adapter is frozen and not made active, each layer merges the adapters it holds, and with use_dora
    its magnitude is left as PEFT's initialisation makes it.

    (IA)³ adapters (a PEFT IA3 model, or fastpeft's Ia3Linear layers) merge linearly, as PEFT's IA3 does: each layer
    holding any of the adapters gets Σ wᵢ lᵢ over those it holds; ``combination_type`` is then "linear" (or left at
    its default) and the SVD and pruning options are refused.

    Refused, with the model unchanged (ValueError or TypeError naming the argument): an unknown adapter, an
    ``adapter_name`` in use (PEFT returns silently there), weights not one per adapter, an unknown type, a missing
    or out-of-range density, unequal ranks for the types merging A and B separately, layers PEFT cannot merge this
    way (convolutions), and anything PEFT refuses. The operation is all or nothing: every layer is merged before the
    adapter is kept, and a failure anywhere leaves no layer with it.
    """
    request = _checked_request(adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                               svd_full_matrices, svd_driver, density, majority_sign_method, seed)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a PeftModel or a model with fastpeft LoRA layers), got "
                        f"{type(model).__name__}")
    tuner = _peft_tuner(model)
    if tuner is not None:
        from peft.tuners.ia3 import IA3Model
        if isinstance(tuner, IA3Model):
            _check_ia3_request(request, combination_type)
            _merge_peft_ia3(tuner, request)
        else:
            _merge_peft(tuner, request)
        return model
    model_ = unwrap_converted(model)
    if _model_kind(model_, request.adapters) == "ia3":
        _check_ia3_request(request, combination_type)
        _merge_fastpeft_ia3({"": model_} if isinstance(model_, Ia3Linear) else ia3_layers(model_), request)
    else:
        _merge_fastpeft(model_, request)
    return model
