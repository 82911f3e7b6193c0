"""Timing, the same way for table entries and for whole networks: warm-up, then rounds in which
every item of a group runs once, in a shuffled order, so slow drift (clock, other processes) and
cache pollution spread evenly over the group; median and p10/p90 of the per-call times.

Running items round-robin also means each call finds the caches as another operator left them,
which is what a block sees inside a network (not the hot caches of a tight loop over one block).

Clocks: "wall" (time.perf_counter) is the latency a user sees on an idle device. "thread" (the
calling thread's CPU time) equals it for single-threaded CPU inference, but does not count time the
thread spends descheduled, so measurements stay right on a shared machine where other processes
take the cores; "auto" picks "thread" for 1-thread CPU backends and "wall" otherwise.
"""
from __future__ import annotations

import copy
import random
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from supernet.layers import fuse_model

from .segments import _randomise_bn, build_segment


@dataclass
class Timing:
    ms: float
    p10: float
    p90: float
    n: int


@dataclass
class Procedure:
    """How long and how often: `time_per_item` seconds of timed calls per item (at least
    `min_samples`, at most `max_samples` calls), after `warmup` seconds (and >= 3 calls) each."""
    time_per_item: float = 1.0
    min_samples: int = 15
    max_samples: int = 2000
    warmup: float = 0.05
    seed: int = 0
    clock: str = "wall"

    def with_seed(self, seed: int) -> "Procedure":
        return Procedure(self.time_per_item, self.min_samples, self.max_samples, self.warmup, seed, self.clock)

    def to_dict(self, in_context: bool = False) -> dict:
        what = ("in-context: every entry timed as a step of whole networks that contain it (run as their chains "
                "of segments), networks interleaved in shuffled rounds; median and p10/p90 over every place it ran"
                if in_context else
                "isolated: each entry alone, entries interleaved in shuffled rounds; median and p10/p90 of per-call "
                "times")
        return {"procedure": what,
                "time_per_item_s": self.time_per_item, "min_samples": self.min_samples,
                "max_samples": self.max_samples, "warmup_s": self.warmup, "clock": self.clock}


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}

# The thread clock is used only where it advances finely: Windows' thread CPU time (GetThreadTimes) moves in
# scheduler ticks of ~15.6 ms, so a sub-millisecond call timed on it reads 0 (a table of zeros); Linux's and
# macOS's advance in nanoseconds or microseconds.
THREAD_CLOCK_MAX_TICK_S = 1e-5
_TICKS: Dict[object, float] = {}
_WARNED: set = set()


def clock_tick(name: str = "thread", limit_s: float = 0.25) -> float:
    """The smallest step (seconds) seen in the clock `name` while spinning on it (three steps, at most `limit_s`
    of wall time; inf when it never moved). Measured once per process and clock function."""
    f = CLOCKS[name]
    if f not in _TICKS:
        steps, t_end = [], time.perf_counter() + limit_s
        last = f()
        while len(steps) < 3 and time.perf_counter() < t_end:
            v = f()
            if v != last:
                steps.append(v - last)
                last = v
        _TICKS[f] = min(steps) if steps else float("inf")
    return _TICKS[f]


def resolve_clock(clock: str, backend) -> str:
    """The clock to time with: `auto` is the backend's default; the thread clock becomes the wall clock where it
    advances too coarsely to time one call (Windows), said once when it was asked for by name (or by a table)."""
    asked = clock
    if clock == "auto":
        clock = backend.default_clock()
    elif clock not in CLOCKS:
        from .backends import BackendError
        raise BackendError(f"clock: got {clock!r}, expected auto, wall or thread")
    if clock == "thread" and clock_tick("thread") > THREAD_CLOCK_MAX_TICK_S:
        if asked != "auto" and "thread" not in _WARNED:
            import warnings
            _WARNED.add("thread")
            warnings.warn(f"clock thread: this system's thread CPU time advances in steps of "
                          f"{clock_tick('thread') * 1e3:.3g} ms, too coarse to time one call; timing with the wall "
                          "clock instead (run on an otherwise idle machine)", stacklevel=2)
        return "wall"
    return clock


def time_interleaved(runners: Sequence[Callable[[], None]], proc: Procedure) -> List[Timing]:
    """Time every runner (in the backend's session) the interleaved way; one Timing per runner."""
    n = len(runners)
    if n == 0:
        return []
    clock = CLOCKS[proc.clock]
    est = []
    for run in runners:
        ts, t_end = [], clock() + proc.warmup
        while len(ts) < 3 or clock() < t_end:
            t0 = clock()
            run()
            ts.append(clock() - t0)
            if len(ts) >= 200:
                break
        est.append(float(np.median(ts)))
    per_round = sum(est)
    rounds = int(proc.time_per_item * n / max(per_round, 1e-9))
    rounds = max(proc.min_samples, min(proc.max_samples, rounds))
    samples = [[] for _ in range(n)]
    rng = random.Random(proc.seed)
    order = list(range(n))
    for _ in range(rounds):
        rng.shuffle(order)
        for i in order:
            run = runners[i]
            t0 = clock()
            run()
            samples[i].append(clock() - t0)
    out = []
    for s in samples:
        a = np.asarray(s) * 1e3
        p10, med, p90 = np.percentile(a, [10, 50, 90])
        out.append(Timing(float(med), float(p10), float(p90), len(a)))
    return out


def deploy(module: nn.Module, fused: bool) -> nn.Module:
    """The module as it is deployed and measured: BatchNorm folded (unless fused=False), eval mode."""
    return fuse_model(module) if fused else module.eval()


def entry_runner(backend, key: Mapping) -> Callable[[], None]:
    module, shape = build_segment(key)
    return backend.prepare(deploy(module, backend.fused), (backend.batch_size,) + tuple(shape))


def build_network(arch: Mapping, seed: int = 0) -> nn.Module:
    from supernet.arch import validate
    from supernet.registry import get_family
    a = validate(arch)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, the caller's RNG left as it was
        torch.manual_seed(seed)
        model = get_family(a["family"]).build(a)
    model.arch = a
    _randomise_bn(model)
    return model.eval()


def network_runner(backend, arch: Mapping) -> Callable[[], None]:
    model = build_network(arch)
    a = model.arch
    return backend.prepare(deploy(model, backend.fused), (backend.batch_size, a["in_chans"], a["input_size"], a["input_size"]))


# A small fixed network (about 2 ms eager, 0.4 ms ONNX Runtime on one core of an EPYC) whose time is
# taken in every interleaved group: the drift reference.
REFERENCE_ARCH = {
    "version": 1, "family": "efficientformer", "input_size": 64, "in_chans": 3, "num_classes": 10, "distillation": False,
    "stem": {"widths": [16, 32]},
    "stages": [
        {"width": 32, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 128}] * 2},
        {"width": 48, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 192}] * 2},
        {"width": 64, "downsample": {"type": "conv"}, "blocks": [
            {"type": "meta4d", "ffn_hidden": 256},
            {"type": "meta3d", "heads": 2, "qk_dim": 16, "v_dim": 32, "ffn_hidden": 256}]},
        {"width": 96, "downsample": {"type": "conv"}, "blocks": [
            {"type": "meta4d", "ffn_hidden": 384},
            {"type": "meta3d", "heads": 2, "qk_dim": 16, "v_dim": 32, "ffn_hidden": 384}]},
    ]}


class DriftReference:
    """Drift correction on a shared machine: a reference network runs as one more item of every
    group, and the group's times are scaled by `ms / (its time in this group)`, so groups timed under
    different conditions (other processes or VMs on the cores, caches, memory bandwidth, clock speed)
    read as if timed under those when `ms` was taken: at the start of the table's build, stored in the
    table (measurement.reference) with the reference's arch. For a space the reference is a member
    of middle size (it slows down as the space's networks do); otherwise REFERENCE_ARCH."""

    def __init__(self, backend, ms: Optional[float] = None, arch: Optional[Mapping] = None):
        self.arch = dict(arch) if arch is not None else None
        self.runner = network_runner(backend, arch if arch is not None else REFERENCE_ARCH)
        self.ms = ms
        self.factors: List[float] = []

    def time(self, runners: Sequence[Callable[[], None]], proc: Procedure) -> List[Timing]:
        t = time_interleaved(list(runners) + [self.runner], proc)
        probe, t = t[-1], t[:-1]
        f = self.factor(probe.ms)
        return [Timing(x.ms * f, x.p10 * f, x.p90 * f, x.n) for x in t]

    def factor(self, probe_ms: float) -> float:
        """Scale for a group whose probe ran in `probe_ms` (the first group sets the reference)."""
        if self.ms is None:
            self.ms = probe_ms
        f = self.ms / probe_ms if probe_ms > 0 and self.ms > 0 else 1.0
        self.factors.append(f)
        return f

    def to_dict(self) -> dict:
        d = {"what": "drift reference: a fixed network (arch below; none: latency_tables.measure.REFERENCE_ARCH) timed "
                     "in every group; times scaled by ms / its time in the group", "ms": round(float(self.ms), 6)}
        if self.arch is not None:
            d["arch"] = self.arch
        if self.factors:
            d["factor_range"] = [round(min(self.factors), 4), round(max(self.factors), 4)]
        return d


def time_group(runners, proc: Procedure, reference: Optional[DriftReference] = None) -> List[Timing]:
    return reference.time(runners, proc) if reference is not None else time_interleaved(runners, proc)


def time_networks(backend, archs: Sequence[Mapping], proc: Procedure, group: int = 16, progress=None,
                  reference: Optional[DriftReference] = None) -> List[Timing]:
    """End-to-end timings of whole networks, with the procedure entries are timed with. `group`
    networks are interleaved at a time (bounded: each is a whole model in memory; 0: all)."""
    backend.check_available()
    archs = list(archs)
    group = group or len(archs) or 1
    out: List[Timing] = []
    for g in range(0, len(archs), group):
        part = archs[g:g + group]
        runners = [network_runner(backend, a) for a in part]
        with backend.session():
            out += time_group(runners, proc.with_seed(proc.seed + g), reference)
        del runners
        if progress is not None:
            progress.update(len(part))
    return out


# ---------------------------------------------------------------- in context
@dataclass
class Chain:
    """An arch as its segments, each a backend step with its own weights: running the steps one after
    another is the network's forward, and timing each step times the entry in its real context (its
    input just written by the step before, the caches as the rest of the network leaves them)."""
    ids: List[str]
    steps: List[Callable]
    x0: object


_DEPLOYED: "OrderedDict[Tuple[str, bool], Tuple[nn.Module, tuple]]" = OrderedDict()


def deployed_segment(key: Mapping, fused: bool, cache: int = 96) -> Tuple[nn.Module, tuple]:
    """(deploy-ready module, input shape) of an entry: a fresh copy (its own weights) of one built and
    fused once; initialising large random layers costs far more than copying them."""
    from .segments import key_str
    k = (key_str(key), fused)
    hit = _DEPLOYED.get(k)
    if hit is None:
        module, shape = build_segment(key)
        hit = (deploy(module, fused), tuple(shape))
        _DEPLOYED[k] = hit
        while len(_DEPLOYED) > cache:
            _DEPLOYED.popitem(last=False)
    else:
        _DEPLOYED.move_to_end(k)
    return copy.deepcopy(hit[0]), hit[1]


def forget_deployed() -> None:
    """Drop the modules deployed_segment keeps: the build that reuses them is over (a long-running process would
    hold up to `cache` deployed blocks, DeiT-B's 28 MB each, from its last build on)."""
    _DEPLOYED.clear()


def chain_for(backend, arch: Mapping) -> Chain:
    from .segments import decompose
    segs = decompose(arch)
    steps, x0 = [], None
    for s in segs:
        module, shape = deployed_segment(s.key, backend.fused)
        step, x = backend.prepare_fn(module, (backend.batch_size,) + shape)
        steps.append(step)
        x0 = x if x0 is None else x0
    return Chain([s.id for s in segs], steps, x0)


def time_chains(chains: Sequence[Chain], proc: Procedure, probe: Optional[Callable[[], None]] = None):
    """Run the chains round-robin (shuffled each round), timing every step. Returns ({entry id: [ms, ...]},
    [median total ms per chain], probe median ms or None)."""
    clock = CLOCKS[proc.clock]
    chains = list(chains)

    def run_chain(c: Chain, rec):
        h = c.x0
        t_start = clock()
        for i, step in enumerate(c.steps):
            t0 = clock()
            h = step(h)
            rec.append(clock() - t0)
        return clock() - t_start

    est = []
    for c in chains:
        ts, t_end = [], clock() + proc.warmup
        while len(ts) < 2 or clock() < t_end:
            ts.append(run_chain(c, []))
            if len(ts) >= 50:
                break
        est.append(float(np.median(ts)))
    probe_ms = []
    if probe is not None:
        for _ in range(3):
            probe()
        t0 = clock()
        probe()
        est.append(clock() - t0)
    rounds = int(proc.time_per_item * len(chains) / max(sum(est), 1e-9))
    rounds = max(proc.min_samples, min(proc.max_samples, rounds))
    samples: Dict[str, List[float]] = {}
    totals = [[] for _ in chains]
    rng = random.Random(proc.seed)
    order = list(range(len(chains))) + ([-1] if probe is not None else [])
    for _ in range(rounds):
        rng.shuffle(order)
        for ci in order:
            if ci < 0:
                t0 = clock()
                probe()
                probe_ms.append(clock() - t0)
                continue
            rec: List[float] = []
            totals[ci].append(run_chain(chains[ci], rec))
            for sid, dt in zip(chains[ci].ids, rec):
                samples.setdefault(sid, []).append(dt * 1e3)
    med_totals = [float(np.median(t)) * 1e3 for t in totals]
    return samples, med_totals, (float(np.median(probe_ms)) * 1e3 if probe_ms else None)


def summarize(samples_ms: Sequence[float]) -> Timing:
    a = np.asarray(samples_ms, float)
    p10, med, p90 = np.percentile(a, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), int(a.size))
