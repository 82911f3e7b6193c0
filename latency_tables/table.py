"""The latency lookup table: file format, device matching, and prediction (one arch, or a whole
search space at once through `compile`).

File (YAML, `format: vitslim-latency-table`, `version: 1`):

    device:   {backend, device, threads, batch_size, dtype, fused, runtime: {torch, ...}, platform}
    measurement: {...}       # how entries were timed (procedure, budgets)
    built_for: {...}         # the space or archs it was enumerated from (information only)
    overhead: {intercept_ms, scale, provenance, networks, ...}
    entries:
    - {key: {op: meta4d, dim: 48, ffn_hidden: 192, res: 56}, ms: 3.24, p10: 3.19, p90: 3.31, n: 154, source: measured}

predict(arch) = (1 + scale) * sum of the arch's entries + intercept_ms + per_segment_ms * (number of
entries summed). The three are fitted, at build time, on networks measured end to end (what the sum
misses: the glue between segments, a runtime's per-call cost that one whole-network call pays once);
all 0 when not measured.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
from dataclasses import dataclass
from numbers import Real
from typing import Dict, Iterable, List, Mapping, Optional

import yaml

from supernet.arch import read_yaml
from supernet.errors import VitslimError
from supernet.space import shipped_file, yaml_names

from .segments import SegmentError, Segment, check_key, decompose, input_numel, key_str, segment_macs, OPS

TABLE_FORMAT = "vitslim-latency-table"
TABLE_VERSION = 1
SOURCES = ("measured", "imported", "estimated")
# Fields of the device description that must agree for a table to stand for a device.
MATCH_FIELDS = ("backend", "device", "threads", "batch_size", "dtype", "fused")


class LatencyError(VitslimError, ValueError):
    """A latency table that is malformed, for another device, or that cannot cover an arch."""


class MissingEntriesError(LatencyError):
    def __init__(self, missing: List[dict], what: str = "arch"):
        self.missing = missing
        shown = "; ".join(key_str(k) for k in missing[:6])
        more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        super().__init__(f"{what} needs {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} the table lacks: "
                         f"{shown}{more} (measure them with `vitslim latency build`, or pass interpolate=True / "
                         f"--interpolate to estimate them from neighbouring widths)")


@dataclass
class Entry:
    key: dict
    ms: float
    p10: float
    p90: float
    n: int
    source: str = "measured"

    def to_dict(self) -> dict:
        return {"key": dict(self.key), "ms": _r(self.ms), "p10": _r(self.p10), "p90": _r(self.p90), "n": int(self.n),
                "source": self.source}


def _r(x: float) -> float:
    return float(f"{x:.6g}")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ---------------------------------------------------------------- the table
class LatencyTable:
    """Per-device latencies of operator entries; `predict(arch)` in milliseconds."""

    def __init__(self, device: Mapping, entries: Iterable[Entry] = (), overhead: Optional[Mapping] = None,
                 measurement: Optional[Mapping] = None, built_for: Optional[Mapping] = None,
                 created: Optional[str] = None, notes: str = ""):
        self.device = dict(device)
        self.entries: Dict[str, Entry] = {}
        for e in entries:
            self.entries[key_str(e.key)] = e
        self.overhead = dict(overhead or {"intercept_ms": 0.0, "scale": 0.0, "provenance": "none"})
        self.measurement = dict(measurement or {})
        self.built_for = dict(built_for or {})
        self.created = created or now_iso()
        self.notes = notes
        self.path: Optional[str] = None
        self._est_cache: Dict[str, Entry] = {}
        self._coord_cache: Dict[str, float] = {}
        self._split = None

    # ------------------------------------------------------------ entries
    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return (key if isinstance(key, str) else key_str(key)) in self.entries

    def get(self, key) -> Optional[Entry]:
        return self.entries.get(key if isinstance(key, str) else key_str(key))

    def set(self, key: Mapping, ms: float, p10: float, p90: float, n: int, source: str = "measured") -> Entry:
        k = check_key(key)
        e = Entry(k, float(ms), float(p10), float(p90), int(n), source)
        _check_entry(e, key_str(k))
        self.entries[key_str(k)] = e
        self._est_cache.clear()
        self._split = None
        return e

    # ------------------------------------------------------------ prediction
    def missing(self, arch_or_keys) -> List[dict]:
        """Entry keys an arch (config dict, or list of keys) needs that the table lacks."""
        keys = _keys_of(arch_or_keys)
        seen, out = set(), []
        for k in keys:
            s = key_str(k)
            if s not in self.entries and s not in seen:
                seen.add(s)
                out.append(k)
        return out

    def lookup(self, key: Mapping, interpolate: bool = False) -> Entry:
        s = key_str(key)
        e = self.entries.get(s)
        if e is not None:
            return e
        if not interpolate:
            raise MissingEntriesError([dict(key)], "lookup")
        return self.estimate(key)

    def predict_stages(self, arch, interpolate: bool = False) -> dict:
        """{"stem": ms, "stage0": ms, ..., "head": ms, "overhead": ms, "total": ms, "estimated": [keys]}.
        Missing entries raise MissingEntriesError naming all of them, unless `interpolate`."""
        parts: Dict[str, float] = {}
        n_stages = 0 if isinstance(arch, list) else len(_as_arch(arch).get("stages") or [])
        segs = arch if isinstance(arch, list) else decompose(_as_arch(arch))
        if not interpolate:
            miss = self.missing([s.key for s in segs])
            if miss:
                raise MissingEntriesError(miss)
        estimated = []
        total = 0.0
        for s in segs:
            e = self.lookup(s.key, interpolate)
            if e.source == "estimated" and key_str(s.key) not in self.entries:
                estimated.append(s.id)
            parts[s.part] = parts.get(s.part, 0.0) + e.ms
            total += e.ms
        over = self.overhead_ms(total, len(segs))
        for i in range(n_stages):  # every stage has a key: 0.0 where all its positions are identity
            parts.setdefault(f"stage{i}", 0.0)
        order = {k: n for n, k in enumerate(["stem"] + [f"stage{i}" for i in range(n_stages)])}
        out = dict(sorted(parts.items(), key=lambda kv: order.get(kv[0], len(order))))
        out["overhead"] = over
        out["total"] = total + over
        out["estimated"] = sorted(set(estimated))
        return out

    def predict(self, arch, interpolate: bool = False) -> float:
        """Predicted latency in milliseconds of an arch (dict, preset name, arch .yaml path, a model vitslim
        built or loaded, or a list of Segments)."""
        segs = arch if isinstance(arch, list) else decompose(_as_arch(arch))
        total = 0.0
        entries = self.entries
        miss = None
        for s in segs:
            e = entries.get(key_str(s.key))
            if e is None:
                if not interpolate:
                    miss = miss or []
                    miss.append(s.key)
                    continue
                e = self.estimate(s.key)
            total += e.ms
        if miss:
            raise MissingEntriesError(self.missing(miss))
        return total + self.overhead_ms(total, len(segs))

    def overhead_ms(self, sum_ms: float, n_segments: int = 0) -> float:
        """What the sum of entries misses: scale * sum + intercept_ms + per_segment_ms * segments."""
        o = self.overhead
        return (float(o.get("scale", 0.0)) * sum_ms + float(o.get("intercept_ms", 0.0))
                + float(o.get("per_segment_ms", 0.0)) * n_segments)

    def compile(self, space, interpolate: bool = False):
        """A vectorised scorer for every Choice of a search space (see latency_tables.compiled)."""
        from .compiled import CompiledTable
        return CompiledTable(self, space, interpolate=interpolate)

    # ------------------------------------------------------------ interpolation
    def split_index(self):
        """The pruning width grid this table holds (latency_tables.grid.SplitIndex; empty if none)."""
        if self._split is None:
            from .grid import SplitIndex
            self._split = SplitIndex(self.entries.values())
        return self._split

    def has_split_grid(self, key: Mapping) -> bool:
        """Whether a vit_block / swin_block key is priced from the width grid (attention-only +
        FFN-only entries of its geometry, interpolated multilinearly) when the table lacks it."""
        return self.split_index().covers(key)

    def _coord(self, key: Mapping) -> float:
        s = key_str(key)
        c = self._coord_cache.get(s)
        if c is None:
            c = float(segment_macs(key) + input_numel(key))
            self._coord_cache[s] = c
        return c

    def estimate(self, key: Mapping) -> Entry:
        """An entry interpolated across widths, flagged source 'estimated'. A ViT or Swin block whose
        geometry has the pruning width grid (latency_tables.grid) is its attention part (attention-only
        entries, multilinear in heads, qk_dim, v_dim) plus its FFN part (FFN-only entries, linear in
        ffn_hidden). Otherwise: among measured entries of the same op that differ only in width fields,
        linear in MACs (+ input size) between the nearest below and above; outside their range, scaled
        from the nearest."""
        k = check_key(key)
        s = key_str(k)
        if s in self.entries:
            return self.entries[s]
        if s in self._est_cache:
            return self._est_cache[s]
        split = self.split_index().block(k) if k["op"] in ("vit_block", "swin_block") else None
        if split is not None:
            ms, p10, p90 = split
            e = Entry(k, ms, min(p10, ms), max(p90, ms), 0, "estimated")
            self._est_cache[s] = e
            return e
        spec = OPS[k["op"]]
        fixed = {f: k[f] for f in spec.fields if f not in spec.widths}
        cands = [e for e in self.entries.values()
                 if e.key["op"] == k["op"] and e.source != "estimated" and all(e.key.get(f) == v for f, v in fixed.items())]
        if not cands:
            raise LatencyError(f"cannot interpolate {s}: the table has no {k['op']} entry with "
                               f"{', '.join(f'{f}={v}' for f, v in fixed.items()) or 'any shape'} to interpolate from")
        x = self._coord(k)
        pts = sorted(((self._coord(e.key), e) for e in cands), key=lambda t: t[0])
        below = [p for p in pts if p[0] <= x]
        above = [p for p in pts if p[0] >= x]
        if below and above:
            (x0, e0), (x1, e1) = below[-1], above[0]
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            ms = e0.ms + t * (e1.ms - e0.ms)
            p10 = e0.p10 + t * (e1.p10 - e0.p10)
            p90 = e0.p90 + t * (e1.p90 - e0.p90)
        else:
            x0, e0 = below[-1] if below else above[0]
            f = x / x0 if x0 > 0 else 1.0
            ms, p10, p90 = e0.ms * f, e0.p10 * f, e0.p90 * f
        e = Entry(k, ms, min(p10, ms), max(p90, ms), 0, "estimated")
        self._est_cache[s] = e
        return e

    # ------------------------------------------------------------ device
    def matches(self, device: Mapping) -> List[str]:
        """Differences (field: table vs asked) between this table's device and `device`."""
        diffs = []
        for f in MATCH_FIELDS:
            if f in device and device[f] is not None and self.device.get(f) != device[f]:
                diffs.append(f"{f} {self.device.get(f)!r} vs {device[f]!r}")
        return diffs

    def check_device(self, device: Mapping, allow_mismatch: bool = False, what: str = "") -> List[str]:
        """Raise LatencyError when the table was measured on another backend/device than `device`
        (unless allow_mismatch: then the differences are returned as warnings)."""
        diffs = self.matches(device)
        if diffs and not allow_mismatch:
            name = what or self.path or "latency table"
            raise LatencyError(f"{name}: measured on {describe_device(self.device)}, not on the asked "
                               f"{describe_device(device)} ({'; '.join(diffs)}); use a table measured there, "
                               f"or pass --allow-device-mismatch to use it anyway")
        return diffs

    # ------------------------------------------------------------ files
    def to_dict(self) -> dict:
        return _plain({"format": TABLE_FORMAT, "version": TABLE_VERSION, "created": self.created, "notes": self.notes,
                "device": self.device, "measurement": self.measurement, "built_for": self.built_for,
                "overhead": self.overhead, "entry_count": len(self.entries),
                "entries": [self.entries[s].to_dict() for s in sorted(self.entries)]})

    def to_yaml(self) -> str:
        d = self.to_dict()
        entries = d.pop("entries")
        lines = [f"# vitslim latency table ({TABLE_FORMAT} v{TABLE_VERSION}): median ms per entry on the device below;",
                 "# predict(arch) = (1 + scale) * sum(entry ms) + intercept_ms + per_segment_ms * entries (overhead below)."]
        body = yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=120)
        lines.append(body.rstrip("\n"))
        lines.append("entries:" if entries else "entries: []")
        for e in entries:
            lines.append("- " + yaml.safe_dump(e, sort_keys=False, default_flow_style=True, width=10 ** 6).strip())
        return "\n".join(lines) + "\n"

    def save(self, path=None) -> str:
        """Write atomically (temporary file + os.replace): a crash never leaves half a table."""
        path = os.fspath(path or self.path)
        if not path:
            raise LatencyError("save: no path given")
        atomic_write(path, self.to_yaml())
        self.path = path
        return path

    @classmethod
    def from_dict(cls, d, where: str = "latency table") -> "LatencyTable":
        if not isinstance(d, Mapping):
            raise LatencyError(f"{where}: got a YAML {type(d).__name__}, expected a mapping with format: {TABLE_FORMAT}")
        if d.get("format") != TABLE_FORMAT:
            raise LatencyError(f"{where}: format: got {d.get('format')!r}, expected {TABLE_FORMAT!r}")
        if d.get("version") != TABLE_VERSION:
            raise LatencyError(f"{where}: version: got {d.get('version')!r}, expected {TABLE_VERSION} "
                               f"(this vitslim reads latency tables of version {TABLE_VERSION})")
        dev = d.get("device")
        if not isinstance(dev, Mapping):
            raise LatencyError(f"{where}: device: got {dev!r}, expected a mapping with {', '.join(MATCH_FIELDS)}")
        for f in ("backend", "device"):
            if not isinstance(dev.get(f), str) or not dev.get(f):
                raise LatencyError(f"{where}: device.{f}: got {dev.get(f)!r}, expected a non-empty string")
        for f in ("threads", "batch_size"):
            v = dev.get(f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise LatencyError(f"{where}: device.{f}: got {v!r}, expected an integer >= 1")
        over = d.get("overhead") or {}
        if not isinstance(over, Mapping):
            raise LatencyError(f"{where}: overhead: got {over!r}, expected a mapping with intercept_ms and scale")
        for f in ("intercept_ms", "scale", "per_segment_ms"):
            if f in over and not _finite(over[f]):
                raise LatencyError(f"{where}: overhead.{f}: got {over[f]!r}, expected a finite number")
        raw = d.get("entries")
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise LatencyError(f"{where}: entries: got {type(raw).__name__}, expected a list")
        entries, seen = [], set()
        for i, r in enumerate(raw):
            p = f"{where}: entries[{i}]"
            if not isinstance(r, Mapping):
                raise LatencyError(f"{p}: got {r!r}, expected a mapping {{key, ms, p10, p90, n, source}}")
            try:
                key = check_key(r.get("key"))
            except SegmentError as e:
                raise LatencyError(f"{p}: {e}") from None
            s = key_str(key)
            if s in seen:
                raise LatencyError(f"{p}: {s} appears twice, expected one entry per key")
            seen.add(s)
            for f in ("ms", "p10", "p90", "n", "source"):
                if f not in r:
                    raise LatencyError(f"{p} ({s}): {f}: missing, expected a value")
            e = Entry(key, r["ms"], r["p10"], r["p90"], r["n"], r["source"])
            _check_entry(e, s, p)
            e.ms, e.p10, e.p90 = float(e.ms), float(e.p10), float(e.p90)
            entries.append(e)
        count = d.get("entry_count")  # absent in tables written before it (still read)
        if count is not None and count != len(raw):
            raise LatencyError(f"{where}: holds {len(raw)} entries, expected the {count} its entry_count says "
                               "(the file was cut short or edited: rebuild or restore it, or fix entry_count)")
        return cls(dev, entries, over, d.get("measurement") or {}, d.get("built_for") or {}, d.get("created"),
                   d.get("notes") or "")

    @classmethod
    def load(cls, path, device: Optional[Mapping] = None, allow_mismatch: bool = False) -> "LatencyTable":
        """Read and check a table file (or a shipped table by name: `cpu_torch_tiny`); with `device`, also
        check it was measured there."""
        path = resolve_table_path(path)
        d = read_yaml(path, LatencyError, "a latency table .yaml", "a latency table")
        t = cls.from_dict(d, where=path)
        t.path = path
        if device is not None:
            t.check_device(device, allow_mismatch, what=path)
        return t

    def summary(self) -> dict:
        by_src: Dict[str, int] = {}
        by_op: Dict[str, int] = {}
        for e in self.entries.values():
            by_src[e.source] = by_src.get(e.source, 0) + 1
            by_op[e.key["op"]] = by_op.get(e.key["op"], 0) + 1
        return {"entries": len(self.entries), "sources": by_src, "ops": by_op, "device": describe_device(self.device)}


# ---------------------------------------------------------------- shipped tables
TABLES_DIR = os.path.dirname(os.path.abspath(__file__))  # the tables shipped with vitslim (package data)


def shipped_tables() -> List[str]:
    """Names of the latency tables shipped with vitslim (latency_tables/NAME.yaml)."""
    return yaml_names(TABLES_DIR)


def resolve_table_path(path) -> str:
    """The file a table argument names: the path when it exists, else the shipped table of that bare name
    (`cpu_torch_tiny`, `cpu_torch_tiny.yaml`, or `latency_tables/cpu_torch_tiny.yaml` as the docs write it);
    a one-line error listing the shipped names when neither."""
    path = os.fspath(path)
    if os.path.exists(path):
        return path
    name = os.path.normpath(os.path.expanduser(path)) if path else ""
    if os.path.dirname(name) == "latency_tables":  # as the README's commands write it, run outside a checkout
        name = os.path.basename(name)
    shipped = shipped_file(TABLES_DIR, name)
    if shipped:
        return shipped
    raise LatencyError(f"{path}: no such file, expected a latency table .yaml or a shipped table name "
                       f"({', '.join(shipped_tables()) or 'none installed'})")


# ---------------------------------------------------------------- helpers
def _finite(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_entry(e: Entry, s: str, where: str = "entry") -> None:
    for f in ("ms", "p10", "p90"):
        v = getattr(e, f)
        if not _finite(v) or v < 0:
            raise LatencyError(f"{where} ({s}): {f}: got {v!r}, expected a finite number of milliseconds >= 0")
    if not (e.p10 <= e.ms * (1 + 1e-6) + 1e-9 and e.ms <= e.p90 * (1 + 1e-6) + 1e-9):
        raise LatencyError(f"{where} ({s}): got p10 {e.p10}, ms {e.ms}, p90 {e.p90}, expected p10 <= ms <= p90")
    if not isinstance(e.n, int) or isinstance(e.n, bool) or e.n < 0:
        raise LatencyError(f"{where} ({s}): n: got {e.n!r}, expected a sample count (integer >= 0)")
    if e.source not in SOURCES:
        raise LatencyError(f"{where} ({s}): source: got {e.source!r}, expected one of {', '.join(SOURCES)}")


def _plain(x):
    """Plain YAML-safe data (str subclasses such as torch's version string become str)."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, bool) or x is None:
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, str):
        return str(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def describe_device(d: Mapping) -> str:
    parts = [str(d.get("backend", "?")), str(d.get("device", "?"))]
    if d.get("threads"):
        parts.append(f"{d['threads']} thread{'s' if d['threads'] != 1 else ''}")
    if d.get("batch_size"):
        parts.append(f"batch {d['batch_size']}")
    if d.get("dtype"):
        parts.append(str(d["dtype"]))
    return " / ".join(parts)


def atomic_write(path: str, text: str) -> None:
    from supernet.arch import atomic_write_text
    atomic_write_text(path, text)


def _as_arch(arch):
    if isinstance(arch, Mapping):
        return arch
    if isinstance(getattr(arch, "arch", None), Mapping):  # a network vitslim built or loaded carries its arch
        return arch.arch
    if not isinstance(arch, (str, os.PathLike)):
        what = f"{type(arch).__name__} without .arch" if hasattr(arch, "parameters") else type(arch).__name__
        raise TypeError(f"arch: got {what}, expected an arch dict, a preset name, an arch .yaml path or a model "
                        "vitslim built (it has .arch)")
    # a preset name or arch .yaml path: resolved like vitslim.resolve_arch, without importing vitslim
    from supernet.arch import load_arch, validate
    from supernet.registry import get_preset, preset_names
    s = os.fspath(arch)
    if s in preset_names():
        return validate(get_preset(s))
    if os.path.isfile(s):
        return load_arch(s)
    return validate(get_preset(s))


def _keys_of(arch_or_keys) -> List[dict]:
    if isinstance(arch_or_keys, list):
        return [x.key if isinstance(x, Segment) else x for x in arch_or_keys]
    return [s.key for s in decompose(_as_arch(arch_or_keys))]
