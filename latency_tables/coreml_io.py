"""The on-device path for phones: `export_coreml` writes one Core ML package per table entry (plus
optional whole networks for the overhead) and a manifest; after timing them on the device,
`import_csv` reads the medians back into a latency table.

CSV (one row per package; header required; extra columns ignored):

    name,median_ms,p10_ms,p90_ms,samples
    e0001_meta4d,0.412,0.405,0.431,50
    net00,3.912,,,

`name` is the package's name in the manifest (with or without `.mlpackage`) or the entry's key
text (`meta4d|dim=48|ffn_hidden=192|res=56`); `median_ms` is required, the others optional.
Rows named `net..` are whole networks: they fit the table's overhead.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from .backends import BackendError
from .build import fit_overhead
from .measure import build_network, deploy
from .segments import build_segment, check_key, decompose, key_str, SegmentError
from supernet.arch import ArchError, validate
from .table import LatencyError, LatencyTable, atomic_write, now_iso

MANIFEST_FORMAT = "vitslim-coreml-manifest"
MANIFEST_VERSION = 1


class CSVImportError(LatencyError):
    """A CSV of on-device times that does not fit its manifest."""


def _coremltools():
    try:
        import coremltools as ct
    except ImportError:
        raise BackendError("coreml export: coremltools is not installed (pip install coremltools; it converts on "
                           "Linux and macOS)") from None
    return ct


@contextlib.contextmanager
def keeps_numpy_rng():
    """numpy's global RNG as it was after the block: coremltools' converter draws from it (np.random.rand for
    the templates of its fusion passes, whose values do not reach the model), moving a caller's seeded stream."""
    import numpy as np
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def convert_coreml(module: nn.Module, x: torch.Tensor, compute_units=None, precision: str = "float16"):
    """An ML program (mlprogram) of `module` traced on `x`; input named 'x'."""
    ct = _coremltools()
    module = module.float().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, x)
        kw = {}
        if compute_units is not None:
            kw["compute_units"] = compute_units
        prec = ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32
        import io
        import logging
        logger = logging.getLogger("coremltools")  # quiet for this conversion, as the caller set it afterwards
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stderr(io.StringIO()), keeps_numpy_rng():  # the redirect: its progress bars
                return ct.convert(traced, inputs=[ct.TensorType(name="x", shape=tuple(x.shape))],
                                  convert_to="mlprogram", compute_precision=prec, **kw)
        finally:
            logger.setLevel(level)


def release_temp_package(mlmodel) -> None:
    """Delete the package coremltools converted into (tempfile's dir/tmpXXXX.mlpackage, weights included) now:
    coremltools removes it only at interpreter exit, so an export of many entries held every one of them in
    /tmp until the end, and a killed process left them there for good."""
    path = getattr(mlmodel, "package_path", None)
    if getattr(mlmodel, "is_temp_package", False) and path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def _save_package(mlmodel, path: str) -> None:
    from supernet.runlock import remove_stale_temps, temp_prefix
    d = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(d, base=os.path.basename(path))
    tmp = tempfile.mkdtemp(prefix=temp_prefix(os.path.basename(path)), dir=d)
    try:
        p = os.path.join(tmp, os.path.basename(path))
        mlmodel.save(p)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(p, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_temp_package(mlmodel)


def entry_name(i: int, key: Mapping) -> str:
    return f"e{i:04d}_{key['op']}"


def export_coreml(keys: Sequence[Mapping], out_dir: str, networks: Sequence[Mapping] = (), batch_size: int = 1,
                  precision: str = "float16", built_for: Optional[Mapping] = None, progress=None) -> dict:
    """Write `out_dir/<name>.mlpackage` per entry (and per network), `manifest.json` and a
    `times_template.csv` to fill with on-device medians. Re-running skips packages already written."""
    ct = _coremltools()
    os.makedirs(out_dir, exist_ok=True)
    man_path = os.path.join(out_dir, "manifest.json")
    old = {}
    dtype = "float32 inputs, " + precision + " compute"
    if os.path.exists(man_path):
        old_m = read_manifest(man_path)
        diffs = [f"{what} {old_m.get(k)!r}, asked {v!r}" for what, k, v in
                 (("batch", "batch_size", batch_size), ("precision", "dtype", dtype)) if old_m.get(k) != v]
        if diffs:  # its packages would be reused as they are: a mixed export under a manifest that says otherwise
            raise CSVImportError(f"{out_dir}: holds an export of other settings ({'; '.join(diffs)}), expected the same "
                                 "--batch and --precision to continue it; choose another --out")
        old = {r["key_str"]: r for r in old_m["entries"]}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "created": now_iso(),
                "batch_size": batch_size, "dtype": dtype, "fused": True,
                "coremltools": ct.__version__, "torch": torch.__version__, "built_for": dict(built_for or {}),
                "entries": [], "networks": []}
    used = {r["name"] for r in old.values()}
    n_next = 1 + max([int(m.group(1)) for m in (re.match(r"e(\d+)_", u) for u in used) if m] or [0])

    def write_manifest():
        atomic_write(man_path, json.dumps(manifest, indent=1) + "\n")

    for key in keys:
        k = check_key(key)
        s = key_str(k)
        if s in old and os.path.isdir(os.path.join(out_dir, old[s]["package"])):
            manifest["entries"].append(old[s])
        else:
            name = entry_name(n_next, k)
            n_next += 1
            module, shape = build_segment(k)
            x = torch.randn((batch_size,) + tuple(shape), generator=torch.Generator().manual_seed(0))
            ml = convert_coreml(deploy(module, True), x, precision=precision)
            _save_package(ml, os.path.join(out_dir, name + ".mlpackage"))
            manifest["entries"].append({"name": name, "key": k, "key_str": s, "package": name + ".mlpackage",
                                        "input_shape": list(x.shape)})
        write_manifest()
        if progress is not None:
            progress.update(1)
    for i, a in enumerate(networks):
        name = f"net{i:02d}"
        model = build_network(a)
        arch = model.arch
        x = torch.randn(batch_size, arch["in_chans"], arch["input_size"], arch["input_size"],
                        generator=torch.Generator().manual_seed(0))
        pkg = os.path.join(out_dir, name + ".mlpackage")
        ml = convert_coreml(deploy(model, True), x, precision=precision)
        _save_package(ml, pkg)
        manifest["networks"].append({"name": name, "arch": arch, "package": name + ".mlpackage",
                                     "input_shape": list(x.shape)})
        write_manifest()
        if progress is not None:
            progress.update(1)
    write_manifest()
    with open(os.path.join(out_dir, "times_template.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "median_ms", "p10_ms", "p90_ms", "samples", "key"])
        for r in manifest["entries"]:
            w.writerow([r["name"], "", "", "", "", r["key_str"]])
        for r in manifest["networks"]:
            w.writerow([r["name"], "", "", "", "", network_key(r["arch"])])
    return manifest


def network_key(arch: Mapping) -> str:
    """The key column of a network row: 'network' and a digest of its arch, so that times of another
    export's net00 are not taken for this one's."""
    import hashlib
    return "network " + hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]


def read_manifest(path: str) -> dict:
    if not os.path.isfile(path):
        raise CSVImportError(f"{path}: no such file, expected the manifest.json written by `vitslim latency export-coreml`")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CSVImportError(f"{path}: not valid JSON ({e}), expected a manifest from export-coreml") from None
    except RecursionError:  # '[[[[...' nested past Python's recursion limit
        raise CSVImportError(f"{path}: nested too deeply to read, expected a manifest from export-coreml") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise CSVImportError(f"{path}: format: got {m.get('format') if isinstance(m, dict) else m!r}, "
                           f"expected {MANIFEST_FORMAT!r}")
    if m.get("version") != MANIFEST_VERSION:
        raise CSVImportError(f"{path}: version: got {m.get('version')!r}, expected {MANIFEST_VERSION}")
    for part, fields in (("entries", ("name", "key_str", "package")), ("networks", ("name", "package"))):
        rows = m.setdefault(part, [])
        if not isinstance(rows, list):
            raise CSVImportError(f"{path}: {part}: got {type(rows).__name__}, expected a list")
        for i, r in enumerate(rows):
            where = f"{path}: {part}[{i}]"
            if not isinstance(r, dict):
                raise CSVImportError(f"{where}: got {r!r:.60}, expected an object")
            for f in fields:
                if not isinstance(r.get(f), str) or not r[f]:
                    raise CSVImportError(f"{where}: {f}: got {r.get(f)!r:.60}, expected a non-empty string "
                                         "(a manifest written by export-coreml)")
            try:
                if part == "entries":
                    r["key"] = check_key(r["key"])
                else:
                    validate(r["arch"])
            except (SegmentError, ArchError, KeyError, TypeError) as e:
                what = "key" if part == "entries" else "arch"
                raise CSVImportError(f"{where} ({r['name']}): {what}: {e}") from None
    return m


def _number(v: str, where: str, what: str, required: bool) -> Optional[float]:
    v = (v or "").strip()
    if not v:
        if required:
            raise CSVImportError(f"{where}: {what}: missing, expected a time in milliseconds")
        return None
    try:
        x = float(v)
    except ValueError:
        raise CSVImportError(f"{where}: {what}: got {v!r}, expected a number of milliseconds") from None
    if not math.isfinite(x) or x < 0:
        raise CSVImportError(f"{where}: {what}: got {v!r}, expected a finite time >= 0 ms")
    return x


def read_times_csv(path: str, manifest: Mapping) -> Dict[str, dict]:
    """{name: {"ms", "p10", "p90", "n"}} for every row, every row checked against the manifest."""
    if not os.path.isfile(path):
        raise CSVImportError(f"{path}: no such file, expected a CSV of on-device times (name,median_ms,...)")
    names, keys = {}, {}
    for r in manifest["entries"]:
        names[r["name"]] = r["name"]
        names[r["package"]] = r["name"]
        names[r["key_str"]] = r["name"]
        keys[r["name"]] = r["key_str"]
    for r in manifest["networks"]:
        names[r["name"]] = r["name"]
        names[r["package"]] = r["name"]
        keys[r["name"]] = network_key(r["arch"]) if isinstance(r.get("arch"), Mapping) else "network"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return _read_rows(path, csv.DictReader(f), names, keys)
    except (UnicodeDecodeError, csv.Error) as e:
        raise CSVImportError(f"{path}: not a UTF-8 text CSV ({e.__class__.__name__}: {str(e)[:80]}), expected rows of "
                             "name,median_ms[,p10_ms,p90_ms,samples]") from None


def _read_rows(path: str, reader, names: Mapping[str, str], keys: Optional[Mapping[str, str]] = None) -> Dict[str, dict]:
    """Rows by package name; a row's `key` column (times_template.csv writes one), when filled, must be the
    manifest's key of that name: package names are numbered per export, so another export's CSV would
    otherwise file its times under other keys."""
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "name" not in cols or "median_ms" not in cols:
        raise CSVImportError(f"{path}: header: got {cols}, expected at least name,median_ms "
                             "(optional p10_ms,p90_ms,samples)")
    out: Dict[str, dict] = {}
    unknown = []
    for i, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in row.items()}
        raw = row.get("name", "").strip()
        if not raw:
            continue
        name = names.get(raw) or names.get(raw + ".mlpackage")
        if name is None:
            unknown.append(f"{raw!r} (line {i})")
            continue
        where = f"{path} line {i} ({raw})"
        given, want = (row.get("key") or "").strip(), (keys or {}).get(name)
        if given and want and given != want and not (given == "network" and want.startswith("network ")):
            raise CSVImportError(f"{where}: key column {given!r:.80}, but {name} of this manifest is {want!r:.80}; "
                                 "expected the CSV of this export (package names are numbered per export)")
        ms = _number(row.get("median_ms", ""), where, "median_ms", True)
        p10 = _number(row.get("p10_ms", ""), where, "p10_ms", False)
        p90 = _number(row.get("p90_ms", ""), where, "p90_ms", False)
        n_raw = (row.get("samples") or "").strip()
        if n_raw and not re.fullmatch(r"\d+", n_raw):
            raise CSVImportError(f"{where}: samples: got {n_raw!r}, expected a count (integer >= 0)")
        p10 = ms if p10 is None else p10
        p90 = ms if p90 is None else p90
        if not p10 <= ms <= p90:
            raise CSVImportError(f"{where}: got p10 {p10}, median {ms}, p90 {p90}, expected p10 <= median <= p90")
        if name in out:
            raise CSVImportError(f"{where}: {name} appears twice, expected one row per package")
        out[name] = {"ms": ms, "p10": p10, "p90": p90, "n": int(n_raw) if n_raw else 0}
    if unknown:
        raise CSVImportError(f"{path}: {len(unknown)} row(s) name no package of the manifest: {', '.join(unknown[:5])}"
                             f"{' ...' if len(unknown) > 5 else ''} (expected names from manifest.json)")
    if not out:
        raise CSVImportError(f"{path}: no rows with times, expected one row per package")
    return out


def import_csv(manifest_path: str, csv_path: str, out_path: str, device: str, compute_units: str = "ALL",
               runtime: Optional[Mapping] = None, on_fit: Optional[Callable[[dict], None]] = None) -> LatencyTable:
    """Read on-device medians into the table at `out_path` (created, or merged into if it exists and is for
    the same device). Everything is checked before anything is written: on error the file is untouched.
    Networks in the CSV refit the overhead (`on_fit(overhead)` is called with it); a pruned network's block
    widths the table lacks are priced from its pruning width grid (`export-coreml --prune-grid`), as `latency
    build --prune-grid` prices its own pruned calibration networks."""
    if not isinstance(device, str) or not device.strip() or any(c in device for c in "\r\n"):
        raise CSVImportError(f"--device: got {device!r}, expected a non-empty one-line name of what the times were "
                             'measured on, e.g. "iPhone 12 (A14), iOS 17"')
    device = device.strip()
    m = read_manifest(manifest_path)
    times = read_times_csv(csv_path, m)
    med = sorted(t["ms"] for t in times.values())[len(times) // 2]
    if med < 1e-3:  # a Core ML prediction takes tens of microseconds at least
        warnings.warn(f"{csv_path}: the median time is {med:.3g} ms (under 1 us): times in seconds? The CSV's "
                      "columns are milliseconds", stacklevel=2)
    dev = {"backend": "coreml", "device": device, "threads": None, "batch_size": int(m.get("batch_size", 1)),
           "dtype": m.get("dtype", "float16"), "fused": bool(m.get("fused", True)), "compute_units": compute_units,
           "runtime": dict(runtime or {"coremltools": m.get("coremltools")}), "platform": "on-device (imported)"}
    if os.path.exists(out_path):
        table = LatencyTable.load(out_path)
        diffs = table.matches({k: dev[k] for k in ("backend", "device", "batch_size", "dtype", "fused")})
        if table.device.get("compute_units") != compute_units:  # CPU_ONLY vs ALL: other times for the same keys
            diffs.append(f"compute_units {table.device.get('compute_units')!r} vs {compute_units!r}")
        if diffs:
            raise CSVImportError(f"{out_path}: a table for another device ({'; '.join(diffs)}); import into a new --out")
        grid = (m.get("built_for") or {}).get("prune_grid")
        if grid and table.built_for.get("prune_grid") != grid:  # the grid's entries come in now: prune looks for it
            table.built_for = {**table.built_for, "prune_grid": grid}
    else:
        table = LatencyTable(dev, measurement={"procedure": "imported from on-device measurements (CSV)",
                                               "manifest": os.path.abspath(manifest_path)},
                             built_for=m.get("built_for") or {})
    by_name = {r["name"]: r for r in m["entries"]}
    for name, t in times.items():
        if name in by_name:
            table.set(by_name[name]["key"], t["ms"], t["p10"], t["p90"], t["n"], "imported")
    nets = [r for r in m["networks"] if r["name"] in times]
    if nets:
        sums, meas, counts = [], [], []
        for r in nets:
            # a pruned network (export-coreml --prune-grid) needs block widths the grid prices, not entries
            miss = [k for k in table.missing(r["arch"]) if not table.has_split_grid(k)]
            if miss:
                raise CSVImportError(f"{csv_path}: network {r['name']} needs entries with no time: "
                                   f"{', '.join(key_str(k) for k in miss[:4])}")
            if not times[r["name"]]["ms"] > 0:  # the overhead fit weighs each network by 1 / its time
                raise CSVImportError(f"{csv_path}: network {r['name']}: median_ms {times[r['name']]['ms']:g}, expected "
                                     "the time of a whole network (> 0 ms: a failed or too coarse measurement?)")
            segs = decompose(r["arch"])
            sums.append(sum(table.lookup(s.key, interpolate=True).ms for s in segs))
            counts.append(len(segs))
            meas.append(times[r["name"]]["ms"])
        over = fit_overhead(sums, meas, counts)
        over["provenance"] = "imported"
        table.overhead = over
        if on_fit is not None:
            on_fit(over)
    table.save(out_path)
    return table
