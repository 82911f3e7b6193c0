"""Randomized differential checks of the latency tables (seeded: a failure names its case and reproduces):
what a table predicts is the sum of the entries one looks up by hand, a network's segments account for
all of its MACs, the compiled scorer agrees with predict, and the width grid interpolates multilinearly."""
import itertools
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

