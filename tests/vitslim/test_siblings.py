"""vitslim's top-level siblings (supernet, latency_tables, nas, pruning) are found whatever the
current directory holds. Under the README's editable install, setuptools maps them with a finder that
Python consults after sys.path, whose first entry is the current directory (`python -m vitslim`, a
notebook): a user's plain `latency_tables/` folder of tables then won as a namespace package and
`from latency_tables import LatencyTable` failed with "cannot import name ... (unknown location)".
Each test reproduces that finder in a fresh interpreter, so it does not depend on how this checkout
is installed."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# setuptools' editable finder, reduced: the repo is not on sys.path; a meta-path finder appended after
# PathFinder maps vitslim's top-level packages to it
PRELUDE = textwrap.dedent(f"""
    import importlib.abc, importlib.util, os, sys
    ROOT = {ROOT!r}
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != ROOT]
    class Editable(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in ("vitslim", "supernet", "latency_tables", "nas", "pruning"):
                init = os.path.join(ROOT, name, "__init__.py")
                return importlib.util.spec_from_file_location(name, init,
                                                              submodule_search_locations=[os.path.dirname(init)])
            return None
    sys.meta_path.append(Editable())
    sys.path.insert(0, "")   # the current directory, as under `python -m` and in notebooks
""")


def _run(cwd, code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_users_plain_folders_no_longer_hide_the_packages(tmp_path):
    for name in ("latency_tables", "nas", "pruning", "supernet"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.yaml").write_text("a: 1\n")
    # the defect, shown under the same finder: without vitslim's binding the folder wins
    r = _run(tmp_path, "import latency_tables; print(latency_tables.__file__)")
    assert r.returncode == 0 and r.stdout.strip() == "None", r.stderr
    r = _run(tmp_path, """
        import vitslim
        from latency_tables import LatencyTable
        import nas, pruning, supernet
        print(LatencyTable.__module__, nas.__file__, pruning.__file__, supernet.__file__)
    """)
    assert r.returncode == 0, r.stderr
    mod, *files = r.stdout.split()
    assert mod == "latency_tables.table"
    assert files == [os.path.join(ROOT, n, "__init__.py") for n in ("nas", "pruning", "supernet")]
    assert "shadows" not in r.stderr
    # the user's folder is untouched
    assert (tmp_path / "latency_tables" / "mine.yaml").read_text() == "a: 1\n"


def test_the_cli_lists_tables_from_a_directory_with_a_latency_tables_folder(tmp_path):
    (tmp_path / "latency_tables").mkdir()
    r = _run(tmp_path, "from vitslim.cli import main; raise SystemExit(main(['latency', 'list']))")
    assert r.returncode == 0, r.stderr
    assert "cpu_torch_tiny" in r.stdout


def test_a_users_module_of_the_same_name_is_left_alone_with_a_warning(tmp_path):
    (tmp_path / "pruning.py").write_text("MINE = 1\n")
    r = _run(tmp_path, "import vitslim, pruning; print(pruning.MINE)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"   # the user's own import still works
    warning = [ln for ln in r.stderr.splitlines() if "shadows" in ln]
    assert len(warning) == 1
    assert str(tmp_path / "pruning.py") in warning[0] and os.path.join(ROOT, "pruning") in warning[0]


def test_nothing_is_loaded_or_warned_in_the_ordinary_case(tmp_path):
    r = _run(tmp_path, """
        import sys, vitslim
        from vitslim._siblings import bind
        print(bind(), 'nas' in sys.modules, 'pruning' in sys.modules)
    """)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.split() == ["[]", "False", "False"]   # `import vitslim` stays as light as it was
