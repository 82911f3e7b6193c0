"""How fast a latency table scores candidate networks: `LatencyTable.predict(arch)` one arch dict at a
time, and `table.compile(space).score(codes)` for a batch of Choice codes (the search's path; goal
>= 100k archs/s). Uses the shipped table when it covers the space, else fake numbers.

    python benchmarks/latency_predict_speed.py [--space efficientformer_l1]
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latency_tables import LatencyTable  # noqa: E402
from latency_tables.segments import space_keys  # noqa: E402
from supernet.space import load_space  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=os.path.join(ROOT, "supernet", "spaces", "efficientformer_l1.yaml"))
    ap.add_argument("--table", default=os.path.join(ROOT, "latency_tables", "cpu_torch_efficientformer_l1.yaml"))
    ap.add_argument("--batch", type=int, default=100_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    space = load_space(args.space)
    table = LatencyTable.load(args.table) if os.path.exists(args.table) else None
    if table is None or table.missing(space_keys(space)):
        table = LatencyTable({"backend": "torch-cpu", "device": "fake"})
        for i, k in enumerate(space_keys(space)):
            table.set(k, 0.1 + i * 1e-3, 0.1 + i * 1e-3, 0.1 + i * 1e-3, 1)
        source = "fake numbers"
    else:
        source = args.table
    rng = random.Random(0)
    choices = [space.sample(rng) for _ in range(2000)]
    archs = [space.to_arch(c) for c in choices]

    t0 = time.perf_counter()
    ref = [table.predict(a) for a in archs]
    dict_rate = len(archs) / (time.perf_counter() - t0)

    comp = table.compile(space)
    base = comp.encode_batch(choices)
    codes = base[np.arange(args.batch) % len(base)]
    comp.score(codes[:1000])  # warm
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        comp.score(codes)  # validity checked too
        best = max(best, args.batch / (time.perf_counter() - t0))
    best_nocheck = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        comp.score(codes, check=False)
        best_nocheck = max(best_nocheck, args.batch / (time.perf_counter() - t0))
    agree = float(np.max(np.abs(comp.score(base) - np.array(ref))))
    res = {"table": source, "space": space.name, "predict_dict_archs_per_s": round(dict_rate),
           "compiled_archs_per_s": round(best), "compiled_unchecked_archs_per_s": round(best_nocheck),
           "batch": args.batch, "max_abs_diff_ms_vs_predict": agree}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:>32}: {v}")


if __name__ == "__main__":
    main()
