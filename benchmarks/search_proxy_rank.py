"""How well the search's proxy ranks the networks the search benchmarks found, against their test
accuracy after the full fine-tuning: held-out accuracy with supernet weights (the proxy every strategy
uses) vs the same after K steps of fine-tuning (a costlier proxy), Spearman per seed x target over
the distinct networks of benchmarks/search_quickstart.py and benchmarks/search_refine.py (run both
first, with --out runs/bench_search and runs/bench_refine). Results in BENCHMARKS.md, "Search".

    python benchmarks/search_proxy_rank.py 20
"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import json, os, glob, sys, time
import numpy as np, torch
from scipy.stats import spearmanr
from nas.run import load_supernet_run, make_evaluator
from nas.finetune import finetune
from supernet.data import make_loader
torch.set_num_threads(1)
K = int(sys.argv[1]) if len(sys.argv) > 1 else 20
res = []
for seed in (0, 1, 2):
    base = f"runs/bench_search/seed{seed}"
    sn, cfg, _ = load_supernet_run(f"{base}/supernet")
    ev, train = make_evaluator(sn, cfg, 512, 4, 256, seed)
    q = json.load(open("benchmarks/results/search_quickstart.json"))["seeds"][seed]["rows"]
    rr = json.load(open("benchmarks/results/search_refine.json"))["rows"]
    for frac in (0.6, 0.4):
        nets = [(r["strategy"], {"widths": r["widths"], "blocks": None}, r["test_acc_after_finetune"], r["acc_supernet_weights"]) for r in q if r["fraction"] == frac]
        # choices from reports
        sub = f"{base}/bench" if frac == 0.6 else f"{base}/bench/f0.4"
        dirs = {"slim": f"{base}/search" if frac == 0.6 else f"{sub}/slim", "slim_loss": f"{sub}/slim_loss", "random": f"{sub}/random", "random_any": f"{sub}/random_any", "uniform": f"{sub}/uniform",
                "slim_refine": f"runs/bench_refine/s{seed}_f{frac:g}_slim_refine", "random_same_total": f"runs/bench_refine/s{seed}_f{frac:g}_random_same_total"}
        row = [r for r in rr if r["seed"] == seed and r["fraction"] == frac][0]
        test = {r["strategy"]: r["test_acc_after_finetune"] for r in q if r["fraction"] == frac}
        test["slim_refine"] = row["slim_refine"]["test_acc"]; test["random_same_total"] = row["random_same_total"]["test_acc"]
        seen = {}
        for name, d in dirs.items():
            c = json.load(open(d + "/report.json"))["choice"]
            key = json.dumps(c, sort_keys=True)
            if key in seen: continue
            seen[key] = name
            p0 = ev(c)["acc"]
            t0 = time.time()
            m, _ = ev.model(c)
            finetune(m, train, K, batch_size=64, lr=1e-3, seed=seed)
            pk = ev.score_model(m)
            res.append(dict(seed=seed, frac=frac, name=name, test=test[name], p0=p0, pk=pk["acc"], lk=pk["loss"], t=time.time()-t0))
            print(json.dumps(res[-1]), flush=True)
import collections
g = collections.defaultdict(list)
for r in res: g[(r["seed"], r["frac"])].append(r)
for k, rs in g.items():
    t = [r["test"] for r in rs]
    print(k, "n", len(rs), "spearman p0", round(spearmanr(t, [r["p0"] for r in rs])[0], 2), "pK", round(spearmanr(t, [r["pk"] for r in rs])[0], 2), "-lossK", round(spearmanr(t, [-r["lk"] for r in rs])[0], 2))
