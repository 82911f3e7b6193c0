"""One long run per output directory: `run_lock(out)` holds OUT/.lock (flock) while a run writes there,
so a second run started on the same directory is refused instead of interleaving its files with the
first's. `shared=True` lets cooperating workers (Optuna's, on one study) hold it together."""
from __future__ import annotations

import contextlib
import os

from .errors import VitslimError

LOCK_FILE = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is running (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(out: str, shared: bool = False, error=VitslimError, what: str = "run", hint: str = ""):
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise error(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise error(f"--out {out}: cannot be created ({e.strerror or e})") from None
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing is locked
        yield
        return
    f = open(os.path.join(out, LOCK_FILE), "a+")
    try:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"--out {out}: another {what} is running in it{hint}; wait for it, or choose another "
                        "--out") from None
        except OSError:
            pass  # no flock on this file system
        yield
    finally:
        f.close()
