"""One long run per output directory: `run_lock(out)` holds OUT/.lock (flock) while a run writes there,
so a second run started on the same directory is refused instead of interleaving its files with the
first's. `shared=True` lets cooperating workers (Optuna's, on one study) hold it together."""
from __future__ import annotations

import contextlib
import os
import re
from typing import List, Optional

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


# Temporary names carry their writer's pid, so a later run can tell a killed writer's leftovers (removed)
# from a live writer's (kept): NAME.tmp.PID[.ext] (atomic file writes) and .BASE.pidPID.* (temp folders
# and files made with tempfile, prefix from temp_prefix).
_TMP_FILE = re.compile(r"^(?P<base>.+)\.tmp\.(?P<pid>\d+)(\.[A-Za-z0-9]+)?$")
_TMP_HIDDEN = re.compile(r"^\.(?P<base>.+?)\.pid(?P<pid>\d+)\.")


def temp_prefix(base: str) -> str:
    """tempfile prefix for a temporary beside `base` (a file or folder name): .BASE.pidPID."""
    return f".{base}.pid{os.getpid()}."


def plain_mode(path: str) -> None:
    """Give a temporary the mode a plain file or folder created there would get (the umask's; mkstemp's and
    mkdtemp's 0600 / 0700 would keep other users from reading the result it becomes)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def remove_stale_temps(folder: str, base: Optional[str] = None) -> List[str]:
    """Remove the temporaries in `folder` (of `base` only, if given) whose writer is no longer running;
    returns the names removed."""
    import shutil
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    gone = []
    for name in names:
        m = next((m for m in (_TMP_FILE.match(name), _TMP_HIDDEN.match(name))
                  if m and (base is None or m.group("base") == base or m.group("base").startswith(f".{base}.pid"))),
                 None)
        if m is None:
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or pid_alive(pid):  # its writer still runs
            continue
        p = os.path.join(folder, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        gone.append(name)
    return gone


@contextlib.contextmanager
def run_lock(out: str, shared: bool = False, error=VitslimError, what: str = "run", hint: str = ""):
    """Hold OUT/.lock (shared or exclusive) for the block. Yields `share()`: turns an exclusive hold into a
    shared one (a run that needed the directory to itself to clear it, then works beside cooperating
    workers); raises `error` where another run took the lock in the moment between (flock converts by
    releasing first)."""
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
        yield lambda: None
        return
    f = open(os.path.join(out, LOCK_FILE), "a+")

    def take(mode):
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"--out {out}: another {what} is running in it{hint}; wait for it, or choose another "
                        "--out") from None
        except OSError:
            pass  # no flock on this file system

    try:
        take(fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield lambda: take(fcntl.LOCK_SH)
    finally:
        f.close()
