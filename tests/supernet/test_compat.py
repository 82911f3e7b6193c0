"""Files an earlier vitslim wrote are read by this one as they were meant (tests/data/compat/README.md says which
commit wrote them, and how): a checkpoint gives the same network and logits, an arch config the same network, a
latency table the same prediction, and an interrupted supernet run resumes to what that commit's uninterrupted
run ended with. A renamed key or a changed meaning in any of these formats fails here."""
import json
import os
import shutil

import pytest
import torch

import vitslim
from latency_tables import LatencyTable
from supernet.train import load_config, load_supernet, read_run, train

COMPAT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "compat")
WRITERS = ["c02c843"]  # the commits whose files are kept (oldest first)


def expected(rev):
    with open(os.path.join(COMPAT, rev, "expected.json")) as f:
        return json.load(f)


def logits(model, arch):
    g = torch.Generator().manual_seed(0)  # the input make_fixtures.py gave the old code
    x = torch.randn(2, arch["in_chans"], arch["input_size"], arch["input_size"], generator=g)
    with torch.no_grad():
        y = model.eval()(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).flatten()


@pytest.mark.parametrize("rev", WRITERS)
@pytest.mark.parametrize("family", ["efficientformer", "deit"])
def test_an_old_checkpoint_loads_the_same_network(rev, family):
    want = expected(rev)[f"{family}_model.pt"]
    model, arch = vitslim.load_checkpoint(os.path.join(COMPAT, rev, f"{family}_model.pt"))
    assert arch == vitslim.load_arch(os.path.join(COMPAT, rev, f"{family}_arch.yaml"))
    assert sum(p.numel() for p in model.parameters()) == want["params"]
    assert torch.allclose(logits(model, arch), torch.tensor(want["logits"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rev", WRITERS)
@pytest.mark.parametrize("family", ["efficientformer", "deit"])
def test_an_old_arch_config_builds_the_same_network(rev, family):
    path = os.path.join(COMPAT, rev, f"{family}_arch.yaml")
    assert vitslim.count(vitslim.build_model(path)) == expected(rev)[f"{family}_model.pt"]["count"]
    # its weights beside it, as `vitslim export --format yaml` pairs them, load onto the arch it describes
    model, arch = vitslim.load_checkpoint(os.path.join(COMPAT, rev, f"{family}_model.pt"), arch=path)
    assert arch == vitslim.load_arch(path)


@pytest.mark.parametrize("rev", WRITERS)
def test_an_old_latency_table_predicts_what_it_did(rev):
    want = expected(rev)["latency_table.yaml"]
    table = LatencyTable.load(os.path.join(COMPAT, rev, "latency_table.yaml"))
    assert len(table.entries) == want["entries"]
    probe = vitslim.load_arch(os.path.join(COMPAT, rev, "latency_probe_arch.yaml"))
    assert table.predict(probe) == pytest.approx(want["predicted_ms"], rel=1e-9)


@pytest.mark.parametrize("rev", WRITERS)
def test_an_old_interrupted_supernet_run_resumes_to_the_old_uninterrupted_result(rev, tmp_path):
    want = expected(rev)["supernet_run"]
    run = str(tmp_path / "run")
    shutil.copytree(os.path.join(COMPAT, rev, "supernet_run"), run)
    assert read_run(run)["step"] == want["step"]
    train(load_config(os.path.join(COMPAT, rev, "supernet_config.yaml")), run, resume=True, progress=False)
    model, obj = load_supernet(run)
    assert obj["step"] == want["steps"]
    sums = {k: float(v.double().abs().sum()) for k, v in obj["model"].items() if v.is_floating_point()}
    assert sums.keys() == want["final_weight_abs_sums"].keys()
    # exact on the torch that wrote them; torch 2.5 rounds a training step otherwise (sums 3e-6 apart at most),
    # while a resume that lost the optimisers' moments lands 4e-5 to 8e-5 away
    for k, v in want["final_weight_abs_sums"].items():
        assert sums[k] == pytest.approx(v, rel=1e-5, abs=1e-5), k
    with open(os.path.join(run, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if line.strip()]
    assert losses == pytest.approx(want["final_metrics_losses"], rel=1e-6)
    model.importance()  # what search reads of it
