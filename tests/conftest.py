"""Fixtures shared by every test folder."""
import pytest

from golden_utils import golden, write_shipped


@pytest.fixture
def golden_file(tmp_path):
    """(golden dict, path of its state dict written as the real release files are)."""
    def make(name, wrap_model_key):
        g = golden(name)
        p = write_shipped(g, str(tmp_path / f"{name}.pth"), wrap_model_key)
        return g, p
    return make


@pytest.fixture(autouse=True)
def scan_cache(tmp_path_factory, monkeypatch):
    """Each test remembers image-folder header checks in a folder of its own, never in the user's ~/.cache."""
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("VITSLIM_CACHE_DIR", str(d))
    return d
