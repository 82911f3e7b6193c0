"""`vitslim prune`: Taylor structured pruning of a DeiT or Swin checkpoint to a params, MACs or
latency target; writes a run directory (arch.yaml, model.pt, report.json, reallocation.png)."""
import argparse
import json
import os

from .cli import STATE_DICT_ARCH_HELP, add_threads_arg, apply_threads, finite_float, register_command


def _args(p):
    p.add_argument("--checkpoint", required=True, help="DeiT or Swin checkpoint (official, timm, Hugging Face or vitslim)")
    p.add_argument("--arch", default=None, metavar="ARCH", help=STATE_DICT_ARCH_HELP)
    p.add_argument("--data", required=True,
                   help="calibration / fine-tuning images: 'synthetic', an ImageFolder directory root/<class>/<images>, "
                        "or a .pt file with an image tensor (N, C, H, W) or {images, labels}")
    p.add_argument("--target", required=True, action="append",
                   help="params=F or macs=F (fraction kept, in (0, 1]), latency=MS or latency=Fx (milliseconds, or "
                        "a fraction of the unpruned network's predicted latency, with --table); several at once, all "
                        "met: macs=0.5,latency=0.5x (or --target repeated)")
    p.add_argument("--table", default=None, help="latency table .yaml of the device, or a shipped table's name (for latency targets; with a "
                                                 "MACs target see --proportional)")
    p.add_argument("--proportional", action=argparse.BooleanOptionalAction, default=None,
                   help="with --table, a MACs target F also holds the predicted latency to F x the unpruned "
                        "(macs=F becomes macs=F,latency=Fx: latency falls at least in proportion to the MACs asked "
                        "for); default: on with --table and a MACs target without a latency one")
    p.add_argument("--criterion", default="taylor", choices=["taylor", "magnitude"],
                   help="unit importance (default taylor: first-order, gate form)")
    p.add_argument("--selection", default="auto", choices=["knapsack", "ratio", "auto"],
                   help="global choice of units: knapsack under the budget (HALP), ranking by importance per "
                        "unit of cost, or auto: both, keeping the one with the lower held-out loss (default)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches for scoring (default 8)")
    p.add_argument("--eval-batches", type=int, default=4,
                   help="held-out batches that --selection auto compares plans on (default 4; taken out of an "
                        "ImageFolder or .pt when it holds at least twice as many images)")
    p.add_argument("--labels", default="auto", choices=["auto", "data", "model"],
                   help="what the loss compares to: the data's labels (data), the unpruned model's own top-1 (model: "
                        "the model's task is not the data's), or auto: the data's labels when they are the model's "
                        "classes (an ImageFolder with as many classes; a .pt whose labels are all class indices "
                        "of the model; --data synthetic: a model trained on vitslim's synthetic task)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--iterative-steps", type=int, default=1, help="prune in K steps (default 1: one-shot)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="fine-tuning batches in all, spread over the steps (default 0)")
    p.add_argument("--lr", type=finite_float, default=None, help="fine-tuning learning rate (AdamW, cosine; default 1e-4)")
    p.add_argument("--kd", action="store_true", help="fine-tune with knowledge distillation from the unpruned model")
    p.add_argument("--min-keep", default="0.1", metavar="F|KIND=F,...",
                   help="per-block floor on unit moves: keep at least this fraction of each unit kind (default 0.1; "
                        "0 lets narrowing empty a block's attention or MLP), or per kind, e.g. heads=1,qk=0.25 (kinds "
                        "heads, qk, v, ffn, embed; those not named 0.1). Depth moves (--depth, on by default for "
                        "latency targets) remove whole branches regardless; --min-keep 1 with --depth: depth only")
    p.add_argument("--mean", default=None, metavar="M,M,M",
                   help="an ImageFolder's normalisation mean, one per channel (default ImageNet's; 0.5,0.5,0.5 for "
                        "timm's augreg and CLIP ViTs)")
    p.add_argument("--std", default=None, metavar="S,S,S", help="an ImageFolder's normalisation std (default ImageNet's)")
    p.add_argument("--crop-pct", type=finite_float, default=None, metavar="F",
                   help="an ImageFolder's eval crop: resize to size / F, centre crop (default 0.875, DeiT's; 1.0 for "
                        "the 384 models)")
    p.add_argument("--keep", default="", metavar="BLOCKS",
                   help="blocks left whole (Torch-Pruning's ignored_layers), comma-separated: flat indices (negative "
                        "from the end: 0,-1 keeps the first and last) or stages[S].blocks[B]; their stage's residual "
                        "width too with --prune-embed")
    p.add_argument("--round-to", type=int, default=1, metavar="N",
                   help="keep every channel width (Q/K and V per head, FFN hidden, and the residual width with "
                        "--prune-embed) a multiple of N, or as it was (default 1: any width; 8 or 16 suit GPU and "
                        "Neural Engine kernels); the floor rounds up to it")
    p.add_argument("--depth", action=argparse.BooleanOptionalAction, default=None,
                   help="depth moves: a block's attention or FFN branch may go whole (its LayerNorm, residual add "
                        "and fixed work with it), competing with unit moves; default: on for latency targets, off "
                        "for params / MACs targets")
    p.add_argument("--momentum", type=finite_float, default=None,
                   help="score smoothing across iterative steps (default 0.9; one-shot runs score once)")
    p.add_argument("--prune-embed", action="store_true",
                   help="also prune each stage's embedding (residual) width; unlike the other units this is not "
                        "exactly gating (LayerNorms then normalise over fewer channels): fine-tune after it")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    p.add_argument("--json", action="store_true", help="print report.json's summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _state(args, cfg):
    """(path, key) of the resume state of a prune: beside --out (the run folder itself is written
    only at the end), keyed by everything the result depends on."""
    import dataclasses
    out = os.path.abspath(args.out)
    path = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.resume.pt")
    if cfg is None:  # the path alone
        return path, None

    def ident(p):
        if not p:
            return None
        st = os.stat(p)
        return [os.path.abspath(p), st.st_size, st.st_mtime_ns]

    conf = {k: (str(v) if k == "target" else v) for k, v in dataclasses.asdict(cfg).items()}
    key = {"config": conf, "checkpoint": ident(args.checkpoint), "table": ident(args.table),
           **({"arch": ident(args.arch) if os.path.isfile(args.arch) else args.arch} if args.arch else {}),
           "data": os.path.abspath(args.data) if os.path.exists(args.data) else args.data,
           "batch_size": args.batch_size, "labels": args.labels, "seed": args.seed,
           **({"preprocessing": [args.mean, args.std, args.crop_pct]}
              if (args.mean, args.std, args.crop_pct) != (None, None, None) else {})}
    return path, key


def _run(args):
    from pruning.budget import Target, parse_targets
    from pruning.report import check_out_dir, check_out_names, prune_lock
    from pruning.units import PruneError

    apply_threads(args)
    if args.table:  # a shipped table's name (as --help says) becomes its file: the resume key stats it, the report records it
        from latency_tables.table import resolve_table_path
        args.table = resolve_table_path(args.table)
    targets = parse_targets(",".join(args.target))
    macs = next((t for t in targets if t.kind == "macs"), None)
    if args.proportional and (macs is None or not args.table):
        raise PruneError("--proportional: needs a MACs target (macs=F) and --table (a latency table of the device)")
    implied = None
    if args.proportional is not False and macs is not None and args.table \
            and not any(t.kind == "latency" for t in targets):
        implied = Target("latency", macs.value, relative=True)
        targets.append(implied)
    target = ",".join(map(str, targets))
    # settings of a stage that will not run are refused, as --kd without fine-tuning is, not silently dropped
    if args.lr is not None and args.finetune_steps == 0:
        raise PruneError("--lr: the fine-tuning learning rate, expected --finetune-steps N > 0 with it")
    if args.momentum is not None and args.iterative_steps == 1:
        raise PruneError("--momentum: smooths scores across iterative steps, expected --iterative-steps K > 1 with it")
    check_out_dir(args.out, args.overwrite)
    check_out_names(args.out, _state(args, None)[0])
    with prune_lock(args.out):
        return _locked(args, targets, macs, implied, target)


def _locked(args, targets, macs, implied, target):
    """The rest of the run, under the lock of its --out (pruning.report.prune_lock)."""
    import torch
    from .api import load_checkpoint
    from pruning.pruner import DataSource, PruneConfig, prune
    from pruning.report import write_run
    from pruning.units import PruneError, check_family

    table = None
    for t in targets:
        if t.kind == "latency" and not args.table:
            raise PruneError(f"--target {t}: a latency target needs --table (a latency table of the device)")
    if args.table:
        from latency_tables.table import LatencyTable
        table = LatencyTable.load(args.table)
    model, arch = load_checkpoint(args.checkpoint, arch=args.arch)
    check_family(arch, depth=bool(args.depth))
    args.lr = PruneConfig.lr if args.lr is None else args.lr  # left out (None): the config's defaults
    args.momentum = PruneConfig.momentum if args.momentum is None else args.momentum
    cfg = PruneConfig(target=targets, criterion=args.criterion, selection=args.selection,
                      iterative_steps=args.iterative_steps, finetune_steps=args.finetune_steps, kd=args.kd,
                      lr=args.lr, min_keep=args.min_keep, keep=args.keep, round_to=args.round_to, prune_embed=args.prune_embed, depth=args.depth,
                      momentum=args.momentum, calib_batches=args.calib_batches, eval_batches=args.eval_batches,
                      seed=args.seed).check()
    data = DataSource(args.data, arch, batch_size=args.batch_size, seed=args.seed, labels=args.labels,
                      mean=args.mean, std=args.std, crop_pct=args.crop_pct,
                      heldout_images=cfg.eval_batches * args.batch_size)
    state_path, state_key = _state(args, cfg)
    if args.overwrite and os.path.exists(state_path):
        os.remove(state_path)
    try:
        res = prune(model, arch, cfg, data=data, table=table, progress=not args.quiet, state_path=state_path,
                    state_key=state_key)
    except PruneError as e:
        if implied is not None and str(implied) in str(e):
            raise PruneError(f"{e} [latency={implied.value:g}x was added to macs={macs.value:g} because --table was "
                             "given (--proportional, the default); --no-proportional prunes to the MACs alone]") from None
        raise
    rep = res.report
    rep.update({"checkpoint": os.path.abspath(args.checkpoint), "family": arch["family"],
                "data": os.path.abspath(args.data) if os.path.exists(args.data) else args.data,
                "torch_threads": torch.get_num_threads(),
                "table": os.path.abspath(args.table) if args.table else None, "seed": args.seed,
                "batch_size": args.batch_size, "labels": "data" if data.labels_valid else "model",
                "heldout_shared": data.heldout_shared, "preprocessing": data.preprocessing(), "proportional_target": str(implied) if implied else None})
    # batches larger than the data repeat images: say how many distinct ones the figures rest on
    rep["calib_distinct_images"] = min(rep["calib_images"], data.calib_size)
    if "heldout_before" in rep:
        rep["heldout_distinct_images"] = min(rep["heldout_before"]["images"], data.heldout_size)
    if not args.overwrite and os.path.lexists(args.out):
        raise PruneError(f"--out {args.out}: appeared while this prune ran (another program wrote it), expected a new "
                         "directory; " + ("move it away and re-run (this prune resumes from its saved state), or pass "
                                          "--overwrite to replace it" if os.path.exists(state_path) else
                                          "choose another --out, or pass --overwrite to replace it"))
    paths = write_run(args.out, res.model, res.arch, rep, overwrite=args.overwrite)
    if os.path.exists(state_path):  # the run is written: its resume state has served
        os.remove(state_path)
    if args.json:
        keys = ("target", "params_before", "params_after", "macs_before", "macs_after", "cost_before", "cost_after")
        print(json.dumps({k: rep[k] for k in keys} | {"out": os.path.abspath(args.out)}))
        return 0
    print(f"pruned {args.checkpoint} to {target}: params {rep['params_before']:,} -> {rep['params_after']:,} "
          f"({rep['params_kept']:.2f}), MACs {rep['macs_before']:,} -> {rep['macs_after']:,} ({rep['macs_kept']:.2f})")
    if "latency_after_ms" in rep:
        print(f"predicted latency {rep['latency_before_ms']:.3f} -> {rep['latency_after_ms']:.3f} ms "
              f"({rep['latency_kept']:.2f})")
        if not any(t.kind == "latency" for t in targets) and rep["latency_kept"] > rep["macs_kept"] + 0.01:
            print(f"note: latency keeps {rep['latency_kept']:.2f} for {rep['macs_kept']:.2f} of the MACs (work MACs do "
                  f"not count: norms, softmax, residual adds); to hold latency in proportion add "
                  f"latency={rep['macs_kept']:.2f}x to the target" + (" (or drop --no-proportional)" if macs else ""))
    if rep.get("latency_grid_blocks") is not None and rep["latency_grid_blocks"] < rep["blocks_total"]:
        from latency_tables.grid import grid_remedy
        print(f"note: {rep['blocks_total'] - rep['latency_grid_blocks']} of {rep['blocks_total']} blocks have no pruning "
              f"grid in {args.table}: their pruned widths were estimated by interpolating in MACs "
              f"({grid_remedy(table, args.checkpoint, args.table)})")
    if args.labels == "auto" and not data.labels_valid:  # not only in report.json
        print(f"note: --data {args.data} ({data.describe_classes()}) does not match the model's {arch['num_classes']} "
              "classes: scored and evaluated against the unpruned model's own top-1 (as --labels model)")
    if "heldout_after" in rep:
        print(f"held-out top-1 {rep['heldout_before']['top1']:.3f} -> {rep['heldout_after']['top1']:.3f}"
              f" (selection: {rep['steps'][-1]['selection']})")
    if args.prune_embed:
        print("embedding widths: " + ", ".join(f"stage {s['stage']} {s['width']}/{s['width_before']}" for s in rep["stages"]))
    print(f"{'block':<8} {'heads':>9} {'qk_dim':>9} {'v_dim':>9} {'ffn':>11}")
    for b in rep["blocks"]:
        print(f"{b['stage']}.{b['block']:<6} {b['heads']:>4}/{b['heads_before']:<4} {b['qk_dim']:>4}/{b['qk_dim_before']:<4} "
              f"{b['v_dim']:>4}/{b['v_dim_before']:<4} {b['ffn_hidden']:>5}/{b['ffn_hidden_before']:<5}")
    if rep["emptied"]:
        print("removed entirely: " + ", ".join(rep["emptied"]))
    if rep.get("removed_blocks"):
        print(f"blocks removed (both branches, depth {'on' if rep['depth'] else 'off'}): " + ", ".join(rep["removed_blocks"]))
    print(f"wrote {args.out}/ (arch.yaml, model.pt, report.json" + (", reallocation.png)" if paths["plot"] else
                                                                      "; no plot: matplotlib is not installed)"))
    return 0


register_command("prune", _args, _run,
                 "Taylor structured pruning of a DeiT or Swin checkpoint (Q/K, V, heads and FFN widths each their own)",
                 "vitslim prune --checkpoint deit_tiny.pth --data synthetic --target macs=0.5 --out run/deit_half\n"
                 "vitslim prune --checkpoint deit_tiny.pth --data synthetic --target macs=0.5,latency=0.5x --table cpu.yaml "
                 "--out run/deit_half_fast\n"
                 "vitslim prune --checkpoint swin.pt --data imagenet/val --target latency=4.0 --table cpu.yaml "
                 "--iterative-steps 4 --finetune-steps 400 --kd --out run/swin_4ms")
