"""Accuracy of a latency table against end-to-end measurements, with the noise floor beside it:
runs `vitslim latency validate --noise` and stores the full report (every network) under
benchmarks/results/. Figures are recorded in BENCHMARKS.md ("Latency tables").

    python benchmarks/latency_accuracy.py --table latency_tables/cpu_torch_efficientformer_l1.yaml --samples 100
    python benchmarks/latency_accuracy.py --table latency_tables/cpu_onnxruntime_efficientformer_l1.yaml
"""
import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vitslim.cli import main as vitslim_main  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--time-per-network", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default=None,
                    help="where to write the report (default: benchmarks/results/latency_validate_<table>.json, "
                         "the file BENCHMARKS.md cites; refused if it exists unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing report")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `latency validate` arguments")
    args = ap.parse_args()
    name = os.path.splitext(os.path.basename(args.table))[0]
    out = args.report or os.path.join(ROOT, "benchmarks", "results", f"latency_validate_{name}.json")
    if os.path.exists(out) and not args.overwrite:
        ap.error(f"{out} exists (a recorded result): pass --report PATH for a trial run, or --overwrite")
    argv = ["latency", "validate", "--table", args.table, "--samples", str(args.samples), "--seed", str(args.seed),
            "--time-per-network", str(args.time_per_network), "--noise", "--report", out] + args.extra
    t0 = time.time()
    code = vitslim_main(argv)
    if code == 0:
        rep = json.load(open(out))
        rep["command"] = "vitslim " + " ".join(argv)
        rep["wall_s"] = round(time.time() - t0, 1)
        rep["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
        with open(out + ".tmp", "w") as f:
            json.dump(rep, f, indent=1)
        os.replace(out + ".tmp", out)
        print(f"report: {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
