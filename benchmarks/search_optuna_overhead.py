"""Optuna's own cost per trial on the EfficientFormer-L1 space (25 parameters in the flat encoding), with the
evaluation stubbed out (a hash of the choice: no network runs), so what is timed is the sampler, the table
look-ups and the study's storage. Optuna's journal backend fsyncs every record, and a trial writes one per
parameter; vitslim's (`nas.optuna_search._journal_backend`) writes them unsynced and syncs once a trial. Both
run in one process, interleaved, `--rounds` times each; the found network must be the same.

    python benchmarks/search_optuna_overhead.py --json benchmarks/results/search_optuna_overhead.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nas.optuna_search as O  # noqa: E402
from latency_tables import LatencyTable  # noqa: E402
from latency_tables.table import TABLES_DIR  # noqa: E402
from nas.evaluator import choice_key  # noqa: E402
from nas.optuna_search import OptunaSearch  # noqa: E402
from nas.strategy import SearchContext  # noqa: E402
from supernet.arch import atomic_write_text  # noqa: E402
from supernet.space import load_space  # noqa: E402


class StubEvaluator:
    """Deterministic accuracy from the choice (wider and a hash), no network run."""

    def __init__(self, space):
        self.space, self.evaluations, self.cache, self.primed, self.seconds = space, 0, {}, 0, 0.0
        self.n_images, self.bn_batches = 1, 0

    def __call__(self, c):
        k = choice_key(self.space.check_choice(c))
        self.evaluations += 1
        h = int(hashlib.md5(k.encode()).hexdigest()[:6], 16) / 2 ** 24
        return {"acc": sum(c["widths"]) / 816 * 0.5 + 0.1 * h, "loss": 1 - h}

    def prime(self, c, r):
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--target-ms", type=float, default=40.0)
    p.add_argument("--json", required=True)
    args = p.parse_args()
    from optuna.storages.journal import JournalFileBackend
    space = load_space("efficientformer_l1")
    table = LatencyTable.load(os.path.join(TABLES_DIR, "cpu_torch_efficientformer_l1.yaml"))
    compiled = table.compile(space)
    backends = {"optuna": lambda path: JournalFileBackend(path), "vitslim": O._journal_backend}
    ms, found = {k: [] for k in backends}, {k: [] for k in backends}
    work = tempfile.mkdtemp(prefix="optuna_overhead.")
    try:
        for r in range(args.rounds):
            for name, make in backends.items():
                O._journal_backend = make
                out = os.path.join(work, f"{name}{r}")
                ctx = SearchContext(space=space, supernet=None, table=table, compiled=compiled,
                                    evaluator=StubEvaluator(space), target_ms=args.target_ms, progress=False, log_dir=out)
                t0 = time.perf_counter()
                res = OptunaSearch(n_trials=args.trials, sampler="nsga2").search(ctx)
                ms[name].append((time.perf_counter() - t0) / args.trials * 1000)
                found[name].append(choice_key(res.choice))
                print(f"round {r} {name}: {ms[name][-1]:.1f} ms a trial", flush=True)
    finally:
        O._journal_backend = backends["vitslim"]
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    out = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_before": os.getloadavg()[0], "trials": args.trials, "rounds": args.rounds,
           "ms_per_trial": ms, "median_ms_per_trial": med, "ratio_vitslim_to_optuna": med["vitslim"] / med["optuna"],
           "same_network": len(set(found["optuna"] + found["vitslim"])) == 1}
    print(json.dumps({k: out[k] for k in ("median_ms_per_trial", "ratio_vitslim_to_optuna", "same_network")}))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
