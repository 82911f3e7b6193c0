"""What closed-form counting saves a prune at Base size: `vitslim prune` of a random-weight DeiT-Base (and Swin-Base)
checkpoint at 224, one calibration batch of 2 images, one held-out batch, one shot, run with the pruner's
closed-form params/MACs (`pruning.budget.analytic_count`, the shipped way) and with every count taken as before,
on the meta device under torch's FLOP counter (`supernet.count.count`), interleaved in one process; the reports
must match. The FLOP-counter way also pays torch._dynamo's import on its first count (once per process), so the
first round runs it first.

    python benchmarks/prune_counting.py --json benchmarks/results/prune_counting.json     # ~5 min, 1 thread
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pruning.budget as B  # noqa: E402
import pruning.pruner as P  # noqa: E402
import vitslim  # noqa: E402
from supernet.arch import atomic_write_text  # noqa: E402


def flop_counter_count(arch):
    from supernet.count import count
    c = count(arch)
    return {"params": int(c["params"]), "macs": int(c["macs"])}


CLOSED_FORM = B.analytic_count


def run(model, arch, closed_form: bool) -> tuple:
    fn = CLOSED_FORM if closed_form else flop_counter_count
    B.analytic_count = P.analytic_count = fn
    cal = [(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)), None)]
    t0 = time.perf_counter()
    res = P.prune(model, arch, P.PruneConfig(target="macs=0.5", selection="ratio", calib_batches=1, eval_batches=1),
                  calibration=cal * 2)
    dt = time.perf_counter() - t0
    rep = {k: v for k, v in res.report.items() if k not in ("scoring_seconds",)}
    return dt, json.dumps(rep, sort_keys=True, default=str)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="deit_base,swin_base")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "results": {}}
    for name in args.presets.split(","):
        arch = vitslim.get_preset(name)
        torch.manual_seed(0)
        model = vitslim.build_model(arch).eval()
        secs = {"flop_counter": [], "closed_form": []}
        reports = set()
        for r in range(args.rounds):
            for way in ("flop_counter", "closed_form"):  # the FLOP counter first: it pays dynamo's import in round 0
                dt, rep = run(model, arch, way == "closed_form")
                secs[way].append(dt)
                reports.add(rep)
                print(f"{name} round {r} {way}: {dt:.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in secs.items()}
        out["results"][name] = {"seconds": secs, "median_seconds": med,
                                "ratio_closed_form_to_flop_counter": med["closed_form"] / med["flop_counter"],
                                "same_report": len(reports) == 1}
        print(name, json.dumps(out["results"][name]["median_seconds"]),
              f"ratio {out['results'][name]['ratio_closed_form_to_flop_counter']:.3f}", flush=True)
    B.analytic_count = P.analytic_count = CLOSED_FORM
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
