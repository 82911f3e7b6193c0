"""Helpers for the latency-table tests: the tiny space, and tables of fake numbers (fixtures in conftest.py)."""
import functools
import os

from latency_tables.segments import key_str, parse_key_str, segment_macs
from latency_tables.table import LatencyTable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "supernet", "spaces", "tiny.yaml")

FAKE_DEVICE = {"backend": "torch-cpu", "device": "Fake CPU 3000", "threads": 1, "batch_size": 1, "dtype": "float32",
               "fused": True, "runtime": {"torch": "x"}, "platform": "Linux-x86_64"}


def fake_ms(key) -> float:
    """A deterministic made-up latency: grows with the entry's MACs, never zero."""
    return _fake_ms(key_str(key))


@functools.lru_cache(maxsize=None)
def _fake_ms(s: str) -> float:
    return round(0.01 + segment_macs(parse_key_str(s)) / 1e7, 6)


def fake_table(keys, overhead=None, device=None) -> LatencyTable:
    t = LatencyTable(device or FAKE_DEVICE, overhead=overhead or {"intercept_ms": 0.25, "scale": 0.1,
                                                                  "per_segment_ms": 0.01, "provenance": "measured"})
    for k in keys:
        ms = fake_ms(k)
        t.set(k, ms, ms * 0.95, ms * 1.1, 20, "measured")
    return t


