"""vitslim's Taylor pruner side by side with Torch-Pruning (pip torch-pruning, GroupTaylorImportance)
on a small DeiT and a small Swin trained here on the synthetic shapes task.

Same for every pruner: the trained model, the MACs target (50%), the calibration batches (scoring),
the fine-tuning budget (steps, batches, optimiser, KD from the unpruned model). Reported: held-out
top-1 before and after fine-tuning, params, MACs, CPU latency at batch 1 and 16 (one thread,
median of interleaved rounds), plus the unpruned reference. Also checked in the same run: pruning
0% reproduces the outputs (relative error), the scoring pass costs <= 1.5x a training step per
batch, and latency falls at least in proportion to MACs.

Torch-Pruning needs help to run on these models (as its own ViT example does): the attention
forward is swapped, while pruning only, for timm's explicit reshape(B, N, 3, heads, head_dim)
form its tracer understands, and the relative-position bias enters that traced forward detached
(otherwise the tracer couples it to the head dims and leaves them whole). Its variants:
- tp-local: uniform ratio in every layer, head dims + FFN hidden (the embedding kept, as vitslim);
- tp-global: global ranking, the same units;
- tp-local+embed (DeiT only): TP's default, the embedding width pruned too. On Swin that variant
  breaks at patch merging (LayerNorm(4C) after the 2x2 concat), an open TP limitation.
TP's pruning ratio is bisected so that MACs land at (just under) 50%.

    python benchmarks/pruning_vs_torch_pruning.py            # ~10 min on 1 CPU thread, + ~15 min the
                                                             # first time (training, then cached)
    python benchmarks/pruning_vs_torch_pruning.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import vitslim  # noqa: E402
from pruning.importance import TaylorImportance  # noqa: E402
from pruning.pruner import PruneConfig, finetune, prune  # noqa: E402
from supernet.data import SyntheticShapes  # noqa: E402
from supernet.families.deit import Attention  # noqa: E402

# DeiT-T and Swin-T in miniature (ratio 4 FFN, 16 channels per head), small enough to train on a CPU
DEIT = {"family": "deit", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 4},
        "stages": [{"width": 64, "blocks": [{"type": "vit", "heads": 4, "ffn_hidden": 256}] * 4}]}
SWIN = {"family": "swin", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 4},
        "stages": [{"width": 48, "window_size": 4, "blocks": [{"type": "swin", "heads": 3, "ffn_hidden": 192}] * 2},
                   {"width": 96, "window_size": 4, "blocks": [{"type": "swin", "heads": 6, "ffn_hidden": 384}] * 4}]}


# ---------------------------------------------------------------- data
def render(n: int, split: str, seed: int = 0):
    ds = SyntheticShapes(num_classes=10, image_size=32, length=n, split=split, seed=seed)
    xs, ys = zip(*(ds[i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys)


def batch_stream(x, y, bs, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            idx = perm[i:i + bs]
            yield x[idx], y[idx]


def accuracy(model, x, y, bs=250):
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), bs):
            correct += int((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum())
    return correct / len(x)


def train(model, stream, steps, lr=1e-3, warmup=100):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(3.14159265 * s / steps)).item()))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = next(stream)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"    step {step:4d} loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    model.eval()
    return model


# ---------------------------------------------------------------- Torch-Pruning
def _tp_forward(self, x, attn_bias=None):
    *lead, n, c = x.shape
    xb = x.reshape(-1, n, c)
    b = xb.shape[0]
    qkv = self.qkv(xb).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        attn = (attn.reshape(*lead, self.heads, n, n) + attn_bias.detach()).reshape(b, self.heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
    return self.proj(out).reshape(*lead, n, -1)


def _tp_forward_window(self, x, mask=None):
    n = self.window_size ** 2
    bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
    bias = bias.reshape(n, n, -1).permute(2, 0, 1)
    if mask is not None:
        bias = bias + mask.unsqueeze(1)
    return _tp_forward(self, x, bias)


def tp_prune(model, ratio, calib, glob=False, embed=False):
    import torch_pruning as tp
    model = copy.deepcopy(model)
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for m in attns:
        m.forward = types.MethodType(_tp_forward_window if hasattr(m, "window_size") else _tp_forward, m)
    head = model.head.fc if hasattr(model.head, "fc") else model.head
    ignored = [head]
    if not embed:  # keep the residual width: every group that reaches the stem / patch merging stays whole
        ignored += [model.patch_embed.proj] + [m.reduction for n, m in model.named_modules() if n.endswith("downsample")
                                               and m is not None]
    pruner = tp.pruner.MetaPruner(
        model, torch.randn(1, 3, model.arch["input_size"], model.arch["input_size"]),
        importance=tp.importance.GroupTaylorImportance(), global_pruning=glob,
        pruning_ratio=ratio, ignored_layers=ignored, num_heads={m.qkv: m.heads for m in attns},
        prune_head_dims=True, prune_num_heads=False)
    model.zero_grad()
    model.eval()
    for x, y in calib:  # TP's Taylor: |w * dL/dw| with gradients accumulated over the calibration batches
        F.cross_entropy(model(x), y).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for m in attns:
        m.heads = pruner.num_heads[m.qkv]
        m.qk_dim = m.v_dim = m.qkv.out_features // (3 * m.heads)
        del m.forward  # back to the model's own (SDPA) attention for fine-tuning and timing
    return model


def tp_to_macs(model, goal, calib, **kw):
    """Smallest TP ratio whose MACs are <= goal (bisection)."""
    lo, hi, best = 0.0, 0.8, None
    for _ in range(9):
        mid = (lo + hi) / 2
        try:
            m = tp_prune(model, mid, calib, **kw)
            macs = macs_params(m, model.arch)["macs"]
        except Exception as e:  # noqa: BLE001 - a TP failure is a result to report
            return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        if macs <= goal:
            best, hi = (m, mid), mid
        else:
            lo = mid
    if best is None:
        return None, "no ratio <= 0.8 reached the MACs target"
    return best, None


# ---------------------------------------------------------------- counting
def arch_of(model, arch) -> dict:
    """The arch config of a (possibly Torch-Pruning-pruned) model, read from its modules, so that
    every model's MACs are counted the same way (supernet.count on the arch: torch's FLOP counter
    counts scaled_dot_product_attention differently on its CPU flash path and its math path)."""
    a = copy.deepcopy(arch)
    blocks = [blk for _, blk in model.block_modules()]
    k = 0
    for i, st in enumerate(a["stages"]):
        for j, b in enumerate(st["blocks"]):
            blk = blocks[k]
            k += 1
            if blk.attn is not None:
                b.update(heads=blk.attn.heads, qk_dim=blk.attn.qk_dim, v_dim=blk.attn.v_dim, scale=blk.attn.scale)
                st["width"] = blk.attn.qkv.in_features
            b["ffn_hidden"] = blk.mlp.fc1.out_features if blk.mlp is not None else 0
    return vitslim.resolve_arch(a)


def macs_params(model, arch):
    c = vitslim.count(arch_of(model, arch))
    assert c["params"] == sum(p.numel() for p in model.parameters())
    return c


def explicit_attention(self, x, attn_bias=None):
    """What deit.Attention could run when qk_dim != v_dim: torch's SDPA has no fused CPU kernel for
    unequal Q/K and V widths and falls back to a math path ~2-3x slower than three explicit ops."""
    if self.qk_dim == self.v_dim:
        return Attention.forward(self, x, attn_bias)
    h, dq, dv = self.heads, self.qk_dim, self.v_dim
    q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
    q = q.unflatten(-1, (h, dq)).transpose(-3, -2)
    k = k.unflatten(-1, (h, dq)).transpose(-3, -2)
    v = v.unflatten(-1, (h, dv)).transpose(-3, -2)
    attn = (q * self.scale) @ k.transpose(-2, -1)
    if attn_bias is not None:
        attn = attn + attn_bias
    return self.proj((attn.softmax(-1) @ v).transpose(-3, -2).flatten(-2))


def with_explicit_attention(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, Attention):
            if hasattr(mod, "window_size"):  # WindowAttention.forward reaches Attention.forward via super()
                mod.__class__ = _explicit_window_class(type(mod))
            else:
                mod.forward = types.MethodType(explicit_attention, mod)
    x = torch.randn(2, 3, model.arch["input_size"], model.arch["input_size"])
    with torch.no_grad():
        ref, out = model(x), m(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5, "explicit attention must compute the same"
    return m


_WINDOW_CLASSES = {}


def _explicit_window_class(cls):
    if cls not in _WINDOW_CLASSES:
        class Explicit(cls):
            def forward(self, x, mask=None):
                n = self.window_size ** 2
                bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
                bias = bias.reshape(n, n, -1).permute(2, 0, 1)
                if mask is not None:
                    bias = bias + mask.unsqueeze(1)
                return explicit_attention(self, x, bias)
        Explicit.__name__ = cls.__name__
        _WINDOW_CLASSES[cls] = Explicit
    return _WINDOW_CLASSES[cls]


# ---------------------------------------------------------------- latency
def latency(models: dict, batch: int, rounds: int, iters: int, size: int = 32) -> dict:
    x = torch.randn(batch, 3, size, size)
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(5):
                m(x)
        for _ in range(rounds):
            for k, m in models.items():  # interleaved: load changes hit every model alike
                t0 = time.perf_counter()
                for _ in range(iters):
                    m(x)
                times[k].append((time.perf_counter() - t0) / iters * 1000)
    return {k: statistics.median(v) for k, v in times.items()}


# ---------------------------------------------------------------- settings shared with the scripts that reuse its models
def add_shared_args(p):
    """Training, calibration and fine-tuning settings (the first five name the cache entry of a trained
    model: benchmarks/pruning_depth_accuracy.py and pruning_budgets_stress.py read the same entries)."""
    p.add_argument("--train-steps", type=int, default=3000)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/vitslim/bench_pruning"),
                   help="trained models are kept here, keyed by arch and training settings (re-runs skip training)")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--ft-lr", type=float, default=3e-4)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-batch-size", type=int, default=32)
    p.add_argument("--test-images", type=int, default=1000)


def cache_path(name, arch, args) -> str:
    """Where the model trained from `arch` with `args`' training settings is cached."""
    key = hashlib.sha1(json.dumps([vitslim.resolve_arch(arch), args.train_steps, args.batch, args.train_lr,
                                   args.train_images, args.seed], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(args.cache, f"{name}_{key}.pt")


# ---------------------------------------------------------------- main
def run_family(name, arch, data, args):
    xtr, ytr, xte, yte = data
    arch = vitslim.resolve_arch(arch)
    cached = cache_path(name, arch, args)
    if os.path.isfile(cached):
        print(f"== {name}: trained model from {cached}", flush=True)
        model, arch = vitslim.load_checkpoint(cached)
    else:
        print(f"== {name}: training from scratch ({args.train_steps} steps, batch {args.batch})", flush=True)
        torch.manual_seed(args.seed)
        model = vitslim.build_model(arch)
        train(model, batch_stream(xtr, ytr, args.batch, args.seed), args.train_steps, lr=args.train_lr)
        if not args.quick:
            vitslim.save_checkpoint(model, arch, cached)
    model.eval()
    ref = {**vitslim.count(arch), "top1": accuracy(model, xte, yte)}
    print(f"  reference top-1 {ref['top1']:.3f}, {ref['macs'] / 1e6:.1f}M MACs", flush=True)
    cstream = batch_stream(xtr, ytr, args.calib_batch_size, args.seed + 1)
    calib = [next(cstream) for _ in range(args.calib_batches)]
    out = {"arch": arch, "reference": ref}

    # pruning 0% reproduces the model
    zero = prune(model, arch, PruneConfig(target="macs=1", eval_batches=0, calib_batches=len(calib)), calibration=calib)
    with torch.no_grad():
        a, b = model(xte[:64]), zero.model(xte[:64])
    out["zero_prune_rel_err"] = float((a - b).abs().max() / a.abs().max())

    # scoring cost per batch vs a plain training step on the same batch
    probe = copy.deepcopy(model)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-6)
    step_t, score_t = [], []
    for r in range(3):
        for x, y in calib[:4]:
            t0 = time.perf_counter()
            loss = F.cross_entropy(probe(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        TaylorImportance().score(model, arch, calib[:4])
        score_t.append((time.perf_counter() - t0) / 4)
    out["scoring_vs_train_step"] = statistics.median(score_t) / statistics.median(step_t)

    goal = 0.5 * ref["macs"]
    teacher = copy.deepcopy(model).eval()
    models = {"unpruned": model}
    results = {}

    t0 = time.perf_counter()
    res = prune(model, arch, PruneConfig(target="macs=0.5", selection="auto", calib_batches=len(calib),
                                         eval_batches=min(4, len(calib))), calibration=calib)
    candidates = {"vitslim": (res.model, {"prune_seconds": time.perf_counter() - t0,
                                          "selection": res.report["steps"][-1]["selection"],
                                          "blocks": res.report["blocks"]})}
    variants = [("tp-local", dict(glob=False)), ("tp-global", dict(glob=True))]
    if arch["family"] == "deit":
        variants.append(("tp-local+embed", dict(glob=False, embed=True)))
    for vname, kw in variants:
        t0 = time.perf_counter()
        best, err = tp_to_macs(model, goal, calib, **kw)
        if err:
            print(f"  {vname}: failed: {err}", flush=True)
            results[vname] = {"error": err}
            continue
        m, ratio = best
        candidates[vname] = (m, {"prune_seconds": time.perf_counter() - t0, "ratio": ratio})

    for vname, (m, info) in candidates.items():
        c = macs_params(m, arch)
        r = {"params": c["params"], "macs": c["macs"], "macs_kept": c["macs"] / ref["macs"],
             "top1_pruned": accuracy(m, xte, yte), **info}
        ft = finetune(m, batch_stream(xtr, ytr, args.batch, args.seed + 2), args.finetune_steps, lr=args.ft_lr,
                      weight_decay=0.05, teacher=teacher, kd_weight=0.5)
        r["top1"] = accuracy(m, xte, yte)
        r["finetune_loss_last"] = ft.get("loss_last")
        results[vname] = r
        models[vname] = m
        print(f"  {vname:15s} MACs {r['macs_kept']:.3f}  top-1 {r['top1_pruned']:.3f} -> {r['top1']:.3f} after fine-tuning",
              flush=True)

    timed = dict(models)
    if args.explicit_attention:  # the same models, unequal Q/K and V widths through explicit ops
        timed.update({k + "/explicit": with_explicit_attention(m) for k, m in models.items() if k == "vitslim"})
    for bs in (1, 16):
        lat = latency(timed, bs, args.rounds, args.iters if bs == 1 else max(1, args.iters // 4))
        for k, v in lat.items():
            (results.setdefault(k, {}) if k != "unpruned" else ref)[f"ms_b{bs}"] = v
    for k, r in list(results.items()):
        if k.endswith("/explicit"):
            base = results[k.split("/")[0]]
            results[k] = {**{x: base[x] for x in base if not x.startswith("ms_")}, **r}
        if "ms_b1" in r or "ms_b1" in results[k]:
            r = results[k]
            r["latency_kept_b1"] = r["ms_b1"] / ref["ms_b1"]
            r["latency_kept_b16"] = r["ms_b16"] / ref["ms_b16"]
    out["pruned"] = results
    return out


def table(name, res):
    ref = res["reference"]
    lines = [f"**{name}** (unpruned: {ref['params'] / 1e3:.0f}K params, {ref['macs'] / 1e6:.1f}M MACs, top-1 "
             f"{ref['top1']:.3f}, {ref['ms_b1']:.2f} ms at batch 1, {ref['ms_b16']:.2f} ms at batch 16)", "",
             "| pruner | MACs kept | params | top-1 pruned | top-1 fine-tuned | ms b1 (kept) | ms b16 (kept) |",
             "|---|---|---|---|---|---|---|"]
    for k, r in res["pruned"].items():
        if "error" in r:
            lines.append(f"| {k} | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {k} | {r['macs_kept']:.3f} | {r['params'] / 1e3:.0f}K | {r['top1_pruned']:.3f} | {r['top1']:.3f} | "
                     f"{r['ms_b1']:.2f} ({r['latency_kept_b1']:.2f}) | {r['ms_b16']:.2f} ({r['latency_kept_b16']:.2f}) |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(p)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--families", default="deit,swin")
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the script runs (writes no --out)")
    p.add_argument("--no-explicit-attention", dest="explicit_attention", action="store_false",
                   help="do not also time vitslim's model with explicit attention for unequal Q/K and V widths")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "pruning_vs_torch_pruning.json"))
    args = p.parse_args()
    if args.quick:
        args.train_steps, args.finetune_steps, args.train_images, args.test_images = 30, 10, 1000, 200
        args.rounds, args.iters, args.calib_batches = 3, 3, 2
    torch.set_num_threads(args.threads)
    import torch_pruning as tp
    t0 = time.perf_counter()
    print("rendering the synthetic data ...", flush=True)
    xtr, ytr = render(args.train_images, "train", args.seed)
    xte, yte = render(args.test_images, "heldout", args.seed)
    out = {"settings": vars(args), "torch": torch.__version__, "torch_pruning": tp.__version__}
    for fam in args.families.split(","):
        arch = {"deit": DEIT, "swin": SWIN}[fam]
        out[fam] = run_family(fam, arch, (xtr, ytr, xte, yte), args)
    out["seconds"] = time.perf_counter() - t0
    if args.quick:
        print(f"--quick: a smoke run, {args.out} not written")
    else:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2, default=str)
        os.replace(tmp, args.out)
    print()
    for fam in args.families.split(","):
        r = out[fam]
        print(table(fam, r))
        print(f"\n0% pruning max relative error {r['zero_prune_rel_err']:.2e}; scoring pass / training step "
              f"{r['scoring_vs_train_step']:.2f}x\n")
    print(f"total {out['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
