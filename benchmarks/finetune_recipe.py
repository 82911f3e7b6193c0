"""The search's fine-tuning recipe, old against new, on the networks the six-seed search benchmark found.

Session 8 took norms, biases, LayerScale and attention bias tables out of weight decay in `nas.finetune`
(timm's rule, as supernet training already did). Every search figure in BENCHMARKS.md was measured with the
old recipe (decay on every parameter). This script re-fine-tunes the same networks both ways, from their
supernet weights (BatchNorm re-estimated as the search does), with the search's settings (200 steps, its
batch size, lr and seed, the same sample order), scores both on the same 3000 test images no search saw,
and pools the strategies paired by seed under each recipe (`search_pool.pool`'s comparisons).

Its first check: the old recipe, recomputed here, must give the test accuracies the benchmark stored
(`--stored`, search_pool's inputs in its order); a mismatch is reported (it would mean this harness does
not reproduce the benchmark, and the comparison below would not be of the same networks and training).

    python benchmarks/finetune_recipe.py --bench runs/bench_search --refine runs/bench_refine \\
        --bench7 runs/bench_search7 --refine7 runs/bench_refine7 --seeds7 0 4 \\
        --json benchmarks/results/finetune_recipe.json
"""
import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import search_pool  # noqa: E402
import search_quickstart as bq  # noqa: E402

STRATEGIES = ("slim", "random", "uniform", "slim_refine", "random_same_total")
STORED = ("benchmarks/results/search_quickstart.json", "benchmarks/results/search_quickstart_s345.json",
          "benchmarks/results/search_quickstart_s04_session7.json")
STORED_REFINE = ("benchmarks/results/search_refine.json", "benchmarks/results/search_refine_s345.json",
                 "benchmarks/results/search_refine_s04_session7.json")


def run_dirs(bench, refine, seed, frac):
    base = os.path.join(bench, f"seed{seed}")
    at6 = abs(frac - 0.6) < 1e-9
    sub = os.path.join(base, "bench") if at6 else os.path.join(base, "bench", f"f{frac:g}")
    return base, {"slim": os.path.join(base, "search") if at6 else os.path.join(sub, "slim"),
                  "random": os.path.join(sub, "random"), "uniform": os.path.join(sub, "uniform"),
                  "slim_refine": os.path.join(refine, f"s{seed}_f{frac:g}_slim_refine"),
                  "random_same_total": os.path.join(refine, f"s{seed}_f{frac:g}_random_same_total")}


def paired(acc, frac, a, b, seeds):
    d = [acc[(s, frac, a)] - acc[(s, frac, b)] for s in seeds]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
    return {"mean_diff": m, "se": se, "won": sum(x > 0 for x in d), "lost": sum(x < 0 for x in d), "per_seed": d}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True)
    p.add_argument("--refine", required=True)
    p.add_argument("--bench7", help="re-run of some seeds after session 7 (their networks replace --bench's)")
    p.add_argument("--refine7")
    p.add_argument("--seeds7", type=int, nargs="*", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.4])
    p.add_argument("--test-images", type=int, default=3000)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch
    from nas.finetune import finetune
    from nas.run import load_supernet_run, make_evaluator
    torch.set_num_threads(1)
    stored = search_pool._load([f for f in STORED if os.path.exists(f)], "quickstart")
    stored.update(search_pool._load([f for f in STORED_REFINE if os.path.exists(f)], "refine"))
    done = {}
    if a.json and os.path.exists(a.json):  # resume: networks already fine-tuned both ways
        with open(a.json) as f:
            done = {(r["seed"], r["fraction"], r["key"]): r for r in json.load(f)["networks"]}
    nets = list(done.values())
    acc = {"old": {}, "new": {}}
    t_start = time.time()
    for seed in a.seeds:
        bench, refine = (a.bench7, a.refine7) if seed in a.seeds7 else (a.bench, a.refine)
        sn_cfg = None
        for frac in a.fractions:
            base, dirs = run_dirs(bench, refine, seed, frac)
            reps = {}
            for k, d in dirs.items():
                with open(os.path.join(d, "report.json")) as f:
                    reps[k] = json.load(f)
            for k in STRATEGIES:
                r = reps[k]
                key = json.dumps(r["choice"], sort_keys=True)
                row = done.get((seed, frac, key))
                if row is None:
                    if sn_cfg is None:
                        sn, cfg, _ = load_supernet_run(os.path.join(base, "supernet"))
                        sn_cfg = (sn, cfg, {})
                    sn, cfg, evs = sn_cfg
                    ev_key = (r["evaluation"]["images"], r["evaluation"]["bn_batches"], r["seed"])
                    if ev_key not in evs:
                        evs[ev_key] = make_evaluator(sn, cfg, ev_key[0], ev_key[1], 256, r["seed"])
                    ev, train = evs[ev_key]
                    ft = r.get("finetune") or {}
                    row = {"seed": seed, "fraction": frac, "key": key, "strategies": [], "test": {}}
                    for recipe in ("old", "new"):
                        t0 = time.time()
                        m, _ = ev.model(r["choice"])
                        finetune(m, train, int(ft.get("steps", 200)), batch_size=cfg.batch_size,
                                 lr=float(ft.get("lr", 1e-3)), seed=r["seed"], decay_all=recipe == "old")
                        row["test"][recipe] = bq.test_accuracy(m, {"seed": cfg.seed, "distractors": cfg.data.distractors},
                                                               sn.space, r["evaluation"]["images"], a.test_images)
                        row[f"seconds_{recipe}"] = time.time() - t0
                    nets.append(row)
                    done[(seed, frac, key)] = row
                    print(json.dumps({k2: v for k2, v in row.items() if k2 != "key"}), flush=True)
                if k not in row["strategies"]:
                    row["strategies"].append(k)
                for recipe in ("old", "new"):
                    acc[recipe][(seed, frac, k)] = row["test"][recipe]
                if a.json:
                    from supernet.arch import atomic_write_text
                    atomic_write_text(a.json, json.dumps({"networks": nets}, indent=1) + "\n")
    mism = [(k, stored[k], v) for k, v in acc["old"].items() if k in stored and abs(stored[k] - v) > 1e-9]
    print(f"old recipe recomputed vs stored: {len(acc['old']) - len(mism)} of {len(acc['old'])} equal", flush=True)
    for k, s, v in mism:
        print(f"  MISMATCH {k}: stored {s:.4f} recomputed {v:.4f}")
    summary = {"stored_mismatches": [[list(k), s, v] for k, s, v in mism], "means": {}, "pairs": {},
               "recipe_change": {}, "seconds": time.time() - t_start}
    for frac in a.fractions:
        for recipe in ("old", "new"):
            for k in STRATEGIES:
                v = [acc[recipe][(s, frac, k)] for s in a.seeds]
                summary["means"][f"{frac:g} {recipe} {k}"] = sum(v) / len(v)
            for x, y in (("slim_refine", "random_same_total"), ("slim", "random"), ("slim", "uniform"),
                         ("slim_refine", "uniform")):
                summary["pairs"][f"{frac:g} {recipe} {x} - {y}"] = paired(acc[recipe], frac, x, y, a.seeds)
        for k in STRATEGIES:  # new - old, same network, same seed
            d = [acc["new"][(s, frac, k)] - acc["old"][(s, frac, k)] for s in a.seeds]
            m = sum(d) / len(d)
            summary["recipe_change"][f"{frac:g} {k}"] = {
                "mean_diff": m, "se": math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d)),
                "per_seed": d}
    for k, v in summary["means"].items():
        print(f"mean {k:<32} {v:.4f}")
    for k, v in {**summary["pairs"], **{f"{k} new - old": v for k, v in summary["recipe_change"].items()}}.items():
        extra = f" won {v['won']} / lost {v['lost']}" if "won" in v else ""
        print(f"{k:<48} {v['mean_diff'] * 100:+.2f} +- {v['se'] * 100:.2f} points{extra}")
    if a.json:
        from supernet.arch import atomic_write_text
        atomic_write_text(a.json, json.dumps({"networks": nets, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
