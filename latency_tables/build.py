"""Building a table: enumerate the entries a space or arch needs, measure the missing ones in
interleaved groups (saving the table atomically after every entry, so a re-run resumes), then
calibrate the overhead on whole networks measured end to end.
"""
from __future__ import annotations

import math
import random
from typing import Callable, List, Mapping, Optional, Sequence

import numpy as np

from .measure import (DriftReference, Procedure, chain_for, entry_runner, forget_deployed, summarize, time_chains,
                      time_group, time_networks)
from .segments import arch_keys, decompose, key_str, space_keys
from .table import LatencyError, LatencyTable, now_iso


def needed_keys(space=None, archs: Sequence[Mapping] = ()) -> List[dict]:
    """Entries of a search space (every candidate at every width) and/or of some archs, deduplicated."""
    keys, seen = [], set()
    for k in (space_keys(space) if space is not None else []):
        if key_str(k) not in seen:
            seen.add(key_str(k))
            keys.append(k)
    for a in archs:
        for k in arch_keys(a):
            if key_str(k) not in seen:
                seen.add(key_str(k))
                keys.append(k)
    return keys


def open_table(path: str, backend, built_for: Optional[Mapping] = None) -> LatencyTable:
    """The table at `path` if it exists (it must be for this backend and device: measurements from two
    devices never mix), else a new empty one for the backend."""
    import os
    if os.path.exists(path):
        t = LatencyTable.load(path)
        diffs = t.matches(backend.describe())
        if diffs:
            raise LatencyError(f"{path}: measured on another backend/device ({'; '.join(diffs)}): a resumed build "
                               f"would mix devices; pass a new --out for this one")
        return t
    t = LatencyTable(backend.describe(), measurement={}, built_for=built_for or {})
    t.path = path
    return t


def table_reference(table: LatencyTable, backend, enabled: bool = True, space=None) -> Optional[DriftReference]:
    """The drift reference of a table: its stored ms and arch; a table without one gets, for a space,
    a member of middle size (else the small default), its ms taken in the first group."""
    if not enabled:
        return None
    ref = (table.measurement or {}).get("reference") or {}
    if ref.get("ms") is not None:
        return DriftReference(backend, ref["ms"], ref.get("arch"))
    return DriftReference(backend, None, middle_arch(space) if space is not None else None)


def middle_arch(space) -> dict:
    """A member of the space of middle size: middle widths, half the positions as blocks (Meta4D first,
    one Meta3D where allowed)."""
    widths, blocks = [], []
    for i, st in enumerate(space.stages):
        ws = space.widths(i)
        widths.append(ws[len(ws) // 2])
        n = max(1, st.max_depth // 2)
        kinds = ["meta4d" if "meta4d" in st.candidates else "meta3d"] * n
        if "meta3d" in st.candidates and n > 1:
            kinds[-1] = "meta3d"
        blocks.append(kinds + ["identity" if "identity" in st.candidates else kinds[-1]] * (st.max_depth - n))
    return space.to_arch({"widths": widths, "blocks": blocks})


def measure_entries(table: LatencyTable, keys: Sequence[Mapping], backend, proc: Procedure, group: int = 8,
                    save: bool = True, progress=None, on_entry: Optional[Callable] = None,
                    reference: Optional[DriftReference] = None) -> int:
    """Measure the keys the table lacks, `group` at a time interleaved; save after each entry.
    Returns how many were measured."""
    backend.check_available()
    todo = table.missing(list(keys))
    done = 0
    for g in range(0, len(todo), max(1, group)):
        part = todo[g:g + group]
        runners = [entry_runner(backend, k) for k in part]
        with backend.session():
            timings = time_group(runners, proc.with_seed(proc.seed + g), reference)
        del runners
        if reference is not None:
            table.measurement["reference"] = _merge_ref(table.measurement.get("reference"), reference)
        for k, t in zip(part, timings):
            table.set(k, t.ms, t.p10, t.p90, t.n, "measured")
            done += 1
            if on_entry:
                on_entry(k, t)
        if save and table.path:  # once per group: its entries were timed together
            table.save()
        if progress is not None:
            progress.update(len(part))
    return done


def partial_path(table_path: str) -> str:
    """The sidecar of an in-context build of `table_path` (samples of entries still waiting for a network)."""
    return f"{table_path}.partial.json"


def measure_in_context(table: LatencyTable, keys: Sequence[Mapping], archs: Sequence[Mapping], backend,
                       proc: Procedure, group: int = 8, save: bool = True, progress=None,
                       reference: Optional[DriftReference] = None, contexts: int = 10**9) -> int:
    """Measure the keys the table lacks inside whole networks (`archs`, which must contain them all: see
    `covering_archs`): every network runs as its chain of segments, each step timed; an entry's value
    is the median over every place it ran. Networks run `group` at a time, interleaved; an entry is
    saved once the last network containing it has run. Returns how many entries were measured."""
    backend.check_available()
    wanted = {key_str(k): k for k in table.missing(list(keys))}
    if not wanted:
        return 0
    # Samples of entries still waiting for a later network survive an interruption in a sidecar file
    # (<table>.partial.json: the networks already run and the samples taken), so a re-run skips them.
    import hashlib
    import json
    import os
    from .table import atomic_write

    def net_id(a):
        return hashlib.sha1(json.dumps(a, sort_keys=True).encode()).hexdigest()[:16]

    state_path = partial_path(table.path) if (save and table.path) else None
    setup = json.loads(json.dumps(dict(table.device), sort_keys=True, default=str))
    acc: dict = {}
    ran: list = []
    if state_path and os.path.exists(state_path):
        try:
            with open(state_path, encoding="utf-8") as f:
                st = json.load(f)
            if st.get("setup") == setup:  # the same device *and* threads, batch, dtype, fusion, runtime
                acc = {k: list(v) for k, v in st["samples"].items() if k in wanted}
                ran = list(st["ran"])
        except (OSError, ValueError, KeyError, TypeError):
            acc, ran = {}, []
    chosen, last = [], {}
    need = max(1, int(contexts))
    seen_in: dict = {}  # wanted id -> networks chosen (or already run) that contain it
    for a in archs:
        ids = [s.id for s in decompose(a)]
        if net_id(a) in ran:
            for i in ids:
                if i in wanted:
                    seen_in[i] = seen_in.get(i, 0) + 1
            continue
        # only networks that time a missing entry in fewer than `contexts` places so far (the list is the same on
        # every re-run and `ran` is counted first, so a resumed build chooses the same ones)
        if any(i in wanted and seen_in.get(i, 0) < need for i in ids):
            for i in ids:
                if i in wanted:
                    seen_in[i] = seen_in.get(i, 0) + 1
            chosen.append(a)
            for i in ids:
                if i in wanted:
                    last[i] = len(chosen) - 1
    lacking = [k for s, k in wanted.items() if s not in last and s not in acc]
    if lacking:
        raise LatencyError(f"no network measured contains {len(lacking)} entr{'y' if len(lacking) == 1 else 'ies'}: "
                           + ", ".join(key_str(k) for k in lacking[:4]))
    done = 0

    def finish(sids):
        nonlocal done
        for sid in sids:
            t = summarize(acc.pop(sid))
            table.set(wanted[sid], t.ms, t.p10, t.p90, t.n, "measured")
            done += 1
        if sids and save and table.path:  # once for all that finished: before the sidecar drops their samples
            table.save()

    finish([sid for sid in list(acc) if sid not in last])  # every network holding it ran before a stop
    if progress is not None and hasattr(progress, "total"):  # the networks this run times, not every candidate
        progress.total = len(chosen)
        progress.refresh()
    try:
        for g in range(0, len(chosen), max(1, group)):
            part = chosen[g:g + group]
            chains = [chain_for(backend, a) for a in part]
            with backend.session():
                samples, _, probe_ms = time_chains(chains, proc.with_seed(proc.seed + len(ran)),
                                                   reference.runner if reference is not None else None)
            del chains
            f = reference.factor(probe_ms) if reference is not None else 1.0
            for sid, v in samples.items():
                if sid in wanted:
                    acc.setdefault(sid, []).extend(x * f for x in v)
            if reference is not None:
                table.measurement["reference"] = _merge_ref(table.measurement.get("reference"), reference)
            finished = [sid for sid in list(acc) if last.get(sid, -1) < g + len(part)]
            finish(finished)
            ran += [net_id(a) for a in part]
            if state_path:
                if not finished and table.path:
                    table.save()  # the drift reference taken in the first group must survive too
                atomic_write(state_path, json.dumps({"setup": setup,
                                                     "ran": ran,
                                                     "samples": {k: [round(x, 6) for x in v] for k, v in acc.items()}}))
            if progress is not None:
                progress.update(len(part))
    finally:
        forget_deployed()  # the deployed segments (GBs for a large grid) are not kept past the build
    if state_path and os.path.exists(state_path):
        os.unlink(state_path)
    return done


def covering_archs(space=None, keys: Sequence[Mapping] = (), archs: Sequence[Mapping] = (), seed: int = 0,
                   contexts: int = 1) -> List[dict]:
    """Networks that together contain every key `contexts` times over (so each entry is timed inside
    at least that many different networks): members of the space chosen greedily to cover what is
    left (widths by a longest path over the stages, block kinds to match), then the given archs."""
    from .segments import SPACE_COVERS
    ids = {key_str(k) for k in keys}
    out: List[dict] = []
    covered = set()
    for a in archs:
        covered |= {s.id for s in decompose(a)}
    if space is not None and ids - covered:
        if space.family not in SPACE_COVERS:
            raise LatencyError(f"search space family {space.family!r}: no covering networks, expected one of "
                               f"{', '.join(sorted(SPACE_COVERS))} (use --procedure isolated)")
        for c in range(max(1, contexts)):
            out += SPACE_COVERS[space.family](space, ids - covered, random.Random(seed + c))
    return out + [dict(a) for a in archs]


def _merge_ref(old: Optional[Mapping], ref: DriftReference) -> dict:
    d = ref.to_dict()
    if old and old.get("factor_range") and d.get("factor_range"):
        lo, hi = old["factor_range"]
        d["factor_range"] = [min(lo, d["factor_range"][0]), max(hi, d["factor_range"][1])]
    return d


def calibration_archs(space=None, archs: Sequence[Mapping] = (), n: int = 8, seed: int = 10_000) -> List[dict]:
    """Networks the overhead is fitted on: for a space, its largest and smallest members plus random
    ones (a seed apart from validation's); otherwise the given archs."""
    out = [dict(a) for a in archs]
    if space is not None:
        rng = random.Random(seed)
        choices = [space.largest_choice(), smallest_choice(space)]
        while len(choices) < n:
            choices.append(space.sample(rng))
        out = [space.to_arch(c) for c in choices[:max(n, 2)]] + out
    return out


def grid_calibration_networks(space=None, archs: Sequence[Mapping] = (), n: int = 8) -> List[dict]:
    """The networks the overhead of a table with the pruning grid is fitted on (`latency build --prune-grid
    --calibrate N` times them here, `latency export-coreml --prune-grid --networks N` exports them for the
    device): those of `calibration_archs`, then N - 1 pruned variants of each arch (the networks the grid
    prices, their blocks at pruned widths)."""
    from .grid import grid_calibration_archs
    return calibration_archs(space, archs, n=n) + [x for a in archs for x in grid_calibration_archs(a, n)[1:]]


def overhead_summary(over: Mapping) -> str:
    """The line of a fitted overhead `latency build` and `latency import` print (and a second, `note: ...`,
    when the fit fell back to a simpler model: why)."""
    def pct(x):
        return "n/a" if x is None else f"{x:.2%}"
    return (f"overhead: e2e = (1 {float(over.get('scale', 0)):+.4f}) * sum {float(over.get('intercept_ms', 0)):+.4f} ms "
            f"on {over.get('networks', 0)} networks (MAPE sum only {pct(over.get('mape_sum_only'))}, fitted "
            f"{pct(over.get('mape_fitted'))})" + (f"\nnote: overhead: {over['note']}" if over.get("note") else ""))


def smallest_choice(space) -> dict:
    blocks = []
    for s in space.stages:
        first = "meta4d" if "meta4d" in s.candidates else next(c for c in s.candidates if c != "identity")
        blocks.append([first] + ["identity" if "identity" in s.candidates else first] * (s.max_depth - 1))
    return {"widths": [s.min_width for s in space.stages], "blocks": blocks}


# The plausible range of a fitted slope (1 + scale): the whole network runs its entries once each, so its time
# moves with their sum; a slope far from 1 (0: every network measured alike, as at a device's dispatch floor)
# says the networks' times do not follow their entries, and such a fit prices every pruned network alike.
SLOPE_RANGE = (0.5, 1.5)


def fit_overhead(sums: Sequence[float], measured: Sequence[float], counts: Optional[Sequence[int]] = None) -> dict:
    """measured ~= (1 + scale) * sum + intercept_ms + per_segment_ms * count, least squares on the
    relative error. The per-segment term only with >= 6 networks whose segment counts differ; fewer
    than 3 networks, or a fitted slope 1 + scale outside SLOPE_RANGE: scale 0 and the median residual
    (the entries' own differences kept; a `note` says why)."""
    s = np.asarray(sums, float)
    m = np.asarray(measured, float)
    n = np.asarray(counts if counts is not None else np.zeros(len(s)), float)
    bad = [i for i, x in enumerate(m) if not (math.isfinite(x) and x > 0)]
    if bad:  # the fit weighs each network by 1 / its time: 0 gives NaN coefficients (or a failed SVD)
        raise LatencyError(f"overhead fit: network {bad[0]} of {len(m)} measured at {m[bad[0]]:g} ms, expected a "
                           "positive time (a whole network cannot run in no time: a clock too coarse, or a failed "
                           "measurement)")
    scale = intercept = per_seg = 0.0
    note = None
    if len(s) >= 3 and np.ptp(s) > 0:
        w = 1.0 / m
        cols = [s, np.ones_like(s)] + ([n] if len(s) >= 6 and np.ptp(n) > 0 else [])
        A = np.stack(cols, axis=1) * w[:, None]
        coef, *_ = np.linalg.lstsq(A, m * w, rcond=None)
        scale, intercept = float(coef[0] - 1.0), float(coef[1])
        per_seg = float(coef[2]) if len(coef) > 2 else 0.0
        lo, hi = SLOPE_RANGE
        if not lo <= 1.0 + scale <= hi:
            note = (f"the least-squares slope {round(1.0 + scale, 3) + 0.0:.3f} (scale {scale:+.4f}, intercept {intercept:+.4f} ms) "
                    f"is outside [{lo:g}, {hi:g}]: the networks' times do not follow their entries' sum (all "
                    "alike: a device's dispatch floor?), and such a fit prices pruned networks wrongly; fitted as a "
                    "constant alone (scale 0, the median residual), as with fewer than 3 networks")
            scale = per_seg = 0.0
            intercept = float(np.median(m - s))
    elif len(s):
        intercept = float(np.median(m - s))
    if len(s) and (1 + scale) * 0.25 * s.min() + intercept + per_seg * max(float(n.min()), 1.0) <= 0:
        # the fit predicts no time at all for a network a quarter the size of the smallest measured one (networks
        # measured much faster than their entries sum to): keep the model multiplicative, positive for any network
        r = s / m
        scale = float(r.sum() / (r * r).sum() - 1.0) if (r * r).sum() > 0 else 0.0
        intercept = per_seg = 0.0
        note = (note.rsplit("; fitted as", 1)[0] + "; a constant alone would be negative (negative latency for "
                "small networks): fitted as a scale alone") if note else \
            ("a fit with a negative constant would predict negative latency for small networks; fitted as a scale alone")
    pred = (1 + scale) * s + intercept + per_seg * n
    raw = np.abs(s - m) / m if len(s) else np.zeros(0)
    fit = np.abs(pred - m) / m if len(s) else np.zeros(0)
    return {"intercept_ms": round(intercept, 6), "scale": round(scale, 6), "per_segment_ms": round(per_seg, 6),
            "provenance": "measured", "model": "e2e = (1 + scale) * sum(entries) + intercept_ms + per_segment_ms * entries",
            "networks": int(len(s)),
            "mape_sum_only": round(float(raw.mean()), 5) if len(s) else None,
            "mape_fitted": round(float(fit.mean()), 5) if len(s) else None,
            "points": [[round(float(a), 4), int(c), round(float(b), 4)] for a, c, b in zip(s, n, m)],
            **({"note": note} if note else {})}


def overhead_warning(over: Mapping, limit: float = 0.25) -> Optional[str]:
    """A warning when the entries sum far from the networks measured end to end (mean relative error over
    `limit`): the fitted overhead then hides entries that do not add up (a loaded machine, too few samples),
    and predictions for networks unlike the calibration ones inherit the error."""
    err, n = over.get("mape_sum_only"), int(over.get("networks") or 0)
    if err is None or err <= limit:
        return None
    pts = over.get("points") or []
    high = sum(p[0] > p[2] for p in pts)
    way = "above" if high * 2 > len(pts) else "below"
    return (f"the table's entries sum {err:.0%} {way} the {n} network{'s' if n != 1 else ''} measured end to end; the "
            f"fitted overhead (scale {float(over.get('scale', 0)):+.3f}) corrects those, but the entries do not add up: "
            "re-measure on a quiet machine with a longer --time-per-network or more --min-samples"
            + (", and calibrate on at least 3 networks (--calibrate)" if n < 3 else "")
            + ", then check with `vitslim latency validate`")


def calibrate(table: LatencyTable, backend, archs: Sequence[Mapping], proc: Procedure, progress=None,
              reference: Optional[DriftReference] = None, interpolate: bool = False) -> dict:
    """Measure `archs` end to end and fit the table's overhead; saved with the table. With
    `interpolate`, networks may need entries the table prices by interpolation (pruned widths on the
    pruning grid)."""
    sums, counts = [], []
    for a in archs:
        segs = decompose(a)
        if not interpolate:
            miss = table.missing(a)
            if miss:
                raise LatencyError(f"calibration network needs entries the table lacks: "
                                   f"{', '.join(key_str(k) for k in miss[:4])}")
            sums.append(sum(table.entries[s.id].ms for s in segs))
        else:
            sums.append(sum(table.lookup(s.key, interpolate=True).ms for s in segs))
        counts.append(len(segs))
    timings = time_networks(backend, archs, proc, progress=progress, reference=reference)
    if reference is not None:
        table.measurement["reference"] = _merge_ref(table.measurement.get("reference"), reference)
    over = fit_overhead(sums, [t.ms for t in timings], counts)
    msg = overhead_warning(over)
    if msg:
        import warnings
        warnings.warn(msg, stacklevel=2)
    over["measured_at"] = now_iso()
    table.overhead = over
    if table.path:
        table.save()
    return over


# ------------------------------------------------------------------ a whole build: `build_table` (and `vitslim latency build`)
BUILD_DEFAULTS = {"time_per_network": 0.4, "time_per_entry": 0.5, "min_samples": 15}

# how a message names a setting: build_table's parameter, or the option of `vitslim latency build` (cli=True)
_CLI_FLAGS = {"batch_size": "--batch", "archs": "--arch", "drift_reference": "--no-drift-reference"}


def _flag(name: str, cli: bool) -> str:
    return (_CLI_FLAGS.get(name) or "--" + name.replace("_", "-")) if cli else name


def _at_least(name: str, v, lo: int = 1):
    if v < lo:
        from supernet.errors import VitslimError
        raise VitslimError(f"{name}: got {v}, expected a number >= {lo}")
    return v


def progress_bar(total: int, what: str, quiet: bool):
    """A tqdm bar on stderr counting `total` `what` (disabled when `quiet`)."""
    import sys
    from tqdm import tqdm
    unit = what.replace("{", "{{").replace("}", "}}")  # written in: tqdm 4.27 (our floor) has no {unit}: a KeyError
    return tqdm(total=total, unit=what, file=sys.stderr, disable=quiet, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} " + unit + " [{elapsed}<{remaining}]")


def procedure_for(backend, time_per_item: float, min_samples: int, clock: Optional[str] = None,
                  measurement: Optional[Mapping] = None, option: str = "--time-per-network",
                  min_option: str = "--min-samples") -> Procedure:
    """The timing procedure: `clock` (else the measurement's, else auto) and the measurement's sample cap and
    warm-up (a table's, else the defaults); `option` / `min_option` name the settings in errors."""
    from supernet.errors import VitslimError
    from .measure import resolve_clock
    m = measurement or {}
    clock = clock or m.get("clock") or "auto"
    if time_per_item <= 0:
        raise VitslimError(f"{option}: got {time_per_item:g}, expected seconds > 0")
    return Procedure(time_per_item=time_per_item, min_samples=_at_least(min_option, min_samples),
                     max_samples=m.get("max_samples", 2000), warmup=m.get("warmup_s", 0.05),
                     clock=resolve_clock(clock, backend))


def resolve_arch_like(target) -> dict:
    """An arch from a dict, a preset name, an arch .yaml or a checkpoint (its arch)."""
    import os
    from vitslim import api   # the top of the stack, imported when used: nothing imports latency_tables first
    if isinstance(target, (str, os.PathLike)) and os.path.isfile(target) \
            and not os.fspath(target).endswith((".yaml", ".yml")):
        _, arch = api.load_checkpoint(os.fspath(target))
        return arch
    return api.resolve_arch(target)


def space_record(given) -> str:
    """What a table records as the file of its space (built_for.space_file): the path relative to where the
    build ran, or for a shipped space its place in the package (supernet/spaces/NAME.yaml), found from any
    folder by `validate`."""
    import os
    from supernet.space import SPACES_DIR, resolve_space_path
    path = os.path.abspath(resolve_space_path(given))
    if os.path.dirname(path) == os.path.abspath(SPACES_DIR):
        return "supernet/spaces/" + os.path.basename(path)
    return os.path.relpath(path)


def add_grid_keys(keys, grid_keys) -> None:
    """Append the grid's keys (per arch) to `keys`, each once."""
    seen = {key_str(k) for k in keys}
    for gk in grid_keys:
        for k in gk:
            if key_str(k) not in seen:
                seen.add(key_str(k))
                keys.append(k)


def grid_for(prune_grid: bool, grid_step, archs: Sequence[Mapping], cli: bool = False):
    """(grid keys per arch, GridSpec) for a pruning grid, else ([], None)."""
    from supernet.errors import VitslimError
    from .grid import parse_grid_step, prune_grid_keys
    if not prune_grid:
        if grid_step:
            raise VitslimError(f"{_flag('grid_step', cli)} {grid_step}: only with {_flag('prune_grid', cli)} (it "
                               "spaces the pruning grid)")
        return [], None
    if not archs:
        raise VitslimError(f"{_flag('prune_grid', cli)}: expected {'--arch ARCH' if cli else 'archs'} (the DeiT or "
                           "Swin preset, arch .yaml or checkpoint whose pruned widths the grid prices)")
    spec = parse_grid_step(grid_step)
    return [prune_grid_keys(a, spec) for a in archs], spec


def check_table_names(out: str, flag: str = "--out") -> None:
    """A table's temporaries (NAME.tmp.PID, NAME.partial.json and its own) and lock must fit the file system's
    name limit: checked before the first network is timed, not when the first save fails."""
    import os
    from supernet.runlock import check_names_fit, lock_beside, temp_names
    base, partial = os.path.basename(out), os.path.basename(partial_path(out))
    check_names_fit(flag, out, os.path.dirname(os.path.abspath(out)),
                    temp_names(base) + [partial] + temp_names(partial))
    lock = lock_beside(out)
    check_names_fit(flag, out, os.path.dirname(lock), [os.path.basename(lock)])


def table_lock(out: str, flag: str = "--out"):
    """Hold the table's lock for the whole build (or import): a second build of the same table would save over
    the first's entries and share (then delete) its NAME.partial.json."""
    import os
    from supernet.runlock import file_lock, lock_beside
    lock = lock_beside(out)
    return file_lock(lock, busy=f"{flag} {out}: another latency build (or import) is writing this table; wait for it "
                                f"to finish (a build resumes from what the other measured), or choose another {flag}",
                     cannot=f"{flag} {out}: cannot write in {os.path.dirname(lock)}")


def build_table(out, backend="torch-cpu", space=None, archs: Sequence = (), prune_grid: bool = False, *,
                grid_step: Optional[str] = None, threads: Optional[int] = None, batch_size: Optional[int] = None,
                dtype: Optional[str] = None, fused: Optional[bool] = None, clock: Optional[str] = None,
                procedure: str = "in-context", contexts: int = 2, time_per_network: Optional[float] = None,
                time_per_entry: Optional[float] = None, min_samples: Optional[int] = None, group: int = 8,
                calibrate: int = 10, recalibrate: bool = False, drift_reference: bool = True, dry_run: bool = False,
                progress: bool = False, log: Optional[Callable[[str], None]] = None,
                _cli: bool = False) -> LatencyTable:
    """Measure the latency table of a search space and/or some archs into `out` (.yaml), as
    `vitslim latency build` does, and return it.

    `backend`: a backend name (torch-cpu, torch-cuda, onnxruntime, coreml; `threads`, `batch_size`, `dtype`,
    `fused` configure it: default 1, 1, float32, fused) or a `Backend` instance, your own subclass included
    (configured already: those four are then not taken). `space`: a SearchSpace, a space .yaml or a shipped
    space's name; `archs`: arch dicts, preset names, arch .yaml or checkpoint paths; `prune_grid` (with
    `archs`, DeiT or Swin) adds the width grid `prune_model(..., "latency=...")` prices pruned widths with
    (`grid_step`: "qk=8,v=8,ffn=0,heads=3"). `procedure`: "in-context" (each entry timed as a step of `contexts`
    whole networks at least) or "isolated"; `time_per_network` / `time_per_entry` seconds (default 0.4 / 0.5)
    and `min_samples` (default 15) runs per item, `group` items interleaved; `clock` auto, wall or thread;
    `calibrate` networks measured end to end fit the overhead (0: none; `recalibrate` refits it anyway).

    A table that exists at `out` is resumed (topped up): only missing entries are measured, with the settings
    it was measured with (another value given is an error). The table is saved atomically after every group
    and at the end, under a lock beside it. `dry_run`: only count what is needed and missing (nothing is
    written). `progress`: tqdm bars on stderr; `log`: called with each status line (e.g. `print`)."""
    import os
    from supernet.errors import VitslimError, check_writable
    from supernet.runlock import remove_stale_temps
    from .backends import Backend, get_backend
    say = log or (lambda msg: None)
    out = os.fspath(out)
    if space is None and not archs:
        raise VitslimError("expected --space SPACE.yaml and/or --arch ARCH (what to enumerate entries for)"
                           if _cli else "build_table: expected space and/or archs (what to enumerate entries for)")
    if procedure not in ("in-context", "isolated"):
        raise VitslimError(f"procedure: got {procedure!r}, expected in-context or isolated")
    _at_least(_flag("group", _cli), group)
    _at_least(_flag("calibrate", _cli), calibrate, 0)
    _at_least(_flag("contexts", _cli), contexts)
    space_obj = space
    if space is not None and not hasattr(space, "stages"):
        from supernet.space import load_space
        space_obj = load_space(space)
    arch_dicts = [resolve_arch_like(a) for a in archs]
    keys = needed_keys(space_obj, arch_dicts)
    grid_keys, grid_spec = grid_for(prune_grid, grid_step, arch_dicts, _cli)
    add_grid_keys(keys, grid_keys)
    if isinstance(backend, Backend):
        given = [(n, v) for n, v in (("threads", threads), ("batch_size", batch_size), ("dtype", dtype),
                                     ("fused", fused)) if v is not None]
        if given:
            raise VitslimError(f"{given[0][0]}: got {given[0][1]!r} with a Backend instance, expected it left out "
                               f"(set it on the instance: {type(backend).__name__}({given[0][0]}=...))")
    elif isinstance(backend, str):
        threads = 1 if threads is None else threads
        batch_size = 1 if batch_size is None else batch_size
        _at_least(_flag("threads", _cli), threads)
        _at_least(_flag("batch_size", _cli), batch_size)
        backend = get_backend(backend, threads=threads, batch_size=batch_size, dtype=dtype or "float32",
                              fused=True if fused is None else fused)
    else:
        raise VitslimError(f"backend: got {type(backend).__name__}, expected a backend name or a "
                           "latency_tables.Backend instance")
    if not dry_run:
        backend.check_available()
    in_context = procedure == "in-context"
    built_for = {}
    if space_obj is not None:
        built_for.update({"space": space_obj.name})
        if isinstance(space, (str, os.PathLike)):  # given as a file or a shipped name: where it is
            built_for["space_file"] = space_record(space)
        built_for["input_size"] = space_obj.input_size
    if archs:
        built_for["archs"] = [os.fspath(a) if isinstance(a, (str, os.PathLike)) else f"{a['family']} arch (a dict)"
                              for a in archs]
    if grid_spec is not None:
        built_for["prune_grid"] = grid_spec.to_dict()
    check_writable(out, _flag("out", _cli))
    check_table_names(out, _flag("out", _cli))
    settings = dict(clock=clock, time_per_network=time_per_network, time_per_entry=time_per_entry,
                    min_samples=min_samples, procedure=procedure, contexts=contexts, group=group, calibrate=calibrate,
                    recalibrate=recalibrate, drift_reference=drift_reference, dry_run=dry_run, quiet=not progress)

    def build():
        remove_stale_temps(os.path.dirname(os.path.abspath(out)), base=os.path.basename(out))
        return _build_into(out, space_obj, arch_dicts, keys, grid_keys, grid_spec, backend, in_context, built_for,
                           settings, say, _cli)
    if dry_run:  # reads the table only
        return build()
    with table_lock(out, _flag("out", _cli)):
        return build()


def _resume_settings(out: str, s: dict, table: LatencyTable, backend, in_context: bool, cli: bool) -> None:
    """The clock and sampling settings of a build (in `s`): a resumed table's own (another value given is
    refused: its entries would be measured two ways under one header), else the ones given or their defaults."""
    from supernet.errors import VitslimError
    m = table.measurement or {}
    stored = m.get("clock")
    new_out = "use a new " + _flag("out", cli)
    if stored:  # two clocks do not add up
        from .measure import resolve_clock
        if s["clock"] is not None and resolve_clock(s["clock"], backend) != stored:
            leave = "leave out --clock" if cli else "leave out clock"
            raise VitslimError(f"{_flag('clock', cli)} {s['clock']}: {out} was measured with the {stored} clock, and "
                               f"times from two clocks do not add up ({leave} to resume with {stored}, or {new_out})")
        s["clock"] = stored
    timed = "time_per_network" if in_context else "time_per_entry"
    stored = {timed: m.get("time_per_item_s"), "min_samples": m.get("min_samples")}
    for k, default in BUILD_DEFAULTS.items():
        given, was = s[k], stored.get(k)
        if was is not None and given is not None and float(given) != float(was):
            leave = "the option" if cli else "it"
            raise VitslimError(f"{_flag(k, cli)} {given:g}: {out} was measured with {was:g}; a resumed build keeps "
                               f"its settings (leave {leave} out, or {new_out})")
        s[k] = given if given is not None else (was if was is not None else default)


def _build_into(out, space, archs, keys, grid_keys, grid_spec, backend, in_context, built_for, s, say, cli):
    from supernet.errors import VitslimError
    table = open_table(out, backend, built_for)
    _resume_settings(out, s, table, backend, in_context, cli)
    timed = "time_per_network" if in_context else "time_per_entry"
    proc = procedure_for(backend, s[timed], s["min_samples"], s["clock"], option=_flag(timed, cli),
                         min_option=_flag("min_samples", cli))
    proc_nets = procedure_for(backend, s["time_per_network"], s["min_samples"], s["clock"],
                              option=_flag("time_per_network", cli), min_option=_flag("min_samples", cli))
    if table.measurement.get("procedure") and not table.measurement["procedure"].startswith(s["procedure"]):
        raise VitslimError(f"{out}: measured with the {table.measurement['procedure'].split(':')[0]} procedure, "
                           f"not {s['procedure']}: entries of both kinds would not add up (use a new "
                           f"{_flag('out', cli)})")
    missing = table.missing(keys)
    say(f"{out}: {len(keys)} entries needed, {len(keys) - len(missing)} present, {len(missing)} to measure "
        f"on {backend.name} ({backend.device_name()}, {backend.threads} thread(s), batch {backend.batch_size}, "
        f"clock {proc.clock})")
    if s["dry_run"]:
        return table
    backend.check_available()
    if not table.measurement.get("procedure"):
        table.measurement.update(proc.to_dict(in_context))
    if table.built_for != built_for:
        merged = dict(table.built_for)
        merged.update(built_for)
        table.built_for = merged
    ref = table_reference(table, backend, s["drift_reference"], space)
    if missing and in_context:
        # covering networks of every entry, not only the missing ones: the same list on every re-run,
        # so an interrupted build skips the networks it already ran (see measure_in_context)
        nets = covering_archs(space, keys, archs, contexts=s["contexts"])
        if grid_spec is not None:
            from .grid import grid_networks
            nets = [n for a, gk in zip(archs, grid_keys) for n in grid_networks(a, gk, s["contexts"])] + nets
        say(f"timing {len(missing)} entries inside the networks of {len(nets)} covering ones that hold them "
            f"{s['contexts']} time(s) over")
        with progress_bar(len(nets), "networks", s["quiet"]) as bar:
            measure_in_context(table, missing, nets, backend, proc, group=s["group"], progress=bar, reference=ref,
                               contexts=s["contexts"])
    elif missing:
        with progress_bar(len(missing), "entries", s["quiet"]) as bar:
            measure_entries(table, keys, backend, proc, group=s["group"], progress=bar, reference=ref)
    if missing and s["calibrate"] and table.overhead:  # fitted without the new entries' networks: refit,
        table.overhead["calibration_pending"] = True   # also when this run is killed before it (a resume)
    table.save(out)
    calib_done = (table.overhead or {}).get("provenance") == "measured" and \
        not (table.overhead or {}).get("calibration_pending")
    if s["calibrate"] and (missing or s["recalibrate"] or not calib_done):
        if grid_spec is not None:  # pruned variants too: the networks the grid is for
            nets = grid_calibration_networks(space, archs, n=s["calibrate"])
        else:
            nets = calibration_archs(space, archs, n=s["calibrate"])
        with progress_bar(len(nets), "networks", s["quiet"]) as bar:
            over = calibrate(table, backend, nets, proc_nets, progress=bar, reference=ref,
                             interpolate=grid_spec is not None)
        say(overhead_summary(over))
    table.save(out)
    say(f"wrote {out}: {len(table)} entries")
    return table
