"""What `--round-to N` costs and buys: DeiT-Tiny and Swin-Tiny (224x224, random weights: latency does not depend
on them) pruned to the same MACs target with round_to 1 (any width), 8 and 16, one shot, the same calibration
batches. Reported per setting: MACs kept, the Taylor importance the selection removed (the price of coarser
widths: higher is worse), the kept widths, and CPU latency at batch 1 and 16 measured interleaved with the
unpruned network (one thread, median of rounds; ratios, since the machine is shared).

    python benchmarks/pruning_round_to.py --json benchmarks/results/pruning_round_to.json   # ~10 min, 1 thread
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vitslim  # noqa: E402
from pruning.pruner import PruneConfig, prune  # noqa: E402
from pruning_latency_scaling import calib  # noqa: E402
from pruning_vs_torch_pruning import latency  # noqa: E402
from supernet.arch import atomic_write_text  # noqa: E402


def widths(arch) -> list:
    return [[b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"]] for st in arch["stages"] for b in st["blocks"]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="deit_tiny,swin_tiny")
    p.add_argument("--round-to", default="1,8,16", help="comma-separated granularities (default 1,8,16)")
    p.add_argument("--target", default="macs=0.5")
    p.add_argument("--selection", default="ratio", choices=["ratio", "knapsack"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=5, help="forward passes per timed round at batch 1 (batch 16: 1)")
    p.add_argument("--json", required=True, help="where to write the results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gs = [int(g) for g in args.round_to.split(",")]
    out = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__, "target": args.target,
           "selection": args.selection, "results": {}}
    for name in args.presets.split(","):
        arch = vitslim.get_preset(name)
        torch.manual_seed(0)
        model = vitslim.build_model(arch).eval()
        cal = calib(arch["input_size"], 2, 8)
        models, rows = {"unpruned": model}, {}
        for g in gs:
            t0 = time.perf_counter()
            res = prune(model, arch, PruneConfig(target=args.target, selection=args.selection, round_to=g,
                                                 calib_batches=2, eval_batches=0), calibration=cal)
            removed = sum(s["candidates"][s["selection"]]["removed_importance"] for s in res.report["steps"])
            rows[g] = {"macs_kept": res.report["macs_kept"], "params_kept": res.report["params_kept"],
                       "removed_importance": removed, "widths": widths(res.arch),
                       "prune_seconds": time.perf_counter() - t0}
            models[f"round_to={g}"] = res.model
            print(f"{name} round_to={g}: MACs kept {res.report['macs_kept']:.3f}, removed importance {removed:.4g}",
                  flush=True)
        lat = {b: latency(models, b, args.rounds, args.iters if b == 1 else 1, size=arch["input_size"]) for b in (1, 16)}
        for g in gs:
            k = f"round_to={g}"
            rows[g]["ms"] = {str(b): lat[b][k] for b in lat}
            rows[g]["latency_kept"] = {str(b): lat[b][k] / lat[b]["unpruned"] for b in lat}
            rows[g]["latency_vs_round_to_1"] = {str(b): lat[b][k] / lat[b][f"round_to={gs[0]}"] for b in lat}
        out["results"][name] = {"unpruned_ms": {str(b): lat[b]["unpruned"] for b in lat},
                                "by_round_to": {str(g): r for g, r in rows.items()}}
        for g in gs:
            r = rows[g]
            print(f"{name} round_to={g}: latency kept b1 {r['latency_kept']['1']:.3f} b16 {r['latency_kept']['16']:.3f}"
                  f" (vs round_to={gs[0]}: {r['latency_vs_round_to_1']['1']:.3f} / {r['latency_vs_round_to_1']['16']:.3f})",
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
