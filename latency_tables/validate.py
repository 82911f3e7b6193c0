"""How good a table is: sample networks from a space (plus the presets it covers), measure each end
to end on the table's backend, and compare with `predict` (MAPE, max error, share within +-5% /
+-10%, Spearman rank correlation). The noise floor is the same comparison between two independent
measurements of the same networks.
"""
from __future__ import annotations

import random
from typing import List, Mapping, Optional, Sequence

import numpy as np

from .measure import DriftReference, Procedure, time_networks
from .table import LatencyTable


def metrics(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """{"samples", "mape", "max_error", "within_5", "within_10", "spearman"}, errors relative to `measured`,
    all fractions (0.03 = 3%)."""
    from scipy.stats import spearmanr
    p = np.asarray(predicted, float)
    m = np.asarray(measured, float)
    if p.shape != m.shape:
        raise ValueError(f"predicted and measured differ in length ({p.size} vs {m.size})")
    if p.size == 0:
        return {"samples": 0, "mape": None, "max_error": None, "within_5": None, "within_10": None, "spearman": None}
    err = np.abs(p - m) / m
    rho = float(spearmanr(p, m)[0]) if p.size >= 2 and np.ptp(p) > 0 and np.ptp(m) > 0 else None
    return {"samples": int(p.size), "mape": float(err.mean()), "max_error": float(err.max()),
            "within_5": float((err <= 0.05).mean()), "within_10": float((err <= 0.10).mean()),
            "spearman": rho}


def sample_archs(space, n: int, seed: int = 0) -> List[dict]:
    rng = random.Random(seed)
    return [space.to_arch(space.sample(rng)) for _ in range(n)]


def fitting_presets(table: LatencyTable, space=None) -> List[str]:
    """Presets whose every entry is in the table (and, with a space, of its family and input size)."""
    from supernet.arch import validate
    from supernet.registry import get_preset, preset_names
    out = []
    for name in preset_names():
        a = validate(get_preset(name))
        if space is not None and (a["family"] != space.family or a["input_size"] != space.input_size):
            continue
        try:
            if not table.missing(a):
                out.append(name)
        except Exception:  # noqa: BLE001 - a family the tables do not decompose
            continue
    return out


def validate_table(table: LatencyTable, backend, archs: Sequence[Mapping], proc: Procedure,
                   names: Optional[Sequence[str]] = None, noise: bool = False, interpolate: bool = False,
                   group: int = 16, progress=None, reference: Optional[DriftReference] = None) -> dict:
    """Measure `archs` end to end and compare with the table. With `noise`, every network is measured a
    second time (another interleaved pass) and the two passes are compared the same way. With a
    `reference` (the table's drift reference), measurements are drift-corrected like the table's."""
    predicted = [table.predict(a, interpolate=interpolate) for a in archs]
    measured = [t.ms for t in time_networks(backend, archs, proc, group=group, progress=progress, reference=reference)]
    report = metrics(predicted, measured)
    rows = [{"name": (names[i] if names else f"sample{i}"), "predicted_ms": round(p, 4), "measured_ms": round(m, 4),
             "error": round((p - m) / m, 5)} for i, (p, m) in enumerate(zip(predicted, measured))]
    report["networks"] = rows
    if reference is not None:
        report["drift_factor_range"] = [round(min(reference.factors), 4), round(max(reference.factors), 4)]
    if noise:
        proc2 = proc.with_seed(proc.seed + 7919)
        again = [t.ms for t in time_networks(backend, archs, proc2, group=group, progress=progress, reference=reference)]
        nf = metrics(again, measured)
        report["noise_floor"] = {k: nf[k] for k in ("samples", "mape", "max_error", "within_5", "within_10", "spearman")}
        report["noise_floor"]["what"] = "a second measurement of the same networks compared with the first"
        for r, a2 in zip(rows, again):
            r["remeasured_ms"] = round(a2, 4)
    return report
