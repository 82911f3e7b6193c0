"""Latency lookup tables: per-device measurements of every block a search space or arch needs,
and the backends that measure them.

    from latency_tables import LatencyTable
    table = LatencyTable.load("latency_tables/cpu_torch_efficientformer_l1.yaml")
    table.predict(arch)              # milliseconds
    table.predict_stages(arch)       # {"stem", "stage0", ..., "head", "overhead", "total"}
    scorer = table.compile(space)    # numpy scoring of Choice codes, >100k archs/s

`build_table` measures a table from Python, as `vitslim latency build` does (resuming one that exists), on a
backend named or a `Backend` instance of your own (a subclass: `prepare_fn(module, input_shape)` -> (step, x0)):

    table = build_table("my_table.yaml", MyBackend(), space="tiny", calibrate=4)   # or "torch-cpu", archs=[...]

A timer of your own (a remote board, a profiler) fills a table without a Backend: every entry an arch needs
(`arch_keys`), and for pruning to a latency target its width grid (`prune_grid_keys`), each built by
`build_segment(key)` -> (module in eval mode, input shape without batch):

    table = LatencyTable({"backend": "my-npu", "device": "board 3", "threads": 1, "batch_size": 1})
    for key in arch_keys(arch) + prune_grid_keys(arch):
        module, shape = build_segment(key)
        ms = my_timer(vitslim.fuse(module), torch.randn(1, *shape))
        table.set(key, ms, ms, ms, n=1)   # median, p10, p90, samples
    table.save("my_npu.yaml")         # then vitslim.prune_model(..., "latency=0.5x", table=table)
"""
from .backends import BACKENDS, Backend, BackendError, get_backend
from .build import build_table
from .grid import GridSpec, prune_grid_keys
from .segments import SegmentError, arch_keys, build_segment, decompose, key_str, space_keys
from .table import Entry, LatencyError, LatencyTable, MissingEntriesError

__all__ = ["LatencyTable", "Entry", "LatencyError", "MissingEntriesError", "Backend", "BackendError", "BACKENDS",
           "get_backend", "SegmentError", "arch_keys", "build_segment", "decompose", "key_str", "space_keys", "GridSpec",
           "prune_grid_keys", "build_table"]
