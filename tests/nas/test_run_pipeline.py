"""`vitslim run PIPELINE.yaml` (the README's first command) end to end on a tiny pipeline: trains the
supernet, reuses a table measured "on this CPU", slims, measures the found network here for real,
fine-tunes, exports; a re-run reuses every stage; bad pipelines are one-line errors."""
import importlib.util
import json
import os

import pytest
import torch
import yaml

from latency_tables.backends import cpu_model
from state_utils import process_state, state_changes
from vitslim.cli import main

_spec = importlib.util.spec_from_file_location("nas_conftest", os.path.join(os.path.dirname(__file__), "conftest.py"))
nas_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nas_conftest)


def write_pipeline(tmp_path, **search):
    sn = {"version": 1, "space": nas_conftest.SPACE, "seed": 0, "steps": 6, "batch_size": 8, "mode": "hard",
          "widths": "random", "data": {"type": "synthetic", "train_size": 64, "heldout_size": 48},
          "optimizer": {"lr": 0.002, "warmup_steps": 1}, "alpha": {"lr": 0.3, "start_step": 0},
          "temperature": {"start": 3.0, "end": 1.0}, "checkpoint_every": 0, "log_every": 1, "eval_batches": 1}
    (tmp_path / "sn.yaml").write_text(yaml.safe_dump(sn))
    table = nas_conftest.fake_table(nas_conftest.SPACE)
    table.device["device"] = cpu_model()        # "measured on this CPU": reused, and the result measured here
    table.save(str(tmp_path / "table.yaml"))
    s = {"strategy": "slim", "target_fraction": 0.6, "eval_images": 16, "finetune": 2, "verify": "auto",
         "verify_seconds": 0.05, "verify_rounds": 2, "seed": 0}
    s.update(search)
    pipe = {"version": 1, "supernet": {"config": "sn.yaml", "steps": 6, "threads": 1},
            "table": {"reuse": "table.yaml"}, "search": s, "export": ["torchscript", "safetensors"]}
    p = tmp_path / "pipe.yaml"
    p.write_text(yaml.safe_dump(pipe))
    return str(p)


def test_the_pipeline_runs_end_to_end_and_resumes(tmp_path, capsys):
    pipe = write_pipeline(tmp_path)
    out = str(tmp_path / "run")
    assert main(["run", pipe, "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "reusing" in text and "measured" in text
    with open(os.path.join(out, "search", "report.json")) as f:
        rep = json.load(f)
    v = rep["verification"]
    assert rep["predicted_ms"] <= rep["bound_ms"] <= rep["target_ms"]
    assert 1 <= len(v["rounds"]) <= 2 and v["measured_ms"] > 0 and rep["finetune"]["steps"] == 2
    assert os.path.isfile(os.path.join(out, "export", "model.ts"))
    assert os.path.isfile(os.path.join(out, "export", "model.safetensors"))
    # a second run reuses everything: nothing is trained, measured or exported again
    before = os.path.getmtime(os.path.join(out, "search", "report.json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # not the pipeline's 1
    try:
        state = process_state()
        assert main(["run", pipe, "--out", out, "--no-progress"]) == 0
        # run in-process, it gives the caller back its threads and its RNG (the supernet's load drew its init)
        assert state_changes(state, process_state()) == {}
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "supernet: reusing" in text and "model.ts exists" in text
    assert os.path.getmtime(os.path.join(out, "search", "report.json")) == before
    # the pipeline edited: a finished stage of other settings is refused, never passed off as the answer
    pipe2 = write_pipeline(tmp_path, target_fraction=0.4)
    assert main(["run", pipe2, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a search for other settings (target_ms: " in err and "delete" in err
    with open(pipe) as f:
        d = yaml.safe_load(f)
    d["supernet"]["steps"] = 5
    (tmp_path / "pipe3.yaml").write_text(yaml.safe_dump(d))
    assert main(["run", str(tmp_path / "pipe3.yaml"), "--out", out, "--no-progress"]) == 2
    assert "a finished supernet trained with another config (steps: 6 -> 5)" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(out, "search", "report.json")) == before
    # its own records damaged by hand: the export stamp is a cache (exports made anew), the search's are one line
    (tmp_path / "run" / "export" / "source.json").write_text("{not json")
    pipe = write_pipeline(tmp_path)  # (pipe2 rewrote the file)
    assert main(["run", pipe, "--out", out, "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out and os.path.isfile(os.path.join(out, "export", "model.ts"))
    with open(os.path.join(out, "export", "source.json")) as f:
        assert sorted(json.load(f)) == ["model.safetensors", "model.ts"]
    for name, text in (("pipeline_stage.json", "[1, 2]"), ("pipeline_stage.json", "\xff"), ("report.json", "")):
        with open(os.path.join(out, "search", name), "w", encoding="latin-1") as f:
            f.write(text)
        assert main(["run", pipe, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert name in err and "expected" in err and "to search again" in err and "\n" not in err, err
        if name == "pipeline_stage.json":
            os.remove(os.path.join(out, "search", name))  # the earlier version's way: the report is read instead


def test_a_resumed_pipeline_keeps_its_thread_count(tmp_path, capsys, monkeypatch):
    """threads: 1 holds for search and fine-tuning also when the supernet stage is reused."""
    import torch
    pipe = write_pipeline(tmp_path)
    out = str(tmp_path / "run")
    import nas.run as nr
    real = nr.run_search
    monkeypatch.setattr(nr, "run_search", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["run", pipe, "--out", out, "--no-progress"]) == 130  # interrupted after the supernet stage
    monkeypatch.setattr(nr, "run_search", real)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    monkeypatch.setattr(nr, "run_search", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    try:
        assert main(["run", pipe, "--out", out, "--no-progress"]) == 0
    finally:
        torch.set_num_threads(old)
    assert "supernet: reusing" in capsys.readouterr().out and seen == [1]


@pytest.mark.parametrize("search,msg", [({"tolerance": -0.1}, "search.tolerance: got -0.1"),
                                        ({"verify": "maybe"}, "search.verify: got 'maybe'"),
                                        ({"colour": "red"}, "search.colour: unknown key"),
                                        ({"refine": -2}, "search.refine: got -2"),
                                        ({"criterion": "top5"}, "search.criterion: got 'top5'"),
                                        ({"strategy": "random", "refine": 3},
                                         "search.refine 3: refinement follows slimming (search.strategy slim), not random"),
                                        ({"strategy": "optuna", "criterion": "loss"},
                                         "search.criterion loss: a setting of search.strategy slim, not optuna"),
                                        ({"target_fraction": 1.5}, "search.target_fraction: got 1.5"),
                                        ({"target_fraction": None, "target_ms": -1}, "search.target_ms: got -1"),
                                        ({"target_fraction": None, "target_ms": "1.0"},
                                         "search.target_ms: got '1.0', expected a number"),
                                        ({"target_fraction": None, "target_ms": True}, "search.target_ms: got True"),
                                        ({"target_fraction": "0.5"}, "search.target_fraction: got '0.5'"),
                                        ({"interpolate": "no"}, "search.interpolate: got 'no', expected true or false"),
                                        ({"eval_images": 0}, "search.eval_images: got 0, expected an integer >= 1"),
                                        ({"verify_seconds": 0}, "search.verify_seconds: got 0"),
                                        ({"seed": -1}, "search.seed: got -1"),
                                        ({"device": "tpu"}, "tpu")])
def test_bad_search_settings_in_a_pipeline_are_refused_before_training(tmp_path, capsys, search, msg):
    pipe = write_pipeline(tmp_path, **search)
    if search.get("target_fraction", 0) is None:
        d = yaml.safe_load(open(pipe))
        del d["search"]["target_fraction"]
        (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    rc = main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("edit,msg", [
    (lambda d: d.update(export=["onnx", "pdf"]), "export[1]: got 'pdf', expected one of onnx"),
    (lambda d: d.update(export="onnx"), "export: got 'onnx', expected a list of formats"),
    (lambda d: d["table"].update(backend="torch-cpuu"), "table.backend: got 'torch-cpuu', expected one of"),
    (lambda d: d["table"].update(reuse="nothere.yaml"), "nothere.yaml: no such file, expected a latency table"),
    (lambda d: d["table"].update(min_samples=0), "table.min_samples: got 0, expected an integer >= 1"),
    (lambda d: d["table"].update(colour="red"), "table.colour: unknown key"),
    (lambda d: d.update(search=5), "search: got 5, expected a mapping"),  # sections of the wrong type
    (lambda d: d.update(search="slim"), "search: got 'slim', expected a mapping"),
    (lambda d: d.update(supernet=5), "supernet: got 5, expected a mapping"),
    (lambda d: d.update(supernet=["sn.yaml"]), "supernet: got ['sn.yaml'], expected a mapping"),
    (lambda d: d["supernet"].update(config=3), "supernet.config: got 3, expected a path"),
    (lambda d: d["supernet"].update(config="nothere.yaml"), "nothere.yaml"),  # read after --out is made: removed
])
def test_bad_table_export_and_wrongly_typed_sections_are_refused_before_training(tmp_path, capsys, edit, msg):
    pipe = write_pipeline(tmp_path)
    d = yaml.safe_load(open(pipe))
    edit(d)
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    rc = main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "run")


def test_bare_on_off_in_yaml_mean_the_verify_modes(tmp_path):
    from vitslim.cmd_search import load_pipeline
    pipe = write_pipeline(tmp_path)
    text = open(pipe).read().replace("verify: auto", "verify: off")
    (tmp_path / "pipe.yaml").write_text(text)
    assert yaml.safe_load(text)["search"]["verify"] is False  # what YAML makes of it
    assert load_pipeline(pipe)["search"]["verify"] == "off"


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    pipe = write_pipeline(tmp_path)
    (tmp_path / "f").write_text("x")
    assert main(["run", pipe, "--out", str(tmp_path / "f"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file, expected a directory" in err


def test_a_missing_supernet_config_is_one_line(tmp_path, capsys):
    pipe = write_pipeline(tmp_path)
    d = yaml.safe_load(open(pipe))
    d["supernet"]["config"] = "nowhere.yaml"
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    rc = main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nowhere.yaml: no such file" in err


def test_ctrl_c_in_the_table_stage_is_an_interruption(tmp_path, capsys, monkeypatch):
    import vitslim.cli
    pipe = write_pipeline(tmp_path)
    d = yaml.safe_load(open(pipe))
    del d["table"]["reuse"]  # the table is built: `latency build` runs inside the pipeline
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.setattr(vitslim.cli, "main", lambda argv: 130)  # the build's own Ctrl-C exit
    assert main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "vitslim run: interrupted (state saved so far is kept; re-run to resume)" in err and "error" not in err


def test_a_search_or_table_changed_since_is_refused_and_exports_follow_the_search(tmp_path, capsys):
    """Every search setting and the table's content key the search stage (not only target, strategy and seed);
    an export of an earlier search/model.pt is written anew."""
    pipe = write_pipeline(tmp_path)
    out = str(tmp_path / "run")
    assert main(["run", pipe, "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["run", write_pipeline(tmp_path, finetune=0), "--out", out, "--no-progress"]) == 2
    assert "holds a search for other settings (search.finetune: 2 -> 0)" in capsys.readouterr().err
    assert main(["run", write_pipeline(tmp_path, verify_seconds=0.07), "--out", out, "--no-progress"]) == 2
    assert "(search.verify_seconds: 0.05 -> 0.07)" in capsys.readouterr().err  # named, however late it sorts
    t = yaml.safe_load((tmp_path / "table.yaml").read_text())  # the same file re-measured: 3x slower
    for e in t["entries"]:
        e["ms"], e["p10"], e["p90"] = 3 * e["ms"], 3 * e["p10"], 3 * e["p90"]
    pipe = write_pipeline(tmp_path)
    (tmp_path / "table.yaml").write_text(yaml.safe_dump(t, sort_keys=False))
    assert main(["run", pipe, "--out", out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a search for other settings (" in err and "table_digest" in err
    # the search redone (its folder deleted, as the message says): the old exports are not kept
    import shutil
    before = open(os.path.join(out, "export", "model.safetensors"), "rb").read()
    shutil.rmtree(os.path.join(out, "search"))
    assert main(["run", write_pipeline(tmp_path, target_fraction=0.4), "--out", out, "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "model.safetensors exists" not in text and "wrote " in text
    assert open(os.path.join(out, "export", "model.safetensors"), "rb").read() != before
    assert main(["run", write_pipeline(tmp_path, target_fraction=0.4), "--out", out, "--no-progress"]) == 0
    assert "model.safetensors exists" in capsys.readouterr().out


def test_supernet_overrides_merge_into_nested_sections_and_a_reused_table_must_be_of_the_backend(
        tmp_path, monkeypatch, capsys):
    import supernet.train as st
    import vitslim.cli as cli
    from vitslim.cmd_search import _supernet_stage, _table_stage, load_pipeline
    pipe = write_pipeline(tmp_path)
    d = load_pipeline(pipe)
    d["supernet"]["optimizer"] = {"lr": 0.01}
    monkeypatch.setattr(st, "train", lambda *a, **k: None)
    _, cfg = _supernet_stage(d, str(tmp_path), str(tmp_path / "run"), False)
    assert cfg.optimizer.lr == 0.01 and cfg.optimizer.warmup_steps == 1  # warmup kept from sn.yaml
    built = []
    monkeypatch.setattr(cli, "main", lambda argv: built.append(argv) or 0)
    d["table"] = {"reuse": "table.yaml", "backend": "onnxruntime"}  # the shipped table is torch-cpu
    path = _table_stage(d, str(tmp_path), str(tmp_path / "run"), cfg, False)
    assert path == str(tmp_path / "run" / "table.yaml") and built and "onnxruntime" in built[0]
    assert "measured with backend torch-cpu, asked onnxruntime; building one" in capsys.readouterr().out


def test_a_reused_table_lacking_a_few_entries_is_topped_up_in_a_copy(tmp_path, monkeypatch, capsys):
    """The same machine and backend but a few entries short (a head of another class count): the run measured a
    whole new table (half an hour at L1 scale); now a copy of it, with only what it lacks measured into it."""
    import supernet.train as st
    import vitslim.cli as cli
    from latency_tables import LatencyTable
    from vitslim.cmd_search import _space_keys, _supernet_stage, _table_stage, load_pipeline
    pipe = write_pipeline(tmp_path)
    d = load_pipeline(pipe)
    monkeypatch.setattr(st, "train", lambda *a, **k: None)
    _, cfg = _supernet_stage(d, str(tmp_path), str(tmp_path / "run"), False)
    t = LatencyTable.load(str(tmp_path / "table.yaml"))
    gone = sorted(t.entries)[:2]
    for k in gone:
        del t.entries[k]
    t.save(str(tmp_path / "short.yaml"))
    d["table"] = {"reuse": "short.yaml"}
    rcs, built = [0], []
    monkeypatch.setattr(cli, "main", lambda argv: built.append(argv) or rcs.pop(0))
    path = _table_stage(d, str(tmp_path), str(tmp_path / "run"), cfg, False)
    assert path == str(tmp_path / "run" / "table.yaml") and len(built) == 1 and path in built[0]
    assert "short.yaml lacks 2 entries of this space; measuring those into a copy" in capsys.readouterr().out
    copy = LatencyTable.load(path)
    assert set(copy.entries) == set(t.entries) and len(copy.missing(_space_keys(cfg.space))) == 2
    # a copy the build refuses (measured otherwise than this build would): a new table after all
    import shutil
    shutil.rmtree(tmp_path / "run")
    _supernet_stage(d, str(tmp_path), str(tmp_path / "run"), False)
    rcs, built = [2, 0], []
    assert _table_stage(d, str(tmp_path), str(tmp_path / "run"), cfg, False) == path and len(built) == 2
    assert "cannot be topped up here; building one for this machine" in capsys.readouterr().out
    assert not os.path.exists(path)  # the refused copy removed (the stubbed build wrote nothing)
    # table.reuse changed since a copy was topped up: the copy (and its samples) made anew from the new table
    rcs, built = [0], []
    _table_stage(d, str(tmp_path), str(tmp_path / "run"), cfg, False)
    open(path + ".partial.json", "w").write("{}")
    del t.entries[sorted(t.entries)[0]]
    t.save(str(tmp_path / "shorter.yaml"))
    d["table"] = {"reuse": "shorter.yaml"}
    rcs = [0]
    _table_stage(d, str(tmp_path), str(tmp_path / "run"), cfg, False)
    assert set(LatencyTable.load(path).entries) == set(t.entries) and not os.path.exists(path + ".partial.json")
    assert open(path + ".from-reuse").read().endswith("shorter.yaml")


def test_table_reuse_takes_a_shipped_tables_name(tmp_path, capsys):
    from latency_tables.table import TABLES_DIR, shipped_tables
    from vitslim.cmd_search import _reuse_path, load_pipeline
    pipe = write_pipeline(tmp_path)
    d = yaml.safe_load(open(pipe))
    d["table"]["reuse"] = "cpu_torch_tiny"  # no such file beside the pipeline: the shipped table
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    assert load_pipeline(pipe)["table"]["reuse"] == "cpu_torch_tiny"
    assert _reuse_path("cpu_torch_tiny", str(tmp_path)) == os.path.join(TABLES_DIR, "cpu_torch_tiny.yaml")
    assert _reuse_path("table.yaml", str(tmp_path)) == str(tmp_path / "table.yaml")  # a file beside it first
    d["table"]["reuse"] = "cpu_torch_tiniest"
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    assert main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cpu_torch_tiniest: no such file, expected a latency table .yaml or a " \
        "shipped table name (" + ", ".join(shipped_tables()) in err, err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("fmt,module,msg", [
    ("onnx", "onnx", "export[1]: onnx: the onnx package is not installed, expected `pip install vitslim[export]`"),
    ("onnx", "onnxruntime", "export[1]: onnx check: onnxruntime is not installed, expected `pip install vitslim[export]`"),
    ("coreml", "coremltools", "export[1]: coreml: coremltools is not installed, expected `pip install vitslim[export]`"),
])
def test_a_missing_export_extra_is_refused_before_training(tmp_path, capsys, monkeypatch, fmt, module, msg):
    import sys
    pipe = write_pipeline(tmp_path)
    d = yaml.safe_load(open(pipe))
    d["export"] = ["torchscript", fmt]
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as where it is not installed
    with pytest.raises(ImportError):
        __import__(module)
    rc = main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.endswith(msg), err
    assert not os.path.exists(tmp_path / "run")  # stage 1 never started


def test_a_supernet_override_names_a_shipped_space(tmp_path, monkeypatch):
    import supernet.train

    class Started(Exception):
        pass

    def fake_train(cfg, run, **kw):
        raise Started(cfg.space.name)

    pipe = write_pipeline(tmp_path)
    d = yaml.safe_load(open(pipe))
    d["supernet"]["space"] = "efficientformer_l1"  # not a file beside the pipeline: the shipped space
    d["table"].pop("reuse")
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.setattr(supernet.train, "train", fake_train)
    with pytest.raises(Started, match="^efficientformer_l1$"):
        main(["run", pipe, "--out", str(tmp_path / "run"), "--no-progress"])
