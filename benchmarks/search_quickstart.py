"""Search benchmark on the quickstart task (results in BENCHMARKS.md, "Search").

Takes a finished `vitslim run experiments/quickstart.yaml --out RUN` (supernet, table, slimming run)
and, under the same target, the same held-out evaluation and the same short fine-tuning, runs
  - random search with the evaluation budget slimming used,
  - uniform width shrinking of slimming's start network;
then measures the three networks end to end on the table's backend (the table's procedure and drift
reference) and reports measured / target, held-out accuracy before and after fine-tuning, and the
search overhead beside evaluation.

    python benchmarks/search_quickstart.py --run runs/quickstart [--json benchmarks/results/search_quickstart.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def measure(table, archs, seconds: float):
    from latency_tables.backends import get_backend
    from latency_tables.build import table_reference
    from latency_tables.measure import Procedure, resolve_clock, time_networks
    d = table.device
    backend = get_backend(d.get("backend", "torch-cpu"), threads=int(d.get("threads", 1)),
                          batch_size=int(d.get("batch_size", 1)), dtype=d.get("dtype", "float32"),
                          fused=bool(d.get("fused", True)))
    m = table.measurement or {}
    proc = Procedure(time_per_item=seconds, min_samples=30, max_samples=m.get("max_samples", 2000),
                     warmup=m.get("warmup_s", 0.05), clock=resolve_clock(m.get("clock") or "auto", backend))
    ref = table_reference(table, backend, True)
    return [t.ms for t in time_networks(backend, archs, proc, reference=ref)]


def main(argv=None):
    from latency_tables import LatencyTable
    from latency_tables.backends import cpu_model
    from nas.run import run_search
    from supernet.arch import load_arch
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="output of `vitslim run experiments/quickstart.yaml --out RUN`")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per network (default 1)")
    a = p.parse_args(argv)
    run = a.run
    with open(os.path.join(run, "search", "report.json")) as f:
        slim = json.load(f)
    table_path = slim["table"]
    sn = os.path.join(run, "supernet")
    ft = slim.get("finetune") or {}
    common = dict(eval_images=slim["evaluation"]["images"], bn_batches=slim["evaluation"]["bn_batches"],
                  finetune=ft.get("steps", 0), finetune_lr=ft.get("lr", 1e-3), seed=slim["seed"], progress=False)
    budget = slim["evaluation"]["evaluations"]
    reports = {"slim": slim}
    for name, kw in (("random", {"budget": budget}), ("uniform", {})):
        out = os.path.join(run, "bench", name)
        if os.path.isfile(os.path.join(out, "report.json")):
            with open(os.path.join(out, "report.json")) as f:
                reports[name] = json.load(f)
        else:
            reports[name] = run_search(sn, table_path, slim["target_ms"], out, strategy=name, **common, **kw)
    table = LatencyTable.load(table_path)
    dirs = {"slim": os.path.join(run, "search"), "random": os.path.join(run, "bench", "random"),
            "uniform": os.path.join(run, "bench", "uniform")}
    archs = [load_arch(os.path.join(dirs[k], "arch.yaml")) for k in reports]
    measured = measure(table, archs, a.seconds)
    rows = []
    for (name, r), ms in zip(reports.items(), measured):
        f = r.get("finetune") or {}
        rows.append({"strategy": name, "blocks": r["blocks"], "widths": r["choice"]["widths"],
                     "target_ms": r["target_ms"], "predicted_ms": r["predicted_ms"], "measured_ms": ms,
                     "measured_over_target": ms / r["target_ms"], "measured_over_predicted": ms / r["predicted_ms"],
                     "params": r["params"], "macs": r["macs"], "evaluations": r["evaluation"]["evaluations"],
                     "acc_supernet_weights": r["accuracy"], "acc_before_finetune": f.get("acc_before"),
                     "acc_after_finetune": f.get("acc_after"), "finetune_steps": f.get("steps"),
                     "search_seconds": r["search"]["seconds"], "eval_seconds": r["search"]["eval_seconds"],
                     "lookup_seconds": r["search"]["lookup_seconds"],
                     "overhead_fraction": r["search"]["overhead_fraction"]})
    res = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
           "table": table_path, "heldout_images": slim["evaluation"]["images"], "rows": rows}
    print(f"{'strategy':<8} {'blocks':<14} {'widths':<18} {'pred ms':>8} {'meas ms':>8} {'meas/tgt':>8} "
          f"{'evals':>5} {'acc sn':>7} {'acc ft':>7} {'overhead':>8}")
    for r in rows:
        acc_ft = r["acc_after_finetune"]
        print(f"{r['strategy']:<8} {r['blocks']:<14} {str(r['widths']):<18} {r['predicted_ms']:>8.3f} "
              f"{r['measured_ms']:>8.3f} {r['measured_over_target']:>8.3f} {r['evaluations']:>5} "
              f"{r['acc_supernet_weights']:>7.4f} {acc_ft if acc_ft is None else f'{acc_ft:.4f}':>7} "
              f"{r['overhead_fraction']:>8.2%}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
