"""`vitslim search` and `supernet show --plot` run in-process (a notebook, a service) leave the process as they
found it: matplotlib's backend and the caller's pyplot figures above all (tests/state_utils.py)."""
import pytest

from state_utils import process_state, state_changes
from vitslim.cli import main

matplotlib = pytest.importorskip("matplotlib")


@pytest.mark.parametrize("argv", [["search", "--strategy", "slim"], ["search", "--strategy", "optuna", "--trials", "4"],
                                  ["supernet", "show"]])
def test_plotting_commands_keep_the_callers_matplotlib_backend(supernet_run, table_path, tmp_path, capsys,
                                                               notebook_backend, argv):
    import matplotlib.pyplot as plt
    if argv[0] == "search":
        argv = argv + ["--supernet", supernet_run, "--table", table_path, "--target-ms", "4", "--eval-images", "16",
                       "--verify", "off", "--no-progress", "--out", str(tmp_path / "s")]
        plot = tmp_path / "s" / ("pareto.png" if "optuna" in argv else "trajectory.png")
    else:
        plot = tmp_path / "imp.png"
        argv = argv + [supernet_run, "--plot", str(plot)]
    before = process_state()
    assert main(argv) == 0, capsys.readouterr().err
    assert plot.stat().st_size > 0
    assert state_changes(before, process_state()) == {}
    assert plt.get_fignums() == [notebook_backend.number]  # the caller's figure: still open (a switch closes all)


@pytest.mark.parametrize("action", ["show", "extract"])
def test_reading_a_supernet_run_leaves_the_callers_rng(supernet_run, tmp_path, capsys, action):
    """`supernet show` / `extract` load the run's weights: building the supernet drew its random init (all
    overwritten) from the caller's torch RNG, moving a seeded notebook's stream."""
    import torch
    torch.manual_seed(0)
    argv = ["supernet", action, supernet_run] + (["--choice", "best", "--out", str(tmp_path / "x")]
                                                 if action == "extract" else [])
    before = process_state()
    assert main(argv) == 0, capsys.readouterr().err
    assert state_changes(before, process_state()) == {}
