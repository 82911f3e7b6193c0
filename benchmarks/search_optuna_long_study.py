"""Per-trial cost of a long Optuna study (the sampler and the study's storage; the evaluation stubbed out, as in
search_optuna_overhead.py) on the EfficientFormer-L1 space, early and late in the study. vitslim re-seeds the
sampler before every trial by making a new one; a new NSGA-II / TPE sampler starts its IntersectionSearchSpace
cache empty and intersects the distributions of every trial of the study again (O(n) a trial, O(n^2) a study).
`kept` hands the previous sampler's cache over (`nas.optuna_search._keep_search_space`), `fresh` does not (the
code before). Both must draw the same trials.

    python benchmarks/search_optuna_long_study.py --trials 1500
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import nas.optuna_search as O  # noqa: E402
from latency_tables import LatencyTable  # noqa: E402
from latency_tables.table import TABLES_DIR  # noqa: E402
from nas.evaluator import choice_key  # noqa: E402
from nas.optuna_search import OptunaSearch  # noqa: E402
from nas.strategy import SearchContext  # noqa: E402
from search_optuna_overhead import StubEvaluator  # noqa: E402
from supernet.space import load_space  # noqa: E402


class TimedStub(StubEvaluator):
    def __init__(self, space):
        super().__init__(space)
        self.stamps, self.keys = [], []

    def __call__(self, c):
        self.stamps.append(time.perf_counter())
        self.keys.append(choice_key(self.space.check_choice(c)))
        return super().__call__(c)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1500)
    p.add_argument("--sampler", default="nsga2", choices=("nsga2", "tpe"))
    p.add_argument("--target-ms", type=float, default=40.0)
    p.add_argument("--window", type=int, default=100)
    args = p.parse_args()
    space = load_space("efficientformer_l1")
    table = LatencyTable.load(os.path.join(TABLES_DIR, "cpu_torch_efficientformer_l1.yaml"))
    compiled = table.compile(space)
    keep = O._keep_search_space
    modes = {"fresh": lambda sampler, previous: None, "kept": keep}
    res, keys = {}, {}
    work = tempfile.mkdtemp(prefix="optuna_long.")
    try:
        for name, fn in modes.items():
            O._keep_search_space = fn
            ev = TimedStub(space)
            ctx = SearchContext(space=space, supernet=None, table=table, compiled=compiled, evaluator=ev,
                                target_ms=args.target_ms, progress=False, log_dir=os.path.join(work, name))
            t0 = time.perf_counter()
            OptunaSearch(n_trials=args.trials, sampler=args.sampler).search(ctx)
            total = time.perf_counter() - t0
            gaps = [b - a for a, b in zip(ev.stamps, ev.stamps[1:])]
            w = args.window
            res[name] = {"total_s": round(total, 2),
                         f"ms_per_trial_trials_{w}-{2 * w}": round(statistics.mean(gaps[w:2 * w]) * 1000, 2),
                         f"ms_per_trial_last_{w}": round(statistics.mean(gaps[-w:]) * 1000, 2)}
            keys[name] = ev.keys
            print(name, json.dumps(res[name]), flush=True)
    finally:
        O._keep_search_space = keep
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"trials": args.trials, "sampler": args.sampler, **res,
                      "speedup_total": round(res["fresh"]["total_s"] / res["kept"]["total_s"], 2),
                      "same_trials": keys["fresh"] == keys["kept"]}))


if __name__ == "__main__":
    main()
