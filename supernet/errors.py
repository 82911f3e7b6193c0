"""Error types shared by every vitslim package: one line, naming the value and what was expected."""


class VitslimError(Exception):
    """Base of every error vitslim raises on bad input; the CLI prints it as one line."""


class ArchError(VitslimError, ValueError):
    """An arch config that does not describe a buildable network."""


class CheckpointError(VitslimError, ValueError):
    """A checkpoint file that cannot be read or does not fit the network it describes."""


def first_line(e: BaseException, default=None) -> str:
    """The first non-blank line of an exception's message (libraries raise pages: converters, exporters, drivers),
    or `default` (the exception's type name when None) where it has none."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__ if default is None else default)


def bad(path: str, value, expected: str) -> ArchError:
    """The house format for a config error: `<key path>: got <value>, expected <what>`."""
    return ArchError(f"{path}: got {value!r}, expected {expected}")


def check_device(name, flag: str = "--device"):
    """`name` as a torch.device that can run here; a one-line VitslimError otherwise (a typo, or CUDA asked
    for on a machine without it)."""
    import torch
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise VitslimError(f"{flag}: got {name!r}, expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitslimError(f"{flag}: got {name!r}, but this torch has no usable CUDA device "
                               f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VitslimError(f"{flag}: got {name!r}, expected an index below {torch.cuda.device_count()} "
                               "(the CUDA devices here)")
    elif dev.type != "cpu":
        raise VitslimError(f"{flag}: got {name!r}, expected cpu, cuda or cuda:N")
    return dev


def nearest_existing(path) -> str:
    """`path` or its nearest ancestor that exists (what an output's missing folders would be made in)."""
    import os
    d = os.path.abspath(os.fspath(path))
    while not os.path.exists(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    return d


def check_writable(path, flag: str, is_dir: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is wanted (or the
    reverse), or a path whose nearest existing ancestor is a file or not writable."""
    import os
    path = os.fspath(path)
    if os.path.exists(path):
        if is_dir and not os.path.isdir(path):
            raise VitslimError(f"{flag} {path}: is a file, expected a directory")
        if not is_dir and os.path.isdir(path):
            raise VitslimError(f"{flag} {path}: is a directory, expected a file path")
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise VitslimError(f"{flag} {path}: cannot be created ({parent} is "
                           f"{'not a folder' if not os.path.isdir(parent) else 'not writable'}), expected a path in a "
                           "writable folder")
