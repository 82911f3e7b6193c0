"""`vitslim search` on bad input: one line on stderr and exit code 2, naming what is wrong."""
import os

import pytest
import torch

from vitslim.cli import main

import importlib.util as _ilu
import os as _os

# the folder's conftest by path: a bare `import conftest` may find another folder's
_spec = _ilu.spec_from_file_location("nas_conftest", _os.path.join(_os.path.dirname(__file__), "conftest.py"))
_nas = _ilu.module_from_spec(_spec)
_spec.loader.exec_module(_nas)
SPACE = _nas.SPACE
fake_table = _nas.fake_table


def run_cli(capsys, *argv):
    rc = main(["search", *argv, "--no-progress"])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_negative_target_is_one_line(supernet_run, table_path, tmp_path, capsys):
    rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", table_path, "--target-ms", "-1",
                      "--out", str(tmp_path / "o"))
    assert rc == 2 and len(err.splitlines()) == 1 and "target-ms: got -1" in err


def test_table_that_misses_entries_names_them(supernet_run, tmp_path, capsys):
    t = str(tmp_path / "partial.yaml")
    fake_table(SPACE, drop=3).save(t)
    rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", t, "--target-ms", "3", "--out", str(tmp_path / "o"))
    assert rc == 2 and "does not cover the supernet's search space" in err and "lacks:" in err and "|" in err


def test_incomplete_supernet_run_is_refused(supernet_run, tmp_path, table_path, capsys):
    run = str(tmp_path / "half")  # as `supernet train --stop-at 2` leaves it
    os.makedirs(run)
    obj = torch.load(os.path.join(supernet_run, "checkpoint.pt"), weights_only=True)
    obj["step"] = 2
    torch.save(obj, os.path.join(run, "checkpoint.pt"))
    rc, err = run_cli(capsys, "--supernet", run, "--table", table_path, "--target-ms", "3", "--out", str(tmp_path / "o"))
    assert rc == 2 and "incomplete (step 2 of 4)" in err and "--resume" in err


def test_missing_supernet_run_is_refused(tmp_path, table_path, capsys):
    rc, err = run_cli(capsys, "--supernet", str(tmp_path / "nope"), "--table", table_path, "--target-ms", "3",
                      "--out", str(tmp_path / "o"))
    assert rc == 2 and "no such run directory" in err


def test_cli_writes_a_run_and_refuses_to_overwrite_it(supernet_run, table_path, tmp_path, capsys):
    import json
    out = str(tmp_path / "o")
    args = ["--supernet", supernet_run, "--table", table_path, "--target-ms", "4", "--out", out,
            "--eval-images", "16", "--strategy", "uniform"]
    old = torch.get_num_threads()
    try:
        rc, err = run_cli(capsys, *args, "--threads", "1")
    finally:
        torch.set_num_threads(old)
    assert rc == 0, err
    assert {"arch.yaml", "model.pt", "report.json"} <= set(os.listdir(out))
    assert json.load(open(os.path.join(out, "report.json")))["evaluation"]["torch_threads"] == 1
    rc, err = run_cli(capsys, *args)
    assert rc == 2 and "--overwrite" in err
    rc, err = run_cli(capsys, *args, "--overwrite", "--finetune", "1")
    assert rc == 0, err


def test_settings_are_checked_even_where_they_would_not_be_used(supernet_run, table_path, tmp_path, capsys):
    """--tolerance matters only when verifying; a bad one is still refused (it is a typo the user would
    meet on the next run), and before anything is written."""
    for extra, needle in ((["--tolerance", "-1", "--verify", "off"], "--tolerance: got -1.0"),
                          (["--eval-images", "0"], "--eval-images: got 0, expected an integer >= 1"),
                          (["--verify-rounds", "0"], "--verify-rounds: got 0")):
        rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", table_path, "--target-ms", "3",
                          "--out", str(tmp_path / "o"), *extra)
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert not os.path.exists(tmp_path / "o")


def test_a_setting_of_another_strategy_is_refused_not_dropped(supernet_run, table_path, tmp_path, capsys):
    """--band shapes random search's samples, --criterion and --actions slimming's steps: given with a strategy that
    has no use for them, the run ignored them and answered another question than the one asked."""
    for extra, needle in ((["--strategy", "slim", "--band", "0.1"], "--band 0.1: a setting of --strategy random, not slim"),
                          (["--strategy", "random", "--criterion", "loss"], "--criterion loss: a setting of --strategy slim"),
                          (["--strategy", "uniform", "--actions", "every"], "--actions every: a setting of --strategy slim")):
        rc, err = run_cli(capsys, "--supernet", supernet_run, "--table", table_path, "--target-ms", "3",
                          "--out", str(tmp_path / "o"), "--eval-images", "8", "--verify", "off", *extra)
        assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
        assert not os.path.exists(tmp_path / "o")


def test_report_says_the_accuracy_of_the_saved_weights(supernet_run, table_path, tmp_path):
    """`accuracy` is the search's (inherited weights); `model_accuracy` is model.pt's on the same images:
    the same without fine-tuning, the fine-tuned weights' with it."""
    import vitslim
    from nas.run import load_supernet_run, make_evaluator, run_search
    sn, cfg, _ = load_supernet_run(supernet_run)
    ev, _ = make_evaluator(sn, cfg, eval_images=16)
    for ft in (0, 3):
        out = str(tmp_path / f"ft{ft}")
        rep = run_search(supernet_run, table_path, 4.0, out, strategy="uniform", eval_images=16, finetune=ft,
                         progress=False, verify="off")
        saved, _ = vitslim.load_checkpoint(os.path.join(out, "model.pt"))
        assert ev.score_model(saved)["acc"] == rep["model_accuracy"]
        assert rep["model_accuracy"] == (rep["finetune"]["acc_after"] if ft else rep["accuracy"])
        assert ("fine-tuned" in rep["accuracy_note"]) == bool(ft)


def test_without_matplotlib_the_search_says_there_is_no_plot(supernet_run, table_path, tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["search", "--supernet", supernet_run, "--table", table_path, "--target-ms", "4", "--no-progress",
               "--out", str(tmp_path / "o"), "--eval-images", "16", "--verify", "off"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no plot: matplotlib is not installed" in out
    assert os.path.exists(tmp_path / "o" / "trajectory.jsonl") and not os.path.exists(tmp_path / "o" / "trajectory.png")


def test_search_takes_a_shipped_table_by_name(tmp_path, monkeypatch):
    from latency_tables.table import TABLES_DIR
    from nas.run import load_table
    from nas.strategy import SearchError
    from supernet.space import load_space
    monkeypatch.chdir(tmp_path)
    table, compiled = load_table("cpu_torch_tiny", load_space("tiny"))
    assert table.path == os.path.join(TABLES_DIR, "cpu_torch_tiny.yaml") and compiled is not None
    with pytest.raises(SearchError, match=r"^--table cpu_torch_tni: no such file, expected a latency table \.yaml or a "
                                          r"shipped table name \(.*cpu_torch_tiny\) \(or build one with"):
        load_table("cpu_torch_tni", load_space("tiny"))


@pytest.mark.parametrize("target", [True, "fast", float("nan"), 0, -1.0])
def test_a_target_that_is_not_a_positive_number_is_refused_from_python(target):
    """run_search / check_target from Python: True is a flag, not 1 ms (float(True) == 1.0 was searched)."""
    from nas.strategy import SearchError, check_target
    with pytest.raises(SearchError, match=r"--target-ms: got .*, expected a number of milliseconds > 0"):
        check_target(target)
    assert check_target("1.5") == 1.5 and check_target(2) == 2.0
