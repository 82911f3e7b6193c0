"""Error types shared by every vitslim package: one line, naming the value and what was expected."""


class VitslimError(Exception):
    """Base of every error vitslim raises on bad input; the CLI prints it as one line."""


class ArchError(VitslimError, ValueError):
    """An arch config that does not describe a buildable network."""


class CheckpointError(VitslimError, ValueError):
    """A checkpoint file that cannot be read or does not fit the network it describes."""


def bad(path: str, value, expected: str) -> ArchError:
    """The house format for a config error: `<key path>: got <value>, expected <what>`."""
    return ArchError(f"{path}: got {value!r}, expected {expected}")
