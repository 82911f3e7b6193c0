"""Several Optuna workers on one study, with their timing forced: a worker started with --overwrite while
another works."""
import importlib.util as _ilu
import os
import socket
import threading

import optuna
import pytest

import nas.optuna_search as O
from nas.optuna_search import FlatEncoding, OptunaSearch
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
