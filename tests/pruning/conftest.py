"""Fixtures of the pruning tests: each tiny family in turn, a tiny DeiT checkpoint file."""
import pytest

from pruning_nets import build, proxy_macs, tiny_deit, tiny_swin


@pytest.fixture
def deit_ckpt(tmp_path):
    import vitslim
    arch = tiny_deit()
    p = tmp_path / "deit.pt"
    vitslim.save_checkpoint(build(arch), arch, p)
    return str(p)


@pytest.fixture(params=["deit", "deit_distilled", "swin"])
def net(request):
    arch = {"deit": tiny_deit, "deit_distilled": lambda: tiny_deit(distillation=True), "swin": tiny_swin}[request.param]()
    return build(arch), arch


@pytest.fixture
def quick_tables(monkeypatch):
    """Latency tables interpolate in the proxy coordinate (no meta-device MAC count per new key)."""
    from latency_tables.table import LatencyTable
    monkeypatch.setattr(LatencyTable, "_coord", lambda self, key: proxy_macs(key) + 1.0)
