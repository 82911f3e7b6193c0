"""vitslim used as a library (a notebook, a service): a call, or a command run in-process with
`vitslim.cli.main`, leaves the process as it found it (torch's threads, RNG and CPU flags, matplotlib's backend,
loggers, progress bars), whether it returns, fails on bad input or is interrupted."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pruning"))

import vitslim  # noqa: E402
from pruning_nets import build, tiny_deit  # noqa: E402
from vitslim.cli import main  # noqa: E402

FAST = ["--calib-batches", "1", "--batch-size", "4", "--eval-batches", "1", "--quiet"]


@pytest.fixture
def ckpt(tmp_path):
    arch = tiny_deit()
    p = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, p)
    return str(p)


@pytest.fixture
def three_threads():
    """A caller's thread count that no command picks by itself."""
    old = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(old)


@pytest.mark.parametrize("target", ["macs=0.5", "macs=5"])  # a run, and one refused after --threads was read
def test_a_command_with_threads_gives_the_caller_its_thread_count_back(ckpt, tmp_path, capsys, three_threads, target):
    rc = main(["prune", "--checkpoint", ckpt, "--data", "synthetic", "--target", target, "--out",
               str(tmp_path / "r"), "--threads", "1"] + FAST)
    assert rc == (0 if target == "macs=0.5" else 2), capsys.readouterr().err
    assert torch.get_num_threads() == 3
