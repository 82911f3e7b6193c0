"""Bind vitslim's top-level sibling packages (supernet, latency_tables, nas, pruning) to this
installation's copies, whatever the current directory holds.

The design card puts these packages at the top level under generic names. Under an editable
install (the README's `pip install -e .`), setuptools maps them with a finder that Python asks
*after* searching sys.path, whose first entry is the current directory for `python -m vitslim`
and in notebooks. A plain folder of the same name there (a user's own `latency_tables/` of
tables, a run directory called `nas/`) then wins as a namespace package, and the first
`from latency_tables import LatencyTable` fails with "cannot import name ... (unknown location)".
A wheel install is not affected by folders (a regular package beats a namespace portion), but a
user's own *module* of one of these names (`pruning.py`) shadows it under either install.

`bind()` runs before vitslim imports any sibling: a sibling that would resolve to a plain folder
elsewhere is loaded from this installation instead (the folder holds no code, so nothing of the
user's is lost); one that resolves to somebody else's code is left alone, with a warning naming
both files, since replacing it would break the user's own imports.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

SIBLINGS = ("supernet", "latency_tables", "nas", "pruning")


def _ours(root: Path, name: str) -> Path:
    return root / name / "__init__.py"


def _same(a, b: Path) -> bool:
    try:
        return Path(a).resolve() == b.resolve()
    except (OSError, RuntimeError, TypeError):
        return False


def _load(root: Path, name: str):
    init = _ours(root, name)
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def bind(root: Path | None = None) -> list:
    """Make every sibling import this installation's package; returns the names it had to load
    explicitly (empty in the ordinary case, where it only looks)."""
    root = Path(__file__).resolve().parent.parent if root is None else Path(root)
    loaded = []
    for name in SIBLINGS:
        init = _ours(root, name)
        if not init.is_file():  # an unusual layout: nothing to bind to, leave Python's answer
            continue
        module = sys.modules.get(name)
        if module is not None:
            origin = getattr(module, "__file__", None)
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            origin = None if spec is None else spec.origin
            if spec is not None and origin is not None and spec.loader is not None and _same(origin, init):
                continue  # the ordinary case
        if origin is not None and _same(origin, init):
            continue
        if origin is None or origin == "namespace":
            # absent, or a plain folder (a namespace portion) that would hide ours: load ours
            _load(root, name)
            loaded.append(name)
        else:
            warnings.warn(f"vitslim: {origin} shadows vitslim's package '{name}' ({init.parent}); "
                          f"rename it or run from another directory, or vitslim's commands that need "
                          f"'{name}' will fail", RuntimeWarning, stacklevel=3)
    return loaded
