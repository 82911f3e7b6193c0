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


class FakeClock:
    """A clock that only the runners move: each call of a runner takes exactly the time it says."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def runner(self, *durations):
        k = [0]

        def run():
            self.now += durations[k[0] % len(durations)]
            k[0] += 1
        return run


U = 2.0 ** -10  # about 1 ms, exact in binary: sums of it are exact


def test_interleaved_timing_takes_as_many_rounds_as_the_time_budget_allows_within_the_sample_bounds(monkeypatch):
    """Warm-up (3 calls each) estimates a round at 1 U + 3 U; time_per_item 2^-4 s for 2 items is 2^-3 s: 32
    rounds, unless min_samples / max_samples say otherwise."""
    clock = FakeClock()
    monkeypatch.setitem(M.CLOCKS, "wall", clock)
    for lo, hi, rounds in ((3, 1000, 32), (3, 10, 10), (50, 1000, 50)):
        proc = M.Procedure(time_per_item=2.0 ** -4, min_samples=lo, max_samples=hi, warmup=0.0)
        a, b = M.time_interleaved([clock.runner(U), clock.runner(3 * U)], proc)
        assert (a.n, b.n) == (rounds, rounds)
        assert (a.ms, a.p10, a.p90) == (1e3 * U,) * 3 and (b.ms, b.p10, b.p90) == (3e3 * U,) * 3


def test_interleaved_timing_reports_the_median_and_the_10th_and_90th_percentiles(monkeypatch):
    """Calls taking 1..10 U in turn, 10 rounds: median 5.5 U, p10 1.9 U and p90 9.1 U (linear between ranks)."""
    clock = FakeClock()
    monkeypatch.setitem(M.CLOCKS, "wall", clock)
    proc = M.Procedure(time_per_item=1.0, min_samples=10, max_samples=10, warmup=0.0)
    (t,) = M.time_interleaved([clock.runner(*[i * U for i in range(1, 11)])], proc)
    assert t.n == 10
    assert (t.ms, t.p10, t.p90) == pytest.approx((5.5e3 * U, 1.9e3 * U, 9.1e3 * U), rel=1e-12)
    s = M.summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert (s.ms, s.p10, s.p90, s.n) == pytest.approx((5.5, 1.9, 9.1, 10), rel=1e-12)


def test_drift_reference_scales_each_group_by_the_first_groups_probe_time_over_its_own(monkeypatch):
    """The probe (the reference network) runs as one more item of every group: the first group's probe time is
    the reference (factor 1); a group whose probe ran twice as slow has its times halved."""
    clock = FakeClock()
    monkeypatch.setitem(M.CLOCKS, "wall", clock)
    proc = M.Procedure(time_per_item=2.0 ** -4, min_samples=3, max_samples=100, warmup=0.0)
    ref = M.DriftReference(TorchCPU(threads=1))
    ref.runner = clock.runner(4 * U)
    (t,) = ref.time([clock.runner(2 * U)], proc)
    assert ref.ms == 4e3 * U and t.ms == 2e3 * U
    ref.runner = clock.runner(8 * U)  # the machine got twice as slow: so did the item
    (t,) = ref.time([clock.runner(4 * U)], proc)
    assert ref.ms == 4e3 * U and t.ms == 2e3 * U and (t.p10, t.p90) == (2e3 * U, 2e3 * U)
    assert ref.factors == [1.0, 0.5] and ref.to_dict()["factor_range"] == [0.5, 1.0]


def test_in_context_timing_times_every_step_of_every_chain_for_the_rounds_the_budget_allows(monkeypatch):
    """Chains a(1 U) -> b(2 U) and a(1 U) -> c(4, 4, 10 U in turn): warm-up (2 runs each) estimates a round at
    3 U + 5 U, so a budget of 2^-4 s per chain is 16 rounds. Entry a is timed in both chains; each chain's
    total is the median of its runs (c's 10 U calls are a third of them: the median is 5 U, not the mean)."""
    clock = FakeClock()
    monkeypatch.setitem(M.CLOCKS, "wall", clock)

    def step(*durations):
        run = clock.runner(*durations)
        return lambda h: (run(), h)[1]
    chains = [M.Chain(["a", "b"], [step(U), step(2 * U)], None), M.Chain(["a", "c"], [step(U), step(4 * U, 4 * U, 10 * U)], None)]
    proc = M.Procedure(time_per_item=2.0 ** -4, min_samples=3, max_samples=1000, warmup=0.0)
    samples, totals, probe = M.time_chains(chains, proc)
    assert {k: len(v) for k, v in samples.items()} == {"a": 32, "b": 16, "c": 16} and probe is None
    assert set(samples["a"]) == {1e3 * U} and set(samples["b"]) == {2e3 * U}
    assert sorted(samples["c"]) == [4e3 * U] * 10 + [10e3 * U] * 6
    assert totals == [3e3 * U, 5e3 * U]
    proc = M.Procedure(time_per_item=2.0 ** -4, min_samples=3, max_samples=10, warmup=0.0)
    samples, _, probe = M.time_chains(chains[:1], proc, probe=clock.runner(U))
    assert len(samples["b"]) == 10 and probe == 1e3 * U


def test_a_procedure_with_another_seed_keeps_everything_else():
    """time_networks times each group with proc.with_seed(...): the clock (thread for 1-thread CPU tables) and the
    budget must stay the table's."""
    p = M.Procedure(time_per_item=0.3, min_samples=7, max_samples=70, warmup=0.02, seed=1, clock="thread")
    assert p.with_seed(9) == M.Procedure(time_per_item=0.3, min_samples=7, max_samples=70, warmup=0.02, seed=9,
                                         clock="thread")
