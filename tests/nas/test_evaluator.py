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
