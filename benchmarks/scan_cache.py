"""What the image-folder scan cache saves: `scan_image_folder` on an ImageNet-shaped folder of real JPEGs
(C classes x N files, ~110 KB each like ImageNet's average), timed without the cache (every header opened,
as before), filling the cache (headers opened + a stat per file + the write), and with a warm cache (a stat
per file, nothing opened). Rounds interleaved in one process; the page cache is warm for all three after the
first round, so the saving on a cold disk or a network file system is larger than measured here.

    python benchmarks/scan_cache.py [--classes 100 --per-class 200 --rounds 5] [--dir /tmp/scanbench]
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from supernet.data import scan_image_folder  # noqa: E402


def make_folder(root: str, classes: int, per_class: int) -> None:
    from PIL import Image
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8))  # ImageNet's median size
    buf = os.path.join(root, ".one.jpg")
    base.save(buf, quality=30)  # ~110 KB of noise at quality 30
    data = open(buf, "rb").read()
    os.remove(buf)
    for c in range(classes):
        d = os.path.join(root, f"n{c:08d}")
        os.makedirs(d, exist_ok=True)
        for k in range(per_class):
            with open(os.path.join(d, f"n{c:08d}_{k}.JPEG"), "wb") as f:
                f.write(data)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", help="where to write the folder (default: a temporary, removed after)")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="scanbench")
    cache = tempfile.mkdtemp(prefix="scancache")
    try:
        if not os.path.isdir(os.path.join(root, "n00000000")):
            make_folder(root, args.classes, args.per_class)
        times = {"no cache": [], "cache: fill": [], "cache: warm": []}
        warnings.simplefilter("ignore")
        scan_image_folder(root, cache=False)  # page cache warm for every variant
        for _ in range(args.rounds):
            t = time.perf_counter()
            n = len(scan_image_folder(root, cache=False)[1])
            times["no cache"].append(time.perf_counter() - t)
            shutil.rmtree(cache, ignore_errors=True)
            os.environ["VITSLIM_CACHE_DIR"] = cache
            t = time.perf_counter()
            scan_image_folder(root)
            times["cache: fill"].append(time.perf_counter() - t)
            t = time.perf_counter()
            assert len(scan_image_folder(root)[1]) == n
            times["cache: warm"].append(time.perf_counter() - t)
        base = statistics.median(times["no cache"])
        res = {"files": n, "rounds": args.rounds,
               "median_s": {k: statistics.median(v) for k, v in times.items()},
               "ratio_to_no_cache": {k: statistics.median(v) / base for k, v in times.items()}}
        print(json.dumps(res, indent=1))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
