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


def _nbytes(batches) -> int:
    return sum(t.numel() * t.element_size() for b in batches for t in b if isinstance(t, torch.Tensor))


def stage_batches(batches: Sequence[Tuple[torch.Tensor, ...]], device, max_fraction: float = 0.5):
    """(batches, where) with `batches` kept on `device` once, so scoring a candidate copies nothing.

    On the CPU the batches are returned as they are ("host"). On an accelerator they are copied there
    ("device") when they fit in `max_fraction` of its free memory (CUDA reports it; another device is
    tried and an out-of-memory error falls back); otherwise they stay in host memory, pinned where CUDA
    can pin ("pinned"), and are copied per batch without blocking. Held-out images at the L1 settings
    are 3.6 GB: copied per candidate they cost more than scoring the candidate on a fast GPU."""
    device = torch.device(device)
    batches = [tuple(b) for b in batches]
    if device.type == "cpu" or not batches:
        return batches, "host"
    need = _nbytes(batches)
    fits = True
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            fits = need <= max_fraction * free
        except (RuntimeError, AssertionError):  # no CUDA here: the copy below says so
            pass
    if fits:
        try:
            return [tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in b) for b in batches], "device"
        except torch.OutOfMemoryError:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    try:
        return [tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in b) for b in batches], "pinned"
    except RuntimeError:  # no pinned memory on this build or device
        return batches, "host"


class HeldoutEvaluator:
    """accuracy(choice) -> {"acc", "loss"} on fixed held-out batches.

    The choice is extracted from the supernet (a plain EfficientFormer with the supernet's weights,
    identical to its fixed-mode forward); with `bn_batches` > 0 its BatchNorm statistics are first
    re-estimated on that many fixed training batches (the supernet's shared statistics are those of
    the widths it was trained at). The supernet itself is never modified. On an accelerator both sets
    of batches are staged there once (`stage_batches`), and a candidate's figures are read back once.
    """

    def __init__(self, supernet: MetaPathSupernet, heldout: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 calib: Sequence[Tuple[torch.Tensor, torch.Tensor]] = (), bn_batches: int = 0,
                 device: str = "cpu"):
        heldout = list(heldout)  # once: an iterator of batches is read here only (counted and staged from the list)
        if not heldout:
            raise ValueError("held-out set is empty: nothing to evaluate candidates on")
        self.supernet = supernet.eval()
        self.space = supernet.space
        self.device = torch.device(device)
        self.n_images = sum(int(b[1].numel()) for b in heldout)
        self.heldout, self.staged = stage_batches(heldout, self.device)
        self.calib, _ = stage_batches(list(calib)[:max(0, int(bn_batches))], self.device)
        self.bn_batches = len(self.calib)
        self.cache: Dict[str, dict] = {}
        self.evaluations = 0          # real (uncached) evaluations in this process
        self.primed = 0               # networks whose logged result a resumed run reused
        self.seconds = 0.0            # time spent in them

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
        correct, losses = [], []  # per batch, on the device: one read-back for the candidate, not two per batch
        for x, y in self.heldout:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            out = model(x)
            if isinstance(out, tuple):
                out = (out[0] + out[1]) / 2
            correct.append((out.argmax(-1) == y).sum())
            losses.append(F.cross_entropy(out.float(), y, reduction="sum"))
        # summed on the host in batch order, in Python floats: the figures are those of one batch at a time
        correct = sum(int(c) for c in torch.stack(correct).cpu().tolist())
        loss = sum(float(v) for v in torch.stack(losses).cpu().tolist())
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


class FunctionEvaluator:
    """Your own evaluator as a search's: `fn(choice) -> {"acc", "loss"}` (e.g. the extracted network on your own
    held-out set, with your own metric as "acc", higher better) behind what the strategies use of a
    `HeldoutEvaluator`: each choice evaluated once (cached by `choice_key`), counted, and primed from a log on a
    resume. `SearchContext` wraps a plain callable given as its evaluator in one."""

    def __init__(self, fn, space):
        self.fn, self.space = fn, space
        self.cache: Dict[str, dict] = {}
        self.evaluations, self.primed, self.seconds = 0, 0, 0.0

    def __call__(self, choice: Mapping) -> dict:
        import math
        choice = self.space.check_choice(choice)
        key = choice_key(choice)
        hit = self.cache.get(key)
        if hit is not None:
            return dict(hit)
        t0 = time.perf_counter()
        res = self.fn(choice)
        self.seconds += time.perf_counter() - t0
        try:
            out = {"acc": float(res["acc"]), "loss": float(res["loss"])}
        except (TypeError, KeyError, ValueError):
            out = None
        if out is None or not all(math.isfinite(v) for v in out.values()):
            from .strategy import SearchError
            raise SearchError(f"evaluator: returned {res!r} for {key}, expected a dict with finite numbers 'acc' "
                             "(higher is better) and 'loss'")
        self.evaluations += 1
        self.cache[key] = out
        return dict(out)

    prime = HeldoutEvaluator.prime  # the same cache, primed the same way
