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


@pytest.fixture
def tiny_arch(tmp_path):
    from supernet.space import load_space
    sp = load_space(os.path.join(os.path.dirname(os.path.abspath(vitslim.__file__)), "..", "supernet", "spaces",
                                 "tiny.yaml"))
    p = tmp_path / "a.yaml"
    vitslim.save_arch(sp.to_arch(sp.largest_choice()), p)
    return str(p)


def quick_build(arch, out):
    return ["latency", "build", "--arch", arch, "--out", str(out), "--time-per-network", "0.001", "--min-samples", "3",
            "--calibrate", "0", "--contexts", "1", "--no-drift-reference", "--quiet"]


@pytest.mark.parametrize("flush", [False, True])
def test_measuring_latency_leaves_the_callers_denormal_setting(tiny_arch, tmp_path, capsys, monkeypatch, flush):
    """torch-cpu measures with denormals flushed; the caller's setting (either) is back afterwards, also when the
    measurement is interrupted."""
    from latency_tables import build as latency_build
    from state_utils import flushes_denormals
    # a CPU that cannot flush (no SSE3) never does: then the setting to find again is "not flushing"
    flush = flush and torch.set_flush_denormal(flush)
    try:
        assert flushes_denormals() == flush
        assert main(quick_build(tiny_arch, tmp_path / "t.yaml")) == 0, capsys.readouterr().err
        assert flushes_denormals() == flush
        assert main(["latency", "validate", "--table", str(tmp_path / "t.yaml"), "--arch", tiny_arch,
                     "--time-per-network", "0.001"]) == 0, capsys.readouterr().err
        assert flushes_denormals() == flush

        def interrupted(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(latency_build, "time_chains", interrupted)  # inside the backend's session
        assert main(quick_build(tiny_arch, tmp_path / "t2.yaml")) == 130
        assert flushes_denormals() == flush
    finally:
        torch.set_flush_denormal(False)



def test_fuse_leaves_the_callers_rng_and_model_as_they_were():
    """Folding BatchNorm builds new layers whose random init it overwrites: drawing that init from the caller's
    torch RNG moved the caller's random stream (a seeded notebook's next numbers changed with a fuse)."""
    from state_utils import process_state, state_changes
    model = vitslim.build_model("efficientvit_m0").train()
    torch.manual_seed(0)
    before = process_state()
    fused = vitslim.fuse(model)
    assert state_changes(before, process_state()) == {}
    assert model.training and not fused.training


def test_latency_build_and_validate_leave_the_process_as_they_found_it(tiny_arch, tmp_path, capsys, three_threads):
    """The measured networks' random weights are seeded (the same table on every run) without reseeding the
    caller's torch RNG: random numbers drawn after a build are not the same on every call."""
    from state_utils import process_state, state_changes
    import scipy.stats  # noqa: F401 - validate's Spearman: importing scipy adds warning filters of its own
    torch.manual_seed(1234)
    torch.rand(1)
    for argv in (quick_build(tiny_arch, tmp_path / "t.yaml"),
                 ["latency", "validate", "--table", str(tmp_path / "t.yaml"), "--arch", tiny_arch,
                  "--time-per-network", "0.001"]):
        before = process_state()
        assert main(argv) == 0, capsys.readouterr().err
        assert state_changes(before, process_state()) == {}, argv[1]


def test_prune_keeps_the_callers_matplotlib_backend_and_figures(ckpt, tmp_path, capsys, notebook_backend):
    """reallocation.png is drawn without switching the process to Agg (a notebook's inline backend, its figures)."""
    import matplotlib.pyplot as plt
    from state_utils import process_state, state_changes
    before = process_state()
    assert main(["prune", "--checkpoint", ckpt, "--data", "synthetic", "--target", "macs=0.5", "--out",
                 str(tmp_path / "r")] + FAST) == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "reallocation.png").stat().st_size > 0
    assert state_changes(before, process_state()) == {}
    assert plt.get_fignums() == [notebook_backend.number]


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_core_ml_conversion_quiets_coremltools_only_while_it_runs(monkeypatch, interrupted):
    """coremltools' logger is set to ERROR for the conversion (its notes would drown the command's output) and
    back to the caller's level afterwards: a program that also uses coremltools still sees its warnings."""
    import logging
    ct = pytest.importorskip("coremltools")
    logger = logging.getLogger("coremltools")
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        _convert_interrupted_or_not(monkeypatch, ct, logger, interrupted)
    finally:
        logger.setLevel(old)


def _convert_interrupted_or_not(monkeypatch, ct, logger, interrupted):
    import logging
    from latency_tables.coreml_io import convert_coreml
    if interrupted:
        def convert(*a, **k):
            assert logger.level == logging.ERROR
            raise KeyboardInterrupt
        monkeypatch.setattr(ct, "convert", convert)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            convert_coreml(module, torch.zeros(1, 3, 8, 8))
    else:
        assert convert_coreml(module, torch.zeros(1, 3, 8, 8)) is not None
    assert logger.level == logging.INFO


def test_core_ml_exports_leave_the_callers_numpy_rng(ckpt, tmp_path, capsys):
    """coremltools' converter draws from numpy's global RNG (templates of its fusion passes): a notebook's seeded
    numpy stream is as it was after `export --format coreml` and a `latency export-coreml` conversion."""
    pytest.importorskip("coremltools")  # its import sets loggers, warning filters and environment of its own
    import numpy as np
    from latency_tables.coreml_io import convert_coreml
    from state_utils import process_state, state_changes
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    np.random.seed(0)
    before = process_state()
    assert main(["export", ckpt, "--format", "coreml", "--out", str(tmp_path / "m.mlpackage")]) == 0, \
        capsys.readouterr().err
    assert state_changes(before, process_state()) == {}
    convert_coreml(module, torch.zeros(1, 3, 8, 8))
    assert state_changes(before, process_state()) == {}


def _interrupt(*a, **k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["scoring", "fine-tuning"])
def test_an_interrupted_prune_leaves_no_progress_bar_open(monkeypatch, capsys, where):
    """Ctrl-C in a notebook keeps the traceback (and with it the bar) alive: a bar left open pushes every later
    tqdm bar down a line, and a service's log gains a dead bar per interrupted call."""
    from pruning import importance, pruner
    from tqdm import tqdm
    arch = tiny_deit()
    model = build(arch)
    model.arch = arch
    if where == "scoring":
        monkeypatch.setattr(importance.TaylorImportance, "score", _interrupt)
    else:
        monkeypatch.setattr(pruner, "default_loss", _interrupt)
    before = set(tqdm._instances)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        vitslim.prune_model(model, "macs=0.5", data="synthetic", calib_batches=1, batch_size=4, eval_batches=1,
                            finetune_steps=2, progress=True)
    assert interrupted.traceback  # held, as a notebook holds it
    assert [b.desc for b in set(tqdm._instances) - before] == []


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_latency_build_keeps_none_of_its_deployed_networks(tiny_arch, tmp_path, capsys, monkeypatch, interrupted):
    """The segments a build deploys are reused across its networks, and dropped when it ends: a service measuring
    a large grid kept up to 96 deployed blocks (DeiT-B's: 28 MB each) alive after the call."""
    import gc
    import weakref
    from latency_tables import build as latency_build, measure
    deployed, real = [], measure.deploy

    def deploy(module, fused):
        m = real(module, fused)
        deployed.append(weakref.ref(m))
        return m
    monkeypatch.setattr(measure, "deploy", deploy)
    if interrupted:
        monkeypatch.setattr(latency_build, "time_chains", _interrupt)
    assert main(quick_build(tiny_arch, tmp_path / "t.yaml")) == (130 if interrupted else 0), capsys.readouterr().err
    gc.collect()
    assert deployed and [r for r in deployed if r() is not None] == []


def test_a_broken_pipe_leaves_no_file_open(monkeypatch, capsys):
    """`vitslim ... | head`: the reader left, and main returns 0 quietly; run in-process (a service whose
    client went away) it kept the /dev/null it opened for stdout, one more open file per call."""
    import vitslim.cli as cli

    def broken(args):
        raise BrokenPipeError
    add_args, _, help_text, example = cli.COMMANDS["presets"]
    monkeypatch.setitem(cli.COMMANDS, "presets", (add_args, broken, help_text, example))
    opened, closed = [], []
    real_open, real_close = os.open, os.close
    monkeypatch.setattr(os, "open", lambda *a, **k: opened.append(real_open(*a, **k)) or opened[-1])
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) or real_close(fd))
    for _ in range(3):
        assert main(["presets"]) == 0
    assert len(opened) == 3 and closed == opened  # every descriptor it opened, closed (on any OS)
