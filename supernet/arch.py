"""The arch config: one versioned, human-readable dict (and YAML file) that describes any network
vitslim builds, searches, prunes or exports; validation with errors that name key, value and
expectation.

Vocabulary shared by every family (see README "Arch config"):

    version: 1
    family: efficientformer | efficientvit | shvit | deit | swin
    input_size: 224          # square input side in pixels
    in_chans: 3
    num_classes: 1000
    distillation: false      # a second (distillation) head, averaged with the first at eval
    stem: {...}              # family-specific widths of the stem / patch embedding
    stages:                  # one entry per resolution
      - width: 48
        downsample: null | {type: ..., ...}   # what enters the stage (null for the first)
        blocks:
          - {type: meta4d, ffn_hidden: 192}   # every width that can differ, per block

Attention blocks all use the same words: `heads`, `qk_dim` (per head), `v_dim` (per head),
`ffn_hidden`. A family validates its own block types on top of the common checks here.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import shutil
import sys
from numbers import Integral
from typing import Any, Iterable, Mapping

import yaml

from .errors import ArchError, bad, nearest_existing

ARCH_VERSION = 1
COMMON_KEYS = ("version", "family", "input_size", "in_chans", "num_classes", "distillation", "stem", "stages")


# ---------------------------------------------------------------- field checks
def is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def req(d: Mapping, key: str, path: str):
    if not isinstance(d, Mapping):
        raise bad(path, d, "a mapping")
    if key not in d:
        raise ArchError(f"{path}.{key}: missing, expected a value" if path else f"{key}: missing, expected a value")
    return d[key]


MAX_INT = 2 ** 31 - 1  # no size of a network comes near; larger values are typos or hostile files
# What no network of these families comes near (the largest: 384-1024 px inputs, 4 stages, 18-48 blocks in a
# stage); beyond them a few bytes of YAML build gigabytes (a 10**6 px position embedding) or a million modules.
MAX_INPUT_SIZE = 4096
MAX_STAGES = 64
MAX_BLOCKS = 1000  # per stage


def check_int(v, path: str, lo: int | None = 1, hi: int | None = None) -> int:
    if not is_int(v):
        raise bad(path, v, "an integer")
    if lo is not None and v < lo:
        raise bad(path, v, f"an integer >= {lo}")
    hi = MAX_INT if hi is None else hi
    if v > hi:
        raise bad(path, v, f"an integer <= {hi}")
    return int(v)


def check_bool(v, path: str) -> bool:
    if not isinstance(v, bool):
        raise bad(path, v, "true or false")
    return v


def check_choice(v, path: str, choices: Iterable) -> Any:
    choices = list(choices)
    if v not in choices:
        raise bad(path, v, "one of " + ", ".join(repr(c) for c in choices))
    return v


def check_list(v, path: str, length: int | None = None, nonempty: bool = True) -> list:
    if not isinstance(v, (list, tuple)):
        raise bad(path, v, "a list")
    if nonempty and len(v) == 0:
        raise bad(path, v, "a non-empty list")
    if length is not None and len(v) != length:
        raise bad(path, v, f"a list of {length} items")
    return list(v)


def check_keys(d: Mapping, path: str, allowed: Iterable[str]) -> None:
    """Unknown keys are an error: a typo must not silently fall back to a default."""
    allowed = set(allowed)
    for k in d:
        if k not in allowed:
            raise ArchError(f"{path + '.' if path else ''}{k}: unknown key, expected one of {', '.join(sorted(allowed))}")


# ---------------------------------------------------------------- whole config
def validate(arch) -> dict:
    """Check an arch config and return a normalised deep copy (defaults filled in).

    Common keys are checked here, then the family's own `validate` checks stems, stages and
    blocks. Raises ArchError naming the first offending key.
    """
    from .registry import get_family  # late: families register themselves on import

    if not isinstance(arch, Mapping):
        raise ArchError(f"arch config: got {type(arch).__name__}, expected a mapping of keys to values")
    a = copy.deepcopy(dict(arch))
    version = a.setdefault("version", ARCH_VERSION)
    if not is_int(version) or version != ARCH_VERSION:
        raise bad("version", version, f"{ARCH_VERSION} (this vitslim reads arch configs of version {ARCH_VERSION})")
    fam_name = req(a, "family", "")
    if not isinstance(fam_name, str):
        raise bad("family", fam_name, "a family name (efficientformer, efficientvit, shvit, deit or swin)")
    fam = get_family(fam_name)
    check_int(a.setdefault("input_size", fam.default_input_size), "input_size", lo=16, hi=MAX_INPUT_SIZE)
    check_int(a.setdefault("in_chans", 3), "in_chans")
    check_int(a.setdefault("num_classes", 1000), "num_classes")
    check_bool(a.setdefault("distillation", False), "distillation")
    stages = check_list(req(a, "stages", ""), "stages")
    if len(stages) > MAX_STAGES:
        raise ArchError(f"stages: {len(stages)} stages, expected at most {MAX_STAGES}")
    for i, st in enumerate(stages):
        p = f"stages[{i}]"
        if not isinstance(st, Mapping):
            raise bad(p, st, "a mapping with width and blocks")
        check_int(req(st, "width", p), p + ".width")
        blocks = check_list(req(st, "blocks", p), p + ".blocks", nonempty=False)
        if len(blocks) > MAX_BLOCKS:
            raise ArchError(f"{p}.blocks: {len(blocks)} blocks, expected at most {MAX_BLOCKS} in a stage")
        for j, b in enumerate(blocks):
            bp = f"{p}.blocks[{j}]"
            if not isinstance(b, Mapping):
                raise bad(bp, b, "a mapping with a 'type'")
            check_choice(req(b, "type", bp), bp + ".type", fam.block_types)
    a = fam.validate(a)
    order = {k: i for i, k in enumerate(COMMON_KEYS)}
    return dict(sorted(a.items(), key=lambda kv: order.get(kv[0], len(order))))


# ---------------------------------------------------------------- YAML
class _Dumper(yaml.SafeDumper):
    pass


def _repr_dict(dumper, data):
    # A block or downsample spec of scalars reads best on one line: `- {type: meta4d, ffn_hidden: 192}`.
    flat = all(not isinstance(v, (dict, list, tuple)) or
               (isinstance(v, (list, tuple)) and all(not isinstance(x, (dict, list, tuple)) for x in v))
               for v in data.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flat and len(data) <= 12)


def _repr_list(dumper, data):
    flat = all(not isinstance(x, (dict, list, tuple)) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(dict, _repr_dict)
_Dumper.add_representer(list, _repr_list)
_Dumper.add_representer(tuple, _repr_list)


def to_yaml(arch: Mapping) -> str:
    a = dict(arch)
    head = f"# vitslim arch config (version {a.get('version', ARCH_VERSION)}): build with vitslim.build_model(path)\n"
    # The top level stays block style so the file reads top to bottom.
    out = io.StringIO()
    out.write(head)
    for k, v in a.items():
        if isinstance(v, (dict, list, tuple)):
            out.write(yaml.dump({k: v}, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100))
        else:  # a scalar must not go through the flow-style dict representer
            out.write(yaml.safe_dump({k: v}, sort_keys=False, default_flow_style=False))
    return out.getvalue()


def write_target(path) -> str:
    """Where a write to `path` lands: a symlink is written through (its target replaced, the link kept), as
    open(path, "w") would, rather than replaced by a plain file beside what it pointed at."""
    path = os.fspath(path)
    return os.path.realpath(path) if os.path.islink(path) else path


def write_error(e: BaseException, path) -> "OSError | None":
    """The OSError a failed write to `path` should surface as, or None to re-raise `e` as it is: the file
    named when the OS did not name it, and a full disk said plainly where torch.save hides ENOSPC behind
    "[enforce fail at inline_container.cc] unexpected pos"."""
    path = os.fspath(path)
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, e.strerror, path) if e.filename is None else None
    try:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) if free < (1 << 20) else None


def _check_writable_path(path: str) -> None:
    """The errors a write would meet, named by the user's path rather than the temporary's: a folder where
    the file should go, a file where a parent folder should be. Makes the missing parents."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, expected a file path", path)
    parent = os.path.dirname(os.path.abspath(path))
    up = nearest_existing(parent)
    if os.path.exists(up) and not os.path.isdir(up):
        raise NotADirectoryError(errno.ENOTDIR, f"{up} is a file, expected a folder to write in", path)
    os.makedirs(parent, exist_ok=True)


@contextlib.contextmanager
def atomic_file(path, mode: str = "w"):
    """open() a temporary beside `path` (PATH.tmp.PID), fsync and rename it over `path` when the block ends
    without an error, else remove it: a crash never leaves a half-written file under the real name. A symlink
    is written through (`write_target`); a full disk raises OSError(ENOSPC) naming the file."""
    path = write_target(path)
    _check_writable_path(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        err = write_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """Write then rename, so a crash never leaves a half-written file under the real name."""
    with atomic_file(path) as f:
        f.write(text)


def figures():
    """pyplot's `subplots(...)` for figures that are only saved: each draws on its own Agg canvas, so no backend
    is chosen for the process (`matplotlib.use("Agg")` switched a notebook's inline backend, closing its
    figures) and pyplot never holds them. ImportError without matplotlib."""
    from types import SimpleNamespace

    import matplotlib  # noqa: F401 - first: the ImportError where it is missing, also after its parts were imported
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def subplots(*args, figsize=None, dpi=None, **kwargs):
        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(*args, **kwargs)
    return SimpleNamespace(subplots=subplots)


def atomic_savefig(fig, path: str, **kwargs) -> str:
    """fig.savefig to a temp file then rename (a crash never leaves half an image under the real name);
    the format from the extension, PNG when there is none. Closes the figure (one pyplot holds)."""
    path = write_target(path)
    _check_writable_path(path)
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    tmp = f"{path}.tmp.{os.getpid()}.{ext}"
    try:
        fig.savefig(tmp, format=ext, **kwargs)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        err = write_error(e, path)
        if err is None:
            raise
        raise err from e
    finally:
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# One palette for every figure vitslim draws: Okabe & Ito's, whose colours stay distinct for the common
# colour-vision deficiencies (matplotlib's default cycle pairs a green with a red).
PLOT_COLOURS = {"blue": "#0072B2", "orange": "#E69F00", "green": "#009E73", "vermillion": "#D55E00",
                "purple": "#CC79A7", "sky": "#56B4E9", "grey": "#999999", "black": "#000000"}


def save_arch(arch: Mapping, path: str) -> dict:
    a = validate(arch)
    atomic_write_text(path, to_yaml(a))
    return a


MAX_YAML_NODES = 10 ** 7


def _fits_expanded(data, limit: int) -> bool:
    """Whether `data` has at most `limit` values counted as a copy would (each alias of a shared list or mapping
    in full): safe_load shares what an alias names, but JSON dumps, comparisons and walks expand it, so nine
    levels of nine aliases in 1 kB of YAML become 387 million values (and gigabytes) downstream."""
    n, stack = 0, [data] if isinstance(data, (dict, list)) else []
    while stack:
        x = stack.pop()
        n += len(x)
        if n > limit:
            return False
        stack.extend(v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list)))
    return True


def read_yaml(path, error=ArchError, what: str = "an arch config .yaml", invalid_hint: str = ""):
    """The data of a YAML file (yaml.safe_load: untrusted files build no objects); a one-line `error`
    naming the file when it is missing ("expected {what}") or not YAML (", expected {invalid_hint}")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{path}: no such file, expected {what}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        tail = f"expected {invalid_hint or what}"
        raise error(f"{path}: not a text (UTF-8) file, {tail}") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}), expected {what}") from None
    try:
        data = yaml.safe_load(text)
        if not _fits_expanded(data, max(MAX_YAML_NODES, len(text))):  # no file without aliases comes near
            raise error(f"{path}: YAML aliases (*name) that expand to over {max(MAX_YAML_NODES, len(text)):,} values "
                        f"(a 'billion laughs' file), expected {invalid_hint or what} without such repetition")
        return data
    except RecursionError:  # PyYAML composes nested collections recursively: '[[[[...' a few thousand deep
        tail = f", expected {invalid_hint or what}"
        raise error(f"{path}: nested too deeply to read (over Python's recursion limit){tail}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        tail = f", expected {invalid_hint}" if invalid_hint else ""
        raise error(f"{path}: not valid YAML ({first}){tail}") from None


def load_arch(path: str) -> dict:
    path = os.fspath(path)
    data = read_yaml(path, ArchError, "an arch config .yaml", "an arch config")
    if not isinstance(data, Mapping):
        raise ArchError(f"{path}: got a YAML {type(data).__name__}, expected a mapping (an arch config)")
    try:
        return validate(data)
    except ArchError as e:
        raise ArchError(f"{path}: {e}") from None

