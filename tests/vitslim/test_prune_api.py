"""vitslim.prune_model: the pruner from Python with the user's own batches (Torch-Pruning and NNI users call
pruning from their training loop), a module or a checkpoint path, every PruneConfig field by name."""
import os
import sys

import pytest
import torch

import vitslim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
from pruning_nets import batches, build, tiny_deit, tiny_swin  # noqa: E402


def test_prune_model_from_a_module_with_own_batches_meets_the_target_and_leaves_the_input():
    arch = tiny_deit(blocks=3)
    model = build(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = [(x, None) for x, _ in batches(arch, 3)]  # the user's loader: images, no labels of the model's classes
    small, small_arch, rep = vitslim.prune_model(model, "macs=0.6", calibration=own, round_to=4, keep=[0],
                                                 calib_batches=2, eval_batches=1)
    assert rep["macs_after"] <= 0.6 * rep["macs_before"] and rep["round_to"] == 4
    assert small.arch == small_arch == vitslim.resolve_arch(small_arch)
    assert small_arch["stages"][0]["blocks"][0] == arch["stages"][0]["blocks"][0]  # kept whole
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = batches(arch, 1)[0][0]
    assert small(x).shape == (len(x), arch["num_classes"])


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_prune_model_takes_the_model_a_training_script_holds(wrap, tmp_path):
    """torch.compile(model) and DistributedDataParallel(model) prune as the model inside (their state dicts prefix
    every key: the pruner's lookups failed with a KeyError traceback, or DDP had no .arch)."""
    import torch.distributed as dist
    arch = tiny_deit()
    model = build(arch)
    calib = batches(arch, 1)
    ref, ref_arch, _ = vitslim.prune_model(model, "macs=0.6", calibration=calib, calib_batches=1, eval_batches=1)
    if wrap == "ddp":
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.compile(model, backend="eager") if wrap == "compile" else \
            torch.nn.parallel.DistributedDataParallel(model)
        small, small_arch, _ = vitslim.prune_model(wrapped, "macs=0.6", calibration=calib, calib_batches=1,
                                                   eval_batches=1)
    finally:
        if wrap == "ddp":
            dist.destroy_process_group()
    assert small_arch == ref_arch
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in small.state_dict().items())


def test_prune_model_from_a_checkpoint_with_synthetic_data_and_a_latency_table(tmp_path):
    from pruning_nets import fake_table
    arch = tiny_swin()
    ck = tmp_path / "swin.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    table = fake_table(vitslim.resolve_arch(arch))
    table.save(str(tmp_path / "t.yaml"))
    _, _, rep = vitslim.prune_model(str(ck), "latency=0.7x", data="synthetic", table=tmp_path / "t.yaml",
                                    batch_size=4, calib_batches=1, eval_batches=1)
    assert rep["latency_kept"] <= 0.7 + 1e-9


def test_prune_model_input_errors_are_clear():
    arch = tiny_deit()
    with pytest.raises(vitslim.VitslimError, match=r"--target: got 'macs=2'|--target macs=2"):
        vitslim.prune_model(build(arch), "macs=2", calibration=batches(arch, 1))
    with pytest.raises(vitslim.VitslimError, match="has no .arch"):
        vitslim.prune_model(torch.nn.Linear(2, 2), "macs=0.5")
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_kep'"):
        vitslim.prune_model(build(arch), "macs=0.5", calibration=batches(arch, 1), min_kep=0.2)


def test_an_arch_that_differs_from_the_models_own_is_refused():
    arch = tiny_deit()
    with pytest.raises(vitslim.VitslimError, match="arch: differs from the model's own .arch"):
        vitslim.prune_model(build(arch), "macs=0.5", calibration=batches(arch, 1), arch=tiny_deit(blocks=3))


class _CountingImages(torch.utils.data.Dataset):
    """A user's own dataset that counts the images read from it."""

    def __init__(self, arch, n):
        g = torch.Generator().manual_seed(0)
        s = arch["input_size"]
        self.x, self.y = torch.randn(n, arch["in_chans"], s, s, generator=g), torch.randint(0, 10, (n,), generator=g)
        self.reads = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def test_prune_model_reads_only_calib_batches_of_a_dataloader():
    """A DataLoader over a training set as `calibration`: the pruner read all of it into memory (and scored on
    every batch, whatever calib_batches said), hours and gigabytes on ImageNet; now its first calib_batches."""
    arch = tiny_deit()
    ds = _CountingImages(arch, 400)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)
    small, _, rep = vitslim.prune_model(build(arch), "macs=0.6", calibration=loader, calib_batches=2, eval_batches=1)
    assert ds.reads == 8 and rep["calib_batches"] == 2 and rep["calib_images"] == 8
    assert rep["macs_after"] <= 0.6 * rep["macs_before"]


def test_prune_model_takes_the_users_own_importance_and_loss():
    """Your own criterion with vitslim's budgets and surgery, from prune_model: it took only the built-in criteria
    by name (`importance=` existed on pruning.prune alone), so a custom loss for Taylor scoring, or a criterion of
    your own, meant leaving the documented entry point."""
    from pruning import MagnitudeImportance, TaylorImportance
    import torch.nn.functional as F
    arch = tiny_deit(blocks=3)
    model, calib = build(arch), batches(arch, 2)

    class Mine(MagnitudeImportance):  # a criterion of one's own: here magnitude under another name, counted
        name, calls = "mine", 0

        def score(self, *a, **kw):
            Mine.calls += 1
            return super().score(*a, **kw)

    ref, ref_arch, _ = vitslim.prune_model(model, "macs=0.6", calibration=calib, criterion="magnitude", eval_batches=1)
    small, small_arch, rep = vitslim.prune_model(model, "macs=0.6", calibration=calib, importance=Mine(),
                                                 eval_batches=1)
    assert Mine.calls == 1 and rep["criterion"] == "mine" and small_arch == ref_arch
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in small.state_dict().items())

    seen = []

    def smoothed(logits, labels):  # the user's loss for Taylor scoring: label smoothing
        seen.append(len(logits))
        return F.cross_entropy(logits, labels, label_smoothing=0.1)

    _, _, rep = vitslim.prune_model(model, "macs=0.6", calibration=calib, importance=TaylorImportance(smoothed),
                                    eval_batches=1)
    assert seen == [4, 4] and rep["criterion"] == "taylor" and rep["macs_after"] <= 0.6 * rep["macs_before"]
    with pytest.raises(TypeError, match="importance: got str, expected a pruning.Importance"):
        vitslim.prune_model(model, "macs=0.6", calibration=calib, importance="magnitude")
    with pytest.raises(vitslim.VitslimError, match="criterion='taylor' and importance: both name the criterion"):
        vitslim.prune_model(model, "macs=0.6", calibration=calib, importance=Mine(), criterion="taylor")


def test_prune_model_fine_tunes_between_steps_on_the_users_own_loader():
    """train_batches: the user's DataLoader calibrates and fine-tunes between iterative steps (it needed data=, a
    path): the steps read on through it (wrapping when it runs out), and fine-tuning changes the network."""
    arch = tiny_deit(blocks=2)
    model = build(arch)
    ds = _CountingImages(arch, 12)  # 3 batches of 4: the 5 fine-tuning steps wrap around
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    kw = dict(iterative_steps=2, calib_batches=1, eval_batches=1, lr=1e-3)
    small, small_arch, rep = vitslim.prune_model(model, "macs=0.6", train_batches=loader, finetune_steps=5, **kw)
    assert [s["finetune"]["steps"] for s in rep["steps"]] == [2, 3]
    # calibration (1 batch, scored at every step) + held-out (1 batch) + 5 fine-tuning batches: not the whole set
    assert ds.reads == 4 * (1 + 1 + 5)
    same, same_arch, _ = vitslim.prune_model(model, "macs=0.6", calibration=[(ds.x[:4], ds.y[:4])], **kw)
    # not fine-tuned: other weights (and, scored after fine-tuning, maybe another second step's selection)
    assert small_arch != same_arch or not all(torch.equal(v, same.state_dict()[k]) for k, v in small.state_dict().items())


@pytest.mark.parametrize("kw, needle", [
    (dict(data="synthetic", train_batches=[]), "both give training images"),
    (dict(heldout_batches=[]), "heldout_batches: given without train_batches"),
    (dict(train_batches=[torch.zeros(4, 3, 32, 32)]), "expected (images, labels or None) pairs"),
    (dict(train_batches=[(torch.zeros(4, 3, 16, 16), None)]), "train_batches"),
    (dict(train_batches=[], finetune_steps=2, calibration="own"), "train_batches: gave no batch"),
    # only Python reaches these (the CLI requires --data): they name the arguments a Python caller has
    (dict(finetune_steps=2, calibration="own"), "finetune_steps=2: fine-tuning needs training images, expected data= "
                                                 "or train_batches="),
    (dict(), "no calibration data: expected data="),
])
def test_prune_model_train_batches_errors_are_one_line(kw, needle):
    from pruning import PruneError
    arch = tiny_deit()
    if kw.get("calibration") == "own":
        kw["calibration"] = batches(arch, 1)
    with pytest.raises(PruneError) as e:
        vitslim.prune_model(build(arch), "macs=0.6", calib_batches=1, eval_batches=1, **kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_batch_source_reads_on_across_calls_and_wraps_around_a_one_batch_loader():
    from pruning import BatchSource
    arch = tiny_deit()
    own = batches(arch, 3)
    src = BatchSource(arch, own)
    got = list(src.training(2)) + list(src.training(2))  # the second call goes on where the first stopped
    assert [b[0] is o[0] for b, o in zip(got, own + own)] == [True] * 4
    one = BatchSource(arch, own[:1])
    assert len(list(one.training(3))) == 3  # one batch a pass: three passes, not 'gave no batch'
    assert [b[0] is own[1][0] for b in BatchSource(arch, own, heldout=own[1:]).heldout(1)] == [True]
