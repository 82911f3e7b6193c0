"""Degenerate numerics: a checkpoint with NaN / Inf weights, a model whose float32 activations overflow, and a
fine-tuning that diverges are one-line errors, never a pruned model and report.json full of NaN (which is not
JSON) chosen by comparisons NaN makes meaningless."""
import pytest
import torch

import vitslim
from vitslim.cli import main

from pruning.importance import MagnitudeImportance, TaylorImportance
from pruning.units import PruneError
from pruning_nets import batches, build, tiny_deit

from test_prune_cli import FAST  # noqa: E402 - the same quick settings


def _ckpt(tmp_path, edit):
    arch = tiny_deit()
    m = build(arch)
    with torch.no_grad():
        edit(m)
    p = tmp_path / "ck.pt"
    vitslim.save_checkpoint(m, arch, p)
    return str(p)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_one_line_naming_it(tmp_path, capsys, value):
    ck = _ckpt(tmp_path, lambda m: m.blocks[0].mlp.fc1.weight.__setitem__((5, 0), value))
    for crit in ("taylor", "magnitude"):
        rc = main(["prune", "--checkpoint", ck, "--data", "synthetic", "--target", "macs=0.5", "--criterion", crit,
                   "--out", str(tmp_path / crit)] + FAST)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and "blocks.0.mlp.fc1.weight" in err, err
        assert not (tmp_path / crit).exists()


def test_activations_that_overflow_float32_are_one_line(tmp_path, capsys):
    ck = _ckpt(tmp_path, lambda m: m.blocks[0].mlp.fc2.weight.mul_(1e37))  # finite weights, inf activations
    rc = main(["prune", "--checkpoint", ck, "--data", "synthetic", "--target", "macs=0.5", "--criterion", "magnitude",
               "--out", str(tmp_path / "o")] + FAST)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "not finite" in err, err


def test_scores_that_are_not_finite_are_refused_by_both_criteria():
    arch = tiny_deit()
    m = build(arch)
    with torch.no_grad():
        m.blocks[1].mlp.fc2.weight.mul_(1e37)
    with pytest.raises(PruneError, match="calibration batch 1: the loss is"):
        TaylorImportance().score(m, arch, batches(arch, n=1))
    with torch.no_grad():
        m.blocks[1].mlp.fc2.weight.fill_(float("inf"))
    with pytest.raises(PruneError, match=r"stages\[0\].blocks\[1\] .* not finite"):
        MagnitudeImportance().score(m, arch)


def test_a_diverging_fine_tuning_is_one_line_and_writes_no_model(deit_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5", "--out", str(out),
               "--finetune-steps", "4", "--lr", "1e30"] + FAST)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "fine-tuning step" in err and "lower --lr" in err, err
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("target", ["latency=0.5x", "latency=5", "macs=0.5"])
def test_a_table_that_prices_the_model_at_zero_is_refused_first(target):
    """Every entry 0 ms: latency=0.5x of 0 ms, and every kept fraction, would divide by zero (a traceback at the very
    end of the run, after scoring)."""
    from latency_tables.table import LatencyTable
    from pruning_nets import fake_table
    arch = tiny_deit()
    t = fake_table(arch)
    zero = LatencyTable(t.device, built_for=t.built_for)
    for e in t.entries.values():
        zero.set(e.key, 0.0, 0.0, 0.0, 5)
    with pytest.raises(PruneError, match="predicts 0 ms for this model"):
        vitslim.prune_model(build(arch), target, calibration=batches(arch, n=1), table=zero)


def test_importance_that_is_zero_everywhere_is_warned_about(tmp_path):
    arch = tiny_deit()
    m = build(arch)
    with torch.no_grad():  # constant logits: no gradient reaches any unit
        m.head.weight.zero_()
        m.head.bias.zero_()
    with pytest.warns(UserWarning, match="importance is 0 for every unit"):
        vitslim.prune_model(m, "macs=0.7", calibration=batches(arch, 2), arch=arch)
    m2 = build(arch)  # a model whose loss does have a gradient: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        vitslim.prune_model(m2, "macs=0.7", calibration=batches(arch, 2), arch=arch)
