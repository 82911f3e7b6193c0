"""How well the search's proxy ranks the networks the search benchmarks found, against their test
accuracy after the full fine-tuning: held-out accuracy with supernet weights (the proxy every strategy
uses) vs the same after K steps of fine-tuning (a costlier proxy), Spearman per seed x target over
the distinct networks of benchmarks/search_quickstart.py and benchmarks/search_refine.py (run both
first, with --out runs/bench_search and runs/bench_refine). Results in BENCHMARKS.md, "Search".

    python benchmarks/search_proxy_rank.py --steps 20 --json benchmarks/results/search_proxy_rank.json
"""
import argparse
import collections
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from nas.finetune import finetune  # noqa: E402
from nas.run import load_supernet_run, make_evaluator  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--steps", type=int, default=20, help="fine-tuning steps of the costlier proxy (default 20)")
ap.add_argument("--bench", default="runs/bench_search", help="search_quickstart.py's --out")
ap.add_argument("--refine", default="runs/bench_refine", help="search_refine.py's --out")
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ap.add_argument("--json", default=None, help="write every network's figures and the per-pair Spearman here")
args = ap.parse_args()
torch.set_num_threads(1)
K = args.steps
res = []
for seed in args.seeds:
    base = f"{args.bench}/seed{seed}"
    sn, cfg, _ = load_supernet_run(f"{base}/supernet")
    ev, train = make_evaluator(sn, cfg, 512, 4, 256, seed)
    q = next(s for s in json.load(open("benchmarks/results/search_quickstart.json"))["seeds"] if s["seed"] == seed)["rows"]
    rr = json.load(open("benchmarks/results/search_refine.json"))["rows"]
    for frac in (0.6, 0.4):
        nets = [(r["strategy"], {"widths": r["widths"], "blocks": None}, r["test_acc_after_finetune"], r["acc_supernet_weights"]) for r in q if r["fraction"] == frac]
        # choices from reports
        sub = f"{base}/bench" if frac == 0.6 else f"{base}/bench/f0.4"
        dirs = {"slim": f"{base}/search" if frac == 0.6 else f"{sub}/slim", "slim_loss": f"{sub}/slim_loss", "random": f"{sub}/random", "random_any": f"{sub}/random_any", "uniform": f"{sub}/uniform",
                "slim_refine": f"{args.refine}/s{seed}_f{frac:g}_slim_refine", "random_same_total": f"{args.refine}/s{seed}_f{frac:g}_random_same_total"}
        row = [r for r in rr if r["seed"] == seed and r["fraction"] == frac][0]
        test = {r["strategy"]: r["test_acc_after_finetune"] for r in q if r["fraction"] == frac}
        test["slim_refine"] = row["slim_refine"]["test_acc"]; test["random_same_total"] = row["random_same_total"]["test_acc"]
        seen = {}
        for name, d in dirs.items():
            c = json.load(open(d + "/report.json"))["choice"]
            key = json.dumps(c, sort_keys=True)
            if key in seen: continue
            seen[key] = name
            t_p = time.time()
            p0 = ev(c)["acc"]
            t_p = time.time() - t_p
            t0 = time.time()
            m, _ = ev.model(c)
            finetune(m, train, K, batch_size=64, lr=1e-3, seed=seed)
            pk = ev.score_model(m)
            res.append(dict(seed=seed, frac=frac, name=name, test=test[name], p0=p0, pk=pk["acc"], lk=pk["loss"], t=time.time()-t0, t_proxy=t_p))
            print(json.dumps(res[-1]), flush=True)
g = collections.defaultdict(list)
for r in res:
    g[(r["seed"], r["frac"])].append(r)
pairs = []
for (seed, frac), rs in g.items():
    t = [r["test"] for r in rs]
    pairs.append({"seed": seed, "fraction": frac, "networks": len(rs),
                  "spearman_proxy": float(spearmanr(t, [r["p0"] for r in rs])[0]),
                  "spearman_after_k": float(spearmanr(t, [r["pk"] for r in rs])[0]),
                  "spearman_neg_loss_after_k": float(spearmanr(t, [-r["lk"] for r in rs])[0])})
    print(pairs[-1])
summary = {k: {"min": float(np.nanmin([p[k] for p in pairs])), "max": float(np.nanmax([p[k] for p in pairs])),
               "mean": float(np.nanmean([p[k] for p in pairs]))}
           for k in ("spearman_proxy", "spearman_after_k", "spearman_neg_loss_after_k")}
summary["seconds_per_network_after_k"] = float(np.median([r["t"] for r in res]))
summary["seconds_per_network_proxy"] = float(np.median([r["t_proxy"] for r in res]))
print(json.dumps(summary, indent=1))
if args.json:
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"command": " ".join(sys.argv), "steps": K, "threads": torch.get_num_threads(),
                   "networks": res, "pairs": pairs, "summary": summary}, f, indent=1)
    os.replace(tmp, args.json)
