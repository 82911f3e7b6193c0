"""`--round-to N` (Torch-Pruning's round_to): every channel width the pruner keeps (Q/K and V per head, FFN
hidden, the residual width with embedding pruning) is a multiple of N or as it was, under every selection,
budget and move kind; the floor rounds up to it, and the budget is still met."""
import json

import pytest

from pruning.budget import (Floor, MacsCost, Network, ParamsCost, floor_cost, removals, select_knapsack,
                            select_ratio)
from pruning.importance import TaylorImportance
from pruning.pruner import PruneConfig, prune
from pruning.surgery import apply_plan
from pruning.units import PruneError, block_infos
from vitslim.cli import main

from pruning_nets import batches, build, tiny_deit, tiny_swin


def test_removals_leave_multiples_of_the_granularity():
    assert removals(100, 16, 8) == [4, 12, 20, 28, 36, 44, 52, 60, 68, 76, 84]  # 96, 88, ..., 16 kept
    assert removals(64, 8, 8) == [8, 16, 24, 32, 40, 48, 56]
    assert removals(64, 8, 8, limit=2) == [8, 16]
    assert removals(10, 3, 1) == list(range(1, 8))  # round_to 1: any width, as before
    assert removals(8, 8, 8) == []
    assert Floor(0.1, round_to=8).mins(block_infos(tiny_deit(qk=20, v=20, ffn=100))[0]) == \
        {"head": 1, "qk": 8, "v": 8, "ffn": 16}  # ceil(0.1 x 100) = 10 -> 16


def _widths_ok(arch, g, original):
    """Every kept width a multiple of g, or the unpruned one."""
    for b, b0 in zip((b for st in arch["stages"] for b in st["blocks"]),
                     (b for st in original["stages"] for b in st["blocks"])):
        if not b["heads"]:
            continue
        for k in ("qk_dim", "v_dim", "ffn_hidden"):
            assert b[k] % g == 0 or b[k] == b0[k], (k, b[k], g)


@pytest.mark.parametrize("select", [select_ratio, select_knapsack])
@pytest.mark.parametrize("make", [lambda: tiny_deit(qk=20, v=20, ffn=100, heads=3), tiny_swin])
def test_every_kept_width_is_a_multiple_and_the_budget_holds(make, select):
    arch = make()
    model = build(arch)
    sc = TaylorImportance().score(model, arch, batches(arch, 2))
    infos = block_infos(arch)
    for cost in (ParamsCost(), MacsCost()):
        total = cost.total(arch)
        for frac in (0.7, 0.45):
            free = select(Network(arch, sc, cost, Floor(0.1)), frac * total)
            sel = select(Network(arch, sc, cost, Floor(0.1, round_to=8)), frac * total)
            _, small = apply_plan(model, arch, sel.plan)
            _widths_ok(small, 8, arch)
            assert cost.total(small) == sel.cost <= frac * total
            # coarser moves cannot remove less importance than free widths for the same budget
            assert sel.removed_importance >= free.removed_importance * (1 - 1e-9) or select is select_knapsack
        lowest = floor_cost(infos, cost, cost.base(arch, infos), Floor(0.1, round_to=8))
        assert lowest >= floor_cost(infos, cost, cost.base(arch, infos), Floor(0.1))


def test_embedding_and_depth_moves_keep_the_granularity():
    arch = tiny_deit(qk=20, v=20, ffn=100, heads=3, blocks=3)
    model = build(arch)
    sc = TaylorImportance().score(model, arch, batches(arch, 2), embed=True)
    cost = MacsCost()
    for kw in ({"embed": True}, {"depth": True}, {"embed": True, "depth": True}):
        for select in (select_ratio, select_knapsack):
            sel = select(Network(arch, sc, cost, Floor(0.1, round_to=8), **kw), 0.4 * cost.total(arch))
            _, small = apply_plan(model, arch, sel.plan)
            _widths_ok(small, 8, arch)
            assert all(st["width"] % 8 == 0 for st in small["stages"]), (kw, small["stages"][0]["width"])
            assert cost.total(small) <= 0.4 * cost.total(arch) + 1e-6


def test_prune_with_round_to_meets_the_target_and_reports_it():
    arch = tiny_deit(qk=16, v=16, ffn=96, heads=2)
    model = build(arch)
    cfg = PruneConfig(target="macs=0.5", round_to=8, calib_batches=2, eval_batches=0)
    res = prune(model, arch, cfg, calibration=batches(arch, 2))
    _widths_ok(res.arch, 8, arch)
    assert res.report["round_to"] == 8
    assert res.report["macs_after"] <= 0.5 * res.report["macs_before"]


def test_bad_round_to_and_an_unreachable_rounded_floor_are_one_line():
    with pytest.raises(PruneError, match=r"--round-to: got 0, expected an integer >= 1"):
        PruneConfig(target="macs=0.5", round_to=0).check()
    arch = tiny_deit(qk=16, v=16, ffn=96, heads=2)
    cfg = PruneConfig(target="params=0.2", round_to=16, calib_batches=1, eval_batches=0)
    with pytest.raises(PruneError, match=r"below what the floor allows .* --round-to 16"):
        prune(build(arch), arch, cfg, calibration=batches(arch, 1))


def test_cli_round_to(tmp_path, capsys):
    import vitslim
    arch = tiny_deit(qk=16, v=16, ffn=96, heads=2)
    ck = tmp_path / "m.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    rc = main(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5", "--round-to", "8",
               "--calib-batches", "1", "--eval-batches", "0", "--batch-size", "4", "--quiet",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["round_to"] == 8
    for b in rep["blocks"]:
        for k in ("qk_dim", "v_dim", "ffn_hidden"):
            assert b[k] % 8 == 0, (k, b)
    assert main(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5", "--round-to", "-2",
                 "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--round-to: got -2, expected an integer >= 1 (1: any width)"), err
    assert not (tmp_path / "run2").exists()
