"""The README's "Using vitslim from Python" block runs as written, with small stand-ins for what it leaves to the
reader (a dataset, a model, a fine-tuning loop, a timer, a supernet and an evaluator)."""
import json
import os
import re
import sys

import torch

import latency_tables
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

    import latency_tables.measure as M

    class FakeClock:  # the wall clock as MyNPU's steps move it: the build's timing without waiting for it
        now = 0.0

        def __call__(self):
            return self.now
    clock = FakeClock()
    monkeypatch.setitem(M.CLOCKS, "wall", clock)

    class MyNPU(latency_tables.Backend):  # a stand-in for a device's runtime: a step takes 1 us per 100 parameters
        name = "my-npu"

        def device_name(self):
            return "board 3"

        def prepare_fn(self, module, input_shape):
            s = 1e-6 * (1 + sum(p.numel() for p in module.parameters()) // 100)

            def step(x):
                clock.now += s
                return x
            return step, None

    def my_eval(choice):
        return {"acc": -sum(choice["widths"]) / 1000, "loss": 1.0}

    code = readme_block("### Using vitslim from Python")
    ns = {"my_dataset": torch.utils.data.TensorDataset(images, labels), "model": build(arch), "my_finetune": my_finetune,
          "my_timer": my_timer, "MyNPU": MyNPU, "supernet": sn, "my_eval": my_eval, "target_ms": None}
    head, search = code.split("# your supernet loop", 1)
    exec(compile(head, "README.md", "exec"), ns)
    m0 = vitslim.count(build(arch))["macs"]
    assert len(steps) == 2 and steps[1] <= 0.5 * m0 * 1.001 < steps[0]
    assert vitslim.count(ns["pruned"])["macs"] <= 0.5 * m0 and [s["finetune"]["steps"] for s in ns["ft_rep"]["steps"]] == [2, 2]
    assert ns["rep"]["latency_after_ms"] <= 0.5 * ns["rep"]["latency_before_ms"] + 1e-9
    npu = ns["npu_table"]   # build_table on one's own Backend: every entry and grid point, saved, with its overhead
    assert LatencyTable.load("my_npu.yaml").device["backend"] == npu.device["backend"] == "my-npu"
    assert not npu.missing(latency_tables.arch_keys(ns["arch"]) + latency_tables.prune_grid_keys(ns["arch"]))
    assert npu.overhead["provenance"] == "measured" and npu.predict(ns["small_arch"], interpolate=True) > 0
    ns["target_ms"] = 0.7 * LatencyTable.load("cpu_torch_tiny").predict(sn.space.to_arch(sn.space.largest_choice()))
    exec(compile("# your supernet loop" + search, "README.md", "exec"), ns)
    assert os.path.isfile(tmp_path / "found.onnx") and os.path.isfile(tmp_path / "mine.pt")
    run = json.loads((tmp_path / "runs" / "found" / "report.json").read_text())   # write_run after one's own search
    assert run["accuracy"] == my_eval(ns["result"].choice)["acc"] and run["evaluation"]["images"] is None
    assert vitslim.load_arch(str(tmp_path / "runs" / "found" / "arch.yaml")) == ns["found_arch"]
    assert os.path.isfile(tmp_path / "runs" / "found" / "model.pt")
    assert ns["arch"] == ns["small_arch"]
    x = images[:2]
    assert torch.allclose(ns["model"](x), ns["small"](x))
