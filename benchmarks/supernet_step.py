"""Cost of one supernet training step against the largest standalone subnet of the same space:
time (interleaved repeats, medians, ratios from one run) and peak training memory.

Variants, each a full step (forward, cross-entropy, backward, optimiser step(s)) on the same batch:
  subnet       the largest subnet (space.largest_choice(): every position Meta4D, full widths) as a
               plain EfficientFormer, AdamW
  hard-same    the supernet in hard single-path mode with the alphas pinned to that same path:
               identical work, so the ratio is the supernet's own overhead (sampling, the
               straight-through weight, the alpha optimiser)
  hard         hard mode with uniform alphas: a random path per step (the average training step)
  soft         the paper's Gumbel-softmax mixture: every candidate of every position runs

Memory: the peak of one step (weights, gradients, optimiser state, activations, temporaries), tensor
by tensor with torch's MemTracker (torch.distributed._tools), on CPU and CUDA alike.

    python benchmarks/supernet_step.py                       # tiny space, batch 64, CPU
    python benchmarks/supernet_step.py --space efficientformer_l1 --batch 64 --device cuda
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

VARIANTS = ("subnet", "hard-same", "hard", "soft")


def build(variant: str, space_path: str, device: str):
    """(step function, model, optimisers) of a variant."""
    import vitslim
    from supernet.space import load_space
    from supernet.supernet import MetaPathSupernet
    from supernet.train import param_groups
    space = load_space(space_path)
    torch.manual_seed(0)
    if variant == "subnet":
        model = vitslim.build_model(space.to_arch(space.largest_choice())).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(x, y):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss
        return step, model, [opt]
    sn = MetaPathSupernet(space).to(device).train()
    if variant == "hard-same":
        with torch.no_grad():
            for s, a in zip(space.stages, sn.alphas):
                a.fill_(-30.0)
                a[:, s.candidates.index("meta4d")] = 30.0
    opt = torch.optim.AdamW(param_groups(sn, 0.025), lr=1e-3)
    aopt = torch.optim.Adam(sn.arch_parameters(), lr=1e-2, betas=(0.5, 0.999))
    gen = torch.Generator().manual_seed(0)
    mode = "soft" if variant == "soft" else "hard"

    def step(x, y):
        loss = F.cross_entropy(sn(x, mode=mode, noise=sn.gumbel(gen), tau=1.0), y)
        opt.zero_grad(set_to_none=True)
        aopt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        aopt.step()
        return loss
    return step, sn, [opt, aopt]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(args) -> dict:
    from supernet.space import load_space
    space = load_space(args.space)
    size = args.input_size or space.input_size
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    y = torch.randint(0, space.num_classes, (args.batch,), device=args.device)
    steps = {v: build(v, args.space, args.device)[0] for v in args.variants}
    for v in args.variants:
        for _ in range(args.warmup):
            steps[v](x, y)
    times = {v: [] for v in args.variants}
    for _ in range(args.repeats):  # interleaved: drifts in machine load hit every variant alike
        for v in args.variants:
            _sync(args.device)
            t = time.perf_counter()
            steps[v](x, y)
            _sync(args.device)
            times[v].append(time.perf_counter() - t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    return {"median_s": med, "ratio_to_subnet": {v: med[v] / med["subnet"] for v in med}}


def memory_all(args) -> dict:
    """Peak bytes of one training step per variant (parameters, gradients, optimiser state,
    activations and temporaries), tracked tensor by tensor with torch's MemTracker: the same
    measure on CPU and CUDA, without allocator caching or the process's other memory."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from supernet.space import load_space
    space = load_space(args.space)
    size = args.input_size or space.input_size
    x = torch.randn(args.batch, 3, size, size, device=args.device)
    y = torch.randint(0, space.num_classes, (args.batch,), device=args.device)
    out, parts = {}, {}
    for v in args.variants:
        step, model, opts = build(v, args.space, args.device)
        step(x, y)  # optimiser state exists from here on
        mt = MemTracker()
        mt.track_external(model, *opts)
        with mt:
            step(x, y)
        snap = mt.get_tracker_snapshot("peak")[torch.device(args.device)]
        out[v] = int(snap["Total"])
        parts[v] = {str(getattr(k, "value", k)): int(b) for k, b in snap.items() if b}
        del step, model, opts
    return {"peak_bytes": out, "ratio_to_subnet": {v: out[v] / out["subnet"] for v in out}, "breakdown": parts}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--space", default=os.path.join(os.path.dirname(__file__), "..", "supernet", "spaces", "tiny.yaml"))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--input-size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "subnet" not in args.variants:
        args.variants = ["subnet"] + args.variants
    res = {"space": os.path.basename(args.space), "batch": args.batch, "device": args.device,
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    res["time"] = time_all(args)
    if not args.no_memory:
        res["memory"] = memory_all(args)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
