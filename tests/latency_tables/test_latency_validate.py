"""Validation figures are computed right on known numbers, and the whole measure-and-compare path
reports them for networks sampled from a space."""
import pytest
from scipy.stats import spearmanr

from latency_tables import get_backend
from latency_tables.measure import Procedure
from latency_tables.validate import fitting_presets, metrics, sample_archs, validate_table
from lat_helpers import fake_table


def test_metrics_on_known_numbers():
    pred = [110.0, 95.0, 100.0, 130.0, 80.0]
    meas = [100.0, 100.0, 100.0, 100.0, 100.0]
    m = metrics(pred, meas)
    assert m["samples"] == 5
    assert m["mape"] == pytest.approx((0.10 + 0.05 + 0 + 0.30 + 0.20) / 5)
    assert m["max_error"] == pytest.approx(0.30)
    assert m["within_5"] == pytest.approx(2 / 5)   # 0.05 counts as within
    assert m["within_10"] == pytest.approx(3 / 5)
    p, q = [1.0, 2.0, 3.0, 4.0, 5.0], [1.1, 1.9, 3.5, 3.4, 5.2]
    assert metrics(p, q)["spearman"] == pytest.approx(spearmanr(p, q)[0])
    assert metrics(p, q)["spearman"] == pytest.approx(0.9)


def test_metrics_take_spearman_from_a_scipy_before_1_9(monkeypatch):
    """scipy < 1.9 returns SpearmanrResult(correlation, pvalue), without `.statistic`."""
    import collections
    import scipy.stats
    old = collections.namedtuple("SpearmanrResult", ["correlation", "pvalue"])
    monkeypatch.setattr(scipy.stats, "spearmanr", lambda a, b: old(*spearmanr(a, b)))
    assert metrics([1.0, 2.0, 3.0, 4.0, 5.0], [1.1, 1.9, 3.5, 3.4, 5.2])["spearman"] == pytest.approx(0.9)


def test_metrics_of_nothing_and_of_constants():
    assert metrics([], [])["samples"] == 0
    assert metrics([1.0, 1.0], [1.0, 2.0])["spearman"] is None  # undefined, not a crash


def test_validate_reports_every_network_and_the_noise_floor(tiny_space, tiny_keys):
    table = fake_table(tiny_keys)
    archs = sample_archs(tiny_space, 3, seed=0)
    rep = validate_table(table, get_backend("torch-cpu"), archs, Procedure(0.001, 3, 5, 0.0, clock="thread"),
                         noise=True)
    assert {"samples", "mape", "within_5", "within_10", "spearman", "max_error"} <= set(rep)
    assert rep["samples"] == 3 and len(rep["networks"]) == 3
    for r in rep["networks"]:
        assert r["measured_ms"] > 0 and r["remeasured_ms"] > 0
        assert r["predicted_ms"] == pytest.approx(table.predict(archs[rep["networks"].index(r)]), abs=1e-4)
    assert rep["noise_floor"]["samples"] == 3


def test_presets_that_fit_are_found(tiny_keys):
    from latency_tables.segments import arch_keys
    import vitslim
    table = fake_table(tiny_keys + arch_keys(vitslim.get_preset("efficientformer_l1")))
    assert fitting_presets(table) == ["efficientformer_l1"]
    assert fitting_presets(fake_table(tiny_keys)) == []
