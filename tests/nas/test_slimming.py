"""Latency-driven slimming: meets the target per the table, takes the best drop-per-ms action at every
step (checked on its own log), is deterministic, resumes from a torn log to the same end, and refuses
targets it cannot meet."""
import json
import os
import shutil

import pytest
import torch

import vitslim
from nas.run import load_supernet_run, load_table, run_search
from nas.slimming import ACTIONS
from nas.strategy import SearchError, largest_choice

REPORT_KEYS = {"target_ms", "predicted_ms", "params", "macs", "accuracy", "latency_split", "strategy", "choice"}


def start_ms(supernet_run, table_path):
    model, _, _ = load_supernet_run(supernet_run)
    _, compiled = load_table(table_path, model.space)
    return float(compiled.score_choices([largest_choice(model)])[0])


def read_log(out):
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def slim_run(supernet_run, table_path, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("slim") / "run")
    target = 0.5 * start_ms(supernet_run, table_path)
    rep = run_search(supernet_run, table_path, target, out, eval_images=16, progress=False)
    return out, rep, target


def test_slimming_meets_the_target_on_the_table(slim_run, table_path):
    out, rep, target = slim_run
    assert rep["predicted_ms"] <= target
    from latency_tables import LatencyTable
    arch = vitslim.load_arch(os.path.join(out, "arch.yaml"))
    assert LatencyTable.load(table_path).predict(arch) == pytest.approx(rep["predicted_ms"], rel=1e-6)
    assert REPORT_KEYS <= set(rep)
    assert rep["latency_split"]["total"] == pytest.approx(rep["predicted_ms"], rel=1e-6)


def test_every_step_takes_the_smallest_accuracy_drop_per_ms(slim_run):
    out, rep, target = slim_run
    recs = read_log(out)
    assert [r["type"] for r in recs[:2]] == ["header", "start"] and [r["type"] for r in recs[-2:]] == ["done", "result"]
    assert recs[-1]["choice"] == recs[-2]["choice"] == rep["choice"]  # no refinement: the result is where it stopped
    steps = [r for r in recs if r["type"] == "step"]
    assert len(steps) >= 2
    prev_ms = recs[1]["predicted_ms"]
    for s in steps:
        assert s["action"] in ACTIONS
        ok = [c for c in s["candidates"] if c["feasible"]]
        best = min(ok, key=lambda c: (c["score"], c["loss_per_ms"]))
        assert (s["score"], s["where"], s["action"]) == (best["score"], best["where"], best["action"])
        assert s["predicted_ms"] < prev_ms
        prev_ms = s["predicted_ms"]
    assert steps[-1]["predicted_ms"] <= target < steps[-2]["predicted_ms"]


def test_the_result_is_the_most_accurate_network_evaluated_that_meets_the_target(slim_run):
    """The path's end, or a candidate of an earlier step that already reached the target."""
    out, rep, target = slim_run
    recs = read_log(out)
    steps = [r for r in recs if r["type"] == "step"]
    pool = [steps[-1]] + [c for s in steps for c in s["candidates"] if c["feasible"] and c["predicted_ms"] <= target]
    assert len(pool) >= 2
    assert rep["accuracy"] == max(c["acc"] for c in pool) and rep["predicted_ms"] <= target
    assert rep["choice"] in [c["choice"] for c in pool] and recs[-1]["choice"] == rep["choice"]


def test_slimming_is_deterministic(slim_run, supernet_run, table_path, tmp_path):
    out, rep, target = slim_run
    again = str(tmp_path / "again")
    run_search(supernet_run, table_path, target, again, eval_images=16, progress=False)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "args"} for r in recs]  # noqa: E731
    assert strip(read_log(again)) == strip(read_log(out))


def test_resume_from_a_torn_log_ends_where_an_uninterrupted_run_does(slim_run, supernet_run, table_path, tmp_path):
    out, rep, target = slim_run
    part = tmp_path / "part"
    part.mkdir()
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        lines = f.read().splitlines()
    steps_at = [k for k, line in enumerate(lines) if json.loads(line)["type"] == "step"]
    # header, start, the first step, then half of the second step's line (killed mid-write)
    kept = lines[:steps_at[0] + 1] + [lines[steps_at[1]][: len(lines[steps_at[1]]) // 2]]
    (part / "trajectory.jsonl").write_text("\n".join(kept))
    rep2 = run_search(supernet_run, table_path, target, str(part), eval_images=16, progress=False)
    assert rep2["choice"] == rep["choice"] and rep2["accuracy"] == rep["accuracy"]
    assert read_log(str(part))[2:] == read_log(out)[2:]


def test_resume_with_other_arguments_is_refused(slim_run, supernet_run, table_path, tmp_path):
    out, rep, target = slim_run
    part = tmp_path / "part"
    part.mkdir()
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        (part / "trajectory.jsonl").write_text("".join(f.readlines()[:3]))
    with pytest.raises(SearchError, match="eval_images: was 16, now 8"):
        run_search(supernet_run, table_path, target, str(part), eval_images=8, progress=False)


def test_unreachable_target_names_the_fastest_network(supernet_run, table_path, tmp_path):
    with pytest.raises(SearchError, match=r"unreachable: the fastest network .* predicted at [0-9.]+ ms"):
        run_search(supernet_run, table_path, 0.01, str(tmp_path / "r"), eval_images=16, progress=False)


@pytest.mark.parametrize("target", [0, -1.5, float("nan")])
def test_zero_or_negative_target_is_refused(supernet_run, table_path, tmp_path, target):
    with pytest.raises(SearchError, match="target-ms: got .*expected a number of milliseconds > 0"):
        run_search(supernet_run, table_path, target, str(tmp_path / "r"), progress=False)


def test_run_directory_loads_and_matches_the_supernet(slim_run, supernet_run):
    out, rep, target = slim_run
    for f in ("arch.yaml", "model.pt", "report.json", "trajectory.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["predicted_ms"] == rep["predicted_ms"]
    model, arch = vitslim.load_checkpoint(os.path.join(out, "model.pt"))
    sn, _, _ = load_supernet_run(supernet_run)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.eval()(x)
        b = sn.eval()(x, mode="fixed", choice=rep["choice"])
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_finished_run_is_refused_unless_overwrite(slim_run, supernet_run, table_path, tmp_path):
    out, rep, target = slim_run
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    with pytest.raises(SearchError, match="already holds a finished search run.*--overwrite"):
        run_search(supernet_run, table_path, target, copy, eval_images=16, progress=False)
    rep2 = run_search(supernet_run, table_path, target, copy, eval_images=16, progress=False, overwrite=True,
                      strategy="uniform")
    assert rep2["strategy"] == "uniform" and not os.path.exists(os.path.join(copy, "trajectory.jsonl"))


def test_baselines_meet_the_target_behind_the_same_interface(supernet_run, table_path, tmp_path):
    target = 0.5 * start_ms(supernet_run, table_path)
    rep = run_search(supernet_run, table_path, target, str(tmp_path / "u"), strategy="uniform", eval_images=16,
                     progress=False)
    assert rep["predicted_ms"] <= target and len(set(rep["choice"]["widths"])) >= 1
    rep = run_search(supernet_run, table_path, target, str(tmp_path / "r"), strategy="random", budget=3,
                     eval_images=16, progress=False)
    assert rep["predicted_ms"] <= target and rep["evaluation"]["evaluations"] == 3


def test_latency_matched_random_search_samples_only_near_the_target(supernet_run, table_path, tmp_path):
    target = 0.5 * start_ms(supernet_run, table_path)
    rep = run_search(supernet_run, table_path, target, str(tmp_path / "r"), strategy="random", budget=3, band=0.1,
                     eval_images=16, progress=False)
    assert 0.9 * target <= rep["predicted_ms"] <= target
    with pytest.raises(SearchError, match="band: got 1.5"):
        run_search(supernet_run, table_path, target, str(tmp_path / "bad"), strategy="random", band=1.5,
                   eval_images=16, progress=False)


def test_loss_criterion_steps_by_loss_increase_per_ms_and_returns_the_lowest_loss(supernet_run, table_path, tmp_path):
    target = 0.5 * start_ms(supernet_run, table_path)
    out = str(tmp_path / "loss")
    rep = run_search(supernet_run, table_path, target, out, eval_images=16, progress=False, criterion="loss")
    steps = [r for r in read_log(out) if r["type"] == "step"]
    for s in steps:
        ok = [c for c in s["candidates"] if c["feasible"]]
        assert s["where"] == min(ok, key=lambda c: (c["loss_per_ms"], c["score"]))["where"]
    pool = [steps[-1]] + [c for s in steps for c in s["candidates"] if c["feasible"] and c["predicted_ms"] <= target]
    assert rep["heldout_loss"] == min(c["loss"] for c in pool) and rep["search"]["criterion"] == "loss"
    with pytest.raises(SearchError, match="--criterion: got 'top5'"):
        run_search(supernet_run, table_path, target, str(tmp_path / "bad"), eval_images=16, progress=False,
                   criterion="top5")


def test_every_action_set_considers_every_position_and_stage(supernet_run, table_path, tmp_path):
    target = 0.5 * start_ms(supernet_run, table_path)
    out = str(tmp_path / "every")
    rep = run_search(supernet_run, table_path, target, out, eval_images=16, progress=False, actions="every")
    log = read_log(out)
    assert log[0]["args"]["actions"] == "every"
    cur = next(r for r in log if r["type"] == "start")["choice"]
    space = load_supernet_run(supernet_run)[0].space
    for s in (r for r in log if r["type"] == "step"):
        idents = {c["where"] for c in s["candidates"] if c["action"] == "to_identity"}
        shrinks = {c["where"] for c in s["candidates"] if c["action"] == "shrink"}
        assert {f"stage{i}.block{j}" for i, st in enumerate(space.stages) if "identity" in st.candidates
                for j, t in enumerate(cur["blocks"][i]) if t != "identity"} <= idents
        assert shrinks == {f"stage{i}" for i, st in enumerate(space.stages)
                           if cur["widths"][i] - space.width_step >= st.min_width}
        ok = [c for c in s["candidates"] if c["feasible"]]
        assert s["score"] == min(c["score"] for c in ok)
        cur = s["choice"]
    assert rep["predicted_ms"] <= target
    with pytest.raises(SearchError, match="--actions: got 'all'"):
        run_search(supernet_run, table_path, target, str(tmp_path / "bad"), eval_images=16, progress=False,
                   actions="all")


def test_an_action_that_is_more_accurate_and_faster_is_never_passed_over():
    """A small held-out split can score a candidate above the current network (a negative drop): the ratio
    drop / ms would then prefer the smallest saving. Fake space, latency and evaluator: removing stage 0's
    block gains 0.02 and saves 1 ms, shrinking stage 0 gains 0.01 and saves 0.01 ms."""
    import numpy as np
    from nas.slimming import LatencySlimming, per_ms
    from nas.strategy import SearchContext
    from supernet.space import SearchSpace
    stage = {"max_depth": 1, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]}
    space = SearchSpace.from_dict({"version": 1, "family": "efficientformer", "input_size": 64, "num_classes": 4,
                                   "width_step": 16, "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 8},
                                   "stages": [stage] * 4})

    def ms(c):
        return sum((b[0] != "identity") + 0.01 * w / 16 for w, b in zip(c["widths"], c["blocks"]))

    class Compiled:
        def score_choices(self, cs):
            return np.array([ms(c) for c in cs])

    class Supernet:
        def probabilities(self):
            return [torch.tensor([[0.9, 0.1]])] * 4

        def importance(self):  # stage 0: the least important position and stage
            return {"metapath": [[1.0], [5.0], [5.0], [5.0]], "stage": [1.0, 5.0, 5.0, 5.0]}
    Supernet.space = space

    class Evaluator:
        evaluations = 0

        def __call__(self, c):
            self.evaluations += 1
            g = 0.02 * sum(b[0] == "identity" for b in c["blocks"]) + 0.01 * sum((32 - w) // 16 for w in c["widths"])
            return {"acc": 0.5 + g, "loss": 1.0 - g}

        def prime(self, *a):
            pass

    start = {"widths": [32] * 4, "blocks": [["meta4d"]] * 4}
    ctx = SearchContext(space=space, supernet=Supernet(), table=None, compiled=Compiled(), evaluator=Evaluator(),
                        target_ms=ms(start) - 0.005, progress=False)
    for criterion in ("acc", "loss"):
        res = LatencySlimming(criterion=criterion).search(ctx)
        assert res.extra["trajectory"][1]["action"] == "to_identity", criterion
    assert per_ms(-0.02, 1.0) < per_ms(-0.01, 0.01) < per_ms(0.0, 5.0) < per_ms(0.01, 5.0) < per_ms(0.01, 1.0)


def test_paper_actions_take_the_least_important_position_and_stage():
    """Action (a) turns the least important position still running a block into identity, (b) the first
    Meta3D in network order into a Meta4D, and (c) shrinks the stage with the least summed importance over
    its running positions among the stages that can still lose `width_step` channels (a hand-made case)."""
    from types import SimpleNamespace
    from nas.slimming import LatencySlimming
    from supernet.space import SearchSpace
    two = {"max_depth": 2, "max_width": 32, "min_width": 16}
    space = SearchSpace.from_dict({"version": 1, "family": "efficientformer", "input_size": 64, "num_classes": 4,
                                   "width_step": 16, "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 8},
                                   "stages": [dict(two, candidates=["meta4d", "identity"])] * 2
                                   + [dict(two, candidates=["meta4d", "meta3d", "identity"])] * 2})
    choice = {"widths": [32, 32, 32, 16],
              "blocks": [["meta4d", "meta4d"], ["meta4d", "identity"], ["meta4d", "meta3d"], ["meta3d", "meta3d"]]}
    # running positions: stage 3 holds the least important (0.2) but is at its minimum width; stage 1's
    # identity position (1.5) does not count, so stage 1 (4.0) sums below stage 0 (5.0) and stage 2 (7.5)
    imp = {"metapath": [[3.0, 2.0], [4.0, 1.5], [1.5, 6.0], [0.2, 0.3]]}
    cands = LatencySlimming.candidates(SimpleNamespace(space=space), choice, imp)
    assert [(a, w) for a, w, _ in cands] == [("to_identity", "stage3.block0"), ("meta3d_to_meta4d", "stage2.block1"),
                                             ("shrink", "stage1")]
    assert cands[0][2]["blocks"][3] == ["identity", "meta3d"]
    assert cands[1][2]["blocks"][2] == ["meta4d", "meta4d"]
    assert cands[2][2]["widths"] == [32, 16, 32, 16]


@pytest.mark.parametrize("criterion", ["acc", "loss"])
def test_the_answer_is_the_best_network_met_on_the_way_ties_going_to_the_slower(criterion):
    """`_final` (hand-made records): of the path's end and the feasible candidates within the bound, the most
    accurate (lowest loss with `criterion` loss); equal on both figures, the slower one (closer to the bound:
    nothing is gained by being faster than asked). Candidates over the bound or infeasible never count."""
    from types import SimpleNamespace
    from nas.slimming import LatencySlimming
    space = SimpleNamespace(check_choice=lambda c: c)
    ctx = SimpleNamespace(space=space)

    def rec(name, acc, loss, ms, feasible=True):
        return {"action": name, "choice": {"name": name}, "acc": acc, "loss": loss, "predicted_ms": ms,
                "feasible": feasible}

    end = rec("end", 0.5, 1.0, 9.0)
    steps = [{"step": 1, "candidates": [rec("fast", 0.6, 0.9, 7.0), rec("slow", 0.6, 0.9, 9.5),
                                        rec("over", 0.9, 0.1, 10.5), rec("void", 0.9, 0.1, 8.0, feasible=False)]}]
    done = LatencySlimming(criterion=criterion)._final(ctx, end, steps, 10.0)
    assert done["choice"] == {"name": "slow"} and done["picked"] == "step1.slow"
    assert done["predicted_ms"] == 9.5 and done["path_end_ms"] == 9.0
