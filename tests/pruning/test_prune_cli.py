"""`vitslim prune` end to end on a tiny checkpoint with synthetic data, and every bad input as a
one-line error with exit code 2."""
import json
import os

import pytest
import torch

import vitslim
from vitslim.cli import main

from pruning.budget import Floor, LatencyCost, floor_cost
from pruning.units import block_infos
from pruning_nets import build, fake_table, grid_table, tiny_deit, tiny_swin

FAST = ["--calib-batches", "2", "--batch-size", "4", "--quiet"]


def run(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_prune_writes_a_run_that_loads_counts_and_exports(deit_ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, err = run(["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5",
                           "--out", str(out), "--finetune-steps", "2", "--kd"] + FAST, capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["arch.yaml", "model.pt", "reallocation.png", "report.json"]
    rep = json.load(open(out / "report.json"))
    for k in ("params_before", "params_after", "macs_before", "macs_after", "target", "blocks"):
        assert k in rep
    assert rep["macs_after"] <= 0.5 * rep["macs_before"]
    for b in rep["blocks"]:
        for k in ("heads", "qk_dim", "v_dim", "ffn_hidden"):
            assert k in b and k + "_before" in b
        assert set(b["kept"]) == {"heads", "qk", "v", "ffn", "embed"}
    model, arch = vitslim.load_checkpoint(str(out / "model.pt"))
    assert arch == vitslim.load_arch(str(out / "arch.yaml"))
    assert vitslim.count(model) == {"params": rep["params_after"], "macs": rep["macs_after"]}
    res = vitslim.export_model(str(out / "model.pt"), "onnx", str(tmp_path / "pruned.onnx"))
    assert os.path.isfile(res["path"])
    assert "pruned" in stdout and "macs=0.5" in stdout


def test_prune_zero_percent_reproduces_the_input_model(tmp_path, capsys):
    arch = tiny_swin()
    model = build(arch)
    ck = tmp_path / "swin.pt"
    vitslim.save_checkpoint(model, arch, ck)
    rc, _, err = run(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "params=1",
                      "--out", str(tmp_path / "run")] + FAST, capsys)
    assert rc == 0, err
    pruned, parch = vitslim.load_checkpoint(str(tmp_path / "run" / "model.pt"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), pruned(x)
    assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert parch["stages"] == arch["stages"]


def one_line_error(capsys, argv, pattern):
    rc, _, err = run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    return lines[0]


def test_unsupported_family_names_the_supported_ones(tmp_path, capsys):
    arch = vitslim.get_preset("efficientvit_m0")
    ck = tmp_path / "evit.pt"
    vitslim.save_checkpoint(vitslim.build_model(arch), arch, ck)
    one_line_error(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5",
                            "--out", str(tmp_path / "r")] + FAST, "expected one of deit, swin")


@pytest.mark.parametrize("target,pattern", [("macs=0", "(0, 1]"), ("params=1.2", "(0, 1]"), ("macs=-0.5", "(0, 1]"),
                                            ("latency=2", "needs --table"), ("speed=2", "params, macs or latency")])
def test_bad_target(deit_ckpt, tmp_path, capsys, target, pattern):
    one_line_error(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", target,
                            "--out", str(tmp_path / "r")] + FAST, pattern)


def test_target_below_the_floor_names_the_floor(deit_ckpt, tmp_path, capsys):
    line = one_line_error(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.1",
                                   "--out", str(tmp_path / "r")] + FAST, "below what the floor allows")
    assert "at best macs=0.3" in line


def test_latency_below_what_the_table_reaches_names_the_floor():
    from pruning.pruner import PruneConfig, prune
    from pruning.units import PruneError
    arch = tiny_deit()
    ms = lambda a: 1.0 + sum(0.01 * b["ffn_hidden"] + 0.2 * b["heads"] for b in a["stages"][0]["blocks"])
    with pytest.raises(PruneError, match=r"below what the table can reach for this model \(floor 1\.\d+ ms"):
        prune(build(arch), arch, PruneConfig(target="latency=0.5"), calibration=[], cost_fn=ms)


def test_latency_below_what_the_table_reaches_on_the_command_line(tmp_path, capsys, quick_tables):
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    t = fake_table(arch)
    t.save(str(tmp_path / "t.yaml"))
    line = one_line_error(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "latency=0.01",
                                   "--table", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "r")] + FAST,
                          "below what the table can reach for this model (floor ")
    assert "ms" in line


def test_table_of_another_family(deit_ckpt, tmp_path, capsys):
    from latency_tables.table import LatencyTable
    t = LatencyTable({"backend": "torch-cpu", "device": "cpu", "threads": 1, "batch_size": 1},
                     built_for={"family": "efficientformer"})
    t.set({"op": "meta4d", "res": 7, "dim": 48, "ffn_hidden": 192}, 1.0, 0.9, 1.1, 10)
    path = str(tmp_path / "ef.yaml")
    t.save(path)
    one_line_error(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "latency=1",
                            "--table", path, "--out", str(tmp_path / "r")] + FAST, "built for efficientformer, not for this deit")
    t.device["backend"] = "coreml"  # a phone table: its entries come through export-coreml and import, not build
    t.save(path)
    line = one_line_error(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "latency=1",
                                   "--table", path, "--out", str(tmp_path / "r")] + FAST, "not for this deit")
    assert "`vitslim latency export-coreml --arch CHECKPOINT --out DIR`" in line and "latency build" not in line


def test_calibration_images_of_the_wrong_size(deit_ckpt, tmp_path, capsys):
    p = tmp_path / "imgs.pt"
    torch.save({"images": torch.randn(8, 3, 48, 48), "labels": torch.zeros(8, dtype=torch.long)}, p)
    one_line_error(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", str(p), "--target", "macs=0.5",
                            "--out", str(tmp_path / "r")] + FAST, "images are 3x48x48")


def test_calibration_images_with_the_wrong_channel_count(tmp_path, capsys):
    arch = tiny_deit(in_chans=1)
    ck = tmp_path / "gray.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    one_line_error(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5",
                            "--out", str(tmp_path / "r")] + FAST, "expected 1x32x32")


def test_output_directory_that_exists(deit_ckpt, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    one_line_error(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5",
                            "--out", str(tmp_path / "r")] + FAST, "already exists")


def test_latency_target_on_the_command_line_says_whether_the_grid_priced_it(tmp_path, capsys, quick_tables):
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only spins on a busy machine
    try:
        _prune_both(arch, ck, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _prune_both(arch, ck, tmp_path, capsys):
    for name, t in (("grid", grid_table(arch)), ("nogrid", fake_table(arch))):
        t.save(str(tmp_path / f"{name}.yaml"))
        cost, infos = LatencyCost(t, arch), block_infos(arch)
        goal = (t.predict(arch) + floor_cost(infos, cost, cost.base(arch, infos), Floor(0.1).of(infos))) / 2
        rc, out, err = run(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", f"latency={goal}",
                            "--table", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name),
                            "--selection", "ratio", "--calib-batches", "1", "--batch-size", "4", "--quiet"], capsys)
        assert rc == 0, err
        rep = json.load(open(tmp_path / name / "report.json"))
        assert rep["latency_after_ms"] <= goal + 1e-9
        assert rep["latency_grid_blocks"] == (2 if name == "grid" else 0) and rep["blocks_total"] == 2
        assert ("no pruning grid" in out) == (name == "nogrid")
        assert ("`vitslim latency build --arch" in out) == (name == "nogrid")


def test_the_grid_note_of_an_on_device_table_points_to_export_coreml(tmp_path, capsys, quick_tables):
    """A Core ML table (timed on the phone, `latency import`) cannot be built here: the note names the way its
    grid is made, `latency export-coreml --prune-grid`, then the device and `latency import`."""
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    t = fake_table(arch)
    t.device = {"backend": "coreml", "device": "iPhone 12", "threads": None, "batch_size": 1,
                "dtype": "float32 inputs, float16 compute", "fused": True, "compute_units": "ALL"}
    t.save(str(tmp_path / "iphone.yaml"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc, out, err = run(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "latency=0.85x",
                            "--table", str(tmp_path / "iphone.yaml"), "--out", str(tmp_path / "r"),
                            "--selection", "ratio", "--calib-batches", "1", "--batch-size", "4", "--quiet"], capsys)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, err
    note = next(l for l in out.splitlines() if "no pruning grid" in l)
    assert f"(export one with `vitslim latency export-coreml --arch {ck} --prune-grid --out DIR`, time its packages " \
           f"on the device and `vitslim latency import` them into {tmp_path / 'iphone.yaml'})" in note, note
    assert "latency build" not in note


def assert_same_run(ref, out):
    """The same weights, bit for bit, and the same report but for the scoring time."""
    a = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.load(open(d / "report.json")) for d in (ref, out))
    for r in (ra, rb):
        r.pop("scoring_seconds")
        r.pop("checkpoint")  # the same file
    assert ra == rb


def test_an_interrupted_iterative_prune_resumes_to_the_uninterrupted_result(deit_ckpt, tmp_path, capsys, monkeypatch):
    import pruning.pruner as pp
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--iterative-steps", "3",
            "--finetune-steps", "6", "--kd"] + FAST
    ref = tmp_path / "ref"
    assert run(args + ["--out", str(ref)], capsys)[0] == 0
    out = tmp_path / "p"
    real, calls = pp.finetune, []

    def interrupted(*a, **k):  # Ctrl-C (or a kill) during step 2's fine-tuning
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pp, "finetune", interrupted)
    rc, _, err = run(args + ["--out", str(out)], capsys)
    assert rc == 130 and "re-run to continue from the last saved point" in err and not out.exists()
    assert (tmp_path / ".p.resume.pt").exists()
    other = args[:] + ["--out", str(out)]
    other[other.index("--finetune-steps") + 1] = "9"
    rc, _, err = run(other, capsys)  # other settings: refused, the state kept
    assert rc == 2 and "an interrupted prune of other settings" in err and (tmp_path / ".p.resume.pt").exists()
    calls.clear()
    monkeypatch.setattr(pp, "finetune", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run(args + ["--out", str(out)], capsys)[0] == 0
    assert len(calls) == 2  # steps 2 (selected before the interrupt: not scored again) and 3; step 1 from the state
    assert not (tmp_path / ".p.resume.pt").exists()
    assert_same_run(ref, out)


def test_a_prune_interrupted_during_fine_tuning_continues_from_its_last_save(deit_ckpt, tmp_path, capsys, monkeypatch):
    """One-shot (two steps: the kill -9 test below): the selection is kept and fine-tuning goes on from the save
    before the interrupt, to the weights and report of an uninterrupted run; nothing is scored again."""
    import pruning.pruner as pp
    steps = 1
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--iterative-steps",
            str(steps), "--finetune-steps", "8", "--kd"] + FAST
    ref = tmp_path / "ref"
    assert run(args + ["--out", str(ref)], capsys)[0] == 0
    monkeypatch.setattr(pp, "FINETUNE_SAVE_SECONDS", 0.0)  # save after every batch
    real_training, served = pp.DataSource.training, []

    def training(self, n, start=1000):  # Ctrl-C while fetching the 4th batch of the last step
        for i, b in enumerate(real_training(self, n, start)):
            if len(served) == 8 // steps * (steps - 1) + 3:
                raise KeyboardInterrupt
            served.append(start + i)
            yield b

    monkeypatch.setattr(pp.DataSource, "training", training)
    out = tmp_path / "p"
    rc, _, err = run(args + ["--out", str(out)], capsys)
    assert rc == 130 and "continue from the last saved point" in err and not out.exists()
    state = torch.load(tmp_path / ".p.resume.pt", weights_only=True)
    assert state["step"] == steps - 1 and state["pending"]["finetune"]["done"] == 3
    monkeypatch.setattr(pp.DataSource, "training", real_training)
    scored, resumed = [], []
    import pruning.importance as pi
    real_score, real_ft = pi.TaylorImportance.score, pp.finetune
    monkeypatch.setattr(pi.TaylorImportance, "score", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    monkeypatch.setattr(pp, "finetune", lambda *a, **k: resumed.append(k["resume"]) or real_ft(*a, **k))
    assert run(args + ["--out", str(out)], capsys)[0] == 0
    assert scored == [] and [r["done"] for r in resumed] == [3]
    assert not (tmp_path / ".p.resume.pt").exists()
    assert_same_run(ref, out)


def test_a_one_shot_prune_interrupted_after_selection_is_not_scored_again(deit_ckpt, tmp_path, capsys, monkeypatch):
    """No fine-tuning: the held-out evaluation after the last selection (long on real data) is where an
    interrupt lands; the selection is kept and the resumed run ends as the uninterrupted one."""
    import pruning.importance as pi
    import pruning.pruner as pp
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5"] + FAST
    ref = tmp_path / "ref"
    assert run(args + ["--out", str(ref)], capsys)[0] == 0
    real_eval = pp.evaluate

    def interrupted(model, batches, reference=None, *a, **k):  # Ctrl-C in the final evaluation of the unpruned model
        if model is reference:
            raise KeyboardInterrupt
        return real_eval(model, batches, reference, *a, **k)

    monkeypatch.setattr(pp, "evaluate", interrupted)
    out = tmp_path / "p"
    rc, _, err = run(args + ["--out", str(out)], capsys)
    assert rc == 130 and "continue from the last saved point" in err and not out.exists()
    state = torch.load(tmp_path / ".p.resume.pt", weights_only=True)
    assert state["step"] == 0 and state["pending"] is not None and state["pending"]["finetune"] is None
    monkeypatch.setattr(pp, "evaluate", real_eval)
    scored, real_score = [], pi.TaylorImportance.score
    monkeypatch.setattr(pi.TaylorImportance, "score", lambda *a, **k: scored.append(1) or real_score(*a, **k))
    assert run(args + ["--out", str(out)], capsys)[0] == 0
    assert scored == [] and not (tmp_path / ".p.resume.pt").exists()
    assert_same_run(ref, out)


KILLED_PRUNE = """
import os, signal, sys
sys.path.insert(0, {root!r})
import pruning.pruner as pp
from vitslim.cli import main
pp.FINETUNE_SAVE_SECONDS = 0.0  # save after every batch
real, served = pp.DataSource.training, []
def training(self, n, start=1000):
    for b in real(self, n, start):
        if len(served) == {at}:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no handler, no cleanup runs
        served.append(1)
        yield b
pp.DataSource.training = training
main({argv!r})
"""


def test_a_resume_state_an_earlier_vitslim_wrote_is_refused_naming_the_settings_it_lacks(tmp_path):
    """A state from before a setting existed (--keep, --round-to) differs in its key only by that setting: the error
    names it, not two whole config dicts, and says to start over (re-running 'with its settings' cannot help)."""
    from pruning.pruner import STATE_FORMAT, _read_state
    from pruning.units import PruneError
    key = {"config": {"iterative_steps": 3, "keep": [], "round_to": 1, "lr": 1e-4}, "seed": 0}
    old = {"config": {"iterative_steps": 3, "lr": 1e-4}, "seed": 0}
    path = str(tmp_path / ".p.resume.pt")
    torch.save({"format": STATE_FORMAT, "key": json.dumps(old, sort_keys=True)}, path)
    with pytest.raises(PruneError) as e:
        _read_state(path, key)
    msg = str(e.value)
    assert "(config.keep: (none) -> []; config.round_to: (none) -> 1)" in msg and "iterative_steps" not in msg
    assert msg.endswith("written by an earlier vitslim: pass --overwrite to start this one")
    torch.save({"format": STATE_FORMAT, "key": json.dumps(dict(key, seed=1), sort_keys=True)}, path)
    with pytest.raises(PruneError, match=r"\(seed: 1 -> 0\); re-run it with its settings to resume it"):
        _read_state(path, key)  # this vitslim's state of other settings: as before


def test_a_prune_killed_during_fine_tuning_resumes_to_the_uninterrupted_result(deit_ckpt, tmp_path, capsys):
    """kill -9, not Ctrl-C: nothing of the killed process cleans up (its lock, its temporaries); re-running the
    command continues from the last save to the weights and report of an uninterrupted run."""
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--iterative-steps",
            "2", "--finetune-steps", "8", "--kd", "--threads", "1"] + FAST  # float sums: one thread count in both
    ref, out = tmp_path / "ref", tmp_path / "p"
    threads = torch.get_num_threads()
    try:
        _killed_and_resumed(args, ref, out, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _killed_and_resumed(args, ref, out, tmp_path, capsys):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run(args + ["--out", str(ref)], capsys)[0] == 0
    p = subprocess.run([sys.executable, "-c", KILLED_PRUNE.format(root=root, at=6, argv=args + ["--out", str(out)])],
                       cwd=root)
    assert p.returncode == -9 and not out.exists()
    state = torch.load(tmp_path / ".p.resume.pt", weights_only=True)
    assert state["step"] == 1 and state["pending"]["finetune"]["done"] == 2  # 4 of step 1, 2 of step 2
    assert run(args + ["--out", str(out)], capsys)[0] == 0
    assert not (tmp_path / ".p.resume.pt").exists()
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []  # no lock or temporary left
    assert_same_run(ref, out)


def test_a_killed_state_writer_leaves_no_temporary_behind(deit_ckpt, tmp_path, capsys):
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".p.resume.pt.tmp.{dead.pid}"
    stale.write_bytes(b"half a state")
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--iterative-steps", "2",
            "--out", str(tmp_path / "p")] + FAST
    assert run(args, capsys)[0] == 0
    assert not stale.exists() and (tmp_path / "p" / "model.pt").exists()


def test_a_prune_on_an_out_another_prune_is_running_in_is_refused(deit_ckpt, tmp_path, capsys):
    """Not 'an interrupted prune of other settings' (the other is live), and --overwrite does not delete its
    resume state: the second run is refused before it reads or removes anything."""
    from pruning.report import prune_lock
    out = tmp_path / "p"
    state = tmp_path / ".p.resume.pt"
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--out", str(out)] + FAST
    with prune_lock(str(out)):  # a prune of other settings, mid-run
        state.write_bytes(b"the running prune's state")
        assert (tmp_path / ".p.lock").exists()
        for extra in ([], ["--overwrite"]):
            rc, _, err = run(args + extra, capsys)
            assert rc == 2 and err.strip().splitlines() == [
                f"vitslim prune: error: --out {out}: another prune is running in it; wait for it, or choose another --out"]
            assert state.read_bytes() == b"the running prune's state" and not out.exists()
        os.symlink(out, tmp_path / "link")  # the same folder under another name
        rc, _, err = run(args[:-len(FAST) - 1] + [str(tmp_path / "link")] + FAST, capsys)
        assert rc == 2 and "another prune is running in it" in err
    state.unlink()
    assert run(args, capsys)[0] == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []  # the lock went with the run


def test_a_run_folder_that_appeared_during_the_prune_is_not_replaced(deit_ckpt, tmp_path, capsys, monkeypatch):
    import pruning.pruner as pp
    out = tmp_path / "p"
    real = pp.prune

    def meanwhile(*a, **k):
        res = real(*a, **k)
        out.mkdir()
        (out / "theirs.txt").write_text("another program's")
        return res

    monkeypatch.setattr(pp, "prune", meanwhile)
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--out", str(out)] + FAST
    rc, _, err = run(args, capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "appeared while this prune ran" in err, err
    assert os.listdir(out) == ["theirs.txt"] and "move it away and re-run" in err
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == [".p.resume.pt"]  # no lock or temporary
    os.rename(out, tmp_path / "theirs")
    monkeypatch.setattr(pp, "prune", real)
    assert run(args, capsys)[0] == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_write_run_does_not_replace_a_folder_that_appears_while_it_writes(tmp_path, monkeypatch):
    import pruning.report as pr
    from pruning.units import PruneError
    arch = tiny_deit()
    out = tmp_path / "p"
    monkeypatch.setattr(pr, "plot_reallocation", lambda report, path: out.mkdir() or None)  # during the writing
    with pytest.raises(PruneError, match="appeared while this prune ran"):
        pr.write_run(str(out), build(arch), arch, {"blocks": []})
    assert os.listdir(out) == [] and os.listdir(tmp_path) == ["p"]  # no temporary left either


def test_a_symlinked_out_is_written_through(deit_ckpt, tmp_path, capsys):
    real, link = tmp_path / "elsewhere" / "real", tmp_path / "link"
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic"] + FAST
    assert run(args + ["--target", "macs=0.5", "--out", str(real)], capsys)[0] == 0
    os.symlink(real, link)
    rc, out, err = run(args + ["--target", "macs=0.7", "--out", str(link)], capsys)
    assert rc == 2 and "already exists" in err  # a link to a run is a run
    rc, out, err = run(args + ["--target", "macs=0.7", "--out", str(link), "--overwrite"], capsys)
    assert rc == 0, err
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert json.load(open(real / "report.json"))["target"] == "macs=0.7"
    assert sorted(os.listdir(tmp_path)) == ["deit.pt", "elsewhere", "link"]
    assert sorted(os.listdir(tmp_path / "elsewhere")) == ["real"]


def test_an_out_whose_temporary_names_would_not_fit_is_refused_before_any_work(deit_ckpt, tmp_path, capsys, monkeypatch):
    """The run folder is written as .NAME.pidPID.RANDOM (the previous one moved aside as .NAME.pidPID.old.RANDOM)
    and an iterative run saves .NAME.resume.pt(.tmp.PID): a name that fits but they do not failed after scoring."""
    import pruning.pruner as pp
    from supernet.runlock import name_max
    fits = name_max(str(tmp_path)) - 25  # .NAME.pid9999999.old.xxxxxxxx
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--iterative-steps", "2"]
    real = pp.prune
    monkeypatch.setattr(pp, "prune", lambda *a, **k: pytest.fail("pruned"))
    err = run(args + ["--out", str(tmp_path / ("p" * (fits + 1)))] + FAST, capsys)[2]
    assert err.strip().endswith("expected a name at least 1 bytes shorter") and len(err.strip().splitlines()) == 1
    assert "too long a name for the temporary and lock files written beside it" in err
    assert os.listdir(tmp_path) == ["deit.pt"]
    monkeypatch.setattr(pp, "prune", real)
    rc, _, err = run(args + ["--out", str(tmp_path / ("p" * fits))] + FAST, capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted(["deit.pt", "p" * fits])


def test_a_shipped_table_is_taken_by_name(tmp_path, capsys, monkeypatch, quick_tables):
    """--help says --table takes a shipped table's name: prune stat-ed the bare name for its resume key (a
    FileNotFoundError traceback) before the table was ever resolved."""
    import latency_tables.table as lt
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    fake_table(arch).save(str(shipped / "my_deit_cpu.yaml"))
    monkeypatch.setattr(lt, "TABLES_DIR", str(shipped))
    out = tmp_path / "r"
    rc, _, err = run(["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "latency=0.8x", "--table",
                      "my_deit_cpu", "--out", str(out)] + FAST, capsys)
    assert rc == 0, err
    with open(out / "report.json") as f:
        rep = json.load(f)
    assert rep["table"] == str(shipped / "my_deit_cpu.yaml") and rep["latency_kept"] <= 0.8 + 1e-9
    one_line_error(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "latency=0.8x",
                            "--table", "no_such_table", "--out", str(tmp_path / "r2")] + FAST,
                   "no_such_table: no such file, expected a latency table .yaml or a shipped table name (my_deit_cpu)")


def interrupted_prune(deit_ckpt, tmp_path, capsys, monkeypatch):
    """A macs=0.5 prune interrupted at its last evaluation: (its arguments without --out, --out, the resume state's
    path, the state as saved)."""
    import pruning.pruner as pp
    args = ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5"] + FAST
    real_eval = pp.evaluate

    def interrupted(model, batches, reference=None, *a, **k):
        if model is reference:
            raise KeyboardInterrupt
        return real_eval(model, batches, reference, *a, **k)

    monkeypatch.setattr(pp, "evaluate", interrupted)
    out, state_path = tmp_path / "p", tmp_path / ".p.resume.pt"
    assert run(args + ["--out", str(out)], capsys)[0] == 130
    monkeypatch.setattr(pp, "evaluate", real_eval)
    return args, out, state_path, torch.load(state_path, weights_only=True)


@pytest.mark.parametrize("tamper, needle", [
    (lambda st: st.update(key=5), "not a prune state (key 5)"),
    (lambda st: st.update(key="[1]"), "not a prune state (key '[1]')"),
    (lambda st: st.pop("steps_report"), "a damaged prune state ('steps_report')"),
    (lambda st: st.update(step=-1), "a damaged prune state (step -1, expected 0 to 1)"),
    (lambda st: st.update(arch={**st["arch"], "family": 7}), "a damaged prune state (family: got 7"),
    (lambda st: st["arch"]["stages"][0].update(width=st["arch"]["stages"][0]["width"] + 8),
     "a damaged prune state (its network: does not fit the architecture"),
])
def test_a_tampered_prune_state_is_refused_in_one_line(deit_ckpt, tmp_path, capsys, monkeypatch, tamper, needle):
    """The resume state beside --out is read back as it is: an edited or damaged one (a key, a step, an arch whose
    widths its tensors do not have, which was built before a tensor was compared) stopped with a traceback."""
    args, out, state_path, state = interrupted_prune(deit_ckpt, tmp_path, capsys, monkeypatch)
    tamper(state)
    torch.save(state, state_path)
    rc, _, err = run(args + ["--out", str(out)], capsys)
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert "delete it to start over" in err and not out.exists()


@pytest.mark.parametrize("version", [None, 1, 2, "1"])
def test_a_prune_state_of_another_version_is_refused_and_one_without_resumes(deit_ckpt, tmp_path, capsys,
                                                                             monkeypatch, version):
    """The resume state carries the version of the rules its steps followed (like a slimming log): a state of another
    version is refused in one line naming both versions (resuming it would mix two rules), and one of before the
    field (None: no "version" key; the rules then are version 1's) resumes as it did."""
    args, out, state_path, state = interrupted_prune(deit_ckpt, tmp_path, capsys, monkeypatch)
    import pruning.pruner as pp
    assert state["version"] == pp.STATE_VERSION == 1
    if version is None:
        del state["version"]
    else:
        state["version"] = version
    torch.save(state, state_path)
    rc, _, err = run(args + ["--out", str(out)], capsys)
    if version in (None, 1):
        assert rc == 0 and (out / "report.json").exists() and not state_path.exists(), err
        return
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"a prune state of version {version!r}, expected 1" in err and "--overwrite" in err and not out.exists()
    assert ("a newer vitslim" in err) == (version == 2)
    assert run(args + ["--out", str(out), "--overwrite"], capsys)[0] == 0 and not state_path.exists()
