"""Do the supernet's importance scores separate after a short training on the synthetic task?

Trains (or reads) a run, then prints:
  - how far the alphas moved from uniform over training (metrics.jsonl: alpha_dev, alpha_entropy);
  - the distribution of MetaPath importance (uniform alphas give 1 for {4D, I} and 2 for {4D, 3D, I});
  - a check that the scores mean something: held-out accuracy of the full-width all-Meta4D net
    in fixed mode with the k least vs the k most important positions turned into identity.

    python benchmarks/supernet_importance.py --config experiments/supernet_tiny.yaml --out runs/importance
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "experiments", "supernet_tiny.yaml"))
    p.add_argument("--out", default="runs/supernet_importance")
    p.add_argument("--k", type=int, default=3, help="positions removed in the check")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    from supernet.data import build_datasets, heldout_batches
    from supernet.train import evaluate, load_config, load_supernet, read_run, train
    cfg = load_config(args.config)
    if not os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
        train(cfg, args.out)
    elif read_run(args.out)["step"] < cfg.steps:
        train(cfg, args.out, resume=True)
    model, obj = load_supernet(args.out)
    imp = obj["importance"]

    with open(os.path.join(args.out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    kept = rows[:: max(1, len(rows) // 8)]
    if rows and kept[-1] is not rows[-1]:
        kept.append(rows[-1])  # the last logged step too (every 5th of 40 rows stopped at 360 of 400)
    traj = [(r["step"], round(r["alpha_dev"], 4), round(r["alpha_entropy"], 4)) for r in kept]

    flat = [(s, j, v) for s, vals in enumerate(imp["metapath"]) for j, v in enumerate(vals) if v is not None]
    by_kind = {}
    for s, j, v in flat:
        by_kind.setdefault(len(imp["candidates"][s]), []).append(v)
    dist = {f"{n} candidates (uniform = {n - 1})": {"min": min(v), "median": statistics.median(v), "max": max(v)}
            for n, v in sorted(by_kind.items())}
    probs = {f"stage {s + 1}": [[round(q, 3) for q in pos] for pos in ps] for s, ps in enumerate(imp["probabilities"])}

    # the check: remove the k least / most important positions from the all-Meta4D net
    _, held = build_datasets(cfg.data, cfg.space.input_size, cfg.space.num_classes, seed=cfg.seed)
    loader = list(heldout_batches(held, 64))
    dev = torch.device("cpu")
    base = model.space.largest_choice()
    order = sorted(flat, key=lambda t: t[2])

    def without(positions):
        c = copy.deepcopy(base)
        for s, j, _ in positions:
            c["blocks"][s][j] = "identity"
        return c

    acc_full = evaluate(model, loader, dev, base)
    acc_least = evaluate(model, loader, dev, without(order[:args.k]))
    acc_most = evaluate(model, loader, dev, without(order[-args.k:]))
    res = {"run": args.out, "step": obj["step"], "alpha_trajectory (step, mean |p - uniform|, entropy / log n)": traj,
           "metapath_importance": dist, "stage_importance": [round(v, 3) if v is not None else None for v in imp["stage"]],
           "probabilities": probs,
           "heldout_acc": {"all_meta4d": acc_full, f"minus_{args.k}_least_important": acc_least,
                           f"minus_{args.k}_most_important": acc_most}}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
