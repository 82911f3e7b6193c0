"""What the count cache saves `vitslim presets`: the whole command (a fresh Python process each time, import
included, as a user runs it) with an empty cache folder (every preset built on the meta device and counted, then
remembered) and with the cache it left (counts read back). Rounds interleaved; the outputs of the two must be
identical, and the script says so.

    python benchmarks/presets_cache.py [--rounds 3] [--json benchmarks/results/presets_cache.json]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cache: str):
    env = dict(os.environ, VITSLIM_CACHE_DIR=cache, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vitslim", "presets", "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    cold, warm, outs = [], [], set()
    for _ in range(args.rounds):
        cache = tempfile.mkdtemp(prefix="countcache")
        try:
            t, out = run(cache)  # empty folder: counts everything, fills it
            cold.append(t)
            outs.add(out)
            t, out = run(cache)  # what it left
            warm.append(t)
            outs.add(out)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    res = {"command": "vitslim presets --json", "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "cold_s": [round(v, 3) for v in cold], "warm_s": [round(v, 3) for v in warm],
           "cold_median_s": round(statistics.median(cold), 3), "warm_median_s": round(statistics.median(warm), 3),
           "warm_over_cold": round(statistics.median(w / c for w, c in zip(warm, cold)), 3),
           "identical_output": len(outs) == 1, "presets": len(json.loads(outs.pop())) if len(outs) == 1 else None}
    print(json.dumps(res, indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    return 0 if res["identical_output"] else 1


if __name__ == "__main__":
    sys.exit(main())
