"""EfficientFormer's latency-driven slimming (Li et al., NeurIPS 2022, Sec. 4.2; never released),
rebuilt. From the largest subnet, each step considers three actions:

  a) `to_identity`:  the least important MetaPath still running a block becomes Identity;
  b) `meta3d_to_meta4d`: the first Meta3D (network order) becomes a Meta4D ("remove the first MB3D");
  c) `shrink`: the least important stage that is above its minimum width loses `width_step` channels;

scores each with its held-out accuracy drop (supernet weights, `HeldoutEvaluator`) per millisecond
saved (latency table), takes the smallest, and repeats until the predicted latency meets the target.

Choices the paper leaves open, decided here:
- start: every position keeps its most probable non-identity MetaPath (meta4d excluded after a
  meta3d), every stage at maximum width (`strategy.largest_choice`);
- "remove the first Meta3D" turns it into a Meta4D: the first 3D block of a stage is preceded only
  by 4D or identity blocks, so the 4D-then-3D order stays valid, and dropping the block entirely is
  already action (a). Where meta4d is not a candidate it becomes identity instead;
- importance: `MetaPathSupernet.importance()` (fixed for the run); a stage's importance is the sum
  over its positions that still run a block (a stage whose blocks are gone costs only its
  downsample and is shrunk first); stages without an identity candidate rank last;
- accuracy drop = held-out top-1 before minus after (`per_ms`: drop / ms saved; an action that gains
  accuracy ranks ahead of every one that loses some, by gain x ms saved, so an action both more
  accurate and faster than another is never passed over for it); the loss increase per ms breaks ties (top-1 on
  a small split is coarse), then the action order a, b, c (`criterion="loss"`: the held-out loss
  increase per ms decides and top-1 breaks ties: a less noisy signal on a small split); actions that save no time are skipped,
  and if none saves time before the target is met the search stops with an error;
- the result: the path follows the paper's rule until it meets the target, but the network returned
  is the most accurate (then lowest loss, then slowest) of every network evaluated on the way that
  meets the target: the path's end, or a candidate action of an earlier step that already reached
  it. The best-per-ms action is often a large one that overshoots (a whole block where 16 channels
  would do), and time saved beyond the target buys nothing; these candidates were evaluated anyway.

Beyond the paper (`refine=N`, off by default): the path spends its evaluations on one greedy line,
and a network of the same latency that keeps what the path gave up early (an early block, say) is
never looked at. Refinement spends N more evaluations around the result: its neighbours one or two
moves away (a position to another type, a stage 16 channels wider or narrower; two moves: one that
adds time and one that pays for it) that meet the bound, ranked by a ridge regression of held-out
accuracy on the architecture (block types per position, stage widths) fitted to every network
evaluated so far (the path's candidates are its first data); the best-predicted one is evaluated,
becomes the centre when it is more accurate, and the model is refitted. Each evaluation is one JSON
line (`refine`), reused on resume.

When verification (nas/verify.py) finds the network slower than promised, the search is called
again with a tighter bound (`ctx.bound_ms`): slimming logs a `retarget` line and continues from the
network it stopped at.

Every step is one JSON line in trajectory.jsonl (the chosen action, every candidate with its ms,
accuracy, loss and score); `done` is where the path met the bound, and the last line, `result`, is the
network returned (after refinement, if any; one per bound when verification retargets). Re-running with
the same arguments continues from the last complete line; the logged numbers are reused, so a resumed run
ends exactly where an uninterrupted one does.
"""
from __future__ import annotations

import copy
import json
import math
import os
from typing import List, Mapping, Optional, Tuple

import numpy as np

from .evaluator import choice_key
from .strategy import (SearchContext, SearchError, SearchResult, SearchStrategy, describe_blocks, largest_choice,
                       require_reachable)

ACTIONS = ("to_identity", "meta3d_to_meta4d", "shrink")
LOG_VERSION = 2  # raise it when a change to the step rule would make a resumed log mix two rules
# 2: version 1 was never raised while the rules changed under it (the final pick among every evaluated network
# that meets the bound, 9964aa4; a gain in accuracy scored per ms, b99ae48; the least important stage whose shrink
# saves time, bb71464): a log of version 1 may hold steps of any of these rules, so none is continued


def per_ms(delta: float, saved: float) -> float:
    """The slimming score of an action that costs `delta` (accuracy drop or loss increase) and saves `saved`
    ms (> 0): smaller is better. delta / saved, the paper's rule, when the action costs something or nothing;
    when it gains (delta < 0) the ratio would rank a smaller saving first (-0.01 / 0.01 ms below -0.02 / 1 ms,
    a dominated action), so a gain scores delta x saved: below every cost, larger gains and savings first."""
    return delta / saved if delta >= 0 else delta * saved


class TrajectoryLog:
    """Append-only JSON lines, one fsync'd line per record; a torn last line (an interrupt mid-write)
    is dropped on reading."""

    def __init__(self, path: Optional[str]):
        self.path = path

    def read(self) -> List[dict]:
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        recs, good = [], []
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                recs.append(json.loads(line))
                good.append(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: '[[[[...' nested
                if any(x.strip() for x in lines[n + 1:]):
                    raise SearchError(f"{self.path}: line {n + 1} is not JSON (a corrupt log; remove the run "
                                      "directory or pass --overwrite)") from None
                tmp = f"{self.path}.tmp.{os.getpid()}"  # drop the torn line, atomically
                with open(tmp, "w", encoding="utf-8") as g:
                    g.write("".join(x + "\n" for x in good))
                os.replace(tmp, self.path)
        return recs

    def append(self, rec: Mapping, sync: bool = True) -> None:
        """One line; `sync=False` flushes without fsync (the line survives the process being killed,
        not the machine losing power: for records that are cheap to redo)."""
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            if sync:
                os.fsync(f.fileno())


def args_diff(old: Mapping, new: Mapping, prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += args_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: was {a!r}, now {b!r}")
    return out


def resume_args_diff(old: Mapping, new: Mapping) -> List[str]:
    """args_diff of a logged search's arguments and a resuming one's: the supernet and the table are compared by
    content (their digests: a run folder that moved resumes, a supernet trained anew is refused) where the log holds
    digests, by path where an earlier vitslim's log does not."""
    old, new = dict(old), dict(new)
    for k in ("supernet", "table"):
        if f"{k}_digest" in old:
            old.pop(k, None)
            new.pop(k, None)
        else:
            new.pop(f"{k}_digest", None)
    return args_diff(old, new)


class LatencySlimming(SearchStrategy):
    name = "slim"
    log_file = "trajectory.jsonl"

    CRITERIA = ("acc", "loss")

    ACTION_SETS = ("paper", "every")

    def __init__(self, max_steps: int = 10_000, run_args: Optional[Mapping] = None, criterion: str = "acc",
                 actions: str = "paper", refine: int = 0):
        if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
            raise SearchError(f"--refine: got {refine!r}, expected a number of evaluations >= 0 (0: the paper's "
                              "slimming alone)")
        self.refine = refine
        if actions not in self.ACTION_SETS:
            raise SearchError(f"--actions: got {actions!r}, expected paper (the least important position and "
                              "stage) or every (every position and stage: more evaluations per step)")
        self.actions = actions
        if criterion not in self.CRITERIA:
            raise SearchError(f"--criterion: got {criterion!r}, expected acc (the paper's accuracy drop) or loss "
                              "(held-out loss increase: less noisy on a small held-out split)")
        self.max_steps = int(max_steps)
        self.criterion = criterion
        self.run_args = dict(run_args or {})   # what else a resume must match (supernet, table, eval)

    def args(self) -> dict:
        a = {"strategy": self.name, **self.run_args}
        if self.criterion != "acc":  # logs of runs before the option existed stay resumable
            a["criterion"] = self.criterion
        if self.actions != "paper":
            a["actions"] = self.actions
        if self.refine:
            a["refine"] = self.refine
        return a

    # ------------------------------------------------------------ refinement (beyond the paper)
    @staticmethod
    def moves(space, choice: Mapping) -> List[Tuple[str, dict]]:
        """Every valid network one move from `choice`: a position to another of its stage's
        candidates, or a stage `width_step` channels wider or narrower."""
        out = []
        W, B = choice["widths"], choice["blocks"]

        def with_(i, bl=None, w=None):
            return {"widths": W if w is None else W[:i] + [w] + W[i + 1:],
                    "blocks": B if bl is None else B[:i] + [bl] + B[i + 1:]}
        for i, st in enumerate(space.stages):
            for j in range(st.max_depth):
                for t in st.candidates:
                    if t == B[i][j]:
                        continue
                    bl = B[i][:j] + [t] + B[i][j + 1:]
                    if "meta4d" in bl and "meta3d" in bl and bl.index("meta3d") < len(bl) - 1 - bl[::-1].index("meta4d"):
                        continue  # a meta4d after a meta3d (3D blocks only after 4D ones)
                    out.append((f"stage{i}.block{j}={t}", with_(i, bl=bl)))
            for d in (-space.width_step, space.width_step):
                w = W[i] + d
                if st.min_width <= w <= st.max_width:
                    out.append((f"stage{i}.width={w}", with_(i, w=w)))
        return out

    @staticmethod
    def features(space, choice: Mapping) -> np.ndarray:
        """Block type per position (one-hot, identity = none) and stage widths (fractions of the maximum)."""
        f = []
        for i, st in enumerate(space.stages):
            types = [t for t in st.candidates if t != "identity"]
            for j in range(st.max_depth):
                f += [1.0 if choice["blocks"][i][j] == t else 0.0 for t in types]
            f.append(choice["widths"][i] / st.max_width)
        return np.asarray(f, dtype=np.float64)

    def _target(self, d: Mapping) -> float:
        return float(d["acc"]) if self.criterion == "acc" else -float(d["loss"])

    @staticmethod
    def _surrogate(X: np.ndarray, y: np.ndarray):
        """Ridge regression of y (the criterion: accuracy, or minus the loss) on feature rows X;
        returns predict(F) for a matrix of feature rows."""
        mu, sd = X.mean(0), X.std(0)
        sd[sd == 0] = 1.0
        Z = np.c_[np.ones(len(X)), (X - mu) / sd]
        lam = np.eye(Z.shape[1]) * max(1e-3 * len(X), 1e-3)
        lam[0, 0] = 0.0
        w = np.linalg.solve(Z.T @ Z + lam, Z.T @ y)
        return lambda F: w[0] + ((np.atleast_2d(F) - mu) / sd) @ w[1:]

    def _neighbourhood(self, ctx: SearchContext, centre: Mapping, bound: float):
        """(choices, keys, predicted ms, feature matrix) of the networks one or two moves from
        `centre` that meet `bound`."""
        pool = {}
        for _, c1 in self.moves(ctx.space, centre):
            for c in [c1] + [c2 for _, c2 in self.moves(ctx.space, c1)]:
                pool.setdefault(choice_key(c), c)
        keys = list(pool)
        ms = np.asarray(ctx.latencies([pool[k] for k in keys]), dtype=np.float64) if keys else np.zeros(0)
        ok = [i for i in range(len(keys)) if ms[i] <= bound]
        cands = [pool[keys[i]] for i in ok]
        F = np.stack([self.features(ctx.space, c) for c in cands]) if cands else np.zeros((0, 0))
        return cands, [keys[i] for i in ok], ms[ok], F

    def _better(self, a: Mapping, b: Mapping) -> bool:
        if self.criterion == "acc":
            return (float(a["acc"]), -float(a["loss"])) > (float(b["acc"]), -float(b["loss"]))
        return (-float(a["loss"]), float(a["acc"])) > (-float(b["loss"]), float(b["acc"]))

    @staticmethod
    def _picked(done: Mapping, r: Mapping, where: str) -> dict:
        """The done record with the network of refine record `r` as the result."""
        return {**done, "choice": r["choice"], "predicted_ms": float(r["predicted_ms"]), "acc": float(r["acc"]),
                "loss": float(r["loss"]), "picked": where}

    def _refine(self, ctx: SearchContext, done: dict, recs: List[Mapping], log: "TrajectoryLog",
                bound: float) -> Tuple[dict, List[dict]]:
        """`self.refine` evaluations around `done` (see the module docstring); returns the best record and
        the refine records of this bound."""
        data = [r for r in recs if r.get("type") in ("start", "step") and "acc" in r]
        data += [c for r in recs if r.get("type") == "step" for c in r.get("candidates", ())]
        seen = {choice_key(d["choice"]) for d in data}
        X = [self.features(ctx.space, d["choice"]) for d in data]  # the regression's rows, grown with data
        y = [self._target(d) for d in data]
        logged = [r for r in recs if r.get("type") == "refine" and abs(float(r["bound_ms"]) - bound) < 1e-9]
        best = dict(done)
        for r in recs:  # after a retarget: earlier refinements that meet the tightened bound compete too
            if r.get("type") == "refine" and abs(float(r["bound_ms"]) - bound) >= 1e-9 \
                    and float(r["predicted_ms"]) <= bound and self._better(r, best):
                best = self._picked(best, r, f"refine{r['n']}@{float(r['bound_ms']):g}")
        hood, hood_of = None, None
        mine = []
        for n in range(self.refine):
            if n < len(logged):  # resume: the logged evaluation, in order
                r = logged[n]
            else:
                centre = choice_key(best["choice"])
                if hood_of != centre:  # the neighbourhood moves with the centre only
                    hood, hood_of = self._neighbourhood(ctx, best["choice"], bound), centre
                cands, keys, ms, F = hood
                open_ = [i for i, k in enumerate(keys) if k not in seen]
                if not open_:
                    break
                pred = self._surrogate(np.stack(X), np.asarray(y))(F[open_])
                k = max(range(len(open_)), key=lambda t: (pred[t], ms[open_[t]]))
                i = open_[k]
                c = {"widths": list(cands[i]["widths"]), "blocks": [list(b) for b in cands[i]["blocks"]]}  # unshared
                e = ctx.evaluator(c)
                r = {"type": "refine", "n": n + 1, "bound_ms": bound, "choice": c, "predicted_ms": float(ms[i]),
                     "acc": e["acc"], "loss": e["loss"], "surrogate": float(pred[k])}
                log.append(r, sync=False)  # one evaluation to redo if lost
            data.append(r)
            mine.append(r)
            X.append(self.features(ctx.space, r["choice"]))
            y.append(self._target(r))
            seen.add(choice_key(r["choice"]))
            if self._better(r, best):
                best = self._picked(best, r, f"refine{r['n']}")
        return best, mine

    # ------------------------------------------------------------ the three actions
    @staticmethod
    def candidates(ctx: SearchContext, choice: Mapping, imp: Mapping, every: bool = False) -> List[Tuple[str, str, dict]]:
        """The paper's three candidate actions; with `every`, (a) and (c) for every position and every
        stage instead of only the least important one (more evaluations per step, decided by the
        held-out accuracy instead of the architecture weights' importance)."""
        space = ctx.space
        out = []
        mp = imp["metapath"]
        # a) least important MetaPath -> Identity
        pos = [(mp[i][j], i, j) for i, st in enumerate(space.stages) if "identity" in st.candidates
               for j in range(st.max_depth) if choice["blocks"][i][j] != "identity" and mp[i][j] is not None]
        for _, i, j in (sorted(pos) if every else sorted(pos)[:1]):
            c = copy.deepcopy(choice)
            c["blocks"][i][j] = "identity"
            out.append(("to_identity", f"stage{i}.block{j}", c))
        # b) the first Meta3D -> Meta4D (identity where meta4d is not a candidate)
        first = next(((i, j) for i, bl in enumerate(choice["blocks"]) for j, t in enumerate(bl) if t == "meta3d"), None)
        if first is not None:
            i, j = first
            cands = space.stages[i].candidates
            to = "meta4d" if "meta4d" in cands else ("identity" if "identity" in cands else None)
            if to is not None:
                c = copy.deepcopy(choice)
                c["blocks"][i][j] = to
                out.append(("meta3d_to_meta4d" if to == "meta4d" else "to_identity", f"stage{i}.block{j}", c))
        # c) least important stage above its minimum width -> 16 channels fewer
        st_rank = []
        for i, st in enumerate(space.stages):
            if choice["widths"][i] - space.width_step < st.min_width:
                continue
            scores = [mp[i][j] for j in range(st.max_depth) if choice["blocks"][i][j] != "identity"]
            s = math.inf if any(v is None for v in scores) else float(sum(scores))
            st_rank.append((s, i))
        ranked = sorted(st_rank)
        if not every and len(ranked) > 1:
            # the least important stage whose shrink saves time: on a measured table a narrower stage can run
            # slower (kernel alignment), and the step would end the search with "no action saves time" while
            # shrinking another stage still would (the paper's rule where the least important one saves time)
            now = ctx.latency(choice)

            def saves(i):
                c = copy.deepcopy(choice)
                c["widths"][i] -= space.width_step
                return ctx.latency(c) < now - 1e-12
            ranked = [next(((s, i) for s, i in ranked if saves(i)), ranked[0])]
        for _, i in (ranked if every else ranked[:1]):
            c = copy.deepcopy(choice)
            c["widths"][i] -= space.width_step
            out.append(("shrink", f"stage{i}", c))
        seen, uniq = set(), []
        for a, w, c in out:  # (b) may coincide with an (a) where meta4d is not a candidate
            if (a, w) not in seen:
                seen.add((a, w))
                uniq.append((a, w, space.check_choice(c)))
        return uniq

    def _final(self, ctx: SearchContext, end: Mapping, steps: List[Mapping], bound: float) -> dict:
        """The done record: the most accurate network evaluated on the way that meets `bound` (the
        path's `end`, or a candidate of one of `steps`); ties: lower loss, then slower (closer to it).
        With the loss criterion: the lowest held-out loss, ties by accuracy."""
        pool = [("end", end)] + [(f"step{s['step']}.{c['action']}", c) for s in steps for c in s.get("candidates", ())
                                 if c.get("feasible") and float(c["predicted_ms"]) <= bound]
        if self.criterion == "acc":
            def rank(t):
                return -float(t[1]["acc"]), float(t[1]["loss"]), -float(t[1]["predicted_ms"])
        else:
            def rank(t):
                return float(t[1]["loss"]), -float(t[1]["acc"]), -float(t[1]["predicted_ms"])
        where, best = min(pool, key=rank)
        return {"type": "done", "choice": ctx.space.check_choice(best["choice"]), "predicted_ms": float(best["predicted_ms"]),
                "acc": float(best["acc"]), "loss": float(best["loss"]), "steps": len(steps), "bound_ms": bound,
                "picked": where, "path_end_ms": float(end["predicted_ms"]), "path_end_acc": float(end["acc"])}

    # ------------------------------------------------------------ the loop
    def search(self, ctx: SearchContext) -> SearchResult:
        require_reachable(ctx)
        log = TrajectoryLog(os.path.join(ctx.log_dir, self.log_file) if ctx.log_dir else None)
        args = {**self.args(), "target_ms": ctx.target_ms, "seed": ctx.seed}
        recs = log.read()
        imp = ctx.supernet.importance()
        if recs:
            head = recs[0]
            if head.get("type") != "header":
                raise SearchError(f"{log.path}: first line is not a header (not a slimming log)")
            if head.get("version") != LOG_VERSION:  # its steps were taken under another version's rules
                raise SearchError(f"cannot resume {log.path}: a slimming log of version {head.get('version')!r}, "
                                  f"expected {LOG_VERSION} (another vitslim's, whose steps followed other rules: "
                                  "delete it to search again)")
            diff = resume_args_diff(head.get("args", {}), json.loads(json.dumps(args)))
            if diff:
                raise SearchError(f"cannot resume {log.path}: the arguments differ from the logged run's: "
                                  f"{'; '.join(diff[:3])} (use the same arguments, another --out, or --overwrite)")
            for r in recs:  # the logged numbers are reused verbatim
                if "choice" in r and "acc" in r:
                    ctx.evaluator.prime(r["choice"], r)
                for c in r.get("candidates", ()):
                    ctx.evaluator.prime(c["choice"], c)
            steps = [r for r in recs if r.get("type") == "step"]
            cur = (steps[-1] if steps else next(r for r in recs if r.get("type") == "start"))["choice"]
        else:
            start = largest_choice(ctx.supernet)
            ev = ctx.evaluator(start)
            recs = [{"type": "header", "version": LOG_VERSION, "args": args},
                    {"type": "start", "choice": start, "predicted_ms": ctx.latency(start), **ev}]
            for r in recs:
                log.append(r)
            steps = []
            cur = start
        cur = ctx.space.check_choice(cur)
        bound = ctx.bound_ms
        # the greedy path does not depend on the bound, only where it stops: the first logged point that
        # meets the bound is where an uninterrupted run would have stopped
        start_rec = next(r for r in recs if r.get("type") == "start")
        path = [start_rec] + steps
        hit = next((k for k, r in enumerate(path) if float(r["predicted_ms"]) <= bound), None)
        done = None
        if hit is not None:
            steps = steps[:hit]
            done = self._final(ctx, path[hit], steps, bound)
            if not any(x.get("type") == "done" and abs(float(x.get("bound_ms", ctx.target_ms)) - bound) < 1e-9
                       for x in recs):
                log.append(done)
        elif hit is None and any(r.get("type") == "done" for r in recs):
            # verification tightened the bound: continue from where the last pass stopped
            if not any(r.get("type") == "retarget" and abs(float(r["bound_ms"]) - bound) < 1e-9 for r in recs):
                log.append({"type": "retarget", "bound_ms": bound, "from_ms": float(path[-1]["predicted_ms"]),
                            "step": len(steps)})
        bar = None
        if ctx.progress and done is None:
            from tqdm import tqdm
            bar = tqdm(desc="slimming", unit="step", initial=len(steps), dynamic_ncols=True)
        try:
            while done is None:
                ms = ctx.latency(cur)
                ev = ctx.evaluator(cur)
                if ms <= bound:
                    done = self._final(ctx, {"choice": cur, "predicted_ms": ms, **ev}, steps, bound)
                    log.append(done)
                    break
                if len(steps) >= self.max_steps:
                    raise SearchError(f"slimming: {self.max_steps} steps without meeting {bound:g} ms "
                                      f"(at {ms:.4g} ms); raise max_steps")
                cands = self.candidates(ctx, cur, imp, every=self.actions == "every")
                lat = ctx.latencies([c for _, _, c in cands]) if cands else []
                rows = []
                for k, ((action, where, c), cms) in enumerate(zip(cands, lat)):
                    n_before = ctx.evaluator.evaluations
                    e = ctx.evaluator(c)
                    if ctx.evaluator.evaluations > n_before:  # a kill mid-step keeps what was evaluated
                        log.append({"type": "eval", "choice": c, "predicted_ms": float(cms), "acc": e["acc"],
                                    "loss": e["loss"]}, sync=False)
                    saved = ms - float(cms)
                    drop, dloss = ev["acc"] - e["acc"], e["loss"] - ev["loss"]
                    feasible = saved > 1e-12
                    rows.append({"action": action, "where": where, "choice": c, "predicted_ms": float(cms),
                                 "acc": e["acc"], "loss": e["loss"], "ms_saved": saved, "drop": drop,
                                 "score": per_ms(drop, saved) if feasible else None,
                                 "loss_per_ms": per_ms(dloss, saved) if feasible else None, "feasible": feasible})
                if self.criterion == "acc":
                    ok = [(r["score"], r["loss_per_ms"], k) for k, r in enumerate(rows) if r["feasible"]]
                else:
                    ok = [(r["loss_per_ms"], r["score"], k) for k, r in enumerate(rows) if r["feasible"]]
                if not ok:
                    raise SearchError(f"slimming stopped at {ms:.4g} ms (bound {bound:g} ms): no action "
                                      f"saves time from widths {cur['widths']}, blocks {describe_blocks(cur)}")
                best = rows[min(ok)[2]]
                rec = {"type": "step", "step": len(steps) + 1, "action": best["action"], "where": best["where"],
                       "choice": best["choice"], "predicted_ms": best["predicted_ms"], "acc": best["acc"],
                       "loss": best["loss"], "ms_saved": best["ms_saved"], "drop": best["drop"],
                       "score": best["score"], "candidates": rows}
                log.append(rec)
                steps.append(rec)
                recs.append(rec)
                cur = best["choice"]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(ms=f"{best['predicted_ms']:.3f}", acc=f"{best['acc']:.3f}")
        finally:
            if bar is not None:
                bar.close()
        path_pick = done.get("picked", "end")
        refined = []
        if self.refine:
            done, refined = self._refine(ctx, done, recs, log, bound)
        if not any(r.get("type") == "result" and abs(float(r["bound_ms"]) - bound) < 1e-9 for r in recs):
            log.append({"type": "result", "bound_ms": bound, "picked": done.get("picked", "end"),
                        "choice": done["choice"], "predicted_ms": float(done["predicted_ms"]),
                        "acc": float(done["acc"]), "loss": float(done["loss"])})
        refined = [{"n": r["n"], "predicted_ms": float(r["predicted_ms"]), "acc": float(r["acc"])} for r in refined]
        start_rec = next(r for r in recs if r.get("type") == "start")
        traj = [{"step": 0, "action": "start", "predicted_ms": start_rec["predicted_ms"], "acc": start_rec["acc"]}]
        traj += [{"step": r["step"], "action": r["action"], "where": r["where"], "predicted_ms": r["predicted_ms"],
                  "acc": r["acc"]} for r in steps]
        return SearchResult(self.name, done["choice"], float(done["predicted_ms"]), float(done["acc"]),
                            float(done["loss"]), evaluations=ctx.evaluator.evaluations,
                            extra={"steps": len(steps), "trajectory": traj, "criterion": self.criterion,
                                   "picked": done.get("picked", "end"), "path_pick": path_pick,
                                   "refine": self.refine, "refined": refined,
                                   "path_end_ms": done.get("path_end_ms"), "path_end_acc": done.get("path_end_acc")})
