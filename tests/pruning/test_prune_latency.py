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
    # the pruned widths are priced off the table's entries: the report says which, as `latency predict` does
    est = t.predict_stages(res.arch, interpolate=True)["estimated"]
    assert est and res.report["latency_estimated_entries"] == est
    with pytest.raises(PruneError, match=f"below what the table can reach for this model \\(floor {lowest:.3f} ms"):
        prune(model, arch, PruneConfig(target=f"latency={0.9 * lowest}", calib_batches=1, depth=False),
              calibration=batches(arch, 1), table=t)


# ---------------------------------------------------------------- the pruning width grid
from pruning_nets import grid_table, part_ms, with_widths  # noqa: E402


def _widths(arch, seed):
    import random
    rng = random.Random(seed)
    out = []
    for i in block_infos(arch):
        h = rng.choice([0, 1, i.heads, max(1, i.heads - 1)])
        f = rng.choice([0, 1, rng.randint(1, i.ffn_hidden), i.ffn_hidden])
        out.append((h, rng.randint(1, i.qk_dim), rng.randint(1, i.v_dim), f))
    return out


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_latency_cost_on_the_grid_prices_pruned_widths_as_predict_does(make):
    arch = make()
    t = grid_table(arch)
    cost = LatencyCost(t, arch)
    infos = block_infos(arch)
    base = cost.base(arch, infos)
    assert all(cost.uses_grid(i) for i in infos)
    for seed in range(6):
        ws = _widths(arch, seed)
        if seed == 0:
            ws[0] = (0, 0, 0, 0)  # a block removed: one segment (and its per_segment_ms) fewer
        small = with_widths(arch, ws)
        priced = base + sum(cost.block(i, w) for i, w in zip(infos, ws))
        assert priced == pytest.approx(t.predict(small, interpolate=True), rel=1e-12, abs=1e-12)
        for i, w in zip(infos, ws):  # (1 + scale) * (attention part + FFN part) + one segment, exactly
            h, q, v, f = w
            key = {"op": "vit_block", "tokens": 0, "dim": i.dim, "heads": h, "qk_dim": q if h else 0,
                   "v_dim": v if h else 0, "ffn_hidden": f}
            want = 1.05 * part_ms(key) + 0.02 if (h or f) else 0.0
            assert cost.block(i, w) == pytest.approx(want, rel=1e-12)


def test_a_removed_block_saves_its_segment_overhead_without_the_grid_too(quick_tables):
    arch = tiny_deit()
    t = fake_table(arch)
    t.overhead["per_segment_ms"] = 0.3
    cost = LatencyCost(t, arch)
    infos = block_infos(arch)
    ws = [(0, 0, 0, 0), (2, 5, 7, 40)]
    assert not cost.uses_grid(infos[1])
    priced = cost.base(arch, infos) + sum(cost.block(i, w) for i, w in zip(infos, ws))
    assert priced == pytest.approx(t.predict(with_widths(arch, ws), interpolate=True), rel=1e-9)


def small_deit():
    # big enough that its narrowest blocks are well below its full ones in measured time (the 24-wide
    # tiny_deit is all per-call overhead: its floor and full widths are within a few % of each other)
    import vitslim
    return vitslim.resolve_arch({
        "family": "deit", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 4},
        "stages": [{"width": 64, "blocks": [{"type": "vit", "heads": 4, "qk_dim": 16, "v_dim": 16,
                                             "ffn_hidden": 256}] * 2}]})


@pytest.mark.parametrize("make", [small_deit, tiny_swin])
def test_prune_to_a_latency_target_on_a_measured_grid(make, tmp_path):
    """A real (small, quick) in-context measurement of the arch and its grid on this CPU, then pruning
    to a latency target: the pruned network's predicted latency meets it and is priced from the grid."""
    from latency_tables import get_backend
    from latency_tables.build import measure_in_context, open_table
    from latency_tables.grid import GridSpec, grid_networks, prune_grid_keys
    from latency_tables.measure import Procedure
    from latency_tables.segments import arch_keys
    arch = make()
    backend = get_backend("torch-cpu")
    t = open_table(str(tmp_path / "t.yaml"), backend)
    grid = prune_grid_keys(arch, GridSpec(qk=8, v=8, ffn=64 if make is small_deit else 32, heads=2))
    keys = arch_keys(arch) + grid
    measure_in_context(t, keys, grid_networks(arch, grid, contexts=1) + [arch], backend,
                       Procedure(0.001, 3, 5, 0.0, clock="thread"))
    assert not t.missing(keys)
    model = build(arch)
    full = t.predict(arch)
    infos = block_infos(arch)
    cost = LatencyCost(t, arch)
    assert all(cost.uses_grid(i) for i in infos)
    lowest = floor_cost(infos, cost, cost.base(arch, infos), Floor(0.1).of(infos))
    goal = lowest + 0.4 * (full - lowest)
    res = prune(model, arch, PruneConfig(target=f"latency={goal}", calib_batches=1, eval_batches=0, selection="ratio",
                                         depth=False),  # narrowed widths, not whole branches: priced from the grid
                calibration=batches(arch, 1), table=t)
    assert res.report["latency_after_ms"] <= goal + 1e-9
    assert res.report["latency_grid_blocks"] == res.report["blocks_total"] == len(infos)
    assert res.report["latency_after_ms"] == pytest.approx(t.predict(res.arch, interpolate=True))
    assert t.predict_stages(res.arch, interpolate=True)["estimated"]  # pruned widths priced from the grid
    assert res.report["macs_after"] < res.report["macs_before"]


def test_a_table_filled_by_the_users_own_timer_prices_pruning(tmp_path):
    """A device vitslim has no backend for (a remote board, a profiler): the user times every entry with their own
    timer and prunes against the table, from `import latency_tables` alone. The width grid's keys and the entries'
    modules were reachable only through latency_tables.grid / .segments internals."""
    import torch
    import vitslim
    from latency_tables import LatencyTable, arch_keys, build_segment, prune_grid_keys
    arch = tiny_deit(blocks=3)

    def my_timer(module, x):  # stands in for a device's own clock: runs the module, "ms" from its size
        with torch.no_grad():
            module(x)
        return 0.01 + 1e-4 * sum(p.numel() for p in module.parameters())

    table = LatencyTable({"backend": "my-npu", "device": "board 3", "threads": 1, "batch_size": 1})
    for key in arch_keys(arch) + prune_grid_keys(arch):
        module, shape = build_segment(key)
        ms = my_timer(vitslim.fuse(module), torch.randn(1, *shape))
        table.set(key, ms, ms, ms, n=1)
    table.save(str(tmp_path / "my_npu.yaml"))
    _, small_arch, rep = vitslim.prune_model(build(arch), "latency=0.6x", calibration=batches(arch, 1),
                                             table=tmp_path / "my_npu.yaml", eval_batches=0)
    assert rep["latency_grid_blocks"] == rep["blocks_total"] == 3
    assert rep["latency_after_ms"] <= 0.6 * rep["latency_before_ms"] + 1e-9
    assert LatencyTable.load(str(tmp_path / "my_npu.yaml")).predict(small_arch, interpolate=True) == \
        pytest.approx(rep["latency_after_ms"])
