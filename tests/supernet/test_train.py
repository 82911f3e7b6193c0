"""Supernet training: config validation, exact resume, refusal to resume a different config,
alphas that move, distillation, and the run directory the CLI reads."""
import json
import os

import pytest
import torch
import yaml

import vitslim
from supernet.errors import VitslimError
from supernet.train import ConfigError, TrainConfig, config_diff, load_config, load_supernet, read_run, train
from vitslim.cli import main

SPACE = {"version": 1, "family": "efficientformer", "input_size": 32, "num_classes": 4, "width_step": 16,
         "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 8},
         "stages": [{"max_depth": 1, "max_width": 16, "min_width": 16, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 1, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 2, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "meta3d", "identity"]},
                    {"max_depth": 2, "max_width": 48, "min_width": 32, "candidates": ["meta4d", "meta3d", "identity"]}]}


def config(**over):
    d = {"version": 1, "space": SPACE, "seed": 0, "steps": 6, "batch_size": 8, "mode": "hard", "widths": "random",
         "data": {"type": "synthetic", "train_size": 64, "heldout_size": 16},
         "optimizer": {"lr": 0.002, "warmup_steps": 2, "grad_clip": 5.0},
         "alpha": {"lr": 0.05, "start_step": 1}, "temperature": {"start": 3.0, "end": 1.0},
         "checkpoint_every": 2, "log_every": 1, "eval_batches": 1}
    d.update(over)
    return d


def write_config(path, **over):
    with open(path, "w") as f:
        yaml.safe_dump(config(**over), f)
    return str(path)


def losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_resume_continues_exactly_where_it_stopped(tmp_path, mode):
    cfg = TrainConfig.from_dict(config(mode=mode))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a, progress=False)
    rep = train(cfg, b, progress=False, stop_at=3)
    assert rep["step"] == 3 and not rep["finished"] and read_run(b)["step"] == 3
    train(cfg, b, resume=True, progress=False)
    assert losses(a) == losses(b) and [s for s, _ in losses(b)] == list(range(1, 7))
    sa, sb = read_run(a)["model"], read_run(b)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_refuses_a_different_config_and_says_what_differs(tmp_path):
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(steps=2)), run, progress=False)
    other = TrainConfig.from_dict(config(steps=2, optimizer={"lr": 0.01, "warmup_steps": 2, "grad_clip": 5.0}))
    with pytest.raises(ConfigError, match=r"cannot resume .*optimizer.lr: 0.002 -> 0.01"):
        train(other, run, resume=True, progress=False)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint.pt at step 2\) of another config: "
                                          r"optimizer.lr: 0.002 -> 0.01; choose another --out"):
        train(other, run, progress=False)
    before = read_run(run)["model"]
    rep = train(TrainConfig.from_dict(config(steps=2)), run, progress=False)  # the same command again: resumes
    assert rep["finished"] and rep["step"] == 2
    after = read_run(run)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    # logging frequency may change on resume: it changes no number
    assert config_diff({"log_every": 1, "seed": 0}, {"log_every": 5, "seed": 0}) == []


def test_alphas_move_and_importance_is_saved_with_the_run(tmp_path):
    run = str(tmp_path / "run")
    rep = train(TrainConfig.from_dict(config(steps=12, widths="max", alpha={"lr": 0.1, "start_step": 0})), run,
                progress=False)
    model, obj = load_supernet(run)
    assert max(a.abs().max().item() for a in model.alphas) > 1e-3  # Adam: any gradient moves an alpha by ~lr
    assert rep["alpha_dev"] > 0 and rep["finished"] and "heldout_acc_best" in rep
    with open(os.path.join(run, "importance.json")) as f:
        imp = json.load(f)
    assert imp == obj["importance"] and imp["step"] == 12
    assert imp["probabilities"] != [[[1 / len(c)] * len(c)] * len(p) for c, p in zip(imp["candidates"], imp["probabilities"])]
    assert len(imp["stage"]) == 4 and all(s > 0 for s in imp["stage"])
    with open(os.path.join(run, "report.json")) as f:
        assert json.load(f)["best_choice"] == model.best_choice()


def test_alphas_stay_uniform_before_their_start_step(tmp_path):
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(steps=3, alpha={"lr": 0.1, "start_step": 10})), run, progress=False)
    model, _ = load_supernet(run)
    assert all(torch.equal(a, torch.zeros_like(a)) for a in model.alphas)


def test_distillation_from_a_teacher_checkpoint(tmp_path):
    from supernet.supernet import MetaPathSupernet
    space = dict(SPACE, distillation=True)
    teacher, arch = MetaPathSupernet(space).extract(MetaPathSupernet(space).space.largest_choice())
    vitslim.save_checkpoint(teacher, arch, tmp_path / "teacher.pt")
    cfg = write_config(tmp_path / "c.yaml", space=space, steps=2,
                       distillation={"teacher": "teacher.pt", "weight": 0.5, "kind": "hard"})
    rep = train(load_config(cfg), str(tmp_path / "run"), progress=False)
    assert rep["finished"]


@pytest.mark.parametrize("over,needle", [
    ({"mode": "mixed"}, "mode: got 'mixed'"),
    ({"steps": 0}, "steps: got 0"),
    ({"optimizer": {"learning_rate": 1}}, "optimizer.learning_rate: unknown key"),
    ({"temperature": {"schedule": "step"}}, "temperature.schedule: got 'step'"),
    ({"extra": 1}, "extra: unknown key"),
    ({"data": {"type": "imagefolder"}}, "data.train_dir: missing"),
    ({"distillation": {"weight": 0.5}}, "distillation.teacher: got None"),
    ({"optimizer": {"lr": 0.001, "min_lr": 0.01}}, "optimizer.min_lr: got 0.01, expected at most optimizer.lr (0.001)"),
    ({"optimizer": {"lr": 0.001, "warmup_steps": 7}}, "optimizer.warmup_steps: got 7, expected at most steps (6)"),
    ({"data": {"image_size": 48}}, "data.image_size: got 48, expected the search space's input_size (32)"),
    ({"data": {"num_classes": 5}}, "data.num_classes: got 5, expected the search space's num_classes (4)"),
])
def test_bad_config_names_the_key(tmp_path, over, needle):
    with pytest.raises(VitslimError) as e:
        load_config(write_config(tmp_path / "c.yaml", **over))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_train_show_extract(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", steps=4)
    run = str(tmp_path / "run")
    assert main(["supernet", "train", "--config", cfg, "--out", run, "--no-progress", "--stop-at", "2"]) == 0
    assert main(["supernet", "train", "--out", run, "--resume", "--no-progress"]) == 0  # config from the run
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main(["supernet", "show", run]) == 0
    out = capsys.readouterr().out
    # numbered from 0, as arch configs, search logs (stage2.block1) and reports number them
    assert "stage 3: importance" in out and "stage 4:" not in out and "block 0:" in out and "3D" in out
    assert main(["supernet", "show", run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    assert main(["supernet", "show", run, "--plot", str(tmp_path / "imp.png")]) == 0
    assert os.path.getsize(tmp_path / "imp.png") > 1000
    import sys
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:  # without matplotlib: said first, nothing printed before it
        mp.setitem(sys.modules, "matplotlib", None)
        assert main(["supernet", "show", run, "--plot", str(tmp_path / "imp2.png")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "needs matplotlib" in err and not os.path.exists(tmp_path / "imp2.png")


def test_cli_extract_writes_a_model_equal_to_the_supernet(tmp_path, capsys):
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(steps=2)), run, progress=False)
    choice = {"widths": [16, 16, 32, 32], "blocks": [["identity"], ["meta4d"], ["meta4d", "meta3d"], ["meta3d", "identity"]]}
    out = str(tmp_path / "sub")
    assert main(["supernet", "extract", run, "--choice", json.dumps(choice), "--out", out]) == 0
    model, arch = vitslim.load_checkpoint(os.path.join(out, "model.pt"))
    assert vitslim.load_arch(os.path.join(out, "arch.yaml")) == arch
    sn, _ = load_supernet(run)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = sn(x, mode="fixed", choice=choice)
        assert (model(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    before = open(os.path.join(out, "model.pt"), "rb").read()
    capsys.readouterr()
    assert main(["supernet", "extract", run, "--choice", "best", "--widths", "16,16,16,32", "--out", out]) == 2
    assert "already holds arch.yaml, model.pt, choice.json" in capsys.readouterr().err
    assert open(os.path.join(out, "model.pt"), "rb").read() == before
    assert main(["supernet", "extract", run, "--choice", "best", "--widths", "16,16,16,32", "--out", out,
                 "--overwrite"]) == 0
    assert main(["supernet", "extract", run, "--arch", os.path.join(out, "arch.yaml"), "--out", str(tmp_path / "s2")]) == 0
    # an arch outside the space (another FFN width, class count) is refused, not silently replaced by the space's
    a = vitslim.load_arch(os.path.join(out, "arch.yaml"))

    def first_ffn(a):  # which blocks "best" keeps depends on the trained weights (torch's init stream): any with an FFN
        return next(b for s in a["stages"] for b in s["blocks"] if "ffn_hidden" in b)
    for edit, needle in ((lambda a: first_ffn(a).update(ffn_hidden=8), "ffn_hidden: got 8"),
                         (lambda a: a.update(num_classes=7), "arch num_classes: got 7, expected 4")):
        b = json.loads(json.dumps(a))
        edit(b)
        vitslim.save_arch(b, str(tmp_path / "b.yaml"))
        capsys.readouterr()
        assert main(["supernet", "extract", run, "--arch", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "s3")]) == 2
        err = capsys.readouterr().err
        assert needle in err and "not inside this space" in err and not (tmp_path / "s3").exists()


@pytest.mark.parametrize("argv,needle", [
    (["supernet", "extract", "RUN", "--choice", '{"widths": [16, 16, 32, 32], "blocks": [["meta4d"], ["meta4d"], '
      '["meta3d", "meta4d"], ["meta4d", "meta4d"]]}', "--out", "OUT"], "choice.blocks[2][1]: got 'meta4d'"),
    (["supernet", "extract", "RUN", "--choice", "{nope", "--out", "OUT"], "--choice: got '{nope'"),
    (["supernet", "extract", "RUN", "--choice", '{"widths": [16, 16, 32, 32], "blocks": [["meta4d"], ["meta4d"], '
      '["meta4d", "meta4d"], ["meta4d", "meta4d"]], "width": [16]}', "--out", "OUT"],
     "choice.width: got [16], expected no other keys than widths and blocks"),
    (["supernet", "extract", "RUN", "--choice", "best", "--widths", "16,16", "--out", "OUT"],
     "choice.widths: got [16, 16], expected 4 entries, one per stage"),
    (["supernet", "show", "NORUN"], "no such run directory"),
    (["supernet", "train", "--out", "NORUN"], "--config: missing"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    run = str(tmp_path / "run")
    if "RUN" in argv:
        train(TrainConfig.from_dict(config(steps=2)), run, progress=False)
    argv = [a.replace("NORUN", str(tmp_path / "none")).replace("RUN", run).replace("OUT", str(tmp_path / "o")) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_cli_extract_refuses_widths_it_would_ignore(tmp_path, capsys):
    """--widths sets the widths of --choice best / largest; an arch or a JSON choice has widths of its own, and
    --widths beside them was silently dropped (the network written was not of the widths asked for)."""
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(steps=2)), run, progress=False)
    choice = json.dumps({"widths": [16, 16, 32, 32], "blocks": [["meta4d"], ["meta4d"], ["meta4d", "meta4d"],
                                                                ["meta4d", "meta4d"]]})
    assert main(["supernet", "extract", run, "--choice", choice, "--out", str(tmp_path / "a")]) == 0
    for how in (["--choice", choice], ["--arch", str(tmp_path / "a" / "arch.yaml")]):
        capsys.readouterr()
        assert main(["supernet", "extract", run, *how, "--widths", "16,16,16,32", "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--widths: only with --choice best or largest" in err[0], err
        assert not (tmp_path / "b").exists()


def test_cli_data_directory_without_images_fails_in_one_line(tmp_path, capsys):
    os.makedirs(tmp_path / "imgs" / "a")
    (tmp_path / "imgs" / "a" / "x.txt").write_text("no image")
    cfg = write_config(tmp_path / "c.yaml", data={"type": "imagefolder", "train_dir": "imgs"})
    capsys.readouterr()
    assert main(["supernet", "train", "--config", cfg, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no image files" in err[0]
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


@pytest.mark.parametrize("name", ["supernet_tiny.yaml", "supernet_l1_imagenet.yaml"])
def test_shipped_configs_are_valid(name):
    root = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")
    cfg = load_config(os.path.join(root, name))
    assert cfg.steps > 0 and cfg.space.family == "efficientformer"
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()  # what a run saves loads back


def test_a_folder_holding_someone_elses_files_is_refused_untouched(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "config.yaml").write_text("mine: 1\n")
    (out / "metrics.jsonl").write_text("notes\n")
    with pytest.raises(ConfigError, match="holds config.yaml, metrics.jsonl but no checkpoint.pt"):
        train(TrainConfig.from_dict(config()), str(out), progress=False, device="cpu")
    assert (out / "config.yaml").read_text() == "mine: 1\n" and (out / "metrics.jsonl").read_text() == "notes\n"


def test_a_start_interrupted_before_its_first_checkpoint_reruns(tmp_path):
    out = str(tmp_path / "r")
    cfg = TrainConfig.from_dict(config())
    train(cfg, out, progress=False, device="cpu", stop_at=0)
    os.remove(os.path.join(out, "checkpoint.pt"))  # as if killed before the first checkpoint landed
    rep = train(cfg, out, progress=False, device="cpu")
    assert rep["step"] == 6


def test_a_second_training_on_the_same_folder_is_refused(tmp_path):
    from supernet.runlock import run_lock
    out = str(tmp_path / "r")
    with run_lock(out):
        with pytest.raises(ConfigError, match="another supernet training is running in it"):
            train(TrainConfig.from_dict(config()), out, progress=False, device="cpu")
    assert os.listdir(out) == [".lock"]  # nothing of the refused run


def test_a_run_on_read_only_storage_is_refused_in_one_line(tmp_path, monkeypatch):
    """An existing folder on a read-only mount (a finished run resumed there too): the lock cannot be made.
    open() fails as on such a mount (chmod does not stop root, which tests may run as)."""
    import errno
    import supernet.runlock as rl
    out = tmp_path / "r"
    cfg = TrainConfig.from_dict(config())
    train(cfg, str(out), progress=False, device="cpu")
    real = open

    def read_only(path, *a, **k):
        if os.path.basename(path) == ".lock":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, *a, **k)

    monkeypatch.setattr(rl, "open", read_only, raising=False)
    before = sorted(os.listdir(out))
    for resume in (False, True):
        with pytest.raises(ConfigError) as e:
            train(cfg, str(out), resume=resume, progress=False, device="cpu")
        assert str(e.value) == f"--out {out}: cannot write in it (Read-only file system)"
    assert sorted(os.listdir(out)) == before


def test_a_refused_fresh_run_leaves_no_folder(tmp_path):
    bad = config(data={"type": "imagefolder", "train_dir": str(tmp_path / "nope")})
    with pytest.raises(VitslimError):
        train(TrainConfig.from_dict(bad), str(tmp_path / "r"), progress=False, device="cpu")
    assert not (tmp_path / "r").exists()


def test_resume_after_a_torn_metrics_line(tmp_path):
    """Killed while writing a metrics line: the resume drops the torn line and the curve is whole again."""
    cfg = TrainConfig.from_dict(config())
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a, progress=False)
    train(cfg, b, progress=False, stop_at=4)  # checkpoint at 4
    with open(os.path.join(b, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 1.')  # the kill, mid-line
    train(cfg, b, resume=True, progress=False)
    assert losses(a) == losses(b) and [s for s, _ in losses(b)] == list(range(1, 7))


def test_a_batch_larger_than_the_training_split_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^batch_size: got 100, expected at most the training split's 64 images"):
        train(TrainConfig.from_dict(config(batch_size=100)), str(run), progress=False)
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("argv", [["supernet", "extract", "RUN", "--choice", "best", "--out", "FILE/o"],
                                  ["supernet", "show", "RUN", "--plot", "FILE/p.png"]])
def test_cli_output_under_a_file_is_refused_in_one_line(tmp_path, capsys, argv):
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(steps=2)), run, progress=False)
    (tmp_path / "f").write_text("mine")
    argv = [a.replace("RUN", run).replace("FILE", str(tmp_path / "f")) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a folder" in err[0] and (tmp_path / "f").read_text() == "mine"


def test_show_plot_writes_the_named_file_in_the_named_format(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(steps=2)), run, progress=False)
    for name, magic in (("imp", b"\x89PNG"), ("imp.svg", b"<?xml")):
        assert main(["supernet", "show", run, "--plot", str(tmp_path / name)]) == 0
        assert (tmp_path / name).read_bytes().startswith(magic)
    assert sorted(os.listdir(tmp_path)) == ["imp", "imp.svg", "run"]  # no temp files, no imp.png beside imp


def test_re_running_the_same_command_after_a_stop_resumes_exactly(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = TrainConfig.from_dict(config())
    train(cfg, a, progress=False)
    train(cfg, b, progress=False, stop_at=3)  # as a kill after the step-3 checkpoint leaves it
    train(cfg, b, progress=False)             # no --resume: the same config continues
    assert losses(a) == losses(b)
    sa, sb = read_run(a)["model"], read_run(b)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def same_state(x, y) -> bool:
    """Two loaded checkpoints hold the same keys, tensors (dtype, shape, values) and other values, nested."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same_state(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(same_state, x, y))
    return x == y


def test_a_resumed_run_ends_with_the_uninterrupted_runs_checkpoint_rng_states_included(tmp_path):
    """Not only the weights: the RNG states saved with them too (the data loaders drew their base seed from
    torch's global RNG whenever they started iterating, once more in a resumed run, so it saved another state)."""
    cfg = TrainConfig.from_dict(config(eval_every=2))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a, progress=False)
    train(cfg, b, progress=False, stop_at=3)
    train(cfg, b, progress=False)
    ra, rb = read_run(a), read_run(b)
    assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])
    assert same_state(ra, rb)


def test_a_stop_between_logged_steps_leaves_the_uninterrupted_curve_and_the_report_has_the_final_loss(tmp_path):
    cfg = TrainConfig.from_dict(config(steps=8, log_every=4, checkpoint_every=0))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(cfg, a, progress=False)
    train(cfg, b, progress=False, stop_at=3)  # its last step is logged (done == end), off the schedule
    assert [s for s, _ in losses(b)] == [3]
    train(cfg, b, resume=True, progress=False)
    assert losses(a) == losses(b) and [s for s, _ in losses(b)] == [4, 8]
    with open(os.path.join(b, "report.json")) as f:
        rep = json.load(f)
    assert rep["final_loss"] == losses(b)[-1][1] and 0 <= rep["final_train_acc"] <= 1


def test_a_config_names_a_shipped_space_or_a_path(tmp_path):
    from supernet.space import SPACES_DIR, SearchSpace
    by_name = TrainConfig.from_dict({"space": "tiny"}, base_dir=str(tmp_path))
    assert by_name.space.to_dict() == SearchSpace.load(os.path.join(SPACES_DIR, "tiny.yaml")).to_dict()
    assert TrainConfig.from_dict({"space": "tiny.yaml"}, base_dir=str(tmp_path)).space.name == "tiny"
    # a file of that name beside the config comes first
    text = open(os.path.join(SPACES_DIR, "tiny.yaml")).read().replace("name: tiny", "name: mine")
    (tmp_path / "tiny.yaml").write_text(text)
    assert TrainConfig.from_dict({"space": "tiny"}, base_dir=str(tmp_path)).space.name == "tiny"  # not a file: shipped
    assert TrainConfig.from_dict({"space": "tiny.yaml"}, base_dir=str(tmp_path)).space.name == "mine"
    with pytest.raises(Exception, match=r"spaces/tiny\.yaml: no such file, expected a search space \.yaml or a "
                                        r"shipped space name \(efficientformer_l1, tiny\)"):
        TrainConfig.from_dict({"space": "spaces/tiny.yaml"}, base_dir=str(tmp_path))  # a path is a path



def test_resume_of_a_start_killed_before_its_first_checkpoint_starts_over(tmp_path, capsys):
    """A kill before the first checkpoint leaves config.yaml and metrics.jsonl only: --resume said "no
    checkpoint.pt, expected a run directory written by 'vitslim supernet train'" of exactly such a directory."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cfg = TrainConfig.from_dict(config(checkpoint_every=0))
    train(cfg, a, progress=False)
    train(cfg, b, progress=False, stop_at=2)
    for f in os.listdir(b):   # as a kill before the first checkpoint leaves it
        if f not in ("config.yaml", "metrics.jsonl", ".lock"):
            os.remove(os.path.join(b, f))
    capsys.readouterr()
    train(cfg, b, resume=True, progress=False)
    assert "no checkpoint yet (stopped before the first one): starting from step 0" in capsys.readouterr().err
    assert losses(a) == losses(b)
    sa, sb = read_run(a)["model"], read_run(b)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # someone else's folder is still refused, and an empty one still has nothing to resume
    other = TrainConfig.from_dict(config(checkpoint_every=0, seed=1))
    for f in os.listdir(b):
        if f not in ("config.yaml", "metrics.jsonl", ".lock"):
            os.remove(os.path.join(b, f))
    with pytest.raises(ConfigError, match="not a run of this config"):
        train(other, b, resume=True, progress=False)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(VitslimError, match="no checkpoint.pt"):
        train(cfg, str(tmp_path / "empty"), resume=True, progress=False)
def test_training_leaves_the_callers_random_state_and_threads_and_does_not_depend_on_them(tmp_path):
    """The run seeds itself (cfg.seed) and sets the config's thread count; the caller's torch RNG state and
    thread count are back when it returns, and the run is the same whatever the caller's RNG was."""
    cfg = TrainConfig.from_dict(config(steps=3, threads=1))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for i, seed in enumerate((5, 6)):
            torch.manual_seed(seed)
            state = torch.get_rng_state()
            train(cfg, str(tmp_path / str(i)), progress=False)
            assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert losses(tmp_path / "0") == losses(tmp_path / "1")
    s0, s1 = read_run(tmp_path / "0")["model"], read_run(tmp_path / "1")["model"]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine"])
def test_temperature_schedule_runs_from_start_at_the_first_step_to_end_at_the_last(schedule):
    """Endpoints are exact (the last of `steps` steps is steps - 1); midpoints hand-worked: linear and
    cosine the mean (cosine end + (start - end)(1 + cos(pi/4))/2 at a quarter), exponential the
    geometric mean."""
    import math
    from supernet.train import TemperatureConfig
    t = TemperatureConfig(start=8.0, end=2.0, schedule=schedule)
    assert t.at(0, 11) == pytest.approx(8.0, rel=1e-12)
    assert t.at(10, 11) == pytest.approx(2.0, rel=1e-12)
    mid = {"exponential": 4.0, "linear": 5.0, "cosine": 5.0}[schedule]
    assert t.at(5, 11) == pytest.approx(mid, rel=1e-12)
    quarter = {"exponential": 8.0 * 0.25 ** 0.25, "linear": 6.5,
               "cosine": 2.0 + 6.0 * (1 + math.cos(math.pi / 4)) / 2}[schedule]
    assert t.at(2.5, 11) == pytest.approx(quarter, rel=1e-12)
    assert TemperatureConfig(start=3.0, end=0.5, schedule="constant").at(7, 11) == 3.0


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def test_logged_lr_and_tau_are_the_schedules_of_the_step_that_ran(tmp_path):
    """lr: linear warm-up over 2 steps, then cosine from lr down to min_lr at the last step; tau: exponential
    from start to end. Step s (logged as step s + 1) ran at lr * lr_factor(s) and tau(s); values hand-worked."""
    import math
    run = str(tmp_path / "run")
    train(TrainConfig.from_dict(config(optimizer={"lr": 0.002, "min_lr": 1e-5, "warmup_steps": 2})), run, progress=False)
    rec = metrics(run)
    assert [r["step"] for r in rec] == [1, 2, 3, 4, 5, 6]
    # min_lr / lr = 0.005; cosine over steps 2..5: t = 0, 1/3, 2/3, 1
    want_lr = [0.001, 0.002, 0.002, 0.002 * (0.005 + 0.995 * 0.75), 0.002 * (0.005 + 0.995 * 0.25), 1e-5]
    assert [r["lr"] for r in rec] == pytest.approx(want_lr, rel=1e-9)
    assert [r["tau"] for r in rec] == pytest.approx([3.0 * (1 / 3) ** (s / 5) for s in range(6)], rel=1e-9)
    assert rec[0]["tau"] == 3.0 and rec[-1]["tau"] == pytest.approx(1.0, rel=1e-12) and math.isfinite(rec[-1]["loss"])
    with open(os.path.join(run, "importance.json")) as f:
        assert json.load(f)["tau"] == rec[-1]["tau"]  # the temperature of the last step that ran
    # widths: random per stage from min_width to max_width in width_step (both ends drawn)
    drawn = [{r["widths"][i] for r in rec} for i in range(4)]
    assert drawn[0] == {16} and all(d <= {16, 32} for d in drawn[1:3]) and drawn[3] == {32, 48}


def test_distill_loss_soft_is_kl_at_the_temperature_times_its_square_and_hard_is_ce_on_the_teachers_argmax():
    import math
    from supernet.train import DistillConfig, distill_loss
    s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(9.0), 0.0]])
    # tau 2: the teacher's softmax of [ln 9 / 2, 0] = [3/4, 1/4]; the student's is uniform
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(distill_loss(s, t, DistillConfig(kind="soft", tau=2.0))) == pytest.approx(4 * kl, rel=1e-6)
    student, teacher = torch.tensor([[2.0, 0.0, 1.0]]), torch.tensor([[0.0, 5.0, 1.0]])
    ce = math.log(math.exp(2) + 1 + math.exp(1)) - 0.0  # the student's CE on the teacher's class 1
    assert float(distill_loss(student, teacher, DistillConfig(kind="hard"))) == pytest.approx(ce, rel=1e-6)


def test_distillation_trains_the_distillation_head_on_the_teacher_and_the_class_head_on_the_labels(tmp_path):
    """A distilled space trains two heads: CE on the class head, the teacher's loss on the distillation head,
    loss = (1 - weight) CE + weight KD. With weight 1 (and no weight decay) the class head gets no gradient at
    all: it keeps its initial values, the distillation head moves."""
    from supernet.supernet import MetaPathSupernet
    space = dict(SPACE, distillation=True)
    teacher, arch = MetaPathSupernet(space).extract(MetaPathSupernet(space).space.largest_choice())
    vitslim.save_checkpoint(teacher, arch, tmp_path / "teacher.pt")
    cfg = write_config(tmp_path / "c.yaml", space=space, steps=2, widths="max",
                       optimizer={"lr": 0.01, "weight_decay": 0.0},
                       distillation={"teacher": "teacher.pt", "weight": 1.0, "kind": "soft"})
    train(load_config(cfg), str(tmp_path / "run"), progress=False)
    trained, _ = load_supernet(str(tmp_path / "run"))
    torch.manual_seed(0)  # the run's seed: its initial weights
    init = MetaPathSupernet(space)
    for k in ("head.weight", "head.bias"):
        assert torch.equal(trained.state_dict()[k], init.state_dict()[k]), k
    for k in ("dist_head.weight", "dist_head.bias"):
        assert not torch.equal(trained.state_dict()[k], init.state_dict()[k]), k


def test_alphas_start_moving_at_their_start_step_exactly(tmp_path):
    """start_step s: the step numbered s (0-based) is the first that updates the alphas."""
    for start, moved in ((1, True), (2, False)):
        run = str(tmp_path / str(start))
        train(TrainConfig.from_dict(config(steps=2, alpha={"lr": 0.1, "start_step": start})), run, progress=False)
        model, _ = load_supernet(run)
        assert any(bool(a.abs().max() > 1e-3) for a in model.alphas) == moved, start
        with open(os.path.join(run, "report.json")) as f:
            rep = json.load(f)
        if not moved:  # uniform alphas: no deviation, entropy normalised to 1
            assert rep["alpha_dev"] == 0 and rep["alpha_entropy"] == pytest.approx(1.0, rel=1e-6)
        else:
            assert rep["alpha_dev"] > 0 and rep["alpha_entropy"] < 1


def test_grad_clip_bounds_the_gradient_norm(tmp_path):
    """A gradient clipped to norm 1e-12 is far below Adam's eps (1e-8): one step moves no weight by more than
    lr * 1e-4, where the unclipped step moves some by about lr."""
    from supernet.supernet import MetaPathSupernet
    torch.manual_seed(0)
    init = {n: p.detach() for n, p in MetaPathSupernet(SPACE).named_weight_parameters()}
    moved = {}
    for clip in (1e-12, None):
        run = str(tmp_path / str(clip))
        train(TrainConfig.from_dict(config(steps=1, widths="max", optimizer={"lr": 0.01, "weight_decay": 0.0,
                                                                             "grad_clip": clip})), run, progress=False)
        model, _ = load_supernet(run)
        moved[clip] = max(float((p.detach() - init[n]).abs().max()) for n, p in model.named_weight_parameters())
    assert moved[1e-12] <= 0.01 * 1e-4 < 0.005 < moved[None]


def test_mid_run_evaluation_changes_no_number_and_reports_the_held_out_accuracy(tmp_path):
    """eval_every evaluates the best choice on the held-out split in eval mode and goes back to training: the
    curve and the weights are those of a run without it; the accuracy is the fraction of the first
    eval_batches * batch_size held-out images the best choice gets right."""
    from supernet.data import DataConfig, build_datasets
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(TrainConfig.from_dict(config(eval_every=0)), a, progress=False)
    rep = train(TrainConfig.from_dict(config(eval_every=2)), b, progress=False)
    assert losses(a) == losses(b)
    sa, sb = read_run(a)["model"], read_run(b)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [r["step"] for r in metrics(b) if "heldout_acc" in r] == [2, 4, 6]
    model, _ = load_supernet(b)
    _, held = build_datasets(DataConfig.from_dict(config()["data"]), 32, 4, seed=0)
    x = torch.stack([held[i][0] for i in range(8)])  # eval_batches 1 of batch_size 8
    y = torch.tensor([held[i][1] for i in range(8)])
    with torch.no_grad():
        right = int((model(x, mode="fixed", choice=model.best_choice()).argmax(-1) == y).sum())
    assert rep["heldout_acc_best"] == right / 8 == metrics(b)[-1]["heldout_acc"]


def test_label_smoothing_is_applied_to_the_loss(tmp_path):
    first = {}
    for ls in (0.0, 0.5):
        run = str(tmp_path / str(ls))
        train(TrainConfig.from_dict(config(steps=2, label_smoothing=ls)), run, progress=False)
        first[ls] = losses(run)[0][1]
    assert first[0.0] != first[0.5]


def test_boundary_settings_are_accepted_and_widths_are_part_of_the_run(tmp_path):
    """min_lr = lr (a constant schedule after warm-up), warm-up over every step, a batch of the whole training
    split: all valid. A resume with other widths is refused like any other change."""
    TrainConfig.from_dict(config(optimizer={"lr": 0.001, "min_lr": 0.001, "warmup_steps": 6}))
    run = str(tmp_path / "run")
    rep = train(TrainConfig.from_dict(config(steps=2, batch_size=64)), run, progress=False)
    assert rep["finished"]
    with pytest.raises(ConfigError, match=r"widths: 'random' -> 'max'"):
        train(TrainConfig.from_dict(config(steps=2, batch_size=64, widths="max")), run, progress=False)


def test_an_out_with_a_config_yaml_nested_too_deeply_is_someone_elses_in_one_line(tmp_path):
    from supernet.train import _check_not_foreign
    (tmp_path / "config.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ConfigError, match="holds config.yaml but no checkpoint.pt"):
        _check_not_foreign(str(tmp_path), {"version": 1})


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("short") / "run")
    train(TrainConfig.from_dict(config(steps=1, optimizer={"lr": 0.002, "warmup_steps": 0})), run, progress=False)
    return run


def _widen(obj):
    obj["config"]["space"]["stages"][0]["max_width"] = 64  # an edited space: tensors of 16 channels in the file


@pytest.mark.parametrize("tamper, needle", [
    (lambda o: o.pop("config"), "('config')"),
    (lambda o: o.update(config=[1]), "(config is a list, expected a mapping)"),
    (lambda o: o.pop("model"), "('model')"),
    (lambda o: o["config"].update(steps="x"), "(invalid literal for int()"),
    (lambda o: o.update(model={"stem.conv1.weight": 3}), "(model: not a state dict"),
    (_widen, "(model: does not fit the architecture: wrong shapes stem.conv1.weight (8, 3, 3, 3) vs (32, 3, 3, 3)"),
])
def test_a_tampered_run_checkpoint_is_refused_in_one_line_before_building(short_run, tmp_path, capsys, tamper, needle):
    """A run directory from elsewhere: its checkpoint's config and weights are checked, the supernet built on the
    meta device first (an edited space was built, allocating whatever widths it named, then failed to load)."""
    import shutil
    run = str(tmp_path / "run")
    shutil.copytree(short_run, run)
    obj = torch.load(os.path.join(run, "checkpoint.pt"), weights_only=True)
    tamper(obj)
    torch.save(obj, os.path.join(run, "checkpoint.pt"))
    with pytest.raises(vitslim.CheckpointError) as e:
        load_supernet(run)
    assert "a damaged run checkpoint " + needle in str(e.value) and "\n" not in str(e.value)
    assert main(["supernet", "extract", run, "--choice", "best", "--out", str(tmp_path / "x")]) != 0
    err = capsys.readouterr().err
    assert "a damaged run checkpoint" in err and len(err.strip().splitlines()) == 1
