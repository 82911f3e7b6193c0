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

import contextlib
import json
import os
import signal
import socket
import sys
import time
from typing import List, Mapping, Optional

import numpy as np

from supernet.runlock import pid_alive

from .evaluator import choice_key
from .slimming import resume_args_diff
from .strategy import SearchContext, SearchError, SearchResult, SearchStrategy, require_reachable

STUDY_NAME = "vitslim-search"
STUDY_VERSION = 1  # the study's user attribute vitslim_study: raise it when trials would be drawn or read otherwise
SAMPLERS = ("nsga2", "tpe")
STORAGES = ("journal", "sqlite")
SETUP_LOCK = ".study-setup.lock"  # OUT/: held by the worker registering and opening the study (see search())
WAIT_BASE_S = 60.0  # a finished worker waits this long, plus 4x the slowest trial, for other workers' trials
WAIT_POLL_S = 0.5


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


def pick(rows: List[dict]):
    """(the chosen row, the front's trial numbers) of trial rows {"number", "acc", "ms", "loss", "feasible"}.
    The front is that of the trials that meet the bound (Optuna's constrained `best_trials`); the chosen
    trial is the most accurate of them and, of equally accurate ones (accuracy moves in steps of one held-out
    image), the fastest, then the one of lowest loss: always a member of the front."""
    feas = [r for r in rows if r["feasible"]]
    best = min(feas, key=lambda r: (-r["acc"], r["ms"], r["loss"], r["number"]))
    return best, [feas[k]["number"] for k in pareto_front(feas)]


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
            raise SearchError(f"--trials: got {n_trials}, expected an integer >= 1")
        if sampler not in SAMPLERS:
            raise SearchError(f"--sampler: got {sampler!r}, expected one of {', '.join(SAMPLERS)}")
        if storage not in STORAGES:
            raise SearchError(f"--storage: got {storage!r}, expected one of {', '.join(STORAGES)}")
        self.n_trials, self.sampler_name, self.storage_kind = int(n_trials), sampler, storage
        self.population_size = population_size
        self.n_startup: Optional[int] = None  # fixed by the study once it exists (see study())
        self.run_args = dict(run_args or {})
        self.log_file = "study.journal" if storage == "journal" else "study.db"

    def args(self) -> dict:
        # n_trials may grow between runs (ask for more trials), so it is not part of what must match
        return {"strategy": self.name, "sampler": self.sampler_name, **self.run_args}

    def _storage(self, ctx: SearchContext):
        if not ctx.log_dir:
            return None
        path = os.path.abspath(os.path.join(ctx.log_dir, self.log_file))
        if self.storage_kind == "sqlite":  # as Optuna makes it from the URL, kept to close its pool after the search
            from optuna.storages import RDBStorage
            storage = RDBStorage(f"sqlite:///{path}")
            self.__dict__.setdefault("_rdb_storages", []).append(storage)
            return storage
        from optuna.storages import JournalStorage
        return JournalStorage(_journal_backend(path))

    def _sampler(self, ctx: SearchContext, seed: Optional[int] = None, previous=None):
        """The study's sampler seeded with `seed`; `previous` (the sampler it replaces, re-seeded before every
        trial) hands over its search-space cache."""
        import optuna
        seed = ctx.seed if seed is None else seed
        cons = {} if _native_constraints() else {"constraints_func": _constraints}
        if self.sampler_name == "tpe":
            sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                 n_startup_trials=self._n_startup(), **cons)
        else:
            sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=self._population(), **cons)
        # Both samplers seed their own generator and their inner RandomSampler with the same seed. Re-seeded
        # before every trial (see worker_seed), the two would replay one stream: NSGA-II's mutate-or-not
        # draws would be the very numbers the mutated values are drawn from. Give the inner one its own.
        if isinstance(getattr(sampler, "_random_sampler", None), optuna.samplers.RandomSampler):
            inner = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED]).generate_state(1)[0])
            sampler._random_sampler = optuna.samplers.RandomSampler(seed=inner)
        _keep_search_space(sampler, previous)
        return sampler

    def _population(self) -> int:
        return self.population_size or max(4, min(50, self.n_trials // 4))

    def _n_startup(self) -> int:
        return self.n_startup or min(10, max(2, self.n_trials // 5))

    @staticmethod
    def worker_seed(seed: int, completed: int, rank: int) -> int:
        """The sampler's seed for the next trial: from (seed, trials the study has completed, rank among live
        workers). The sampler is re-seeded before every trial, so a trial's parameters depend only on the
        seed and the study's completed trials: a run killed mid-trial and resumed draws exactly what the
        uninterrupted run drew (the killed trial is failed and drawn again), and a second worker (another
        rank) draws other parameters."""
        return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(completed), int(rank)]).generate_state(1)[0])

    def warm_start(self, ctx: SearchContext) -> List[dict]:
        """Networks enqueued as a fresh study's first trials: latency-matched random samples (predicted within
        25% under the bound, or anything under it where the band is empty). Uniform samples of a space land
        mostly far from a tight target; with these the sampler starts from feasible points near it."""
        from .random_search import RandomSearch
        k = max(2, min(self._population() if self.sampler_name == "nsga2" else self._n_startup(), self.n_trials // 4))
        k = min(k, self.n_trials)
        for band in (0.25, 0.0):
            try:
                return RandomSearch(budget=k, band=band, max_draws=20_000).sample_feasible(ctx)
            except SearchError:
                continue
        return []

    def study(self, ctx: SearchContext, seed: Optional[int] = None):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(study_name=STUDY_NAME, storage=self._storage(ctx),
                                    sampler=optuna.samplers.RandomSampler(), directions=["maximize", "minimize"],
                                    load_if_exists=True)  # its sampler is set below, once its shape is known
        args = json.loads(json.dumps({**self.args(), "target_ms": ctx.target_ms, "seed": ctx.seed}))
        old = study.user_attrs.get("vitslim_args")
        ver = study.user_attrs.get("vitslim_study")
        if isinstance(ver, int) and ver > STUDY_VERSION:
            raise SearchError(f"cannot resume the study in {ctx.log_dir}: written by a newer vitslim (study version "
                              f"{ver}, expected {STUDY_VERSION} or older): resume it with that vitslim, or use another --out")
        if old is None:
            study.set_user_attr("vitslim_args", args)
            study.set_user_attr("vitslim_study", STUDY_VERSION)
        else:
            diff = resume_args_diff(old, args)
            if diff:
                raise SearchError(f"cannot resume the study in {ctx.log_dir}: the arguments differ from its: "
                                  f"{'; '.join(diff[:3])} (use the same arguments, another --out, or --overwrite)")
            if ver is None:  # an earlier vitslim's: its trials stand, the ones added are drawn as this one draws
                import warnings
                warnings.warn(f"the study in {ctx.log_dir} was written by an earlier vitslim (no study version): its "
                              f"{len(study.trials)} trial(s) are kept, the trials added are drawn with this version's "
                              "per-trial seeding, so the study is not what one run of either version gives",
                              stacklevel=2)
                study.set_user_attr("vitslim_study", STUDY_VERSION)
        # the sampler's shape follows --trials when the study starts and stays with it: more trials asked later
        # must not regroup NSGA-II's generations (population) or TPE's random start mid-study
        shape = study.user_attrs.get("vitslim_sampler")
        if shape is None:
            study.set_user_attr("vitslim_sampler", {"population_size": self._population(),
                                                    "n_startup": self._n_startup()})
        else:
            self.population_size, self.n_startup = int(shape["population_size"]), int(shape["n_startup"])
        study.sampler = self._sampler(ctx, seed)
        return study

    def search(self, ctx: SearchContext) -> SearchResult:
        require_reachable(ctx)
        # Workers started together take turns from registering in .workers/ until the study is open, its orphaned
        # trials failed and its warm starts fixed: a worker that found itself alone fails the RUNNING trials
        # only while no other can have started one, and SQLite's tables are created once.
        with contextlib.ExitStack() as setup:
            setup.enter_context(_setup_lock(ctx.log_dir))
            with _Workers(ctx.log_dir) as workers:
                if workers.alone and ctx.log_dir and self.storage_kind == "journal":
                    # a lock a killed worker held (Optuna waits 30 s, then breaks it): no live worker holds it now
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(ctx.log_dir, self.log_file + ".lock"))
                    drop_torn_tail(os.path.join(ctx.log_dir, self.log_file))
                import optuna
                verbosity = optuna.logging.get_verbosity()  # the caller's, restored: study() quiets Optuna
                try:
                    return self._search(ctx, workers, setup.close)
                except json.JSONDecodeError as e:  # a journal damaged in its middle (a torn tail is cut above)
                    if self.storage_kind == "journal" and ctx.log_dir:
                        raise SearchError(f"{os.path.join(ctx.log_dir, self.log_file)}: a damaged journal line "
                                          f"({e}); remove that line to resume, or pass --overwrite") from None
                    raise
                finally:
                    optuna.logging.set_verbosity(verbosity)
                    # SQLite connections stay pooled by the engine until it is disposed (Python 3.13 warns of
                    # each one at exit): a program running searches in a loop would hold a file per search
                    for storage in self.__dict__.pop("_rdb_storages", []):
                        storage.engine.dispose()

    def _search(self, ctx: SearchContext, workers: "_Workers", set_up=lambda: None) -> SearchResult:
        import optuna
        enc = FlatEncoding(ctx.space)
        study = self.study(ctx)
        existing = study.get_trials(deepcopy=False)
        if workers.alone:  # trials left RUNNING by a worker that was killed: nobody will finish them
            for t in existing:
                if t.state == optuna.trial.TrialState.RUNNING:
                    study._storage.set_trial_state_values(t._trial_id, state=optuna.trial.TrialState.FAIL)
            _drop_unused_parent_cache(study)
        if "vitslim_warm" not in study.user_attrs:  # fixed with the study, so a resumed run uses the same
            study.set_user_attr("vitslim_warm", [enc.encode(c) for c in self.warm_start(ctx)] if not existing else [])
        warm = study.user_attrs["vitslim_warm"]
        Complete, Waiting = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.WAITING

        def next_trial(study, _trial=None, locked=False):
            """Before each trial: the next warm-start network not yet run or taken by a worker (one at a time,
            in order, so a killed one is the next again; enqueued under the setup lock, so each runs once
            whichever worker takes it), and the sampler seeded for the study's completed count."""
            trials = study.get_trials(deepcopy=False)
            n = sum(t.state == Complete for t in trials)
            if _next_warm(trials, len(warm)) is not None and not any(t.state == Waiting for t in trials):
                with contextlib.nullcontext() if locked else _setup_lock(ctx.log_dir):
                    trials = study.get_trials(deepcopy=False) if not locked else trials
                    k = _next_warm(trials, len(warm))
                    if k is not None and not any(t.state == Waiting for t in trials):
                        study.enqueue_trial(warm[k], user_attrs={"warm_start": True, "warm_index": k})
            study.sampler = self._sampler(ctx, self.worker_seed(ctx.seed, n, workers.rank), previous=study.sampler)
            if _trial is not None:  # a trial ended: its records made durable (one fsync a trial, not one a record)
                _sync_storage(study)

        next_trial(study, locked=True)
        set_up()  # the next worker may register and open the study
        # deepcopy=False: `study.trials` deep-copies every trial of the study (1.4 s at 1,700 trials of the L1
        # space, twice a run); these are only read
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        for t in done:  # reuse logged evaluations
            if "choice" in t.user_attrs:
                ctx.evaluator.prime(t.user_attrs["choice"], {"acc": t.values[0], "loss": t.user_attrs["loss"]})
        left = self.n_trials - len(done)
        native = _native_constraints()

        worker_id = f"{socket.gethostname()}-{os.getpid()}"

        def objective(trial):
            trial.set_user_attr("worker", worker_id)  # first: a finished worker waits for the trials live ones run
            c = enc.suggest(trial)
            ms = ctx.latency(c)
            e = ctx.evaluator(c)
            trial.set_user_attr("choice", c)
            trial.set_user_attr("loss", e["loss"])
            trial.set_user_attr("constraint", [ms - ctx.bound_ms])
            if native:
                trial.set_constraint("latency", ms - ctx.bound_ms)
            return e["acc"], ms

        if left > 0:
            # workers sharing the study stop together once it holds n_trials complete trials (each worker
            # may finish the trial it is running: with W workers, up to W - 1 more)
            stop = optuna.study.MaxTrialsCallback(self.n_trials, states=(optuna.trial.TrialState.COMPLETE,))
            # a trial is taken under the setup lock: SQLite has no row locks, so workers asking together each
            # popped the same enqueued (warm-start) trial, ran it twice, and the second to tell it crashed
            # ("Cannot tell a COMPLETE trial"); Optuna's optimize loop calls study.ask() for every trial
            ask = study.ask

            def locked_ask(*a, **k):
                with _setup_lock(ctx.log_dir):
                    return ask(*a, **k)
            study.ask = locked_ask
            with _stop_on_interrupt(study, ctx.progress):
                study.optimize(objective, n_trials=left, callbacks=[stop, next_trial],
                               show_progress_bar=bool(ctx.progress), gc_after_trial=False)
        # pick from the whole study: trials other live workers are still running end first (each then stops:
        # the study holds its trials), so every worker picks the same network and none gives up on a study
        # whose last trials would have met the bound
        pending, waited = _wait_for_other_workers(study, workers, worker_id, ctx.progress)
        trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        rows = [{"number": t.number, "acc": t.values[0], "ms": t.values[1], "loss": t.user_attrs["loss"],
                 "feasible": t.values[1] <= ctx.bound_ms, "choice": t.user_attrs["choice"]} for t in trials]
        if not any(r["feasible"] for r in rows):
            fastest = f" (fastest {min(r['ms'] for r in rows):.4g} ms)" if rows else ""
            if pending:
                raise SearchError(f"optuna: none of the {len(rows)} finished trials meets {ctx.bound_ms:g} ms{fastest}, "
                                  f"and other workers are still running {pending} trial(s) after {waited:.0f} s of "
                                  "waiting: the worker that finishes them writes the run")
            raise SearchError(f"optuna: none of {len(rows)} trials meets {ctx.bound_ms:g} ms{fastest}; "
                              "run more trials (same command with a larger --trials resumes the study)")
        best, front = pick(rows)
        return SearchResult(self.name, best["choice"], float(best["ms"]), float(best["acc"]), float(best["loss"]),
                            evaluations=ctx.evaluator.evaluations,
                            extra={"trials": len(rows), "best_trial": best["number"], "pareto": front,
                                   "trial_rows": rows, "distinct_choices": len({choice_key(r["choice"]) for r in rows}),
                                   "workers_seen": workers.seen,  # live when this worker started, itself included
                                   # processes that completed trials of the study (each resumed run counts)
                                   "worker_processes": len({t.user_attrs["worker"] for t in trials
                                                            if "worker" in t.user_attrs})})


def _keep_search_space(sampler, previous) -> None:
    """Give `sampler` the search-space cache of the `previous` sampler of the same kind. NSGA-II and TPE infer the
    relative search space with an IntersectionSearchSpace that remembers the intersection of the trials it has
    seen and reads only newer trials on its next call. A fresh sampler (vitslim re-seeds by making a new one
    before every trial) starts it empty and intersects the distributions of every trial of the study again:
    O(n) dictionary comparisons a trial, O(n^2) for the study (0.10 s a trial at 2,000 trials of the tiny space,
    most of a trial's time). The cache depends only on the trials, so handing it over changes no draw."""
    from optuna.search_space import IntersectionSearchSpace
    old = getattr(previous, "_search_space", None)
    if (previous is not None and type(previous) is type(sampler) and isinstance(old, IntersectionSearchSpace)
            and isinstance(getattr(sampler, "_search_space", None), IntersectionSearchSpace)
            and getattr(old, "_include_pruned", None) == getattr(sampler._search_space, "_include_pruned", None)):
        sampler._search_space = old


def _next_warm(trials, n_warm: int) -> Optional[int]:
    """The index of the first warm start no trial has run or taken (COMPLETE, RUNNING or WAITING), or None.
    Trials of studies made before warm starts carried their index took the first ones, in order."""
    import optuna
    S = optuna.trial.TrialState
    taken, legacy = set(), 0
    for t in trials:
        if t.user_attrs.get("warm_start") and t.state in (S.COMPLETE, S.RUNNING, S.WAITING):
            if "warm_index" in t.user_attrs:
                taken.add(int(t.user_attrs["warm_index"]))
            else:
                legacy += 1
    return next((k for k in range(legacy, n_warm) if k not in taken), None)


def _wait_for_other_workers(study, workers: "_Workers", me: str, progress: bool):
    """Wait, polling, while other live workers run trials of the study (a trial whose worker is not known yet
    counts while any other worker is live), at most WAIT_BASE_S plus 4x the slowest finished trial.
    Returns (how many such trials still run, seconds waited)."""
    import optuna
    t0, said, limit = time.monotonic(), False, None
    while True:
        others = workers.others()
        if not others:
            return 0, time.monotonic() - t0
        theirs = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                  if t.user_attrs.get("worker") != me
                  and ("worker" not in t.user_attrs or _worker_key(t.user_attrs["worker"]) in others)]
        waited = time.monotonic() - t0
        if not theirs:
            return 0, waited
        if limit is None:
            slowest = max((t.duration.total_seconds() for t in study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if t.duration is not None), default=0.0)
            limit = WAIT_BASE_S + 4 * slowest
        if waited >= limit:
            return len(theirs), waited
        if progress and not said:
            print(f"optuna: other workers are running {len(theirs)} trial(s) of the study; waiting for them (at most "
                  f"{limit:.0f} s) to pick from the whole study", flush=True)
            said = True
        _pause(WAIT_POLL_S)


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _worker_key(worker: str) -> str:
    """HOST-PID of a trial's `worker` attribute, as .workers/ spells it (HOST with '-' as '_')."""
    host, _, pid = str(worker).rpartition("-")
    return f"{host.replace('-', '_')}-{pid}"


def _journal_backend(path: str):
    """Optuna's journal file, but without its fsync after every record: a trial writes 30 or more (one per
    parameter of the flat encoding), and their fsyncs were most of Optuna's overhead (about 0.25 s a trial at L1
    scale against a GPU evaluation of 1-2 s). A killed process loses nothing that way (the OS holds what was
    written); `sync()`, once per trial, makes the journal durable against a power cut (whose torn last line the
    next run drops, `drop_torn_tail`). Optuna's own backend where its internals differ from what this expects."""
    from optuna.storages.journal import JournalFileBackend
    lock = None
    if sys.platform == "win32":  # Optuna's default lock is a symlink, which Windows lets only administrators (or
        from optuna.storages.journal import JournalFileOpenLock  # Developer Mode) make: WinError 1314 otherwise
        lock = JournalFileOpenLock(path)  # an O_EXCL file of the same name (excludes a symlink lock's holder too)
    try:
        from optuna.storages.journal._file import get_lock_file
    except ImportError:
        return JournalFileBackend(path, lock_obj=lock)

    class Backend(JournalFileBackend):
        def append_logs(self, logs):
            if not (hasattr(self, "_lock") and hasattr(self, "_file_path")):
                return super().append_logs(logs)
            with get_lock_file(self._lock):
                text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
                with open(self._file_path, "ab") as f:
                    f.write(text.encode("utf-8"))

        def sync(self):
            with contextlib.suppress(OSError, AttributeError):
                _fsync_file(self._file_path)
    return Backend(path, lock_obj=lock)


def _fsync_file(path: str) -> None:
    """fsync a file by name. Windows flushes only a handle opened for writing (FlushFileBuffers on a read-only one
    fails with EBADF, which a caller suppressing OSError would take for done)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0) if sys.platform == "win32" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_storage(study) -> None:
    """fsync the study's journal (a no-op for other storages)."""
    backend = getattr(getattr(study, "_storage", None), "_backend", None)
    if hasattr(backend, "sync"):
        backend.sync()


@contextlib.contextmanager
def _setup_lock(log_dir: Optional[str]):
    """Hold an exclusive flock on OUT/.study-setup.lock (waiting for it) for the block; nothing without a log_dir
    or flock."""
    if not log_dir:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    os.makedirs(log_dir, exist_ok=True)
    with open(os.path.join(log_dir, SETUP_LOCK), "a+") as f:
        with contextlib.suppress(OSError):  # no flock on this file system
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _drop_unused_parent_cache(study) -> None:
    """NSGA-II caches a generation's parents (study attribute) when its first child is drawn, and a cached
    list comes back in trial order where a fresh one is in selection order, which changes the children
    drawn. A generation whose only child so far was killed has a cache the uninterrupted run did not have
    at that point: drop it, so the resumed run draws what the uninterrupted one did."""
    import optuna
    sampler = study.sampler
    if not (hasattr(sampler, "_get_parent_cache_key_prefix") and hasattr(sampler, "_get_generation_key")):
        return
    prefix, gkey = sampler._get_parent_cache_key_prefix(), sampler._get_generation_key()
    used = {t.system_attrs.get(gkey) for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])}
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        if key.startswith(prefix) and value is not None and key[len(prefix):].isdigit() and int(key[len(prefix):]) not in used:
            study._storage.set_study_system_attr(study._study_id, key, None)


@contextlib.contextmanager
def _stop_on_interrupt(study, progress: bool):
    """Ctrl-C during a study: the first stops it after the running trial (nothing is cut mid-write in the
    storage), then the run ends as interrupted; a second interrupts at once."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit = []

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)
        if progress:
            print("\ninterrupt: stopping after the running trial (Ctrl-C again to stop now)", flush=True)
        study.stop()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if hit:
        raise KeyboardInterrupt


def drop_torn_tail(path: str) -> bool:
    """Cut a journal's last line when a kill cut it (no final newline); True when it did. Optuna skips a
    torn last line when it reads, but the next append glued its record onto it, and that line in the middle
    of the file made every later read fail (JSONDecodeError). Only a lone worker may call this."""
    try:
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end == 0:
                return False
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return False
            pos, keep = end, 0
            while pos > 0:  # back to the last newline, a block at a time
                step = min(1 << 16, pos)
                pos -= step
                f.seek(pos)
                k = f.read(step).rfind(b"\n")
                if k >= 0:
                    keep = pos + k + 1
                    break
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            return True
    except FileNotFoundError:
        return False


class _Workers:
    """Who is working on a study directory: each worker holds a file `.workers/HOST-PID-NS` while it runs.
    `rank`: the lowest rank no other live worker holds (written in its file), so two live workers never draw
    the same parameters; `alone`: no other live worker (RUNNING trials in the study were then left by a killed one).
    Entries of dead processes on this host are removed; those of other hosts (a shared file system) are
    taken as live."""

    def __init__(self, log_dir: Optional[str]):
        self.dir = os.path.join(log_dir, ".workers") if log_dir else None
        self.rank, self.alone, self.seen, self.me = 0, True, 1, None

    def __enter__(self):
        if not self.dir:
            return self
        os.makedirs(self.dir, exist_ok=True)
        host = socket.gethostname().replace("-", "_")
        self.me = os.path.join(self.dir, f"{host}-{os.getpid()}-{time.time_ns()}")
        with open(self.me, "x"):
            pass
        live = self._live()
        # the lowest rank no other live worker holds (each file holds its worker's rank; an empty one, of an
        # older version, its place by start): workers started together get 0, 1, ...; one joining after an
        # earlier one left takes the freed rank, never a rank still in use (same rank = same draws)
        taken = set()
        for k, (_, _, path) in enumerate(live):
            if path != self.me:
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read().strip()
                except OSError:
                    text = ""
                taken.add(int(text) if text.isdigit() else k)
        self.rank = next(r for r in range(len(live) + 1) if r not in taken)
        with open(self.me, "w", encoding="utf-8") as f:
            f.write(f"{self.rank}\n")
        self.alone = len(live) == 1
        self.seen = len(live)
        return self

    def _live(self) -> list:
        """[(start ns, name, path)] of the live workers, by start; removes the entries of dead ones of this host."""
        host = socket.gethostname().replace("-", "_")
        live = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            names = []
        for name in names:
            parts = name.rsplit("-", 2)
            if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
                continue
            path = os.path.join(self.dir, name)
            if parts[0] == host and path != self.me and not pid_alive(int(parts[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            live.append((int(parts[2]), name, path))
        live.sort()
        return live

    def others(self) -> set:
        """HOST-PID of every other live worker now."""
        if not self.dir:
            return set()
        return {name.rsplit("-", 1)[0] for _, name, path in self._live() if path != self.me}

    def __exit__(self, *exc):
        if self.me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.me)
        return False
