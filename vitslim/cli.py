"""`vitslim <command>`: the command line. Each command is a (add_arguments, run) pair registered in
COMMANDS; bad input becomes one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import textwrap
import warnings

from supernet.errors import VitslimError


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan and inf are not settings)."""
    import math
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(text)
    return v


finite_float.__name__ = "finite float"  # argparse names the type in its one-line error


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def _target_arch_and_model(target: str):
    """(arch, model or None) for a preset name, arch .yaml or checkpoint file."""
    from . import api
    if os.path.isfile(target) and not target.endswith((".yaml", ".yml")):
        model, arch = api.load_checkpoint(target)
        return arch, model
    return api.resolve_arch(target), None


# ------------------------------------------------------------------ built-in configs
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")  # package data
STATE_DICT_ARCH_HELP = ("arch .yaml or preset of a plain state dict whose shapes cannot tell it (a bare "
                        "torch.save(model.state_dict()) of a pruned model, a ViT whose heads are not 64 channels)")
BUILTIN_CONFIGS = {"pipeline": ("quickstart",), "supernet": ("supernet_tiny",)}  # copies of experiments/NAME.yaml


def builtin_config(path: str, kind: str) -> str:
    """`path` when it exists, else the shipped config of that bare name (`vitslim run quickstart`, `supernet train
    --config supernet_tiny`), else `path` (whose reader then says it is missing)."""
    if os.path.exists(path) or os.path.basename(path) != path:
        return path
    name = path[:-5] if path.endswith(".yaml") else path
    if name in BUILTIN_CONFIGS[kind] and os.path.isfile(os.path.join(CONFIGS_DIR, name + ".yaml")):
        return os.path.join(CONFIGS_DIR, name + ".yaml")
    return path


# ------------------------------------------------------------------ info
def _info_args(p):
    p.add_argument("target", help="preset name, arch .yaml or checkpoint (.pt/.pth/.safetensors)")
    p.add_argument("--input-size", type=int, default=None, help="count at this input side (default: the arch's)")
    p.add_argument("--json", action="store_true", help='print {"family", "params", "macs", "input_size"}')


def _info(args):
    from . import api
    from supernet.registry import get_family
    if args.input_size is not None and args.input_size < 16:
        raise VitslimError(f"--input-size: got {args.input_size}, expected an integer >= 16")
    arch, model = _target_arch_and_model(args.target)
    size = args.input_size or arch["input_size"]
    if model is not None and size != arch["input_size"]:
        from supernet.arch import validate
        from .export import size_bound_key
        bad = size_bound_key(model, validate({**arch, "input_size": size}))
        if bad:
            warnings.warn(f"--input-size {size}: these weights fit only {arch['input_size']} ({bad} is sized for it); "
                          f"the counts are of the network rebuilt at {size}, whose {bad} is new", stacklevel=1)
    c = api.count(model if model is not None else arch, input_size=size)
    if args.json:
        print(json.dumps({"family": arch["family"], "params": c["params"], "macs": c["macs"], "input_size": size}))
        return 0
    print(f"{args.target}: {arch['family']}, input {size}x{size}, {arch['num_classes']} classes"
          f"{', distillation head' if arch.get('distillation') else ''}")
    print(f"params {_fmt_int(c['params'])} ({_fmt_m(c['params'])}), MACs {_fmt_int(c['macs'])} ({c['macs'] / 1e6:.0f}M)")
    shown = arch
    if size != arch["input_size"]:  # the per-stage resolutions at the size counted (validated like any arch)
        from supernet.arch import validate
        shown = validate({**arch, "input_size": size})
    rows = get_family(arch["family"]).stage_summary(shown)
    if rows:
        cols = list(rows[0])
        w = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in cols}
        print("  ".join(k.ljust(w[k]) for k in cols))
        for r in rows:
            print("  ".join(str(r[k]).ljust(w[k]) for k in cols))
    return 0


# ------------------------------------------------------------------ presets
def _presets_args(p):
    p.add_argument("--json", action="store_true", help="print a JSON list of {name, family, params, macs}")


def _presets(args):
    from supernet.count import count_cached
    from . import api
    names = api.list_presets()
    archs = [api.get_preset(n) for n in names]
    # counting builds each network on the meta device (seconds in all); remembered in vitslim's cache folder
    rows = [{"name": n, "family": a["family"], "input_size": a["input_size"], **c}
            for n, a, c in zip(names, archs, count_cached(archs, progress=True))]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'preset':<20} {'family':<16} {'input':>5} {'params':>14} {'MACs (M)':>9}")
    for r in rows:
        print(f"{r['name']:<20} {r['family']:<16} {r['input_size']:>5} {_fmt_int(r['params']):>14} {r['macs'] / 1e6:>9.0f}")
    return 0


COMMANDS = {
    "info": (_info_args, _info, "params, MACs and per-stage summary of a preset, arch .yaml or checkpoint",
             "vitslim info efficientformer_l1\nvitslim info run/arch.yaml --input-size 256 --json"),
    "presets": (_presets_args, _presets, "list presets with params and MACs", "vitslim presets"),
}


def add_threads_arg(p) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the run (default: torch's, one per core); results depend on it "
                        "in the last float digits, so pass the same number to reproduce a run bit for bit")


def apply_threads(args) -> None:
    """Set torch's thread count from --threads (checked: an integer >= 1); recorded by the reports."""
    if args.threads is None:
        return
    if args.threads < 1:
        raise VitslimError(f"--threads: got {args.threads}, expected an integer >= 1")
    import torch
    torch.set_num_threads(args.threads)


RESUMABLE = {"latency", "supernet", "search", "run"}  # commands whose interrupted work a re-run continues


def register_command(name, add_arguments, run, help_text, example):
    """Later packages (latency, search, prune, export) add their commands here."""
    COMMANDS[name] = (add_arguments, run, help_text, example)


def _load_extra_commands():
    import importlib
    for mod in ("vitslim.cmd_latency", "vitslim.cmd_supernet", "vitslim.cmd_search", "vitslim.cmd_prune",
                "vitslim.cmd_export", "vitslim.cmd_env"):
        importlib.import_module(mod)


def one_line(text) -> str:
    """`text` as one line: a line break inside it (a path or name read from a YAML block scalar `|`, which ends in
    one) shown as \\n, so an error stays the one line the CLI promises and shows where the break is."""
    return str(text).replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\r")


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (exit 2) that points at --help, instead of the whole usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    _load_extra_commands()
    parser = OneLineParser(
        prog="vitslim", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find and make fast vision transformers for a target device.",
        epilog="example:\n  vitslim presets\n  vitslim info efficientformer_l1 --json")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"vitslim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, run, help_text, example) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="example:\n" + textwrap.indent(example.strip(), "  "))
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def _innermost(parser, args):
    """The (sub)parser of the command line's deepest command: `vitslim latency build`'s for its arguments."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) and getattr(args, a.dest, None) in a.choices:
            return _innermost(a.choices[getattr(args, a.dest)], args)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse says so from the top parser ("vitslim: error: ... see `vitslim --help`"): the command's
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    _expand_home(args)
    name = " ".join(["vitslim", args.command] + [v for v in (getattr(args, "latency_command", None),
                                                              getattr(args, "action", None)) if isinstance(v, str)])
    import torch
    threads = torch.get_num_threads()  # --threads (or a pipeline's `threads`) is the command's, not its caller's
    old_format = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        return int(args._run(args) or 0)
    except VitslimError as e:
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vitslim ... | head`: the reader left; not an error of ours
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return 0
        try:
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)  # dup2 made its own copy: run in-process, every broken pipe kept one more file open
        return 0
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS:
            raise
        # the machine's, not the input's: a full disk, a read-only or forbidden place, a name too long
        where = f" ({e.filename})" if e.filename else ""
        print(f"{name}: error: cannot write: {one_line(e.strerror or e)}{one_line(where)}; {_kept(args)}",
              file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:
        what = _out_of_memory(e)
        if what is None:
            raise
        print(f"{name}: error: out of memory ({what}): use a smaller network, batch or input size, or a machine or "
              f"device with more memory; {_kept(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        what = ("state saved so far is kept; re-run to resume" if args.command in RESUMABLE
                else "no output was written; re-run to continue from the last saved point: a run that fine-tunes "
                     "keeps its selection and saves its fine-tuning every minute, an iterative one every finished step"
                if args.command == "prune" else "no output was written; re-run to start again")
        print(f"{name}: interrupted ({what})", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = old_format
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _expand_home(args) -> None:
    """`--out=~/runs/x` (the shell expands ~ only at the start of a word, not after `=`) means the home folder,
    as paths inside configs already do, not a folder named `~` in the current one."""
    seps = {s for s in ("/", os.sep, os.altsep) if s}  # Windows: ~\runs\x (cmd and PowerShell pass ~ unexpanded)

    def home(v):
        return os.path.expanduser(v) if isinstance(v, str) and v.startswith("~") and (
            v == "~" or any(s in v for s in seps)) else v

    for k, v in vars(args).items():
        setattr(args, k, [home(x) for x in v] if isinstance(v, list) else home(v))


def _kept(args) -> str:
    return ("what was saved before is kept; re-run to resume" if args.command in RESUMABLE or args.command == "prune"
            else "nothing was left half-written")


def _out_of_memory(e: BaseException):
    """What an allocation that failed asked for (torch's CPU allocator, CUDA's, or Python's MemoryError), or
    None for any other error: a network or batch too large for the machine is the machine's limit, not a bug."""
    import re
    text = str(e)
    cuda = type(e).__name__ == "OutOfMemoryError"
    if not (isinstance(e, MemoryError) or cuda or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    m = re.search(r"tried to allocate (\d+) bytes", text, re.I)
    if m:
        return f"tried to allocate {int(m.group(1)) / 2 ** 30:,.1f} GiB"
    m = re.search(r"tried to allocate ([0-9.]+ [KMGT]iB)", text, re.I)
    return f"tried to allocate {m.group(1)}" if m else ("CUDA" if cuda else type(e).__name__)


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.ENAMETOOLONG}

_OURS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), p) + os.sep
              for p in ("supernet", "pruning", "nas", "latency_tables", "vitslim"))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Our warnings as one line for the user (no source path, no code line); others keep where they came from."""
    if str(os.path.abspath(filename)).startswith(_OURS):
        return f"warning: {message}\n"
    return f"warning: {message} ({category.__name__}, {filename}:{lineno})\n"


if __name__ == "__main__":  # `python -m vitslim.cli`: the package's module, where the other commands register
    from vitslim.cli import main as package_main
    sys.exit(package_main())
