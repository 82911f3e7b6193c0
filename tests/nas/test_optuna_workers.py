"""Several Optuna workers on one study, with their timing forced: a worker started with --overwrite while
another works, workers that register while the first opens the study, warm starts while other workers
complete trials, and a worker that finishes while another's trial still runs."""
import importlib.util as _ilu
import os
import socket
import threading

import optuna
import pytest

import nas.optuna_search as O
from nas.optuna_search import SETUP_LOCK, FlatEncoding, OptunaSearch
from nas.run import _run_lock, load_supernet_run, load_table, make_evaluator, run_search
from nas.strategy import SearchContext, SearchError, fastest_choice

_spec = _ilu.spec_from_file_location("nas_conftest", os.path.join(os.path.dirname(__file__), "conftest.py"))
_nas = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_nas)

ARGS = {"supernet": "s", "table": "t"}
KW = dict(strategy="optuna", eval_images=16, progress=False, verify="off")


def context(supernet_run, table_path, out, target, seed=0):
    model, cfg, obj = load_supernet_run(supernet_run)
    tab, comp = load_table(table_path, model.space)
    ev, _ = make_evaluator(model, cfg, eval_images=16)
    return SearchContext(model.space, model, tab, comp, ev, target, seed=seed, progress=False, log_dir=out)


def load(out, storage="journal"):
    return optuna.load_study(study_name="vitslim-search", storage=OptunaSearch(storage=storage, run_args=ARGS)._storage(
        SearchContext(None, None, None, None, None, 1.0, log_dir=out)))


def live_other_worker(out):
    """Register a live worker that started before this one (the test runner's parent process); returns the
    `worker` attribute its trials carry."""
    os.makedirs(os.path.join(out, ".workers"), exist_ok=True)
    open(os.path.join(out, ".workers", f"{socket.gethostname().replace('-', '_')}-{os.getppid()}-1"), "w").close()
    return f"{socket.gethostname()}-{os.getppid()}"


def finish(study, trial, choice, ms, acc, worker):
    """What a worker does at the end of a trial (see OptunaSearch._search's objective)."""
    for k, v in (("choice", choice), ("loss", 1.0 - acc), ("constraint", [ms - 4.0]), ("worker", worker)):
        trial.set_user_attr(k, v)
    study.tell(trial, [acc, ms])


# ---------------------------------------------------------------- --overwrite
def test_overwrite_is_refused_while_a_worker_uses_the_directory(supernet_run, table_path, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    run_search(supernet_run, table_path, 4.0, out, trials=2, **KW)
    before = sorted(os.listdir(out))
    with _run_lock(out, shared=True):  # a live Optuna worker on the study
        with pytest.raises(SearchError, match=r"another search is running in it \(--overwrite needs it to itself"):
            run_search(supernet_run, table_path, 4.0, out, trials=2, overwrite=True, **KW)
    assert sorted(os.listdir(out)) == before  # its study (and .workers) untouched
    # once the overwriting worker has cleared the directory, other workers may join its study
    joined, real = [], OptunaSearch.search

    def search(self, ctx):
        with _run_lock(out, shared=True):
            joined.append(os.path.exists(os.path.join(out, "report.json")))
        return real(self, ctx)

    monkeypatch.setattr(OptunaSearch, "search", search)
    rep = run_search(supernet_run, table_path, 4.0, out, trials=3, overwrite=True, **KW)
    assert joined == [False] and rep["search"]["trials"] == 3


def test_a_refused_optuna_run_leaves_nothing_behind(supernet_run, table_path, tmp_path, monkeypatch):
    out = tmp_path / "o"

    def refuse(self, ctx, seed=None):
        assert os.path.isfile(os.path.join(ctx.log_dir, SETUP_LOCK))  # taken before the study is opened
        raise SearchError("refused")

    monkeypatch.setattr(OptunaSearch, "study", refuse)
    with pytest.raises(SearchError, match="refused"):
        run_search(supernet_run, table_path, 4.0, str(out), trials=2, **KW)
    assert not out.exists()


# ---------------------------------------------------------------- study setup
@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_a_worker_started_while_the_first_opens_the_study_keeps_its_trials(supernet_run, table_path, tmp_path,
                                                                            monkeypatch, storage):
    """A decides it is alone (no other entry in .workers), then opens the study slowly; B starts meanwhile.
    B must not register and start a trial that A, acting on `alone`, marks FAIL (B then died with
    `ValueError: Cannot tell a FAIL trial`)."""
    out = str(tmp_path / "o")
    os.makedirs(out)
    ctx_a, ctx_b = (context(supernet_run, table_path, out, 4.0) for _ in range(2))
    main, b_waits, b_out = threading.get_ident(), threading.Event(), {}
    real_lock, real_study = getattr(O, "_setup_lock", None), OptunaSearch.study

    def lock(log_dir):
        if threading.get_ident() != main:
            b_waits.set()  # B is about to wait for A's setup
        return real_lock(log_dir)

    def run_b():
        try:
            b_out["result"] = OptunaSearch(n_trials=4, storage=storage, run_args=ARGS).search(ctx_b)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            b_out["error"] = e

    b = threading.Thread(target=run_b)

    def slow_study(self, ctx, seed=None):
        if threading.get_ident() == main and not b.is_alive() and not b_out:
            b.start()
            # A holds the study open until B waits for it, or (without the setup lock) B has started a trial
            while not b_waits.is_set() and b.is_alive():
                try:
                    if any(t.state == optuna.trial.TrialState.RUNNING for t in load(out, storage).trials):
                        break
                except KeyError:  # no study yet
                    pass
                threading.Event().wait(0.01)
        return real_study(self, ctx, seed)

    monkeypatch.setattr(O, "_setup_lock", lock, raising=False)
    monkeypatch.setattr(OptunaSearch, "study", slow_study)
    res = OptunaSearch(n_trials=4, storage=storage, run_args=ARGS).search(ctx_a)
    b.join()
    assert "error" not in b_out, repr(b_out.get("error"))
    states = [t.state for t in load(out, storage).trials]
    assert optuna.trial.TrialState.FAIL not in states
    assert res.extra["workers_seen"] == 1 and b_out["result"].extra["workers_seen"] in (1, 2)


# ---------------------------------------------------------------- warm starts
def test_each_warm_start_runs_once_while_other_workers_complete_trials(supernet_run, table_path, tmp_path):
    """Warm starts were keyed to the study's completed count, which other workers advance too (and only the
    first-started worker enqueued them): with another worker completing a trial during each of this one's,
    most were skipped."""
    out = str(tmp_path / "o")
    os.makedirs(out)
    other = live_other_worker(out)  # started first: this worker is not rank 0
    ctx = context(supernet_run, table_path, out, 4.0)
    enc = FlatEncoding(ctx.space)
    ev = ctx.evaluator

    class Busy(type(ev)):
        def __call__(self, c):  # the other worker completes a trial while this one evaluates
            study = load(out)
            study.sampler = optuna.samplers.RandomSampler(seed=len(study.trials))
            t = study.ask()
            oc = enc.suggest(t)
            finish(study, t, oc, ctx.latency(oc), 0.0, other)
            return super().__call__(c)

    ev.__class__ = Busy
    OptunaSearch(n_trials=16, run_args=ARGS).search(ctx)
    study = load(out)
    warm = study.user_attrs["vitslim_warm"]
    ran = [t for t in study.trials if t.user_attrs.get("warm_start")]
    assert len(warm) == 4
    assert [t.params for t in ran] == warm and all(t.state == optuna.trial.TrialState.COMPLETE for t in ran)


# ---------------------------------------------------------------- picking
def _other_workers_trial(ctx, out):
    """A study with one trial a live other worker is running: the fastest network."""
    worker = live_other_worker(out)
    study = OptunaSearch(n_trials=3, run_args=ARGS).study(ctx)
    fast = fastest_choice(ctx)
    study.enqueue_trial(FlatEncoding(ctx.space).encode(fast))
    t = study.ask()
    FlatEncoding(ctx.space).suggest(t)
    t.set_user_attr("worker", worker)
    return study, t, fast, worker


def test_a_finished_worker_picks_after_the_trials_live_workers_run(supernet_run, table_path, tmp_path, monkeypatch,
                                                                    capsys):
    out = str(tmp_path / "o")
    os.makedirs(out)
    ctx = context(supernet_run, table_path, out, 4.0)
    ctx.progress = True
    study, t, fast, worker = _other_workers_trial(ctx, out)
    pauses = []

    def pause(seconds):  # the other worker's trial ends while this one waits
        pauses.append(seconds)
        finish(study, t, fast, ctx.latency(fast), 1.0, worker)

    monkeypatch.setattr(O, "_pause", pause)
    res = OptunaSearch(n_trials=3, run_args=ARGS).search(ctx)
    assert len(pauses) == 1
    assert res.extra["trials"] == 4 and res.extra["best_trial"] == t.number  # the most accurate, when it ended
    assert "other workers are running 1 trial(s) of the study; waiting for them" in capsys.readouterr().out


def test_a_worker_that_stops_waiting_says_the_others_write_the_run(supernet_run, table_path, tmp_path, monkeypatch):
    out = str(tmp_path / "o")
    os.makedirs(out)
    ctx = context(supernet_run, table_path, out, 4.0)
    fastest = ctx.latency(fastest_choice(ctx))
    ctx = context(supernet_run, table_path, out, fastest)  # only the fastest network meets it
    study, t, fast, worker = _other_workers_trial(ctx, out)
    monkeypatch.setattr(O, "WAIT_BASE_S", -1e9)  # the wait is over at once
    monkeypatch.setattr(O, "_pause", lambda s: pytest.fail("waited past the limit"))
    with pytest.raises(SearchError) as e:
        OptunaSearch(n_trials=1, run_args=ARGS).search(ctx)
    msg = str(e.value)
    assert "none of the 1 finished trials meets" in msg and "run more trials" not in msg
    assert "other workers are still running 1 trial(s)" in msg and "the worker that finishes them writes the run" in msg
    # a trial whose worker is no longer live is not waited for
    os.remove(os.path.join(out, ".workers", os.listdir(os.path.join(out, ".workers"))[0]))
    with pytest.raises(SearchError, match="run more trials"):
        OptunaSearch(n_trials=1, run_args=ARGS).search(ctx)


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_every_trial_is_taken_under_the_setup_lock(supernet_run, table_path, tmp_path, monkeypatch, storage):
    """SQLite has no row locks: workers asking together each popped the same enqueued warm-start trial, ran it
    twice, and the second to tell it died with `ValueError: Cannot tell a COMPLETE trial`. Optuna's optimize
    loop takes every trial with study.ask(); the search makes each ask hold the setup lock."""
    import contextlib
    real_lock, real_ask = O._setup_lock, optuna.study.Study.ask
    held, seen = threading.local(), []

    @contextlib.contextmanager
    def lock(log_dir):
        with real_lock(log_dir):
            held.n = getattr(held, "n", 0) + 1
            try:
                yield
            finally:
                held.n -= 1

    def ask(self, *a, **k):
        seen.append(getattr(held, "n", 0))
        return real_ask(self, *a, **k)

    monkeypatch.setattr(O, "_setup_lock", lock)
    monkeypatch.setattr(optuna.study.Study, "ask", ask)
    run_search(supernet_run, table_path, 4.0, str(tmp_path / "o"), trials=4, storage=storage, **KW)
    assert len(seen) >= 4 and all(n == 1 for n in seen), seen
