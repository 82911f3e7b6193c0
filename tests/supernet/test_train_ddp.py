"""Supernet training under torchrun: two processes, the gloo backend on CPU, then a resume."""
import json
import os
import subprocess
import sys

import torch
import yaml

from supernet.train import read_run

from test_train import config, losses  # noqa: E402  (tests/supernet is on sys.path under pytest)


def scratch_tmp(run):
    """A TMPDIR of the test's own: torchrun leaves a torchelastic_* folder in it at every launch."""
    d = os.path.join(os.path.dirname(run), "tmp")
    os.makedirs(d, exist_ok=True)
    return d


def torchrun(cfg, run, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TMPDIR=scratch_tmp(run))
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


SKEWED = """
import os, sys
import supernet.data as data
real = data.scan_image_folder
def scan(root, *a, **k):  # rank 1's copy of the folder lacks one image
    classes, samples, skipped = real(root, *a, **k)
    return classes, samples[:-1] if os.environ["RANK"] == "1" else samples, skipped
data.scan_image_folder = scan
from vitslim.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_that_see_other_images_are_refused_before_training(tmp_path):
    from PIL import Image
    import numpy as np
    for c in range(4):
        os.makedirs(tmp_path / "imgs" / f"c{c}")
        for k in range(5):
            Image.fromarray(np.full((32, 32, 3), 40 * c + k, np.uint8)).save(tmp_path / "imgs" / f"c{c}" / f"{k}.png")
    cfg = str(tmp_path / "c.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(config(steps=2, eval_batches=1, batch_size=4,
                              data={"type": "imagefolder", "train_dir": "imgs", "val_fraction": 0.2}), f)
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED)
    run = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TMPDIR=scratch_tmp(run),
               PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), "supernet", "train", "--config", cfg, "--out", run, "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "rank 1 sees 15 training and 4 held-out images, rank 0 16 and 4" in r.stderr, r.stderr[-2000:]
    line = next(ln for ln in r.stderr.splitlines() if "rank 1 sees" in ln)  # one line (torchrun adds its own report)
    assert line.startswith("vitslim supernet train: error: data.train_dir ") and line.endswith("the run starts)")
    assert not os.path.exists(os.path.join(run, "checkpoint.pt"))
