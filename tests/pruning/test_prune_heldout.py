"""The held-out batches that choose between selections are labelled once with the unpruned model's
top-1 when they carry no labels of the model's classes; evaluating candidates then never runs the
reference again (it used to run it on every batch of every evaluation)."""
import torch

import pruning.pruner as pr
from pruning.pruner import PruneConfig, evaluate, prune
from pruning_nets import batches, build, tiny_deit


def test_heldout_is_labelled_once_and_reports_agreement_with_the_unpruned_model(monkeypatch):
    arch = tiny_deit()
    model = build(arch)
    unlabelled = [(x, None) for x, _ in batches(arch, n=3, bs=4)]
    calls = []

    def spy(m, bs, reference=None, progress=False, desc="evaluate"):
        bs = list(bs)
        calls.append([y is None for _, y in bs])
        return evaluate(m, bs, reference, progress, desc)
    monkeypatch.setattr(pr, "evaluate", spy)
    res = prune(model, arch, PruneConfig(target="macs=0.6", calib_batches=3, eval_batches=3, iterative_steps=2),
                calibration=unlabelled)
    assert len(calls) >= 4 and not any(any(c) for c in calls)  # every evaluation saw labelled batches
    # those labels are the unpruned model's top-1: it agrees with itself on every image
    assert res.report["heldout_before"]["top1"] == 1.0
    with torch.no_grad():
        ref = [model(x).argmax(-1) for x, _ in unlabelled]
        out = [res.model(x).argmax(-1) for x, _ in unlabelled]
    agree = sum(int((a == b).sum()) for a, b in zip(ref, out)) / 12
    assert res.report["heldout_after"]["top1"] == agree
