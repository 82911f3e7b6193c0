"""`vitslim latency build | predict | validate | export-coreml | import | show | list`: per-device latency
lookup tables (see latency_tables/ and the README, 'Latency tables')."""
from __future__ import annotations

import json
import os

from supernet.errors import VitslimError, check_writable

from .cli import finite_float, register_command


# ------------------------------------------------------------------ helpers
def _arch_of(target: str) -> dict:
    from latency_tables.build import resolve_arch_like
    return resolve_arch_like(target)


def _space(path):
    from supernet.space import load_space
    return load_space(path)


def _space_record(given: str) -> str:
    from latency_tables.build import space_record
    return space_record(given)


def _bar(total: int, what: str, quiet: bool):
    from latency_tables.build import progress_bar
    return progress_bar(total, what, quiet)


def _positive(name, v, lo=1):
    if v < lo:
        raise VitslimError(f"{name}: got {v}, expected a number >= {lo}")
    return v


def _backend_args(p, default_backend="torch-cpu", table_defaults=False):
    from latency_tables.backends import BACKENDS
    d = None if table_defaults else default_backend
    p.add_argument("--backend", choices=list(BACKENDS), default=d,
                   help=f"where to measure (default: {'the table' + chr(39) + 's' if table_defaults else default_backend})")
    p.add_argument("--threads", type=int, default=None if table_defaults else 1,
                   help="intra-op threads (default: " + ("the table's" if table_defaults else "1: the steadiest for batch 1") + ")")
    p.add_argument("--batch", type=int, default=None if table_defaults else 1, help="batch size (default: "
                   + ("the table's" if table_defaults else "1") + ")")
    p.add_argument("--dtype", default=None if table_defaults else "float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--clock", default=None if table_defaults else "auto", choices=["auto", "wall", "thread"],
                   help="auto: the calling thread's CPU time for 1-thread CPU backends (right on a shared machine), "
                        "else wall time")


def _make_backend(args, table=None):
    from latency_tables.backends import get_backend
    dev = table.device if table is not None else {}
    name = args.backend or dev.get("backend") or "torch-cpu"
    threads = args.threads if args.threads is not None else dev.get("threads") or 1
    batch = args.batch if args.batch is not None else dev.get("batch_size") or 1
    dtype = args.dtype or dev.get("dtype") or "float32"
    fused = dev.get("fused", True) if table is not None else not getattr(args, "no_fuse", False)
    _positive("--threads", threads)
    _positive("--batch", batch)
    return get_backend(name, threads=threads, batch_size=batch, dtype=dtype, fused=fused)


def _proc(args, backend, time_per_item, table=None, option="--time-per-network"):
    from latency_tables.build import procedure_for
    return procedure_for(backend, time_per_item, args.min_samples, args.clock,
                         (table.measurement if table is not None else {}) or {}, option)


# ------------------------------------------------------------------ build
def _build_args(p):
    p.add_argument("--space", help="search space .yaml, or a shipped space's name (tiny, efficientformer_l1): every "
                                   "candidate block at every width and resolution")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH",
                   help="preset, arch .yaml or checkpoint whose entries to add (repeatable)")
    p.add_argument("--out", required=True, help="table .yaml (resumed if it exists: only missing entries are measured)")
    _backend_args(p)
    p.set_defaults(clock=None)  # auto for a new table; a resumed one keeps the clock it was timed with
    p.add_argument("--no-fuse", action="store_true", help="measure with BatchNorm unfused (default: fused, as deployed)")
    p.add_argument("--procedure", choices=["in-context", "isolated"], default="in-context",
                   help="in-context (default): time every entry as a step of whole networks that contain it; "
                        "isolated: time each entry alone")
    p.add_argument("--contexts", type=int, default=2,
                   help="in-context: networks each entry is timed in, at least (default 2)")
    p.add_argument("--time-per-network", type=finite_float, default=None,
                   help="in-context and calibration: seconds of timed runs per network (default 0.4; a resumed "
                        "build: the table's)")
    p.add_argument("--time-per-entry", type=finite_float, default=None,
                   help="isolated: seconds of timed calls per entry (default 0.5; a resumed build: the table's)")
    p.add_argument("--min-samples", type=int, default=None,
                   help="timed runs per entry or network at least (default 15; a resumed build: the table's)")
    p.add_argument("--group", type=int, default=8, help="networks (or isolated entries) interleaved at a time (default 8)")
    p.add_argument("--calibrate", type=int, default=10,
                   help="networks measured end to end to fit the overhead (default 10; 0: none)")
    p.add_argument("--recalibrate", action="store_true", help="refit the overhead even if no entry was added")
    p.add_argument("--no-drift-reference", action="store_true",
                   help="do not correct for machine-load drift with the reference network")
    _grid_args(p, "")
    p.add_argument("--dry-run", action="store_true", help="only print how many entries are needed and missing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _grid_args(p, more: str):
    p.add_argument("--prune-grid", action="store_true",
                   help="with --arch (DeiT or Swin): also the width grid that prices any pruned width of its blocks "
                        "(attention-only entries on heads x qk_dim x v_dim, FFN-only entries on ffn_hidden, per block "
                        "geometry), for `vitslim prune --target latency=MS --table T`" + more)
    p.add_argument("--grid-step", default=None, metavar="qk=8,v=8,ffn=0,heads=3",
                   help="grid spacing with --prune-grid: per-head Q/K and V widths every qk / v channels, FFN every "
                        "ffn channels (0: auto, about 16 steps), heads at this many counts from 1 to the unpruned "
                        "(default qk=8,v=8,ffn=0,heads=3; width 1 and the unpruned widths are always included)")


def _add_grid_keys(keys, grid_keys) -> None:
    """Append the grid's keys (per arch) to `keys`, each once."""
    from latency_tables.build import add_grid_keys
    add_grid_keys(keys, grid_keys)


def _grid(args, archs):
    """(grid keys per arch, GridSpec) for --prune-grid, else ([], None)."""
    from latency_tables.build import grid_for
    return grid_for(args.prune_grid, args.grid_step, archs, cli=True)


def _build(args):
    """One implementation with the Python API: latency_tables.build_table, its messages naming these options."""
    from latency_tables.build import build_table
    build_table(args.out, args.backend or "torch-cpu", space=args.space or None, archs=list(args.arch),
                prune_grid=args.prune_grid, grid_step=args.grid_step, threads=args.threads, batch_size=args.batch,
                dtype=args.dtype, fused=not args.no_fuse, clock=args.clock, procedure=args.procedure,
                contexts=args.contexts, time_per_network=args.time_per_network, time_per_entry=args.time_per_entry,
                min_samples=args.min_samples, group=args.group, calibrate=args.calibrate, recalibrate=args.recalibrate,
                drift_reference=not args.no_drift_reference, dry_run=args.dry_run, progress=not args.quiet,
                log=print, _cli=True)
    return 0


def _check_table_names(out: str) -> None:
    from latency_tables.build import check_table_names
    check_table_names(out, "--out")


def _table_lock(out: str):
    from latency_tables.build import table_lock
    return table_lock(out, "--out")


# ------------------------------------------------------------------ predict
def _load_table(args, device=None):
    from latency_tables import LatencyTable
    return LatencyTable.load(args.table, device=device, allow_mismatch=getattr(args, "allow_device_mismatch", False))


def _predict_args(p):
    p.add_argument("arch", metavar="ARCH", help="preset, arch .yaml or checkpoint")
    p.add_argument("--table", required=True, help="latency table .yaml, or a shipped table's name (vitslim latency list)")
    p.add_argument("--interpolate", action="store_true", help="estimate missing entries across widths (flagged)")
    from latency_tables.backends import BACKENDS
    p.add_argument("--backend", default=None, choices=sorted(BACKENDS),
                   help="fail unless the table was measured on this backend")
    p.add_argument("--allow-device-mismatch", action="store_true", help="use a table of another backend/device anyway")
    p.add_argument("--json", action="store_true",
                   help='print {"predicted_ms", "stages", "overhead_ms", "estimated", "device"}')


def _predict(args):
    from latency_tables.table import describe_device
    table = _load_table(args, {"backend": args.backend} if args.backend else None)
    arch = _arch_of(args.arch)
    st = table.predict_stages(arch, interpolate=args.interpolate)
    parts = {k: v for k, v in st.items() if k not in ("total", "overhead", "estimated")}
    if args.json:
        print(json.dumps({"arch": args.arch, "predicted_ms": st["total"], "stages": parts, "overhead_ms": st["overhead"],
                          "estimated": st["estimated"], "device": describe_device(table.device)}))
        return 0
    print(f"{args.arch}: {st['total']:.3f} ms predicted on {describe_device(table.device)}")

    def share(v):  # a table of 0 ms entries predicts 0 ms: no shares
        return f"{v / st['total']:6.1%}" if st["total"] > 0 else f"{'-':>6}"
    for k, v in parts.items():
        print(f"  {k:<10} {v:9.3f} ms  {share(v)}")
    print(f"  {'overhead':<10} {st['overhead']:9.3f} ms  {share(st['overhead'])}")
    if st["estimated"]:
        print(f"  estimated (interpolated) entries: {len(st['estimated'])}: " + "; ".join(st["estimated"][:4]))
    return 0


# ------------------------------------------------------------------ validate
def _validate_args(p):
    p.add_argument("--table", required=True, help="latency table .yaml, or a shipped table's name (vitslim latency list)")
    p.add_argument("--space", help="search space .yaml or shipped name to sample networks from (default: the one the "
                                   "table was built for)")
    p.add_argument("--samples", type=int, default=50, help="networks sampled from the space (default 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH", help="also validate this arch (repeatable)")
    p.add_argument("--no-presets", action="store_true", help="leave out the presets the table covers")
    _backend_args(p, table_defaults=True)
    p.add_argument("--time-per-network", type=finite_float, default=1.0, help="seconds of timed calls per network (default 1)")
    p.add_argument("--min-samples", type=int, default=15, help="timed calls per network at least (default 15)")
    p.add_argument("--group", type=int, default=16, help="networks interleaved at a time (default 16)")
    p.add_argument("--noise", action="store_true", help="measure every network twice and report the noise floor")
    p.add_argument("--interpolate", action="store_true", help="estimate missing entries across widths (flagged)")
    p.add_argument("--no-drift-reference", action="store_true", help="no drift correction (raw times)")
    p.add_argument("--allow-device-mismatch", action="store_true", help="validate a table of another device here anyway")
    p.add_argument("--report", help="also write the full report (every network) to this .json")
    p.add_argument("--json", action="store_true",
                   help='print {"samples", "mape", "within_5", "within_10", "spearman", ...} (fractions)')
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _table_space_file(table, table_path: str, needed: bool):
    """The search space a table was built for (built_for.space_file, written relative to where the build
    ran): found from here, beside the table, or one folder up (the shipped tables: the repo root, or the
    installed packages); else the shipped space of that file name when it is the space the table names
    (built_for.space: a table built from experiments/spaces/tiny.yaml before the spaces moved into the package).
    None when the table names none; an error when it names one that cannot be found and samples need it."""
    from supernet.space import load_space, shipped_space_file
    rel = (table.built_for or {}).get("space_file")
    if not rel:
        return None
    here = os.path.dirname(os.path.abspath(table.path or table_path))
    for cand in (rel, os.path.join(here, rel), os.path.join(os.path.dirname(here), rel)):
        if os.path.isfile(cand):
            return cand
    shipped = shipped_space_file(os.path.basename(rel))
    if shipped and load_space(shipped).name == (table.built_for or {}).get("space"):
        return shipped
    if needed:
        raise VitslimError(f"{table_path}: built for {rel} (built_for.space_file), which is not found from here or "
                           "beside the table; pass --space SPACE.yaml to sample from it (or --samples 0)")
    return None


def _validate(args):
    from latency_tables.build import table_reference
    from latency_tables.table import atomic_write, describe_device
    from latency_tables.validate import fitting_presets, sample_archs, validate_table
    from latency_tables import LatencyTable
    _positive("--samples", args.samples, 0)
    _positive("--group", args.group)
    if args.report:  # before the measuring, not after it
        check_writable(args.report, "--report")
    table = LatencyTable.load(args.table)
    if table.device.get("backend") == "coreml" and not args.backend:
        raise VitslimError(f"--table {args.table}: Core ML timings of {table.device.get('device')!r}, measured on the "
                           "device (export-coreml / import); validate measures on this machine, so it cannot check them")
    backend = _make_backend(args, table)
    table.check_device(backend.describe(), args.allow_device_mismatch, what=args.table)
    backend.check_available()
    proc = _proc(args, backend, args.time_per_network, table)
    space_path = args.space or _table_space_file(table, args.table, needed=args.samples > 0)
    space = _space(space_path) if space_path else None
    archs, names = [], []
    if space is not None and args.samples:
        archs += sample_archs(space, args.samples, args.seed)
        names += [f"sample{i}" for i in range(args.samples)]
    if not args.no_presets:
        for n in fitting_presets(table, space):
            archs.append(_arch_of(n))
            names.append(n)
    for a in args.arch:
        archs.append(_arch_of(a))
        names.append(a)
    if not archs:
        raise VitslimError("no networks to measure (pass --space with --samples N, or --arch ARCH)")
    if not args.interpolate:
        for n, a in zip(names, archs):
            miss = table.missing(a)
            if miss:
                from latency_tables.table import MissingEntriesError
                raise MissingEntriesError(miss, f"{n}")
    use_ref = not args.no_drift_reference and (table.measurement.get("reference") or {}).get("ms") is not None
    ref = table_reference(table, backend, use_ref)
    passes = 2 if args.noise else 1
    with _bar(len(archs) * passes, "networks", args.quiet) as bar:
        rep = validate_table(table, backend, archs, proc, names=names, noise=args.noise, interpolate=args.interpolate,
                             group=args.group, progress=bar, reference=ref)
    rep["table"] = args.table
    rep["device"] = describe_device(table.device)
    rep["drift_corrected"] = ref is not None
    if args.report:
        atomic_write(args.report, json.dumps(rep, indent=1) + "\n")
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "networks"}))
        return 0
    print(f"{args.table} on {rep['device']}: {rep['samples']} networks"
          f"{' (drift-corrected)' if rep['drift_corrected'] else ''}")
    _print_metrics("prediction vs measured", rep)
    if "noise_floor" in rep:
        _print_metrics("noise floor (re-measured vs measured)", rep["noise_floor"])
    return 0


def _print_metrics(title, m):
    rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.4f}"
    print(f"  {title}: MAPE {m['mape']:.2%}, max {m['max_error']:.2%}, within 5% {m['within_5']:.1%}, "
          f"within 10% {m['within_10']:.1%}, Spearman {rho}")


# ------------------------------------------------------------------ show
def _show_args(p):
    p.add_argument("--table", required=True, help="latency table .yaml, or a shipped table's name (vitslim latency list)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _show(args):
    table = _load_table(args)
    s = table.summary()
    s["overhead"] = {k: v for k, v in table.overhead.items() if k != "points"}
    s["built_for"] = table.built_for
    if args.json:
        print(json.dumps(s))
        return 0
    print(f"{args.table}: {s['entries']} entries on {s['device']}")
    print("  sources: " + ", ".join(f"{k} {v}" for k, v in sorted(s["sources"].items())))
    print("  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(s["ops"].items())))
    o = s["overhead"]
    print(f"  overhead: scale {o.get('scale', 0):+.4f}, intercept {o.get('intercept_ms', 0):+.4f} ms "
          f"({o.get('provenance', 'none')}, {o.get('networks', 0)} networks)")
    return 0


# ------------------------------------------------------------------ list
def _list_args(p):
    p.add_argument("--json", action="store_true",
                   help='print a JSON list of {"name", "path", "device", "backend", "built_for", "entries"}')


def _list(args):
    from latency_tables import LatencyTable
    from latency_tables.table import TABLES_DIR, describe_device, shipped_tables
    rows = []
    for name in shipped_tables():
        t = LatencyTable.load(os.path.join(TABLES_DIR, name + ".yaml"))
        bf = t.built_for or {}
        what = ", ".join(([f"space {bf['space']}"] if bf.get("space") else [])
                         + [f"arch {a}" for a in bf.get("archs") or []]) or "-"
        rows.append({"name": name, "path": t.path, "device": describe_device(t.device),
                     "backend": t.device.get("backend"), "built_for": what, "entries": len(t)})
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no tables shipped in {TABLES_DIR}")
        return 0
    w = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in ("name", "built_for", "entries")}
    print(f"{'name':<{w['name']}}  {'built for':<{w['built_for']}}  {'entries':>{w['entries']}}  device")
    for r in rows:
        print(f"{r['name']:<{w['name']}}  {r['built_for']:<{w['built_for']}}  {r['entries']:>{w['entries']}}  {r['device']}")
    print(f"(in {TABLES_DIR}; any command's --table takes these names)")
    return 0


# ------------------------------------------------------------------ Core ML
def _export_args(p):
    p.add_argument("--space", help="search space .yaml or shipped name (tiny): a package for each of its entries")
    p.add_argument("--arch", action="append", default=[], metavar="ARCH", help="a package for each entry of ARCH (repeatable)")
    p.add_argument("--out", required=True, help="folder for the .mlpackage files, manifest.json and times_template.csv")
    p.add_argument("--networks", type=int, default=4,
                   help="also export whole networks, timed on device to fit the overhead (default 4): with --space, "
                        "this many of its members; with --arch alone, the archs themselves (fewer, said so); with "
                        "--prune-grid, the archs and N - 1 pruned variants of each, as `latency build --prune-grid "
                        "--calibrate N` times them")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--precision", choices=["float16", "float32"], default="float16",
                   help="Core ML compute precision (default float16, as the Neural Engine runs)")
    _grid_args(p, " (the same entries `latency build --prune-grid` measures, a package each)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _export_coreml(args):
    from latency_tables.build import calibration_archs, grid_calibration_networks, needed_keys
    from latency_tables.coreml_io import export_coreml
    if not args.space and not args.arch:
        raise VitslimError("expected --space SPACE.yaml and/or --arch ARCH")
    _positive("--networks", args.networks, 0)
    _positive("--batch", args.batch)
    check_writable(args.out, "--out", is_dir=True)
    space = _space(args.space) if args.space else None
    archs = [_arch_of(a) for a in args.arch]
    keys = needed_keys(space, archs)
    grid_keys, grid_spec = _grid(args, archs)
    _add_grid_keys(keys, grid_keys)
    if not args.networks:
        nets = []
    elif grid_spec is not None:  # the networks `latency build --prune-grid --calibrate N` fits on: pruned ones too
        nets = grid_calibration_networks(space, archs, n=args.networks)
    else:
        nets = calibration_archs(space, archs, n=args.networks)[:args.networks]
    built_for = {"space": space.name} if space is not None else {"archs": list(args.arch)}
    if grid_spec is not None:
        built_for["prune_grid"] = grid_spec.to_dict()
    with _bar(len(keys) + len(nets), "packages", args.quiet) as bar:
        m = export_coreml(keys, args.out, nets, batch_size=args.batch, precision=args.precision,
                          built_for=built_for, progress=bar)
    print(f"wrote {len(m['entries'])} entry and {len(m['networks'])} network packages, "
          f"{os.path.join(args.out, 'manifest.json')} and {os.path.join(args.out, 'times_template.csv')}")
    if len(nets) < args.networks:
        from latency_tables.grid import GRID_FAMILIES
        more = "add --prune-grid for pruned variants" if all(a["family"] in GRID_FAMILIES for a in archs) \
            else "add --space SPACE.yaml for members of a space"
        print(f"note: {len(nets)} of --networks {args.networks} whole networks written: without --space or --prune-grid "
              f"they are the --arch networks themselves" + (", and on fewer than 3 `latency import` fits the overhead "
                                                             "as a constant alone" if len(nets) < 3 else "")
              + f"; {more}")
    print("next: time each package on the device (e.g. Xcode > Open Developer Tool > Core ML performance report), "
          "fill median_ms in a copy of times_template.csv, then `vitslim latency import`")
    return 0


def _import_args(p):
    p.add_argument("--manifest", required=True, help="manifest.json written by export-coreml")
    p.add_argument("--csv", required=True, help="on-device times: name,median_ms[,p10_ms,p90_ms,samples]")
    p.add_argument("--out", required=True, help="table .yaml to create (or add to, if it is for the same device)")
    p.add_argument("--device", required=True, help='what the times were measured on, e.g. "iPhone 12 (A14), iOS 17"')
    p.add_argument("--compute-units", default="ALL", choices=["ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"])


def _import(args):
    from latency_tables.build import overhead_summary
    from latency_tables.coreml_io import import_csv
    check_writable(args.out, "--out")
    _check_table_names(args.out)
    fits = []
    with _table_lock(args.out):  # it adds to a table of the same device: not while a build saves it
        t = import_csv(args.manifest, args.csv, args.out, args.device, compute_units=args.compute_units,
                       on_fit=fits.append)
    for over in fits:  # as `latency build` reports its calibration
        print(overhead_summary(over))
    print(f"wrote {args.out}: {len(t)} entries for coreml on {args.device}")
    return 0


# ------------------------------------------------------------------ the command
SUB = {
    "build": (_build_args, _build, "measure a table for a search space or arch (resumable)"),
    "predict": (_predict_args, _predict, "predicted ms of an arch, per stage"),
    "validate": (_validate_args, _validate, "measure sampled networks end to end and compare with the table"),
    "show": (_show_args, _show, "summary of a table: device, entries, overhead"),
    "list": (_list_args, _list, "the tables shipped with vitslim: name, device, what they were built for"),
    "export-coreml": (_export_args, _export_coreml, "one Core ML package per entry + manifest, to time on a device"),
    "import": (_import_args, _import, "read on-device times (CSV) back into a table"),
}

EXAMPLE = """vitslim latency build --space tiny --out latency_tables/cpu_torch_tiny.yaml
vitslim latency build --arch deit_tiny --prune-grid --out cpu_deit_tiny_grid.yaml
vitslim latency predict --table latency_tables/cpu_torch_efficientformer_l1.yaml efficientformer_l1
vitslim latency show --table cpu_torch_tiny
vitslim latency list                # the shipped tables: --table takes their names
vitslim latency validate --table latency_tables/cpu_torch_tiny.yaml --samples 50 --noise --json
vitslim latency export-coreml --space tiny --out coreml_tiny/
vitslim latency import --manifest coreml_tiny/manifest.json --csv times.csv --device "iPhone 12" --out t.yaml"""


def _args(p):
    import argparse
    sub = p.add_subparsers(dest="latency_command", metavar="SUBCOMMAND")
    for name, (add, run, help_text) in SUB.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="example:\n  " + next((l.strip() for l in EXAMPLE.splitlines() if f" {name} " in l),
                                                          "vitslim latency " + name + " --help"))
        add(sp)
        sp.set_defaults(_latency_run=run)


def _run(args):
    run = getattr(args, "_latency_run", None)
    if run is None:
        raise VitslimError("expected a subcommand: " + ", ".join(SUB))
    return run(args)


register_command("latency", _args, _run, "latency lookup tables: build, predict, validate, show, list, Core ML export/import",
                 EXAMPLE)
