"""Slimming's overhead beside evaluation (goal: table look-ups and bookkeeping under 1% of a run), and what
building each extracted sub-network without random init (`supernet.layers.no_weight_init`, session 8) saves.

Runs the quickstart's search (`run_search`, slimming, 512 held-out images, BatchNorm on 4 batches, verify off)
on a trained quickstart supernet `--rounds` times each way, interleaved in one process: with extraction as
shipped (init skipped) and with the random init drawn again (`no_weight_init` replaced by a null context in
`supernet.supernet`). Both must find the same network with the same numbers. Results in BENCHMARKS.md
("Search", goals).

    python benchmarks/search_overhead.py --supernet runs/bench_search7/seed0/supernet --target-ms 1.634
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(doc, argv=None):
    """The arguments of the search-overhead benchmarks (this one, search_overhead_random.py)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--supernet", required=True)
    p.add_argument("--table", default="latency_tables/cpu_torch_tiny.yaml")
    p.add_argument("--target-ms", type=float, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(__doc__, argv)
    import torch
    import supernet.supernet as sn
    from nas.run import run_search
    torch.set_num_threads(1)
    skip = sn.no_weight_init
    runs = {"init_skipped": [], "init_drawn": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for way in runs:
                sn.no_weight_init = skip if way == "init_skipped" else contextlib.nullcontext
                rep = run_search(a.supernet, a.table, a.target_ms, os.path.join(tmp, f"{way}{r}"), strategy="slim",
                                 eval_images=512, bn_batches=4, seed=0, progress=False, verify="off")
                s = rep["search"]
                runs[way].append({"seconds": s["seconds"], "eval_seconds": s["eval_seconds"],
                                  "overhead_fraction": s["overhead_fraction"], "evaluations": rep["evaluation"]["evaluations"],
                                  "choice": rep["choice"], "accuracy": rep["accuracy"]})
                print(way, json.dumps({k: v for k, v in runs[way][-1].items() if k != "choice"}), flush=True)
    sn.no_weight_init = skip
    same = len({json.dumps([x["choice"], x["accuracy"]]) for v in runs.values() for x in v}) == 1
    med = {w: {k: statistics.median(x[k] for x in v) for k in ("seconds", "eval_seconds", "overhead_fraction")}
           for w, v in runs.items()}
    print(f"same network and accuracy in every run: {same}")
    for w, m in med.items():
        print(f"{w:<13} search {m['seconds']:.2f} s, evaluation {m['eval_seconds']:.2f} s, overhead {m['overhead_fraction']:.3%}")
    print(f"search time skipped / drawn: {med['init_skipped']['seconds'] / med['init_drawn']['seconds']:.3f}")
    if a.json:
        from supernet.arch import atomic_write_text
        atomic_write_text(a.json, json.dumps({"same_result": same, "median": med, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
