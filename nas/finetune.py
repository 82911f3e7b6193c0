"""A short fine-tuning of a found network (`vitslim search --finetune N`): AdamW with a cosine decay on
the supernet run's training data, in a fixed sample order (the same for every network given a seed,
so that baselines compared after fine-tuning saw exactly the same images). Weight decay applies to every
parameter, norms and LayerScale included (the supernet trainer's `param_groups` exempts them, timm's rule):
every figure in BENCHMARKS.md was measured with this recipe, so it stays until they are re-measured."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from supernet.data import make_loader


def finetune(model, train_set, steps: int, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.025,
             label_smoothing: float = 0.1, seed: int = 0, warmup: int = 0, progress: bool = False,
             device: str = "cpu"):
    """Train `model` in place for `steps` steps; returns it in eval mode."""
    if steps <= 0:
        return model.eval()
    dev = torch.device(device)
    model.to(dev).train()
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = warmup or max(1, steps // 20)

    def factor(t):
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loader = make_loader(train_set, batch_size, steps, seed=seed + 7)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="fine-tune", unit="step", dynamic_ncols=True)
    try:
        for x, y in loader:
            x, y = x.to(dev), y.to(dev)
            out = model(x)
            if isinstance(out, tuple):
                out = (out[0] + out[1]) / 2
            loss = F.cross_entropy(out, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        if bar is not None:
            bar.close()
    return model.eval()
