"""The pruning width grid (`build --prune-grid`): which entries it enumerates, the networks that hold
them for in-context timing, pricing a block as attention part + FFN part interpolated multilinearly
on the grid (not by MACs), and the command line."""
import json

import pytest

import vitslim
from vitslim.cli import main
from latency_tables.grid import (GridSpec, grid_calibration_archs, grid_networks, parse_grid_step, prune_grid_keys)
from latency_tables.segments import SegmentError, arch_keys, check_key, decompose, key_str
from latency_tables.table import LatencyTable

from lat_helpers import FAKE_DEVICE


def tiny_deit():
    return vitslim.resolve_arch({
        "family": "deit", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 8},
        "stages": [{"width": 24, "blocks": [{"type": "vit", "heads": 3, "qk_dim": 8, "v_dim": 8,
                                             "ffn_hidden": 64}] * 2}]})


def tiny_swin():
    return vitslim.resolve_arch({
        "family": "swin", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 2},
        "stages": [{"width": 16, "window_size": 6, "blocks": [{"type": "swin", "heads": 2, "ffn_hidden": 32}] * 2},
                   {"width": 32, "window_size": 4, "blocks": [{"type": "swin", "heads": 4, "ffn_hidden": 64}] * 2}]})


# made-up part latencies: multilinear in (heads, qk_dim, v_dim) and linear in ffn_hidden, so grid
# interpolation must reproduce them exactly anywhere inside the grid; MAC scaling would not
def attn_ms(k):
    h, q, v, d = k["heads"], k["qk_dim"], k["v_dim"], k["dim"]
    return 0.05 + 0.01 * h + 0.002 * h * q + 0.001 * h * v + 0.0001 * q * v + 0.0002 * d


def ffn_ms(k):
    return 0.02 + 0.0005 * k["ffn_hidden"] + 0.0002 * k["dim"]


def part_ms(k):
    if k["op"] not in ("vit_block", "swin_block"):
        return 0.1
    return (attn_ms(k) if k["heads"] else 0.0) + (ffn_ms(k) if k["ffn_hidden"] else 0.0)


def grid_table(arch, spec=GridSpec(qk=4, v=4, ffn=16, heads=2)):
    t = LatencyTable(FAKE_DEVICE, overhead={"intercept_ms": 0.2, "scale": 0.05, "per_segment_ms": 0.01,
                                            "provenance": "measured"})
    for k in arch_keys(arch) + prune_grid_keys(arch, spec):
        ms = part_ms(k)
        t.set(k, ms, ms, ms, 5)
    return t


def test_grid_keys_cover_every_geometry_with_unit_and_unpruned_widths():
    keys = prune_grid_keys(tiny_deit(), GridSpec(qk=4, v=4, ffn=16, heads=2))
    for k in keys:
        check_key(k)
    attn = [k for k in keys if k["ffn_hidden"] == 0]
    ffn = [k for k in keys if k["heads"] == 0]
    assert len(attn) + len(ffn) == len(keys)
    assert sorted({k["heads"] for k in attn}) == [1, 3]
    assert sorted({k["qk_dim"] for k in attn}) == [1, 4, 8] == sorted({k["v_dim"] for k in attn})
    assert len(attn) == 2 * 3 * 3
    assert sorted(k["ffn_hidden"] for k in ffn) == [1, 16, 32, 48, 64]
    assert all(k["qk_dim"] == k["v_dim"] == 0 for k in ffn)

    sk = prune_grid_keys(tiny_swin(), GridSpec(qk=4, v=4, ffn=16, heads=2))
    geoms = {(k["res"], k["dim"], k["shifted"]) for k in sk if k["heads"]}
    # stage 0: 16x16 tokens, window 6 -> shifted and plain blocks; stage 1: 8x8, window 4 -> both too
    assert geoms == {(16, 16, False), (16, 16, True), (8, 32, False), (8, 32, True)}
    assert all(not k["shifted"] for k in sk if k["heads"] == 0)
    assert {(k["res"], k["dim"], k["ffn_hidden"]) for k in sk if k["heads"] == 0} >= {(16, 16, 32), (8, 32, 64), (8, 32, 1)}


def test_grid_step_parsing_and_defaults():
    assert parse_grid_step(None) == GridSpec(8, 8, 0, 3)
    assert parse_grid_step("qk=4, ffn=64") == GridSpec(qk=4, ffn=64)
    deit = prune_grid_keys(vitslim.get_preset("deit_tiny"))
    assert len({k["qk_dim"] for k in deit if k["heads"]}) == 9  # 1, 8, ..., 64
    assert sorted({k["ffn_hidden"] for k in deit if not k["heads"]})[:3] == [1, 64, 128]  # auto: 768 / 16 -> 64
    for bad, msg in (("qk=0", "--grid-step qk: got 0, expected an integer >= 1"),
                     ("q=8", "--grid-step: got 'q', expected qk, v, ffn or heads"),
                     ("qk8", "expected NAME=INT"), ("v=x", "--grid-step v: got 'x', expected an integer")):
        with pytest.raises(SegmentError, match=msg):
            parse_grid_step(bad)


def test_grid_of_another_family_is_a_clear_error():
    with pytest.raises(SegmentError, match="--prune-grid: arch family 'efficientformer', expected deit or swin"):
        prune_grid_keys(vitslim.get_preset("efficientformer_l1"))


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_grid_networks_hold_every_entry_in_several_contexts(make):
    arch = make()
    keys = prune_grid_keys(arch, GridSpec(qk=4, v=4, ffn=16, heads=2))
    nets = grid_networks(arch, keys, contexts=2, seed=3)
    seen = {}
    for a in nets:
        for s in decompose(a):
            seen[s.id] = seen.get(s.id, 0) + 1
    assert all(seen.get(key_str(k), 0) >= 2 for k in keys)
    assert nets == grid_networks(arch, keys, contexts=2, seed=3)  # a re-run resumes on the same networks
    cal = grid_calibration_archs(arch, 6)
    assert cal[0] == arch and len(cal) == 6 and all(decompose(a) for a in cal)


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_pruned_block_is_attention_part_plus_ffn_part_multilinear_on_the_grid(make):
    arch = make()
    t = grid_table(arch)
    blocks = [s.key for s in decompose(arch) if s.key["op"] in ("vit_block", "swin_block")]
    k0 = blocks[-1]
    for h, q, v, f in ((1, 3, 5, 7), (2, 6, 2, 40), (k0["heads"], 1, k0["v_dim"], 1), (0, 0, 0, 23), (2, 7, 7, 0)):
        key = dict(k0, heads=h, qk_dim=q, v_dim=v, ffn_hidden=f)
        if "shifted" in key:
            key["shifted"] = k0["shifted"] and h > 0
        assert key_str(key) not in t.entries or (h == 0 or f == 0)
        assert t.has_split_grid(key)
        e = t.estimate(key)
        assert e.ms == pytest.approx(part_ms(key), rel=1e-12)
        if key_str(key) not in t.entries:
            assert e.source == "estimated"
    # a pruned arch: predict sums those block prices plus the overhead, one segment per non-empty block
    small = json.loads(json.dumps(arch))
    for st in small["stages"]:
        for j, b in enumerate(st["blocks"]):
            b.update(heads=1, qk_dim=3, v_dim=5, ffn_hidden=13 + j) if j == 0 else b.update(heads=0, qk_dim=0,
                                                                                              v_dim=0, ffn_hidden=0)
    segs = decompose(small)
    want = sum(part_ms(s.key) for s in segs)
    assert t.predict(small, interpolate=True) == pytest.approx(1.05 * want + 0.2 + 0.01 * len(segs), rel=1e-12)


def test_without_the_grid_corner_the_table_falls_back_to_its_old_estimate(monkeypatch):
    arch = tiny_deit()
    t = grid_table(arch)
    monkeypatch.setattr(LatencyTable, "_coord", lambda self, key: float(key["heads"] * (key["qk_dim"] + key["v_dim"])
                                                                        + key["ffn_hidden"] + 1))
    k0 = [s.key for s in decompose(arch) if s.key["op"] == "vit_block"][0]
    key = dict(k0, heads=2, qk_dim=3, v_dim=3, ffn_hidden=0)
    assert t.has_split_grid(key)
    del t.entries[key_str(dict(k0, heads=3, qk_dim=4, v_dim=4, ffn_hidden=0))]
    t._split = None
    assert not t.has_split_grid(key)
    assert t.estimate(key).source == "estimated"  # priced by the MACs fallback, not refused


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_prune_grid_on_the_command_line(capsys, tmp_path):
    a = tmp_path / "deit.yaml"
    vitslim.save_arch(tiny_deit(), a)
    out = tmp_path / "t.yaml"
    code, so, err = run(capsys, "latency", "build", "--arch", a, "--prune-grid", "--grid-step", "qk=4,v=8,ffn=32,heads=2",
                        "--out", out, "--dry-run")
    n = len({key_str(k) for k in arch_keys(tiny_deit()) + prune_grid_keys(tiny_deit(), GridSpec(4, 8, 32, 2))})
    assert code == 0 and f"{n} entries needed, 0 present, {n} to measure" in so, err
    code, so, err = run(capsys, "latency", "build", "--arch", a, "--prune-grid", "--grid-step", "qk=8,v=8,ffn=64,heads=2",
                        "--out", out, "--time-per-network", "0.001", "--min-samples", "3", "--contexts", "1",
                        "--calibrate", "4", "--no-drift-reference", "--quiet")
    assert code == 0, err
    t = LatencyTable.load(str(out))
    assert not t.missing(prune_grid_keys(tiny_deit(), GridSpec(8, 8, 64, 2)))
    assert t.built_for["prune_grid"] == {"qk": 8, "v": 8, "ffn": 64, "heads": 2}
    assert t.overhead["networks"] == 4 and t.overhead["provenance"] == "measured"  # the arch and 3 pruned variants
    small = json.loads(json.dumps(tiny_deit()))
    small["stages"][0]["blocks"][0].update(heads=2, qk_dim=3, v_dim=5, ffn_hidden=20)
    assert t.predict_stages(small, interpolate=True)["estimated"]  # priced from the grid
    code, so, _ = run(capsys, "latency", "build", "--arch", a, "--prune-grid", "--grid-step", "qk=8,v=8,ffn=64,heads=2",
                      "--out", out, "--dry-run")  # a re-run resumes: nothing left to measure
    assert code == 0 and f"{len(t)} present, 0 to measure" in so


def test_build_falls_back_from_a_calibration_slope_that_prices_every_network_alike(capsys, tmp_path, monkeypatch):
    """The rule `latency import` applies (a slope 1 + scale outside [0.5, 1.5] falls back to a constant) holds for
    build's own calibration too, and build prints the same note."""
    import latency_tables.build as lb
    from latency_tables.measure import Timing
    monkeypatch.setattr(lb, "time_networks", lambda backend, archs, *a, **k: [Timing(0.6, 0.6, 0.6, 5) for _ in archs])
    a = tmp_path / "deit.yaml"
    vitslim.save_arch(tiny_deit(), a)
    code, so, err = run(capsys, "latency", "build", "--arch", a, "--prune-grid", "--grid-step", "qk=8,v=8,ffn=64,heads=2",
                        "--out", tmp_path / "t.yaml", "--time-per-network", "0.001", "--min-samples", "3", "--contexts",
                        "1", "--calibrate", "4", "--no-drift-reference", "--quiet")
    assert code == 0, err
    assert "on 4 networks" in so and "\nnote: overhead: the least-squares slope" in so and "is outside [0.5, 1.5]" in so
    o = LatencyTable.load(str(tmp_path / "t.yaml")).overhead
    assert "note" in o and 1 + o["scale"] > 0  # a smaller network is predicted faster


@pytest.mark.parametrize("argv,needle", [
    (["--arch", "efficientformer_l1", "--prune-grid"], "--prune-grid: arch family 'efficientformer', expected deit or swin"),
    (["--space", "x.yaml", "--prune-grid"], "--prune-grid: expected --arch ARCH"),
    (["--arch", "deit_tiny", "--grid-step", "qk=4"], "--grid-step qk=4: only with --prune-grid"),
    (["--arch", "deit_tiny", "--prune-grid", "--grid-step", "heads=0"], "--grid-step heads: got 0, expected an integer >= 1"),
])
def test_bad_prune_grid_input_is_one_line(capsys, tmp_path, argv, needle):
    if "x.yaml" in argv:
        from lat_helpers import TINY
        argv = [TINY if a == "x.yaml" else a for a in argv]
    code, _, err = run(capsys, "latency", "build", *argv, "--out", tmp_path / "t.yaml", "--dry-run")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "t.yaml").exists()


def _entry(key, ms, source="measured"):
    from types import SimpleNamespace
    return SimpleNamespace(key=key, ms=ms, p10=0.5 * ms, p90=2.0 * ms, source=source)


def test_split_index_interpolates_between_the_nearest_measured_widths_only():
    """Hand-worked: ffn measured at 16, 32, 64 (not evenly spaced, not linear in f); 48 lies halfway
    between its neighbours 32 and 64, whatever 16 costs; outside the axis is not priced; estimated
    entries are never grid points; p10 and p90 are interpolated as themselves."""
    from latency_tables.grid import SplitIndex, attn_key, ffn_key
    g = ("vit_block", 17, 24)
    ents = [_entry(ffn_key(g, 16), 1.0), _entry(ffn_key(g, 32), 2.0), _entry(ffn_key(g, 64), 10.0),
            _entry(ffn_key(g, 48), 99.0, source="estimated")]
    # attention: corners of heads {1, 3} x qk {4, 8} x v {4, 8}, ms = h + q/4 + v/8 (multilinear)
    for h in (1, 3):
        for q in (4, 8):
            for v in (4, 8):
                ents.append(_entry(attn_key(g, h, q, v), h + q / 4 + v / 8))
    idx = SplitIndex(ents)
    assert idx.ffn_part(g, 48) == pytest.approx((6.0, 3.0, 12.0), rel=1e-12)
    assert idx.ffn_part(g, 24) == pytest.approx((1.5, 0.75, 3.0), rel=1e-12)
    assert idx.ffn_part(g, 32) == pytest.approx((2.0, 1.0, 4.0), rel=1e-12)
    assert idx.ffn_part(g, 65) is None and idx.ffn_part(g, 15) is None
    ms = 2 + 6 / 4 + 5 / 8
    assert idx.attn_part(g, 2, 6, 5) == pytest.approx((ms, 0.5 * ms, 2.0 * ms), rel=1e-12)
    assert idx.attn_part(g, 4, 6, 5) is None and idx.attn_part(g, 2, 9, 5) is None
    assert idx.attn_part(g, 2, 6, 9) is None


def test_split_index_junction_is_the_mean_gap_of_the_measured_whole_blocks():
    """Two measured whole blocks 0.3 and 0.1 ms above their parts: the junction is 0.2 (their mean);
    an estimated whole block (10 ms above) does not count."""
    from latency_tables.grid import SplitIndex, attn_key, ffn_key
    g = ("vit_block", 17, 24)
    ents = [_entry(ffn_key(g, 16), 1.0), _entry(ffn_key(g, 32), 2.0)]
    for h in (1, 2):
        ents.append(_entry(attn_key(g, h, 8, 8), float(h)))
    whole = lambda h, f: dict(attn_key(g, h, 8, 8), ffn_hidden=f)
    ents += [_entry(whole(1, 16), 1.0 + 1.0 + 0.3), _entry(whole(2, 32), 2.0 + 2.0 + 0.1),
             _entry(whole(2, 16), 2.0 + 1.0 + 10.0, source="estimated")]
    idx = SplitIndex(ents)
    assert idx.junction[g] == pytest.approx(0.2, rel=1e-12)
    # a pruned two-branch block between the grid points: parts interpolated, plus the junction
    assert idx.block(whole(2, 24))[0] == pytest.approx(2.0 + 1.5 + 0.2, rel=1e-12)
    assert idx.block(whole(2, 0))[0] == pytest.approx(2.0, rel=1e-12)  # one branch: no junction


def test_grid_of_blocks_of_one_geometry_spans_their_widest_widths():
    """Two blocks of one geometry (already pruned apart, in either order): one grid up to the widest of
    each width, heads {1, 3} x qk {1, 4, 8} x v {1, 4, 8} and ffn {1, 16, 32, 48, 64}, hand-listed."""
    for order in (1, -1):
        blocks = [{"type": "vit", "heads": 3, "qk_dim": 4, "v_dim": 8, "ffn_hidden": 64},
                  {"type": "vit", "heads": 2, "qk_dim": 8, "v_dim": 4, "ffn_hidden": 32}][::order]
        arch = vitslim.resolve_arch({"family": "deit", "input_size": 32, "num_classes": 10,
                                     "stem": {"patch_size": 8}, "stages": [{"width": 24, "blocks": blocks}]})
        keys = prune_grid_keys(arch, GridSpec(qk=4, v=4, ffn=16, heads=2))
        attn = {(k["heads"], k["qk_dim"], k["v_dim"]) for k in keys if k["heads"]}
        assert attn == {(h, q, v) for h in (1, 3) for q in (1, 4, 8) for v in (1, 4, 8)}
        assert sorted(k["ffn_hidden"] for k in keys if not k["heads"]) == [1, 16, 32, 48, 64]
        assert len(keys) == 18 + 5


def test_a_distilled_deit_grid_fits_its_networks_and_one_head_count_means_one_and_all():
    """A distilled DeiT's blocks see two prefix tokens: its grid entries fit its own block positions. heads=1
    puts just the two ends on the head axis."""
    arch = json.loads(json.dumps(tiny_deit()))
    arch["distillation"] = True
    arch = vitslim.resolve_arch(arch)
    keys = prune_grid_keys(arch, GridSpec(qk=4, v=4, ffn=16, heads=2))
    assert {k["tokens"] for k in keys} == {4 * 4 + 2}
    seen = {}
    for a in grid_networks(arch, keys, contexts=2, seed=0):
        for s in decompose(a):
            seen[s.id] = seen.get(s.id, 0) + 1
    assert all(seen.get(key_str(k), 0) >= 2 for k in keys)
    one = prune_grid_keys(tiny_deit(), GridSpec(qk=4, v=4, ffn=16, heads=1))
    assert sorted({k["heads"] for k in one if k["heads"]}) == [1, 3]


def test_split_index_of_scattered_attention_entries_keeps_every_axis():
    """Attention-only entries that form no lattice (several pruned archs' blocks, no grid built): the index
    still loads, prices each measured point exactly, and prices nothing it has no corners for (the axes
    pruning away sparse values stopped at one value each: it emptied an axis and divided by zero)."""
    from latency_tables.grid import SplitIndex, attn_key
    g = ("vit_block", 17, 24)
    pts = [(3, 4, 4), (3, 8, 8), (2, 4, 8), (3, 16, 16)]
    idx = SplitIndex([_entry(attn_key(g, h, q, v), h + q + v) for h, q, v in pts])
    assert all(len(ax) >= 1 for ax in idx.attn_axes[next(iter(idx.attn_axes))])
    for h, q, v in pts:
        got = idx.attn_part(g, h, q, v)
        assert got is None or got[0] == pytest.approx(h + q + v)
    assert idx.attn_part(g, 3, 6, 6) is None
