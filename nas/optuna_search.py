"""Multi-objective search with Optuna beside slimming: maximise held-out accuracy, minimise predicted
latency, with `latency - target <= 0` as the constraint (NSGA-II or TPE; set per trial with
`Trial.set_constraint` on Optuna >= 5, through constraints_func before). The study lives in a
journal file (default) or SQLite inside the run directory, so a re-run resumes it and several
workers started on the same directory share it.

Flat encoding (no parameter depends on another, so NSGA-II and multivariate TPE never fall back to
random sampling), and every point decodes to a valid Choice:
    s{i}_width   int in [min_width, max_width], step width_step
    s{i}_b{j}    0/1: position j runs a block (only where identity is a candidate)
    s{i}_n3d     how many of the stage's active positions, counted from the end, are meta3d
                 (only where both meta4d and meta3d are candidates): 4D first, then 3D, always.
"""
from __future__ import annotations

import json
import os
from typing import List, Mapping, Optional

from .evaluator import choice_key
from .slimming import args_diff
from .strategy import SearchContext, SearchError, SearchResult, SearchStrategy, require_reachable

STUDY_NAME = "vitslim-search"
SAMPLERS = ("nsga2", "tpe")
STORAGES = ("journal", "sqlite")


class FlatEncoding:
    def __init__(self, space):
        self.space = space

    def params(self) -> List[tuple]:
        """[(name, low, high, step)] of every integer parameter."""
        out = []
        for i, st in enumerate(self.space.stages):
            out.append((f"s{i}_width", st.min_width, st.max_width, self.space.width_step))
            if "identity" in st.candidates:
                out += [(f"s{i}_b{j}", 0, 1, 1) for j in range(st.max_depth)]
            if "meta4d" in st.candidates and "meta3d" in st.candidates:
                out.append((f"s{i}_n3d", 0, st.max_depth, 1))
        return out

    def suggest(self, trial) -> dict:
        return self.decode({n: trial.suggest_int(n, lo, hi, step=s) for n, lo, hi, s in self.params()})

    def decode(self, p: Mapping) -> dict:
        widths, blocks = [], []
        for i, st in enumerate(self.space.stages):
            widths.append(int(p[f"s{i}_width"]))
            on = [bool(p[f"s{i}_b{j}"]) if "identity" in st.candidates else True for j in range(st.max_depth)]
            active = [j for j in range(st.max_depth) if on[j]]
            if "meta4d" in st.candidates and "meta3d" in st.candidates:
                n3 = min(int(p[f"s{i}_n3d"]), len(active))
            else:
                n3 = len(active) if "meta4d" not in st.candidates else 0
            three = set(active[len(active) - n3:]) if n3 else set()
            blocks.append(["identity" if not on[j] else ("meta3d" if j in three else "meta4d")
                           for j in range(st.max_depth)])
        return self.space.check_choice({"widths": widths, "blocks": blocks})

    def encode(self, choice: Mapping) -> dict:
        """Parameters of a Choice (for enqueueing known networks)."""
        c = self.space.check_choice(choice)
        p = {}
        for i, st in enumerate(self.space.stages):
            p[f"s{i}_width"] = c["widths"][i]
            if "identity" in st.candidates:
                for j, t in enumerate(c["blocks"][i]):
                    p[f"s{i}_b{j}"] = int(t != "identity")
            if "meta4d" in st.candidates and "meta3d" in st.candidates:
                p[f"s{i}_n3d"] = sum(t == "meta3d" for t in c["blocks"][i])
        return p


def pareto_front(rows: List[dict]) -> List[int]:
    """Indices of rows not dominated in (acc max, ms min)."""
    out = []
    for k, r in enumerate(rows):
        if not any((o["acc"] >= r["acc"] and o["ms"] <= r["ms"]) and (o["acc"] > r["acc"] or o["ms"] < r["ms"])
                   for o in rows):
            out.append(k)
    return out


def _constraints(trial):
    return trial.user_attrs.get("constraint", [1.0])


def _native_constraints() -> bool:
    """Optuna >= 5 reads constraints set on the trial (Trial.set_constraint); constraints_func is
    deprecated there."""
    import optuna
    return hasattr(optuna.trial.Trial, "set_constraint")


class OptunaSearch(SearchStrategy):
    name = "optuna"

    def __init__(self, n_trials: int = 100, sampler: str = "nsga2", storage: str = "journal",
                 population_size: Optional[int] = None, run_args: Optional[Mapping] = None):
        if n_trials < 1:
            raise SearchError(f"trials: got {n_trials}, expected an integer >= 1")
        if sampler not in SAMPLERS:
            raise SearchError(f"sampler: got {sampler!r}, expected one of {', '.join(SAMPLERS)}")
        if storage not in STORAGES:
            raise SearchError(f"storage: got {storage!r}, expected one of {', '.join(STORAGES)}")
        self.n_trials, self.sampler_name, self.storage_kind = int(n_trials), sampler, storage
        self.population_size = population_size
        self.run_args = dict(run_args or {})
        self.log_file = "study.journal" if storage == "journal" else "study.db"

    def args(self) -> dict:
        # n_trials may grow between runs (ask for more trials), so it is not part of what must match
        return {"strategy": self.name, "sampler": self.sampler_name, **self.run_args}

    def _storage(self, ctx: SearchContext):
        import optuna
        if not ctx.log_dir:
            return None
        path = os.path.abspath(os.path.join(ctx.log_dir, self.log_file))
        if self.storage_kind == "sqlite":
            return f"sqlite:///{path}"
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        return JournalStorage(JournalFileBackend(path))

    def _sampler(self, ctx: SearchContext):
        import optuna
        cons = {} if _native_constraints() else {"constraints_func": _constraints}
        if self.sampler_name == "tpe":
            return optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True,
                                              n_startup_trials=min(10, max(2, self.n_trials // 5)), **cons)
        pop = self.population_size or max(4, min(50, self.n_trials // 4))
        return optuna.samplers.NSGAIISampler(seed=ctx.seed, population_size=pop, **cons)

    def study(self, ctx: SearchContext):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=STUDY_NAME, storage=self._storage(ctx), sampler=self._sampler(ctx),
                                    directions=["maximize", "minimize"], load_if_exists=True)
        args = json.loads(json.dumps({**self.args(), "target_ms": ctx.target_ms, "seed": ctx.seed}))
        old = study.user_attrs.get("vitslim_args")
        if old is None:
            study.set_user_attr("vitslim_args", args)
        else:
            diff = args_diff(old, args)
            if diff:
                raise SearchError(f"cannot resume the study in {ctx.log_dir}: the arguments differ from its: "
                                  f"{'; '.join(diff[:3])} (use the same arguments, another --out, or --overwrite)")
        return study

    def search(self, ctx: SearchContext) -> SearchResult:
        import optuna
        require_reachable(ctx)
        enc = FlatEncoding(ctx.space)
        study = self.study(ctx)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        for t in done:  # reuse logged evaluations
            if "choice" in t.user_attrs:
                ctx.evaluator.prime(t.user_attrs["choice"], {"acc": t.values[0], "loss": t.user_attrs["loss"]})
        left = self.n_trials - len(done)
        native = _native_constraints()

        def objective(trial):
            c = enc.suggest(trial)
            ms = ctx.latency(c)
            e = ctx.evaluator(c)
            trial.set_user_attr("choice", c)
            trial.set_user_attr("loss", e["loss"])
            trial.set_user_attr("constraint", [ms - ctx.target_ms])
            if native:
                trial.set_constraint("latency", ms - ctx.target_ms)
            return e["acc"], ms

        if left > 0:
            # workers sharing the study stop together once it holds n_trials complete trials
            stop = optuna.study.MaxTrialsCallback(self.n_trials, states=(optuna.trial.TrialState.COMPLETE,))
            study.optimize(objective, n_trials=left, callbacks=[stop], show_progress_bar=bool(ctx.progress),
                           gc_after_trial=False)
        trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        rows = [{"number": t.number, "acc": t.values[0], "ms": t.values[1], "loss": t.user_attrs["loss"],
                 "feasible": t.values[1] <= ctx.bound_ms, "choice": t.user_attrs["choice"]} for t in trials]
        front = [rows[k]["number"] for k in pareto_front(rows)]
        feas = [r for r in rows if r["feasible"]]
        if not feas:
            best_ms = min(r["ms"] for r in rows)
            raise SearchError(f"optuna: none of {len(rows)} trials meets {ctx.bound_ms:g} ms (fastest {best_ms:.4g} ms); "
                              "run more trials (same command with a larger --trials resumes the study)")
        best = min(feas, key=lambda r: (-r["acc"], r["loss"], r["ms"], r["number"]))
        return SearchResult(self.name, best["choice"], float(best["ms"]), float(best["acc"]), float(best["loss"]),
                            evaluations=ctx.evaluator.evaluations,
                            extra={"trials": len(rows), "best_trial": best["number"], "pareto": front,
                                   "trial_rows": rows, "distinct_choices": len({choice_key(r["choice"]) for r in rows})})
