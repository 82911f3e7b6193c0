"""Baselines behind the same interface: `RandomSearch` (random samples of the space, `SearchSpace.sample`,
that meet the target, optionally only those within `band` under it (a latency-matched baseline), the most accurate
of `budget` evaluations) and `UniformShrink` (slimming's start network with
every stage's width scaled by one factor until the target is met; blocks untouched)."""
from __future__ import annotations

import json
import os
import random
from typing import List, Mapping, Optional

from .evaluator import choice_key
from .strategy import (SearchContext, SearchError, SearchResult, SearchStrategy, largest_choice, require_reachable, unreachable)


LOG_VERSION = 1


class RandomSearch(SearchStrategy):
    """Every evaluation is a line of `random.jsonl` (after a header of the run's arguments): a search killed
    mid-way and run again with the same arguments draws the same samples and reuses the logged evaluations."""
    name = "random"
    log_file = "random.jsonl"

    def __init__(self, budget: int = 50, max_draws: int = 200_000, batch: int = 512, band: float = 0.0,
                 run_args: Optional[Mapping] = None):
        if budget < 1:
            raise SearchError(f"--budget: got {budget}, expected an integer >= 1")
        if not 0 <= band < 1:
            raise SearchError(f"--band: got {band}, expected a fraction in [0, 1) (0.1: only networks predicted "
                              "within 10% under the target)")
        self.budget, self.max_draws, self.batch, self.band = int(budget), int(max_draws), int(batch), float(band)
        self.run_args = dict(run_args or {})   # what else a resume must match (supernet, table, eval)

    def args(self) -> dict:
        return {"strategy": self.name, "budget": self.budget, "band": self.band, **self.run_args}

    def _open_log(self, ctx: SearchContext):
        """The log (header written, or checked and its evaluations primed), and the keys it already holds."""
        from .slimming import TrajectoryLog, resume_args_diff
        log = TrajectoryLog(os.path.join(ctx.log_dir, self.log_file) if ctx.log_dir else None)
        args = json.loads(json.dumps({**self.args(), "target_ms": ctx.target_ms, "seed": ctx.seed}))
        recs = log.read()
        if not recs:
            log.append({"type": "header", "version": LOG_VERSION, "args": args})
            return log, set()
        head = recs[0]
        if head.get("type") != "header" or head.get("version") != LOG_VERSION:
            raise SearchError(f"cannot resume {log.path}: not a random search log of version {LOG_VERSION} (use "
                              "another --out, or --overwrite)")
        diff = resume_args_diff(head.get("args", {}), args)
        if diff:
            raise SearchError(f"cannot resume {log.path}: the arguments differ from the logged run's: "
                              f"{'; '.join(diff[:3])} (use the same arguments, another --out, or --overwrite)")
        logged = set()
        for r in recs[1:]:
            if r.get("type") == "eval" and "choice" in r:
                ctx.evaluator.prime(r["choice"], r)
                logged.add(choice_key(ctx.space.check_choice(r["choice"])))
        return log, logged

    def sample_feasible(self, ctx: SearchContext) -> List[dict]:
        rng = random.Random(ctx.seed)
        seen, out, draws = set(), [], 0
        while len(out) < self.budget and draws < self.max_draws:
            batch = [ctx.space.sample(rng) for _ in range(self.batch)]
            draws += len(batch)
            lo = ctx.bound_ms * (1 - self.band) if self.band else -1.0
            for c, ms in zip(batch, ctx.latencies(batch)):
                if not lo <= ms <= ctx.bound_ms:
                    continue
                k = choice_key(c)
                if k not in seen:
                    seen.add(k)
                    out.append(c)
                    if len(out) == self.budget:
                        break
        if not out:
            within = f" and {ctx.bound_ms * (1 - self.band):g} ms or more" if self.band else ""
            raise SearchError(f"random search: none of {draws} samples is predicted at {ctx.bound_ms:g} ms or less"
                              f"{within}")
        return out

    def search(self, ctx: SearchContext) -> SearchResult:
        require_reachable(ctx)
        log, logged = self._open_log(ctx)
        rows = []
        for c in self.sample_feasible(ctx):
            e = ctx.evaluator(c)
            ms = ctx.latency(c)
            k = choice_key(c)
            if k not in logged:  # flushed, not fsync'd: a line lost with the machine is one evaluation redone
                log.append({"type": "eval", "choice": c, "acc": e["acc"], "loss": e["loss"], "predicted_ms": ms},
                           sync=False)
                logged.add(k)
            rows.append((-e["acc"], e["loss"], ms, len(rows), c, e))
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
                if ms <= ctx.bound_ms:
                    e = ctx.evaluator(c)
                    return SearchResult(self.name, c, ms, e["acc"], e["loss"], evaluations=ctx.evaluator.evaluations,
                                        extra={"factor": f, "blocks_dropped_per_stage": k})
        msg = unreachable(ctx)
        raise SearchError(msg or f"uniform shrink: at minimum widths with one block per stage the start network "
                                 f"takes {ms:.4g} ms, over the bound {ctx.bound_ms:g} ms")
