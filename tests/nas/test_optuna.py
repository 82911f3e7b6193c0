"""Optuna search: the flat encoding always decodes to a valid Choice and round-trips, a study resumes
from its storage (trials split across two calls add up), and the Pareto front is saved."""
import json
import os
import random

import pytest

from nas.optuna_search import FlatEncoding, pareto_front, pick
from nas.run import run_search
from supernet.space import load_space

import importlib.util as _ilu
import os as _os

# the folder's conftest by path: a bare `import conftest` may find another folder's
_spec = _ilu.spec_from_file_location("nas_conftest", _os.path.join(_os.path.dirname(__file__), "conftest.py"))
_nas = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_nas)
SPACE = _nas.SPACE


def test_every_point_of_the_flat_encoding_decodes_to_a_valid_choice():
    space = load_space(SPACE)
    enc = FlatEncoding(space)
    rng = random.Random(0)
    for _ in range(300):
        p = {n: rng.randrange(lo, hi + 1, s) for n, lo, hi, s in enc.params()}
        c = enc.decode(p)
        assert space.check_choice(c) == c
        assert enc.decode(enc.encode(c)) == c
    for _ in range(100):  # every Choice of the space is reachable
        c = space.sample(rng)
        assert enc.decode(enc.encode(c)) == c


def test_pareto_front_keeps_the_non_dominated():
    rows = [{"acc": 0.5, "ms": 2.0}, {"acc": 0.6, "ms": 3.0}, {"acc": 0.4, "ms": 2.5}, {"acc": 0.6, "ms": 2.9}]
    assert pareto_front(rows) == [0, 3]


def test_pick_takes_the_fastest_of_equally_accurate_trials_and_keeps_it_on_the_feasible_front():
    rows = [{"number": 0, "acc": 0.25, "ms": 1.25, "loss": 2.10, "feasible": True},   # lower loss, slower
            {"number": 1, "acc": 0.25, "ms": 0.71, "loss": 2.11, "feasible": True},   # dominates 0
            {"number": 2, "acc": 0.20, "ms": 0.50, "loss": 2.30, "feasible": True},
            {"number": 3, "acc": 0.40, "ms": 1.95, "loss": 1.90, "feasible": False}]  # over the bound
    best, front = pick(rows)
    assert best["number"] == 1 and front == [1, 2]
    assert best["number"] in front and 3 not in front


def test_more_trials_keep_the_samplers_shape_from_the_studys_start(supernet_run, table_path, tmp_path, monkeypatch):
    """NSGA-II groups trials into generations of population_size, derived from --trials: a study extended from
    8 to 40 trials keeps the population it started with (40 alone would be 10)."""
    import optuna
    from nas.optuna_search import OptunaSearch
    out = str(tmp_path / "opt")
    kw = dict(strategy="optuna", eval_images=16, progress=False, seed=0, verify="off")
    run_search(supernet_run, table_path, 4.0, out, trials=8, **kw)
    used = []
    real = optuna.samplers.NSGAIISampler.__init__

    def spy(self, *a, **k):
        used.append(k.get("population_size"))
        real(self, *a, **k)

    monkeypatch.setattr(optuna.samplers.NSGAIISampler, "__init__", spy)
    assert OptunaSearch(n_trials=40)._population() == 10
    rep = run_search(supernet_run, table_path, 4.0, out, trials=40, **kw)
    assert rep["search"]["trials"] == 40 and used and set(used) == {4}


def test_more_trials_under_another_storage_are_refused(supernet_run, table_path, tmp_path):
    """A finished journal study asked for more trials with --storage sqlite would start an empty study beside it."""
    from nas.strategy import SearchError
    out = str(tmp_path / "opt")
    kw = dict(strategy="optuna", eval_images=16, progress=False, seed=0, verify="off")
    run_search(supernet_run, table_path, 4.0, out, trials=3, storage="journal", **kw)
    with pytest.raises(SearchError, match=r"its study is in study.journal .*re-run with that storage"):
        run_search(supernet_run, table_path, 4.0, out, trials=5, storage="sqlite", **kw)
    assert not os.path.exists(os.path.join(out, "study.db"))
    rep = run_search(supernet_run, table_path, 4.0, out, trials=5, storage="journal", **kw)
    assert rep["search"]["trials"] == 5 and rep["evaluation"]["evaluated_this_run"] <= 2


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_study_resumes_from_its_storage(supernet_run, table_path, tmp_path, storage):
    out = str(tmp_path / "opt")
    kw = dict(strategy="optuna", storage=storage, eval_images=16, progress=False, seed=3)
    target = 4.0
    os.makedirs(out)
    from nas.optuna_search import OptunaSearch
    from nas.run import load_supernet_run, load_table, make_evaluator
    from nas.strategy import SearchContext
    # first worker: 3 trials, then "interrupted" (no report written)
    model, cfg, obj = load_supernet_run(supernet_run)
    tab, comp = load_table(table_path, model.space)
    ev, _ = make_evaluator(model, cfg, eval_images=16)
    ctx = SearchContext(model.space, model, tab, comp, ev, target, seed=3, progress=False, log_dir=out)
    run_args = {"supernet": os.path.abspath(supernet_run), "supernet_step": int(obj["step"]),
                "table": os.path.abspath(table_path), "eval_images": ev.n_images, "bn_batches": 0}
    OptunaSearch(n_trials=3, storage=storage, run_args=run_args).search(ctx)
    rep = run_search(supernet_run, table_path, target, out, trials=7, **kw)
    assert rep["search"]["trials"] == 7
    assert rep["search"]["worker_processes"] == 1 and rep["search"]["workers_seen"] == 1  # both runs: this process
    assert rep["predicted_ms"] <= target
    with open(os.path.join(out, "pareto.json")) as f:
        pj = json.load(f)
    assert len(pj["trials"]) == 7 and pj["pareto"]
    assert os.path.isfile(os.path.join(out, "study.journal" if storage == "journal" else "study.db"))
    best = max((t for t in pj["trials"] if t["feasible"]), key=lambda t: t["acc"])
    assert rep["accuracy"] == best["acc"]
    assert pj["best_trial"] in {t["number"] for t in pj["pareto"]} and all(t["feasible"] for t in pj["pareto"])


def test_a_journal_line_cut_by_a_kill_is_dropped_and_the_study_resumes(supernet_run, table_path, tmp_path):
    """A kill mid-write leaves the journal's last line without its newline. Optuna skips it when reading, but
    the resumed run's first record was appended onto it, and that glued line made every later read fail with
    a JSONDecodeError traceback. A lone worker now cuts the torn tail first; a line damaged in the middle of
    the file is one error naming the file."""
    import optuna
    kw = dict(strategy="optuna", storage="journal", eval_images=16, progress=False, seed=3, verify="off")
    ref = run_search(supernet_run, table_path, 4.0, str(tmp_path / "ref"), trials=6, **kw)
    out = str(tmp_path / "o")
    run_search(supernet_run, table_path, 4.0, out, trials=3, **kw)
    os.remove(os.path.join(out, "report.json"))
    journal = os.path.join(out, "study.journal")
    with open(journal, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 3, "par')   # a record cut by the kill
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    for again in (False, True):   # the resume, then a run that reads its journal back
        if again:
            os.remove(os.path.join(out, "report.json"))
        rep = run_search(supernet_run, table_path, 4.0, out, trials=6, **kw)
        with open(journal, "rb") as f:
            assert all(line.startswith(b"{") and line.endswith(b"}") for line in f.read().splitlines())
    assert rep["choice"] == ref["choice"] and rep["accuracy"] == ref["accuracy"]
    assert optuna.logging.get_verbosity() == optuna.logging.DEBUG   # the caller's level, restored
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_journal_damaged_in_its_middle_is_one_error_naming_it(supernet_run, table_path, tmp_path):
    from nas.strategy import SearchError
    kw = dict(strategy="optuna", storage="journal", eval_images=16, progress=False, seed=3, verify="off")
    out = str(tmp_path / "o")
    run_search(supernet_run, table_path, 4.0, out, trials=3, **kw)
    os.remove(os.path.join(out, "report.json"))
    journal = os.path.join(out, "study.journal")
    with open(journal, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines[2] = lines[2][:10] + lines[3]   # a record glued onto a cut one, as the old resume left it
    with open(journal, "wb") as f:
        f.write(b"".join(lines))
    with pytest.raises(SearchError, match=r"study.journal: a damaged journal line"):
        run_search(supernet_run, table_path, 4.0, out, trials=6, **kw)


def test_the_journal_is_synced_once_a_trial_not_once_a_record(supernet_run, table_path, tmp_path, monkeypatch):
    """Optuna's journal fsyncs every record, and a trial writes one per parameter of the flat encoding: most of
    Optuna's overhead (0.25 s a trial at L1 scale). Records are written unsynced and the journal synced once a
    trial; what a killed process wrote is in the file either way (the OS holds it)."""
    import optuna
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    out = tmp_path / "o"
    run_search(supernet_run, table_path, 4.0, str(out), strategy="optuna", trials=6, eval_images=16, progress=False,
               verify="off")
    study = optuna.load_study(study_name="vitslim-search",
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    params = len(FlatEncoding(load_space(SPACE)).params())
    assert len(done) == 6 and all(len(t.params) == params for t in done)
    assert len(synced) <= 6 * 4 < 6 * params, len(synced)  # one a trial (plus the run's own files), not one a record


def test_the_journal_works_on_windows_without_the_symlink_privilege(tmp_path, monkeypatch):
    """Optuna's default journal lock is a symlink, which Windows lets only administrators (or Developer Mode) make:
    `search --strategy optuna` failed there at its first record with WinError 1314 (optuna/optuna#4298). On Windows
    the journal takes Optuna's O_EXCL file lock instead (emulated here: sys.platform win32, os.symlink refused)."""
    import errno

    import optuna

    from nas.optuna_search import _journal_backend

    def no_symlink(*a, **k):
        raise OSError(errno.EINVAL, "A required privilege is not held by the client")

    monkeypatch.setattr(os, "symlink", no_symlink)
    path = str(tmp_path / "study.journal")
    with monkeypatch.context() as m:
        m.setattr("sys.platform", "win32")
        backend = _journal_backend(path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="s", storage=optuna.storages.JournalStorage(backend))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(study.trials) == 2 and not os.path.exists(path + ".lock")


def test_the_sampler_re_seeded_every_trial_keeps_its_search_space_cache(supernet_run, table_path, tmp_path,
                                                                        monkeypatch):
    """The sampler is made anew before every trial (re-seeded); its IntersectionSearchSpace must come along, so
    that each trial reads only the trials finished since the last one. A fresh one read every trial of the
    study again: O(n) a trial, O(n^2) a study (3x the whole run's time at 2,000 trials of the tiny space).
    Handing the cache over changes no draw."""
    import optuna
    from optuna.search_space import intersection
    import nas.optuna_search as osm
    real = intersection._calculate
    visited = []

    def spy(trials, include_pruned=False, search_space=None, cached_trial_number=-1):
        visited.append(sum(1 for t in trials if t.number >= cached_trial_number))
        return real(trials, include_pruned, search_space, cached_trial_number)

    monkeypatch.setattr(intersection, "_calculate", spy)
    kw = dict(strategy="optuna", eval_images=16, progress=False, seed=0, verify="off", trials=24)

    def trials(out):
        st = optuna.load_study(study_name=osm.STUDY_NAME, storage=f"sqlite:///{out}/study.db")
        return [(t.params, t.values) for t in st.trials]

    run_search(supernet_run, table_path, 4.0, str(tmp_path / "kept"), storage="sqlite", **kw)
    kept, visited[:] = list(visited), []
    assert len(kept) >= 12  # every trial but the warm starts (enqueued: nothing to infer)
    assert sum(kept) <= 3 * 24, kept  # each trial once, and the running one again
    monkeypatch.setattr(osm, "_keep_search_space", lambda sampler, previous: None)  # what a fresh cache reads
    run_search(supernet_run, table_path, 4.0, str(tmp_path / "fresh"), storage="sqlite", **kw)
    assert sum(visited) > 5 * 24, visited
    assert trials(tmp_path / "kept") == trials(tmp_path / "fresh")


def test_the_search_reads_the_study_without_deep_copying_it(supernet_run, table_path, tmp_path, monkeypatch):
    """`study.trials` deep-copies every trial of the study (1.4 s at 1,700 trials of the L1 space, twice a run):
    the search only reads them, without a copy, and finds what it found with one."""
    from optuna.study import Study
    copies = []
    real = Study.get_trials

    def spy(self, deepcopy=True, states=None):
        copies.append(deepcopy)
        return real(self, deepcopy=deepcopy, states=states)

    kw = dict(strategy="optuna", eval_images=16, progress=False, seed=0, verify="off", trials=8)
    monkeypatch.setattr(Study, "get_trials", spy)
    rep = run_search(supernet_run, table_path, 4.0, str(tmp_path / "a"), **kw)
    assert copies and not any(copies)
    run_search(supernet_run, table_path, 4.0, str(tmp_path / "a"), **{**kw, "trials": 12})  # resumed: primed, no copy
    assert not any(copies)
    with open(tmp_path / "a" / "pareto.json") as f:
        assert len(json.load(f)["trials"]) == 12 and rep["choice"]


def small_space():
    """Stage kinds: meta4d or identity; meta4d alone; meta3d or identity; both block types and identity."""
    def st(depth, cands, lo=16, hi=32):
        return {"max_depth": depth, "max_width": hi, "min_width": lo, "candidates": cands}
    return load_space({"version": 1, "family": "efficientformer", "input_size": 64, "num_classes": 4, "width_step": 16,
                       "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 8},
                       "stages": [st(1, ["meta4d", "identity"]), st(1, ["meta4d"], 32, 32),
                                  st(2, ["meta3d", "identity"], 16, 48), st(3, ["meta4d", "meta3d", "identity"])]})


def test_the_flat_encoding_is_a_bijection_onto_every_choice_of_a_small_space():
    """Brute force: every valid Choice (all width and block-type combinations the space accepts) encodes to
    values inside the declared ranges, on their steps, and decodes back to itself; decoding every point of
    the parameter grid gives exactly those Choices, with min(n3d, running blocks) of the last running
    blocks meta3d where both block types are candidates."""
    import itertools
    from supernet.errors import VitslimError
    space = small_space()
    enc = FlatEncoding(space)
    per_stage = []
    for i, st in enumerate(space.stages):
        per_stage.append([(w, list(bl)) for w in space.widths(i)
                          for bl in itertools.product(st.candidates, repeat=st.max_depth)])
    valid = []
    for combo in itertools.product(*per_stage):
        c = {"widths": [w for w, _ in combo], "blocks": [bl for _, bl in combo]}
        try:
            space.check_choice(c)
        except VitslimError:
            continue
        valid.append(c)
    # widths x block lists per stage: 2x2, 1x1, 3x4, 2x20 (k of 3 positions running, C(3, k) ways, then k + 1
    # places for the 4D-to-3D switch: 1 + 6 + 9 + 4)
    assert len(valid) == (2 * 2) * 1 * (3 * 4) * (2 * 20)
    ranges = {n: (lo, hi, s) for n, lo, hi, s in enc.params()}
    for c in valid:
        p = enc.encode(c)
        assert set(p) == set(ranges)
        for n, v in p.items():
            lo, hi, s = ranges[n]
            assert lo <= v <= hi and (v - lo) % s == 0, (n, v, ranges[n])
        assert enc.decode(p) == c
    names = list(ranges)
    decoded = []
    for vals in itertools.product(*[range(lo, hi + 1, s) for lo, hi, s in ranges.values()]):
        p = dict(zip(names, vals))
        c = enc.decode(p)
        decoded.append(c)
        running = [t for t in c["blocks"][3] if t != "identity"]
        assert sum(t == "meta3d" for t in running) == min(p["s3_n3d"], len(running))
        assert c["blocks"][2] == ["meta3d" if p[f"s2_b{j}"] else "identity" for j in range(2)]
        assert c["blocks"][1] == ["meta4d"]
    key = lambda c: json.dumps(c, sort_keys=True)  # noqa: E731
    assert {key(c) for c in decoded} == {key(c) for c in valid}


def test_pick_breaks_a_tie_on_accuracy_and_latency_by_the_lower_loss():
    rows = [{"number": 0, "acc": 0.5, "ms": 1.0, "loss": 2.0, "feasible": True},
            {"number": 1, "acc": 0.5, "ms": 1.0, "loss": 1.5, "feasible": True},
            {"number": 2, "acc": 0.5, "ms": 1.0, "loss": 1.8, "feasible": True}]
    best, front = pick(rows)
    assert best["number"] == 1 and front == [0, 1, 2]  # equal on both objectives: none dominates another


def test_a_trial_exactly_at_the_bound_meets_it_and_the_constraint_is_latency_minus_bound(tmp_path):
    """Fake latency (multiples of 0.25 ms: exact) with the bound set to the fastest network's latency: that one
    network meets it, exactly; the warm start enqueues it, so the search must take it. Every trial's constraint
    (Optuna's and the user attribute) is its latency minus the bound: <= 0 exactly for feasible trials."""
    import optuna
    from nas.optuna_search import OptunaSearch
    from nas_fakes import fake_ctx

    def ms(c):
        return sum((b[0] != "identity") + 0.25 * w / 16 for w, b in zip(c["widths"], c["blocks"]))

    ctx = fake_ctx(ms, lambda c: {"acc": 0.1 * ms(c), "loss": 1.0}, 1.0, log_dir=str(tmp_path), supernet=False)
    res = OptunaSearch(n_trials=4, run_args={"t": 1}).search(ctx)
    assert res.predicted_ms == 1.0 and res.choice == {"widths": [16] * 4, "blocks": [["identity"]] * 4}
    study = optuna.load_study(study_name="vitslim-search", storage=OptunaSearch()._storage(ctx))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    for t in done:
        if hasattr(optuna.trial.Trial, "set_constraint"):  # Optuna >= 5: Trial.set_constraint("latency", ...)
            native = [v for k, v in t.system_attrs.items() if k.endswith(":latency")]
        else:  # Optuna 4: the samplers' constraints_func, whose values Optuna stores under "constraints"
            native = t.system_attrs["constraints"]
        assert native == [t.values[1] - 1.0] and t.user_attrs["constraint"] == [t.values[1] - 1.0]


def test_the_journal_is_synced_through_a_handle_windows_can_flush(tmp_path, monkeypatch):
    """The journal's once-a-trial fsync opens the file read-only on POSIX (enough there) and for writing on Windows,
    whose FlushFileBuffers fails on a read-only handle (the failure, suppressed, would have left it unsynced)."""
    import sys
    import nas.optuna_search as osm
    p = tmp_path / "study.journal"
    p.write_text("{}\n")
    opened, synced = [], []
    real_open, real_fsync = os.open, os.fsync
    monkeypatch.setattr(osm.os, "open", lambda path, flags, *a: opened.append(flags) or real_open(path, flags, *a))
    monkeypatch.setattr(osm.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    osm._fsync_file(str(p))
    monkeypatch.setattr(sys, "platform", "win32")
    osm._fsync_file(str(p))
    assert opened[0] & (os.O_WRONLY | os.O_RDWR) == 0 and opened[1] & os.O_RDWR and len(synced) == 2
    assert p.read_text() == "{}\n"


def _open_files_under(folder):
    fds = "/proc/self/fd"
    names = []
    for fd in os.listdir(fds):
        try:
            names.append(os.readlink(os.path.join(fds, fd)))
        except OSError:  # closed meanwhile (the listing's own fd)
            pass
    return [n for n in names if n.startswith(str(folder))]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through Linux's /proc")
def test_sqlite_study_holds_no_open_file_after_the_search(supernet_run, table_path, tmp_path):
    """SQLAlchemy pools the study's connection until its engine is disposed: a program running searches in a loop
    held one open database per search (and Python 3.13 warns of each at exit)."""
    from nas.optuna_search import OptunaSearch
    from nas.run import load_supernet_run, load_table, make_evaluator
    from nas.strategy import SearchContext
    model, cfg, obj = load_supernet_run(supernet_run)
    tab, comp = load_table(table_path, model.space)
    ev, _ = make_evaluator(model, cfg, eval_images=16)
    for name in ("a", "b"):
        out = tmp_path / name
        out.mkdir()
        ctx = SearchContext(model.space, model, tab, comp, ev, 4.0, seed=3, progress=False, log_dir=str(out))
        res = OptunaSearch(n_trials=2, storage="sqlite", run_args={"supernet": "x"}).search(ctx)
        assert res.choice is not None and os.path.isfile(out / "study.db")
    assert _open_files_under(tmp_path) == []


def test_a_study_of_an_earlier_vitslim_is_continued_with_a_warning_and_a_newer_ones_refused(supernet_run, table_path,
                                                                                          tmp_path):
    """Studies record their version (vitslim_study): one without it (written before there was one, trials drawn
    without per-trial seeding) goes on with a one-line warning; one of a newer version is refused, untouched."""
    import sqlite3
    import optuna
    from nas.optuna_search import STUDY_NAME, STUDY_VERSION
    from nas.strategy import SearchError
    out = str(tmp_path / "opt")
    kw = dict(strategy="optuna", storage="sqlite", eval_images=16, progress=False, seed=3)
    run_search(supernet_run, table_path, 4.0, out, trials=2, **kw)
    url = f"sqlite:///{os.path.join(out, 'study.db')}"
    assert optuna.load_study(study_name=STUDY_NAME, storage=url).user_attrs["vitslim_study"] == STUDY_VERSION
    with sqlite3.connect(os.path.join(out, "study.db")) as db:  # as an earlier vitslim left it
        db.execute("DELETE FROM study_user_attributes WHERE key = 'vitslim_study'")
    os.remove(os.path.join(out, "report.json"))
    with pytest.warns(UserWarning, match=r"earlier vitslim \(no study version\): its 2 trial\(s\) are kept"):
        rep = run_search(supernet_run, table_path, 4.0, out, trials=3, **kw)
    assert rep["search"]["trials"] == 3
    study = optuna.load_study(study_name=STUDY_NAME, storage=url)
    assert study.user_attrs["vitslim_study"] == STUDY_VERSION
    study.set_user_attr("vitslim_study", STUDY_VERSION + 1)
    os.remove(os.path.join(out, "report.json"))
    with pytest.raises(SearchError, match=rf"newer vitslim \(study version {STUDY_VERSION + 1}, expected"):
        run_search(supernet_run, table_path, 4.0, out, trials=4, **kw)
    assert len(optuna.load_study(study_name=STUDY_NAME, storage=url).trials) == 3
