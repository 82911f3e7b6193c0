"""The README's "Using vitslim from Python" block runs as written, with small stand-ins for what it leaves to the
reader (a dataset, a model, a fine-tuning loop, a timer, a supernet and an evaluator)."""
import os
import re
import sys

import torch

import vitslim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "pruning"))
from pruning_nets import build, tiny_deit  # noqa: E402

README = os.path.join(os.path.dirname(__file__), "..", "..", "README.md")


def readme_block(heading: str) -> str:
    text = open(README, encoding="utf-8").read()
    part = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", part, re.S).group(1)


def test_the_readme_using_vitslim_from_python_block_runs(tmp_path, monkeypatch):
    from latency_tables import LatencyTable
    from supernet.supernet import MetaPathSupernet
    monkeypatch.chdir(tmp_path)
    arch = tiny_deit(blocks=3)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    torch.manual_seed(0)
    sn = MetaPathSupernet("tiny").eval()  # the shipped space, which the shipped table cpu_torch_tiny covers
    steps = []

    def my_finetune(model, loader):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        model.train()
        for x, y in list(loader)[:2]:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        steps.append(vitslim.count(model)["macs"])

    def my_timer(module, x):  # a stand-in for a device's clock: runs the module, "ms" from its size
        with torch.no_grad():
            module(x)
        return 0.01 + 1e-4 * sum(p.numel() for p in module.parameters())

    def my_eval(choice):
        return {"acc": -sum(choice["widths"]) / 1000, "loss": 1.0}

    code = readme_block("### Using vitslim from Python")
    ns = {"my_dataset": torch.utils.data.TensorDataset(images, labels), "model": build(arch), "my_finetune": my_finetune,
          "my_timer": my_timer, "supernet": sn, "my_eval": my_eval, "target_ms": None}
    head, search = code.split("# your supernet loop", 1)
    exec(compile(head, "README.md", "exec"), ns)
    m0 = vitslim.count(build(arch))["macs"]
    assert len(steps) == 2 and steps[1] <= 0.5 * m0 * 1.001 < steps[0]
    assert vitslim.count(ns["pruned"])["macs"] <= 0.5 * m0 and [s["finetune"]["steps"] for s in ns["ft_rep"]["steps"]] == [2, 2]
    assert ns["rep"]["latency_after_ms"] <= 0.5 * ns["rep"]["latency_before_ms"] + 1e-9
    ns["target_ms"] = 0.7 * LatencyTable.load("cpu_torch_tiny").predict(sn.space.to_arch(sn.space.largest_choice()))
    exec(compile("# your supernet loop" + search, "README.md", "exec"), ns)
    assert os.path.isfile(tmp_path / "found.onnx") and os.path.isfile(tmp_path / "mine.pt")
    assert ns["arch"] == ns["small_arch"]
    x = images[:2]
    assert torch.allclose(ns["model"](x), ns["small"](x))
