"""Randomized differential checks of the latency tables (seeded: a failure names its case and reproduces):
what a table predicts is the sum of the entries one looks up by hand, a network's segments account for
all of its MACs, the compiled scorer agrees with predict, and the width grid interpolates multilinearly."""
import random

import numpy as np
import pytest

from random_archs import FAMILIES, random_arch
from latency_tables.grid import GridSpec, prune_grid_keys
from latency_tables.segments import decompose, key_str, segment_macs, space_keys
from latency_tables.table import LatencyTable
from supernet.count import count
from supernet.space import load_space

DEVICE = {"backend": "torch-cpu", "device": "test", "threads": 1, "batch_size": 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_predict_is_the_sum_of_the_entries_plus_the_overhead(family):
    r = random.Random(f"predict-{family}")
    for case in range(8):
        arch = random_arch(family, r)
        over = {"scale": r.uniform(0, 0.2), "intercept_ms": r.uniform(0, 1), "per_segment_ms": r.uniform(0, 0.01)}
        table = LatencyTable(DEVICE, overhead=over)
        ms = {}
        segs = decompose(arch)
        for s in segs:
            if key_str(s.key) not in ms:
                ms[key_str(s.key)] = v = r.uniform(0.01, 5.0)
                table.set(s.key, v, 0.9 * v, 1.1 * v, 5)
        total = sum(ms[key_str(s.key)] for s in segs)
        hand = total * (1 + over["scale"]) + over["intercept_ms"] + over["per_segment_ms"] * len(segs)
        st = table.predict_stages(arch)
        parts = sum(v for k, v in st.items() if k not in ("total", "estimated"))
        for got in (table.predict(arch), st["total"], parts):
            assert got == pytest.approx(hand, rel=1e-12), (case, arch)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_networks_segments_hold_all_of_its_macs(family):
    # segment_macs is also the coordinate the table interpolates in: every op's MACs must count (EfficientViT's
    # and SHViT's BatchNorm1d head refused a batch of one when the segment ran in training mode)
    r = random.Random(f"segments-{family}")
    for case in range(3):
        arch = random_arch(family, r)
        assert sum(segment_macs(s.key) for s in decompose(arch)) == count(arch)["macs"], (case, arch)


def test_a_staged_head_missing_from_the_table_is_interpolated():
    t = LatencyTable(DEVICE)
    key = {"op": "staged_head", "res": 4, "dim": 192, "classes": 1000, "distillation": False}
    t.set(key, 1.0, 1.0, 1.0, 3)
    t.set(dict(key, dim=256), 2.0, 2.0, 2.0, 3)
    e = t.estimate(dict(key, dim=224))
    assert e.source == "estimated" and 1.0 < e.ms < 2.0


def test_the_compiled_scorer_equals_predict_on_random_choices():
    space = load_space("tiny")
    r = random.Random("compiled")
    table = LatencyTable(DEVICE, overhead={"scale": 0.07, "intercept_ms": 0.3, "per_segment_ms": 0.002})
    for k in space_keys(space):
        v = r.uniform(0.01, 3.0)
        table.set(k, v, v, v, 3)
    choices = [space.sample(r) for _ in range(100)]
    got = table.compile(space).score_choices(choices)
    want = np.array([table.predict(space.to_arch(c)) for c in choices])
    np.testing.assert_allclose(got, want, rtol=1e-12)



def _grid_table(arch, spec, attn_ms, ffn_ms, junction):
    """A table holding the arch's width grid priced by attn_ms(geometry key, h, q, v) and ffn_ms(key, f), and the
    arch's own block entries (as `latency build --prune-grid --arch` measures them) priced as the sum of their parts,
    plus `junction` where a block has both."""
    t = LatencyTable(DEVICE)
    blocks = [s.key for s in decompose(arch) if s.key["op"] in ("vit_block", "swin_block")]
    for k in prune_grid_keys(arch, spec):
        h, f = k["heads"], k["ffn_hidden"]
        if k["op"] in ("vit_block", "swin_block") and not (h and f):
            ms = attn_ms(k, h, k["qk_dim"], k["v_dim"]) if h else ffn_ms(k, f)
            t.set(k, ms, ms, ms, 3)
    for k in blocks:
        h, f = k["heads"], k["ffn_hidden"]
        if (h or f) and k not in t:
            ms = (attn_ms(k, h, k["qk_dim"], k["v_dim"]) if h else 0.0) + (ffn_ms(k, f) if f else 0.0) \
                + (junction if h and f else 0.0)
            t.set(k, ms, ms, ms, 3)
    return t, blocks


def _random_widths(r, k):
    h = r.randint(0, k["heads"])
    return dict(k, heads=h, qk_dim=r.randint(1, k["qk_dim"]) if h else 0, v_dim=r.randint(1, k["v_dim"]) if h else 0,
                ffn_hidden=r.randint(0, k["ffn_hidden"]) if h else r.randint(1, k["ffn_hidden"]))


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_the_width_grid_reproduces_a_multilinear_latency_exactly(family):
    # multilinear interpolation is exact on a multilinear function: attention part multilinear in (heads, qk, v),
    # FFN part linear in ffn_hidden, and a constant junction where a block has both branches
    r = random.Random(f"grid-{family}")
    for case in range(6):
        arch = random_arch(family, r)
        if not any(b["heads"] and b["ffn_hidden"] for st in arch["stages"] for b in st["blocks"]):
            continue
        c = [r.uniform(0.01, 1.0) for _ in range(10)]
        attn = lambda k, h, q, v: c[0] + c[1] * h + c[2] * q + c[3] * v + c[4] * h * q + c[5] * h * v + c[6] * q * v \
            + c[7] * h * q * v  # noqa: E731
        ffn = lambda k, f: c[8] + c[9] * f  # noqa: E731
        junction = r.uniform(-0.05, 0.05)
        spec = GridSpec(qk=r.randint(1, 4), v=r.randint(1, 4), ffn=r.randint(1, 16), heads=r.randint(1, 3))
        table, blocks = _grid_table(arch, spec, attn, ffn, junction)
        for k in blocks:
            if not (k["heads"] and k["ffn_hidden"]):
                continue
            for _ in range(10):
                w = _random_widths(r, k)
                h, f = w["heads"], w["ffn_hidden"]
                want = (attn(w, h, w["qk_dim"], w["v_dim"]) if h else 0.0) + (ffn(w, f) if f else 0.0) \
                    + (junction if h and f else 0.0)
                assert table.lookup(w, interpolate=True).ms == pytest.approx(want, rel=1e-9, abs=1e-12), (case, w)


def test_the_width_grid_is_monotone_where_its_entries_are():
    r = random.Random("grid-monotone")
    for case in range(6):
        arch = random_arch(r.choice(["deit", "swin"]), r)
        spec = GridSpec(qk=r.randint(1, 3), v=r.randint(1, 3), ffn=r.randint(1, 8), heads=r.randint(1, 3))
        inc = {}  # entries monotone in every width: cumulative sums of positive random steps, and their product

        def m(axis, x):
            return sum(inc.setdefault((axis, y), r.uniform(0.001, 0.5)) for y in range(1, x + 1))

        def mono(*xs):
            return sum(m(i, x) for i, x in enumerate(xs)) + m(0, xs[0]) * m(1, xs[1]) * m(2, xs[2])
        table, blocks = _grid_table(arch, spec, lambda k, h, q, v: mono(h, q, v), lambda k, f: m(3, f), 0.0)
        for k in blocks:
            if not (k["heads"] and k["ffn_hidden"]):
                continue
            for _ in range(10):
                w = _random_widths(r, k)
                if not w["heads"]:
                    continue
                base = table.lookup(w, interpolate=True).ms
                for field in ("heads", "qk_dim", "v_dim", "ffn_hidden"):
                    # (not an FFN appearing: a two-branch block adds the measured junction, which may be < 0)
                    if w[field] < k[field] and (field != "ffn_hidden" or w[field] > 0):
                        up = table.lookup(dict(w, **{field: w[field] + 1}), interpolate=True).ms
                        assert up >= base - 1e-12, (case, w, field)


def test_a_block_of_one_head_has_a_width_grid():
    # the heads axis of a one-head block is [1]: it divided by (points - 1) = 0
    import vitslim
    arch = vitslim.resolve_arch({"family": "deit", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 8},
                                 "stages": [{"width": 24, "blocks": [{"type": "vit", "heads": 1, "qk_dim": 8, "v_dim": 8,
                                                                      "ffn_hidden": 64}]}]})
    keys = prune_grid_keys(arch, GridSpec(qk=4, v=4, ffn=32, heads=3))
    assert {k["heads"] for k in keys if k["ffn_hidden"] == 0} == {1}


def test_a_blocks_own_entry_off_the_grid_leaves_the_grid_whole():
    # a one-branch block of the arch (qk_dim 11, between the grid's 8 and 16) is an attention-only entry of the same
    # geometry: its value joined the qk axis, the grid lost its corners at 11 and every Q/K width from 9 to 15 fell
    # back to interpolation in MACs
    import vitslim
    arch = vitslim.resolve_arch({"family": "deit", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 8},
                                 "stages": [{"width": 24, "blocks": [
                                     {"type": "vit", "heads": 3, "qk_dim": 16, "v_dim": 16, "ffn_hidden": 64},
                                     {"type": "vit", "heads": 2, "qk_dim": 11, "v_dim": 16, "ffn_hidden": 0}]}]})
    attn = lambda k, h, q, v: 0.05 + 0.01 * h + 0.002 * h * q + 0.002 * h * v  # noqa: E731
    ffn = lambda k, f: 0.02 + 0.0005 * f  # noqa: E731
    table, _ = _grid_table(arch, GridSpec(qk=8, v=8, ffn=32, heads=3), attn, ffn, 0.0)
    for q in range(1, 17):
        key = {"op": "vit_block", "tokens": 17, "dim": 24, "heads": 3, "qk_dim": q, "v_dim": 8, "ffn_hidden": 40}
        assert table.has_split_grid(key), q
        assert table.lookup(key, interpolate=True).ms == pytest.approx(attn(key, 3, q, 8) + ffn(key, 40), rel=1e-12)
