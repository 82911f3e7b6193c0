"""Fixtures for the search tests: a tiny supernet run trained for a few steps (the algorithms do not
need a good supernet) and a latency table of made-up numbers covering its space (nothing is measured)."""
import functools

import pytest

from latency_tables.segments import key_str, parse_key_str, segment_macs, space_keys
from latency_tables.table import LatencyTable
from supernet.space import load_space
from supernet.train import TrainConfig, train

SPACE = {"version": 1, "family": "efficientformer", "input_size": 64, "num_classes": 4, "width_step": 16,
         "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 8},
         "stages": [{"max_depth": 1, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 2, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 2, "max_width": 48, "min_width": 16, "candidates": ["meta4d", "meta3d", "identity"]},
                    {"max_depth": 2, "max_width": 64, "min_width": 32, "candidates": ["meta4d", "meta3d", "identity"]}]}

FAKE_DEVICE = {"backend": "torch-cpu", "device": "Fake CPU 3000", "threads": 1, "batch_size": 1, "dtype": "float32",
               "fused": True, "runtime": {"torch": "x"}, "platform": "Linux-x86_64"}


def train_config(steps=4, **over):
    d = {"version": 1, "space": SPACE, "seed": 0, "steps": steps, "batch_size": 8, "mode": "hard", "widths": "random",
         "data": {"type": "synthetic", "train_size": 64, "heldout_size": 48},
         "optimizer": {"lr": 0.002, "warmup_steps": 1}, "alpha": {"lr": 0.3, "start_step": 0},
         "temperature": {"start": 3.0, "end": 1.0}, "checkpoint_every": 0, "log_every": 1, "eval_batches": 1}
    d.update(over)
    return TrainConfig.from_dict(d)


@functools.lru_cache(maxsize=None)
def fake_ms(s: str) -> float:
    return round(0.01 + segment_macs(parse_key_str(s)) / 1e6, 6)


def fake_table(space, drop=0):
    keys = space_keys(load_space(space))
    t = LatencyTable(FAKE_DEVICE, overhead={"intercept_ms": 0.05, "scale": 0.1, "provenance": "measured"})
    for k in keys[drop:]:
        ms = fake_ms(key_str(k))
        t.set(k, ms, ms * 0.95, ms * 1.1, 20, "measured")
    return t


@pytest.fixture(scope="session")
def supernet_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("nas") / "supernet")
    train(train_config(), out, progress=False, device="cpu")
    return out


@pytest.fixture(scope="session")
def table_path(tmp_path_factory):
    p = str(tmp_path_factory.mktemp("nas_table") / "fake.yaml")
    fake_table(SPACE).save(p)
    return p
