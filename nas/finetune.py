"""A short fine-tuning of a found network (`vitslim search --finetune N`): AdamW with a cosine decay on
the supernet run's training data, in a fixed sample order (the same for every network given a seed,
so that baselines compared after fine-tuning saw exactly the same images). Weight decay skips norms,
biases, LayerScale and attention bias tables (`supernet.train.decay_groups`, timm's rule, as in supernet
training). It used to decay every parameter; `decay_all=True` reproduces that recipe, which BENCHMARKS.md's
search figures up to session 7 were measured with."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from supernet.data import make_loader
from supernet.train import decay_groups


def finetune(model, train_set, steps: int, batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 0.025,
             label_smoothing: float = 0.1, seed: int = 0, warmup: int = 0, progress: bool = False,
             device: str = "cpu", decay_all: bool = False):
    """Train `model` in place for `steps` steps; returns it in eval mode. `decay_all`: the old recipe
    (weight decay on every parameter), for re-measuring figures taken with it."""
    if steps <= 0:
        return model.eval()
    dev = torch.device(device)
    model.to(dev).train()
    torch.manual_seed(seed)
    groups = list(model.parameters()) if decay_all else decay_groups(model.named_parameters(), weight_decay)
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
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
