"""Building: only missing entries are measured (a re-run resumes), the table is saved after every
entry, a table of another device is never resumed into, and the overhead fit is right."""
import os

import numpy as np
import pytest

from latency_tables import Backend, BackendError, LatencyError, LatencyTable, get_backend
from latency_tables.build import (covering_archs, fit_overhead, measure_entries, measure_in_context, middle_arch,
                                  needed_keys, open_table, table_reference)
from latency_tables.segments import decompose, key_str
from latency_tables.measure import Procedure

QUICK = Procedure(time_per_item=0.001, min_samples=3, max_samples=5, warmup=0.0)


class CountingBackend(Backend):
    """Runs nothing; counts how many entries it was asked to prepare."""

    name = "torch-cpu"

    def __init__(self, fail_after=None):
        super().__init__()
        self.prepared = 0
        self.fail_after = fail_after

    def device_name(self):
        return "Fake CPU 3000"

    def prepare_fn(self, module, input_shape):
        if self.fail_after is not None and self.prepared >= self.fail_after:
            raise KeyboardInterrupt
        self.prepared += 1
        return (lambda x: x), None


def test_rerun_measures_only_what_is_missing(tmp_path, tiny_space):
    keys = needed_keys(tiny_space)[:24]
    p = str(tmp_path / "t.yaml")
    b = CountingBackend()
    t = open_table(p, b)
    assert measure_entries(t, keys[:10], b, QUICK, group=4) == 10
    assert b.prepared == 10 and len(LatencyTable.load(p)) == 10
    b2 = CountingBackend()
    t2 = open_table(p, b2)
    assert measure_entries(t2, keys, b2, QUICK, group=4) == len(keys) - 10
    assert b2.prepared == len(keys) - 10
    b3 = CountingBackend()
    assert measure_entries(open_table(p, b3), keys, b3, QUICK) == 0 and b3.prepared == 0
    assert len(LatencyTable.load(p)) == len(keys)


def test_covering_networks_contain_every_entry_in_several_contexts(tiny_space):
    keys = needed_keys(tiny_space)
    nets = covering_archs(tiny_space, keys, contexts=2)
    seen = {}
    for a in nets:
        for s in decompose(a):
            seen[s.id] = seen.get(s.id, 0) + 1
    assert all(seen.get(key_str(k), 0) >= 2 for k in keys)


def test_in_context_rerun_measures_only_what_is_missing(tmp_path, tiny_space):
    keys = needed_keys(tiny_space)
    p = str(tmp_path / "t.yaml")
    b = CountingBackend()
    t = open_table(p, b)
    first = keys[:20]
    n = measure_in_context(t, first, covering_archs(tiny_space, first), b, QUICK, group=4)
    assert n == 20 and set(LatencyTable.load(p).entries) == {key_str(k) for k in first}
    b2 = CountingBackend()
    t2 = open_table(p, b2)
    rest = t2.missing(keys)
    assert measure_in_context(t2, keys, covering_archs(tiny_space, rest), b2, QUICK, group=4) == len(keys) - 20
    assert len(LatencyTable.load(p)) == len(keys)
    b3 = CountingBackend()
    assert measure_in_context(open_table(p, b3), keys, covering_archs(tiny_space, keys), b3, QUICK) == 0
    assert b3.prepared == 0  # nothing missing: no network is even built


def test_interrupted_in_context_build_continues_where_it_stopped(tmp_path, tiny_space):
    keys = needed_keys(tiny_space)
    nets = covering_archs(tiny_space, keys, contexts=2)
    p = str(tmp_path / "t.yaml")
    per_net = [len(decompose(a)) for a in nets]
    b = CountingBackend(fail_after=sum(per_net[:6]) + 1)  # dies while building the 7th network
    with pytest.raises(KeyboardInterrupt):
        measure_in_context(open_table(p, b), keys, nets, b, QUICK, group=3)
    assert os.path.exists(p + ".partial.json")
    b2 = CountingBackend()
    t2 = open_table(p, b2)
    measure_in_context(t2, keys, nets, b2, QUICK, group=3)
    assert b2.prepared <= sum(per_net[6:])  # the first two groups were not run again
    assert not t2.missing(keys) and not os.path.exists(p + ".partial.json")


def test_a_sidecar_of_another_setup_is_not_mixed_in(tmp_path, tiny_space):
    """An interrupted build's samples are reused only by a build of the same setup (threads, batch, ...)."""
    keys = needed_keys(tiny_space)
    nets = covering_archs(tiny_space, keys, contexts=2)
    p = str(tmp_path / "t.yaml")
    per_net = [len(decompose(a)) for a in nets]
    b = CountingBackend(fail_after=sum(per_net[:6]) + 1)
    with pytest.raises(KeyboardInterrupt):
        measure_in_context(open_table(p, b), keys, nets, b, QUICK, group=3)
    os.remove(p)  # the table goes, the sidecar stays; the next build is at another batch size
    b2 = CountingBackend()
    t2 = open_table(p, b2)
    t2.device["batch_size"] = 4
    measure_in_context(t2, keys, nets, b2, QUICK, group=3)
    assert b2.prepared == sum(per_net)  # every network ran again: nothing of the batch-1 samples was used
    assert not t2.missing(keys)


def test_drift_reference_is_a_middle_member_stored_with_the_table(tmp_path, tiny_space):
    keys = needed_keys(tiny_space)[:10]
    p = str(tmp_path / "t.yaml")
    b = CountingBackend()
    t = open_table(p, b)
    ref = table_reference(t, b, True, tiny_space)
    measure_in_context(t, keys, covering_archs(tiny_space, keys), b, QUICK, reference=ref)
    stored = LatencyTable.load(p).measurement["reference"]
    assert stored["arch"] == middle_arch(tiny_space) and "ms" in stored
    again = table_reference(LatencyTable.load(p), b)  # validation reuses the same network and level
    assert again.arch == stored["arch"] and again.ms == stored["ms"]


def test_in_context_entries_are_medians_of_real_steps(tmp_path, tiny_space):
    b = get_backend("torch-cpu")
    t = open_table(str(tmp_path / "t.yaml"), b)
    arch = tiny_space.to_arch(tiny_space.largest_choice())
    keys = [s.key for s in decompose(arch)]
    measure_in_context(t, keys, [arch], b, Procedure(0.001, 3, 5, 0.0, clock="thread"))
    assert not t.missing(arch)
    for k in keys:
        e = t.get(k)
        assert e.n >= 3 and 0 < e.p10 <= e.ms <= e.p90


def test_interrupted_build_keeps_every_finished_entry(tmp_path, tiny_space):
    keys = needed_keys(tiny_space)
    p = str(tmp_path / "t.yaml")
    b = CountingBackend(fail_after=6)
    with pytest.raises(KeyboardInterrupt):
        measure_entries(open_table(p, b), keys, b, QUICK, group=4)
    assert len(LatencyTable.load(p)) == 4  # the first group finished and was saved; the second was not
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_resuming_a_table_of_another_device_is_refused_and_leaves_it(tmp_path, tiny_space):
    p = str(tmp_path / "t.yaml")
    b = CountingBackend()
    measure_entries(open_table(p, b), needed_keys(tiny_space)[:3], b, QUICK)
    before = open(p, "rb").read()
    other = get_backend("onnxruntime")
    with pytest.raises(LatencyError, match="backend 'torch-cpu' vs 'onnxruntime'"):
        open_table(p, other)
    assert open(p, "rb").read() == before


def test_overhead_fit_recovers_scale_and_intercept():
    sums = [1.0, 2.0, 5.0, 9.0]
    over = fit_overhead(sums, [1.2 * s + 0.3 for s in sums])
    assert over["scale"] == pytest.approx(0.2, abs=1e-6) and over["intercept_ms"] == pytest.approx(0.3, abs=1e-6)
    assert over["mape_fitted"] == pytest.approx(0.0, abs=1e-6) and over["provenance"] == "measured"
    few = fit_overhead([1.0, 2.0], [1.5, 2.5])
    assert few["scale"] == 0.0 and few["intercept_ms"] == pytest.approx(0.5)
    sums, counts = [1.0, 2.0, 5.0, 9.0, 3.0, 7.0], [4, 9, 6, 12, 20, 5]
    three = fit_overhead(sums, [1.1 * s + 0.2 + 0.03 * c for s, c in zip(sums, counts)], counts)
    assert three["scale"] == pytest.approx(0.1, abs=1e-6) and three["per_segment_ms"] == pytest.approx(0.03, abs=1e-6)
    assert three["intercept_ms"] == pytest.approx(0.2, abs=1e-6)


def test_the_overhead_fit_minimises_the_relative_error():
    """Noisy times: the fit is least squares on the relative error (each network weighed by 1 / its time), so
    the gradient of sum(((slope * sum + intercept) - t) / t)^2 is zero at the answer (and not at the plain
    least-squares answer: the case tells them apart)."""
    s = np.array([1.0, 2.0, 4.0, 8.0])
    t = np.array([1.3, 2.1, 4.9, 8.2])
    over = fit_overhead(list(s), list(t))
    assert "note" not in over

    def grad(a, b):
        r = (a * s + b - t) / t
        return np.array([np.sum(r * s / t), np.sum(r / t)])
    assert np.abs(grad(1.0 + over["scale"], over["intercept_ms"])).max() < 2e-5  # the fit is stored to 6 decimals
    a, b = np.polyfit(s, t, 1)
    assert np.abs(grad(a, b)).max() > 1e-3


def test_the_overhead_fit_needs_three_networks_for_a_slope_and_six_for_a_per_segment_term():
    """Two networks: the median difference alone, even when their times grow faster than their sums. Five
    networks whose times include a per-segment cost: slope and constant only. With all sums equal (no slope to
    fit) the constant is the median difference: one outlier does not move it."""
    two = fit_overhead([1.0, 2.0], [1.2, 2.6])
    assert two["scale"] == 0.0 and two["intercept_ms"] == pytest.approx(0.4)
    sums, counts = [1.0, 2.0, 5.0, 9.0, 3.0], [4, 9, 6, 12, 20]
    five = fit_overhead(sums, [1.1 * s + 0.2 + 0.03 * c for s, c in zip(sums, counts)], counts)
    assert five["per_segment_ms"] == 0.0
    same = fit_overhead([2.0, 2.0, 2.0], [2.1, 2.2, 2.9])
    assert same["scale"] == 0.0 and same["intercept_ms"] == pytest.approx(0.2)


def test_entries_that_do_not_add_up_to_the_network_are_warned_about():
    from latency_tables.build import overhead_warning
    assert overhead_warning(fit_overhead([1.0, 2.0, 5.0], [1.1, 2.2, 5.4])) is None  # 10% off: an overhead
    one = overhead_warning(fit_overhead([50.0], [31.0]))  # one network, its entries sum 61% above it
    assert one and "61% above the 1 network" in one and "--calibrate" in one
    low = overhead_warning(fit_overhead([1.0, 2.0, 3.0, 4.0], [2.0, 3.5, 5.5, 7.0]))
    assert low and "below the 4 networks" in low and "--calibrate" not in low


def test_an_overhead_fit_whose_slope_is_implausible_falls_back_to_a_constant():
    """Networks all measured alike (a device's dispatch floor): least squares gives slope 1 + scale = 0 and
    predicts every network at the same time, whatever is pruned. A slope outside [0.5, 1.5] is not kept: the
    fit is the constant of fewer than 3 networks (the entries' differences kept), with a note saying why."""
    sums = [0.2, 0.3, 0.45, 0.5]
    flat = fit_overhead(sums, [0.6] * 4, [4, 4, 4, 4])
    assert flat["scale"] == 0.0 and flat["per_segment_ms"] == 0.0
    assert flat["intercept_ms"] == pytest.approx(0.6 - 0.375)  # the median residual
    assert flat["note"].startswith("the least-squares slope 0.000 (scale -1.0000, intercept +0.6000 ms) is outside "
                                   "[0.5, 1.5]") and "fitted as a constant alone" in flat["note"]
    steep = fit_overhead([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 5.0, 7.0])  # slope 2
    assert steep["scale"] == 0.0 and "slope 2.000" in steep["note"]
    # the constant of a flat fit far below the entries' sum would be negative: a scale alone, positive slope
    low = fit_overhead([2.0, 2.5, 3.0, 4.0], [0.6] * 4)
    assert low["intercept_ms"] == 0.0 and low["scale"] > -1.0 and "fitted as a scale alone" in low["note"]
    assert "fitted as a constant alone" not in low["note"]
    for ok in (fit_overhead([1.0, 2.0, 5.0, 9.0], [0.6 * s + 0.3 for s in [1.0, 2.0, 5.0, 9.0]]),
               fit_overhead([1.0, 2.0, 5.0, 9.0], [1.4 * s for s in [1.0, 2.0, 5.0, 9.0]])):
        assert "note" not in ok and ok["scale"] != 0.0  # inside the range: kept as fitted


def test_torch_cpu_measures_real_entries(tmp_path, tiny_space):
    b = get_backend("torch-cpu")
    d = b.describe()
    assert d["backend"] == "torch-cpu" and d["threads"] == 1 and d["fused"] is True and d["runtime"]["torch"]
    t = open_table(str(tmp_path / "t.yaml"), b)
    keys = [k for k in needed_keys(tiny_space) if k["op"] in ("meta4d", "meta3d")][:2]
    measure_entries(t, keys, b, Procedure(0.001, 3, 5, 0.0, clock="thread"))
    for k in keys:
        e = t.get(k)
        assert e.n >= 3 and 0 < e.p10 <= e.ms <= e.p90 and e.source == "measured"


def test_onnxruntime_backend_runs_an_entry(tiny_space):
    pytest.importorskip("onnxruntime")
    from latency_tables.measure import entry_runner
    b = get_backend("onnxruntime")
    key = next(k for k in needed_keys(tiny_space) if k["op"] == "meta3d")
    entry_runner(b, key)()  # exports, opens a session, runs once
    assert b.describe()["runtime"]["onnxruntime"]


def test_unknown_backend_and_bad_settings_are_clear_errors():
    with pytest.raises(BackendError, match="expected one of torch-cpu, torch-cuda, onnxruntime, coreml"):
        get_backend("tpu")
    with pytest.raises(BackendError, match="threads"):
        get_backend("torch-cpu", threads=0)


def test_cuda_backend_without_a_gpu_says_so(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, everywhere
    with pytest.raises(BackendError, match="no CUDA device"):
        get_backend("torch-cuda").check_available()


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_onnxruntime_backend_needs_both_packages_and_names_the_extra(monkeypatch, missing):
    import sys
    monkeypatch.setitem(sys.modules, missing, None)  # the import fails, as when the package is not installed
    with pytest.raises(BackendError, match=f"the {missing} package is not installed.*vitslim\\[export\\]"):
        get_backend("onnxruntime").check_available()


def test_an_overhead_fit_never_predicts_negative_latency():
    """Networks measured far faster than their entries sum to (entries timed another way): a least-squares
    line would have a large negative constant and predict below zero for small networks; the fit falls back
    to a scale alone, positive for any network."""
    from latency_tables.build import fit_overhead
    sums = [10.0, 12.0, 15.0, 20.0]
    measured = [2.0, 4.5, 8.0, 14.0]  # slope > 1, intercept about -13 ms
    o = fit_overhead(sums, measured, [10, 10, 10, 10])
    assert o["intercept_ms"] == 0.0 and o["per_segment_ms"] == 0.0 and "note" in o
    assert (1 + o["scale"]) * 0.1 > 0
    ok = fit_overhead([1.0, 2.0, 3.0], [1.2, 2.1, 3.3])  # an ordinary fit is untouched
    assert "note" not in ok and ok["intercept_ms"] != 0.0


def test_topping_up_a_few_entries_runs_only_the_networks_they_need(tmp_path, tiny_space):
    """`latency build` covers every entry (the same list on every re-run), so a table lacking a few entries (a head
    of another class count) ran every covering network; now only those holding a missing entry fewer than
    --contexts times over so far."""
    keys = needed_keys(tiny_space)
    nets = covering_archs(tiny_space, keys, contexts=2)
    p = str(tmp_path / "t.yaml")
    b = CountingBackend()
    measure_in_context(open_table(p, b), keys, nets, b, QUICK, group=4, contexts=2)
    full = b.prepared
    t = LatencyTable.load(p)
    gone = [k for k in keys if k["op"] == "head"] or keys[-2:]
    for k in gone:
        del t.entries[key_str(k)]
    t.save()
    b2 = CountingBackend()
    t2 = open_table(p, b2)
    measure_in_context(t2, t2.missing(keys), nets, b2, QUICK, group=4, contexts=2)
    assert not t2.missing(keys)
    holding = [a for a in nets if {s.id for s in decompose(a)} & {key_str(k) for k in gone}]
    run = b2.prepared
    assert run <= sum(len(decompose(a)) for a in holding[:2 * len(gone)]) < full, (run, full)


@pytest.mark.parametrize("name", ["tiny", "efficientformer_l1"])
def test_a_space_s_calibration_networks_span_it_and_are_priced_by_its_table(name):
    """`latency build --space S --calibrate N` (the default build) fits the overhead on the space's largest and
    smallest members and random ones: every one inside the space and made only of entries its table holds
    (else calibrate stops with 'needs entries the table lacks'), the same list on every re-run."""
    from latency_tables.build import calibration_archs, smallest_choice
    from latency_tables.segments import space_keys
    from lat_helpers import fake_table
    from supernet.space import load_space, shipped_space_file
    space = load_space(shipped_space_file(name))
    nets = calibration_archs(space, n=5)
    assert len(nets) == 5 and nets == calibration_archs(space, n=5)
    smallest = space.check_choice(smallest_choice(space))
    assert nets[0] == space.to_arch(space.largest_choice()) and nets[1] == space.to_arch(smallest)
    assert smallest["widths"] == [s.min_width for s in space.stages]
    table = fake_table(space_keys(space))
    assert all(table.missing(a) == [] for a in nets)
    assert table.predict(nets[1]) < table.predict(nets[0])
