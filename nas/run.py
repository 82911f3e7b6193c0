"""A search run end to end: check the inputs (supernet run, latency table, target, output directory),
build the evaluation context, run a strategy, and write the run directory:

    arch.yaml          the found network's arch config
    model.pt           a vitslim checkpoint with the supernet's (inherited) weights, fine-tuned if asked
    report.json        target_ms, predicted_ms, params, macs, accuracy, latency_split, ... (written last)
    trajectory.jsonl   slimming's log (resume) / study.journal or study.db: the Optuna study (resume) /
                       random.jsonl: random search's evaluations (resume)
    verify.json        the found network measured end to end on the table's backend, per round (nas/verify.py)
    trajectory.png     slimming: predicted ms and accuracy per step / pareto.json + pareto.png: Optuna

report.json is the mark of a finished run: a directory holding one is refused unless overwrite;
a directory holding only a log is resumed from it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from typing import Mapping, Optional

import torch

from latency_tables import LatencyTable
from latency_tables.table import LatencyError, MissingEntriesError
from supernet.arch import PLOT_COLOURS, atomic_savefig, atomic_write_text, figures, save_arch
from supernet.checkpoint import save_checkpoint
from supernet.count import count
from supernet.data import build_datasets, make_loader
from supernet.errors import CheckpointError, check_device
from supernet.layers import no_weight_init
from supernet.runlock import LOCK_FILE, remove_stale_temps, run_lock
from supernet.train import TrainConfig, read_run
from supernet.supernet import MetaPathSupernet

from .evaluator import FunctionEvaluator, HeldoutEvaluator, stack_batches
from .finetune import finetune as finetune_model
from .optuna_search import SETUP_LOCK, OptunaSearch
from .random_search import RandomSearch, UniformShrink
from .slimming import LatencySlimming
from .strategy import SearchContext, SearchError, SearchResult, check_target, describe_blocks
from .verify import MODES as VERIFY_MODES, VERIFY_FILE, Verifier, unavailable_reason

RUN_FILES = ("arch.yaml", "model.pt", "report.json", "trajectory.jsonl", "trajectory.png", "random.jsonl",
             "study.journal", "study.db", "pareto.json", "pareto.png", "verify.json", ".workers", SETUP_LOCK)
STRATEGIES = {"slim": LatencySlimming, "optuna": OptunaSearch, "random": RandomSearch, "uniform": UniformShrink}


# ---------------------------------------------------------------- inputs
def load_supernet_run(run_dir: str):
    """(MetaPathSupernet in eval mode, TrainConfig, run checkpoint); refuses an unfinished run."""
    try:
        obj = read_run(run_dir)
    except CheckpointError as e:
        raise SearchError(f"--supernet: {e}") from None
    step, steps = int(obj.get("step", 0)), int(obj["config"]["steps"])
    if step < steps:
        raise SearchError(f"--supernet {run_dir}: the run is incomplete (step {step} of {steps}); finish it with "
                          f"`vitslim supernet train --out {run_dir} --resume`")
    cfg = TrainConfig.from_dict(obj["config"])
    with no_weight_init():  # every tensor comes from the run (strict): no random init drawn from the caller's RNG
        model = MetaPathSupernet(obj["config"]["space"])
    model.load_state_dict(obj["model"])
    return model.eval(), cfg, obj


def weights_digest(state_dict: Mapping) -> str:
    """sha256 of a network's tensors (names, dtypes, shapes, bytes): what a search's log is keyed on, so a resumed
    search refuses a supernet trained anew and resumes one whose folder moved."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def table_digest(table) -> str:
    """sha256 of what a search reads from a LatencyTable: its device, entries and overhead (not where or when it was
    saved)."""
    import hashlib
    d = table.to_dict()
    d = {k: d[k] for k in ("device", "overhead", "entries")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load_table(path: str, space, interpolate: bool = False):
    """(LatencyTable, CompiledTable for `space`); names what the table lacks for the space."""
    from latency_tables.table import resolve_table_path
    try:
        path = resolve_table_path(path)  # a file, or a shipped table's name (cpu_torch_tiny)
    except LatencyError as e:
        raise SearchError(f"--table {e} (or build one with `vitslim latency build --space SPACE.yaml --out T.yaml`)") \
            from None
    try:
        table = LatencyTable.load(path)
    except LatencyError as e:
        raise SearchError(f"--table {path}: {e}") from None
    try:
        return table, table.compile(space, interpolate=interpolate)
    except MissingEntriesError as e:
        raise SearchError(f"--table {path} does not cover the supernet's search space: {e}") from None
    except LatencyError as e:
        raise SearchError(f"--table {path}: {e}") from None


def _search_report(out: str):
    """The report.json in `out` if it is a search run's; raises if `out` holds something else's run (a
    supernet run's report.json or checkpoint), which --overwrite must not delete."""
    path = os.path.join(out, "report.json")
    if os.path.isfile(os.path.join(out, "checkpoint.pt")):
        raise SearchError(f"--out {out}: holds a supernet training run (checkpoint.pt), expected a new or search "
                          "run directory; choose another --out")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: '[[[[...' nested
        rep = None
    if not (isinstance(rep, dict) and "target_ms" in rep and "strategy" in rep and "choice" in rep):
        raise SearchError(f"--out {out}: holds a report.json that is not a search run's, expected a new or search "
                          "run directory; choose another --out")
    return rep


SEARCH_LOGS = {"trajectory.jsonl": "slim search (--strategy slim)",
               "random.jsonl": "random search (--strategy random)",
               "study.journal": "Optuna search (--strategy optuna --storage journal)",
               "study.db": "Optuna search (--strategy optuna --storage sqlite)"}


def prepare_out(out: str, overwrite: bool, extend=None, log: Optional[str] = None) -> str:
    """'fresh' or 'resume'; refuses a finished run unless overwrite (then clears vitslim's files) or
    `extend(report)` says the run continues (an Optuna study asked for more trials), and an interrupted
    run of another strategy or storage than `log` names (it would be left behind, silently)."""
    out = os.fspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SearchError(f"--out {out}: exists and is not a directory")
    rep = _search_report(out) if os.path.isdir(out) else None
    if rep is not None and not overwrite and extend is not None and extend(rep):
        other = [f for f in SEARCH_LOGS if f != log and os.path.exists(os.path.join(out, f))]
        if other:  # more trials of another storage would start a new study beside the finished one
            raise SearchError(f"--out {out}: its study is in {other[0]} ({SEARCH_LOGS[other[0]]}); re-run with that "
                              "storage to add trials to it, pass --overwrite to start this search instead, or choose "
                              "another --out")
        return "resume"
    if rep is not None:
        if not overwrite:
            raise SearchError(f"--out {out}: already holds a finished search run (report.json); "
                              "pass --overwrite to replace it, or choose another --out")
    elif not overwrite and os.path.isdir(out):
        other = [f for f in SEARCH_LOGS if f != log and os.path.exists(os.path.join(out, f))]
        if other:
            raise SearchError(f"--out {out}: holds an interrupted {SEARCH_LOGS[other[0]]} ({other[0]}); re-run it with "
                              "its options to resume it, pass --overwrite to start this search instead, or choose "
                              "another --out")
    if overwrite and os.path.isdir(out):
        for f in RUN_FILES:
            p = os.path.join(out, f)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    os.makedirs(out, exist_ok=True)
    remove_stale_temps(out)  # what a killed writer left before its rename: never a result
    return "resume" if any(os.path.exists(os.path.join(out, f)) for f in SEARCH_LOGS) else "fresh"


def make_evaluator(supernet, cfg: TrainConfig, eval_images: int = 512, bn_batches: int = 0, batch_size: int = 256,
                   seed: int = 0, device: str = "cpu"):
    """(HeldoutEvaluator on `eval_images` held-out images (`subset_indices`) of the supernet run's data, train set)."""
    if eval_images < 1:
        raise SearchError(f"--eval-images: got {eval_images}, expected an integer >= 1")
    if bn_batches < 0:
        raise SearchError(f"--bn-batches: got {bn_batches}, expected an integer >= 0")
    space = supernet.space
    train_set, held = build_datasets(cfg.data, space.input_size, space.num_classes, seed=cfg.seed)
    if len(held) == 0:
        raise SearchError("the supernet run's data has no held-out split to score candidates on "
                          "(set data.val_dir or data.val_fraction in its config)")
    heldout = stack_batches(held, eval_images, batch_size)
    calib = []
    if bn_batches:
        calib = list(make_loader(train_set, min(batch_size, cfg.batch_size), bn_batches, seed=seed + 1))
    return HeldoutEvaluator(supernet, heldout, calib, bn_batches=bn_batches, device=device), train_set


def make_strategy(name: str, run_args: Mapping, trials: int = 100, sampler: str = "nsga2",
                  storage: str = "journal", budget: int = 50, band: float = 0.0, criterion: str = "acc",
                  actions: str = "paper", refine: int = 0):
    if refine and name != "slim":
        raise SearchError(f"--refine {refine}: refinement follows slimming (--strategy slim), not {name}")
    # settings of one strategy given to another would be dropped without a word: the run would answer another question
    for flag, given, default, owner in (("--criterion", criterion, "acc", "slim"), ("--actions", actions, "paper", "slim"),
                                        ("--band", band, 0.0, "random")):
        if given != default and name != owner and name in STRATEGIES:
            raise SearchError(f"{flag} {given}: a setting of --strategy {owner}, not {name} (which would ignore it)")
    if name == "slim":
        return LatencySlimming(run_args=run_args, criterion=criterion, actions=actions, refine=refine)
    if name == "optuna":
        return OptunaSearch(n_trials=trials, sampler=sampler, storage=storage, run_args=run_args)
    if name == "random":
        return RandomSearch(budget=budget, band=band, run_args=run_args)
    if name == "uniform":
        return UniformShrink()
    raise SearchError(f"--strategy: got {name!r}, expected one of {', '.join(STRATEGIES)}")


def check_search_args(strategy: str = "slim", seed: int = 0, eval_images: int = 512, bn_batches: int = 0,
                      eval_batch_size: int = 256, finetune: int = 0, finetune_lr: float = 1e-3, trials: int = 100,
                      sampler: str = "nsga2", storage: str = "journal", budget: int = 50, device: str = "cpu",
                      verify: str = "auto", tolerance: float = 0.05, verify_seconds: float = 1.0,
                      verify_rounds: int = 4, band: float = 0.0, criterion: str = "acc", actions: str = "paper",
                      refine: int = 0, interpolate: bool = False) -> None:
    """Every search setting that needs neither the supernet nor the table, checked at once (a pipeline
    checks them before it trains anything); one-line SearchError naming the option."""
    def whole(name, v, lo):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise SearchError(f"--{name}: got {v!r}, expected an integer >= {lo}")

    def positive(name, v, what):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SearchError(f"--{name}: got {v!r}, expected {what} > 0")

    whole("seed", seed, 0)
    whole("eval-images", eval_images, 1)
    whole("bn-batches", bn_batches, 0)
    whole("eval-batch-size", eval_batch_size, 1)
    whole("finetune", finetune, 0)
    positive("finetune-lr", finetune_lr, "a learning rate")
    if verify not in VERIFY_MODES:
        raise SearchError(f"--verify: got {verify!r}, expected one of {', '.join(VERIFY_MODES)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise SearchError(f"--tolerance: got {tolerance!r}, expected a fraction in [0, 1) (0.05 = 5%)")
    positive("verify-seconds", verify_seconds, "seconds")
    whole("verify-rounds", verify_rounds, 1)
    if not isinstance(interpolate, bool):  # a pipeline's `interpolate: "no"` would interpolate
        raise SearchError(f"--interpolate: got {interpolate!r}, expected true or false")
    check_device(device)
    make_strategy(strategy, {}, trials=trials, sampler=sampler, storage=storage, budget=budget, band=band,
                  criterion=criterion, actions=actions, refine=refine)


# ---------------------------------------------------------------- the run
def _keeps_callers_rng(fn):
    """The run seeds torch's RNG (its `seed`); the caller's CPU RNG is as it was when it returns."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return fn(*args, **kwargs)
    return wrapper


@_keeps_callers_rng
def run_search(supernet: str, table: str, target_ms, out: str, strategy: str = "slim", seed: int = 0,
               eval_images: int = 512, bn_batches: int = 0, eval_batch_size: int = 256, finetune: int = 0,
               finetune_lr: float = 1e-3, trials: int = 100, sampler: str = "nsga2", storage: str = "journal",
               budget: int = 50, overwrite: bool = False, progress: bool = True, interpolate: bool = False,
               device: str = "cpu", verify: str = "auto", tolerance: float = 0.05, verify_seconds: float = 1.0,
               verify_rounds: int = 4, measure=None, band: float = 0.0, criterion: str = "acc",
               actions: str = "paper", refine: int = 0) -> dict:
    """Search `supernet` (a run directory) under `target_ms` on `table` and write the run directory
    `out`; returns the report.

    verify: "auto" measures the found network end to end on the table's backend when it runs here
    (same CPU model / GPU) and searches again under a tightened bound while it runs more than
    `tolerance` over the target (at most `verify_rounds` measurements, `verify_seconds` of timed runs
    each); "on" requires the measurement; "off" trusts the table. `measure(arch) -> {"ms": ...}`
    replaces the measurement (a remote device, tests)."""
    target = check_target(target_ms)
    check_search_args(strategy=strategy, seed=seed, eval_images=eval_images, bn_batches=bn_batches,
                      eval_batch_size=eval_batch_size, finetune=finetune, finetune_lr=finetune_lr, trials=trials,
                      sampler=sampler, storage=storage, budget=budget, device=device, verify=verify,
                      tolerance=tolerance, verify_seconds=verify_seconds, verify_rounds=verify_rounds, band=band,
                      criterion=criterion, actions=actions, refine=refine, interpolate=interpolate)
    model, cfg, obj = load_supernet_run(supernet)
    tab, compiled = load_table(table, model.space, interpolate)
    table = tab.path  # a shipped table given by name: its file, as the report records it
    verifier, skipped = None, None
    if verify != "off":
        reason = None if measure is not None else unavailable_reason(tab)
        if reason and verify == "on":
            raise SearchError(f"--verify on: cannot measure the found network here: {reason} "
                              "(use --verify auto or off, or run the search on the table's device)")
        skipped = reason
        if not reason:
            verifier = Verifier(tab, tolerance=tolerance, seconds=verify_seconds, max_rounds=verify_rounds,
                                measure=measure)
    existed = os.path.isdir(out)

    def more_trials(rep):  # a finished study continues when asked for more trials (same arguments: checked later)
        return (strategy == "optuna" and rep.get("strategy") == "optuna"
                and int((rep.get("search") or {}).get("trials", trials)) < trials)

    if os.path.isdir(out):
        _search_report(out)  # another kind of run there: refused before anything (a lock file) is written in it
    try:
        # --overwrite clears the directory: it needs it to itself (a live Optuna worker's study would be deleted
        # under it), then shares it with the workers that join its fresh study
        with _run_lock(out, shared=strategy == "optuna" and not overwrite, overwrite=overwrite) as share:
            prepare_out(out, overwrite, extend=more_trials, log=make_strategy(strategy, {}, storage=storage).log_file)
            if strategy == "optuna" and overwrite:
                share()
            if verifier is not None:
                verifier.attach(os.path.join(out, VERIFY_FILE))
            return _run(model, cfg, obj, tab, compiled, target, out, strategy, seed, eval_images, bn_batches,
                        eval_batch_size, finetune, finetune_lr, trials, sampler, storage, budget, progress, table,
                        supernet, device, verifier, skipped, band, criterion, actions, refine)
    except BaseException:
        if not existed and os.path.isdir(out) and not set(os.listdir(out)) - {LOCK_FILE, ".workers", SETUP_LOCK}:
            shutil.rmtree(out, ignore_errors=True)  # a search refused before it started leaves nothing behind
        raise


def _run_lock(out: str, shared: bool = False, overwrite: bool = False):
    """Hold OUT/.lock while the search runs (supernet.runlock): a second search started on the same
    directory is refused; Optuna workers share it (they share the study by design), but not with a run
    started with --overwrite, which clears the directory first."""
    hint = (" (--overwrite needs it to itself: it would delete the files of the run in progress)"
            if overwrite else
            " (Optuna workers can share a directory only with other Optuna workers of the same study)" if shared
            else "")
    return run_lock(out, shared=shared, error=SearchError, what="search", hint=hint)


def _run(model, cfg, obj, tab, compiled, target, out, strategy, seed, eval_images, bn_batches, eval_batch_size,
         finetune, finetune_lr, trials, sampler, storage, budget, progress, table, supernet, device,
         verifier=None, skipped=None, band=0.0, criterion="acc", actions="paper", refine=0) -> dict:
    torch.manual_seed(seed)
    t_setup = time.perf_counter()
    evaluator, train_set = make_evaluator(model, cfg, eval_images, bn_batches, eval_batch_size, seed, device)
    run_args = {"supernet": os.path.abspath(supernet), "supernet_step": int(obj["step"]),
                "supernet_digest": weights_digest(model.state_dict()), "table": os.path.abspath(table),
                "table_digest": table_digest(tab), "eval_images": evaluator.n_images, "bn_batches": evaluator.bn_batches}
    strat = make_strategy(strategy, run_args, trials=trials, sampler=sampler, storage=storage, budget=budget,
                          band=band, criterion=criterion, actions=actions, refine=refine)
    ctx = SearchContext(space=model.space, supernet=model, table=tab, compiled=compiled, evaluator=evaluator,
                        target_ms=target, seed=seed, progress=progress, log_dir=out)
    setup_s = time.perf_counter() - t_setup
    t0 = time.perf_counter()
    result = strat.search(ctx)
    search_s = time.perf_counter() - t0
    verification = {"skipped": skipped} if skipped else None
    if verifier is not None:
        t1 = time.perf_counter()
        result, verification = verify_result(strat, ctx, result, verifier)
        verification["seconds"] = time.perf_counter() - t1
    report = write_run(out, ctx, result, run_args, search_s=search_s, setup_s=setup_s, finetune_steps=finetune,
                       finetune_lr=finetune_lr, train_set=train_set, batch_size=cfg.batch_size,
                       label_smoothing=cfg.label_smoothing, progress=progress, device=device,
                       verification=verification)
    return report


def verify_result(strat, ctx: SearchContext, result: SearchResult, verifier: Verifier):
    """Measure the found network; while it runs over target * (1 + tolerance), search again under a
    tightened bound (see nas/verify.py). Returns (the result to report, the verification record)."""
    target = ctx.target_ms
    note = None
    for n in range(verifier.max_rounds):
        arch = ctx.space.to_arch(ctx.space.check_choice(result.choice))
        rec = verifier.check(n, result.choice, arch, result.predicted_ms, ctx.bound_ms, target)
        used = n + 1
        if rec["met"] or n == verifier.max_rounds - 1:
            break
        bound = Verifier.next_bound(rec, ctx.bound_ms, target)
        if ctx.progress:
            print(f"verify: measured {rec['ms']:.4g} ms, {rec['over_target']:+.1%} over the target {target:g} ms "
                  f"(predicted {rec['predicted_ms']:.4g} ms); searching again under {bound:.4g} ms predicted")
        old = ctx.limit_ms
        ctx.limit_ms = bound
        try:
            result = strat.search(ctx)
        except SearchError as e:
            ctx.limit_ms = old
            note = f"could not tighten further: {e}"
            break
    verifier.keep(used)  # the rounds of this search only (a resumed run may stop sooner): the last measured `result`
    last = verifier.rounds[-1]
    met = bool(last["met"])
    if not met and note is None:
        note = (f"still {last['over_target']:+.1%} over the target after {len(verifier.rounds)} measurements; "
                "rebuild the table with more time per network, or raise --verify-rounds")
    rep = {"backend": dict(ctx.table.device).get("backend"), "tolerance": verifier.tolerance,
         "seconds_per_measurement": verifier.seconds, "bound_ms": ctx.bound_ms, "measured_ms": last["ms"],
         "raw_ms": last.get("raw_ms", last["ms"]), "drift_factor": last.get("drift_factor", 1.0),
         "over_target": last["over_target"], "met": met,
         "rounds": [{k: x for k, x in r.items() if k != "key"} for r in verifier.rounds]}
    if note:
        rep["note"] = note
    return result, rep


def write_run(out: str, ctx: SearchContext, result: SearchResult, run_args: Mapping, search_s: float = 0.0,
              setup_s: float = 0.0, finetune_steps: int = 0, finetune_lr: float = 1e-3, train_set=None,
              batch_size: int = 64, label_smoothing: float = 0.1, progress: bool = False, device: str = "cpu",
              verification: Optional[Mapping] = None) -> dict:
    os.makedirs(out, exist_ok=True)
    choice = ctx.space.check_choice(result.choice)
    # your own evaluator function scored choices, not models: the network is the supernet's extraction (the
    # inherited weights it was given), and what only a HeldoutEvaluator knows (images, BatchNorm batches, the
    # fine-tuned model's top-1) is null in the report, not made up
    own = isinstance(ctx.evaluator, FunctionEvaluator)
    if own:
        model, arch = ctx.supernet.extract(choice)
        model = model.eval()
    else:
        model, arch = ctx.evaluator.model(choice)
    ft = None
    if finetune_steps > 0:
        before = None if own else ctx.evaluator.score_model(model)
        t0 = time.perf_counter()
        finetune_model(model, train_set, finetune_steps, batch_size=batch_size, lr=finetune_lr,
                       label_smoothing=label_smoothing, seed=ctx.seed, progress=progress, device=device)
        after = None if own else ctx.evaluator.score_model(model)
        ft = {"steps": finetune_steps, "lr": finetune_lr, "acc_before": before and before["acc"],
              "acc_after": after and after["acc"], "loss_before": before and before["loss"],
              "loss_after": after and after["loss"], "seconds": time.perf_counter() - t0}
    save_arch(arch, os.path.join(out, "arch.yaml"))
    save_checkpoint(model.cpu(), arch, os.path.join(out, "model.pt"),
                    extra={"search": {"strategy": result.strategy, "target_ms": ctx.target_ms}})
    split = ctx.table.predict_stages(arch, interpolate=bool(ctx.compiled.estimated))
    c = count(arch)
    ev_s = ctx.evaluator.seconds
    report = {
        "target_ms": ctx.target_ms, "predicted_ms": float(result.predicted_ms), "bound_ms": ctx.bound_ms,
        "measured_ms": (verification or {}).get("measured_ms"), "params": c["params"], "macs": c["macs"],
        "accuracy": result.acc, "heldout_loss": result.loss,
        "accuracy_note": ("your own evaluator's 'acc' (and heldout_loss its 'loss') with the supernet's inherited "
                          "weights, not vitslim's held-out top-1"
                          + ("; model.pt is fine-tuned, not scored by your evaluator (it scores choices): "
                             "model_accuracy is null" if ft else "; model.pt holds these weights")) if own else
                         ("top-1 on the held-out images with the supernet's inherited weights"
                          + (" (BatchNorm recalibrated)" if ctx.evaluator.bn_batches else "")
                          + ("; model.pt is fine-tuned: its top-1 on the same images is model_accuracy" if ft else
                             "; model.pt holds these weights")),
        "model_accuracy": ft["acc_after"] if ft else result.acc,  # of the weights saved in model.pt
        "latency_split": {k: v for k, v in split.items() if k != "estimated"},
        "latency_estimated_entries": split.get("estimated", []),
        "strategy": result.strategy, "seed": ctx.seed,
        "choice": choice, "blocks": describe_blocks(choice),
        "supernet": run_args.get("supernet"), "supernet_step": run_args.get("supernet_step"),
        "table": run_args.get("table"), "device": dict(ctx.table.device),
        "evaluation": {"images": None if own else ctx.evaluator.n_images,
                       "bn_batches": None if own else ctx.evaluator.bn_batches,
                       "evaluator": "own function" if own else "held-out top-1",
                       "torch_threads": torch.get_num_threads(),  # float sums (and fine-tuning) depend on it
                       # over the whole run (a resumed run counts what its log held), and in this process
                       "evaluations": ctx.evaluator.evaluations + ctx.evaluator.primed,
                       "evaluated_this_run": ctx.evaluator.evaluations, "cached": len(ctx.evaluator.cache)},
        "search": {"seconds": search_s, "setup_seconds": setup_s, "eval_seconds": ev_s,
                   "lookup_seconds": ctx.lookup_seconds,
                   # of this process's search: none when every evaluation came from the log of an interrupted run
                   "overhead_fraction": ((max(0.0, search_s - ev_s) / search_s) if search_s > 0 else 0.0)
                   if ctx.evaluator.evaluations else None,
                   **{k: v for k, v in result.extra.items() if k not in ("trial_rows", "trajectory")}},
        "finetune": ft,
        "verification": dict(verification) if verification else None,
        "files": ["arch.yaml", "model.pt", "report.json"] + (["verify.json"] if verification and "rounds" in verification
                                                                else [])
                 + [f for f in ("random.jsonl", "study.journal", "study.db") if os.path.isfile(os.path.join(out, f))],
    }
    if "trajectory" in result.extra:
        report["trajectory"] = result.extra["trajectory"]
        report["files"].append("trajectory.jsonl")
        if plot_trajectory(result.extra["trajectory"], ctx.target_ms, os.path.join(out, "trajectory.png"),
                           refined=result.extra.get("refined"),
                           chosen=(result.predicted_ms, result.acc, result.extra.get("picked", "end")),
                           bound_ms=ctx.bound_ms, width_step=ctx.space.width_step, measured_ms=report["measured_ms"],
                           own_metric=own):
            report["files"].append("trajectory.png")
    if "trial_rows" in result.extra:
        rows = result.extra["trial_rows"]
        front = set(result.extra["pareto"])
        pj = {"target_ms": ctx.target_ms, "bound_ms": ctx.bound_ms, "best_trial": result.extra["best_trial"],
              "pareto": [r for r in rows if r["number"] in front],
              "trials": [{k: r[k] for k in ("number", "acc", "ms", "loss", "feasible")} for r in rows]}
        atomic_write_text(os.path.join(out, "pareto.json"), json.dumps(pj, indent=1) + "\n")
        report["files"].append("pareto.json")
        if plot_pareto(rows, front, ctx.target_ms, result.extra["best_trial"], os.path.join(out, "pareto.png"),
                       bound_ms=ctx.bound_ms, measured_ms=report["measured_ms"], own_metric=own):
            report["files"].append("pareto.png")
    atomic_write_text(os.path.join(out, "report.json"), json.dumps(report, indent=1) + "\n")
    return report


# ---------------------------------------------------------------- plots (matplotlib optional)
def _plt():
    try:
        return figures()
    except Exception:  # noqa: BLE001 - plots are a convenience
        return None


def _save(fig, plt, path):
    atomic_savefig(fig, path, dpi=110, bbox_inches="tight")


ACC_LABEL = "held-out top-1 accuracy (fraction; supernet weights)"
OWN_ACC_LABEL = "your evaluator's acc (supernet weights)"


def _limits(ax, target_ms, bound_ms):
    """The target (and the tighter bound verification searched under, when it differs) as vertical lines."""
    ax.axvline(target_ms, color=PLOT_COLOURS["black"], ls="--", lw=1.2, label=f"target {target_ms:g} ms")
    if bound_ms is not None and not math.isclose(bound_ms, target_ms, rel_tol=1e-9):
        ax.axvline(bound_ms, color=PLOT_COLOURS["vermillion"], ls=":", lw=1.5,
                   label=f"search bound {bound_ms:.4g} ms\n(tightened after measuring)")


def _measured(ax, predicted_ms, acc, measured_ms, target_ms):
    """The returned network as measured end to end by verification (x: its measured ms, same accuracy), joined to
    where the table put it: how far the prediction was off, against the target."""
    if measured_ms is None:
        return
    ax.plot([predicted_ms, measured_ms], [acc, acc], ":", color=PLOT_COLOURS["black"], lw=0.8, zorder=5)
    ax.scatter([measured_ms], [acc], marker="D", s=150, facecolors="none", edgecolors=PLOT_COLOURS["black"],
               linewidths=1.2, zorder=7,
               label=f"returned, measured: {measured_ms:.4g} ms ({measured_ms / target_ms - 1:+.1%} vs target)")


def _metric(own_metric: bool) -> str:
    """What the plots' y axis is, in a title: own_metric for a search scored by your own evaluator function."""
    return "your evaluator's acc" if own_metric else "held-out accuracy"


def _finish(ax, title, measured=False, own_metric=False):
    ax.set_xlabel("predicted latency (ms)" + ("; the open diamond: measured" if measured else ""))
    ax.set_ylabel(OWN_ACC_LABEL if own_metric else ACC_LABEL)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # never over the data


def plot_trajectory(traj, target_ms, path, refined=None, chosen=None, bound_ms=None, width_step=16,
                    measured_ms=None, own_metric=False) -> bool:
    """The slimming path (predicted ms, held-out accuracy per step) from its start network, refinement's
    evaluations and the network returned (`chosen`: (ms, acc, where it was picked)), which need not be the
    path's end, and where verification measured it (`measured_ms`); the target, and `bound_ms` when verification
    tightened the search below it."""
    plt = _plt()
    if plt is None or not traj:
        return False
    c = PLOT_COLOURS
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ms = [t["predicted_ms"] for t in traj]
    acc = [t["acc"] for t in traj]
    ax.plot(ms, acc, "o-", ms=3.5, color=c["blue"], label=f"slimming path ({len(traj) - 1} steps)", zorder=3)
    ax.scatter([ms[0]], [acc[0]], marker="s", s=55, c=c["blue"], edgecolors=c["black"], zorder=5,
               label=f"start: {ms[0]:.4g} ms, {acc[0]:.3f}")
    if refined:
        ax.scatter([r["predicted_ms"] for r in refined], [r["acc"] for r in refined], s=12, c=c["green"],
                   label=f"refinement ({len(refined)})", zorder=4)
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=160, c=c["vermillion"], edgecolors=c["black"],
                   linewidths=0.5, zorder=6, label=f"returned ({chosen[2]}): {chosen[0]:.4g} ms, {chosen[1]:.3f}")
        _measured(ax, chosen[0], chosen[1], measured_ms, target_ms)
    for t in traj[1:]:
        ax.annotate({"to_identity": "id", "meta3d_to_meta4d": "4D", "shrink": "w"}.get(t["action"], "?"),
                    (t["predicted_ms"], t["acc"]), fontsize=7, color="0.25", xytext=(2, 3), textcoords="offset points")
    _limits(ax, target_ms, bound_ms)
    _finish(ax, f"latency-driven slimming: {_metric(own_metric)} against predicted latency\n"
                f"step labels: id block to identity, 4D Meta3D to Meta4D, w stage width -{width_step} channels",
            measured=measured_ms is not None and chosen is not None, own_metric=own_metric)
    _save(fig, plt, path)
    return True


def plot_pareto(rows, front, target_ms, best, path, bound_ms=None, measured_ms=None, own_metric=False) -> bool:
    """Optuna's trials (predicted ms, held-out accuracy), the Pareto front of those within the bound and the
    chosen one (and where verification measured it: `measured_ms`); the target, and `bound_ms` when verification
    tightened the search below it."""
    plt = _plt()
    if plt is None or not rows:
        return False
    c = PLOT_COLOURS
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ok = [r for r in rows if r.get("feasible", True)]
    over = [r for r in rows if not r.get("feasible", True)]
    ax.scatter([r["ms"] for r in ok], [r["acc"] for r in ok], s=10, c="0.4", label=f"trials within the bound ({len(ok)})")
    if over:
        ax.scatter([r["ms"] for r in over], [r["acc"] for r in over], s=10, c="0.75",
                   label=f"trials over the bound ({len(over)})")
    pf = sorted((r for r in rows if r["number"] in front), key=lambda r: r["ms"])
    ax.plot([r["ms"] for r in pf], [r["acc"] for r in pf], "o-", ms=4, color=c["blue"],
            label="Pareto front (within the bound)", zorder=4)
    b = next(r for r in rows if r["number"] == best)
    ax.scatter([b["ms"]], [b["acc"]], marker="*", s=160, c=c["vermillion"], edgecolors=c["black"], linewidths=0.5,
               zorder=5, label=f"chosen: trial {best}, {b['ms']:.4g} ms, {b['acc']:.3f}")
    _measured(ax, b["ms"], b["acc"], measured_ms, target_ms)
    _limits(ax, target_ms, bound_ms)
    _finish(ax, f"Optuna search ({len(rows)} trials): {_metric(own_metric)} against predicted latency",
            measured=measured_ms is not None, own_metric=own_metric)
    _save(fig, plt, path)
    return True
