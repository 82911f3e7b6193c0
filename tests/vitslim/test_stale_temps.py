"""What a killed writer leaves (NAME.tmp.PID files, .BASE.pidPID.* folders) is swept by the next run of
the same output, never a live writer's and never anything else; a prune killed between its two renames
gets its previous run back."""
import json
import os
import stat
import subprocess
import sys

import torch

import vitslim
from supernet.runlock import remove_stale_temps, temp_prefix
from vitslim.cli import main

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(rel, name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(TESTS, rel))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_dead_writers_temporaries_of_the_named_output_are_removed(tmp_path):
    dead, live = dead_pid(), os.getppid()
    names = {f"t.yaml.tmp.{dead}": True, f"t.yaml.tmp.{live}": False, f"plot.png.tmp.{dead}.png": True,
             f".model.onnx.pid{dead}.ab12": True, f".model.onnx.pid{live}.cd34": False, "t.yaml": False,
             "notes.txt": False, f"other.yaml.tmp.{dead}": True}
    for n in names:
        (tmp_path / n).write_text("x")
    (tmp_path / f".run.pid{dead}.zz").mkdir()
    (tmp_path / f".run.pid{dead}.zz" / "model.pt").write_text("half")
    gone = remove_stale_temps(str(tmp_path), base="t.yaml")
    assert gone == [f"t.yaml.tmp.{dead}"]
    gone = set(remove_stale_temps(str(tmp_path)))
    assert gone == {n for n, stale in names.items() if stale and n != f"t.yaml.tmp.{dead}"} | {f".run.pid{dead}.zz"}
    assert {n for n, stale in names.items() if not stale} == set(os.listdir(tmp_path))
    assert temp_prefix("x") == f".x.pid{os.getpid()}."


def test_supernet_training_sweeps_its_run_folder(tmp_path):
    from supernet.train import TrainConfig, train
    config = _module("supernet/test_train.py", "supernet_test_train").config
    run = tmp_path / "run"
    run.mkdir()
    left = run / f"checkpoint.pt.tmp.{dead_pid()}"
    left.write_bytes(b"\0" * 704)  # a torch.save cut by a kill
    train(TrainConfig.from_dict(config(steps=2)), str(run), progress=False)
    assert not left.exists()


def test_a_latency_build_sweeps_its_tables_temporaries(tmp_path, capsys):
    t = tmp_path / "t.yaml"
    left = tmp_path / f"t.yaml.tmp.{dead_pid()}"
    left.write_text("half a table")
    space = os.path.join(os.path.dirname(__file__), "..", "..", "supernet", "spaces", "tiny.yaml")
    assert main(["latency", "build", "--space", space, "--out", str(t), "--dry-run"]) == 0
    assert not left.exists()


def test_prune_sweeps_a_killed_runs_folders_and_writes_a_readable_folder(tmp_path, capsys):
    nets = _module("pruning/pruning_nets.py", "pruning_nets_for_temps")
    build, tiny_deit = nets.build, nets.tiny_deit
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    out = tmp_path / "p"
    half = tmp_path / f".p.pid{dead_pid()}.x1"
    half.mkdir()
    (half / "model.pt").write_text("half")
    argv = ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5", "--out", str(out),
            "--calib-batches", "2", "--batch-size", "4", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["deit.pt", "p"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask


def test_prune_killed_between_its_renames_gets_the_previous_run_back(tmp_path, capsys):
    from pruning.report import _recover
    prev = tmp_path / f".p.pid{dead_pid()}.old.q9"
    prev.mkdir()
    (prev / "report.json").write_text(json.dumps({"x": 1}))
    half = tmp_path / f".p.pid{dead_pid()}.w2"
    half.mkdir()
    _recover(str(tmp_path / "p"), str(tmp_path), "p")
    assert json.loads((tmp_path / "p" / "report.json").read_text()) == {"x": 1}
    assert half.exists()  # left to the sweep that follows


def test_export_sweeps_a_killed_exports_temporary(tmp_path, capsys):
    out = tmp_path / "m.ts"
    left = tmp_path / f".m.ts.pid{dead_pid()}.k3"
    left.write_bytes(b"half")
    a = {**vitslim.get_preset("efficientformer_l1"), "input_size": 64}
    vitslim.save_arch(a, tmp_path / "a.yaml")
    torch.manual_seed(0)
    assert main(["export", str(tmp_path / "a.yaml"), "--format", "torchscript", "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a.yaml", "m.ts"]
