"""`vitslim search`: latency-constrained search of a trained supernet (slimming or Optuna) into a run
directory; `vitslim run PIPELINE.yaml`: the whole path (train a supernet, build or reuse a latency
table, search to a target, export), each stage resumable."""
from __future__ import annotations

import contextlib
import json
import math
import os
import re

import yaml

from supernet.arch import atomic_write_text, read_yaml
from supernet.errors import VitslimError, check_writable

from .cli import BUILTIN_CONFIGS, add_threads_arg, apply_threads, builtin_config, finite_float, register_command

SEARCH_EXAMPLE = """vitslim search --supernet runs/tiny --table latency_tables/cpu_torch_tiny.yaml --target-ms 1.6 --out runs/slim
vitslim search --supernet runs/tiny --table latency_tables/cpu_torch_tiny.yaml --target-ms 1.6 --strategy optuna --trials 200 --out runs/opt
vitslim search ... --finetune 300      # then train the found network for 300 steps"""


def _search_args(p):
    p.add_argument("--supernet", required=True, help="a finished supernet run directory (vitslim supernet train)")
    p.add_argument("--table", required=True, help="latency table .yaml covering the supernet's search space, or a "
                                                  "shipped table's name (cpu_torch_tiny; vitslim latency list)")
    p.add_argument("--target-ms", required=True, type=finite_float, help="latency target in milliseconds (> 0)")
    p.add_argument("--out", required=True, help="run directory (arch.yaml, model.pt, report.json, logs); "
                                                "an interrupted run in it is resumed")
    p.add_argument("--strategy", choices=["slim", "optuna", "random", "uniform"], default="slim",
                   help="slim (EfficientFormer's slimming, default), optuna (multi-objective), "
                        "random / uniform (baselines)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=512, help="held-out images each candidate is scored on (default 512)")
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--bn-batches", type=int, default=0,
                   help="re-estimate BatchNorm statistics of each candidate on N training batches (default 0)")
    p.add_argument("--trials", type=int, default=100,
                   help="optuna: trials in total, across resumes (default 100; workers sharing a study stop "
                        "together, each finishing the trial it runs: up to one more per extra worker)")
    p.add_argument("--sampler", choices=["nsga2", "tpe"], default="nsga2", help="optuna sampler (default nsga2)")
    p.add_argument("--storage", choices=["journal", "sqlite"], default="journal",
                   help="optuna study storage in --out: journal file (default; several workers) or SQLite")
    p.add_argument("--budget", type=int, default=50, help="random: networks evaluated (default 50)")
    p.add_argument("--criterion", choices=["acc", "loss"], default="acc",
                   help="slim: what a step minimises per ms saved: acc (the paper's held-out top-1 drop, default) or "
                        "loss (the held-out loss increase: less noisy on a small split)")
    p.add_argument("--actions", choices=["paper", "every"], default="paper",
                   help="slim: candidate actions per step: paper (the least important position -> identity, the "
                        "first Meta3D -> Meta4D, the least important stage -16 channels; default) or every (every "
                        "position and every stage: more evaluations per step)")
    p.add_argument("--refine", type=int, default=0, metavar="N",
                   help="slim: N more evaluations after the path, around its result: networks one or two moves away "
                        "that meet the target, the one a regression on every evaluated network predicts best first "
                        "(beyond the paper; default 0)")
    p.add_argument("--band", type=finite_float, default=0.0,
                   help="random: sample only networks predicted within this fraction under the target "
                        "(0.1: a latency-matched baseline; default 0: anything under it)")
    p.add_argument("--finetune", type=int, default=0, metavar="N", help="train the found network for N steps")
    p.add_argument("--finetune-lr", type=finite_float, default=1e-3)
    p.add_argument("--interpolate", action="store_true", help="estimate entries the table lacks from neighbouring widths")
    p.add_argument("--device", default="cpu", help="where candidates are evaluated (cpu, cuda)")
    p.add_argument("--verify", choices=["auto", "on", "off"], default="auto",
                   help="measure the found network end to end on the table's backend and search again under a "
                        "tightened bound while it runs over the target (auto: when the table's device is this "
                        "machine; on: required; off: trust the table)")
    p.add_argument("--tolerance", type=finite_float, default=0.05,
                   help="how far over the target the measured network may run (default 0.05 = 5%%)")
    p.add_argument("--verify-seconds", type=finite_float, default=1.0, help="timed seconds per measurement (default 1)")
    p.add_argument("--verify-rounds", type=int, default=4, help="measurements at most (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print report.json")
    p.add_argument("--no-progress", action="store_true")


def _print_report(rep, out):
    print(f"{out}: {rep['strategy']} -> {rep['blocks']} widths {rep['choice']['widths']}")
    print(f"  predicted {rep['predicted_ms']:.4g} ms (target {rep['target_ms']:g} ms), held-out accuracy "
          f"{rep['accuracy']:.4f}, params {rep['params']:,}, MACs {rep['macs'] / 1e6:.1f}M")
    s = rep["search"]
    ev = rep["evaluation"]
    now = ev.get("evaluated_this_run", ev["evaluations"])
    if s.get("overhead_fraction") is None:
        print(f"  {ev['evaluations']} evaluations, all read back from the log of the interrupted run")
    elif now < ev["evaluations"]:
        print(f"  {ev['evaluations']} evaluations ({ev['evaluations'] - now} read back from the log, {now} in "
              f"{s['seconds']:.1f} s: overhead {s['overhead_fraction']:.2%} beside evaluation)")
    else:
        print(f"  {ev['evaluations']} evaluations in {s['seconds']:.1f} s "
              f"(overhead {s['overhead_fraction']:.2%} beside evaluation)")
    v = rep.get("verification") or {}
    if "rounds" in v:
        print(f"  measured {v['measured_ms']:.4g} ms on {v['backend']} ({v['over_target']:+.1%} vs target, "
              f"{len(v['rounds'])} measurement(s)){'' if v['met'] else ': NOT within ' + format(v['tolerance'], '.0%')}")
        if v.get("note"):
            print(f"  note: {v['note']}")
    elif v.get("skipped"):
        print(f"  not measured: {v['skipped']}")
    if rep.get("finetune"):
        f = rep["finetune"]
        print(f"  fine-tuned {f['steps']} steps: accuracy {f['acc_before']:.4f} -> {f['acc_after']:.4f}")
    files = rep.get("files", [])
    if any(d in files and p not in files for d, p in (("trajectory.jsonl", "trajectory.png"), ("pareto.json", "pareto.png"))):
        print("  no plot: matplotlib is not installed (pip install 'vitslim[plot]')")


def _search(args):
    from nas.run import run_search
    apply_threads(args)
    rep = run_search(args.supernet, args.table, args.target_ms, args.out, strategy=args.strategy, seed=args.seed,
                     eval_images=args.eval_images, bn_batches=args.bn_batches, eval_batch_size=args.eval_batch_size,
                     finetune=args.finetune, finetune_lr=args.finetune_lr, trials=args.trials, sampler=args.sampler,
                     storage=args.storage, budget=args.budget, overwrite=args.overwrite,
                     progress=not args.no_progress, interpolate=args.interpolate, device=args.device,
                     verify=args.verify, tolerance=args.tolerance, verify_seconds=args.verify_seconds,
                     verify_rounds=args.verify_rounds, band=args.band, criterion=args.criterion,
                     actions=args.actions, refine=args.refine)
    if args.json:
        print(json.dumps(rep))
    else:
        _print_report(rep, args.out)
    return 0


# ------------------------------------------------------------------ run PIPELINE.yaml
PIPELINE_KEYS = ("version", "supernet", "table", "search", "export")
SEARCH_KEYS = ("strategy", "seed", "eval_images", "bn_batches", "eval_batch_size", "finetune", "finetune_lr", "trials",
               "sampler", "storage", "budget", "interpolate", "device", "verify", "tolerance", "verify_seconds",
               "verify_rounds", "band", "criterion", "actions", "refine")


def _bad(key, value, expected):
    return VitslimError(f"{key}: got {value!r}, expected {expected}")


def load_pipeline(path: str) -> dict:
    d = read_yaml(path, VitslimError, "a pipeline .yaml (e.g. experiments/quickstart.yaml) or a built-in name "
                                      f"({', '.join(BUILTIN_CONFIGS['pipeline'])})") or {}
    if not isinstance(d, dict):
        raise _bad(path, d, "a mapping with supernet, table, search, export")
    for k in d:
        if k not in PIPELINE_KEYS:
            raise VitslimError(f"{path}: unknown key {k!r}, expected one of {', '.join(PIPELINE_KEYS)}")
    if d.get("version", 1) != 1:
        raise _bad("version", d.get("version"), "1")
    for k in ("supernet", "search"):  # sections of settings, read key by key below and in the stages
        if d.get(k) is not None and not isinstance(d[k], dict):
            raise _bad(k, d[k], "a mapping of settings")
    cfg = (d.get("supernet") or {}).get("config")
    if cfg is not None and not isinstance(cfg, str):
        raise _bad("supernet.config", cfg, "a path to a supernet training config .yaml")
    s = d.get("search") or {}
    for k in s:  # checked before anything is trained
        if k not in SEARCH_KEYS + ("target_ms", "target_fraction"):
            raise VitslimError(f"search.{k}: unknown key, expected one of target_ms, target_fraction, "
                               f"{', '.join(SEARCH_KEYS)}")
    if isinstance(s.get("verify"), bool):  # YAML 1.1 reads a bare on/off as a boolean
        s["verify"] = "on" if s["verify"] else "off"
    from nas.run import check_search_args
    from nas.strategy import SearchError, check_target
    try:  # every setting that needs neither the supernet nor the table, before anything is trained
        check_search_args(**{k: s[k] for k in SEARCH_KEYS if k in s})
        if "target_ms" in s:
            t = s["target_ms"]
            if isinstance(t, bool) or not isinstance(t, (int, float)):  # as target_fraction: "1.0" is no number
                raise _bad("search.target_ms", t, "a number of milliseconds > 0")
            check_target(t)
    except SearchError as e:  # named as the pipeline's key: --eval-images -> search.eval_images
        keys = SEARCH_KEYS + ("target_ms",)  # every flag the message names, not only its first: --strategy too
        msg = re.sub(r"(?<![\w-])--([a-z-]+)", lambda m: "search." + m.group(1).replace("-", "_")
                     if m.group(1).replace("-", "_") in keys else m.group(0), str(e))
        raise VitslimError(msg if msg.startswith("search.") else f"search: {msg}") from None
    if ("target_ms" in s) == ("target_fraction" in s):
        raise VitslimError("search: expected exactly one of target_ms (milliseconds) or target_fraction "
                           "(of the start network's predicted latency)")
    if "target_fraction" in s:
        f = s["target_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise _bad("search.target_fraction", f, "a number in (0, 1]")
    fmts = d.get("export") or []
    if not isinstance(fmts, list):
        raise _bad("export", fmts, "a list of formats (" + ", ".join(EXPORT_SUFFIX) + ")")
    for i, fmt in enumerate(fmts):
        if fmt not in EXPORT_SUFFIX:
            raise _bad(f"export[{i}]", fmt, "one of " + ", ".join(EXPORT_SUFFIX))
    from .export import missing_extra
    for i, fmt in enumerate(fmts):  # a missing extra found now, not at stage 4 after the training and the search
        why = missing_extra(fmt)
        if why:
            raise VitslimError(f"export[{i}]: {why}")
    _check_table_section(d.get("table") or {}, os.path.dirname(os.path.abspath(path)))
    return d


EXPORT_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "coreml": ".mlpackage", "yaml": ".yaml",
                 "safetensors": ".safetensors"}
TABLE_KEYS = ("reuse", "backend", "time_per_network", "min_samples", "calibrate")


def _check_table_section(t, base: str) -> None:
    from latency_tables.backends import BACKENDS
    if not isinstance(t, dict):
        raise _bad("table", t, "a mapping with " + ", ".join(TABLE_KEYS))
    for k in t:
        if k not in TABLE_KEYS:
            raise VitslimError(f"table.{k}: unknown key, expected one of {', '.join(TABLE_KEYS)}")
    if "backend" in t and t["backend"] not in BACKENDS:
        raise _bad("table.backend", t["backend"], "one of " + ", ".join(BACKENDS))
    if "time_per_network" in t:
        v = t["time_per_network"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise _bad("table.time_per_network", v, "seconds > 0")
    for k, lo in (("min_samples", 1), ("calibrate", 0)):
        if k in t and (isinstance(t[k], bool) or not isinstance(t[k], int) or t[k] < lo):
            raise _bad(f"table.{k}", t[k], f"an integer >= {lo}")
    if t.get("reuse"):
        _reuse_path(t["reuse"], base)


def _reuse_path(reuse, base: str) -> str:
    """The table `table.reuse` names: a path relative to the pipeline file, else a shipped table's name
    (cpu_torch_tiny)."""
    from latency_tables.table import LatencyError, resolve_table_path, shipped_tables
    path = os.path.normpath(os.path.join(base, os.path.expanduser(str(reuse))))
    if os.path.exists(path):
        return path
    try:
        return resolve_table_path(str(reuse))
    except LatencyError:
        raise VitslimError(f"table.reuse: {path}: no such file, expected a latency table .yaml or a shipped table "
                           f"name ({', '.join(shipped_tables())}; or remove the key to measure one)") from None


def _merged(base: dict, over: dict) -> dict:
    """`base` with `over`'s keys, nested sections merged key by key (an override of optimizer.lr keeps the
    config's warmup and clipping)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _supernet_stage(d, base, out, progress):
    from supernet.space import shipped_space_file
    from supernet.train import TrainConfig, config_diff, read_run, train
    sn = dict(d.get("supernet") or {})
    cfg_path = sn.pop("config", None)
    if not cfg_path:
        raise VitslimError("supernet.config: missing, expected a supernet training config .yaml")
    cfg_path = os.path.normpath(os.path.join(base, cfg_path))
    raw = read_yaml(cfg_path, VitslimError, "a supernet training config .yaml (supernet.config)")
    if not isinstance(raw, dict):
        raise _bad(cfg_path, raw, "a mapping (a supernet training config)")
    for keys in (("space",), ("data", "train_dir"), ("data", "val_dir"), ("distillation", "teacher")):
        parent = sn  # a path given here is relative to the pipeline file, not to the supernet config
        for k in keys[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(keys[-1]), str):
            given = parent[keys[-1]]
            path = os.path.normpath(os.path.join(base, os.path.expanduser(given)))
            if keys == ("space",) and not os.path.exists(path) and shipped_space_file(given):
                continue  # a shipped space's name (tiny), not a path
            parent[keys[-1]] = path
    raw = _merged(raw, sn)  # overrides: steps, widths, optimizer.lr (the rest of optimizer kept), ...
    cfg = TrainConfig.from_dict(raw, base_dir=os.path.dirname(cfg_path))
    run = os.path.join(out, "supernet")
    ck = os.path.join(run, "checkpoint.pt")
    done = read_run(run) if os.path.isfile(ck) else None
    if done is not None and int(done["step"]) >= cfg.steps:
        diff = config_diff(done["config"], cfg.to_dict())
        if diff:  # a finished supernet of another config is not this pipeline's
            raise VitslimError(f"{run}: a finished supernet trained with another config ({'; '.join(diff[:3])}); "
                               "use another --out, or delete it to train anew")
        print(f"[1/4] supernet: reusing {run}")
    else:
        print(f"[1/4] supernet: training {cfg.steps} steps into {run}")
        train(cfg, run, resume=os.path.isfile(ck), progress=progress)  # cuda when available
    return run, cfg


def _table_stage(d, base, out, cfg, progress):
    from latency_tables import LatencyTable
    from latency_tables.backends import cpu_model
    from supernet.arch import atomic_write_text
    from .cli import main as cli_main
    t = dict(d.get("table") or {})
    reuse = t.get("reuse")
    path = os.path.join(out, "table.yaml")
    top_up = False
    if reuse:
        reuse = _reuse_path(reuse, base)
        if os.path.isfile(reuse):
            tab = LatencyTable.load(reuse)
            backend = t.get("backend", "torch-cpu")
            missing = tab.missing(_space_keys(cfg.space))
            if tab.device.get("device") != cpu_model():
                why = f"measured on {tab.device.get('device')}, not this machine's {cpu_model()}"
            elif tab.device.get("backend") != backend:
                why = f"measured with backend {tab.device.get('backend')}, asked {backend}"
            elif missing:
                why = f"lacks {len(missing)} entr{'y' if len(missing) == 1 else 'ies'} of this space"
                marker = path + ".from-reuse"
                if os.path.exists(marker):  # a copy of another table (table.reuse changed since): made anew
                    with open(marker, encoding="utf-8") as f:
                        if f.read() != reuse:
                            for p in (path, path + ".partial.json", marker):
                                with contextlib.suppress(FileNotFoundError):
                                    os.remove(p)
                top_up = not os.path.exists(path) or os.path.exists(marker)
            else:
                print(f"[2/4] latency table: reusing {reuse}")
                return reuse
            if top_up:  # the same machine and backend: a copy of it, only what it lacks measured into it
                print(f"[2/4] latency table: {reuse} {why}; measuring those into a copy, {path}")
                if not os.path.exists(path):
                    with open(reuse, encoding="utf-8") as f:
                        text = f.read()
                    atomic_write_text(path + ".from-reuse", reuse)  # marks the copy (a resumed run tops it up too)
                    atomic_write_text(path, text)
            else:
                print(f"[2/4] latency table: {reuse} {why}; building one for this machine")
    space_file = os.path.join(out, "space.yaml")
    atomic_write_text(space_file, yaml.safe_dump(cfg.space.to_dict(), sort_keys=False))
    argv = ["latency", "build", "--space", space_file, "--out", path, "--backend", str(t.get("backend", "torch-cpu")),
            "--time-per-network", str(t.get("time_per_network", 0.1)), "--min-samples", str(t.get("min_samples", 5)),
            "--calibrate", str(t.get("calibrate", 6))]
    if not progress:
        argv.append("--quiet")
    print(f"[2/4] latency table: measuring {path} (resumable)")
    rc = cli_main(argv)
    if rc == 130:  # Ctrl-C inside the build: an interruption of the pipeline, not a failure
        raise KeyboardInterrupt
    if rc == 2 and top_up:  # the copy was measured otherwise than this build would (procedure, threads, ...)
        print(f"[2/4] latency table: {reuse} cannot be topped up here; building one for this machine")
        for p in (path, path + ".partial.json", path + ".from-reuse"):  # the copy's samples too: a full
            # build would skip the networks the top-up ran (their other entries one context short)
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        rc = cli_main(argv)
        if rc == 130:
            raise KeyboardInterrupt
    if rc:
        raise VitslimError(f"latency table build failed (exit {rc}); re-run to resume it")
    return path


def _space_keys(space):
    from latency_tables.segments import space_keys
    return space_keys(space)


def _pipeline_record(path: str, what: str, redo: str):
    """A JSON record the pipeline wrote itself (atomically): a mapping, or one line naming the file and how to redo
    the stage (a file edited or damaged by hand was a JSONDecodeError / AttributeError traceback)."""
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
        rec = e
    if not isinstance(rec, dict):
        why = f"not JSON ({type(rec).__name__})" if isinstance(rec, Exception) else f"a {type(rec).__name__}"
        raise VitslimError(f"{path}: {why}, expected {what} as `vitslim run` writes it; {redo}")
    return rec


def _run_args(p):
    p.add_argument("pipeline", help="pipeline .yaml (experiments/quickstart.yaml), or a built-in one by name "
                                    "(quickstart: the same file, shipped with the package)")
    p.add_argument("--out", required=True, help="output directory: supernet/, table.yaml, search/, export/")
    p.add_argument("--no-progress", action="store_true")


def _run(args):
    from nas.run import load_supernet_run, load_table, run_search
    from nas.strategy import largest_choice
    from .export import export
    pipeline = builtin_config(args.pipeline, "pipeline")  # a file, or `quickstart`
    d = load_pipeline(pipeline)
    base = os.path.dirname(os.path.abspath(pipeline))
    progress = not args.no_progress
    check_writable(args.out, "--out", is_dir=True)
    created = not os.path.exists(args.out)
    os.makedirs(args.out, exist_ok=True)
    try:
        run, cfg = _supernet_stage(d, base, args.out, progress)
    except BaseException:
        if created:  # refused before anything was written (a missing supernet.config, say): no empty --out left
            with contextlib.suppress(OSError):
                os.rmdir(args.out)
        raise
    if cfg.threads:  # the whole pipeline, also when the supernet stage was reused (a resumed run)
        import torch
        torch.set_num_threads(cfg.threads)
    table = _table_stage(d, base, args.out, cfg, progress)
    s = dict(d.get("search") or {})
    search_dir = os.path.join(args.out, "search")
    if "target_fraction" in s:
        frac = float(s.pop("target_fraction"))
        model, _, _ = load_supernet_run(run)
        _, compiled = load_table(table, model.space)
        target = round(frac * float(compiled.score_choices([largest_choice(model)])[0]), 4)
        print(f"[3/4] search: target {frac:g} x the start network's {target / frac:.4g} ms = {target:g} ms")
    else:
        target = float(s.pop("target_ms"))
        print(f"[3/4] search: target {target:g} ms")
    stage = {"target_ms": target, "strategy": s.get("strategy", "slim"), "seed": s.get("seed", 0),
             "settings": json.loads(json.dumps(s, sort_keys=True)),
             "table_digest": _table_digest(table)}  # its content, not its path: a moved checkout still resumes
    stage_file = os.path.join(search_dir, STAGE_FILE)
    was = None
    redo = f"delete {search_dir} and {os.path.join(args.out, 'export')} to search again"
    if os.path.isfile(stage_file):
        was = _pipeline_record(stage_file, "the settings of the search it holds", redo)
    elif os.path.isfile(os.path.join(search_dir, "report.json")):  # a run of an earlier version: what it recorded
        rep = _pipeline_record(os.path.join(search_dir, "report.json"), "a search report", redo)
        was = {k: rep.get(k) for k in ("target_ms", "strategy", "seed")}
    if was is not None:
        diff = []
        for k in stage:
            if k not in was or was[k] == stage[k]:
                continue
            if k == "settings" and isinstance(was[k], dict):  # name the search keys that changed
                for sk in sorted(set(was[k]) | set(stage[k])):
                    if was[k].get(sk) != stage[k].get(sk):
                        diff.append(f"search.{sk}: {_short(was[k].get(sk))} -> {_short(stage[k].get(sk))}")
            else:
                diff.append(f"{k}: {_short(was.get(k))} -> {_short(stage[k])}")
        if diff:  # the search (and its exports) answer another question
            raise VitslimError(f"{search_dir}: holds a search for other settings ({'; '.join(diff[:3])}); use "
                               f"another --out, or delete {search_dir} and {os.path.join(args.out, 'export')} to "
                               "search again")
    if os.path.isfile(os.path.join(search_dir, "report.json")):
        rep = _pipeline_record(os.path.join(search_dir, "report.json"), "a search report", redo)
        print(f"  reusing {search_dir}")
    else:
        os.makedirs(search_dir, exist_ok=True)
        atomic_write_text(stage_file, json.dumps(stage, indent=1) + "\n")  # before: an interrupted one is keyed too
        rep = run_search(run, table, target, search_dir, progress=progress, **s)
    _print_report(rep, search_dir)
    fmts = d.get("export") or []
    print(f"[4/4] export: {', '.join(fmts) or 'nothing'}")
    model = os.path.join(search_dir, "model.pt")
    source, stamp = _sha256(model), os.path.join(args.out, "export", "source.json")
    made = {}
    if os.path.isfile(stamp):  # which search each export was made from; unreadable, every export is made anew
        with contextlib.suppress(VitslimError):
            made = _pipeline_record(stamp, "", "")
    for fmt in fmts:
        dst = os.path.join(args.out, "export", "model" + EXPORT_SUFFIX[fmt])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(dst) and made.get(os.path.basename(dst)) == source:
            print(f"  {dst} exists")
            continue
        # missing, or of another search/model.pt (or of an earlier version's run, unrecorded): written anew
        res = export(model, fmt, dst, overwrite=True)
        made[os.path.basename(dst)] = source
        atomic_write_text(stamp, json.dumps(made, indent=1, sort_keys=True) + "\n")
        err = f" (max relative error {res['max_rel_error']:.1e} vs PyTorch)" if "max_rel_error" in res else ""
        if res.get("unchecked"):
            err = f" (not checked: {res['unchecked']})"
        print(f"  wrote {res['path']}{err}")
    return 0


STAGE_FILE = "pipeline_stage.json"  # the pipeline settings a search/ folder was made for


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _table_digest(path: str) -> str:
    """What a search read from a table: its device, entries and overhead (not when it was saved)."""
    from latency_tables import LatencyTable
    from nas.run import table_digest
    return table_digest(LatencyTable.load(path))


def _short(v) -> str:
    t = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else repr(v)
    return t if len(t) <= 60 else t[:57] + "..."


register_command("search", _search_args, _search, "latency-constrained search of a supernet (slimming or Optuna)",
                 SEARCH_EXAMPLE)
register_command("run", _run_args, _run, "the whole pipeline of a .yaml: supernet, latency table, search, export",
                 "vitslim run experiments/quickstart.yaml --out runs/quickstart\n"
                 "vitslim run quickstart --out runs/quickstart      # the same, shipped with the package")
