"""Supernet training under torchrun: two processes, the gloo backend on CPU, then a resume."""
import json
import os
import subprocess
import sys

import torch
import yaml

from supernet.train import read_run

from test_train import config, losses  # noqa: E402  (tests/supernet is on sys.path under pytest)


def torchrun(cfg, run, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitslim", "supernet", "train", "--config", cfg, "--out", run, "--no-progress", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_train_and_resume_with_gloo(tmp_path):
    cfg = str(tmp_path / "c.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(config(steps=4, eval_batches=1), f)
    run = str(tmp_path / "run")
    r = torchrun(cfg, run, "--stop-at", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_run(run)["step"] == 2
    r = torchrun(cfg, run, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "supernet: 4/4 steps" in r.stdout and r.stdout.count("supernet: 4/4") == 1  # rank 0 reports
    state = read_run(run)
    assert state["step"] == 4 and [s for s, _ in losses(run)] == [1, 2, 3, 4]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    with open(os.path.join(run, "report.json")) as f:
        assert json.load(f)["finished"]
