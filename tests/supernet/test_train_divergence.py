"""A supernet training that diverges (weights NaN or Inf) stops with a one-line error naming the step, before
the diverged model is logged or saved: the last good checkpoint stays, and no report.json holds NaN."""
import json
import os

import pytest
import torch

import supernet.train as T
from supernet.errors import VitslimError
from supernet.train import TrainConfig, read_run, train
from vitslim.cli import main

from test_train import config, write_config


def _blow_up_from(monkeypatch, step):
    """A NaN learning rate from training step `step` on (0-based): AdamW then writes NaN into the weights."""
    real = T.lr_factor
    monkeypatch.setattr(T, "lr_factor", lambda s, *a: float("nan") if s >= step else real(s, *a))


def _assert_step_2_kept(run):
    st = read_run(run)
    assert st["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in st["model"].values() if v.is_floating_point())


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch):
    _blow_up_from(monkeypatch, 2)
    run = str(tmp_path / "r")
    with pytest.raises(VitslimError, match=r"step 3: .* became NaN or Inf .*checkpoint.pt \(step 2\) is kept"):
        train(TrainConfig.from_dict(config(steps=6, checkpoint_every=2, log_every=1)), run, progress=False)
    _assert_step_2_kept(run)
    assert not os.path.exists(os.path.join(run, "report.json"))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        recs = [json.loads(ln) for ln in f]
    assert [r["step"] for r in recs] == [1, 2]


def test_the_cli_says_it_in_one_line(tmp_path, capsys, monkeypatch):
    _blow_up_from(monkeypatch, 0)
    rc = main(["supernet", "train", "--config", write_config(tmp_path / "c.yaml", steps=3), "--out",
               str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "the training diverged" in err and "no checkpoint" in err, err


def test_a_divergence_between_logged_steps_is_caught_before_the_checkpoint_is_overwritten(tmp_path, monkeypatch):
    """Logged every 6 steps, saved every 2: the weights go NaN in step 3 (0-based 2); the save after step 4 finds
    them before writing, and the step-2 checkpoint stays."""
    _blow_up_from(monkeypatch, 2)
    run = str(tmp_path / "r")
    with pytest.raises(VitslimError, match=r"step 4: .* became NaN or Inf .*checkpoint.pt \(step 2\) is kept"):
        train(TrainConfig.from_dict(config(steps=6, checkpoint_every=2, log_every=6)), run, progress=False)
    _assert_step_2_kept(run)
