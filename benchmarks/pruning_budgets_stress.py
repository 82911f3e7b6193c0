"""Several budgets at once, stress check of `pruning.budget.select_constrained`: the two small models
trained by benchmarks/pruning_vs_torch_pruning.py (its cache), their latency tables with the pruning
grid (`vitslim latency build --arch <cached checkpoint> --prune-grid --out runs/grid_small_<family>.yaml`),
4 calibration draws x 4 budget combinations (2 or 3 of macs / params / latency) x both selections;
counts the runs that fail or break a budget. Results in BENCHMARKS.md ("Several budgets at once").

    python benchmarks/pruning_budgets_stress.py --table 'runs/grid_small_{family}.yaml'
"""
import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from latency_tables import LatencyTable  # noqa: E402
from pruning.pruner import PruneConfig, prune  # noqa: E402
from pruning.units import PruneError  # noqa: E402
from pruning_depth_accuracy import cached_model  # noqa: E402
from pruning_vs_torch_pruning import DEIT, SWIN, add_shared_args  # noqa: E402

TARGETS = ["macs=0.5,latency=0.8x", "macs=0.6,latency=0.85x", "params=0.5,latency=0.8x", "macs=0.5,params=0.6,latency=0.8x"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)  # its training settings name the cached models (the defaults: those of the comparison)
    p.add_argument("--table", required=True, help="latency table per family, '{family}' replaced")
    p.add_argument("--draws", type=int, default=4)
    a = p.parse_args()
    torch.set_num_threads(1)
    failed = broken = total = 0
    for fam, arch0 in (("deit", DEIT), ("swin", SWIN)):
        model, arch, _ = cached_model(fam, arch0, a)
        table = LatencyTable.load(a.table.format(family=fam))
        s = arch["input_size"]
        for seed in range(a.draws):
            g = torch.Generator().manual_seed(seed)
            cal = [(torch.randn(8, 3, s, s, generator=g), None)] * 2
            for tg in TARGETS:
                for sel in ("ratio", "knapsack"):
                    total += 1
                    try:
                        r = prune(model, arch, PruneConfig(target=tg, calib_batches=2, eval_batches=0, selection=sel),
                                  calibration=cal, table=table).report
                    except PruneError as e:
                        failed += 1
                        print(fam, seed, tg, sel, "FAILED:", e, flush=True)
                        continue
                    ok = all(x["after"] <= x["goal"] * (1 + 1e-9) for x in r["targets"])
                    broken += not ok
                    w = r["steps"][0]["candidates"][sel]["weights"]
                    print(fam, seed, tg, sel, "met" if ok else "BROKEN", [round(x["kept"], 3) for x in r["targets"]],
                          {k: round(v, 3) for k, v in w.items()}, flush=True)
    print(f"{total} runs: {failed} failed, {broken} broke a budget")


if __name__ == "__main__":
    main()
