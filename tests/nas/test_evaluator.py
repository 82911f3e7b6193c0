"""The held-out evaluator: its figures are those of scoring each batch on its own, and on an accelerator
its batches are staged once (kept there when they fit, pinned in host memory when they do not)."""
import torch
import torch.nn.functional as F

import nas.evaluator as ev
from nas.run import load_supernet_run, make_evaluator


def _batches(n=3, b=4, size=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 3, size, size, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


def test_the_cpu_keeps_the_batches_it_was_given():
    batches = _batches()
    staged, where = ev.stage_batches(batches, "cpu")
    assert where == "host"
    assert all(s[0] is b[0] and s[1] is b[1] for s, b in zip(staged, batches))


def test_an_accelerator_gets_the_batches_once_when_they_fit():
    batches = _batches()
    staged, where = ev.stage_batches(batches, "meta")  # a device other than the CPU that this machine has
    assert where == "device"
    assert all(t.device.type == "meta" and t.shape == o.shape for s, b in zip(staged, batches) for t, o in zip(s, b))


def test_batches_that_do_not_fit_stay_in_host_memory(monkeypatch):
    batches = _batches()
    need = ev._nbytes(batches)
    assert need == sum(x.numel() * 4 + y.numel() * 8 for x, y in batches)
    moved = []
    real_to = torch.Tensor.to

    def spy(self, *a, **k):
        moved.append(a)
        return real_to(self, *a, **k)
    monkeypatch.setattr(torch.Tensor, "to", spy)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (need, 100 * need))  # twice what fits at 0.5
    staged, where = ev.stage_batches(batches, "cuda")
    assert moved == []  # no copy was even tried
    assert where in ("pinned", "host")  # pinned where this torch can pin (a CUDA build), else as given
    assert all(t.device.type == "cpu" and torch.equal(t, o) for s, b in zip(staged, batches) for t, o in zip(s, b))


def test_a_candidate_scores_as_each_batch_scored_alone(supernet_run):
    sn, cfg, _ = load_supernet_run(supernet_run)
    evaluator, _ = make_evaluator(sn, cfg, eval_images=20, batch_size=6)
    assert [int(y.numel()) for _, y in evaluator.heldout] == [6, 6, 6, 2] and evaluator.n_images == 20
    choice = sn.space.largest_choice()
    model, _ = evaluator.model(choice)
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in evaluator.heldout:
            out = model.eval()(x)
            correct += int((out.argmax(-1) == y).sum())
            loss += float(F.cross_entropy(out.float(), y, reduction="sum"))
    assert evaluator(choice) == {"acc": correct / 20, "loss": loss / 20}


class _Stub:
    """What HeldoutEvaluator needs of a supernet to score a model it is handed."""
    space = None

    def eval(self):
        return self


def test_a_two_head_output_is_scored_as_the_mean_of_its_heads():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mean = torch.tensor([[1.0, 1.5, 0.0], [1.0, 0.0, 1.5]])  # right on both images; either head alone on one
    y = torch.tensor([1, 2])
    evaluator = ev.HeldoutEvaluator(_Stub(), [(torch.zeros(2, 3, 4, 4), y)])

    class TwoHeads(torch.nn.Module):  # a distilled model in distillation-training mode
        def forward(self, x):
            return a, b
    res = evaluator.score_model(TwoHeads())
    assert res["acc"] == 1.0
    assert abs(res["loss"] - float(F.cross_entropy(mean, y))) < 1e-6


def test_only_bn_batches_of_the_calibration_batches_are_used():
    batches = _batches(n=3)
    for n in (0, 1, 2):
        evaluator = ev.HeldoutEvaluator(_Stub(), batches[:1], calib=batches, bn_batches=n)
        assert evaluator.bn_batches == n and len(evaluator.calib) == n
        assert all(c[0] is b[0] for c, b in zip(evaluator.calib, batches))  # the first n, in order


def test_the_cache_key_tells_choices_apart_by_widths_and_by_blocks(supernet_run):
    sn, cfg, _ = load_supernet_run(supernet_run)
    space = sn.space
    big = space.check_choice(space.largest_choice())
    narrow = dict(big, widths=[space.widths(0)[0]] + list(big["widths"][1:]))
    shallow = dict(big, blocks=[["identity"] * len(big["blocks"][0])] + list(big["blocks"][1:]))
    assert narrow["widths"] != big["widths"] and shallow["blocks"] != big["blocks"]
    keys = {ev.choice_key(c) for c in (big, narrow, shallow)}
    assert len(keys) == 3
    assert ev.choice_key(dict(big, widths=[float(w) for w in big["widths"]])) == ev.choice_key(big)
    evaluator, _ = make_evaluator(sn, cfg, eval_images=8, batch_size=8)
    results = [evaluator(c) for c in (big, narrow, big, shallow)]
    assert evaluator.evaluations == 3 and results[2] == results[0]  # the repeat is a cache hit, the others are not


def test_held_out_batches_given_as_an_iterator_are_read_once(supernet_run):
    """The evaluator takes any iterable of batches, as it did before it staged them: an iterator (a generator of
    batches) was counted for n_images and then staged from its exhausted remains, so every candidate scored on no
    batch (torch.stack of an empty list)."""
    sn, cfg, _ = load_supernet_run(supernet_run)
    listed, _ = make_evaluator(sn, cfg, eval_images=20, batch_size=6)
    batches = list(listed.heldout)
    it = ev.HeldoutEvaluator(sn, (b for b in batches))
    assert it.n_images == 20 and len(it.heldout) == 4
    choice = sn.space.largest_choice()
    assert it(choice) == listed(choice)
