"""Optuna (NSGA-II) with and without the warm start (a fresh study's first trials drawn from
latency-matched samples, `OptunaSearch.warm_start`) on the supernets and targets of
benchmarks/search_quickstart.py, given twice slimming's evaluations (the budget of
benchmarks/search_refine.py), beside slimming + refine and latency-matched random search with that same
budget (read from the refine benchmark's runs). Compared on the search's own objective: held-out accuracy
with the supernet's weights (BatchNorm recalibrated) of the network returned, and how many trials met the
target. Results in BENCHMARKS.md, "Search".

    python benchmarks/search_optuna_warm.py --bench runs/bench_search --refine runs/bench_refine \
        --out runs/bench_optuna --json benchmarks/results/search_optuna_warm.json
"""
import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from nas.optuna_search import OptunaSearch  # noqa: E402
from nas.run import run_search  # noqa: E402
from search_refine import report  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="the --out of benchmarks/search_quickstart.py (finished)")
    p.add_argument("--refine", required=True, help="the --out of benchmarks/search_refine.py (finished)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.4])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    real_warm = OptunaSearch.warm_start
    rows = []
    for frac in a.fractions:
        for seed in a.seeds:
            base = os.path.join(a.bench, f"seed{seed}")
            slim_dir = os.path.join(base, "search") if abs(frac - 0.6) < 1e-9 else os.path.join(base, "bench",
                                                                                                 f"f{frac:g}", "slim")
            slim = report(slim_dir)
            ref = os.path.join(a.refine, f"s{seed}_f{frac:g}")
            slim_refine, rand = report(f"{ref}_slim_refine"), report(f"{ref}_random_same_total")
            budget = slim_refine["evaluation"]["evaluations"]
            row = {"seed": seed, "fraction": frac, "target_ms": slim["target_ms"], "trials": budget,
                   "slim_acc": slim["accuracy"], "slim_refine_acc": slim_refine["accuracy"],
                   "random_acc": rand["accuracy"]}
            for name, warm in (("optuna_cold", False), ("optuna_warm", True)):
                d = os.path.join(a.out, f"s{seed}_f{frac:g}_{name}")
                OptunaSearch.warm_start = real_warm if warm else (lambda self, ctx: [])
                t0 = time.perf_counter()
                try:
                    rep = report(d) if os.path.isfile(os.path.join(d, "report.json")) else run_search(
                        os.path.join(base, "supernet"), slim["table"], slim["target_ms"], d, strategy="optuna",
                        trials=budget, seed=slim["seed"], eval_images=slim["evaluation"]["images"],
                        bn_batches=slim["evaluation"]["bn_batches"], progress=False, verify="off", overwrite=True)
                    with open(os.path.join(d, "pareto.json")) as f:
                        trials = json.load(f)["trials"]
                    row[name] = {"acc": rep["accuracy"], "predicted_ms": rep["predicted_ms"],
                                 "feasible": sum(t["feasible"] for t in trials), "trials": len(trials),
                                 "seconds": time.perf_counter() - t0}
                except Exception as e:  # noqa: BLE001 - an Optuna run with no feasible trial is a result
                    row[name] = {"acc": None, "error": str(e).splitlines()[0][:200]}
                finally:
                    OptunaSearch.warm_start = real_warm
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(), "rows": rows}
    for frac in a.fractions:
        rs = [r for r in rows if r["fraction"] == frac]
        mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else None  # noqa: E731
        out[f"mean_{frac:g}"] = {k: mean([r[k]["acc"] if isinstance(r[k], dict) else r[k] for r in rs])
                                 for k in ("slim_acc", "slim_refine_acc", "random_acc", "optuna_cold", "optuna_warm")}
    print(json.dumps({k: v for k, v in out.items() if k.startswith("mean")}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
