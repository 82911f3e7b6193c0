"""Slimming followed by refinement (`--refine N`, N = the evaluations slimming's path used, so twice
the budget in all) against latency-matched random search given the same total number of
evaluations, on the runs of benchmarks/search_quickstart.py (its supernets, targets, held-out
scoring, verification and fine-tuning, test images no search saw). Results in BENCHMARKS.md, "Search".

    python benchmarks/search_refine.py --bench runs/bench_search --out runs/bench_refine \
        --json benchmarks/results/search_refine.json
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import search_quickstart as b  # noqa: E402
from nas.run import load_supernet_run, run_search  # noqa: E402


def report(path):
    with open(os.path.join(path, "report.json")) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, help="the --out of benchmarks/search_quickstart.py (finished)")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.4])
    p.add_argument("--test-images", type=int, default=3000)
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per network in the final measurement")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for frac in a.fractions:
        for seed in a.seeds:
            base = os.path.join(a.bench, f"seed{seed}")
            sub = os.path.join(base, "bench") if abs(frac - 0.6) < 1e-9 else os.path.join(base, "bench", f"f{frac:g}")
            slim_dir = os.path.join(base, "search") if abs(frac - 0.6) < 1e-9 else os.path.join(sub, "slim")
            slim, rand0, unif = report(slim_dir), report(os.path.join(sub, "random")), report(os.path.join(sub, "uniform"))
            target, n_path = slim["target_ms"], slim["evaluation"]["evaluations"]
            sn = os.path.join(base, "supernet")
            model, cfg, _ = load_supernet_run(sn)
            common = dict(eval_images=slim["evaluation"]["images"], bn_batches=slim["evaluation"]["bn_batches"],
                          finetune=(slim.get("finetune") or {}).get("steps", 0), seed=slim["seed"], progress=False,
                          verify="auto", verify_seconds=1.0)
            out = os.path.join(a.out, f"s{seed}_f{frac:g}")
            runs = {}
            for name, kw in (("slim_refine", dict(strategy="slim", refine=n_path)),
                             ("random_same_total", dict(strategy="random", band=0.1, budget=None))):
                d = f"{out}_{name}"
                if os.path.isfile(os.path.join(d, "report.json")):
                    runs[name] = (d, report(d))
                    continue
                if kw.get("budget", 0) is None:
                    kw["budget"] = runs["slim_refine"][1]["evaluation"]["evaluations"]
                runs[name] = (d, run_search(sn, slim["table"], target, d, overwrite=True, **common, **kw))
            dirs = {"slim": slim_dir, "random_path_budget": os.path.join(sub, "random"), "uniform": os.path.join(sub, "uniform"),
                    **{k: v[0] for k, v in runs.items()}}
            reps = {"slim": slim, "random_path_budget": rand0, "uniform": unif, **{k: v[1] for k, v in runs.items()}}
            dc = {"seed": cfg.seed, "distractors": cfg.data.distractors}
            from latency_tables import LatencyTable
            from supernet.arch import load_arch
            table = LatencyTable.load(slim["table"])
            archs = [load_arch(os.path.join(dirs[k], "arch.yaml")) for k in dirs]
            measured = b.measure(table, archs, a.seconds, seed=seed)
            row = {"seed": seed, "fraction": frac, "target_ms": target, "path_evaluations": n_path}
            for (k, d), ms in zip(dirs.items(), measured):
                r = reps[k]
                row[k] = {"test_acc": b.test_accuracy(os.path.join(d, "model.pt"), dc, model.space,
                                                      r["evaluation"]["images"], a.test_images),
                          "proxy_acc": r["accuracy"], "evaluations": r["evaluation"]["evaluations"],
                          "measured_over_target": ms / target, "choice": r["choice"], "macs": r["macs"],
                          "picked": r["search"].get("picked")}
            print(json.dumps({"seed": seed, "fraction": frac, **{k: (round(v["test_acc"], 4), round(v["proxy_acc"], 4),
                                                                     v["evaluations"], round(v["measured_over_target"], 3))
                                                                 for k, v in row.items() if isinstance(v, dict)}}),
                  flush=True)
            rows.append(row)
    names = [k for k, v in rows[0].items() if isinstance(v, dict)]
    summary = {}
    for frac in a.fractions:
        rs = [r for r in rows if r["fraction"] == frac]
        summary[f"{frac:g}"] = {k: {"test_acc": sum(r[k]["test_acc"] for r in rs) / len(rs),
                                    "proxy_acc": sum(r[k]["proxy_acc"] for r in rs) / len(rs),
                                    "max_measured_over_target": max(r[k]["measured_over_target"] for r in rs)}
                                for k in names}
        for k, v in summary[f"{frac:g}"].items():
            print(f"mean {frac:g} {k:<20} test {v['test_acc']:.4f} proxy {v['proxy_acc']:.4f} "
                  f"max measured/target {v['max_measured_over_target']:.3f}")
    if a.json:
        from supernet.arch import atomic_write_text
        atomic_write_text(a.json, json.dumps({"rows": rows, "mean_over_seeds": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
