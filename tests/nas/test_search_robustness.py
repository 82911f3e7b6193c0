"""What a search run does with hostile input and hostile timing: unreadable files, impossible devices and
settings (refused before any evaluation), two searches on one directory, several Optuna workers on one
study, a worker killed mid-trial, a kill mid-step, and the minimum target it quotes."""
import importlib.util as _ilu
import json
import os

import optuna
import pytest
import torch

from nas.optuna_search import FlatEncoding, OptunaSearch, _Workers
from nas.run import _run_lock, load_supernet_run, load_table, make_evaluator, run_search
from nas.strategy import SearchContext, SearchError, ceil_sig, fastest_choice
from vitslim.cli import main

_spec = _ilu.spec_from_file_location("nas_conftest", os.path.join(os.path.dirname(__file__), "conftest.py"))
_nas = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_nas)


def run_cli(capsys, *argv):
    rc = main(["search", *argv, "--no-progress"])
    return rc, capsys.readouterr().err.strip()


def context(supernet_run, table_path, out, target, seed=0):
    model, cfg, obj = load_supernet_run(supernet_run)
    tab, comp = load_table(table_path, model.space)
    ev, _ = make_evaluator(model, cfg, eval_images=16)
    return SearchContext(model.space, model, tab, comp, ev, target, seed=seed, progress=False, log_dir=out)


def test_a_binary_file_given_as_table_is_one_line(supernet_run, tmp_path, capsys):
    t = tmp_path / "t.yaml"
    t.write_bytes(bytes(range(128, 256)) * 4)
    rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", str(t), "--target-ms", "3",
                      "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.splitlines()) == 1 and "not a text (UTF-8) file" in err
    assert not (tmp_path / "o").exists()


def test_a_truncated_supernet_checkpoint_is_one_line(supernet_run, table_path, tmp_path, capsys):
    run = tmp_path / "trunc"
    run.mkdir()
    with open(os.path.join(supernet_run, "checkpoint.pt"), "rb") as f:
        (run / "checkpoint.pt").write_bytes(f.read()[:50_000])
    rc, err = run_cli(capsys, "--supernet", str(run), "--table", table_path, "--target-ms", "3",
                      "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.splitlines()) == 1 and "truncated" in err and "checkpoint.pt" in err


@pytest.mark.parametrize("flag,value,expected", [
    ("--device", "foo", "--device: got 'foo', expected cpu, cuda or cuda:N"),
    ("--eval-batch-size", "0", "--eval-batch-size: got 0, expected an integer >= 1"),
    ("--finetune-lr", "-1", "--finetune-lr: got -1.0, expected a learning rate > 0"),
])
def test_bad_settings_are_refused_before_the_search(supernet_run, table_path, tmp_path, capsys, flag, value, expected):
    rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", table_path, "--target-ms", "3",
                      "--out", str(tmp_path / "o"), "--finetune", "2", flag, value)
    assert rc == 2 and err == f"vitslim search: error: {expected}"
    assert not (tmp_path / "o").exists()  # nothing was searched, nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_line(supernet_run, table_path, tmp_path, capsys):
    rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", table_path, "--target-ms", "3",
                      "--out", str(tmp_path / "o"), "--device", "cuda")
    assert rc == 2 and "no usable CUDA device" in err and "--device cpu" in err


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["search", "--target-ms", "abc"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "invalid finite float value: 'abc'" in err and "vitslim search --help" in err


def test_the_quoted_minimum_target_is_accepted(supernet_run, table_path, tmp_path):
    ctx = context(supernet_run, table_path, None, 0.01)
    fastest = ctx.latency(fastest_choice(ctx))
    with pytest.raises(SearchError, match="ask for at least") as e:
        run_search(supernet_run, table_path, fastest * 0.999, str(tmp_path / "a"), eval_images=16, progress=False,
                   strategy="uniform", verify="off")
    quoted = float(str(e.value).split("ask for at least ")[1].split(" ms")[0])
    assert quoted >= fastest and quoted == float(ceil_sig(fastest))
    rep = run_search(supernet_run, table_path, quoted, str(tmp_path / "b"), eval_images=16, progress=False,
                     strategy="slim", verify="off")
    assert rep["predicted_ms"] <= quoted


@pytest.mark.parametrize("x,expected", [(0.36162, "0.3617"), (0.3616, "0.3616"), (12.3449, "12.35"), (999.95, "1000")])
def test_ceil_sig_rounds_up(x, expected):
    assert ceil_sig(x) == expected and float(expected) >= x


def test_a_second_search_on_the_same_directory_is_refused(supernet_run, table_path, tmp_path):
    out = str(tmp_path / "o")
    with _run_lock(out):  # a search holding the directory
        with pytest.raises(SearchError, match="another search is running in it"):
            run_search(supernet_run, table_path, 4.0, out, eval_images=16, progress=False, verify="off")
        with pytest.raises(SearchError, match="another search is running in it"):  # not even an Optuna worker
            run_search(supernet_run, table_path, 4.0, out, eval_images=16, progress=False, verify="off",
                       strategy="optuna", trials=2)
    with _run_lock(out, shared=True):  # Optuna workers share it; a slimming run may not join them
        with _run_lock(out, shared=True):
            pass
        with pytest.raises(SearchError, match="another search is running in it"):
            run_search(supernet_run, table_path, 4.0, out, eval_images=16, progress=False, verify="off")
    rep = run_search(supernet_run, table_path, 4.0, out, eval_images=16, progress=False, verify="off")
    assert rep["predicted_ms"] <= 4.0


def test_overwrite_never_clears_a_supernet_run(supernet_run, table_path, tmp_path):
    import shutil
    run = str(tmp_path / "sn")
    shutil.copytree(supernet_run, run)
    before = sorted(os.listdir(run))
    with pytest.raises(SearchError, match="holds a supernet training run"):
        run_search(supernet_run, table_path, 4.0, run, eval_images=16, progress=False, overwrite=True, verify="off")
    assert sorted(os.listdir(run)) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text('{"not": "a search"}')
    with pytest.raises(SearchError, match="not a search run's"):
        run_search(supernet_run, table_path, 4.0, str(other), eval_images=16, progress=False, overwrite=True,
                   verify="off")
    assert (other / "report.json").read_text() == '{"not": "a search"}'


def test_latency_split_names_every_stage(supernet_run, table_path, tmp_path):
    rep = run_search(supernet_run, table_path, 4.0, str(tmp_path / "o"), eval_images=16, progress=False,
                     strategy="uniform", verify="off")
    split = rep["latency_split"]
    n = len(_nas.SPACE["stages"])
    assert [k for k in split if k.startswith("stage")] == [f"stage{i}" for i in range(n)]
    assert abs(sum(v for k, v in split.items() if k != "total") - split["total"]) < 1e-9


def test_a_kill_mid_step_keeps_the_candidates_evaluated(supernet_run, table_path, tmp_path, monkeypatch):
    """Every candidate evaluation is logged as it is made; a resumed step evaluates only the rest."""
    from nas import evaluator as ev_mod
    target = 4.0
    ref = run_search(supernet_run, table_path, target, str(tmp_path / "ref"), eval_images=16, progress=False,
                     verify="off")
    out = str(tmp_path / "o")
    calls = {"n": 0}
    real = ev_mod.HeldoutEvaluator.score_model

    def dying(self, model):
        calls["n"] += 1
        if calls["n"] == 3:  # the start network, then the first step's candidates: killed at the second (a step
            # has two or more; how many depends on the trained supernet, so on torch's init stream)
            raise KeyboardInterrupt
        return real(self, model)

    monkeypatch.setattr(ev_mod.HeldoutEvaluator, "score_model", dying)
    with pytest.raises(KeyboardInterrupt):
        run_search(supernet_run, table_path, target, out, eval_images=16, progress=False, verify="off")
    monkeypatch.setattr(ev_mod.HeldoutEvaluator, "score_model", real)
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    assert [r["type"] for r in recs] == ["header", "start", "eval"]
    # each evaluation is a point (predicted ms, accuracy) one can plot without the table
    ctx = context(supernet_run, table_path, str(tmp_path / "ctx"), target)
    for r in recs[2:]:
        assert r["predicted_ms"] == pytest.approx(ctx.latency(r["choice"]), rel=1e-9)
    rep = run_search(supernet_run, table_path, target, out, eval_images=16, progress=False, verify="off")
    assert rep["choice"] == ref["choice"] and rep["accuracy"] == ref["accuracy"]
    # what the kill had evaluated was not evaluated again, and the report counts the whole run
    assert rep["evaluation"]["evaluated_this_run"] == ref["evaluation"]["evaluations"] - 2
    assert rep["evaluation"]["evaluations"] == ref["evaluation"]["evaluations"]


# ---------------------------------------------------------------- Optuna workers
def test_workers_get_distinct_ranks_and_dead_ones_are_forgotten(tmp_path):
    d = tmp_path / ".workers"
    d.mkdir()
    import socket
    host = socket.gethostname().replace("-", "_")
    (d / f"{host}-999999999-1").touch()          # a dead process of this host (pid beyond pid_max)
    (d / f"{host}-{os.getppid()}-2").touch()      # a live one that started earlier
    with _Workers(str(tmp_path)) as w:
        assert w.rank == 1 and not w.alone and w.seen == 2
        assert not (d / f"{host}-999999999-1").exists()
        with _Workers(str(tmp_path)) as w2:
            assert w2.rank == 2
    assert os.listdir(d) == [f"{host}-{os.getppid()}-2"]
    os.remove(d / f"{host}-{os.getppid()}-2")
    with _Workers(str(tmp_path)) as w:
        assert w.rank == 0 and w.alone


def test_a_worker_joining_after_one_left_takes_the_freed_rank_not_a_live_one(tmp_path):
    """Ranks were places by start time: with A (0) gone and B (1) still running, a new C was 1 too, and drew
    B's parameters whenever the study's completed count was the same."""
    with _Workers(str(tmp_path)) as a:
        with _Workers(str(tmp_path)) as b:
            assert (a.rank, b.rank) == (0, 1)
        with _Workers(str(tmp_path)) as b2:
            assert b2.rank == 1
    with _Workers(str(tmp_path)) as b:
        with _Workers(str(tmp_path)) as c:
            assert b.rank == 0 and c.rank == 1
    # A leaves while B runs: C takes 0
    a = _Workers(str(tmp_path)).__enter__()
    b = _Workers(str(tmp_path)).__enter__()
    a.__exit__(None, None, None)
    with _Workers(str(tmp_path)) as c:
        assert (b.rank, c.rank) == (1, 0) and not c.alone
    b.__exit__(None, None, None)


def test_worker_seeds_differ_by_completed_count_and_rank_and_are_deterministic():
    seeds = {OptunaSearch.worker_seed(5, n, r) for n in (0, 3, 10) for r in (0, 1, 2)}
    assert len(seeds) == 9
    assert OptunaSearch.worker_seed(5, 3, 1) == OptunaSearch.worker_seed(5, 3, 1)
    assert OptunaSearch.worker_seed(5, 3, 1) != OptunaSearch.worker_seed(6, 3, 1)


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import nas.evaluator as ev
from nas.run import run_search
real, n = ev.HeldoutEvaluator.__call__, [0]
def call(self, c):
    if choice_key(c) not in self.cache:
        n[0] += 1
        if n[0] == {at}:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-trial, as kill -9 does
    return real(self, c)
from nas.evaluator import choice_key
ev.HeldoutEvaluator.__call__ = call
run_search({sn!r}, {tab!r}, 4.0, {out!r}, strategy="optuna", trials=10, sampler={sampler!r}, eval_images=16,
           progress=False, verify="off")
"""


@pytest.mark.parametrize("sampler,at", [("nsga2", 2), ("nsga2", 7), ("tpe", 6)])
def test_an_optuna_search_killed_mid_trial_resumes_to_the_uninterrupted_result(supernet_run, table_path, tmp_path,
                                                                               sampler, at):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    kw = dict(strategy="optuna", trials=10, sampler=sampler, eval_images=16, progress=False, verify="off")
    ref = run_search(supernet_run, table_path, 4.0, str(tmp_path / "ref"), **kw)
    out = str(tmp_path / "killed")
    p = subprocess.run([sys.executable, "-c", KILLER.format(root=root, at=at, sn=supernet_run, tab=table_path,
                                                            out=out, sampler=sampler)], cwd=root)
    assert p.returncode == -9  # it was killed, leaving a trial RUNNING
    rep = run_search(supernet_run, table_path, 4.0, out, **kw)
    for k in ("choice", "predicted_ms", "accuracy"):
        assert rep.get(k) == ref.get(k), k
    params = lambda d: [t.params for t in optuna.load_study(  # noqa: E731
        study_name="vitslim-search", storage=OptunaSearch(run_args={})._storage(
            SearchContext(None, None, None, None, None, 1.0, log_dir=d))).trials
        if t.state == optuna.trial.TrialState.COMPLETE]
    assert params(out) == params(str(tmp_path / "ref"))


def test_a_second_worker_does_not_repeat_the_first(supernet_run, table_path, tmp_path):
    """Two workers on one study (the second joining while the first is alive): distinct parameters."""
    out = str(tmp_path / "o")
    os.makedirs(out)
    import socket
    host = socket.gethostname().replace("-", "_")
    first = os.path.join(out, ".workers", f"{host}-{os.getppid()}-1")  # a live worker holding the study
    os.makedirs(os.path.dirname(first))
    open(first, "w").close()
    args = {"supernet": "s", "table": "t"}
    OptunaSearch(n_trials=6, sampler="tpe", run_args=args).search(context(supernet_run, table_path, out, 4.0))
    solo = str(tmp_path / "solo")
    os.makedirs(solo)
    OptunaSearch(n_trials=6, sampler="tpe", run_args=args).search(context(supernet_run, table_path, solo, 4.0))
    study = lambda d: optuna.load_study(study_name="vitslim-search", storage=OptunaSearch(  # noqa: E731
        run_args=args)._storage(SearchContext(None, None, None, None, None, 1.0, log_dir=d)))
    a = [t.params for t in study(solo).trials if not t.user_attrs.get("warm_start")]
    b = [t.params for t in study(out).trials if not t.user_attrs.get("warm_start")]
    assert a and b and a != b  # rank 1 draws another sequence than rank 0 would


def test_trials_left_running_by_a_killed_worker_are_failed(supernet_run, table_path, tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    args = {"supernet": "s", "table": "t"}
    s = OptunaSearch(n_trials=3, run_args=args)
    ctx = context(supernet_run, table_path, out, 4.0)
    study = s.study(ctx)
    t = study.ask()  # a worker took a trial and was killed (kill -9) before telling
    assert study.trials[-1].state == optuna.trial.TrialState.RUNNING
    res = s.search(ctx)
    states = [tr.state for tr in s.study(ctx).trials]
    assert states[t.number] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3 and res.extra["trials"] == 3


def test_warm_start_puts_the_first_trials_near_a_tight_target(supernet_run, table_path, tmp_path):
    ctx = context(supernet_run, table_path, None, 1.0)
    fastest = ctx.latency(fastest_choice(ctx))
    target = fastest * 1.15  # tight: a few percent of the space is under it
    ctx = context(supernet_run, table_path, str(tmp_path), target)
    s = OptunaSearch(n_trials=8, run_args={"supernet": "s"})
    warm = s.warm_start(ctx)
    assert len(warm) == 2 and all(ctx.latency(c) <= target for c in warm)
    res = s.search(ctx)
    assert res.predicted_ms <= target
    enc = FlatEncoding(ctx.space)
    first = [t for t in s.study(ctx).trials if t.user_attrs.get("warm_start")]
    assert [enc.decode(t.params) for t in first] == warm


def test_a_finished_study_continues_when_asked_for_more_trials(supernet_run, table_path, tmp_path):
    out = str(tmp_path / "o")
    kw = dict(strategy="optuna", eval_images=16, progress=False, verify="off")
    rep = run_search(supernet_run, table_path, 4.0, out, trials=4, **kw)
    assert rep["search"]["trials"] == 4 and "study.journal" in rep["files"]
    rep = run_search(supernet_run, table_path, 4.0, out, trials=7, **kw)
    assert rep["search"]["trials"] == 7
    with pytest.raises(SearchError, match="already holds a finished search run"):  # no more asked: refused
        run_search(supernet_run, table_path, 4.0, out, trials=7, **kw)


def test_a_journal_lock_left_by_a_killed_worker_does_not_stall_the_next_run(supernet_run, table_path, tmp_path,
                                                                              monkeypatch):
    import optuna.storages.journal._file as journal_file
    out = tmp_path / "o"
    out.mkdir()
    os.symlink(str(out / "gone"), str(out / "study.journal.lock"))  # what a kill -9 mid-write leaves

    def no_waiting(seconds):
        raise AssertionError("waited on a stale journal lock")

    monkeypatch.setattr(journal_file.time, "sleep", no_waiting)
    rep = run_search(supernet_run, table_path, 4.0, str(out), strategy="optuna", trials=3, eval_images=16,
                     progress=False, verify="off")
    assert rep["search"]["trials"] == 3 and not os.path.lexists(out / "study.journal.lock")


def test_an_interrupted_search_of_another_strategy_or_storage_is_not_silently_left_behind(supernet_run, table_path,
                                                                                          tmp_path):
    out = str(tmp_path / "o")
    os.makedirs(out)
    with open(os.path.join(out, "trajectory.jsonl"), "w") as f:
        f.write('{"type": "header"}\n')  # an interrupted slim search
    kw = dict(eval_images=16, progress=False, verify="off")
    with pytest.raises(SearchError, match=r"holds an interrupted slim search \(--strategy slim\) \(trajectory.jsonl\)"):
        run_search(supernet_run, table_path, 4.0, out, strategy="optuna", trials=3, **kw)
    os.remove(os.path.join(out, "trajectory.jsonl"))
    open(os.path.join(out, "study.journal"), "w").close()
    with pytest.raises(SearchError, match=r"interrupted Optuna search \(--strategy optuna --storage journal\)"):
        run_search(supernet_run, table_path, 4.0, out, strategy="optuna", storage="sqlite", trials=3, **kw)
    rep = run_search(supernet_run, table_path, 4.0, out, strategy="optuna", storage="sqlite", trials=3,
                     overwrite=True, **kw)
    assert rep["search"]["trials"] == 3 and "study.journal" not in os.listdir(out)


def test_a_choice_outside_the_space_is_refused_even_when_its_key_is_cached(supernet_run):
    """choice_key canonicalises widths with int(): 64.9 must not be answered with 64's cached result."""
    from nas.strategy import largest_choice
    from supernet.errors import VitslimError
    model, cfg, _ = load_supernet_run(supernet_run)
    ev, _ = make_evaluator(model, cfg, eval_images=16)
    good = largest_choice(model)
    ev(good)
    bad = {"widths": list(good["widths"]), "blocks": good["blocks"]}
    bad["widths"][-1] = bad["widths"][-1] + 0.9
    with pytest.raises(VitslimError, match=r"choice.widths\[%d\]: got %s" % (len(bad["widths"]) - 1, bad["widths"][-1])):
        ev(bad)
    assert ev.evaluations == 1


def test_a_run_resumed_from_a_complete_log_reports_no_overhead_figure(supernet_run, table_path, tmp_path, capsys):
    """A search killed after its last evaluation (before report.json) re-ran nothing, and reported "28
    evaluations in 0.0 s (overhead 100.00% beside evaluation)": the time was this process's, the count the run's."""
    from vitslim.cmd_search import _print_report
    out = str(tmp_path / "o")
    ref = run_search(supernet_run, table_path, 4.0, out, eval_images=16, progress=False, verify="off")
    assert 0 <= ref["search"]["overhead_fraction"] < 1
    for f in ("report.json", "arch.yaml", "model.pt"):
        os.remove(os.path.join(out, f))
    rep = run_search(supernet_run, table_path, 4.0, out, eval_images=16, progress=False, verify="off")
    assert rep["choice"] == ref["choice"] and rep["evaluation"]["evaluated_this_run"] == 0
    assert rep["search"]["overhead_fraction"] is None
    _print_report(rep, out)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "evaluations" in ln][0]
    assert line.strip() == f"{ref['evaluation']['evaluations']} evaluations, all read back from the log of the interrupted run"


def test_a_search_leaves_the_callers_random_state_alone(supernet_run, table_path, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rep = run_search(supernet_run, table_path, 4.0, str(tmp_path / "o"), eval_images=16, progress=False, verify="off")
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)   # and the search's own result does not depend on it
    again = run_search(supernet_run, table_path, 4.0, str(tmp_path / "o2"), eval_images=16, progress=False, verify="off")
    assert again["choice"] == rep["choice"] and again["accuracy"] == rep["accuracy"]


DEEP = "[" * 100_000 + "]" * 100_000  # a few hundred kB that json can only read by recursing 100 000 deep


def test_run_dir_json_nested_past_the_recursion_limit_is_a_one_line_error(tmp_path):
    """report.json, verify.json and trajectory.jsonl of a --out from elsewhere: json raised RecursionError (a
    traceback) where any other unreadable content is named in one line."""
    from nas.run import _search_report
    from nas.slimming import TrajectoryLog
    from nas.verify import Verifier
    (tmp_path / "report.json").write_text(DEEP)
    with pytest.raises(SearchError, match="holds a report.json that is not a search run's"):
        _search_report(str(tmp_path))
    (tmp_path / "verify.json").write_text(DEEP)
    with pytest.raises(SearchError, match="verify.json: not a verification log"):
        Verifier(table=None, path=str(tmp_path / "verify.json"))
    (tmp_path / "trajectory.jsonl").write_text(DEEP + "\n" + json.dumps({"step": 1}) + "\n")
    with pytest.raises(SearchError, match="trajectory.jsonl: line 1 is not JSON"):
        TrajectoryLog(str(tmp_path / "trajectory.jsonl")).read()


def test_a_deep_importance_json_falls_back_on_the_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "importance.json").write_text(DEEP)
    assert main(["supernet", "show", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "no checkpoint.pt" in err and len(err.strip().splitlines()) == 1, err
