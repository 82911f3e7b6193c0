"""Held-out accuracy of one Choice with the supernet's inherited weights: what every search strategy
scores candidates with. Deterministic (fixed images, fixed BatchNorm-recalibration batches, eval
mode) and cached by the canonical text of the choice, so asking twice costs one evaluation.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

from supernet.supernet import MetaPathSupernet, recalibrate_bn


def choice_key(choice: Mapping) -> str:
    """Canonical text of a Choice: the cache and log key."""
    return json.dumps({"widths": [int(w) for w in choice["widths"]],
                       "blocks": [[str(t) for t in b] for b in choice["blocks"]]}, separators=(",", ":"))


def stack_batches(dataset, n_images: int, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """n_images of a dataset (`subset_indices`: the first ones, spread over every class for an image
    folder) as in-memory (x, y) batches: evaluation never reloads or re-augments an image, so every
    candidate sees exactly the same inputs."""
    from supernet.data import subset_indices
    idx = subset_indices(dataset, n_images)
    out = []
    for a in range(0, len(idx), batch_size):
        items = [dataset[i] for i in idx[a:a + batch_size]]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])))
    return out


class HeldoutEvaluator:
    """accuracy(choice) -> {"acc", "loss"} on fixed held-out batches.

    The choice is extracted from the supernet (a plain EfficientFormer with the supernet's weights,
    identical to its fixed-mode forward); with `bn_batches` > 0 its BatchNorm statistics are first
    re-estimated on that many fixed training batches (the supernet's shared statistics are those of
    the widths it was trained at). The supernet itself is never modified.
    """

    def __init__(self, supernet: MetaPathSupernet, heldout: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 calib: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (), bn_batches: int = 0,
                 device: str = "cpu"):
        if not heldout:
            raise ValueError("held-out set is empty: nothing to evaluate candidates on")
        self.supernet = supernet.eval()
        self.space = supernet.space
        self.heldout = list(heldout)
        self.calib = list(calib)[:max(0, int(bn_batches))]
        self.bn_batches = len(self.calib)
        self.device = torch.device(device)
        self.cache: Dict[str, dict] = {}
        self.evaluations = 0          # real (uncached) evaluations in this process
        self.primed = 0               # networks whose logged result a resumed run reused
        self.seconds = 0.0            # time spent in them
        self.n_images = sum(int(y.numel()) for _, y in self.heldout)

    def model(self, choice: Mapping):
        """(plain model in eval mode with the weights the evaluation used, arch)."""
        model, arch = self.supernet.extract(choice)
        model = model.to(self.device)
        if self.calib:
            recalibrate_bn(model, self.calib, max_batches=len(self.calib))
        return model.eval(), arch

    @torch.no_grad()
    def score_model(self, model) -> dict:
        model.eval()
        correct, loss = 0, 0.0
        for x, y in self.heldout:
            x, y = x.to(self.device), y.to(self.device)
            out = model(x)
            if isinstance(out, tuple):
                out = (out[0] + out[1]) / 2
            correct += int((out.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
        return {"acc": correct / self.n_images, "loss": loss / self.n_images}

    def __call__(self, choice: Mapping) -> dict:
        choice = self.space.check_choice(choice)  # first: the key canonicalises (int(64.9) is 64), a hit must not
        key = choice_key(choice)                  # answer for a choice that is not in the space (13 us)
        hit = self.cache.get(key)
        if hit is not None:
            return dict(hit)
        t0 = time.perf_counter()
        model, _ = self.model(choice)
        res = self.score_model(model)
        self.seconds += time.perf_counter() - t0
        self.evaluations += 1
        self.cache[key] = res
        return dict(res)

    def prime(self, choice: Mapping, result: Mapping) -> None:
        """Seed the cache with a logged result (resume: the log's numbers are reused verbatim)."""
        key = choice_key(choice)
        if key not in self.cache:
            self.primed += 1
        self.cache[key] = {"acc": float(result["acc"]), "loss": float(result["loss"])}
