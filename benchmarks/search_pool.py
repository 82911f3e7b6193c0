"""Pool the seeds of several runs of benchmarks/search_quickstart.py (and, optionally, search_refine.py)
and compare strategies seed by seed: per target, each strategy's mean test accuracy after fine-tuning and,
against a reference strategy, the paired difference (mean over seeds, its standard error, seeds won / lost).
Paired, because the seeds differ far more from one another (supernet quality) than strategies do on one
seed.

    python benchmarks/search_pool.py --quickstart benchmarks/results/search_quickstart.json more.json \\
        --refine benchmarks/results/search_refine.json more_refine.json --json pooled.json
"""
import argparse
import json
import math
import os
import sys
from collections import defaultdict

# (strategy as named in the pooled table, the reference it is paired with)
PAIRS = (("slim", "random"), ("slim", "uniform"), ("slim", "random_any"), ("slim_loss", "random"),
         ("slim_refine", "random_same_total"), ("slim_refine", "uniform"), ("slim_refine", "slim"))


def _load(paths, what):
    seen = {}
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        if what == "quickstart":
            for s in d["seeds"]:
                for r in s["rows"]:
                    seen[(s["seed"], r["fraction"], r["strategy"])] = r["test_acc_after_finetune"]
        else:
            for r in d["rows"]:
                for k in ("slim_refine", "random_same_total"):
                    seen[(r["seed"], r["fraction"], k)] = r[k]["test_acc"]
    return seen


def pool(quickstart, refine=()):
    acc = _load(quickstart, "quickstart")
    acc.update(_load(refine, "refine"))
    by = defaultdict(dict)  # (fraction, strategy) -> {seed: acc}
    for (seed, frac, strat), a in acc.items():
        by[(frac, strat)][seed] = a
    out = {"strategies": {}, "pairs": {}}
    for (frac, strat), d in sorted(by.items()):
        out["strategies"][f"{frac} {strat}"] = {"seeds": sorted(d), "mean": sum(d.values()) / len(d)}
    for frac in sorted({f for f, _ in by}):
        for a, b in PAIRS:
            da, db = by.get((frac, a), {}), by.get((frac, b), {})
            seeds = sorted(set(da) & set(db))
            if len(seeds) < 2:
                continue
            diff = [da[s] - db[s] for s in seeds]
            m = sum(diff) / len(diff)
            sd = math.sqrt(sum((x - m) ** 2 for x in diff) / (len(diff) - 1))
            out["pairs"][f"{frac} {a} - {b}"] = {
                "seeds": seeds, "mean_diff": m, "se": sd / math.sqrt(len(diff)), "per_seed": diff,
                "won": sum(x > 0 for x in diff), "lost": sum(x < 0 for x in diff)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quickstart", nargs="+", required=True, help="JSON files of search_quickstart.py")
    ap.add_argument("--refine", nargs="*", default=[], help="JSON files of search_refine.py")
    ap.add_argument("--json", help="write the pooled figures here")
    a = ap.parse_args(argv)
    for p in a.quickstart + a.refine:
        if not os.path.isfile(p):
            sys.exit(f"search_pool: {p}: no such file")
    res = pool(a.quickstart, a.refine)
    for k, v in res["strategies"].items():
        print(f"{k:<28} seeds {','.join(map(str, v['seeds'])):<14} mean {v['mean']:.4f}")
    for k, v in res["pairs"].items():
        print(f"{k:<40} {v['mean_diff'] * 100:+.2f} +- {v['se'] * 100:.2f} points (SE), "
              f"won {v['won']} / lost {v['lost']} of {len(v['seeds'])}")
    if a.json:
        tmp = f"{a.json}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
