"""supernet.runlock on Windows (emulated here): whether a writer is alive is asked without os.kill(pid, 0), which
on Windows sends Ctrl+C (CTRL_C_EVENT is 0) and, for a pid that is no console process group, fails with WinError 87
(OSError EINVAL, not ProcessLookupError): a killed run's temporaries then crashed every later run in the folder."""
import errno
import os
import sys
import types

import pytest

import supernet.runlock as rl


class FakeWinapi(types.ModuleType):
    """_winapi's OpenProcess / WaitForSingleObject / CloseHandle over a table {pid: "running" | "ended" | "denied"}."""

    def __init__(self, procs):
        super().__init__("_winapi")
        self.procs, self.open_handles = procs, set()

    def OpenProcess(self, access, inherit, pid):
        state = self.procs.get(pid)
        if state is None:
            e = OSError(errno.EINVAL, "The parameter is incorrect")
            e.winerror = 87
            raise e
        if state == "denied":
            e = OSError(errno.EACCES, "Access is denied")
            e.winerror = 5
            raise e
        self.open_handles.add(pid)
        return pid

    def WaitForSingleObject(self, handle, ms):
        return 0x102 if self.procs[handle] == "running" else 0

    def CloseHandle(self, handle):
        self.open_handles.discard(handle)


@pytest.fixture
def windows(monkeypatch):
    def kill(pid, sig):  # what os.kill(pid, 0) does there: never an existence check
        raise AssertionError("os.kill(pid, 0) on Windows sends Ctrl+C to the process group")

    fake = FakeWinapi({100: "running", 101: "ended", 102: "denied"})
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setitem(sys.modules, "_winapi", fake)
    return fake


def test_pid_alive_on_windows_asks_without_signalling(windows):
    assert rl.pid_alive(100) is True
    assert rl.pid_alive(101) is False  # ended, its handle still open somewhere
    assert rl.pid_alive(102) is True  # another user's: exists
    assert rl.pid_alive(999999) is False  # no such process (WinError 87)
    assert not windows.open_handles  # every handle closed


def test_a_killed_writers_temporary_is_removed_on_windows(windows, tmp_path):
    (tmp_path / "model.onnx.tmp.999999").write_text("half")  # of a killed export
    (tmp_path / "model.onnx.tmp.100").write_text("live")  # of an export still running
    assert rl.remove_stale_temps(str(tmp_path), "model.onnx") == ["model.onnx.tmp.999999"]
    assert sorted(os.listdir(tmp_path)) == ["model.onnx.tmp.100"]
