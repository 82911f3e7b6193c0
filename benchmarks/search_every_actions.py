"""Slimming with `--actions every` (every position and every stage considered at each step) against
latency-matched random search given the same (larger) number of evaluations, on the runs of
benchmarks/search_quickstart.py (its supernets, targets, held-out scoring, verification and fine-tuning).
Results in BENCHMARKS.md, "Search".

    python benchmarks/search_every_actions.py --bench runs/bench_search --out runs/bench_every \
        --json benchmarks/results/search_every_actions.json
"""
import argparse
import json, os, sys
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE); sys.path.insert(0, os.path.dirname(HERE))
import search_quickstart as b
from nas.run import run_search, load_supernet_run
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument('--bench', required=True, help='the --out of benchmarks/search_quickstart.py (finished)')
p.add_argument('--out', required=True)
p.add_argument('--json', default=None)
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
res = []
for seed, frac in [(1, 0.4), (2, 0.4), (0, 0.4), (1, 0.6), (2, 0.6), (0, 0.6)]:
    base = os.path.join(a.bench, f'seed{seed}')
    slim = json.load(open(f'{base}/search/report.json'))
    sub = f'{base}/bench/f0.4' if frac == 0.4 else f'{base}/bench'
    tgt = json.load(open(f'{sub}/random/report.json'))['target_ms']
    sn = f'{base}/supernet'; m, cfg, _ = load_supernet_run(sn)
    common = dict(eval_images=512, bn_batches=4, finetune=200, seed=seed, progress=False, verify='auto', verify_seconds=1.0)
    out = os.path.join(a.out, f's{seed}_f{frac}')
    r1 = run_search(sn, slim['table'], tgt, out + '_slim', strategy='slim', actions='every', **common) if not os.path.exists(out + '_slim/report.json') else json.load(open(out + '_slim/report.json'))
    n = r1['evaluation']['evaluations']
    r2 = run_search(sn, slim['table'], tgt, out + '_rand', strategy='random', budget=n, band=0.1, **common) if not os.path.exists(out + '_rand/report.json') else json.load(open(out + '_rand/report.json'))
    dc = {"seed": cfg.seed, "distractors": cfg.data.distractors}
    a1 = b.test_accuracy(out + '_slim/model.pt', dc, m.space, 512, 3000)
    a2 = b.test_accuracy(out + '_rand/model.pt', dc, m.space, 512, 3000)
    row = dict(seed=seed, frac=frac, evals=n, slim_every=a1, random=a2, slim_ms=r1['verification']['measured_ms'] / tgt, rand_ms=r2['verification']['measured_ms'] / tgt, slim_blocks=r1['blocks'], slim_w=r1['choice']['widths'], rand_blocks=r2['blocks'], rand_w=r2['choice']['widths'])
    print(json.dumps(row), flush=True)
    res.append(row)
if a.json:
    from supernet.arch import atomic_write_text
    atomic_write_text(a.json, json.dumps(res, indent=1) + '\n')
