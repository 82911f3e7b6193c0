"""Pruning to a latency target with a measured width grid: does measured CPU latency fall at least in
proportion to MACs? DeiT-Tiny and Swin-Tiny at 224x224, random weights (latency does not depend on
them), Taylor importance on synthetic calibration images (as benchmarks/pruning_latency_scaling.py).

For each preset: the table `benchmarks/pruning_grid_cpu_torch_<preset>.yaml` (build it first:
`vitslim latency build --arch <preset> --prune-grid --out <table>`: torch-cpu, 1 thread, batch 1,
in-context, thread clock) prices the blocks; prune (a) to macs=0.5 and (b) to latency = 0.5 x the
unpruned network's predicted latency (the table's measurement of it); then measure the unpruned and
pruned models end to end, interleaved in shuffled rounds on one thread with the thread clock (CPU
time of the calling thread: time descheduled by other jobs on this shared machine does not count),
and report MACs kept, latency kept (ratios from the same run), predicted vs measured, kept widths.

    python benchmarks/pruning_latency_target.py                 # ~5-10 min on 1 CPU thread
    python benchmarks/pruning_latency_target.py --attention     # the attention-dispatch check only
    python benchmarks/pruning_latency_target.py --extra depth   # + depth moves (whole branches) on, to
                                                                # the latency and the MACs target
    python benchmarks/pruning_latency_target.py --extra depth,proportional --out benchmarks/pruning_latency_proportional.json
                                                                # + macs=F,latency=Fx: both budgets at once

Runs (a) and (b) and every extra but `depth` prune with depth moves off (`depth=False`, as before
depth moves existed), so their numbers reproduce; `depth` adds (a) and (b) with `depth=True` and a
check that the table prices a removed branch / block as its prediction of the arch without it.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import vitslim  # noqa: E402
from supernet.arch import atomic_write_text  # noqa: E402
from latency_tables import LatencyTable  # noqa: E402
from pruning.budget import LatencyCost  # noqa: E402
from pruning.pruner import PruneConfig, prune  # noqa: E402
from pruning.units import block_infos  # noqa: E402
from supernet.data import SyntheticShapes  # noqa: E402


def calib(size: int, n: int, bs: int):
    ds = SyntheticShapes(num_classes=10, image_size=size, length=n * bs, seed=0)
    xs = torch.stack([ds[i][0] for i in range(n * bs)])
    return [(xs[i * bs:(i + 1) * bs], None) for i in range(n)]


def measure(models: dict, batch: int, rounds: int, size: int, seed: int = 0) -> dict:
    """Median thread-clock ms per forward of each model, models interleaved in shuffled rounds."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    times = {k: [] for k in models}
    names = list(models)
    rng = random.Random(seed)
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(3):
                m(x)
        for _ in range(rounds):
            rng.shuffle(names)
            for k in names:
                t0 = time.thread_time()
                models[k](x)
                times[k].append((time.thread_time() - t0) * 1e3)
    return {k: {"ms": statistics.median(v), "p10": sorted(v)[len(v) // 10], "p90": sorted(v)[(9 * len(v)) // 10]}
            for k, v in times.items()}


def widths(arch) -> list:
    return [[i.heads, i.qk_dim, i.v_dim, i.ffn_hidden] for i in block_infos(arch)]


def depth_pricing(table, arch) -> list:
    """For every block and each of attention / FFN / both removed: the LatencyCost saving of that depth
    move vs the table's predict() of the arch without it (they should agree exactly)."""
    import copy
    cost = LatencyCost(table, arch)
    p0 = table.predict(arch, interpolate=True)
    out = []
    for info in block_infos(arch):
        full = (info.heads, info.qk_dim, info.v_dim, info.ffn_hidden)
        for what, w in (("attn", (0, 0, 0, info.ffn_hidden)), ("mlp", full[:3] + (0,)), ("block", (0, 0, 0, 0))):
            a = copy.deepcopy(arch)
            b = a["stages"][info.stage]["blocks"][info.index]
            b.update(heads=w[0], qk_dim=w[1], v_dim=w[2], ffn_hidden=w[3])
            saved = cost.block(info, full) - cost.block(info, w)
            pred = table.predict(a, interpolate=True)
            out.append({"block": info.name, "removed": what, "saved_ms": saved, "predicted_without_ms": pred,
                        "priced_minus_predicted_ms": (p0 - saved) - pred})
    return out


def attention_check(rounds: int = 30) -> dict:
    """Explicit softmax(q k^T * s + bias) v vs torch's SDPA with an additive bias (Swin windows)."""
    def explicit(q, k, v, s, b):
        return ((q @ k.transpose(-2, -1)) * s + b).softmax(-1) @ v

    def sdpa(q, k, v, s, b):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=b, scale=s)

    out = {}
    for name, (B, nw, h, dq, dv) in {"swin_tiny stage0 b1": (1, 64, 3, 32, 32), "swin_tiny stage2 b1": (1, 4, 12, 32, 32),
                                     "swin_tiny stage2 b16": (16, 4, 12, 32, 32),
                                     "swin_tiny stage2 b16 qk8/v24": (16, 4, 12, 8, 24)}.items():
        g = torch.Generator().manual_seed(0)
        q, k = torch.randn(B, nw, h, 49, dq, generator=g), torch.randn(B, nw, h, 49, dq, generator=g)
        v, b = torch.randn(B, nw, h, 49, dv, generator=g), torch.randn(nw, 1, 49, 49, generator=g)
        fns = {"explicit": explicit, "sdpa": sdpa}
        t = {n: [] for n in fns}
        with torch.inference_mode():
            for _ in range(rounds):
                for n, f in fns.items():
                    t0 = time.thread_time()
                    f(q, k, v, 0.18, b)
                    t[n].append((time.thread_time() - t0) * 1e3)
        out[name] = {n: round(statistics.median(x), 4) for n, x in t.items()}
        print(f"  {name}: " + ", ".join(f"{n} {m:.3f} ms" for n, m in out[name].items()), flush=True)
    return out


def profile(models: dict, size: int, iters: int = 10) -> dict:
    """Self CPU ms per forward by operator (torch.profiler, batch 1, one thread)."""
    from torch.profiler import ProfilerActivity, profile as prof
    x = torch.randn(1, 3, size, size)
    out = {}
    with torch.inference_mode():
        for name, m in models.items():
            for _ in range(3):
                m(x)
            with prof(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(iters):
                    m(x)
            rows = {e.key: e.self_cpu_time_total / 1e3 / iters for e in p.key_averages()}
            out[name] = dict(sorted(((k, round(v, 4)) for k, v in rows.items() if v > 0.005), key=lambda t: -t[1]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="deit_tiny,swin_tiny")
    p.add_argument("--table", default=os.path.join(HERE, "pruning_grid_cpu_torch_{preset}.yaml"))
    p.add_argument("--selection", default="auto", choices=["auto", "ratio", "knapsack"])
    p.add_argument("--extra", default="", help="more runs, comma-separated: knapsack, ratio, minkeep0 (latency target with that selection / "
                        "min_keep 0), embed (latency target with embedding pruning: slow, priced off the grid), "
                        "macs_embed (MACs target with embedding pruning), depth (latency and MACs targets with depth "
                        "moves on; every other run has them off), depth_only (latency target, depth on, min_keep 1: "
                        "only whole branches go), proportional (macs=F,latency=Fx: both met, depth moves on as for "
                        "any latency target)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds at batch 1 (default 15)")
    p.add_argument("--rounds-b16", type=int, default=3, help="interleaved rounds at batch 16 (0: skip; default 3)")
    p.add_argument("--fraction", type=float, default=0.5)
    p.add_argument("--attention", action="store_true", help="only the attention-dispatch check")
    p.add_argument("--profile", action="store_true", help="also profile the models by operator (batch 1)")
    p.add_argument("--out", default=os.path.join(HERE, "pruning_latency_target.json"))
    args = p.parse_args()
    known = ("knapsack", "ratio", "minkeep0", "embed", "macs_embed", "depth", "depth_only", "proportional")
    for extra in filter(None, args.extra.split(",")):
        if extra not in known:
            p.error(f"--extra {extra!r}: expected any of {', '.join(known)} (comma-separated)")
    torch.set_num_threads(1)
    if args.attention:
        print("attention with an additive bias, 1 thread, thread clock:")
        attention_check()
        return
    out = {"threads": 1, "clock": "thread", "torch": torch.__version__, "fraction": args.fraction,
           "selection": args.selection, "attention_with_bias": None}
    t_start = time.perf_counter()
    for name in args.presets.split(","):
        arch = vitslim.get_preset(name)
        table = LatencyTable.load(args.table.format(preset=name))
        torch.manual_seed(0)
        model = vitslim.build_model(arch).eval()
        cal = calib(arch["input_size"], 2, 8)
        p0 = table.predict(arch)
        goal = args.fraction * p0
        off = {"depth": False}
        runs = {"macs": (f"macs={args.fraction}", args.selection, dict(off)),
                "latency": (f"latency={goal:.4f}", args.selection, dict(off))}
        for extra in filter(None, args.extra.split(",")):
            if extra == "macs_embed":  # residual widths too, to a MACs target (no grid at other widths)
                runs["macs/embed"] = (f"macs={args.fraction}", args.selection, {"prune_embed": True, **off})
                continue
            if extra == "depth":  # whole branches as moves, competing with unit moves
                runs["macs/depth"] = (f"macs={args.fraction}", args.selection, {"depth": True})
                runs["latency/depth"] = (f"latency={goal:.4f}", args.selection, {"depth": True})
                continue
            if extra == "proportional":  # MACs and latency budgets at once (pruning.budget.select_constrained)
                runs["macs+latency"] = (f"macs={args.fraction},latency={args.fraction}x", args.selection, {})
                continue
            if extra == "depth_only":  # min_keep 1 holds every unit: only whole branches may go
                runs["latency/depth_only"] = (f"latency={goal:.4f}", args.selection, {"depth": True, "min_keep": 1.0})
                continue
            kw = {"embed": {"prune_embed": True}, "minkeep0": {"min_keep": 0.0}}.get(extra, {})
            kw = {**kw, **off}
            sel = extra if extra in ("knapsack", "ratio") else args.selection
            runs[f"latency/{extra}"] = (f"latency={goal:.4f}", sel, kw)
        models, archs, reps = {"unpruned": model}, {"unpruned": arch}, {}
        for rn, (target, sel, kw) in runs.items():
            t0 = time.perf_counter()
            res = prune(model, arch, PruneConfig(target=target, selection=sel, calib_batches=2, eval_batches=0, **kw),
                        calibration=cal, table=table)
            print(f"{name} {rn} ({target}, {sel}): pruned in {time.perf_counter() - t0:.0f}s, MACs kept "
                  f"{res.report['macs_kept']:.3f}, predicted {table.predict(res.arch, interpolate=True):.2f} ms "
                  f"(unpruned {p0:.2f})", flush=True)
            models[rn], archs[rn], reps[rn] = res.model, res.arch, res.report
        macs0 = vitslim.count(arch)["macs"]
        row = {"table": os.path.relpath(table.path, os.path.dirname(HERE)), "predicted_unpruned_ms": p0,
               "latency_goal_ms": goal, "runs": {}}
        cost = LatencyCost(table, arch)
        row["blocks_on_grid"] = sum(cost.uses_grid(i) for i in block_infos(arch))
        if {"depth", "depth_only"} & set(args.extra.split(",")):
            row["depth_pricing"] = depth_pricing(table, arch)
            worst = max(abs(v["priced_minus_predicted_ms"]) for v in row["depth_pricing"])
            print(f"  depth pricing: a removed branch / block priced as predict() of the arch without it, "
                  f"worst difference {worst:.2e} ms over {len(row['depth_pricing'])} removals", flush=True)
        lat1 = measure(models, 1, args.rounds, arch["input_size"])
        lat16 = measure(models, 16, args.rounds_b16, arch["input_size"]) if args.rounds_b16 else None
        for rn in models:
            a = archs[rn]
            macs_kept = vitslim.count(a)["macs"] / macs0
            pred = table.predict(a, interpolate=True)
            r = {"target": runs[rn][0] if rn in runs else None, "selection": runs[rn][1] if rn in runs else None,
                 "macs_kept": macs_kept, "predicted_ms": pred, "measured_ms_b1": lat1[rn]["ms"],
                 "measured_p10_p90_b1": [lat1[rn]["p10"], lat1[rn]["p90"]],
                 "latency_kept_b1": lat1[rn]["ms"] / lat1["unpruned"]["ms"],
                 "predicted_kept": pred / p0, "predicted_vs_measured": pred / lat1[rn]["ms"] - 1,
                 "widths": widths(a), "stage_widths": [st["width"] for st in a["stages"]]}
            if lat16:
                r["measured_ms_b16"] = lat16[rn]["ms"]
                r["latency_kept_b16"] = lat16[rn]["ms"] / lat16["unpruned"]["ms"]
            if rn in reps:
                r["emptied"] = reps[rn]["emptied"]
                r["removed_blocks"] = reps[rn]["removed_blocks"]
                r["depth"] = reps[rn]["depth"]
            row["runs"][rn] = r
            print(f"  {rn:<18} MACs kept {macs_kept:.3f}  b1 {lat1[rn]['ms']:7.2f} ms (kept {r['latency_kept_b1']:.3f})"
                  f"  predicted {pred:7.2f} ms ({r['predicted_vs_measured']:+.1%})"
                  + (f"  b16 {r['measured_ms_b16']:7.1f} ms (kept {r['latency_kept_b16']:.3f})" if lat16 else ""),
                  flush=True)
        if args.profile:
            row["profile_ms_b1"] = prof_ = profile(models, arch["input_size"])
            for rn, ops in prof_.items():
                tot = sum(ops.values())
                print(f"  profile {rn}: {tot:.2f} ms: " + ", ".join(f"{k} {v:.2f}" for k, v in list(ops.items())[:8]))
        out[name] = row
    print("attention with an additive bias, 1 thread, thread clock:")
    out["attention_with_bias"] = attention_check()
    out["seconds"] = time.perf_counter() - t_start
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
