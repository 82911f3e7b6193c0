"""Latency-driven slimming: meets the target per the table, takes the best drop-per-ms action at every
step (checked on its own log), is deterministic, resumes from a torn log to the same end, and refuses
targets it cannot meet."""
import json
import os
import shutil

import pytest
import torch

import nas.run as nas_run
import vitslim
from nas.run import load_supernet_run, load_table, run_search
from nas.slimming import ACTIONS
from nas.strategy import SearchError, largest_choice
from nas_fakes import fake_ctx

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


def test_a_moved_search_resumes_and_a_retrained_supernet_is_refused(slim_run, supernet_run, table_path, tmp_path):
    """The log is keyed on what the supernet and the table hold, not where they are: a search whose supernet, table
    and --out moved together (a cluster job resumed on another node's scratch path) continues, and a supernet
    trained anew in the same folder (same step, other weights) is refused instead of mixing two networks' numbers."""
    out, rep, target = slim_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(supernet_run, moved / "supernet")
    shutil.copy(table_path, moved / "table.yaml")
    part = moved / "search"
    part.mkdir()
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        lines = f.readlines()
    steps_at = [k for k, line in enumerate(lines) if json.loads(line)["type"] == "step"]
    (part / "trajectory.jsonl").write_text("".join(lines[:steps_at[0] + 1]))
    head = json.loads(lines[0])["args"]
    assert head["supernet"] == os.path.abspath(supernet_run) and len(head["supernet_digest"]) == 64
    rep2 = run_search(str(moved / "supernet"), str(moved / "table.yaml"), target, str(part), eval_images=16,
                      progress=False)
    assert (rep2["choice"], rep2["accuracy"]) == (rep["choice"], rep["accuracy"])
    assert rep2["supernet"] == str(moved / "supernet") and read_log(str(part))[2:] == read_log(out)[2:]
    ck = moved / "supernet" / "checkpoint.pt"
    obj = torch.load(ck, weights_only=True)
    name = sorted(obj["model"])[0]
    obj["model"][name] = obj["model"][name] + 0.01
    torch.save(obj, ck)
    again = moved / "again"
    again.mkdir()
    (again / "trajectory.jsonl").write_text("".join(lines[:steps_at[0] + 1]))
    with pytest.raises(SearchError, match="cannot resume .*the arguments differ .*supernet_digest: was '[0-9a-f]{64}'"):
        run_search(str(moved / "supernet"), str(moved / "table.yaml"), target, str(again), eval_images=16,
                   progress=False)


def test_a_log_of_before_the_digests_resumes_by_path(slim_run, supernet_run, table_path, tmp_path):
    """A log an earlier vitslim wrote has the paths and no digests: it is still compared by path (resumes where it
    was, refused elsewhere)."""
    out, rep, target = slim_run
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        lines = f.readlines()
    head = json.loads(lines[0])
    del head["args"]["supernet_digest"], head["args"]["table_digest"]
    steps_at = [k for k, line in enumerate(lines) if json.loads(line)["type"] == "step"]
    part = tmp_path / "part"
    part.mkdir()
    (part / "trajectory.jsonl").write_text(json.dumps(head) + "\n" + "".join(lines[1:steps_at[0] + 1]))
    rep2 = run_search(supernet_run, table_path, target, str(part), eval_images=16, progress=False)
    assert (rep2["choice"], rep2["accuracy"]) == (rep["choice"], rep["accuracy"])
    shutil.copy(table_path, tmp_path / "t.yaml")
    other = tmp_path / "other"
    other.mkdir()
    (other / "trajectory.jsonl").write_text(json.dumps(head) + "\n" + "".join(lines[1:steps_at[0] + 1]))
    with pytest.raises(SearchError, match="the arguments differ .*table: was"):
        run_search(supernet_run, str(tmp_path / "t.yaml"), target, str(other), eval_images=16, progress=False)


@pytest.mark.parametrize("version", [None, 1, 3])
def test_resume_of_a_log_of_another_version_is_refused(slim_run, supernet_run, table_path, tmp_path, version):
    """A log whose steps another version's rules chose (or one without a version) is not continued under these."""
    out, rep, target = slim_run
    part = tmp_path / "part"
    part.mkdir()
    with open(os.path.join(out, "trajectory.jsonl")) as f:
        lines = f.readlines()[:3]
    head = json.loads(lines[0])
    head.pop("version") if version is None else head.update(version=version)
    (part / "trajectory.jsonl").write_text(json.dumps(head) + "\n" + "".join(lines[1:]))
    with pytest.raises(SearchError, match=f"cannot resume .*a slimming log of version {version}, expected 2"):
        run_search(supernet_run, table_path, target, str(part), eval_images=16, progress=False)


def test_a_log_an_earlier_vitslim_wrote_is_refused_not_continued(supernet_run, table_path, tmp_path):
    """tests/data/compat/c02c843/trajectory.jsonl: the first step of a search by commit c02c843, whose rules (step
    scoring, final pick, stage shrink) differ from these though its header said version 1 as these logs did; it
    was continued under these rules (and a finished path's pick recomputed against its own done record)."""
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "compat", "c02c843",
                             "trajectory.jsonl"), part / "trajectory.jsonl")
    target = 0.5 * start_ms(supernet_run, table_path)
    with pytest.raises(SearchError) as e:
        run_search(supernet_run, table_path, target, str(part), eval_images=16, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(part / "trajectory.jsonl") in msg and "version 1, expected 2" in msg
    assert msg.endswith("delete it to search again)")  # also what `vitslim run` needs: it has no --overwrite


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


def test_a_killed_random_search_resumes_from_its_log_to_the_uninterrupted_result(supernet_run, table_path, tmp_path):
    """Each evaluation is logged: a re-run after a kill evaluates only what the log lacks (a long random baseline
    at ImageNet scale re-evaluated every sample) and returns what an uninterrupted run returns."""
    target = 0.5 * start_ms(supernet_run, table_path)
    full = str(tmp_path / "full")
    rep = run_search(supernet_run, table_path, target, full, strategy="random", budget=4, eval_images=16,
                     verify="off", progress=False)
    with open(os.path.join(full, "random.jsonl")) as f:
        lines = f.read().splitlines()
    assert [json.loads(ln)["type"] for ln in lines] == ["header"] + ["eval"] * 4 and "random.jsonl" in rep["files"]
    part = tmp_path / "part"
    part.mkdir()
    (part / "random.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # two logged, one torn
    rep2 = run_search(supernet_run, table_path, target, str(part), strategy="random", budget=4, eval_images=16,
                      verify="off", progress=False)
    assert (rep2["choice"], rep2["accuracy"]) == (rep["choice"], rep["accuracy"])
    assert rep2["evaluation"]["evaluated_this_run"] == 2 and rep2["evaluation"]["evaluations"] == 4
    assert (part / "random.jsonl").read_text().splitlines() == lines
    (part / "report.json").unlink()  # as if killed before the report: other arguments are refused
    with pytest.raises(SearchError, match="cannot resume .*random.jsonl: the arguments differ .*budget: was 4, now 5"):
        run_search(supernet_run, table_path, target, str(part), strategy="random", budget=5, eval_images=16,
                   verify="off", progress=False)


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
    from nas.slimming import LatencySlimming, per_ms

    def ms(c):
        return sum((b[0] != "identity") + 0.01 * w / 16 for w, b in zip(c["widths"], c["blocks"]))

    def score(c):
        g = 0.02 * sum(b[0] == "identity" for b in c["blocks"]) + 0.01 * sum((32 - w) // 16 for w in c["widths"])
        return {"acc": 0.5 + g, "loss": 1.0 - g}

    start = {"widths": [32] * 4, "blocks": [["meta4d"]] * 4}
    ctx = fake_ctx(ms, score, ms(start) - 0.005, importance=(1.0, 5.0, 5.0, 5.0))  # stage 0: the least important
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
    ctx = SimpleNamespace(space=space, latency=lambda c: float(sum(c["widths"])))  # every shrink saves time
    cands = LatencySlimming.candidates(ctx, choice, imp)
    assert [(a, w) for a, w, _ in cands] == [("to_identity", "stage3.block0"), ("meta3d_to_meta4d", "stage2.block1"),
                                             ("shrink", "stage1")]
    assert cands[0][2]["blocks"][3] == ["identity", "meta3d"]
    assert cands[1][2]["blocks"][2] == ["meta4d", "meta4d"]
    assert cands[2][2]["widths"] == [32, 16, 32, 16]
    # stage 1's width priced free: the next least important stage that saves time (stage 0, 5.0) is shrunk
    ctx = SimpleNamespace(space=space, latency=lambda c: float(sum(w for i, w in enumerate(c["widths"]) if i != 1)))
    assert [(a, w) for a, w, _ in LatencySlimming.candidates(ctx, choice, imp)][2] == ("shrink", "stage0")


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


# ------------------------------------------------------------ a hand-made path on fake latency and accuracy
def fake_slim_ctx(log_dir=None, target=5.0, free_width0=False, cheap_wide0=False):
    """Four one-block stages (widths 16 or 32; meta4d or identity). A running block costs 1 ms and every 16
    channels 0.25 ms (binary fractions: sums are exact, so a network can sit exactly on the target).
    `free_width0`: stage 0's width costs nothing; `cheap_wide0`: stage 0 costs 0.25 ms at 16 channels and
    nothing at 32 (a table may say so). Accuracy: 0.9, minus 0.1 per identity, minus 0.01 per 16 channels
    removed (plus 0.01 with `free_width0`). Importance: stage 0 least, stage 3 most. From the start
    (6 ms) the path shrinks stage 0, 1, 2, 3 (0.04 per ms beats 0.1 per ms): 5.75, 5.5, 5.25, 5.0 ms."""
    def width_ms(i, w):
        if i == 0 and free_width0:
            return 0.0
        if i == 0 and cheap_wide0:
            return 0.25 if w == 16 else 0.0
        return 0.25 * w / 16

    def ms(c):
        return sum((b[0] != "identity") + width_ms(i, w) for i, (w, b) in enumerate(zip(c["widths"], c["blocks"])))

    def score(c):
        shrunk = sum((32 - w) // 16 for w in c["widths"])
        acc = 0.9 - 0.1 * sum(b[0] == "identity" for b in c["blocks"]) + (0.01 if free_width0 else -0.01) * shrunk
        return {"acc": acc, "loss": 1.0 - acc}

    return fake_ctx(ms, score, target, log_dir=log_dir), ms


def test_the_path_stops_at_the_first_network_that_meets_the_target_exactly():
    """Predicted == target meets it (`<=`): the path stops after the four shrinks at exactly 5.0 ms, not one step
    later; a target equal to the fastest network's latency is reachable, not refused."""
    from nas.slimming import LatencySlimming
    ctx, ms = fake_slim_ctx(target=5.0)
    res = LatencySlimming().search(ctx)
    assert [t["action"] for t in res.extra["trajectory"]] == ["start"] + ["shrink"] * 4
    assert [t["predicted_ms"] for t in res.extra["trajectory"]] == [6.0, 5.75, 5.5, 5.25, 5.0]
    assert res.extra["steps"] == 4 and res.predicted_ms == 5.0 and res.choice["widths"] == [16] * 4
    ctx, ms = fake_slim_ctx(target=1.0)  # identity everywhere at 16 channels: 4 x 0.25 ms
    res = LatencySlimming().search(ctx)
    assert res.predicted_ms == 1.0 and ms(res.choice) == 1.0


def test_max_steps_allows_exactly_that_many_steps():
    from nas.slimming import LatencySlimming
    with pytest.raises(SearchError, match="3 steps without meeting 5 ms"):
        LatencySlimming(max_steps=3).search(fake_slim_ctx(target=5.0)[0])
    assert LatencySlimming(max_steps=4).search(fake_slim_ctx(target=5.0)[0]).extra["steps"] == 4


def test_resume_from_a_cut_log_continues_from_its_last_step(tmp_path):
    """Cut after step 2 (of 4), the run continues from step 2's network (numbering on from 3) and writes the
    same log and answer as the uninterrupted run; re-run on a finished log, it evaluates nothing, appends
    nothing and returns the same answer (the path's end met the bound exactly: the resume must see that)."""
    from nas.slimming import LatencySlimming
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir()
    cut.mkdir()
    ctx, _ = fake_slim_ctx(str(full))
    res = LatencySlimming().search(ctx)
    lines = (full / "trajectory.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["step"] for r in recs if r["type"] == "step"] == [1, 2, 3, 4]
    n2 = next(k for k, r in enumerate(recs) if r.get("step") == 2)
    (cut / "trajectory.jsonl").write_text("\n".join(x for x in lines[:n2 + 1]
                                                    if json.loads(x)["type"] != "eval") + "\n")
    res2 = LatencySlimming().search(fake_slim_ctx(str(cut))[0])
    keep = lambda p: [r for r in read_log(str(p)) if r["type"] != "eval"]  # noqa: E731
    assert keep(cut) == keep(full)
    assert (res2.choice, res2.predicted_ms, res2.acc, res2.extra) == (res.choice, res.predicted_ms, res.acc, res.extra)
    ctx3, _ = fake_slim_ctx(str(full))
    res3 = LatencySlimming().search(ctx3)
    assert (full / "trajectory.jsonl").read_text().splitlines() == lines and ctx3.evaluator.evaluations == 0
    assert (res3.choice, res3.predicted_ms, res3.acc, res3.extra) == (res.choice, res.predicted_ms, res.acc, res.extra)


def test_an_action_that_saves_no_time_is_never_taken(tmp_path):
    """Stage 0's width costs nothing here and shrinking it even gains accuracy. With every stage's shrink
    considered (`--actions every`), stage 0's saves 0 ms: it is logged infeasible (no score) and never taken."""
    from nas.slimming import LatencySlimming
    ctx, ms = fake_slim_ctx(str(tmp_path), target=4.5, free_width0=True)  # start: 4 blocks + 3 x 0.5 ms = 5.5 ms
    res = LatencySlimming(actions="every").search(ctx)
    steps = [r for r in read_log(str(tmp_path)) if r["type"] == "step"]
    shrink0 = next(c for c in steps[0]["candidates"] if (c["action"], c["where"]) == ("shrink", "stage0"))
    assert shrink0["ms_saved"] == 0.0 and not shrink0["feasible"] and shrink0["score"] is None
    assert all(s["ms_saved"] > 0 for s in steps) and ("shrink", "stage0") not in [(s["action"], s["where"]) for s in steps]
    assert res.predicted_ms <= 4.5 and res.predicted_ms == ms(res.choice)


def test_paper_shrink_takes_the_least_important_stage_whose_shrink_saves_time(tmp_path):
    """The paper's action (c) shrinks the least important stage; where that shrink saves no time (a measured
    table can price a narrower stage as fast or slower), the next least important stage whose shrink does is
    the candidate, instead of a step with no action that saves time. Stage 0 (least important) is free to
    shrink here: stage 1 is shrunk first, then 2 and 3, and the search meets its target."""
    from nas.slimming import LatencySlimming
    ctx, ms = fake_slim_ctx(str(tmp_path), target=4.5, free_width0=True)
    res = LatencySlimming().search(ctx)
    steps = [r for r in read_log(str(tmp_path)) if r["type"] == "step"]
    assert [(c["action"], c["where"]) for c in steps[0]["candidates"]] == [("to_identity", "stage0.block0"),
                                                                            ("shrink", "stage1")]
    assert [(s["action"], s["where"]) for s in steps[:3]] == [("shrink", "stage1"), ("shrink", "stage2"),
                                                              ("shrink", "stage3")]
    assert all(s["ms_saved"] > 0 for s in steps) and res.predicted_ms <= 4.5


def test_the_unreachable_error_names_the_fastest_network_found_by_brute_force():
    """Stage 0 is cheaper at 32 channels than at 16 here: the fastest network (all 256 of the space tried) is
    identity everywhere with stage 0 at 32, 0.75 ms; the error names it and 0.75 ms itself is reachable."""
    import itertools
    from nas.slimming import LatencySlimming
    from nas.strategy import fastest_choice, unreachable
    ctx, ms = fake_slim_ctx(target=0.5, cheap_wide0=True)
    every = [{"widths": list(w), "blocks": [[b] for b in bl]}
             for w in itertools.product([16, 32], repeat=4) for bl in itertools.product(["meta4d", "identity"], repeat=4)]
    best = min(every, key=ms)
    assert ms(best) == 0.75 and sum(ms(c) == 0.75 for c in every) == 1
    assert fastest_choice(ctx) == best
    with pytest.raises(SearchError, match=r"target 0.5 ms is unreachable: .* predicted at 0.75 ms "
                                          r"\(widths \[32, 16, 16, 16\], blocks -/-/-/-\); ask for at least 0.75 ms"):
        LatencySlimming().search(ctx)
    assert unreachable(fake_slim_ctx(target=0.75, cheap_wide0=True)[0]) is None
    assert "unreachable" in unreachable(fake_slim_ctx(target=0.7499, cheap_wide0=True)[0])


def test_random_search_samples_each_network_of_the_latency_band_once_ends_included():
    """Target 5 ms, band 0.1: the networks predicted in [4.5, 5.0] ms, both ends included. Counted by hand on
    the fake latency: three blocks and 6, 7 or 8 sixteenths of width over the stages (C(4,3) x (6 + 4 + 1) =
    44), or four blocks at the minimum widths (5.0 ms): 45. A budget above that draws every one of them once."""
    import itertools
    from nas.evaluator import choice_key
    from nas.random_search import RandomSearch
    ctx, ms = fake_slim_ctx(target=5.0)
    every = [{"widths": list(w), "blocks": [[b] for b in bl]}
             for w in itertools.product([16, 32], repeat=4) for bl in itertools.product(["meta4d", "identity"], repeat=4)]
    band = {choice_key(c) for c in every if 4.5 <= ms(c) <= 5.0}
    assert len(band) == 45
    got = RandomSearch(budget=60, band=0.1, max_draws=20_000).sample_feasible(ctx)
    assert len(got) == 45 and {choice_key(c) for c in got} == band
    got = RandomSearch(budget=10, band=0.1).sample_feasible(ctx)
    assert len(got) == 10 == len({choice_key(c) for c in got}) and {choice_key(c) for c in got} <= band


def test_random_search_spends_its_budget_on_distinct_networks_and_returns_the_most_accurate():
    """`budget` evaluations of distinct networks drawn from ctx.seed (another seed draws others); the answer
    is the most accurate, ties going to the lower loss, then the faster. The fake evaluator's accuracy counts
    running blocks up to two (a plateau: ties) and its loss falls with every identity, so the two figures
    disagree: a choice by loss alone would differ."""
    from nas.evaluator import choice_key
    from nas.random_search import RandomSearch
    ctx, ms = fake_slim_ctx(target=5.0)

    def score(c):
        return {"acc": 0.1 * min(2, sum(b[0] != "identity" for b in c["blocks"])),
                "loss": 1.0 - 0.01 * sum(b[0] == "identity" for b in c["blocks"]) + 0.001 * sum(c["widths"]) / 16}

    class Evaluator:
        evaluations = 0

        def __call__(self, c):
            self.evaluations += 1
            return score(c)
    ctx.evaluator = Evaluator()
    drawn = RandomSearch(budget=20).sample_feasible(ctx)
    res = RandomSearch(budget=20).search(ctx)
    assert ctx.evaluator.evaluations == 20 == res.evaluations == res.extra["sampled"]
    assert len({choice_key(c) for c in drawn}) == 20
    best = min(drawn, key=lambda c: (-score(c)["acc"], score(c)["loss"], ms(c)))
    assert res.choice == best and res.acc == score(best)["acc"] and res.predicted_ms == ms(best)
    assert min(drawn, key=lambda c: (score(c)["loss"], ms(c))) != best  # the case tells the rules apart
    assert sum(score(c)["acc"] == score(best)["acc"] for c in drawn) > 1  # and has a tie on accuracy
    assert RandomSearch(budget=20).sample_feasible(ctx) == drawn
    ctx.seed = 1
    assert RandomSearch(budget=20).sample_feasible(ctx) != drawn


def test_slimming_a_supernet_of_ones_own_loop_with_ones_own_evaluator_function(supernet_run, table_path, tmp_path):
    """A research user's search: a MetaPathSupernet trained by their own loop, their own held-out set and metric as
    a plain function choice -> {"acc", "loss"}, LatencySlimming, then the found network exported. SearchContext
    took only a HeldoutEvaluator: a function failed deep in the strategy (AttributeError: no 'evaluations')."""
    import torch.nn.functional as F
    from latency_tables import LatencyTable
    from nas import FunctionEvaluator, LatencySlimming, SearchContext
    from supernet.supernet import MetaPathSupernet
    torch.manual_seed(0)
    net = MetaPathSupernet(load_supernet_run(supernet_run)[0].space)  # the space table_path covers, weights new
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.01)
    for _ in range(2):  # the user's own training loop
        x = torch.randn(4, 3, 64, 64, generator=g)
        loss = F.cross_entropy(net(x, mode="hard", generator=g), torch.randint(0, 4, (4,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    held = (torch.randn(8, 3, 64, 64, generator=g), torch.randint(0, 4, (8,), generator=g))
    calls = []

    def top2(choice):  # the user's own metric on their own held-out images
        calls.append(choice)
        model, _ = net.extract(choice)
        with torch.no_grad():
            out = model.eval()(held[0])
        hit = (out.topk(2, -1).indices == held[1][:, None]).any(-1).float().mean()
        return {"acc": float(hit), "loss": float(F.cross_entropy(out, held[1]))}

    table = LatencyTable.load(table_path)
    compiled = table.compile(net.space)
    start = float(compiled.score_choices([net.space.largest_choice()])[0])
    ctx = SearchContext(net.space, net, table, compiled, top2, 0.6 * start, progress=False)
    assert isinstance(ctx.evaluator, FunctionEvaluator)
    res = LatencySlimming().search(ctx)
    assert res.predicted_ms <= 0.6 * start and res.evaluations == len(calls) > 1
    assert res.acc == top2(res.choice)["acc"]
    model, arch = net.extract(res.choice)
    r = vitslim.export_model(model, "torchscript", tmp_path / "found.pt")
    assert r["trained"] and os.path.isfile(tmp_path / "found.pt")
    with pytest.raises(SearchError, match="evaluator: returned 0.5 for .*, expected a dict with finite numbers 'acc'"):
        SearchContext(net.space, net, table, compiled, lambda c: 0.5, 0.6 * start, progress=False).evaluator(
            res.choice)
    with pytest.raises(SearchError, match="evaluator: got str, expected a nas.HeldoutEvaluator or a function"):
        SearchContext(net.space, net, table, compiled, "top2", 0.6 * start, progress=False)


def test_a_search_with_ones_own_evaluator_function_writes_the_standard_run_folder(supernet_run, table_path, tmp_path,
                                                                                   figures_of):
    """write_run asked the context's evaluator for .model, .score_model, .n_images, .bn_batches (a HeldoutEvaluator's):
    a search scored by one's own function could not write arch.yaml, model.pt, report.json and its plot. The model
    is the supernet's extraction with its inherited weights; the report says the accuracy is the function's own
    metric, and what only held-out top-1 knows (images, BatchNorm batches) is null."""
    from latency_tables import LatencyTable
    from nas import FunctionEvaluator, LatencySlimming, SearchContext, write_run
    from supernet.supernet import MetaPathSupernet
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    figures = figures_of(nas_run)
    torch.manual_seed(0)
    net = MetaPathSupernet(load_supernet_run(supernet_run)[0].space).eval()
    held = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def mean_logit(choice):  # one's own metric: anything higher-is-better
        model, _ = net.extract(choice)
        with torch.no_grad():
            out = model.eval()(held)
        return {"acc": float(out.mean()), "loss": float(out.std())}

    table = LatencyTable.load(table_path)
    compiled = table.compile(net.space)
    start = float(compiled.score_choices([net.space.largest_choice()])[0])
    ctx = SearchContext(net.space, net, table, compiled, mean_logit, 0.6 * start, progress=False)
    assert isinstance(ctx.evaluator, FunctionEvaluator)
    res = LatencySlimming().search(ctx)
    out = tmp_path / "run"
    rep = write_run(str(out), ctx, res, {"supernet": "mine"})
    assert sorted(os.listdir(out)) == ["arch.yaml", "model.pt", "report.json"]
    model, arch = vitslim.load_checkpoint(str(out / "model.pt"))
    want, want_arch = net.extract(res.choice)
    assert arch == want_arch == vitslim.load_arch(str(out / "arch.yaml"))
    got_sd, want_sd = model.state_dict(), want.state_dict()
    assert got_sd.keys() == want_sd.keys() and all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)
    assert json.loads((out / "report.json").read_text()) == rep
    assert rep["accuracy"] == rep["model_accuracy"] == res.acc == mean_logit(res.choice)["acc"]
    assert rep["heldout_loss"] == res.loss
    assert rep["accuracy_note"].startswith("your own evaluator's 'acc'") and "top-1 on the held-out" not in \
        rep["accuracy_note"]
    ev = rep["evaluation"]
    assert ev["images"] is None and ev["bn_batches"] is None and ev["evaluator"] == "own function"
    assert ev["evaluations"] == res.evaluations and rep["finetune"] is None
    assert "trajectory.png" in rep["files"]
    (fig, _), = figures
    ax = fig.axes[0]
    assert ax.get_ylabel() == "your evaluator's acc (supernet weights)" and "held-out" not in ax.get_title()
    g = torch.Generator().manual_seed(1)  # fine-tuned: your evaluator scores choices, not the fine-tuned model
    train = torch.utils.data.TensorDataset(torch.randn(8, 3, 64, 64, generator=g),
                                           torch.randint(0, net.space.num_classes, (8,), generator=g))
    rep = write_run(str(tmp_path / "ft"), ctx, res, {}, finetune_steps=1, train_set=train, batch_size=4)
    ft = rep["finetune"]
    assert ft["steps"] == 1 and ft["acc_before"] is ft["acc_after"] is ft["loss_before"] is ft["loss_after"] is None
    assert rep["model_accuracy"] is None and rep["accuracy"] == res.acc and "model_accuracy is null" in \
        rep["accuracy_note"]
    tuned, _ = vitslim.load_checkpoint(str(tmp_path / "ft" / "model.pt"))
    assert any(not torch.equal(v, want_sd[k]) for k, v in tuned.state_dict().items())  # the fine-tuned weights
