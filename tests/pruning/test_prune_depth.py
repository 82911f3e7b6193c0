"""Depth moves: a block's attention or FFN branch removed whole. Its Taylor score is the gate-form
derivative on the branch output (checked by finite differences), surgery without the branch computes
exactly the original with the branch zeroed, a latency table prices the removal as its prediction
of the arch without it, both selections take a branch move when it is the cheapest in importance per
ms, the network always keeps a branch, and bad input is a one-line error."""
import copy

import numpy as np
import pytest
import torch

import vitslim
from pruning.budget import (BRANCHES, Floor, LatencyCost, MacsCost, Network, floor_cost_depth, select_knapsack,
                            select_ratio)
from pruning.importance import Importance, MagnitudeImportance, Scores, TaylorImportance, default_loss
from pruning.pruner import PruneConfig, prune
from pruning.surgery import apply_plan
from pruning.units import PruneError, block_infos, block_module
from pruning_nets import batches, build, grid_table, tiny_deit, tiny_swin, with_widths

from test_prune_cli import FAST, one_line_error


def _branch_module(model, info, br):
    blk = block_module(model, info)
    return blk.attn.proj if br == "attn" else blk.mlp.fc2


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_branch_importance_is_the_gate_derivative(make):
    """(sum over the branch output of a * dL/da)^2, averaged over batches, equals (dL/dg)^2 of a gate g
    on the branch's residual contribution, the derivative taken by central differences (float64)."""
    arch = make()
    model = build(arch).double()
    data = [(x.double(), y) for x, y in batches(arch, n=2, bs=2)]
    sc = TaylorImportance().score(model, arch, data)
    infos = block_infos(arch)
    eps = 1e-6
    for info in (infos[1], infos[-1]):  # Swin: a shifted block of the padded stage, the last block
        for bi, br in enumerate(BRANCHES):
            mod = _branch_module(model, info, br)
            fd2 = []
            for x, y in data:
                losses = []
                for g in (1 + eps, 1 - eps):
                    h = mod.register_forward_hook(lambda m, a, out, g=g: out * g)
                    with torch.no_grad():
                        losses.append(float(default_loss(model(x), y)))
                    h.remove()
                fd2.append(((losses[0] - losses[1]) / (2 * eps)) ** 2)
            want = float(np.mean(fd2))
            assert want > 0
            assert sc.branch[info.key][bi] == pytest.approx(want, rel=1e-4), (info.name, br)


def test_branch_importance_predicts_zeroing_a_small_branch():
    """First order: for a branch whose contribution is small, the loss change when it is zeroed is
    about dL/dg (the score's square root, with its sign)."""
    arch = tiny_deit()
    model = build(arch).double()
    with torch.no_grad():  # shrink one FFN branch so that zeroing it is a small step
        model.blocks[1].mlp.fc2.weight.mul_(1e-3)
        model.blocks[1].mlp.fc2.bias.mul_(1e-3)
    x, y = batches(arch, n=1, bs=4)[0]
    x = x.double()
    sc = TaylorImportance().score(model, arch, [(x, y)])
    with torch.no_grad():
        l1 = float(default_loss(model(x), y))
        zeroed = copy.deepcopy(model)
        zeroed.blocks[1].mlp.fc2.weight.zero_()
        zeroed.blocks[1].mlp.fc2.bias.zero_()
        l0 = float(default_loss(zeroed(x), y))
    assert abs(l1 - l0) == pytest.approx(sc.branch[(0, 1)][1] ** 0.5, rel=0.02)


def _zero_branch(model, info, br):
    m = copy.deepcopy(model)
    mod = _branch_module(m, info, br)
    with torch.no_grad():
        mod.weight.zero_()
        mod.bias.zero_()
    return m


@pytest.mark.parametrize("make,removals", [
    (tiny_deit, [(0, "attn"), (1, "mlp")]),
    (tiny_swin, [(1, "attn"), (2, "mlp"), (3, "attn"), (3, "mlp")]),  # a shifted block's attention; a whole block
])
def test_surgery_without_a_branch_is_the_original_with_it_zeroed(make, removals):
    arch = make()
    model = build(arch)
    infos = block_infos(arch)
    net = Network(arch, MagnitudeImportance().score(model, arch), MacsCost(), Floor(0.1), depth=True)
    ref = model
    for bi, br in removals:
        assert net.can_remove_branch(bi, br)
        net.blocks[bi].gone[br] = True
        assert all(net.blocks[bi].can_remove(k) == 0 for k in (("head", "qk", "v") if br == "attn" else ("ffn",)))
        ref = _zero_branch(ref, infos[bi], br)
    small, sarch = apply_plan(model, arch, net.plan())
    for bi, br in removals:
        b = sarch["stages"][infos[bi].stage]["blocks"][infos[bi].index]
        assert b["heads" if br == "attn" else "ffn_hidden"] == 0
        blk = block_module(small, infos[bi])
        assert (blk.attn, blk.norm1) == (None, None) if br == "attn" else (blk.mlp, blk.norm2) == (None, None)
    x = batches(arch, n=1, bs=4)[0][0]
    with torch.no_grad():
        want, got = ref(x), small(x)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), float((got - want).abs().max())


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_latency_cost_of_a_branch_is_the_prediction_without_it(make):
    """Removing a branch (or both: the block) saves exactly what the table predicts: its entry, fixed
    part included, and the per-segment overhead when the block goes."""
    arch = make()
    t = grid_table(arch)
    model = build(arch)
    cost = LatencyCost(t, arch)
    infos = block_infos(arch)
    sc = MagnitudeImportance().score(model, arch)
    full = t.predict(arch, interpolate=True)
    for bi, info in enumerate(infos):
        for gone in (("attn",), ("mlp",), ("attn", "mlp")):
            net = Network(arch, sc, cost, Floor(0.1), depth=True)
            saved = 0.0
            for br in gone:
                saved += net.branch_delta(bi, br)
                net.blocks[bi].gone[br] = True
            w = {"attn": (0, 0, 0, info.ffn_hidden), "mlp": (info.heads, info.qk_dim, info.v_dim, 0),
                 ("attn", "mlp"): (0, 0, 0, 0)}[gone if len(gone) == 2 else gone[0]]
            without = with_widths(arch, [w if j == bi else (i.heads, i.qk_dim, i.v_dim, i.ffn_hidden)
                                         for j, i in enumerate(infos)])
            assert full - saved == pytest.approx(t.predict(without, interpolate=True), rel=1e-12)
            assert net.total() == pytest.approx(t.predict(without, interpolate=True), rel=1e-12)
            _, small = apply_plan(model, arch, net.plan())
            assert t.predict(small, interpolate=True) == pytest.approx(net.total(), rel=1e-12)
    per_segment = t.overhead["per_segment_ms"]
    assert per_segment > 0  # the whole block also saves its segment
    i0 = infos[0]
    assert cost.block(i0, (0, 0, 0, 0)) == 0.0
    assert cost.block(i0, (0, 0, 0, i0.ffn_hidden)) > per_segment


class FixedImportance(Importance):
    """Given scores (the unit scores of every block at 1, branch scores as given)."""
    name = "fixed"

    def __init__(self, branch):
        self.branch = branch

    def score(self, model, arch, batches, progress=None, embed=False):
        blocks = {i.key: {"head": np.ones(i.heads), "qk": np.ones((i.heads, i.qk_dim)), "v": np.ones((i.heads, i.v_dim)),
                          "ffn": np.ones(i.ffn_hidden)} for i in block_infos(arch)}
        return Scores(blocks, self.name, 1, {}, {k: np.array(v, float) for k, v in self.branch.items()})


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_a_latency_target_takes_the_branch_that_is_cheapest_per_ms(make):
    """Every unit scores 1 and every branch 1000 except one FFN branch at 1e-3: the cheapest in
    importance per ms by far. A target that asks for that branch's milliseconds removes it, in both
    selections and through prune(); with depth off the same target narrows blocks instead."""
    arch = make()
    t = grid_table(arch)
    model = build(arch)
    infos = block_infos(arch)
    target = infos[1]
    imp = FixedImportance({i.key: (1e-3 if i.key == target.key else 1e3, 1e3) for i in infos}
                          | {target.key: (1e3, 1e-3)})
    cost = LatencyCost(t, arch)
    sc = imp.score(model, arch, [])
    full = cost.total(arch)
    net0 = Network(arch, sc, cost, Floor(0.1), depth=True)
    goal = full - 0.9 * net0.branch_delta(1, "mlp")
    for select in (select_ratio, select_knapsack):
        net = Network(arch, sc, cost, Floor(0.1), depth=True)
        sel = select(net, goal)
        assert net.blocks[1].gone == {"attn": False, "mlp": True}, select.__name__
        assert sum(st.gone[b] for st in net.blocks for b in BRANCHES) == 1
        assert sel.plan.get(target).ffn == [] and sel.cost <= goal + 1e-12
        assert sel.removed_importance == pytest.approx(1e-3)  # that branch, and nothing else
    cfg = dict(target=f"latency={goal}", calib_batches=1, eval_batches=0)
    on = prune(model, arch, PruneConfig(**cfg, depth=True), calibration=batches(arch, 1), table=t, importance=imp)
    assert on.report["depth"] is True and on.report["emptied"] == [f"{target.name}.mlp"]
    assert on.report["latency_after_ms"] <= goal + 1e-9
    auto = prune(model, arch, PruneConfig(**cfg), calibration=batches(arch, 1), table=t, importance=imp)
    assert auto.report["depth"] is True and auto.arch == on.arch  # latency target: depth on by default
    off = prune(model, arch, PruneConfig(**cfg, depth=False), calibration=batches(arch, 1), table=t, importance=imp)
    assert off.report["depth"] is False and off.report["emptied"] == []


def test_the_floor_does_not_hold_a_branch_back_but_the_last_branch_stays():
    """min_keep 1 holds every unit, yet branches may go whole; never the network's last branch, and a
    target only an empty network could meet is a one-line error saying why."""
    arch = tiny_deit(blocks=2)
    t = grid_table(arch)
    model = build(arch)
    cal = batches(arch, 1)
    full = t.predict(arch, interpolate=True)
    res = prune(model, arch, PruneConfig(target=f"latency={0.6 * full}", min_keep=1.0, depth=True, calib_batches=1,
                                         eval_batches=0), calibration=cal, table=t)
    kept = [(b["heads"], b["ffn_hidden"]) for b in res.report["blocks"]]
    assert all(h in (0, 3) and f in (0, 64) for h, f in kept) and any(0 in k for k in kept)  # only whole branches
    assert res.report["latency_after_ms"] <= 0.6 * full + 1e-9
    sc = MagnitudeImportance().score(model, arch)
    net = Network(arch, sc, LatencyCost(t, arch), Floor(1.0), depth=True)
    for select in (select_ratio, select_knapsack):
        net = Network(arch, sc, LatencyCost(t, arch), Floor(1.0), depth=True)
        select(net, 0.0)  # unreachable: everything that may go goes, the last branch stays
        assert net.live_branches() == 1
        assert not any(net.can_remove_branch(bi, b) for bi in range(2) for b in BRANCHES)
    lowest = floor_cost_depth(arch, LatencyCost(t, arch), Floor(1.0).of(block_infos(arch)))
    with pytest.raises(PruneError, match="at least one block must stay") as e:
        prune(model, arch, PruneConfig(target=f"latency={0.9 * lowest}", min_keep=1.0, depth=True, calib_batches=1),
              calibration=cal, table=t)
    assert "\n" not in str(e.value) and f"{lowest:.3f} ms" in str(e.value)


@pytest.mark.parametrize("selection", ["ratio", "knapsack"])
def test_every_target_above_the_depth_floor_is_met(selection):
    """The floor is the cheapest branch alone at its floor widths; greedy branch moves can leave another,
    costlier branch last (the last branch never goes). Targets between the two were refused as unreachable
    after the floor check had accepted them: the selection now keeps a branch that fits instead."""
    arch = tiny_deit()
    t = grid_table(arch)
    model = build(arch)
    cal = batches(arch, n=2, bs=4)
    lowest = floor_cost_depth(arch, LatencyCost(t, arch), Floor(0.1).of(block_infos(arch)))
    for f in (1.002, 1.05, 1.1):
        res = prune(model, arch, PruneConfig(target=f"latency={f * lowest}", selection=selection, eval_batches=0),
                    calibration=cal, table=t)
        assert res.report["latency_after_ms"] <= f * lowest + 1e-9, f
        assert any(b["heads"] or b["ffn_hidden"] for b in res.report["blocks"])


def test_iterative_pruning_with_depth_restricts_branch_scores():
    arch = tiny_swin()
    model = build(arch)
    res = prune(model, arch, PruneConfig(target="macs=0.35", depth=True, iterative_steps=2, calib_batches=1,
                                         eval_batches=0, selection="ratio"), calibration=batches(arch, 1, bs=2))
    assert res.report["emptied"]
    assert res.report["macs_kept"] <= 0.35 + 1e-9 and res.report["depth"] is True
    x = batches(arch, n=1, bs=2)[0][0]
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()


def test_depth_defaults_and_bad_values():
    assert PruneConfig(target="latency=3").check().use_depth is True
    assert PruneConfig(target="macs=0.5").check().use_depth is False
    assert PruneConfig(target="params=0.5", depth=True).check().use_depth is True
    with pytest.raises(PruneError, match="--depth: got 'yes', expected true, false or None"):
        PruneConfig(target="macs=0.5", depth="yes").check()


def test_depth_with_an_unsupported_family_is_a_one_line_error(tmp_path, capsys):
    arch = vitslim.get_preset("efficientvit_m0")
    ck = tmp_path / "evit.pt"
    vitslim.save_checkpoint(vitslim.build_model(arch), arch, ck)
    one_line_error(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5", "--depth",
                            "--out", str(tmp_path / "r")] + FAST, "--depth: got a 'efficientvit' model, expected one of deit, swin")


def test_cli_depth_removes_a_branch_and_reports_it(tmp_path, capsys):
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    from vitslim.cli import main
    rc = main(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "params=0.6", "--depth",
               "--min-keep", "1", "--out", str(tmp_path / "r"), "--json"] + FAST)
    out, err = capsys.readouterr()
    assert rc == 0, err
    import json
    rep = json.load(open(tmp_path / "r" / "report.json"))
    assert rep["depth"] is True and rep["emptied"] and rep["params_kept"] <= 0.6


def test_when_greedy_depth_moves_stop_over_budget_the_most_important_branch_that_fits_stays():
    """`_one_branch_left`: of the branches that fit the budget alone at their floor widths, the most
    important is kept (at those widths), every other branch goes. Hand-made branch scores on two blocks:
    the MLP of block 1 is worth most but only the attention branches fit the smaller budget."""
    from pruning.budget import _one_branch_left
    arch = tiny_deit(blocks=2)
    infos = block_infos(arch)
    units = {i.key: {"head": np.full(i.heads, 100.0), "qk": np.full((i.heads, i.qk_dim), 100.0),
                     "v": np.full((i.heads, i.v_dim), 100.0), "ffn": np.full(i.ffn_hidden, 100.0)} for i in infos}
    sc = Scores(units, branch={infos[0].key: np.array([5.0, 1.0]), infos[1].key: np.array([3.0, 9.0])})
    cost, floor = MacsCost(), Floor(0.1)
    base = cost.base(arch, infos)
    attn_alone = base + cost.block(infos[0], (1, 1, 1, 0))  # floor widths: one head, one Q/K pair, one V channel
    mlp_alone = base + cost.block(infos[0], (0, 0, 0, 7))   # ceil(0.1 * 64) FFN channels
    assert attn_alone < mlp_alone
    for budget, kept in ((mlp_alone, (1, "mlp")), (mlp_alone - 1, (0, "attn"))):
        net = Network(arch, sc, cost, floor, depth=True)
        total = _one_branch_left(net, budget)
        live = [(bi, br) for bi in range(2) for br in BRANCHES if net.blocks[bi].live(br)]
        assert live == [kept], budget
        assert total == net.total() == (mlp_alone if kept[1] == "mlp" else attn_alone)
        st = net.blocks[kept[0]]
        assert (st.k["ffn"] == 7) if kept[1] == "mlp" else (st.k["head"], st.k["qk"], st.k["v"]) == (1, 1, 1)
