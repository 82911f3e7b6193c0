"""`load_checkpoint` with and without drawing random weights before the file's overwrite them.

Session 8 builds the network of a checkpoint under `supernet.checkpoint.no_weight_init` (torch.nn.init's
functions do nothing; every parameter then comes from the file, strictly). This script times both ways in
one process, interleaved, on random-weight checkpoints of large presets (vitslim format, written to a
temporary folder): the old way is the same call with `no_weight_init` replaced by a null context.
Results in BENCHMARKS.md ("Checkpoint loading").

    python benchmarks/checkpoint_load.py --presets deit_base swin_base efficientformer_l7 --rounds 5
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["deit_base", "swin_base", "efficientformer_l7"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    import torch
    import vitslim
    import supernet.checkpoint as ck
    torch.set_num_threads(1)
    skip_init = ck.no_weight_init
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.presets:
            m = vitslim.build_model(name)
            path = os.path.join(tmp, f"{name}.pt")
            vitslim.save_checkpoint(m, m.arch, path)
            del m
            vitslim.load_checkpoint(path)  # warm: imports, file cache
            times = {"init_skipped": [], "init_drawn": []}
            for _ in range(a.rounds):
                for way in times:
                    ck.no_weight_init = skip_init if way == "init_skipped" else contextlib.nullcontext
                    t0 = time.perf_counter()
                    vitslim.load_checkpoint(path)
                    times[way].append(time.perf_counter() - t0)
            ck.no_weight_init = skip_init
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"preset": name, "params": vitslim.count(name)["params"], "median_s": med,
                         "ratio_skipped_over_drawn": med["init_skipped"] / med["init_drawn"], "times_s": times})
            print(f"{name:<20} init drawn {med['init_drawn']:.3f} s, skipped {med['init_skipped']:.3f} s "
                  f"(ratio {rows[-1]['ratio_skipped_over_drawn']:.3f})", flush=True)
    if a.json:
        from supernet.arch import atomic_write_text
        atomic_write_text(a.json, json.dumps({"rounds": a.rounds, "threads": 1, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
