"""The search's promise, checked: the found network is measured end to end on the table's backend
(the table's threads, batch, dtype, BatchNorm folding, clock and drift reference), and when it runs
more than `tolerance` over the target, the search is repeated under a tightened bound on the
*predicted* latency, so that the table's error on this kind of network is paid for:

    bound' = target * predicted / measured        (the table's measured/predicted ratio carried over)

Slimming continues from the network it stopped at (its trajectory is monotone); the other strategies
re-select under the new bound (their evaluations are cached). At most `max_rounds` measurements.

A measurement on a shared machine drifts with load; the table's drift reference (a fixed network
timed with every group) scales the time to the conditions the table was measured under, so it is
compared with the table's own numbers. Both the corrected and the raw time are reported.

Every round is kept in `verify.json` in the run directory (written atomically), so a resumed search
reuses measurements instead of taking new, different ones.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, List, Mapping, Optional

from supernet.arch import atomic_write_text

from .evaluator import choice_key
from .strategy import SearchError

VERIFY_FILE = "verify.json"
MODES = ("auto", "on", "off")


def unavailable_reason(table) -> Optional[str]:
    """None if this machine can measure for `table` (its backend runs here and, for CPU backends,
    the CPU is the one it was measured on; for CUDA, the same GPU), else why not."""
    from latency_tables.backends import BackendError, backend_for, cpu_model
    d = table.device
    name = d.get("backend", "torch-cpu")
    if name == "coreml":  # before building a backend: imported tables carry device settings of the phone
        return "Core ML tables are measured on Apple devices (the export-coreml / import route)"
    try:
        backend = backend_for(d)
        backend.check_available()
    except BackendError as e:
        return f"the table's backend {name} cannot run here ({e})"
    here = backend.device_name() if name == "torch-cuda" else cpu_model()
    if d.get("device") and d.get("device") != here:
        return f"the table was measured on {d.get('device')!r}, this machine is {here!r}"
    return None


def measure_arch(table, arch: Mapping, seconds: float = 1.0, seed: int = 0) -> dict:
    """{"ms": drift-corrected median, "raw_ms", "drift_factor", "p10", "p90", "n"} of `arch` run end to
    end with the table's backend settings and procedure."""
    from latency_tables.backends import backend_for
    from latency_tables.build import table_reference
    from latency_tables.measure import Procedure, resolve_clock, time_networks
    backend = backend_for(table.device)
    m = table.measurement or {}
    proc = Procedure(time_per_item=float(seconds), min_samples=int(m.get("min_samples", 15)),
                     max_samples=int(m.get("max_samples", 2000)), warmup=float(m.get("warmup_s", 0.05)), seed=seed,
                     clock=resolve_clock(m.get("clock") or "auto", backend))
    ref = table_reference(table, backend, True)
    t = time_networks(backend, [dict(arch)], proc, reference=ref)[0]
    f = ref.factors[-1] if ref is not None and ref.factors else 1.0
    return {"ms": float(t.ms), "raw_ms": float(t.ms / f), "drift_factor": float(f), "p10": float(t.p10),
            "p90": float(t.p90), "n": int(t.n)}


@dataclass
class Verifier:
    """Checks a found network against the target. `measure(arch) -> dict with "ms"` is injectable
    (tests, remote devices); by default `measure_arch` on the table's backend."""
    table: object
    tolerance: float = 0.05
    seconds: float = 1.0
    max_rounds: int = 4
    measure: Optional[Callable[[Mapping], dict]] = None
    path: Optional[str] = None

    def __post_init__(self):
        if not (0 <= float(self.tolerance) < 1):
            raise SearchError(f"--tolerance: got {self.tolerance!r}, expected a fraction in [0, 1) (0.05 = 5%)")
        if not float(self.seconds) > 0:
            raise SearchError(f"--verify-seconds: got {self.seconds!r}, expected seconds > 0")
        if int(self.max_rounds) < 1:
            raise SearchError(f"--verify-rounds: got {self.max_rounds!r}, expected an integer >= 1")
        self.rounds: List[dict] = self._read()

    def attach(self, path: str) -> None:
        """Keep the rounds in `path` (verify.json of the run directory), reading those already there."""
        self.path = path
        self.rounds = self._read()

    def _read(self) -> List[dict]:
        if not self.path or not os.path.isfile(self.path):
            return []
        try:
            with open(self.path, encoding="utf-8") as f:
                return list(json.load(f).get("rounds", []))
        except (OSError, ValueError, AttributeError, RecursionError):
            raise SearchError(f"{self.path}: not a verification log (remove it to measure again)") from None

    def _write(self) -> None:
        if self.path:
            atomic_write_text(self.path, json.dumps({"rounds": self.rounds}, indent=1) + "\n")

    def check(self, n: int, choice: Mapping, arch: Mapping, predicted_ms: float, bound_ms: float,
              target_ms: float) -> dict:
        """Round `n`: the measurement of `choice` (reused from the log when this round was measured
        before), and whether it meets the target."""
        key = choice_key(choice)
        if n < len(self.rounds) and self.rounds[n].get("key") == key:
            # the measurement is reused, the verdict is this run's: a resume may pass another --tolerance
            rec = dict(self.rounds[n])
            rec["over_target"] = float(rec["ms"]) / float(target_ms) - 1.0
            rec["met"] = float(rec["ms"]) <= float(target_ms) * (1 + float(self.tolerance))
            self.rounds[n] = rec
            return rec
        del self.rounds[n:]
        m = (self.measure or (lambda a: measure_arch(self.table, a, self.seconds, seed=n)))(arch)
        rec = {"round": n, "key": key, "bound_ms": float(bound_ms), "predicted_ms": float(predicted_ms),
               **{k: v for k, v in m.items()}, "over_target": float(m["ms"]) / float(target_ms) - 1.0,
               "met": float(m["ms"]) <= float(target_ms) * (1 + float(self.tolerance))}
        self.rounds.append(rec)
        self._write()
        return rec

    def keep(self, n: int) -> None:
        """Keep the first `n` rounds: those of the search that ended (a resumed one may stop earlier than
        the run it resumes had gone, e.g. under a larger tolerance or fewer --verify-rounds)."""
        if len(self.rounds) > n:
            del self.rounds[n:]
            self._write()

    @staticmethod
    def next_bound(rec: Mapping, bound_ms: float, target_ms: float) -> float:
        """The tightened bound on predicted latency: the target scaled by the table's predicted /
        measured ratio on the network just measured, and always below the last bound."""
        b = float(target_ms) * float(rec["predicted_ms"]) / float(rec["ms"])
        return min(b, float(bound_ms) * 0.995, float(rec["predicted_ms"]) * 0.995)
