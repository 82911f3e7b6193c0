"""One long run per output directory: `run_lock(out)` holds OUT/.lock (flock) while a run writes there,
so a second run started on the same directory is refused instead of interleaving its files with the
first's. `shared=True` lets cooperating workers (Optuna's, on one study) hold it together."""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import List, Optional

from .errors import VitslimError, nearest_existing

LOCK_FILE = ".lock"


def pid_alive(pid: int) -> bool:
    """Whether a process of this host is running (one we may not signal counts as running)."""
    if sys.platform == "win32":  # os.kill(pid, 0) there sends Ctrl+C (CTRL_C_EVENT is 0), and fails (WinError 87)
        return _pid_alive_windows(pid)  # on a pid that is no process group: asked without signalling
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_alive_windows(pid: int) -> bool:
    """pid_alive on Windows: open the process (SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION) and ask whether it
    has ended, without signalling it. No such process: False; one we may not open (another user's): True."""
    import _winapi
    try:
        handle = _winapi.OpenProcess(0x00100000 | 0x1000, False, int(pid))
    except OSError as e:
        return getattr(e, "winerror", None) == 5  # ERROR_ACCESS_DENIED: it exists
    try:
        return _winapi.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running (WAIT_OBJECT_0: ended)
    finally:
        _winapi.CloseHandle(handle)


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
    try:
        f = open(os.path.join(out, LOCK_FILE), "a+")
    except OSError as e:  # an existing folder on read-only storage, or one we may not write in
        raise error(f"--out {out}: cannot write in it ({e.strerror or e})") from None

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


@contextlib.contextmanager
def file_lock(path: str, busy: str, cannot: str, error=VitslimError):
    """Hold an exclusive flock on the lock file `path` for the block, and remove the file when it ends (a
    run's output that lives beside its lock, as a prune's run folder or a latency table, leaves nothing
    behind). Refused with `error(busy)` when another process holds it, `error(cannot + " (reason)")` when
    the file cannot be created. A process that opened the file just before its holder removed it sees
    that the name now points elsewhere (or nowhere) and tries again on the new file. Folders made for the
    lock are removed again when the block fails (a refused or failed run leaves nothing behind)."""
    path = os.fspath(path)
    made, d = [], os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise error(f"{cannot} ({e.strerror or e})") from None
    done = False
    try:
        with _flock_file(path, busy, cannot, error):
            yield
            done = True
    finally:
        if not done:
            for d in made:
                with contextlib.suppress(OSError):
                    os.rmdir(d)


@contextlib.contextmanager
def _flock_file(path: str, busy: str, cannot: str, error):
    try:
        import fcntl
    except ImportError:  # not POSIX: nothing is locked
        yield
        return
    while True:
        try:
            f = open(path, "a+")
        except OSError as e:
            raise error(f"{cannot} ({e.strerror or e})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise error(busy) from None
        except OSError:
            pass  # no flock on this file system
        try:
            same = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
        except OSError:
            same = False
        if same:
            break
        f.close()  # its holder ended and removed it between our open and our lock: lock the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)  # while still held: see above
        f.close()


def lock_beside(path: str) -> str:
    """The lock of a writer of `path` (a file, or a run folder that appears only at its end): .NAME.lock beside
    it, beside a symlink's target (so writes through the link and to the target itself exclude each other)."""
    real = os.path.realpath(os.fspath(path))
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.lock")


# The longest names a writer adds beside a name: a PID as long as Linux allows (pid_max up to 2**22, 7 digits)
# and tempfile's 8 random characters, so a name that fits now fits in every later run.
_PID = "9" * max(7, len(str(os.getpid())))
_RAND = "x" * 8


def name_max(folder: str) -> int:
    """The longest file name (bytes) the file system of `folder` (or its nearest existing ancestor) takes."""
    try:
        return int(os.pathconf(nearest_existing(folder), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_names_fit(flag: str, value: str, folder: str, names, error=VitslimError) -> None:
    """Refuse, before any work, an output whose temporary, lock or state files (`names`, written in `folder`)
    would have longer names than its file system allows: they would fail once the work is done."""
    limit = name_max(folder)
    longest = max(len(os.fsencode(n)) for n in names)
    if longest > limit:
        raise error(f"{flag} {value}: too long a name for the temporary and lock files written beside it (up to "
                    f"{longest} bytes; names in {os.path.abspath(folder)} take at most {limit}): expected a name at "
                    f"least {longest - limit} bytes shorter")


def temp_names(base: str, folder: bool = False) -> list:
    """The names an atomic write of the file `base` (supernet.arch.atomic_file: BASE.tmp.PID) takes beside it,
    or with `folder`, those of a run folder `base` written as a temporary (tempfile.mkdtemp with temp_prefix)
    then renamed over the previous one moved aside (.BASE.pidPID.old.RANDOM)."""
    if folder:
        return [f".{base}.pid{_PID}.{_RAND}", f".{base}.pid{_PID}.old.{_RAND}"]
    return [f"{base}.tmp.{_PID}"]
