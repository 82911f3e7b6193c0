"""Latency lookup tables: per-device measurements of every block a search space or arch needs,
and the backends that measure them.

    from latency_tables import LatencyTable
    table = LatencyTable.load("latency_tables/cpu_torch_efficientformer_l1.yaml")
    table.predict(arch)              # milliseconds
    table.predict_stages(arch)       # {"stem", "stage0", ..., "head", "overhead", "total"}
    scorer = table.compile(space)    # numpy scoring of Choice codes, >100k archs/s
"""
from .backends import BACKENDS, Backend, BackendError, get_backend
from .segments import SegmentError, arch_keys, decompose, key_str, space_keys
from .table import Entry, LatencyError, LatencyTable, MissingEntriesError

__all__ = ["LatencyTable", "Entry", "LatencyError", "MissingEntriesError", "Backend", "BackendError", "BACKENDS",
           "get_backend", "SegmentError", "arch_keys", "decompose", "key_str", "space_keys"]
