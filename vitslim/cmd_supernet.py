"""`vitslim supernet train|show|extract`: train a MetaPath supernet, look at its importance scores,
and cut a standalone model out of it."""
from __future__ import annotations

import argparse
import json
import os
import textwrap

from supernet.errors import VitslimError, check_writable

from .cli import register_command

EXAMPLES = {
    "train": """vitslim supernet train --config experiments/supernet_tiny.yaml --out runs/tiny
vitslim supernet train --out runs/tiny --resume          # continue where it stopped
torchrun --nproc_per_node 2 -m vitslim supernet train --config experiments/supernet_tiny.yaml --out runs/ddp""",
    "show": """vitslim supernet show runs/tiny
vitslim supernet show runs/tiny --json
vitslim supernet show runs/tiny --plot runs/tiny/importance.png""",
    "extract": """vitslim supernet extract runs/tiny --choice best --out runs/tiny/best
vitslim supernet extract runs/tiny --choice '{"widths": [32, 48, 64, 96], "blocks": [...]}' --out DIR
vitslim supernet extract runs/tiny --arch arch.yaml --out DIR""",
}
EXAMPLE = "\n".join(EXAMPLES.values())

_SHORT = {"meta4d": "4D", "meta3d": "3D", "identity": "I"}


def _args(p):
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    t = sub.add_parser("train", help="train a supernet (resumable; works under torchrun)", description="train a supernet (resumable; works under torchrun)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n" + textwrap.indent(EXAMPLES["train"], "  "))
    t.add_argument("--config", help="training config .yaml, or supernet_tiny (shipped: experiments/supernet_tiny.yaml) "
                                    "(with --resume: defaults to RUN/config.yaml)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP steps with a checkpoint written (resume later)")
    t.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if available)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("show", help="per-block choice probabilities and stage importance of a run", description="per-block choice probabilities and stage importance of a run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n" + textwrap.indent(EXAMPLES["show"], "  "))
    s.add_argument("run", help="run directory")
    s.add_argument("--json", action="store_true", help="print importance.json")
    s.add_argument("--plot", metavar="PNG", help="also draw the probabilities and importance (needs matplotlib)")
    e = sub.add_parser("extract", help="a standalone EfficientFormer (arch.yaml + model.pt) cut from a run", description="a standalone EfficientFormer (arch.yaml + model.pt) cut from a run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n" + textwrap.indent(EXAMPLES["extract"], "  "))
    e.add_argument("run", help="run directory")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--choice", help="'best' (most probable valid arch), 'largest', or a Choice as JSON")
    g.add_argument("--arch", help="an arch config .yaml inside the run's search space")
    e.add_argument("--widths", help="comma-separated stage widths for --choice best/largest (default: maximum)")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--overwrite", action="store_true", help="replace the arch.yaml / model.pt / choice.json of --out")


def _run(args):
    action = getattr(args, "action", None)
    if action == "train":
        return _train(args)
    if action == "show":
        return _show(args)
    if action == "extract":
        return _extract(args)
    raise VitslimError("expected an action: train, show or extract (see `vitslim supernet --help`)")


def _train(args):
    from supernet.train import ConfigError, load_config, train
    from .cli import BUILTIN_CONFIGS, builtin_config
    cfg_path = args.config
    if cfg_path is None:
        if not args.resume:
            raise ConfigError("--config: missing, expected a training config .yaml (only --resume may omit it)")
        cfg_path = os.path.join(args.out, "config.yaml")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{args.out}: no config.yaml to resume from, expected a run directory")
    if args.stop_at is not None and args.stop_at < 1:
        raise ConfigError(f"--stop-at: got {args.stop_at}, expected a step >= 1")
    cfg_path = builtin_config(cfg_path, "supernet")  # a file, or `supernet_tiny`
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{cfg_path}: no such file, expected a supernet training config .yaml or a built-in name "
                          f"({', '.join(BUILTIN_CONFIGS['supernet'])})")
    cfg = load_config(cfg_path)
    rep = train(cfg, args.out, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at,
                device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        msg = f"supernet: {rep['step']}/{rep['steps']} steps in {args.out}"
        if "heldout_acc_best" in rep:
            msg += f", held-out accuracy of the most probable arch {rep['heldout_acc_best']:.3f}"
        print(msg)
    return 0


def _load_importance(run):
    from supernet.train import read_run
    path = os.path.join(run, "importance.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            try:
                return _check_importance(json.load(f), path)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: '[[[[...' nested
                pass  # fall back on the checkpoint's copy
    return _check_importance(read_run(run).get("importance"), os.path.join(run, "checkpoint.pt") + ": importance")


def _check_importance(imp, where):
    """The record `show` prints and plots, as train writes it: per stage its candidates, per block their
    probabilities and MetaPath importance, per stage its importance (None where it has no identity candidate)."""
    def num(x, none=False):
        return (x is None and none) or (isinstance(x, (int, float)) and not isinstance(x, bool))

    def ok():
        if not isinstance(imp, dict) or not num(imp.get("tau", 0.0)):
            return False
        parts = [imp.get(k) for k in ("candidates", "probabilities", "metapath", "stage")]
        if not all(isinstance(p, list) and len(p) == len(parts[0]) for p in parts):
            return False
        for cands, probs, mp, st in zip(*parts):
            if not (isinstance(cands, list) and all(isinstance(c, str) for c in cands) and num(st, none=True)
                    and isinstance(probs, list) and isinstance(mp, list) and len(mp) == len(probs)
                    and all(num(m, none=True) for m in mp)
                    and all(isinstance(p, list) and len(p) == len(cands) and all(num(q) for q in p) for p in probs)):
                return False
        return True

    if not ok():
        raise VitslimError(f"{where}: not an importance record, expected per stage its candidates, probabilities, "
                           "metapath and stage importance as 'vitslim supernet train' writes them")
    return imp


def _show(args):
    if args.plot:
        check_writable(args.plot, "--plot")
        _pyplot()  # before printing anything: a missing matplotlib is said first
    imp = _load_importance(args.run)
    if args.json:
        print(json.dumps(imp, indent=1))
    else:
        print(f"{args.run}: step {imp.get('step')}, temperature {imp.get('tau', float('nan')):.3f}")
        print("importance of a MetaPath = P(non-identity) / P(identity); of a stage = the sum (EfficientFormer)")
        for i, (cands, probs, mp, st) in enumerate(zip(imp["candidates"], imp["probabilities"], imp["metapath"], imp["stage"])):
            st_s = "n/a (no identity candidate)" if st is None else f"{st:.3f}"
            print(f"stage {i}: importance {st_s}")
            for j, (p, s) in enumerate(zip(probs, mp)):
                cells = "  ".join(f"{_SHORT.get(c, c):>2} {q:.3f} {'#' * int(round(q * 20)):<20}" for c, q in zip(cands, p))
                s_s = "  -" if s is None else f"{s:6.3f}"
                print(f"  block {j}: {cells}  MP {s_s}")
    if args.plot:
        _plot(imp, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _pyplot():
    from supernet.arch import figures
    try:
        return figures()
    except ImportError:
        raise VitslimError("--plot: needs matplotlib (pip install matplotlib, or pip install 'vitslim[plot]')") from None


# one colour per MetaPath type in every stage (stages 0-1 have no meta3d candidate): supernet.arch.PLOT_COLOURS
_COLOURS = {"meta4d": "blue", "meta3d": "orange", "identity": "grey"}


def _plot(imp, path):
    """Stages and blocks numbered from 0, as in arch configs, search logs and reports."""
    from supernet.arch import PLOT_COLOURS, atomic_savefig
    plt = _pyplot()
    n = len(imp["stage"])
    fig, axes = plt.subplots(1, n + 1, figsize=(3.2 * (n + 1), 3.4))
    handles = {}
    for i in range(n):
        ax = axes[i]
        probs, cands = imp["probabilities"][i], imp["candidates"][i]
        bottom = [0.0] * len(probs)
        for k, c in enumerate(cands):
            vals = [p[k] for p in probs]
            bars = ax.bar(range(len(probs)), vals, bottom=bottom, label=_SHORT.get(c, c),
                          color=PLOT_COLOURS.get(_COLOURS.get(c)))
            handles.setdefault(c, bars)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"stage {i}")
        ax.set_xticks(range(len(probs)))
        ax.set_xlabel("block")
        ax.set_ylim(0, 1)
        if i == 0:
            ax.set_ylabel("probability, softmax(alpha)")
    # one legend for every stage, beside the panels (in each panel it covered the last block's bars)
    order = sorted(handles, key=lambda c: -list(_COLOURS).index(c) if c in _COLOURS else 1)  # as stacked, top first
    fig.legend([handles[c] for c in order], [f"{_SHORT.get(c, c)} = {c}" for c in order], fontsize=8,
               loc="upper left", bbox_to_anchor=(1.0, 0.9), borderaxespad=0.0)
    ax = axes[n]
    st = imp["stage"]
    known = [i for i, s in enumerate(st) if s is not None]
    ax.bar(known, [st[i] for i in known], color=PLOT_COLOURS["sky"])
    for i, s in enumerate(st):
        if s is None:  # no identity candidate: no importance, which is not an importance of 0
            ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_title("stage importance")
    ax.set_xlabel("stage")
    ax.set_ylabel("sum of P(not identity) / P(identity)")
    fig.suptitle(f"supernet architecture probabilities at step {imp.get('step')}, "
                 f"temperature {imp.get('tau', float('nan')):.3g}", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")


def _parse_widths(s):
    if s is None:
        return None
    try:
        return [int(v) for v in s.split(",")]
    except ValueError:
        raise VitslimError(f"--widths: got {s!r}, expected comma-separated integers, one per stage") from None


def _extract(args):
    import supernet.arch as A
    from supernet.checkpoint import save_checkpoint
    from supernet.train import load_supernet
    if args.widths is not None and args.choice not in ("best", "largest"):  # an arch or a JSON choice has its own
        raise VitslimError(f"--widths: only with --choice best or largest, got it with "
                           f"{'--arch ' + args.arch if args.arch else '--choice ' + args.choice} (whose widths are its own)")
    check_writable(args.out, "--out", is_dir=True)
    mine = [f for f in ("arch.yaml", "model.pt", "choice.json") if os.path.exists(os.path.join(args.out, f))]
    if mine and not args.overwrite:
        raise VitslimError(f"--out {args.out}: already holds {', '.join(mine)}, expected a new folder "
                           "(or pass --overwrite)")
    model, obj = load_supernet(args.run)
    sp = model.space
    if args.arch:
        choice = sp.choice_from_arch(A.load_arch(args.arch))
    elif args.choice in ("best", "largest"):
        widths = _parse_widths(args.widths)
        choice = model.best_choice(widths) if args.choice == "best" else \
            sp.check_choice({**sp.largest_choice(), **({"widths": widths} if widths else {})})
    else:
        try:
            choice = json.loads(args.choice)
        except json.JSONDecodeError:
            raise VitslimError(f"--choice: got {args.choice!r}, expected 'best', 'largest' or a JSON "
                               '{"widths": [...], "blocks": [[...], ...]}') from None
        choice = sp.check_choice(choice)
    net, arch = model.extract(choice)
    os.makedirs(args.out, exist_ok=True)
    A.save_arch(arch, os.path.join(args.out, "arch.yaml"))
    save_checkpoint(net, arch, os.path.join(args.out, "model.pt"),
                    extra={"source": "supernet", "run_step": int(obj["step"])})
    A.atomic_write_text(os.path.join(args.out, "choice.json"), json.dumps(choice) + "\n")
    print(f"extracted {json.dumps(choice)} -> {args.out}/arch.yaml, {args.out}/model.pt")
    return 0


register_command("supernet", _args, _run, "train a MetaPath supernet; show its importance; extract subnets", EXAMPLE)
