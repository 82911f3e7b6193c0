"""A latency target priced by a latency table: block costs agree with the table's prediction, the
pruned network meets the target in predicted ms, and a target below the floor names the floor."""
import pytest

from pruning.importance import MagnitudeImportance
from pruning.budget import Floor, LatencyCost, Network, floor_cost, select_knapsack, select_ratio
from pruning.pruner import PruneConfig, prune
from pruning.surgery import apply_plan
from pruning.units import PruneError, block_infos

from pruning_nets import batches, build, fake_table, tiny_deit, tiny_swin


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_latency_cost_blocks_add_up_to_the_table_prediction(make, quick_tables):
    arch = make()
    t = fake_table(arch)
    cost = LatencyCost(t, arch)
    infos = block_infos(arch)
    base = cost.base(arch, infos)
    model = build(arch)
    sc = MagnitudeImportance().score(model, arch)
    full, lowest = cost.total(arch), floor_cost(infos, cost, base, Floor(0.1))
    assert base + sum(cost.block(i, (i.heads, i.qk_dim, i.v_dim, i.ffn_hidden)) for i in infos) == pytest.approx(full)
    for frac in (0.7, 0.3):
        budget = lowest + frac * (full - lowest)
        for select in (select_ratio, select_knapsack):
            sel = select(Network(arch, sc, cost, Floor(0.1)), budget)
            _, small = apply_plan(model, arch, sel.plan)
            assert t.predict(small, interpolate=True) == pytest.approx(sel.cost, rel=1e-9)
            assert sel.cost <= budget + 1e-9


def test_prune_to_a_latency_target_and_below_the_floor(quick_tables):
    arch = tiny_deit()
    t = fake_table(arch)
    model = build(arch)
    full = t.predict(arch, interpolate=True)
    lowest = floor_cost(block_infos(arch), LatencyCost(t, arch), LatencyCost(t, arch).base(arch, block_infos(arch)),
                        Floor(0.1).of(block_infos(arch)))
    goal = (full + lowest) / 2
    res = prune(model, arch, PruneConfig(target=f"latency={goal}", calib_batches=1, eval_batches=0),
                calibration=batches(arch, 1), table=t)
    assert res.report["latency_after_ms"] <= goal + 1e-9
    with pytest.raises(PruneError, match=f"below what the table can reach for this model \\(floor {lowest:.3f} ms"):
        prune(model, arch, PruneConfig(target=f"latency={0.9 * lowest}", calib_batches=1),
              calibration=batches(arch, 1), table=t)
