"""fastpeft.add_weighted_adapter is PEFT's add_weighted_adapter: every combination type gives PEFT's merged deltas on
fresh random adapters (random A and B; equal and unequal ranks; rsLoRA and DoRA; fan_in_fan_out and embedding layers),
on PeftModels fused or not and on fastpeft's models; DARE draws PEFT's random numbers; the chunked passes and the
low-rank SVD equal the whole-matrix reference; a merged adapter saves and loads as any other; bad input is refused
before anything changes, and a failure part-way leaves no layer with the adapter."""
import copy
import math

import pytest
import torch
from conftest import TRITON_DEVICE, needs_triton, rel_err, tiny_llama
from torch import nn

import fastpeft
from fastpeft import merging
from fastpeft.ops import merging as ops

peft = pytest.importorskip("peft")

WEIGHTS = [0.6, -0.3, 0.9]
ADAPTERS = ["a0", "a1", "a2"]
PRUNING = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune",
           "magnitude_prune_svd"}
# fp32 budgets on a merged delta ‖ΔW − ΔW_peft‖ / ‖ΔW_peft‖: the same operations as PEFT's, in its order, give its
# bits or one rounding off; several row chunks sum each chunk's stack, PEFT the whole stack; the low-rank SVD is
# another algorithm for the same truncation.
EXACT, CHUNKED, SVD = 1e-6, 1e-5, 1e-5


def type_kwargs(kind, density=0.6):
    return {"density": density} if kind in PRUNING else {}


class Net(nn.Module):
    """Odd shapes on purpose: q 24 -> 40, v 40 -> 17, an embedding 30 x 12 and a GPT-2 Conv1D 20 -> 36 (whose weight
    is stored transposed: PEFT's fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.q, self.v, self.e, self.c = nn.Linear(24, 40), nn.Linear(40, 17), nn.Embedding(30, 12), Conv1D(36, 20)

    def forward(self, x):
        return self.v(self.q(x))


def peft_model(ranks=(4, 4, 4), targets=("q", "v"), **config):
    """A PeftModel over a Net with adapters a0, a1, a2 of ``ranks`` (alpha 2r, 3r, 4r), every A and B drawn afresh
    (PEFT's B starts at zero), so no merged delta is trivial. DoRA magnitudes are PEFT's start, ‖W‖ by row."""
    torch.manual_seed(0)
    model = None
    for i, r in enumerate(ranks):
        lora = peft.LoraConfig(r=r, lora_alpha=(i + 2) * r, target_modules=list(targets), **config)
        if model is None:
            model = peft.get_peft_model(Net(), lora, adapter_name="a0")
        else:
            model.add_adapter(f"a{i}", lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                p.normal_(0, 0.3)
    return model


def deltas(model, name):
    """Each layer's delta of adapter ``name``, s·BA (N, K), by module name (PeftModel or fastpeft model)."""
    found = {}
    for key, m in model.named_modules():
        if isinstance(m, fastpeft.LoraLinear) and name in m.adapters:
            found[key.removeprefix("base_model.model.")] = m.adapters[name].delta_weight()
        elif hasattr(m, "get_delta_weight") and (name in getattr(m, "lora_A", {})
                                                 or name in getattr(m, "lora_embedding_A", {})):
            delta = m.get_delta_weight(name)
            transposed = getattr(m, "fan_in_fan_out", False) or name in m.lora_embedding_A
            found[key.removeprefix("base_model.model.")] = delta.T if transposed else delta
    return found


def assert_deltas_close(got, want, tolerance):
    assert got.keys() == want.keys() and want
    for key in want:
        assert rel_err(got[key], want[key]) <= tolerance, (key, rel_err(got[key], want[key]))


def twins(kind, ranks=(4, 4, 4), **config):
    """A PeftModel for PEFT's merge and a copy for fastpeft's: a PeftModel as it is, fused, or converted to fastpeft's
    layers (``from_peft``)."""
    reference = peft_model(ranks, **config)
    ours = copy.deepcopy(reference)
    if kind == "fused":
        fastpeft.fuse(ours)
    elif kind == "fastpeft":
        ours = fastpeft.from_peft(ours)
    return reference, ours


def both_merge(reference, ours, kind, seed=7, **kwargs):
    torch.manual_seed(seed)
    reference.add_weighted_adapter(ADAPTERS, WEIGHTS, "m", combination_type=kind, **kwargs)
    torch.manual_seed(seed)
    assert fastpeft.add_weighted_adapter(ours, ADAPTERS, WEIGHTS, "m", combination_type=kind, **kwargs) is ours


def type_cases():
    for kind in ops.COMBINATION_TYPES:
        yield pytest.param(kind, (4, 4, 4), id=f"{kind}-r4-4-4")
        if kind not in ops.FACTOR_TYPES:  # PEFT's linear, ties, dare_* and magnitude_prune need one rank
            yield pytest.param(kind, (4, 6, 3), id=f"{kind}-r4-6-3")


@pytest.mark.parametrize("kind,ranks", list(type_cases()))
def test_every_type_gives_peft_s_adapter_on_a_peft_model(kind, ranks):
    reference, ours = twins("peft", ranks)
    both_merge(reference, ours, kind, **type_kwargs(kind))
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), SVD if kind == "svd" else EXACT)
    # PEFT's own adapter: its config, modules, names, shapes, frozen and inactive.
    assert ours.peft_config["m"] == reference.peft_config["m"]
    want, got = reference.state_dict(), ours.state_dict()
    assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".m." in n)
    assert ours.active_adapters == reference.active_adapters == ["a0"]


@pytest.mark.parametrize("model_kind", ["fused", "fastpeft"])
@pytest.mark.parametrize("kind", ops.COMBINATION_TYPES)
def test_every_type_gives_peft_s_deltas_on_fused_and_fastpeft_models(model_kind, kind):
    reference, ours = twins(model_kind, (4, 4, 4) if kind in ops.FACTOR_TYPES else (4, 6, 3))
    if model_kind == "fastpeft" and kind.startswith("dare"):
        # fastpeft's layers draw another initialisation than PEFT's, so the global generator differs after it:
        # PEFT's numbers come with a PeftModel; here a seed makes the merge reproducible.
        both_merge(reference, ours, kind, density=0.6, seed=7)
        again = copy.deepcopy(ours)
        merging.add_weighted_adapter(again, ADAPTERS, WEIGHTS, "n", combination_type=kind, density=0.6, seed=5)
        merging.add_weighted_adapter(again, ADAPTERS, WEIGHTS, "o", combination_type=kind, density=0.6, seed=5)
        assert_deltas_close(deltas(again, "o"), deltas(again, "n"), 0.0)
        return
    both_merge(reference, ours, kind, **type_kwargs(kind))
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), SVD if kind == "svd" else EXACT)


@pytest.mark.parametrize("config", [{"use_rslora": True}, {"use_dora": True}], ids=["rslora", "dora"])
@pytest.mark.parametrize("model_kind", ["peft", "fastpeft"])
@pytest.mark.parametrize("kind", ["svd", "cat", "ties", "magnitude_prune_svd"])
def test_rslora_and_dora_adapters_merge_as_peft_merges_them(config, model_kind, kind):
    """As the installed PEFT does. From 0.22 the merged adapter has use_rslora=False (scale 1: the sources' scales are
    in its factors) and DoRA adapters are refused, by both in PEFT's words, the model unchanged; before, it took the
    first adapter's use_rslora (lora_alpha = r: scale √r) and use_dora (its magnitude left at its initialisation,
    ‖W‖ by row)."""
    reference, ours = twins(model_kind, **config)
    if config.get("use_dora") and merging._peft_rules().refuses_dora:
        before = snapshot(ours)
        with pytest.raises(ValueError, match="does not support DoRA"):
            reference.add_weighted_adapter(ADAPTERS, WEIGHTS, "m", combination_type=kind, **type_kwargs(kind))
        with pytest.raises(ValueError, match=r"does not support DoRA \(problematic adapter 'a0'\)"):
            fastpeft.add_weighted_adapter(ours, ADAPTERS, WEIGHTS, "m", combination_type=kind, **type_kwargs(kind))
        assert_unchanged(ours, before)
        return
    both_merge(reference, ours, kind, seed=3, **type_kwargs(kind))
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), SVD if kind == "svd" else EXACT)
    for key in ("q", "v"):
        want = reference.base_model.model.get_submodule(key)
        got = ours.get_submodule(key if model_kind == "fastpeft" else f"base_model.model.{key}")
        if model_kind == "fastpeft":
            scaling, magnitude = got.adapters["m"].scaling, got.adapters["m"].lora_magnitude_vector
        else:
            scaling = got.scaling["m"]
            magnitude = got.lora_magnitude_vector["m"].weight if "m" in got.lora_magnitude_vector else None
        assert scaling == want.scaling["m"]
        if config.get("use_dora"):
            torch.testing.assert_close(magnitude, want.lora_magnitude_vector["m"].weight)
            torch.testing.assert_close(magnitude, want.get_base_layer().weight.norm(dim=1))


@pytest.mark.parametrize("kind", ["svd", "linear", "ties_svd", "dare_ties_svd", "dare_linear", "magnitude_prune_svd"])
@pytest.mark.parametrize("targets", [("e", "q"), ("c",)], ids=["embedding", "fan_in_fan_out"])
def test_embedding_and_fan_in_fan_out_layers_merge_as_peft_merges_them(kind, targets, monkeypatch):
    """PEFT forms these deltas transposed: its magnitude pruning and DARE's masks run in that layout."""
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 64)  # several chunks even here
    config = {"fan_in_fan_out": True} if targets == ("c",) else {}
    reference = peft_model(targets=targets, **config)
    ours = copy.deepcopy(reference)
    both_merge(reference, ours, kind, **type_kwargs(kind, 0.4))
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), SVD if kind == "svd" else CHUNKED)


@pytest.mark.parametrize("kind", ["dare_linear_svd", "dare_ties_svd", "dare_linear", "dare_ties"])
def test_dare_draws_peft_s_random_numbers_over_several_chunks(kind, monkeypatch):
    """Under the same torch.manual_seed: PEFT's masks, whole tensor by whole tensor, although fastpeft's pass reads
    them a row chunk at a time with the adapters interleaved; the generator ends where PEFT's does."""
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 64)
    reference, ours = twins("peft")
    both_merge(reference, ours, kind, density=0.3)
    after = torch.rand(4)
    torch.manual_seed(7)
    reference.delete_adapter("m")
    reference.add_weighted_adapter(ADAPTERS, WEIGHTS, "m", combination_type=kind, density=0.3)
    assert torch.equal(torch.rand(4), after)
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), CHUNKED)


def test_dare_keeps_a_density_fraction_rescaled_and_a_seed_reproduces_it():
    ones = torch.ones(64, 50)
    draws = []
    for seed in (4, 4, 5):
        out = torch.empty(64, 50)
        ops.merge_elementwise(lambda i, r0, r1: ones[r0:r1], 1, out, "dare_linear", [1.0], density=0.3,
                              generator=torch.Generator().manual_seed(seed))
        draws.append(out)
    kept = draws[0] != 0
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert torch.equal(draws[0][kept], torch.full_like(draws[0][kept], 1 / 0.3))  # kept values rescaled by 1/density
    assert abs(kept.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / kept.numel())


# ----------------------------------------------------------------------------------------------------------
# The tensor level: the chunked passes and the low-rank SVD against the whole-matrix reference.
# ----------------------------------------------------------------------------------------------------------

def terms(ranks, n=37, k=29, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [ops.Term(torch.randn(r, k, generator=g, dtype=dtype), torch.randn(n, r, generator=g, dtype=dtype),
                     0.5 + i, w) for i, (r, w) in enumerate(zip(ranks, [0.7, -0.4, 1.1, 0.25], strict=False))]


@pytest.mark.parametrize("kind", ops.COMBINATION_TYPES)
def test_chunked_passes_equal_the_reference(kind, monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 100)
    parts = terms((3, 3, 3, 3) if kind in ops.FACTOR_TYPES else (3, 5, 2, 4))
    rank = 3 if kind in ops.FACTOR_TYPES else 14 if kind == "cat" else 6
    options = ops.MergeOptions(kind, rank, density=0.45 if kind in PRUNING else None)
    lora_A, lora_B = ops.merge_lora_factors(parts, options, generator=torch.Generator().manual_seed(1))
    want = ops.merge_reference(parts, options, generator=torch.Generator().manual_seed(1))
    assert lora_A.shape == (rank, 29) and lora_B.shape == (37, rank)
    assert rel_err(lora_B @ lora_A, want) < 1e-12


@pytest.mark.parametrize("n,k,ranks,rank", [
    pytest.param(300, 200, (16, 16, 16, 16), 16, id="N300-K200-r16x4-rank16"),
    pytest.param(37, 29, (3, 5, 2), 4, id="N37-K29-r3-5-2-rank4"),
    pytest.param(37, 29, (3, 5, 2), 10, id="N37-K29-r3-5-2-rank10-whole"),
    pytest.param(6, 50, (4, 4), 8, id="N6-K50-rank-above-N"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_lowrank_svd_is_the_truncated_svd_of_the_sum(n, k, ranks, rank, dtype):
    parts = terms(ranks, n, k, dtype)
    lora_A, lora_B = ops.lowrank_svd(parts, rank)
    assert lora_A.shape == (rank, k) and lora_B.shape == (n, rank) and lora_A.dtype == dtype
    # (the weights rounded to float32, as PEFT's torch.tensor(weights) rounds them)
    total = sum(float(torch.tensor(t.weight)) * t.scaling * (t.lora_B.double() @ t.lora_A.double()) for t in parts)
    u, s, vh = torch.linalg.svd(total)
    kept = min(rank, s.numel())
    want = (u[:, :kept] * s[:kept]) @ vh[:kept]
    assert rel_err(lora_B @ lora_A, want) < (1e-12 if dtype == torch.float64 else 1e-5)
    torch.testing.assert_close(torch.linalg.svdvals(lora_B.double() @ lora_A.double())[:min(rank, n, k)],
                               s[:min(rank, n, k)], rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-9)


def test_a_magnitude_threshold_with_ties_keeps_exactly_k_in_row_order(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK_ELEMENTS", 8)  # chunks of 8 rows: the ties run over several
    values = torch.tensor([[3.0, -2.0, 2.0, 1.0], [2.0, -2.0, 0.5, 4.0], [1.0, 2.0, 0.0, -3.0]] * 13)
    out = torch.empty_like(values)
    ops.merge_elementwise(lambda i, r0, r1: values[r0:r1], 1, out, "magnitude_prune", [1.0], density=0.5)
    above = values.abs() > 2
    ties_kept = int(0.5 * values.numel()) - int(above.sum())
    tie = (values.abs() == 2).flatten()
    first_ties = tie & (tie.cumsum(0) <= ties_kept)
    assert torch.equal(out != 0, above | first_ties.view(values.shape))
    assert torch.equal(out[out != 0], values[out != 0])


# ----------------------------------------------------------------------------------------------------------
# svd_rank, svd_clamp, svd_full_matrices, svd_driver.
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    pytest.param({"svd_rank": 2}, id="rank2"),
    pytest.param({"svd_rank": 14}, id="rank14-above-the-sum-s-12"),
    pytest.param({"svd_clamp": 0.9}, id="clamp0.9"),
    pytest.param({"svd_rank": 3, "svd_clamp": 0.7, "svd_full_matrices": False}, id="rank3-clamp0.7-reduced"),
    pytest.param({"svd_full_matrices": False}, id="reduced"),
])
@pytest.mark.parametrize("kind", ["svd", "ties_svd"])
def test_svd_settings_give_peft_s_result(kwargs, kind):
    reference, ours = twins("peft")
    both_merge(reference, ours, kind, **kwargs, **type_kwargs(kind))
    exact = kind != "svd" or "svd_clamp" in kwargs  # a clamp runs PEFT's full SVD on PEFT's matrix
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), EXACT if exact else SVD)


def test_svd_rank_above_a_layer_s_size_keeps_the_whole_sum_at_the_configured_rank():
    """PEFT fails here (full_matrices: a shape mismatch) or leaves factors of another rank than its config's;
    fastpeft pads with zeros, so the adapter is its config's and its delta the whole weighted sum."""
    _, ours = twins("peft")
    fastpeft.add_weighted_adapter(ours, ADAPTERS, WEIGHTS, "m", svd_rank=30)
    q = ours.base_model.model.q
    assert q.lora_A["m"].weight.shape == (30, 24) and q.lora_B["m"].weight.shape == (40, 30)
    total = sum(w * q.get_delta_weight(a) for a, w in zip(ADAPTERS, WEIGHTS, strict=True))
    assert rel_err(q.get_delta_weight("m"), total) < SVD


def test_svd_driver_only_changes_how_a_cuda_svd_runs():
    reference, ours = twins("peft")
    both_merge(reference, ours, "svd")
    fastpeft.add_weighted_adapter(ours, ADAPTERS, WEIGHTS, "d", svd_driver="gesvd")  # PEFT refuses it on a CPU
    assert_deltas_close(deltas(ours, "d"), deltas(reference, "m"), SVD)


def test_one_adapter_merges_linear_as_in_peft():
    reference, ours = twins("peft", (4, 6, 3))
    torch.manual_seed(0)
    reference.add_weighted_adapter(["a1"], [0.5], "m", combination_type="ties_svd", svd_rank=2)
    fastpeft.add_weighted_adapter(ours, ["a1"], [0.5], "m", combination_type="ties_svd", svd_rank=2)
    assert ours.peft_config["m"].r == reference.peft_config["m"].r == 6
    assert_deltas_close(deltas(ours, "m"), deltas(reference, "m"), EXACT)


# ----------------------------------------------------------------------------------------------------------
# A merged adapter is an ordinary adapter: files, fused runs.
# ----------------------------------------------------------------------------------------------------------

LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj"]


def llama_with_adapters(config=None):
    torch.manual_seed(1)
    model = None
    for name in ("t1", "t2"):
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, **(config or {}))
        if model is None:
            model = peft.get_peft_model(tiny_llama(), lora, adapter_name=name)
        else:
            model.add_adapter(name, lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("model_kind", ["peft", "fused", "fastpeft"])
@pytest.mark.parametrize("kind,config", [("svd", {}), ("ties_svd", {}), ("cat", {"use_dora": True})],
                         ids=["svd", "ties_svd", "cat-dora"])
def test_a_merged_adapter_saves_as_peft_s_files_and_peft_loads_it_to_the_same_logits(model_kind, kind, config,
                                                                                        tmp_path):
    if config.get("use_dora") and merging._peft_rules().refuses_dora:
        pytest.skip("this PEFT refuses to merge DoRA adapters (test_rslora_and_dora_adapters_merge_as_peft_merges_"
                    "them checks fastpeft refuses them too)")
    model = llama_with_adapters(config)
    if model_kind == "fused":
        fastpeft.fuse(model)
    elif model_kind == "fastpeft":
        model = fastpeft.from_peft(model)
    fastpeft.add_weighted_adapter(model, ["t1", "t2"], [0.7, 0.5], "merged", combination_type=kind, density=0.5)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    if model_kind == "fastpeft":
        fastpeft.set_adapter(model, "merged")
        fastpeft.save_adapter(model, tmp_path, adapter_name="merged")
        folder = tmp_path
    else:
        model.set_adapter("merged")
        model.save_pretrained(str(tmp_path), selected_adapters=["merged"])
        folder = tmp_path / "merged"
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(folder)).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert loaded.peft_config["default"].r == (8 if kind == "cat" else 4)


def test_on_a_fused_model_the_merged_adapter_runs_fused_with_peft_s_outputs():
    reference = llama_with_adapters({} if merging._peft_rules().refuses_dora else {"use_dora": True})
    fused = fastpeft.fuse(copy.deepcopy(reference))
    reference.add_weighted_adapter(["t1", "t2"], [0.7, 0.5], "merged", combination_type="svd")
    fastpeft.add_weighted_adapter(fused, ["t1", "t2"], [0.7, 0.5], "merged", combination_type="svd")
    for model in (reference, fused):
        model.set_adapter("merged")
    assert set(fastpeft.fuse_report(fused).values()) == {None}
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(input_ids=ids).logits, reference.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Refusals, all or nothing.
# ----------------------------------------------------------------------------------------------------------

def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()],
            list(getattr(model, "peft_config", {})))


def assert_unchanged(model, before):
    tensors, grads, types, configs = snapshot(model)
    assert tensors.keys() == before[0].keys() and all(torch.equal(tensors[k], before[0][k]) for k in tensors)
    assert (grads, types, configs) == before[1:]


BAD = [
    ({"adapters": []}, TypeError, "adapters must be a non-empty list"),
    ({"adapters": "a0"}, TypeError, "adapters must be a non-empty list"),
    ({"adapters": ["a0", "nope"], "weights": [1.0, 1.0]}, ValueError, "adapters ['nope'] are not adapters"),
    ({"weights": [1.0, 2.0]}, ValueError, "weights must have one number per adapter: adapters has 3"),
    ({"weights": [1.0, "2", 3.0]}, TypeError, "weights must be a list of finite numbers"),
    ({"weights": [1.0, math.nan, 3.0]}, TypeError, "weights must be a list of finite numbers"),
    ({"adapter_name": "a1"}, ValueError, "adapter_name 'a1' is an adapter of the model already"),
    ({"adapter_name": ""}, TypeError, "adapter_name must be a non-empty string"),
    ({"combination_type": "mean"}, ValueError, "combination_type must be one of svd, linear, cat"),
    ({"combination_type": "ties"}, ValueError, "combination_type 'ties' prunes: give density"),
    ({"combination_type": "dare_linear_svd"}, ValueError, "combination_type 'dare_linear_svd' prunes: give density"),
    ({"combination_type": "ties", "density": 0.0}, ValueError, "density must be a number in (0, 1]"),
    ({"combination_type": "ties", "density": 1.5}, ValueError, "density must be a number in (0, 1]"),
    ({"combination_type": "ties", "density": math.nan}, ValueError, "density must be a number in (0, 1]"),
    ({"combination_type": "linear", "ranks": (4, 6, 3)}, ValueError, "'linear' merges A and B separately, so the "
                                                                     "adapters must have one rank"),
    ({"combination_type": "dare_ties", "density": 0.5, "ranks": (4, 6, 3)}, ValueError, "must have one rank"),
    ({"svd_rank": 0}, ValueError, "svd_rank must be a positive integer or None"),
    ({"svd_clamp": 1.5}, ValueError, "svd_clamp must be a quantile in [0, 1]"),
    ({"svd_full_matrices": 1}, TypeError, "svd_full_matrices must be a bool"),
    ({"svd_driver": "gesdd"}, ValueError, "svd_driver must be one of None, 'gesvd'"),
    ({"majority_sign_method": "mean"}, ValueError, "majority_sign_method must be 'total' or 'frequency'"),
    ({"seed": 1.5}, TypeError, "seed must be an integer or None"),
]


@pytest.mark.parametrize("model_kind", ["peft", "fastpeft"])
@pytest.mark.parametrize("change,error,message", BAD, ids=[
    "-".join(f"{k}={v!r}" for k, v in change.items()).replace(" ", "")[:60] for change, _, _ in BAD])
def test_bad_input_is_refused_naming_the_argument_with_the_model_unchanged(model_kind, change, error, message):
    change = dict(change)
    _, model = twins(model_kind, change.pop("ranks", (4, 4, 4)))
    arguments = {"adapters": ADAPTERS, "weights": WEIGHTS, "adapter_name": "m", **change}
    before = snapshot(model)
    with pytest.raises(error) as refused:
        fastpeft.add_weighted_adapter(model, **arguments)
    assert message in str(refused.value), str(refused.value)
    assert_unchanged(model, before)


def test_convolution_layers_are_refused_naming_them():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0", "2"]), adapter_name="a0")
    model.add_adapter("a1", peft.LoraConfig(r=2, target_modules=["0", "2"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\b0: a peft\.tuners\.lora\.layer\.Conv2d layer") as refused:
        fastpeft.add_weighted_adapter(model, ["a0", "a1"], [1.0, 1.0], "m")
    assert "PeftModel.add_weighted_adapter merges the others" in str(refused.value)
    assert_unchanged(model, before)


def test_a_target_that_would_get_the_adapter_without_one_to_merge_is_refused_up_front():
    """The merged config joins the adapters' target modules but keeps the first adapter's layers_to_transform:
    PEFT would put the new adapter on a layer none of them is on, then fail with it half added."""
    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["q"]), adapter_name="a0")
    model.add_adapter("a1", peft.LoraConfig(r=2, target_modules=["v"]))
    model.base_model.model.k = nn.Linear(4, 4)  # a module named like a target of neither adapter
    model.peft_config["a1"].target_modules = {"v", "k"}
    before = snapshot(model)
    with pytest.raises(ValueError, match="k: the merged adapter's target_modules select it, but it holds none"):
        fastpeft.add_weighted_adapter(model, ["a0", "a1"], [1.0, 1.0], "m")
    assert_unchanged(model, before)


@pytest.mark.parametrize("model_kind", ["peft", "fused", "fastpeft"])
def test_a_failure_in_any_layer_leaves_no_layer_with_the_adapter(model_kind, monkeypatch):
    _, model = twins(model_kind)
    before = snapshot(model)
    real, calls = merging.merge_lora_factors, []

    def fail_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory in the second layer")
        return real(*args, **kwargs)
    monkeypatch.setattr(merging, "merge_lora_factors", fail_on_the_second_layer)
    with pytest.raises(RuntimeError, match="second layer"):
        fastpeft.add_weighted_adapter(model, ADAPTERS, WEIGHTS, "m")
    assert_unchanged(model, before)
    monkeypatch.setattr(merging, "merge_lora_factors", real)
    fastpeft.add_weighted_adapter(model, ADAPTERS, WEIGHTS, "m")  # the name is free again
    assert len(deltas(model, "m")) == 2


# ----------------------------------------------------------------------------------------------------------
# The Triton kernel of the element-wise pass (the interpreter on a CPU), against the torch path.
# ----------------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("kind,density,method", [
    ("svd", None, "total"), ("ties_svd", 0.4, "total"), ("ties_svd", 0.7, "frequency"),
    ("magnitude_prune_svd", 0.3, "total"), ("ties_svd", 1.0, "total"),
], ids=["svd", "ties_svd-d0.4-total", "ties_svd-d0.7-frequency", "magnitude_prune_svd-d0.3", "ties_svd-d1"])
def test_the_triton_pass_gives_the_whole_matrix_merge(kind, density, method):
    parts = [ops.Term(t.lora_A.to(TRITON_DEVICE), t.lora_B.to(TRITON_DEVICE), t.scaling, t.weight)
             for t in terms((3, 5, 2), n=45, k=38, dtype=torch.float32)]
    options = ops.MergeOptions(kind, 4, density, method)
    got = ops.merged_delta(parts, options, backend="triton")
    want = ops._merge_whole([(t.lora_B @ t.lora_A) * t.scaling for t in parts], [t.weight for t in parts], kind,
                            density, method, None)
    assert got.shape == (45, 38) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-6
    assert rel_err(got, ops.merged_delta(parts, options, backend="torch")) < 1e-6


def test_the_triton_pass_refuses_dare_naming_why():
    parts = terms((3, 3), dtype=torch.float32)
    with pytest.raises(fastpeft.BackendUnavailableError, match="DARE's masks are PEFT's random numbers"):
        ops.merged_delta(parts, ops.MergeOptions("dare_ties_svd", 3, 0.5), backend="triton")


@needs_triton
def test_the_triton_pass_leaves_ties_at_a_threshold_to_the_torch_path_s_row_order():
    """Rows of B all alike make every column of a delta one value N times over: the threshold's ties are more than
    the entries left to keep, and PEFT's choice among them (row order here) is the torch path's."""
    parts = []
    for t in terms((3, 4), n=20, k=30, dtype=torch.float32):
        lora_B = t.lora_B[:1].expand(20, -1).contiguous().to(TRITON_DEVICE)
        parts.append(ops.Term(t.lora_A.to(TRITON_DEVICE), lora_B, t.scaling, t.weight))
    options = ops.MergeOptions("ties_svd", 4, 0.33)
    got = ops.merged_delta(parts, options, backend="triton")
    assert torch.equal(got, ops.merged_delta(parts, options, backend="torch"))


# ----------------------------------------------------------------------------------------------------------
# (IA)³: PEFT's linear merge of vectors, on PEFT's IA3 models and on fastpeft's.
# ----------------------------------------------------------------------------------------------------------

def _ia3_twins(seed=0):
    import copy

    from peft import IA3Config, get_peft_model
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    config = dict(target_modules=["0", "2", "4"], feedforward_modules=["2"], init_ia3_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), IA3Config(**config))
    peft_model.add_adapter("b", IA3Config(target_modules=["0", "2"], feedforward_modules=["2"],
                                          init_ia3_weights=False))
    ours = fastpeft.from_peft(copy.deepcopy(peft_model))
    return peft_model, ours


def test_ia3_linear_merge_matches_peft_on_both_kinds_of_model():
    peft_model, ours = _ia3_twins()
    peft_model.base_model.add_weighted_adapter(["default", "b"], [0.7, -0.4], "mixed")  # PEFT's own
    fastpeft.add_weighted_adapter(ours, ["default", "b"], [0.7, -0.4], "mixed", combination_type="linear")
    theirs = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items() if ".mixed" in k}
    mine = {k.removeprefix("base_model.model."): v for k, v in ours.state_dict().items() if ".mixed" in k}
    assert theirs and theirs.keys() == mine.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mixed" in n)
    peft_model.set_adapter("mixed")
    fastpeft.set_adapter(ours, "mixed")
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-5, atol=1e-6)
    # on a PeftModel: PEFT's own merge behind fastpeft's checks, the new vector frozen as PEFT freezes it
    peft_twin, _ = _ia3_twins()
    fastpeft.add_weighted_adapter(peft_twin, ["default", "b"], [0.7, -0.4], "mixed")
    for key, value in peft_twin.state_dict().items():
        if ".mixed" in key:
            torch.testing.assert_close(value, theirs[key.removeprefix("base_model.model.")])


@pytest.mark.parametrize("kwargs,match", [
    (dict(combination_type="ties", density=0.5), "merge linearly"),
    (dict(combination_type="linear", svd_rank=4), "svd_rank given"),
    (dict(combination_type="linear", seed=3), "seed given"),
])
def test_ia3_merge_refuses_what_does_not_apply(kwargs, match):
    peft_model, ours = _ia3_twins(1)
    for model in (peft_model, ours):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            fastpeft.add_weighted_adapter(model, ["default", "b"], [0.5, 0.5], "merged", **kwargs)
        assert model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="already"):
        fastpeft.add_weighted_adapter(ours, ["default", "b"], [0.5, 0.5], "b", combination_type="linear")


def test_lora_bias_merges_as_the_installed_peft_merges_it():
    """PEFT 0.22 and later: the merged adapter has a LoRA bias, Σ wᵢ sᵢ bᵢ; earlier PEFT leaves biases out, and fastpeft
    refuses such adapters there rather than drop them."""
    reference = peft_model(lora_bias=True)
    ours = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_B" in name and name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
                ours.get_parameter(name).copy_(p)
    if not merging._peft_rules().merges_bias:
        with pytest.raises(ValueError, match="LoRA bias"):
            fastpeft.add_weighted_adapter(ours, ADAPTERS, WEIGHTS, "m", combination_type="cat")
        return
    both_merge(reference, ours, "cat")
    theirs = {k: v for k, v in reference.state_dict().items() if ".m." in k or k.endswith(".m")}
    mine = {k: v for k, v in ours.state_dict().items() if ".m." in k or k.endswith(".m")}
    assert theirs.keys() == mine.keys() and any("bias" in k for k in theirs)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key])


def test_ia3_merge_on_a_fused_peft_model_runs_fused_with_peft_s_outputs():
    peft_model, _ = _ia3_twins(2)
    fused = fastpeft.fuse(copy.deepcopy(peft_model))
    peft_model.base_model.add_weighted_adapter(["default", "b"], [0.3, 0.9], "m")
    fastpeft.add_weighted_adapter(fused, ["default", "b"], [0.3, 0.9], "m")
    peft_model.set_adapter("m")
    fused.set_adapter("m")
    assert set(fastpeft.fuse_report(fused).values()) == {None}
    x = torch.randn(4, 12)
    torch.testing.assert_close(fused(x), peft_model(x), rtol=1e-6, atol=1e-6)


def test_the_new_name_is_checked_first_and_only_the_merged_adapter_is_frozen():
    """A name PEFT cannot hold is refused up front, naming adapter_name, on PEFT's LoRA and IA3 models alike, leaving
    no config behind; naming the merge "weight" freezes the merged adapter's tensors and nothing else."""
    reference, _ = twins("peft")
    peft_ia3, _ = _ia3_twins(3)
    for model in (reference, peft_ia3):
        before = snapshot(model)
        names = ["default", "b"] if model is peft_ia3 else ADAPTERS[:2]
        with pytest.raises(ValueError, match="adapter_name must be a non-empty string without '.'"):
            fastpeft.add_weighted_adapter(model, names, [0.5, 0.5], "a.b", combination_type="linear")
        assert_unchanged(model, before)
    reference.set_adapter("a0")
    trained = {n for n, p in reference.named_parameters() if p.requires_grad}
    fastpeft.add_weighted_adapter(reference, ADAPTERS, WEIGHTS, "weight", combination_type="cat")
    assert {n for n, p in reference.named_parameters() if p.requires_grad} == trained


def test_weights_may_be_a_tensor_or_an_array_as_in_peft():
    import numpy as np
    reference, ours = twins("peft")
    both_merge(reference, ours, "cat")
    for i, weights in enumerate((torch.tensor(WEIGHTS), np.array(WEIGHTS), [torch.tensor(w) for w in WEIGHTS])):
        fastpeft.add_weighted_adapter(ours, ADAPTERS, weights, f"w{i}", combination_type="cat")
        assert_deltas_close(deltas(ours, f"w{i}"), deltas(reference, "m"), EXACT)
