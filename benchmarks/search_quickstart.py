"""Search benchmark on the quickstart task (results in BENCHMARKS.md, "Search").

For each seed: runs the README's first command (`vitslim run experiments/quickstart.yaml`, with the
supernet and search seeded) and times it; then, for each target (a fraction of the start network's
predicted latency: 0.6 is the quickstart's, 0.4 a harder one), slimming, and under the same target, the same held-out evaluation,
the same end-to-end verification and the same short fine-tuning, runs
  - random search with the evaluation budget slimming used, sampling only networks predicted within
    10% under the target (latency-matched), and the plain one (anything under the target),
  - uniform shrinking of slimming's start network (widths, then depth);
  - slimming with the held-out loss criterion (`--criterion loss`) beside the paper's accuracy drop;
measures the three networks end to end on the table's backend in one interleaved group (the table's
procedure and drift reference), and scores the fine-tuned networks on test images no search saw
(held-out split indices after the ones the search scored candidates on).

    python benchmarks/search_quickstart.py --out runs/bench_search --seeds 0 1 2 \
        --json benchmarks/results/search_quickstart.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")
# slim: the quickstart's (the paper's accuracy-drop criterion); slim_loss: the held-out loss criterion
# random: latency-matched (band 0.1); random_any: the plain baseline (anything under the target)
STRATEGIES = ("slim", "slim_loss", "random", "random_any", "uniform")


def _pct(x) -> str:
    return "resumed" if x is None else f"{x:.2%}"


def measure(table, archs, seconds: float, seed: int = 0):
    from latency_tables.backends import backend_for
    from latency_tables.build import table_reference
    from latency_tables.measure import Procedure, resolve_clock, time_networks
    backend = backend_for(table.device)
    m = table.measurement or {}
    proc = Procedure(time_per_item=seconds, min_samples=30, max_samples=m.get("max_samples", 2000),
                     warmup=m.get("warmup_s", 0.05), seed=seed, clock=resolve_clock(m.get("clock") or "auto", backend))
    ref = table_reference(table, backend, True)
    return [t.ms for t in time_networks(backend, archs, proc, reference=ref)]


def test_accuracy(model_path, data_cfg: dict, space, first: int, n: int, batch: int = 256) -> float:
    """Top-1 of a saved network (a path, or the module) on held-out images [first, first + n): images the
    search never scored."""
    import torch
    import vitslim
    from supernet.data import SyntheticShapes
    model = vitslim.load_checkpoint(model_path)[0] if isinstance(model_path, str) else model_path.eval()
    ds = SyntheticShapes(num_classes=space.num_classes, image_size=space.input_size, length=first + n,
                         split="heldout", seed=int(data_cfg["seed"]), distractors=int(data_cfg.get("distractors", 2)))
    correct = 0
    with torch.no_grad():
        for s in range(first, first + n, batch):
            idx = range(s, min(s + batch, first + n))
            x = torch.stack([torch.as_tensor(ds[i][0]) for i in idx])
            y = torch.tensor([ds[i][1] for i in idx])
            out = model(x)
            if isinstance(out, tuple):
                out = (out[0] + out[1]) / 2
            correct += int((out.argmax(1) == y).sum())
    return correct / n


def run_quickstart(seed: int, out: str) -> dict:
    """The README's first command with the supernet and search seeded; wall and CPU time of it."""
    import yaml
    with open(QUICKSTART) as f:
        d = yaml.safe_load(f)
    base = os.path.dirname(QUICKSTART)
    d["supernet"]["config"] = os.path.join(base, d["supernet"]["config"])
    d["supernet"]["seed"] = seed
    if d.get("table", {}).get("reuse"):
        reuse = os.path.normpath(os.path.join(base, d["table"]["reuse"]))
        if os.path.exists(reuse):  # else a shipped table's name (cpu_torch_tiny), found from anywhere
            d["table"]["reuse"] = reuse
    d["search"]["seed"] = seed
    d["search"]["refine"] = 0  # the paper's slimming (benchmarks/search_refine.py measures --refine)
    os.makedirs(out, exist_ok=True)
    pipe = os.path.join(out, "pipeline.yaml")
    with open(pipe, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    timing_file = os.path.join(out, "timing.json")
    if os.path.isfile(os.path.join(out, "search", "report.json")) and os.path.isfile(timing_file):
        with open(timing_file) as f:
            return json.load(f)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitslim", "run", pipe, "--out", out, "--no-progress"], check=True,
                   cwd=ROOT)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = {"wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
         "loadavg_1min_before": load0, "loadavg_1min_after": os.getloadavg()[0]}
    with open(timing_file, "w") as f:
        json.dump(t, f)
    return t


def one_seed(seed: int, out: str, seconds: float, test_images: int, fractions=(0.6,)) -> dict:
    """The quickstart run (its target: fraction 0.6 of the start network), then every strategy at each
    target fraction (slimming's own run reused at the quickstart's)."""
    import yaml
    from latency_tables import LatencyTable
    from nas.run import load_supernet_run, load_table, run_search
    from nas.strategy import largest_choice
    from supernet.arch import load_arch
    timing = run_quickstart(seed, out)
    with open(os.path.join(out, "search", "report.json")) as f:
        slim = json.load(f)
    with open(os.path.join(out, "pipeline.yaml")) as f:
        pipe = yaml.safe_load(f)
    sn = os.path.join(out, "supernet")
    supernet, cfg, _ = load_supernet_run(sn)
    _, compiled = load_table(slim["table"], supernet.space)
    start_ms = float(compiled.score_choices([largest_choice(supernet)])[0])
    s = pipe["search"]
    ft = slim.get("finetune") or {}
    common = dict(eval_images=slim["evaluation"]["images"], bn_batches=slim["evaluation"]["bn_batches"],
                  finetune=ft.get("steps", 0), finetune_lr=ft.get("lr", 1e-3), seed=slim["seed"], progress=False,
                  verify=s.get("verify", "auto"), tolerance=s.get("tolerance", 0.05),
                  verify_seconds=s.get("verify_seconds", 1.0))
    table = LatencyTable.load(slim["table"])
    data_cfg = {"seed": cfg.seed, "distractors": cfg.data.distractors}
    rows = []
    for frac in fractions:
        quick = abs(frac - float(s.get("target_fraction", 0.6))) < 1e-9
        target = slim["target_ms"] if quick else round(frac * start_ms, 4)
        sub = os.path.join(out, "bench") if quick else os.path.join(out, "bench", f"f{frac:g}")
        reports, dirs = {}, {}
        for name in STRATEGIES:
            d = dirs[name] = os.path.join(out, "search") if (quick and name == "slim") else os.path.join(sub, name)
            if os.path.isfile(os.path.join(d, "report.json")):
                with open(os.path.join(d, "report.json")) as f:
                    reports[name] = json.load(f)
                continue
            kw = {"budget": reports["slim"]["evaluation"]["evaluations"], "band": 0.1} if name == "random" else {}
            if name == "slim_loss":
                kw = {"criterion": "loss"}
            if name == "random_any":
                kw = {"budget": reports["slim"]["evaluation"]["evaluations"], "band": 0.0}
            reports[name] = run_search(sn, slim["table"], target, d, strategy=name.split("_")[0], **common, **kw)
        archs = [load_arch(os.path.join(dirs[k], "arch.yaml")) for k in reports]
        measured = measure(table, archs, seconds, seed=seed)
        for (name, r), ms in zip(reports.items(), measured):
            f = r.get("finetune") or {}
            v = r.get("verification") or {}
            acc_test = test_accuracy(os.path.join(dirs[name], "model.pt"), data_cfg, supernet.space,
                                     r["evaluation"]["images"], test_images)
            rows.append({"fraction": frac, "strategy": name, "blocks": r["blocks"], "widths": r["choice"]["widths"],
                         "target_ms": r["target_ms"], "bound_ms": r.get("bound_ms"),
                         "predicted_ms": r["predicted_ms"], "verify_measured_ms": v.get("measured_ms"),
                         "verify_rounds": len(v.get("rounds", [])), "measured_ms": ms,
                         "measured_over_target": ms / r["target_ms"], "params": r["params"], "macs": r["macs"],
                         "evaluations": r["evaluation"]["evaluations"], "acc_supernet_weights": r["accuracy"],
                         "acc_after_finetune": f.get("acc_after"), "test_acc_after_finetune": acc_test,
                         "finetune_steps": f.get("steps"), "search_seconds": r["search"]["seconds"],
                         "eval_seconds": r["search"]["eval_seconds"], "lookup_seconds": r["search"]["lookup_seconds"],
                         "overhead_fraction": r["search"]["overhead_fraction"]})
    sn_report = os.path.join(sn, "report.json")
    sn_acc = None
    if os.path.isfile(sn_report):
        with open(sn_report) as f:
            sn_acc = json.load(f).get("heldout_acc_best")
    return {"seed": seed, "quickstart": timing, "supernet_heldout_acc": sn_acc, "start_ms": start_ms, "rows": rows}


def main(argv=None):
    from latency_tables.backends import cpu_model
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="working directory (one quickstart run per seed; resumable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per network in the final measurement")
    p.add_argument("--test-images", type=int, default=3000)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.4],
                   help="targets as fractions of the start network's predicted latency (0.6: the quickstart's)")
    p.add_argument("--json", default=None, help="write the figures here")
    a = p.parse_args(argv)
    seeds = [one_seed(s, os.path.join(a.out, f"seed{s}"), a.seconds, a.test_images, a.fractions) for s in a.seeds]
    summary = {}
    for frac in a.fractions:
        for name in STRATEGIES:
            rows = [r for s in seeds for r in s["rows"] if r["strategy"] == name and r["fraction"] == frac]
            m = summary[f"{frac:g} {name}"] = {k: sum(r[k] for r in rows) / len(rows)
                                               for k in ("test_acc_after_finetune", "acc_after_finetune",
                                                         "acc_supernet_weights", "measured_over_target")}
            timed = [r["overhead_fraction"] for r in rows if r["overhead_fraction"] is not None]  # None: resumed
            m["overhead_fraction"] = sum(timed) / len(timed) if timed else None
            m["max_measured_over_target"] = max(r["measured_over_target"] for r in rows)
            m["min_measured_over_target"] = min(r["measured_over_target"] for r in rows)
    res = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
           "seeds": seeds, "mean_over_seeds": summary}
    print(f"{'seed':<4} {'frac':<4} {'strategy':<8} {'blocks':<14} {'widths':<18} {'pred ms':>8} {'meas ms':>8} {'meas/tgt':>8} "
          f"{'evals':>5} {'acc sn':>7} {'acc ft':>7} {'test ft':>7} {'overhead':>8}")
    for s in seeds:
        for r in s["rows"]:
            print(f"{s['seed']:<4} {r['fraction']:<4g} {r['strategy']:<8} {r['blocks']:<14} {str(r['widths']):<18} "
                  f"{r['predicted_ms']:>8.3f} {r['measured_ms']:>8.3f} {r['measured_over_target']:>8.3f} "
                  f"{r['evaluations']:>5} {r['acc_supernet_weights']:>7.4f} {r['acc_after_finetune'] or 0:>7.4f} "
                  f"{r['test_acc_after_finetune']:>7.4f} {_pct(r['overhead_fraction']):>8}")
        q = s["quickstart"]
        print(f"     quickstart: {q['wall_s']:.0f} s wall, {q['cpu_s']:.0f} s CPU, load {q['loadavg_1min_before']:.1f}"
              f" -> {q['loadavg_1min_after']:.1f}; supernet held-out {s['supernet_heldout_acc']}")
    for name, m in summary.items():
        print(f"mean {name:<12} test acc {m['test_acc_after_finetune']:.4f}  measured/target {m['measured_over_target']:.3f}"
              f" ({m['min_measured_over_target']:.3f}-{m['max_measured_over_target']:.3f})  overhead {_pct(m['overhead_fraction'])}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.json)
    return res


if __name__ == "__main__":
    main()
