"""The README's first command, timed: `vitslim run experiments/quickstart.yaml` under `/usr/bin/time -v` in a
checkout (a fresh clone after `CI=true bash .ci/run`, whose .venv has vitslim), then the same command again
(every stage reused). Records wall time, CPU time and peak RSS of both runs, the network found, its predicted
and measured latency against the target and its held-out accuracy, with the machine's load before and after.

    git clone -q . ../qs && (cd ../qs && CI=true bash .ci/run) && \\
        python benchmarks/quickstart_time.py --checkout ../qs --json benchmarks/results/quickstart_time.json
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time


def timed(cmd, cwd):
    load = os.getloadavg()[0]
    t0 = time.time()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    stats = dict(re.findall(r"^\s*(User time \(seconds\)|System time \(seconds\)|Maximum resident set size "
                            r"\(kbytes\)|Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)): (\S+)$", r.stderr, flags=re.M))
    wall = stats.get("Elapsed (wall clock) time (h:mm:ss or m:ss)")
    if wall is None:
        sys.exit(f"/usr/bin/time -v printed no wall clock time:\n{r.stderr[-2000:]}")
    wall_s = sum(float(p) * 60 ** i for i, p in enumerate(reversed(wall.split(":"))))
    return {"wall_s": round(wall_s, 1), "measured_wall_s": round(time.time() - t0, 1),
            "cpu_s": round(float(stats.get("User time (seconds)", 0)) + float(stats.get("System time (seconds)", 0)), 1),
            "max_rss_mb": round(int(stats.get("Maximum resident set size (kbytes)", 0)) / 1024),
            "load_before": load, "load_after": os.getloadavg()[0]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--checkout", required=True, help="a checkout with .venv/bin/vitslim (after .ci/run)")
    ap.add_argument("--out", default="runs/quickstart", help="the run's --out, relative to the checkout")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    exe = os.path.join(os.path.abspath(a.checkout), ".venv", "bin", "vitslim")
    if not os.path.isfile(exe):
        ap.error(f"--checkout {a.checkout}: no .venv/bin/vitslim, expected a checkout after `CI=true bash .ci/run`")
    out = os.path.join(os.path.abspath(a.checkout), a.out)
    if os.path.exists(out):
        ap.error(f"{out} exists: the first run must start from nothing (remove it)")
    cmd = [exe, "run", "experiments/quickstart.yaml", "--out", a.out]
    first = timed(cmd, a.checkout)
    again = timed(cmd, a.checkout)
    with open(os.path.join(out, "search", "report.json")) as f:
        rep = json.load(f)
    v = rep.get("verification") or {}
    res = {"command": "vitslim run experiments/quickstart.yaml --out " + a.out, "first_run": first, "second_run": again,
           "network": {"blocks": rep["blocks"], "widths": rep["choice"]["widths"]},
           "target_ms": rep["target_ms"], "predicted_ms": rep["predicted_ms"], "measured_ms": v.get("measured_ms"),
           "heldout_accuracy_supernet_weights": rep["accuracy"], "heldout_accuracy_model": rep.get("model_accuracy"),
           "exports": sorted(os.listdir(os.path.join(out, "export"))),
           "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}}
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(res, f, indent=1)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
