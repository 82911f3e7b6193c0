"""Random search's overhead beside evaluation (goal: table look-ups and bookkeeping under 1% of a run) with its
per-evaluation log (`random.jsonl`, session 13: a killed random search resumes from it), against the same search
with the log switched off.

Runs a latency-matched random search (`run_search`, budget 25, band 0.1, 512 held-out images, BatchNorm on 4
batches, verify off, seed 0) on a trained quickstart supernet `--rounds` times each way, interleaved in one
process (torch on 1 thread). Both ways must return the same network with the same accuracy. Results in
BENCHMARKS.md ("Search", goals).

    python benchmarks/search_overhead_random.py --supernet runs/quickstart/supernet --target-ms 1.634
"""
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from search_overhead import parse_args  # (benchmarks/ is on sys.path as the script's own folder)
    a = parse_args(__doc__, argv)

    import torch
    import nas.random_search as rs
    from nas.run import run_search
    from nas.slimming import TrajectoryLog
    torch.set_num_threads(1)
    logged = rs.RandomSearch._open_log

    def unlogged(self, ctx):  # the search as before session 13: nothing written per evaluation
        return TrajectoryLog(None), set()

    rows = []
    try:
        for r in range(a.rounds):
            for way in ("log", "no log"):
                rs.RandomSearch._open_log = logged if way == "log" else unlogged
                with tempfile.TemporaryDirectory() as tmp:
                    rep = run_search(a.supernet, a.table, a.target_ms, os.path.join(tmp, "r"), strategy="random",
                                     budget=25, band=0.1, eval_images=512, bn_batches=4, verify="off",
                                     progress=False, seed=0)
                s = rep["search"]
                rows.append({"round": r, "way": way, "overhead_fraction": s["overhead_fraction"],
                             "search_seconds": s["seconds"], "eval_seconds": s["eval_seconds"],
                             "accuracy": rep["accuracy"], "choice": rep["choice"]})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "choice"}), flush=True)
    finally:
        rs.RandomSearch._open_log = logged
    same = len({(json.dumps(x["choice"], sort_keys=True), x["accuracy"]) for x in rows}) == 1
    summary = {way: {"median_overhead_fraction": statistics.median(x["overhead_fraction"] for x in rows
                                                                    if x["way"] == way),
                     "max_overhead_fraction": max(x["overhead_fraction"] for x in rows if x["way"] == way)}
               for way in ("log", "no log")}
    print(json.dumps({"same_result": same, **summary}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": "python benchmarks/search_overhead_random.py " + " ".join(argv or sys.argv[1:]),
                       "threads": 1, "same_result": same, "summary": summary, "rows": rows}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
