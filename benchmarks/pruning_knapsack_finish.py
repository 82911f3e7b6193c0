"""The knapsack selection's answer, as importance removed (the objective) and time per selection, on DeiT-Small and
Swin-Tiny (magnitude scores times a fixed log-normal draw so that plans differ), MACs and params budgets of 0.3-0.85,
depth moves off and on: 32 selections. Run it on two checkouts to compare them (the figures are deterministic; the
times are not: interleave runs or repeat them).

    python benchmarks/pruning_knapsack_finish.py [--repo PATH] [--json OUT.json]
"""
import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                help="the checkout whose pruning/ to time (default: this one)")
ap.add_argument("--json", help="write the rows here")
args = ap.parse_args()
sys.path.insert(0, os.path.abspath(args.repo))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vitslim  # noqa: E402
from pruning.budget import Floor, MacsCost, Network, ParamsCost, select_knapsack  # noqa: E402
from pruning.importance import MagnitudeImportance  # noqa: E402
from pruning.units import block_infos  # noqa: E402

torch.set_num_threads(1)
rows = []
for name in ("deit_small", "swin_tiny"):
    arch = vitslim.get_preset(name)
    torch.manual_seed(0)
    scores = MagnitudeImportance().score(vitslim.build_model(arch), arch, None)
    rng = np.random.default_rng(0)
    for b in scores.blocks.values():
        for k in b:
            b[k] = b[k] * rng.lognormal(0, 1.0, size=np.shape(b[k]))
    infos = block_infos(arch)
    for cost in (MacsCost(), ParamsCost()):
        for frac in (0.3, 0.5, 0.7, 0.85):
            for depth in (False, True):
                net = Network(arch, scores, cost, Floor(0.0 if depth else 0.1).of(infos), depth=depth)
                budget = net.total() * frac
                t = time.perf_counter()
                sel = select_knapsack(net, budget)
                rows.append({"model": name, "cost": cost.unit if hasattr(cost, "unit") else type(cost).__name__,
                             "fraction": frac, "depth": depth, "removed_importance": sel.removed_importance,
                             "within_budget": sel.cost <= budget, "seconds": time.perf_counter() - t})
                print(name, rows[-1]["cost"], frac, depth, f"{sel.removed_importance:.4f}", f"{rows[-1]['seconds']:.2f}s")
print(f"total {sum(r['seconds'] for r in rows):.2f}s over {len(rows)} selections")
if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"repo": os.path.abspath(args.repo), "rows": rows}, f, indent=1)
        f.write("\n")
