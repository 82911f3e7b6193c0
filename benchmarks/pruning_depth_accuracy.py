"""What depth moves cost in accuracy: the small DeiT and Swin trained by
benchmarks/pruning_vs_torch_pruning.py (read from its cache; run that script first), pruned to the
same MACs target with depth moves off, on, and alone (min_keep 1: only whole branches go), held-out
top-1 straight after pruning and after that script's fine-tuning (KD from the unpruned model), and
CPU latency at batch 1 (one thread, thread clock, interleaved rounds, ratios from one run).

    python benchmarks/pruning_depth_accuracy.py                        # ~10 min on 1 CPU thread
    python benchmarks/pruning_depth_accuracy.py --finetune-steps 0     # pruned only, ~1 min

With latency budgets (tables of these 32x32 models with their pruning grid, built first:
`vitslim latency build --arch <cached checkpoint> --prune-grid --out <table>`), targets joined by
commas are met together, e.g. MACs and latency at once:

    python benchmarks/pruning_depth_accuracy.py --table 'runs/grid_small_{family}.yaml' \
        --targets macs=0.5 'macs=0.5,latency=0.8x' 'macs=0.5,latency=0.7x' --variants 'depth off' auto \
        --out benchmarks/pruning_budgets_accuracy.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import vitslim  # noqa: E402
from supernet.arch import atomic_write_text  # noqa: E402
from latency_tables import LatencyTable  # noqa: E402
from pruning.pruner import PruneConfig, finetune, prune  # noqa: E402
from pruning.units import PruneError  # noqa: E402
from pruning_latency_target import measure  # noqa: E402
from pruning_vs_torch_pruning import DEIT, SWIN, accuracy, add_shared_args, batch_stream, cache_path, render  # noqa: E402

VARIANTS = {"depth off": {"depth": False}, "depth on": {"depth": True},
            "depth only (min_keep 1)": {"depth": True, "min_keep": 1.0}}


def cached_model(name, arch, args):
    """The trained model exactly as pruning_vs_torch_pruning.py caches it (same key)."""
    path = cache_path(name, arch, args)
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no trained model cached; run benchmarks/pruning_vs_torch_pruning.py first")
    model, arch = vitslim.load_checkpoint(path)
    return model.eval(), arch, path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)  # the settings of pruning_vs_torch_pruning.py (the training ones name its cache entry)
    p.add_argument("--families", default="deit,swin")
    p.add_argument("--targets", nargs="+", default=["macs=0.5"],
                   help="pruning targets, one run each (a target may join several budgets with commas: "
                        "macs=0.5,latency=0.7x; latency budgets need --table)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS) + ["auto"],
                   help="depth settings per target (auto: the pruner's default, on when a budget is a latency)")
    p.add_argument("--table", default=None, help="latency table per family, '{family}' replaced (deit, swin)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved latency rounds at batch 1 (0: skip)")
    p.add_argument("--out", default=os.path.join(HERE, "pruning_depth_accuracy.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    xtr, ytr = render(args.train_images, "train", args.seed)
    xte, yte = render(args.test_images, "heldout", args.seed)
    out = {"settings": vars(args), "torch": torch.__version__}
    for fam in args.families.split(","):
        model, arch, path = cached_model(fam, {"deit": DEIT, "swin": SWIN}[fam], args)
        cstream = batch_stream(xtr, ytr, args.calib_batch_size, args.seed + 1)
        calib = [next(cstream) for _ in range(args.calib_batches)]
        macs0 = vitslim.count(arch)["macs"]
        row = {"checkpoint": os.path.basename(path), "unpruned_top1": accuracy(model, xte, yte), "runs": {}}
        print(f"== {fam}: {path}, top-1 {row['unpruned_top1']:.3f}", flush=True)
        models = {"unpruned": model}
        table = LatencyTable.load(args.table.format(family=fam)) if args.table else None
        for target in args.targets:
            for vname in args.variants:
                kw = VARIANTS.get(vname, {})
                torch.manual_seed(args.seed)
                try:
                    res = prune(model, arch, PruneConfig(target=target, selection="auto", calib_batches=len(calib),
                                                         eval_batches=min(4, len(calib)), **kw), calibration=calib,
                                table=table)
                except PruneError as e:  # e.g. a latency below what this depth setting can reach
                    row["runs"][f"{target} {vname}"] = {"target": target, **kw, "error": str(e)}
                    print(f"  {target} {vname}: {e}", flush=True)
                    continue
                r = {"target": target, **kw, "macs_kept": vitslim.count(res.arch)["macs"] / macs0,
                     "params_kept": res.report["params_kept"], "top1_pruned": accuracy(res.model, xte, yte),
                     "emptied": res.report["emptied"], "removed_blocks": res.report["removed_blocks"],
                     "selection": res.report["steps"][-1]["selection"], "depth": res.report["depth"]}
                if table is not None:
                    r["predicted_latency_kept"] = res.report["latency_kept"]
                m = res.model
                if args.finetune_steps:
                    teacher = copy.deepcopy(model).eval()
                    finetune(m, batch_stream(xtr, ytr, args.batch, args.seed + 2), args.finetune_steps, lr=args.ft_lr,
                             weight_decay=0.05, teacher=teacher, kd_weight=0.5)
                    r["top1_finetuned"] = accuracy(m, xte, yte)
                name = f"{target} {vname}"
                row["runs"][name] = r
                models[name] = m.eval()
                print(f"  {name:<34} MACs kept {r['macs_kept']:.3f}  top-1 {r['top1_pruned']:.3f}"
                      + (f" -> {r['top1_finetuned']:.3f} fine-tuned" if "top1_finetuned" in r else "")
                      + f"  removed: {', '.join(r['emptied']) or '-'}", flush=True)
        if args.rounds:
            lat = measure(models, 1, args.rounds, arch["input_size"])
            row["unpruned_ms_b1"] = lat["unpruned"]["ms"]
            for name, r in row["runs"].items():
                if "error" in r:
                    continue
                r["ms_b1"] = lat[name]["ms"]
                r["latency_kept_b1"] = lat[name]["ms"] / lat["unpruned"]["ms"]
                print(f"  {name:<34} b1 {r['ms_b1']:.2f} ms (kept {r['latency_kept_b1']:.3f}, MACs kept "
                      f"{r['macs_kept']:.3f})", flush=True)
        out[fam] = row
    out["seconds"] = time.perf_counter() - t_start
    atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} ({out['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
