"""What an installed wheel holds and finds without the repository: the version, the licence, the shipped
search spaces, latency tables and configs (package data), and the built-in config names."""
import configparser
import glob
import hashlib
import os

import pytest

import vitslim
from vitslim.cli import BUILTIN_CONFIGS, CONFIGS_DIR, builtin_config, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_cfg():
    c = configparser.ConfigParser()
    c.read(os.path.join(ROOT, "setup.cfg"))
    return c


def test_version_flag_prints_the_packages_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"vitslim {vitslim.__version__}\n"


def test_setup_cfg_takes_its_version_from_the_package():
    from setuptools.config.setupcfg import read_configuration
    assert _setup_cfg()["metadata"]["version"].strip() == "attr: vitslim.__version__"
    meta = read_configuration(os.path.join(ROOT, "setup.cfg"))["metadata"]
    assert meta["version"] == vitslim.__version__


def test_the_license_file_is_the_full_apache_2_text():
    c = _setup_cfg()["metadata"]
    assert c["license"] == "Apache-2.0" and c["license_files"].split() == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE"), "rb") as f:
        text = f.read()
    # https://www.apache.org/licenses/LICENSE-2.0.txt, unmodified
    assert hashlib.sha256(text).hexdigest() == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_package_data_holds_the_spaces_tables_and_configs():
    data = _setup_cfg()["options.package_data"]
    shipped = {pkg: sorted(os.path.relpath(p, os.path.join(ROOT, pkg)) for g in globs.split()
                           for p in glob.glob(os.path.join(ROOT, pkg, g)))
               for pkg, globs in data.items()}
    assert shipped["supernet"] == ["spaces/efficientformer_l1.yaml", "spaces/tiny.yaml"]
    assert shipped["latency_tables"] == sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "latency_tables", "*.yaml")))
    assert "cpu_torch_tiny.yaml" in shipped["latency_tables"]
    assert shipped["vitslim"] == ["configs/quickstart.yaml", "configs/supernet_tiny.yaml"]


def test_a_wheel_ships_the_data_folders_as_listed_packages(tmp_path):
    """supernet/spaces and vitslim/configs hold only .yaml files, yet Python can import them (namespace packages):
    setuptools warns that a folder left out of `packages` "would be ignored" (84; "installing as data is
    deprecated" from 62.3), so a later setuptools could ship a wheel without the spaces and configs. Built from a
    copy of the packages (with a stray __pycache__, which must not become a package), the wheel holds the YAMLs
    and setuptools names no package it would leave out."""
    import shutil
    import warnings
    import zipfile
    from setuptools import build_meta
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for pkg in ("vitslim", "supernet", "latency_tables", "nas", "pruning"):
        shutil.copytree(os.path.join(ROOT, pkg), src / pkg, ignore=shutil.ignore_patterns("*.pyc"))
    (src / "supernet" / "__pycache__").mkdir(exist_ok=True)
    (src / "supernet" / "__pycache__" / "arch.cpython-311.pyc").write_bytes(b"")
    cwd = os.getcwd()
    try:
        os.chdir(src)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            name = build_meta.build_wheel(str(tmp_path / "dist"))
    finally:
        os.chdir(cwd)
    left_out = [str(w.message).split("\n")[0] for w in seen
                if "supernet.spaces" in str(w.message) or "vitslim.configs" in str(w.message)]
    assert left_out == []
    with zipfile.ZipFile(tmp_path / "dist" / name) as z:
        files = set(z.namelist())
    assert {"supernet/spaces/tiny.yaml", "supernet/spaces/efficientformer_l1.yaml", "vitslim/configs/quickstart.yaml",
            "vitslim/configs/supernet_tiny.yaml", "latency_tables/cpu_torch_tiny.yaml"} <= files
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)


@pytest.mark.parametrize("name", ["quickstart", "supernet_tiny"])
def test_the_shipped_configs_are_the_experiments_ones(name):
    # one config, two places: the README runs experiments/NAME.yaml, a wheel user `vitslim run quickstart`
    with open(os.path.join(ROOT, "experiments", name + ".yaml"), "rb") as a, \
            open(os.path.join(CONFIGS_DIR, name + ".yaml"), "rb") as b:
        assert a.read() == b.read(), f"edit experiments/{name}.yaml and vitslim/configs/{name}.yaml together"


def test_the_built_in_pipeline_resolves_everything_it_names(tmp_path, monkeypatch):
    from latency_tables.table import TABLES_DIR
    from supernet.train import load_config
    from vitslim.cmd_search import _reuse_path, load_pipeline
    monkeypatch.chdir(tmp_path)  # no checkout here
    assert builtin_config("quickstart", "pipeline") == os.path.join(CONFIGS_DIR, "quickstart.yaml")
    assert builtin_config("quickstart.yaml", "pipeline") == os.path.join(CONFIGS_DIR, "quickstart.yaml")
    assert builtin_config("supernet_tiny", "pipeline") == "supernet_tiny"  # not a pipeline
    d = load_pipeline(builtin_config("quickstart", "pipeline"))
    cfg = load_config(os.path.join(CONFIGS_DIR, d["supernet"]["config"]))
    assert cfg.space.name == "tiny"
    assert _reuse_path(d["table"]["reuse"], CONFIGS_DIR) == os.path.join(TABLES_DIR, "cpu_torch_tiny.yaml")
    assert load_config(builtin_config("supernet_tiny", "supernet")).to_dict() == cfg.to_dict()
    (tmp_path / "quickstart").write_text("version: 1\n")  # a file of that name here comes first
    assert builtin_config("quickstart", "pipeline") == "quickstart"


def test_unknown_names_say_what_is_built_in(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "quikstart", "--out", "o", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("quikstart: no such file, expected a pipeline .yaml (e.g. experiments/quickstart.yaml) or a "
                        f"built-in name ({', '.join(BUILTIN_CONFIGS['pipeline'])})"), err
    assert main(["supernet", "train", "--config", "tiny_supernet", "--out", "o", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("tiny_supernet: no such file, expected a supernet training config .yaml or a built-in name "
                        "(supernet_tiny)"), err
    assert not os.path.exists(tmp_path / "o")


def test_the_source_distribution_carries_the_tests_and_experiments(tmp_path):
    """An sdist is enough to run the test suite and the experiments (MANIFEST.in): tests with their data,
    experiments/, the changelog and the licence, and no compiled files."""
    import tarfile
    from setuptools import build_meta
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        name = build_meta.build_sdist(str(tmp_path))
    finally:
        os.chdir(cwd)
    with tarfile.open(tmp_path / name) as t:
        files = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "CHANGELOG.md", "experiments/quickstart.yaml", "tests/conftest.py",
            "tests/data/golden/deit_p4_d48_h3_l2.pt", "supernet/spaces/tiny.yaml",
            "latency_tables/cpu_torch_tiny.yaml", "tests/data/compat/c02c843/latency_table.yaml",
            "tests/data/compat/c02c843/expected.json"} <= files
    assert not any(f.endswith(".pyc") or "__pycache__" in f for f in files)
