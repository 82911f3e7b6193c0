"""Baselines behind the same interface: `RandomSearch` (uniform samples of the space that meet the
target, the most accurate of `budget` evaluations) and `UniformShrink` (slimming's start network with
every stage's width scaled by one factor until the target is met; blocks untouched)."""
from __future__ import annotations

import random
from typing import List

from .evaluator import choice_key
from .strategy import (SearchContext, SearchError, SearchResult, SearchStrategy, largest_choice, unreachable)


class RandomSearch(SearchStrategy):
    name = "random"

    def __init__(self, budget: int = 50, max_draws: int = 200_000, batch: int = 2048):
        if budget < 1:
            raise SearchError(f"budget: got {budget}, expected an integer >= 1")
        self.budget, self.max_draws, self.batch = int(budget), int(max_draws), int(batch)

    def args(self) -> dict:
        return {"strategy": self.name, "budget": self.budget}

    def sample_feasible(self, ctx: SearchContext) -> List[dict]:
        rng = random.Random(ctx.seed)
        seen, out, draws = set(), [], 0
        while len(out) < self.budget and draws < self.max_draws:
            batch = [ctx.space.sample(rng) for _ in range(self.batch)]
            draws += len(batch)
            for c, ms in zip(batch, ctx.latencies(batch)):
                k = choice_key(c)
                if ms <= ctx.target_ms and k not in seen:
                    seen.add(k)
                    out.append(c)
                    if len(out) == self.budget:
                        break
        if not out:
            raise SearchError(f"random search: none of {draws} samples meets {ctx.target_ms:g} ms")
        return out

    def search(self, ctx: SearchContext) -> SearchResult:
        msg = unreachable(ctx)
        if msg:
            raise SearchError(msg)
        rows = []
        for c in self.sample_feasible(ctx):
            e = ctx.evaluator(c)
            rows.append((-e["acc"], e["loss"], ctx.latency(c), len(rows), c, e))
        best = min(rows, key=lambda r: r[:4])
        return SearchResult(self.name, best[4], float(best[2]), best[5]["acc"], best[5]["loss"],
                            evaluations=ctx.evaluator.evaluations, extra={"sampled": len(rows)})


class UniformShrink(SearchStrategy):
    """Every stage's width = its maximum times f (rounded to width_step, clipped to the stage's range),
    the largest f in steps of 0.01 that meets the target, on slimming's start network. Where widths
    alone cannot reach the target, every stage also drops its last k blocks (k = 1, 2, ...; a stage
    keeps at least one) before the widths are scaled again: uniform in depth too, never per stage."""
    name = "uniform"

    @staticmethod
    def _drop(base: dict, k: int, space) -> dict:
        blocks = []
        for bl, st in zip(base["blocks"], space.stages):
            bl = list(bl)
            active = [j for j, t in enumerate(bl) if t != "identity"]
            if "identity" in st.candidates:
                for j in active[max(1, len(active) - k):]:
                    bl[j] = "identity"
            blocks.append(bl)
        return {"widths": list(base["widths"]), "blocks": blocks}

    def search(self, ctx: SearchContext) -> SearchResult:
        space = ctx.space
        base = largest_choice(ctx.supernet)
        step = space.width_step
        depth = max(st.max_depth for st in space.stages)
        ms = float("inf")
        for k in range(depth):
            blocks = self._drop(base, k, space)["blocks"]
            for p in range(100, -1, -1):
                f = p / 100
                widths = [min(s.max_width, max(s.min_width, int(round(f * s.max_width / step)) * step))
                          for s in space.stages]
                c = space.check_choice({"widths": widths, "blocks": blocks})
                ms = ctx.latency(c)
                if ms <= ctx.target_ms:
                    e = ctx.evaluator(c)
                    return SearchResult(self.name, c, ms, e["acc"], e["loss"], evaluations=ctx.evaluator.evaluations,
                                        extra={"factor": f, "blocks_dropped_per_stage": k})
        msg = unreachable(ctx)
        raise SearchError(msg or f"uniform shrink: at minimum widths with one block per stage the start network "
                                 f"takes {ms:.4g} ms, over the target {ctx.target_ms:g} ms")
