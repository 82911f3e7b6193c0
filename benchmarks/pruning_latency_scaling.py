"""Does measured CPU latency fall with MACs when vitslim prunes a real-sized DeiT-Tiny and Swin-Tiny
(224x224) to 50% MACs? Latency does not depend on the weights, so the networks are randomly
initialised and scored on synthetic images; reported: MACs kept vs latency kept at batch 1 and 16
(one thread, median of interleaved rounds), for vitslim's pruned network as the families run it
and with explicit attention for unequal Q/K and V widths (torch's SDPA has no fused CPU kernel
for them), and for Torch-Pruning (tp-local, DeiT-Tiny only: its Swin run is in
pruning_vs_torch_pruning.py).

    python benchmarks/pruning_latency_scaling.py      # ~10 min on 1 CPU thread
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vitslim  # noqa: E402
from supernet.arch import atomic_write_text  # noqa: E402
from pruning.pruner import PruneConfig, prune  # noqa: E402
from pruning_vs_torch_pruning import latency, macs_params, tp_to_macs, with_explicit_attention  # noqa: E402
from supernet.data import SyntheticShapes  # noqa: E402


def calib(size: int, n: int, bs: int):
    ds = SyntheticShapes(num_classes=10, image_size=size, length=n * bs, seed=0)
    xs = torch.stack([ds[i][0] for i in range(n * bs)])
    return [(xs[i * bs:(i + 1) * bs], None) for i in range(n)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="deit_tiny,swin_tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pruning_latency_scaling.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__}
    t_start = time.perf_counter()
    for name in args.presets.split(","):
        arch = vitslim.get_preset(name)
        torch.manual_seed(0)
        model = vitslim.build_model(arch).eval()
        cal = calib(arch["input_size"], 2, 8)
        t0 = time.perf_counter()
        res = prune(model, arch, PruneConfig(target="macs=0.5", selection="ratio", calib_batches=2, eval_batches=0),
                    calibration=cal)
        print(f"{name}: pruned in {time.perf_counter() - t0:.0f}s", flush=True)
        ref = vitslim.count(arch)
        models = {"unpruned": model, "vitslim": res.model, "vitslim/explicit": with_explicit_attention(res.model)}
        macs = {"unpruned": 1.0, "vitslim": res.report["macs_kept"], "vitslim/explicit": res.report["macs_kept"]}
        if arch["family"] == "deit":
            model.arch = arch
            best, err = tp_to_macs(model, 0.5 * ref["macs"], [(x, torch.zeros(len(x), dtype=torch.long)) for x, _ in cal[:1]])
            if best:
                models["tp-local"] = best[0]
                macs["tp-local"] = macs_params(best[0], arch)["macs"] / ref["macs"]
            else:
                print(f"  tp-local failed: {err}")
        row = {"macs_kept": macs, "blocks": res.report["blocks"]}
        for bs, iters in ((1, 5), (16, 1)):
            lat = latency(models, bs, args.rounds, iters, arch["input_size"])
            row[f"ms_b{bs}"] = lat
            print(f"  batch {bs}: " + ", ".join(f"{k} {v:.1f} ms ({v / lat['unpruned']:.2f})" for k, v in lat.items()),
                  flush=True)
        out[name] = row
    out["seconds"] = time.perf_counter() - t_start
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    print(f"total {out['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
