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


def test_the_final_held_out_figures_reuse_the_passes_that_made_them(monkeypatch):
    """The unpruned model's figures come from the pass that labels the batches, the pruned model's from its
    selection (no fine-tuning changed it since): two whole passes over the held-out set fewer, same numbers."""
    arch = tiny_deit()
    model = build(arch)
    unlabelled = [(x, None) for x, _ in batches(arch, n=3, bs=4)]
    calls = []

    def spy(m, bs, reference=None, progress=False, desc="evaluate"):
        calls.append(desc)
        return evaluate(m, bs, reference, progress, desc)
    monkeypatch.setattr(pr, "evaluate", spy)
    res = prune(model, arch, PruneConfig(target="macs=0.6", calib_batches=3, eval_batches=3), calibration=unlabelled)
    assert calls == ["held-out ratio 1/1", "held-out knapsack 1/1"]  # one per candidate, none after
    labelled = [(x, model(x).argmax(-1)) for x, _ in unlabelled]
    with torch.no_grad():
        assert res.report["heldout_before"] == evaluate(model, labelled)
        assert res.report["heldout_after"] == evaluate(res.model, labelled)


def test_a_network_fine_tuned_after_its_selection_is_evaluated_again(monkeypatch):
    from pruning.pruner import DataSource
    arch = tiny_deit()
    model = build(arch)
    calls = []

    def spy(m, bs, reference=None, progress=False, desc="evaluate"):
        calls.append(desc)
        return evaluate(m, bs, reference, progress, desc)
    monkeypatch.setattr(pr, "evaluate", spy)
    data = DataSource("synthetic", arch, batch_size=4, labels="model", heldout_images=8)
    res = prune(model, arch, PruneConfig(target="macs=0.6", calib_batches=2, eval_batches=2, finetune_steps=3,
                                         lr=1e-2, selection="ratio"), data=data)
    assert calls == ["held-out ratio 1/1", "held-out, pruned"]
    labelled = list(pr.reference_labels(data.heldout(2), model, arch["num_classes"]))
    assert res.report["heldout_after"] == evaluate(res.model, labelled)


class _TwoHeads(torch.nn.Module):
    """A distilled model in distillation-training mode: (class head, distillation head) logits, made up so
    that the mean of the two heads is right on both images and either head alone on one."""
    A = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    B = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])

    def forward(self, x):
        return self.A, self.B


def test_a_two_head_output_is_scored_as_the_mean_of_its_heads():
    import torch.nn.functional as F
    x, y = torch.zeros(2, 3, 4, 4), torch.tensor([1, 2])
    mean = torch.tensor([[1.0, 1.5, 0.0], [1.0, 0.0, 1.5]])
    res = evaluate(_TwoHeads(), [(x, y)])
    assert res["top1"] == 1.0 and res["images"] == 2
    assert abs(res["loss"] - float(F.cross_entropy(mean, y))) < 1e-6
    agree = evaluate(_TwoHeads(), [(x, None)], reference=_TwoHeads())  # the reference's top-1: the mean's too
    assert agree["top1"] == 1.0
