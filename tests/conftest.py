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


@pytest.fixture
def figures_of(monkeypatch):
    """`figures_of(module)` -> the list of (figure, savefig keyword arguments) that `module.atomic_savefig` is
    given from then on, each drawn instead of written; closed after the test, as the real one closes them once saved
    (pyplot keeps every figure until then)."""
    got = []

    def fake_save(fig, path, **kw):
        fig.canvas.draw()
        got.append((fig, kw))
        return path

    def patch(module):
        monkeypatch.setattr(module, "atomic_savefig", fake_save)
        return got
    yield patch
    if got:
        import matplotlib.pyplot as plt
        for fig, _ in got:
            plt.close(fig)


@pytest.fixture
def notebook_backend():
    """A caller's pyplot on a backend of its own (a notebook's inline one: svg here), with a figure open."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    old = dict.__getitem__(matplotlib.rcParams, "backend")
    plt.switch_backend("svg")
    fig = plt.figure()
    yield fig
    plt.close(fig)
    plt.switch_backend(old)
