"""Embedding (residual width) pruning, the option: priced exactly, applied everywhere the width is
read or written, and chosen against the other units under the same budget."""
import random

import pytest
import torch

import vitslim
from pruning.budget import MacsCost, ParamsCost, emptied
from pruning.importance import MagnitudeImportance, TaylorImportance
from pruning.pruner import PruneConfig, prune
from pruning.surgery import apply_plan
from pruning.units import Plan

from pruning_nets import batches, build, tiny_deit, tiny_swin

FAMILIES = [tiny_deit, tiny_swin, lambda: tiny_deit(distillation=True)]


@pytest.mark.parametrize("make", FAMILIES)
def test_stem_and_head_cost_at_any_residual_widths_matches_count(make):
    arch = make()
    rnd = random.Random(0)
    for _ in range(3):
        dims = [rnd.randint(3, st["width"]) for st in arch["stages"]]
        truth = vitslim.count(emptied(arch, dims))
        assert ParamsCost().base_at(arch, dims) == truth["params"]
        assert MacsCost().base_at(arch, dims) == truth["macs"]


@pytest.mark.parametrize("make", FAMILIES)
def test_embed_surgery_slices_every_reader_and_writer(make):
    arch = make()
    model = build(arch)
    rnd = random.Random(1)
    keep = {i: sorted(rnd.sample(range(st["width"]), st["width"] - 5)) for i, st in enumerate(arch["stages"])}
    small, small_arch = apply_plan(model, arch, Plan(embed=keep))
    assert [st["width"] for st in small_arch["stages"]] == [len(k) for k in keep.values()]
    x = batches(arch, 1)[0][0]
    with torch.no_grad():
        assert torch.isfinite(small(x)).all()
    # keeping every channel (in order) is the identity
    full, _ = apply_plan(model, arch, Plan(embed={i: list(range(st["width"])) for i, st in enumerate(arch["stages"])}))
    with torch.no_grad():
        assert torch.allclose(full(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("crit", [TaylorImportance, MagnitudeImportance])
def test_embed_scores_one_per_residual_channel(crit):
    arch = tiny_swin()
    sc = crit().score(build(arch), arch, batches(arch, 1), embed=True)
    assert [len(sc.embed[i]) for i in range(len(arch["stages"]))] == [st["width"] for st in arch["stages"]]
    assert all((e >= 0).all() and e.sum() > 0 for e in sc.embed.values())


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
@pytest.mark.parametrize("selection", ["ratio", "knapsack"])
def test_prune_embed_meets_the_budget_and_narrows_the_residual(make, selection):
    arch = make()
    model = build(arch)
    # units inside blocks made unimportant-looking is not needed: the embedding is the cheapest way
    # to cut the stem and head, which the block units cannot reach
    res = prune(model, arch, PruneConfig(target="params=0.4", prune_embed=True, selection=selection,
                                         calib_batches=1, eval_batches=0), calibration=batches(arch, 1))
    assert res.report["params_after"] <= 0.4 * res.report["params_before"]
    assert vitslim.count(res.model)["params"] == res.report["params_after"]
    assert any(s["width"] < s["width_before"] for s in res.report["stages"])
    assert all(s["width"] >= 0.1 * s["width_before"] for s in res.report["stages"])
