"""`vitslim prune` with awkward but legal input (a tiny .pt dataset drawn for many batches, greyscale
folders, a cost model whose units interact) and bad input refused before any work."""
import os

import pytest
import torch

import vitslim
from vitslim.cli import main

from pruning.pruner import DataSource, PruneConfig, prune
from pruning_nets import batches, build, tiny_deit, tiny_swin

from test_prune_cli import FAST  # noqa: E402 - the same quick settings


def one_line(capsys, argv, pattern):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and pattern in err, err
    return err


def test_a_small_tensor_file_serves_any_number_of_batches(deit_ckpt, tmp_path, capsys):
    """10 images, 2 calibration + 4 held-out batches of 4 and 6 fine-tuning steps: later epochs of the file."""
    p = tmp_path / "d.pt"
    torch.save({"images": torch.randn(10, 3, 32, 32), "labels": torch.randint(0, 10, (10,))}, p)
    out = tmp_path / "r"
    rc = main(["prune", "--checkpoint", deit_ckpt, "--data", str(p), "--target", "macs=0.6", "--out", str(out),
               "--finetune-steps", "6", "--iterative-steps", "2"] + FAST)
    assert rc == 0, capsys.readouterr().err
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("content,pattern", [
    ({"images": torch.zeros(0, 3, 32, 32)}, "holds no images (N = 0)"),
    ({"images": torch.randn(6, 3, 32, 32), "labels": torch.zeros(4, dtype=torch.long)}, "labels are (4,)"),
    ({"images": torch.randn(6, 3, 32, 32), "labels": torch.zeros(6)}, "expected integer class indices"),
])
def test_a_bad_tensor_file_is_one_line(deit_ckpt, tmp_path, capsys, content, pattern):
    p = tmp_path / "d.pt"
    torch.save(content, p)
    one_line(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", str(p), "--target", "macs=0.5",
                      "--out", str(tmp_path / "r")] + FAST, pattern)


def test_a_truncated_tensor_file_is_one_line(deit_ckpt, tmp_path, capsys):
    p = tmp_path / "d.pt"
    torch.save({"images": torch.randn(64, 3, 32, 32)}, p)
    p.write_bytes(p.read_bytes()[:5000])
    one_line(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", str(p), "--target", "macs=0.5",
                      "--out", str(tmp_path / "r")] + FAST, "--data: ")


def _folder(root, mode, n=6, size=40):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            px = (torch.rand(size, size, 3 if mode == "RGB" else 1, generator=g) * 255).byte().numpy()
            Image.fromarray(px if mode == "RGB" else px[:, :, 0], mode).save(root / c / f"{i}.png")


def test_a_greyscale_model_calibrates_on_a_greyscale_folder(tmp_path, capsys):
    arch = tiny_deit(in_chans=1)
    arch["num_classes"] = 2
    ck = tmp_path / "g.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    _folder(tmp_path / "imgs", "L")
    rc = main(["prune", "--checkpoint", str(ck), "--data", str(tmp_path / "imgs"), "--target", "macs=0.6",
               "--out", str(tmp_path / "r")] + FAST)
    assert rc == 0, capsys.readouterr().err
    ds = DataSource(str(tmp_path / "imgs"), vitslim.resolve_arch(arch), batch_size=4)
    x, y = ds.calibration(1)[0]
    assert x.shape == (4, 1, 32, 32) and y is not None  # 2 folders = the model's 2 classes


def test_held_out_images_are_kept_out_of_calibration(tmp_path):
    _folder(tmp_path / "imgs", "RGB", n=10)
    arch = vitslim.resolve_arch({**tiny_deit(), "num_classes": 2})
    ds = DataSource(str(tmp_path / "imgs"), arch, batch_size=2, heldout_images=4)
    assert not ds.heldout_shared and len(ds._held) == 4 and len(ds._train) == 16
    assert not {p for p, _ in ds._held.samples} & {p for p, _ in ds._train.samples}
    small = DataSource(str(tmp_path / "imgs"), arch, batch_size=2, heldout_images=12)  # 20 < 2 x 12: shared
    assert small.heldout_shared and len(small._held) == len(small._train) == 20


def test_labels_option(tmp_path):
    arch = tiny_deit()  # 10 classes: synthetic data has a 10-class task, so auto takes its labels
    assert DataSource("synthetic", arch, batch_size=4).labels_valid
    assert not DataSource("synthetic", arch, batch_size=4, labels="model").labels_valid
    assert DataSource("synthetic", arch, batch_size=4).calibration(1)[0][1] is not None
    assert DataSource("synthetic", arch, batch_size=4, labels="model").calibration(1)[0][1] is None
    _folder(tmp_path / "imgs", "RGB", n=2)  # 2 classes for a 10-class model
    from pruning.units import PruneError
    with pytest.raises(PruneError, match=r"--labels data: the labels of --data .* \(2 classes\) are not classes of "
                                         r"the model \(10 classes\)"):
        DataSource(str(tmp_path / "imgs"), arch, batch_size=4, labels="data")


def test_data_of_other_classes_is_said_and_the_report_keeps_paths_absolute(tmp_path, capsys,
                                                                                         monkeypatch):
    import json
    ck = tmp_path / "d.pt"
    vitslim.save_checkpoint(build(tiny_deit()), tiny_deit(), ck)  # 10 classes
    _folder(tmp_path / "imgs", "RGB", n=4)  # 2
    monkeypatch.chdir(tmp_path)
    rc = main(["prune", "--checkpoint", "d.pt", "--data", "imgs", "--target", "macs=0.6", "--out", "r"] + FAST)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "note: --data imgs (2 classes) does not match the model's 10 classes: scored and evaluated against the " \
           "unpruned model's own top-1" in out
    rep = json.load(open(tmp_path / "r" / "report.json"))
    assert rep["labels"] == "model" and rep["data"] == str(tmp_path / "imgs") and rep["checkpoint"] == str(ck)
    assert rep["torch_threads"] == torch.get_num_threads()


@pytest.mark.parametrize("extra,pattern", [
    (["--lr", "-1", "--finetune-steps", "2"], "--lr: got -1.0, expected a learning rate > 0"),
    (["--kd"], "--kd: distillation happens during fine-tuning"),
    (["--lr", "1e-3"], "--lr: the fine-tuning learning rate, expected --finetune-steps N > 0"),
    (["--lr", "1e-3", "--iterative-steps", "2"], "--lr: the fine-tuning learning rate, expected --finetune-steps"),
    (["--momentum", "0.5"], "--momentum: smooths scores across iterative steps, expected --iterative-steps K > 1"),
    (["--momentum", "0.5", "--finetune-steps", "2"], "--momentum: smooths scores across iterative steps"),
])
def test_bad_settings_are_refused_before_pruning(deit_ckpt, tmp_path, capsys, extra, pattern):
    one_line(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5",
                      "--out", str(tmp_path / "r")] + FAST + extra, pattern)
    assert not (tmp_path / "r").exists()


def test_an_output_under_a_file_is_refused_first(deit_ckpt, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    one_line(capsys, ["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5",
                      "--out", str(tmp_path / "f" / "sub")] + FAST, "is not a folder")


def test_an_implied_latency_target_says_where_it_came_from(tmp_path, capsys, quick_tables):
    from pruning_nets import fake_table
    arch = tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    fake_table(arch).save(str(tmp_path / "t.yaml"))
    err = one_line(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.5",
                            "--table", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "r"), "--no-depth"] + FAST,
                   "latency=0.5x was added to macs=0.5")
    assert "--no-proportional" in err


def test_interrupted_prune_says_nothing_was_written(deit_ckpt, tmp_path, capsys, monkeypatch):
    import pruning.pruner as P

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(P, "prune", interrupted)
    rc = main(["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5",
               "--out", str(tmp_path / "r")] + FAST)
    err = capsys.readouterr().err
    assert rc == 130 and "no output was written" in err and not (tmp_path / "r").exists()


def test_fine_tuning_steps_left_over_go_to_the_last_steps(monkeypatch):
    import pruning.pruner as P
    seen = []
    real = P.finetune

    def spy(model, batches, steps, *a, **k):
        seen.append(steps)
        return real(model, batches, steps, *a, **k)
    monkeypatch.setattr(P, "finetune", spy)
    arch = tiny_deit()
    prune(build(arch), arch, PruneConfig(target="macs=0.5", iterative_steps=5, finetune_steps=3, calib_batches=1,
                                         eval_batches=0), data=DataSource("synthetic", arch, batch_size=4))
    assert seen == [1, 1, 1]  # steps 3, 4, 5: the last pruning step is followed by recovery
    # (finetune is called only for steps with work)


def _concave_ms(a):
    """Costs that interact: removing units saves less than the sum of their parts says (as embedding
    widths and interpolated table entries do), so an additive selection lands over its budget."""
    tot = sum((b["heads"] * (b["qk_dim"] + b["v_dim"]) + b["ffn_hidden"]) * st["width"] ** 1.3 / 1000
              for st in a["stages"] for b in st["blocks"])
    return 1.0 + tot ** 0.8


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
@pytest.mark.parametrize("steps", [1, 2])
def test_a_latency_target_with_interacting_costs_is_met(make, steps):
    arch = make()
    full = _concave_ms(arch)
    res = prune(build(arch), arch, PruneConfig(target="latency=0.5x", iterative_steps=steps, prune_embed=True,
                                               calib_batches=1, eval_batches=0),
                calibration=batches(arch, 1), cost_fn=_concave_ms)
    assert _concave_ms(res.arch) <= 0.5 * full * (1 + 1e-6)
    last = res.report["steps"][-1]
    assert last["tightened"]  # the additive plan ran over: selected again under a lower budget
    assert min(b[0] for m in last["tightened"].values() for b in m) <= last["budget"]


def test_a_table_of_the_same_family_but_other_geometry_is_one_line(tmp_path, capsys, quick_tables):
    from pruning_nets import fake_table
    fake_table(tiny_deit()).save(str(tmp_path / "t.yaml"))
    arch = tiny_deit(in_chans=1)  # its patch embedding has no entry to price it from
    ck = tmp_path / "g.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    p = tmp_path / "d.pt"
    torch.save(torch.randn(8, 1, 32, 32), p)
    err = one_line(capsys, ["prune", "--checkpoint", str(ck), "--data", str(p), "--target", "latency=0.8x",
                            "--table", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "r")] + FAST,
                   "cannot price this model (cannot interpolate vit_embed")
    assert "vitslim latency build --arch CHECKPOINT --prune-grid" in err


def test_nan_settings_are_usage_errors(deit_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.5",
              "--out", str(tmp_path / "r"), "--lr", "nan"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--lr: invalid finite float value: 'nan'" in err


def test_the_report_says_how_many_distinct_images_repeated_batches_rest_on(tmp_path, capsys):
    import json
    arch = tiny_deit()
    arch["num_classes"] = 2
    ck = tmp_path / "d.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    _folder(tmp_path / "imgs", "RGB", n=10)  # 20 images
    rc = main(["prune", "--checkpoint", str(ck), "--data", str(tmp_path / "imgs"), "--target", "macs=0.6",
               "--batch-size", "16", "--calib-batches", "2", "--eval-batches", "1", "--quiet", "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    rep = json.load(open(tmp_path / "r" / "report.json"))
    assert rep["calib_images"] == 32 and rep["calib_distinct_images"] < 32
    assert rep["calib_distinct_images"] == DataSource(str(tmp_path / "imgs"), vitslim.resolve_arch(arch), batch_size=16,
                                                      heldout_images=16).calib_size
    assert rep["heldout_distinct_images"] <= rep["heldout_before"]["images"]


def test_warnings_reach_the_user_as_one_line(tmp_path):
    """A skipped file is one `warning:` line on stderr, not a Python warning with its source path and code line."""
    import subprocess
    import sys
    arch = {**tiny_deit(), "num_classes": 2}
    vitslim.save_checkpoint(build(arch), arch, tmp_path / "d.pt")
    _folder(tmp_path / "imgs", "RGB", n=4)
    (tmp_path / "imgs" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    root = os.path.dirname(os.path.dirname(vitslim.__file__))
    r = subprocess.run([sys.executable, "-m", "vitslim", "prune", "--checkpoint", str(tmp_path / "d.pt"), "--data",
                        str(tmp_path / "imgs"), "--target", "macs=0.6", "--out", str(tmp_path / "r")] + FAST,
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "broken.jpg" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: data directory ") and "skipped 1 unreadable" in lines[0]
    assert "UserWarning" not in r.stderr and "scan_image_folder(" not in r.stderr


def test_threads_are_set_and_recorded(deit_ckpt, tmp_path, capsys):
    import json
    old = torch.get_num_threads()
    try:
        rc = main(["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.6", "--threads", "1",
                   "--out", str(tmp_path / "r")] + FAST)
        assert rc == 0, capsys.readouterr().err
        assert json.load(open(tmp_path / "r" / "report.json"))["torch_threads"] == 1
    finally:
        torch.set_num_threads(old)
    rc = main(["prune", "--checkpoint", deit_ckpt, "--data", "synthetic", "--target", "macs=0.6", "--threads", "0",
               "--out", str(tmp_path / "r0")] + FAST)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == "vitslim prune: error: --threads: got 0, expected an integer >= 1"


def test_without_labels_every_loss_is_against_the_unpruned_models_top1(monkeypatch):
    """--labels model: fine-tuning without a teacher and the scores of later steps use the unpruned model's
    top-1, not the pruned model's own (which would only sharpen whatever it drifted to)."""
    import pruning.importance as pi
    import pruning.pruner as pp
    arch = tiny_deit()
    model = build(arch).eval()
    data = DataSource("synthetic", arch, batch_size=4, labels="model")

    def top1(x):
        with torch.no_grad():
            return pp._logits(model(x)).argmax(-1)

    seen, real_ft, real_score = {"ft": [], "score": []}, pp.finetune, pi.TaylorImportance.score

    def finetune(m, batches, *a, **k):
        got = list(batches)
        seen["ft"] += got
        return real_ft(m, iter(got), *a, **k)

    def score(self, m, arch_, calibration, **k):
        seen["score"] += list(calibration)
        return real_score(self, m, arch_, calibration, **k)

    monkeypatch.setattr(pp, "finetune", finetune)
    monkeypatch.setattr(pi.TaylorImportance, "score", score)
    cfg = PruneConfig(target="macs=0.6", iterative_steps=2, finetune_steps=6, calib_batches=2, eval_batches=1, lr=1e-2)
    prune(model, arch, cfg, data=data)
    assert len(seen["ft"]) == 6 and len(seen["score"]) == 4
    for x, y in seen["ft"] + seen["score"]:
        assert y is not None and torch.equal(y, top1(x))
    assert list(pp.reference_labels([(seen["ft"][0][0], torch.tensor([0, 1, 99, 2]))], model, arch["num_classes"]))[0][1] \
        .tolist() == top1(seen["ft"][0][0]).tolist()  # an index outside the classes: relabelled too
    kept = torch.tensor([0, 1, 2, 3]) % arch["num_classes"]
    assert list(pp.reference_labels([(seen["ft"][0][0], kept)], model, arch["num_classes"]))[0][1] is kept


def test_prune_leaves_the_callers_random_state_and_does_not_depend_on_it():
    """prune seeds torch's RNG itself (config.seed); the caller's state is back when it returns, and the pruned
    (and fine-tuned) network is the same whatever it was."""
    arch = tiny_deit()
    model = build(arch)
    cfg = PruneConfig(target="macs=0.6", iterative_steps=2, finetune_steps=3, calib_batches=2, eval_batches=1)
    outs = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        res = prune(model, arch, cfg, data=DataSource("synthetic", arch, batch_size=4, seed=0))
        assert torch.equal(torch.get_rng_state(), state)
        outs.append(res.model.state_dict())
    assert outs[0].keys() == outs[1].keys() and all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_an_image_folder_is_normalised_and_cropped_as_asked(tmp_path, capsys):
    """timm's augreg and CLIP ViTs were trained on mean/std 0.5 and the 384 models evaluate at crop 1.0: calibrating
    them with ImageNet's statistics and DeiT's 0.875 crop skews every Taylor score."""
    import json
    arch = tiny_deit()
    arch["num_classes"] = 2
    _folder(tmp_path / "imgs", "RGB", n=6)
    a = vitslim.resolve_arch(arch)
    x0 = DataSource(str(tmp_path / "imgs"), a, batch_size=4).calibration(1)[0][0]
    x1 = DataSource(str(tmp_path / "imgs"), a, batch_size=4, mean="0.5,0.5,0.5", std=[0.5, 0.5, 0.5],
                    crop_pct=1.0).calibration(1)[0][0]
    assert x1.min() >= -1 - 1e-6 and x1.max() <= 1 + 1e-6 and x0.min() < -1.5  # ImageNet's std spreads them wider
    ck = tmp_path / "m.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    rc = main(["prune", "--checkpoint", str(ck), "--data", str(tmp_path / "imgs"), "--target", "macs=0.6",
               "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5", "--crop-pct", "1", "--out", str(tmp_path / "r")] + FAST)
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r" / "report.json").read_text())
    assert rep["preprocessing"] == {"mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0}
    for args, msg in ((["--mean", "0.5,0.5"], "--mean: got 0.5,0.5, expected 3 comma-separated numbers"),
                      (["--std", "0.5,0,0.5"], "--std: got 0.5,0,0.5, expected 3 comma-separated positive numbers"),
                      (["--crop-pct", "1.5"], "--crop-pct: got 1.5, expected a number in (0, 1]")):
        one_line(capsys, ["prune", "--checkpoint", str(ck), "--data", str(tmp_path / "imgs"), "--target", "macs=0.6",
                          "--out", str(tmp_path / "bad")] + args + FAST, msg)
    one_line(capsys, ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--target", "macs=0.6", "--mean",
                      "0.5,0.5,0.5", "--out", str(tmp_path / "bad")] + FAST, "--mean: applies to an ImageFolder")
