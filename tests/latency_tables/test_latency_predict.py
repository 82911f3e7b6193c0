"""predict = (1 + scale) * sum of entries + intercept; missing entries name themselves; interpolation
is explicit and flagged; the compiled space scorer agrees with predict."""
import random

import numpy as np
import pytest

import vitslim
from latency_tables import LatencyError, MissingEntriesError
from latency_tables.segments import decompose, key_str
from lat_helpers import fake_ms


def test_predict_is_sum_of_entries_plus_overhead(tiny_space, tiny_table):
    rng = random.Random(0)
    for _ in range(10):
        arch = tiny_space.to_arch(tiny_space.sample(rng))
        segs = decompose(arch)
        s = sum(fake_ms(seg.key) for seg in segs)
        assert tiny_table.predict(arch) == pytest.approx(1.1 * s + 0.25 + 0.01 * len(segs), rel=1e-9)


def test_predict_stages_split_adds_up(tiny_space, tiny_table):
    arch = tiny_space.to_arch(tiny_space.largest_choice())
    st = tiny_table.predict_stages(arch)
    parts = [v for k, v in st.items() if k not in ("total", "overhead", "estimated")]
    assert set(st) >= {"stem", "stage0", "stage1", "stage2", "stage3", "head"}
    assert sum(parts) + st["overhead"] == pytest.approx(st["total"])
    assert st["total"] == pytest.approx(tiny_table.predict(arch))
    assert st["estimated"] == []


def test_identity_blocks_cost_nothing(tiny_space, tiny_table):
    c = tiny_space.largest_choice()
    full = tiny_table.predict(tiny_space.to_arch(c))
    c["blocks"][1][1] = "identity"
    assert tiny_table.predict(tiny_space.to_arch(c)) < full
    assert not any(s.key["op"] == "identity" for s in decompose(tiny_space.to_arch(c)))


def test_missing_entries_error_names_every_one(tiny_space, tiny_table):
    arch = tiny_space.to_arch(tiny_space.largest_choice())
    gone = [s.id for s in decompose(arch) if s.key["op"] in ("meta4d", "efficientformer_head")]
    for g in set(gone):
        del tiny_table.entries[g]
    with pytest.raises(MissingEntriesError) as e:
        tiny_table.predict(arch)
    for g in set(gone):
        assert g in str(e.value)
    assert {key_str(k) for k in tiny_table.missing(arch)} == set(gone)


def test_interpolation_is_explicit_and_flagged(tiny_space, tiny_table):
    arch = tiny_space.to_arch({"widths": [16, 32, 48, 64], "blocks": [["meta4d", "identity"], ["meta4d", "meta4d"],
                                                                    ["meta4d", "meta3d", "identity"],
                                                                    ["meta4d", "identity", "identity"]]})
    target = next(s for s in decompose(arch) if s.key["op"] == "meta4d" and s.key["dim"] == 32)
    true_ms = tiny_table.entries[target.id].ms
    del tiny_table.entries[target.id]
    with pytest.raises(MissingEntriesError, match="meta4d"):
        tiny_table.predict(arch)
    st = tiny_table.predict_stages(arch, interpolate=True)
    assert st["estimated"] == [target.id]
    e = tiny_table.estimate(target.key)
    assert e.source == "estimated" and e.n == 0
    assert e.ms == pytest.approx(true_ms, rel=0.25)  # fake times are linear in MACs: close
    assert target.id not in tiny_table.entries  # an estimate is never stored as a measurement


def test_interpolation_without_neighbours_is_an_error(tiny_space, tiny_table):
    arch = tiny_space.to_arch(tiny_space.largest_choice())
    for s in list(tiny_table.entries):
        if s.startswith("efficientformer_stem"):
            del tiny_table.entries[s]
    with pytest.raises(LatencyError, match="cannot interpolate efficientformer_stem"):
        tiny_table.predict(arch, interpolate=True)


def test_arch_of_an_uncovered_family_is_a_clear_error(tiny_table):
    with pytest.raises(MissingEntriesError, match="vit_embed"):
        tiny_table.predict(vitslim.get_preset("deit_tiny"))


def test_compiled_scores_equal_predict(tiny_space, tiny_table):
    comp = tiny_table.compile(tiny_space)
    rng = random.Random(1)
    choices = [tiny_space.sample(rng) for _ in range(200)] + [tiny_space.largest_choice()]
    codes = comp.encode_batch(choices)
    scores = comp.score(codes)
    ref = np.array([tiny_table.predict(tiny_space.to_arch(c)) for c in choices])
    np.testing.assert_allclose(scores, ref, rtol=1e-9)
    assert comp.decode(codes[3]) == tiny_space.check_choice(choices[3])



def test_compiled_scores_equal_predict_when_every_entry_has_its_own_ms(tiny_space, tiny_table):
    """The made-up ms follow MACs, so entries without MACs (the head from a map or from tokens, to_tokens,
    to_map) all cost the same and the scorer could take one for another unseen: here every entry gets its
    own ms, and the choices cover a last stage with and without a Meta3D (the head's two columns)."""
    rng = random.Random(2)
    for s, e in tiny_table.entries.items():
        ms = rng.uniform(0.1, 2.0)
        tiny_table.set(e.key, ms, ms, ms, e.n, e.source)
    comp = tiny_table.compile(tiny_space)
    choices = [tiny_space.sample(rng) for _ in range(200)]
    last3d = {"meta3d" in c["blocks"][-1] for c in (tiny_space.check_choice(c) for c in choices)}
    assert last3d == {True, False}
    ref = np.array([tiny_table.predict(tiny_space.to_arch(c)) for c in choices])
    np.testing.assert_allclose(comp.score(comp.encode_batch(choices)), ref, rtol=1e-9)

def test_compiled_refuses_invalid_codes(tiny_space, tiny_table):
    comp = tiny_table.compile(tiny_space)
    row = comp.encode(tiny_space.largest_choice())
    bad = row.copy()
    bad[0] = 99
    with pytest.raises(LatencyError, match="width index 99"):
        comp.score(bad[None])
    bad = row.copy()
    bad[comp.n_stages] = 1  # meta3d in stage 0: not a candidate there
    with pytest.raises(LatencyError, match="stage 0 position 0"):
        comp.score(bad[None])
    bad = row.copy()
    s2 = comp.n_stages + 4  # stage 2 starts after 2 + 2 positions
    bad[s2], bad[s2 + 1] = 1, 0  # meta4d after meta3d
    with pytest.raises(LatencyError, match="no meta4d after a meta3d"):
        comp.score(bad[None])


def test_compile_names_missing_entries(tiny_space, tiny_table):
    victim = next(s for s in tiny_table.entries if s.startswith("meta3d"))
    del tiny_table.entries[victim]
    with pytest.raises(MissingEntriesError, match="meta3d"):
        tiny_table.compile(tiny_space)
    comp = tiny_table.compile(tiny_space, interpolate=True)
    assert comp.estimated == [victim]


def test_estimate_is_linear_in_the_coordinate_between_measured_neighbours_and_proportional_outside():
    """Between the nearest measured entries below and above (in MACs + input size), ms, p10 and p90 are each
    linear; above the largest, scaled by the coordinate from it. An estimated entry is never a neighbour.
    Checked on made-up entries that are exactly linear in the coordinate (each of ms, p10, p90 its own line)."""
    from latency_tables.table import LatencyTable
    t = LatencyTable({"backend": "torch-cpu", "device": "test"})
    key = lambda d: {"op": "meta4d", "res": 7, "dim": d, "ffn_hidden": 4 * d}  # noqa: E731
    x = {d: t._coord(key(d)) for d in (16, 32, 40, 48, 64, 80)}
    line = lambda d: (0.2 + x[d] * 1e-6, 0.1 + x[d] * 0.9e-6, 0.5 + x[d] * 1.2e-6)  # noqa: E731 - ms, p10, p90
    for d in (16, 64):
        ms, p10, p90 = line(d)
        t.set(key(d), ms, p10, p90, 9)
    t.set(key(40), 10 * line(40)[0], 10 * line(40)[0], 10 * line(40)[0], 0, "estimated")  # a bad estimate, stored
    for d in (32, 48):
        e = t.estimate(key(d))
        assert e.source == "estimated"
        np.testing.assert_allclose([e.ms, e.p10, e.p90], line(d), rtol=1e-12)
    e = t.estimate(key(80))
    np.testing.assert_allclose([e.ms, e.p10, e.p90], np.array(line(64)) * x[80] / x[64], rtol=1e-12)
