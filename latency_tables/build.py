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
