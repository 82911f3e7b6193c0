"""Refinement after slimming (`--refine N`): N more evaluations, each a network one or two moves from
the current best that meets the target and that the regression ranks first; the result is the best
of the path and them; deterministic, resumable from its log, refused for other strategies."""
import json
import os

import numpy as np
import pytest

from latency_tables import LatencyTable
from nas.evaluator import choice_key
from nas.run import load_supernet_run, run_search
from nas.slimming import LatencySlimming
from nas.strategy import SearchError

import importlib.util
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("nas_test_slimming", os.path.join(_here, "test_slimming.py"))
_ts = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("nas_test_slimming", _ts)
_spec.loader.exec_module(_ts)
read_log, start_ms = _ts.read_log, _ts.start_ms


@pytest.fixture(scope="module")
def refined(supernet_run, table_path, tmp_path_factory):
    target = 0.5 * start_ms(supernet_run, table_path)
    plain = str(tmp_path_factory.mktemp("plain") / "run")
    out = str(tmp_path_factory.mktemp("refine") / "run")
    r0 = run_search(supernet_run, table_path, target, plain, eval_images=16, progress=False)
    r1 = run_search(supernet_run, table_path, target, out, eval_images=16, progress=False, refine=6)
    return plain, r0, out, r1, target


def _dist(space, a, b) -> int:
    """Moves between two choices (positions changed + width steps)."""
    d = sum(x != y for bl_a, bl_b in zip(a["blocks"], b["blocks"]) for x, y in zip(bl_a, bl_b))
    return d + sum(abs(x - y) // space.width_step for x, y in zip(a["widths"], b["widths"]))


def test_refinement_spends_its_evaluations_near_the_best_and_keeps_the_best(refined, supernet_run):
    plain, r0, out, r1, target = refined
    space = load_supernet_run(supernet_run)[0].space
    log = read_log(out)
    path = [r for r in log if r["type"] in ("start", "step")]
    assert [{k: v for k, v in r.items()} for r in path] == [r for r in read_log(plain) if r["type"] in ("start", "step")]
    ref = [r for r in log if r["type"] == "refine"]
    assert [r["n"] for r in ref] == list(range(1, 7))
    seen = {choice_key(r["choice"]) for r in path} | {choice_key(c["choice"]) for r in path for c in r.get("candidates", ())}
    centre = {"choice": r0["choice"], "acc": r0["accuracy"], "loss": r0["heldout_loss"]}
    for r in ref:
        assert r["predicted_ms"] <= target
        assert choice_key(r["choice"]) not in seen  # never evaluates a network twice
        assert 1 <= _dist(space, r["choice"], centre["choice"]) <= 2
        seen.add(choice_key(r["choice"]))
        if (r["acc"], -r["loss"]) > (centre["acc"], -centre["loss"]):
            centre = r
    assert r1["choice"] == centre["choice"] and r1["accuracy"] == centre["acc"]
    assert r1["accuracy"] >= r0["accuracy"] and r1["predicted_ms"] <= target
    assert r1["evaluation"]["evaluations"] == r0["evaluation"]["evaluations"] + 6
    assert r1["search"]["refine"] == 6 and r1["search"]["path_pick"] == r0["search"]["picked"]
    # the log's last line is the network returned, so replaying the log gives the report's network
    last = log[-1]
    assert last["type"] == "result" and [r["type"] for r in log].count("result") == 1
    assert (last["choice"], last["acc"], last["picked"]) == (r1["choice"], r1["accuracy"], r1["search"]["picked"])
    assert last["predicted_ms"] == pytest.approx(r1["predicted_ms"], rel=1e-9)


def test_the_trajectory_plot_shows_refinement_and_the_network_returned(supernet_run, table_path, tmp_path,
                                                                         monkeypatch):
    import nas.run
    seen = {}

    def spy(traj, target_ms, path, refined=None, chosen=None, **kw):
        seen.update(traj=traj, refined=refined, chosen=chosen, **kw)
        return False
    monkeypatch.setattr(nas.run, "plot_trajectory", spy)
    target = 0.5 * start_ms(supernet_run, table_path)
    rep = run_search(supernet_run, table_path, target, str(tmp_path / "r"), eval_images=16, progress=False, refine=4)
    refs = [r for r in read_log(str(tmp_path / "r")) if r["type"] == "refine"]
    assert [(r["predicted_ms"], r["acc"]) for r in refs] == [(r["predicted_ms"], r["acc"]) for r in seen["refined"]]
    assert seen["chosen"] == (rep["predicted_ms"], rep["accuracy"], rep["search"]["picked"])
    assert seen["bound_ms"] == rep["bound_ms"] and seen["width_step"] == load_supernet_run(supernet_run)[0].space.width_step
    assert seen["measured_ms"] is None and rep["measured_ms"] is None  # the test table's device: not measurable here
    # measured by verification (a stand-in device 2% slower than the table): the plot gets what the report says
    rep = run_search(supernet_run, table_path, target, str(tmp_path / "m"), eval_images=16, progress=False, refine=4,
                     measure=lambda arch: {"ms": 1.02 * LatencyTable.load(table_path).predict(arch)})
    assert rep["measured_ms"] is not None and seen["measured_ms"] == rep["measured_ms"]


def test_each_refinement_takes_the_candidate_the_regression_ranks_first(refined, supernet_run, table_path):
    """Replays the ranking from the log: the regression fitted on every network evaluated before it."""
    plain, r0, out, r1, target = refined
    model, _, _ = load_supernet_run(supernet_run)
    space = model.space
    from nas.run import load_table
    _, compiled = load_table(table_path, space)
    s = LatencySlimming(refine=6)
    log = read_log(out)
    data = [r for r in log if r["type"] in ("start", "step")]
    data += [c for r in log if r["type"] == "step" for c in r["candidates"]]
    centre = {"choice": r0["choice"], "acc": r0["accuracy"], "loss": r0["heldout_loss"]}
    for r in (x for x in log if x["type"] == "refine"):
        fit = s._surrogate(np.stack([s.features(space, d["choice"]) for d in data]), np.array([d["acc"] for d in data]))
        seen = {choice_key(d["choice"]) for d in data}
        pool = {}
        for _, c1 in s.moves(space, centre["choice"]):
            for c in [c1] + [c2 for _, c2 in s.moves(space, c1)]:
                if choice_key(c) not in seen:
                    pool[choice_key(c)] = c
        ms = compiled.score_choices(list(pool.values()))
        best = max(float(fit(s.features(space, c))[0]) for c, m in zip(pool.values(), ms) if m <= target)
        assert float(fit(s.features(space, r["choice"]))[0]) == pytest.approx(best)
        assert r["surrogate"] == pytest.approx(best)
        data.append(r)
        if (r["acc"], -r["loss"]) > (centre["acc"], -centre["loss"]):
            centre = r


def test_the_regression_fits_what_it_was_given(supernet_run):
    space = load_supernet_run(supernet_run)[0].space
    s = LatencySlimming()
    rng = np.random.default_rng(0)
    import random
    r = random.Random(0)
    choices = [space.sample(r) for _ in range(60)]
    w = rng.normal(size=len(s.features(space, choices[0])))
    data = [{"choice": c, "acc": float(s.features(space, c) @ w), "loss": 0.0} for c in choices]
    fit = s._surrogate(np.stack([s.features(space, d["choice"]) for d in data]), np.array([d["acc"] for d in data]))
    F = np.stack([s.features(space, d["choice"]) for d in data[:10]])
    assert fit(F) == pytest.approx([d["acc"] for d in data[:10]], abs=0.05 * np.abs(w).sum())


def test_moves_are_every_valid_network_one_move_away(supernet_run):
    import copy
    import random
    space = load_supernet_run(supernet_run)[0].space
    rng = random.Random(0)
    for _ in range(100):
        c = space.sample(rng)
        got = {choice_key(m) for _, m in LatencySlimming.moves(space, c)}
        want = set()
        for i, st in enumerate(space.stages):
            for j in range(st.max_depth):
                for t in st.candidates:
                    x = copy.deepcopy(c)
                    x["blocks"][i][j] = t
                    try:
                        want.add(choice_key(space.check_choice(x)))
                    except ValueError:
                        pass
            for d in (-space.width_step, space.width_step):
                x = copy.deepcopy(c)
                x["widths"][i] += d
                try:
                    want.add(choice_key(space.check_choice(x)))
                except ValueError:
                    pass
        want.discard(choice_key(c))
        assert got == want


def test_refinement_resumes_from_its_log(refined, supernet_run, table_path, tmp_path):
    plain, r0, out, r1, target = refined
    part = tmp_path / "part"
    part.mkdir()
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        lines = f.read().splitlines()
    cut = [k for k, line in enumerate(lines) if json.loads(line)["type"] == "refine"][2]
    (part / "trajectory.jsonl").write_text("\n".join(lines[:cut + 1]) + "\n")
    r2 = run_search(supernet_run, table_path, target, str(part), eval_images=16, progress=False, refine=6)
    assert r2["choice"] == r1["choice"] and r2["accuracy"] == r1["accuracy"]
    strip = lambda recs: [{k: v for k, v in r.items() if k != "args"} for r in recs]  # noqa: E731
    assert strip(read_log(str(part)))[:len(lines)] == strip(read_log(out))[:len(lines)]


def test_refinement_after_a_retarget_runs_under_the_tightened_bound(supernet_run, table_path, tmp_path):
    """A device 30% slower than the table: verification tightens the bound, the path continues, and
    refinement runs again around the new result, every pick under the new bound."""
    from latency_tables import LatencyTable
    table = LatencyTable.load(table_path)
    target = 0.6 * start_ms(supernet_run, table_path)
    out = str(tmp_path / "rt")
    rep = run_search(supernet_run, table_path, target, out, eval_images=16, progress=False, refine=3,
                     measure=lambda arch: {"ms": 1.3 * table.predict(arch)})
    log = read_log(out)
    bounds = sorted({r["bound_ms"] for r in log if r["type"] == "refine"}, reverse=True)
    assert len(bounds) >= 2 and bounds[0] == pytest.approx(target)
    for b in bounds:
        ref = [r for r in log if r["type"] == "refine" and r["bound_ms"] == b]
        assert [r["n"] for r in ref] == [1, 2, 3] and all(r["predicted_ms"] <= b for r in ref)
    assert rep["predicted_ms"] <= bounds[-1] + 1e-9
    assert rep["measured_ms"] <= 1.05 * target
    assert len({choice_key(r["choice"]) for r in log if r["type"] == "refine"}) == 3 * len(bounds)
    evaluated = [r for r in log if r["type"] in ("start", "step", "refine")]
    evaluated += [c for r in log if r["type"] == "step" for c in r["candidates"] if c["feasible"]]
    assert rep["accuracy"] == max(r["acc"] for r in evaluated if r["predicted_ms"] <= bounds[-1] + 1e-12)


def test_bad_refine_values(supernet_run, table_path, tmp_path):
    target = 0.5 * start_ms(supernet_run, table_path)
    with pytest.raises(SearchError, match="--refine: got -1"):
        run_search(supernet_run, table_path, target, str(tmp_path / "a"), eval_images=16, progress=False, refine=-1)
    with pytest.raises(SearchError, match="--refine 5: refinement follows slimming"):
        run_search(supernet_run, table_path, target, str(tmp_path / "b"), eval_images=16, progress=False,
                   strategy="random", refine=5)
