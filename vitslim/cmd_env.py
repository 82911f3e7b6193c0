"""`vitslim env`: what this machine has, for a bug report and to see, before a long run, which latency backends
run here and which latency tables were measured on this device (a table from another CPU predicts that CPU)."""
from __future__ import annotations

import json
import os
import platform
from typing import Dict, List, Optional

from supernet.errors import VitslimError, first_line

from .cli import register_command

CORE = ("torch", "numpy", "scipy", "optuna", "pyyaml", "tqdm", "pillow")
EXTRAS = {"onnx": "export", "onnxruntime": "export", "coremltools": "export", "matplotlib": "plot"}


def backend_status() -> Dict[str, dict]:
    """{backend: {"available", "why" (when not), "device" (when it is)}} for every latency backend."""
    from latency_tables.backends import BACKENDS, get_backend
    out = {}
    for name in BACKENDS:
        b = get_backend(name)
        try:
            b.check_available()
            out[name] = {"available": True, "device": b.device_name()}
        except Exception as e:  # noqa: BLE001 - any reason a backend cannot start here is the answer asked for
            why = first_line(e)
            for prefix in (name + ": ", name + " backend: "):  # the row already names it
                why = why[len(prefix):] if why.startswith(prefix) else why
            out[name] = {"available": False, "why": why.split(". ")[0]}
    return out


def table_status(paths: List[str]) -> List[dict]:
    """For each table: the device it was measured on, and whether this machine can measure for it (its backend
    runs here and the device is the same): what search's --verify and `latency validate` need."""
    from latency_tables.table import LatencyTable, describe_device
    from nas.verify import unavailable_reason
    rows = []
    for path in paths:
        try:  # one damaged table (a shipped one included) is a row of the report, not the end of it
            t = LatencyTable.load(path)
        except VitslimError as e:
            rows.append({"table": path, "measured_on": None, "measurable_here": False,
                         "why": f"cannot read it: {first_line(e)}"})
            continue
        try:
            why = unavailable_reason(t)
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA driver that fails to start: the reason asked for
            why = f"cannot check: {first_line(e)}"
        rows.append({"table": path, "measured_on": describe_device(t.device), "measurable_here": why is None,
                     "why": why})
    return rows


def _cuda_devices():
    """(the CUDA devices' names, None) or ([], why not) when asking torch raises (a broken driver or
    CUDA_VISIBLE_DEVICES naming a device that is not there): the rest of the report is still wanted."""
    import torch
    try:
        if not torch.cuda.is_available():
            return [], None
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], None
    except Exception as e:  # noqa: BLE001
        return [], first_line(e)


def collect(tables: Optional[List[str]] = None) -> dict:
    """Everything `vitslim env` prints, as a plain dict (tables: paths or shipped names; default: the shipped)."""
    import torch

    from latency_tables.backends import cpu_model, dist_version
    from latency_tables.table import TABLES_DIR, resolve_table_path, shipped_tables

    from . import __version__
    cuda, cuda_error = _cuda_devices()
    mps = getattr(torch.backends, "mps", None)
    backends = backend_status()
    paths = ([resolve_table_path(t) for t in tables] if tables
             else [os.path.join(TABLES_DIR, n + ".yaml") for n in shipped_tables()])
    return {
        "vitslim": __version__,
        "location": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": {"version": str(torch.__version__), "cuda": torch.version.cuda, "cuda_devices": cuda, "cuda_error": cuda_error,
                  "mps": bool(mps is not None and mps.is_available())},
        "packages": {d: dist_version(d) for d in CORE},
        "extras": {d: dist_version(d) for d in EXTRAS},
        "backends": backends,
        "tables": table_status(paths),
    }


def _env_args(p):
    p.add_argument("--table", action="append", default=None, metavar="T",
                   help="latency table .yaml or shipped name to check against this machine (repeatable; "
                        "default: every shipped table)")
    p.add_argument("--json", action="store_true", help="print the same as one JSON object")


def _env(args):
    info = collect(args.table)
    if args.json:
        print(json.dumps(info, indent=1))
        return _check_required(info)
    t = info["torch"]
    print(f"vitslim {info['vitslim']} ({info['location']})")
    print(f"python {info['python']}, {info['platform']}")
    print(f"cpu {info['cpu']}, {info['cpu_count']} logical cores, torch threads {info['torch_threads']}")
    gpu = (f"error: {t['cuda_error']}" if t["cuda_error"] else ", ".join(t["cuda_devices"]) or "no CUDA device")
    print(f"torch {t['version']} (CUDA {t['cuda'] or 'not built'}: {gpu}; MPS {'yes' if t['mps'] else 'no'})")
    print("packages: " + ", ".join(f"{d} {v or 'MISSING'}" for d, v in info["packages"].items()))
    print("extras:   " + ", ".join(f"{d} {v}" if v else f"{d} not installed (vitslim[{EXTRAS[d]}])"
                                   for d, v in info["extras"].items()))
    print("latency backends here:")
    for name, b in info["backends"].items():
        print(f"  {name:<12} " + (f"yes ({b['device']})" if b["available"] else f"no: {b['why']}"))
    print("latency tables (measured on this machine's device?):")
    if not info["tables"]:
        print("  none")
    for r in info["tables"]:
        name = os.path.splitext(os.path.basename(r["table"]))[0] if not args.table else r["table"]
        print(f"  {name}: " + ("yes" if r["measurable_here"] else f"no: {r['why']}"))
    if any(not r["measurable_here"] and r["measured_on"] is not None for r in info["tables"]):
        print("(a table this machine cannot measure for still predicts the device it was measured on: search and "
              "prune use it as it is, but cannot check what they find by measuring here; install its backend, or "
              "`vitslim latency build` measures this machine)")
    return _check_required(info)


def _check_required(info) -> int:
    """After the report (JSON or text): a required package missing is an error (exit 2), in either form."""
    missing = [d for d, v in info["packages"].items() if v is None]
    if missing:
        raise VitslimError(f"required packages missing: {', '.join(missing)}, expected them installed with vitslim "
                           "(pip install vitslim)")
    return 0


register_command("env", _env_args, _env,
                 "what this machine has: versions, latency backends that run here, tables measured on this device",
                 "vitslim env\nvitslim env --json > env.json   # attach to a bug report\n"
                 "vitslim env --table my_table.yaml")
