"""The thread clock is used only where it can time one call: Windows' thread CPU time (GetThreadTimes) advances in
~15.6 ms scheduler ticks (emulated here), and a table built on it read 0 ms for every entry (then `latency predict`
divided by zero). The wall clock is used there instead."""
import warnings

import pytest

import latency_tables.measure as M
from latency_tables.backends import TorchCPU


def windows_thread_time():
    """A thread clock that, like GetThreadTimes, moves only in 15.625 ms ticks (every 2000 reads here: deterministic)."""
    n = [0]

    def clock():
        n[0] += 1
        return (n[0] // 2000) * 0.015625
    return clock


@pytest.fixture
def coarse(monkeypatch):
    monkeypatch.setitem(M.CLOCKS, "thread", windows_thread_time())
    monkeypatch.setattr(M, "_WARNED", set(), raising=False)


def test_auto_uses_the_thread_clock_where_it_is_fine():
    assert M.clock_tick("thread") <= M.THREAD_CLOCK_MAX_TICK_S  # Linux: nanoseconds
    assert M.resolve_clock("auto", TorchCPU(threads=1)) == "thread"


def test_a_coarse_thread_clock_is_not_used(coarse):
    assert M.clock_tick("thread") == pytest.approx(0.015625)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: silently the wall clock
        assert M.resolve_clock("auto", TorchCPU(threads=1)) == "wall"
    with pytest.warns(UserWarning, match="thread CPU time advances in steps of 15.6 ms"):
        assert M.resolve_clock("thread", TorchCPU(threads=1)) == "wall"  # asked by name, or a table's stored clock


def test_times_are_not_zero_on_a_coarse_thread_clock(coarse):
    def work():
        sum(range(2000))  # ~20 us: far below one tick

    proc = M.Procedure(time_per_item=0.01, min_samples=5, max_samples=20, warmup=0.0,
                       clock=M.resolve_clock("auto", TorchCPU(threads=1)))
    (t,) = M.time_interleaved([work], proc)
    assert t.ms > 0
