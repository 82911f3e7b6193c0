"""The pruning driver: calibration data, one-shot or iterative pruning (score -> select -> surgery
-> optional fine-tuning, with knowledge distillation from the unpruned model as an option).

The driver decides and applies; it computes gradients only through an `Importance` (scoring) and
in fine-tuning, never inside surgery.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from supernet.layers import no_weight_init
from supernet.registry import get_family

from .budget import (ArchCost, CostModel, Floor, analytic_count, min_keep_str, normalize_min_keep, LatencyCost, MacsCost, Network, ParamsCost, Target,
                     floor_cost, floor_cost_depth, floor_cost_embed, parse_targets, select_constrained, select_knapsack,
                     select_ratio)
from .importance import Importance, Scores, default_loss, get_importance
from .surgery import apply_plan
from .units import PruneError, block_infos, check_family, pruned_arch

Batch = Tuple[torch.Tensor, Optional[torch.Tensor]]


# ---------------------------------------------------------------- calibration data
def check_images(x: torch.Tensor, arch: Mapping, what: str = "calibration data") -> None:
    want = (arch["in_chans"], arch["input_size"], arch["input_size"])
    if x.dim() != 4 or tuple(x.shape[1:]) != want:
        got = "x".join(map(str, x.shape[1:])) if x.dim() == 4 else f"a tensor of shape {tuple(x.shape)}"
        raise PruneError(f"{what}: images are {got} (channels x height x width), expected "
                         f"{'x'.join(map(str, want))} (the model's in_chans x input_size x input_size)")


class _TensorImages(torch.utils.data.Dataset):
    """Images (and labels) of a .pt file; indices past len() address later epochs (the step sampler's
    convention), so any number of calibration or fine-tuning batches can be drawn."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: Sequence[int]):
        self.x, self.y, self.index = x, y, list(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        j = self.index[int(i) % len(self.index)]
        return self.x[j], self.y[j]


LABELS = ("auto", "data", "model")


@dataclass
class DataSource:
    """Where calibration and fine-tuning images come from: 'synthetic' (supernet.data.SyntheticShapes
    at the model's input size), an ImageFolder directory (resized to the model's input size, as the
    eval transform does), or a .pt file holding an image tensor (N, C, H, W) or {"images", "labels"}.

    labels: "data" uses the data's labels as the model's classes, "model" the model's own top-1 at the
    start (pseudo-labels: the model's task is unknown), "auto" the data's labels when they fit the model
    (an ImageFolder or .pt with as many classes as the model; synthetic data when the model has as many
    classes as the synthetic task can draw, i.e. a model trained on vitslim's synthetic task).
    `heldout_images`: images kept out of calibration and fine-tuning to choose between selections (taken
    from an ImageFolder or .pt only when it has at least twice as many; else shared, `heldout_shared`)."""
    spec: str
    arch: Mapping
    batch_size: int = 32
    seed: int = 0
    labels: str = "auto"
    heldout_images: Optional[int] = None
    mean: Optional[Sequence[float]] = None    # an ImageFolder's normalisation (default ImageNet's, as DeiT and Swin
    std: Optional[Sequence[float]] = None     # were trained): 0.5,0.5,0.5 for timm's augreg / CLIP ViTs
    crop_pct: Optional[float] = None          # eval resize to size / crop_pct, then centre crop (default 0.875)

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise PruneError(f"--batch-size: got {self.batch_size!r}, expected an integer >= 1")
        if self.labels not in LABELS:
            raise PruneError(f"--labels: got {self.labels!r}, expected one of {', '.join(LABELS)}")
        if self.heldout_images is None:
            self.heldout_images = 4 * self.batch_size
        self._check_preprocessing()
        self.heldout_shared = False
        self.data_classes: Optional[int] = None
        self.kind, self._train, self._calib, self._held, fits = self._open(self.arch)
        if self.labels == "data" and not fits:
            raise PruneError(f"--labels data: the labels of --data {self.spec} ({self.describe_classes()}) are not "
                             f"classes of the model ({self.arch['num_classes']} classes); use --labels model")
        self.labels_valid = fits if self.labels == "auto" else self.labels == "data"

    def _check_preprocessing(self) -> None:
        chans = self.arch["in_chans"]
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, str):
                v = [x for x in v.split(",") if x.strip()]
            try:
                vals = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                vals = ()
            if len(vals) != chans or not all(math.isfinite(x) for x in vals) or \
                    (name == "std" and not all(x > 0 for x in vals)):
                raise PruneError(f"--{name}: got {v if isinstance(v, str) else ','.join(map(str, v))}, expected "
                                 f"{chans} comma-separated {'positive ' if name == 'std' else ''}numbers (one per "
                                 "channel of the model's images)")
            setattr(self, name, vals)
        c = self.crop_pct
        if c is not None and not (isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c <= 1):
            raise PruneError(f"--crop-pct: got {c!r}, expected a number in (0, 1] (0.875: DeiT's eval crop; 1: none)")
        given = [n for n in ("mean", "std", "crop_pct") if getattr(self, n) is not None]
        spec = os.fspath(self.spec)
        if given and (spec == "synthetic" or os.path.isfile(spec)):
            raise PruneError(f"--{given[0].replace('_', '-')}: applies to an ImageFolder --data only (the synthetic "
                             "task and a .pt of images come normalised), got --data " + os.fspath(self.spec))

    def preprocessing(self) -> Optional[dict]:
        """An ImageFolder's normalisation and eval crop as used (for the report), or None for other data."""
        if self.kind != "imagefolder":
            return None
        ds = self._calib
        return {"mean": list(ds.mean), "std": list(ds.std), "crop_pct": ds.crop_pct}

    def describe_classes(self) -> str:
        """The data's classes in words, for messages."""
        if self.data_classes is None:
            return "no labels"
        if self.kind == "tensor":
            return f"labels up to {self.data_classes - 1}"
        return f"{self.data_classes} classes"

    def _split(self, n: int) -> Tuple[List[int], List[int]]:
        """(train indices, held-out indices): a seeded draw of heldout_images when n >= 2x that."""
        h = int(self.heldout_images)
        if h <= 0 or n < 2 * h:
            self.heldout_shared = True
            return list(range(n)), list(range(n))
        g = torch.Generator().manual_seed(int(self.seed) + 0x5EED)
        perm = torch.randperm(n, generator=g).tolist()
        return sorted(perm[h:]), sorted(perm[:h])

    def _open(self, a):
        from supernet.data import DataError, ImageFolder, SyntheticShapes, scan_image_folder, synthetic_classes
        size, n_cls, chans = a["input_size"], a["num_classes"], a["in_chans"]
        spec = os.fspath(self.spec)
        if spec == "synthetic":
            k = min(max(n_cls, 2), len(synthetic_classes(60)))  # 60: every class the generator has
            kw = dict(num_classes=k, image_size=size, seed=self.seed)
            train = SyntheticShapes(length=20000, split="train", **kw)
            self.data_classes = k
            return "synthetic", train, train, SyntheticShapes(length=1000, split="heldout", **kw), k == n_cls
        if os.path.isdir(spec):
            try:
                classes, samples, _ = scan_image_folder(spec)
            except DataError as e:
                raise PruneError(f"--data: {e}") from None
            tr, he = ([samples[i] for i in idx] for idx in self._split(len(samples)))
            kw = dict(image_size=size, classes=classes, seed=self.seed, in_chans=chans,
                      **{k: getattr(self, k) for k in ("mean", "std", "crop_pct") if getattr(self, k) is not None})
            try:
                train = ImageFolder(spec, train=True, samples=tr, **kw)
            except DataError as e:
                raise PruneError(f"--data: {e}") from None
            calib = ImageFolder(spec, train=False, samples=tr, **kw)  # no augmentation
            self.data_classes = len(classes)
            held = ImageFolder(spec, train=False, samples=he, **kw)
            return "imagefolder", train, calib, held, len(classes) == n_cls
        if os.path.isfile(spec) and spec.endswith((".pt", ".pth")):
            from supernet.checkpoint import read_file
            from supernet.errors import CheckpointError
            try:
                obj = read_file(spec)
            except CheckpointError as e:
                raise PruneError(f"--data: {e}".replace("expected a checkpoint", "expected an image tensor file")) from None
            x, y = (obj.get("images"), obj.get("labels")) if isinstance(obj, Mapping) else (obj, None)
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                raise PruneError(f"--data {spec}: expected an image tensor (N, C, H, W) or {{'images', 'labels'}}")
            if len(x) == 0:
                raise PruneError(f"--data {spec}: holds no images (N = 0), expected at least one")
            if y is not None and (not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x)
                                  or y.is_floating_point()):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise PruneError(f"--data {spec}: labels are {shape}, expected integer class indices of shape "
                                 f"({len(x)},), one per image")
            check_images(x[:1].float(), a, f"--data {spec}")
            yy = y.long() if y is not None else torch.full((len(x),), -1)
            tr, he = self._split(len(x))
            xf = x.float()
            train = _TensorImages(xf, yy, tr)
            fits = y is not None and int(y.max()) < n_cls and int(y.min()) >= 0
            self.data_classes = None if y is None else int(y.max()) + 1
            return "tensor", train, train, _TensorImages(xf, yy, he), fits
        raise PruneError(f"--data: got {spec!r}, expected 'synthetic', an ImageFolder directory (root/<class>/<images>) "
                         "or a .pt file with an image tensor")

    def _batches(self, ds, n: int, start: int, shuffle: bool) -> Iterator[Batch]:
        from supernet.data import make_loader
        loader = make_loader(ds, self.batch_size, start + n, seed=self.seed, start_step=start, shuffle=shuffle)
        first = True
        for x, y in loader:
            if first:
                self.check(x)
                first = False
            yield x, (y if self.labels_valid else None)

    @property
    def calib_size(self) -> int:
        """Distinct images calibration draws from (batches beyond them repeat images)."""
        return len(self._calib)

    @property
    def heldout_size(self) -> int:
        return len(self._held)

    def check(self, x: torch.Tensor) -> None:
        check_images(x, self.arch, f"--data {self.spec}")

    def calibration(self, n: int) -> List[Batch]:
        """The first n batches of the training split, without augmentation (fixed: every scoring pass
        sees the same)."""
        return list(self._batches(self._calib, n, 0, shuffle=True))

    def heldout(self, n: int) -> List[Batch]:
        return list(self._batches(self._held, n, 0, shuffle=False))

    def training(self, steps: int, start: int = 1000) -> Iterator[Batch]:
        """Fine-tuning batches (later steps of the training order than calibration uses)."""
        return self._batches(self._train, steps, start, shuffle=True)


class BatchSource:
    """Your own batches as a DataSource (what `prune` takes as `data`): `train` (e.g. your DataLoader) gives
    calibration (its first batches) and fine-tuning (read on across iterative steps, started again when it runs
    out); `heldout` the held-out figures (the first training batches without it). Batches are
    (images, labels or None) pairs; labels outside the model's classes are replaced by the unpruned model's top-1."""

    def __init__(self, arch: Mapping, train: Iterable, heldout: Optional[Iterable] = None, what: str = "train_batches"):
        self.arch, self.train, self.held, self.what = arch, train, heldout, what
        self._it: Optional[Iterator] = None
        self._checked = False

    def _pair(self, b, what: str) -> Batch:
        if isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], torch.Tensor) and \
                (b[1] is None or isinstance(b[1], torch.Tensor)):
            x, y = b
        else:
            raise PruneError(f"{what}: got a batch of {type(b).__name__}"
                             f"{' of ' + str(len(b)) if isinstance(b, (tuple, list)) else ''}, expected (images, "
                             "labels or None) pairs")
        if not self._checked:
            check_images(x, self.arch, what)
            self._checked = True
        return x, y

    def _first(self, src: Iterable, n: int, what: str) -> List[Batch]:
        return [self._pair(b, what) for b in itertools.islice(iter(src), n)]

    def calibration(self, n: int) -> List[Batch]:
        return self._first(self.train, n, self.what)

    def heldout(self, n: int) -> List[Batch]:
        return self._first(self.held, n, "heldout_batches") if self.held is not None else self.calibration(n)

    def training(self, steps: int, start: int = 0) -> Iterator[Batch]:
        n = 0
        while n < steps:
            fresh, got = self._it is None, 0
            if fresh:
                self._it = iter(self.train)
            for b in self._it:
                yield self._pair(b, self.what)
                n, got = n + 1, got + 1
                if n == steps:
                    return
            self._it = None
            if fresh and not got:
                raise PruneError(f"{self.what}: gave no batch, expected (images, labels or None) batches to fine-tune on")


# ---------------------------------------------------------------- training helpers
def _logits(out):
    return (out[0] + out[1]) / 2 if isinstance(out, (tuple, list)) else out


def _labelled(batches: Sequence[Batch], reference: nn.Module, num_classes: int, progress: bool, desc: str) -> List[Batch]:
    from .importance import labels_fit
    from tqdm import tqdm
    need = sum(not labels_fit(y, num_classes) for _, y in batches)
    return list(reference_labels(tqdm(batches, desc=desc, disable=not (progress and need), leave=False, unit="batch"),
                                 reference, num_classes))


def _labelled_scored(batches: Sequence[Batch], reference: nn.Module, num_classes: int, progress: bool,
                     desc: str) -> Tuple[List[Batch], Optional[dict]]:
    """`_labelled`, and when the reference labelled every batch itself (`--labels model`), its held-out figures
    from the same forward (`evaluate(reference, ...)` of the labelled batches: top-1 1 by construction); None
    when some batch brings labels of its own."""
    from .importance import labels_fit
    from tqdm import tqdm
    if not batches or any(labels_fit(y, num_classes) for _, y in batches):
        return _labelled(batches, reference, num_classes, progress, desc), None
    out, tot, n = [], 0.0, 0
    with torch.no_grad():
        for x, _ in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
            logits = _logits(reference(x))
            y = logits.argmax(-1)
            tot += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(x)
            out.append((x, y))
    return out, {"loss": tot / max(n, 1), "top1": 1.0 if n else 0.0, "images": n}


def reference_labels(batches: Iterable[Batch], reference: nn.Module, num_classes: int) -> Iterator[Batch]:
    """The batches, each without labels of the model's classes (None, or an index outside them) labelled
    with `reference`'s top-1 (the unpruned model's: `--labels model`)."""
    from .importance import labels_fit
    for x, y in batches:
        if not labels_fit(y, num_classes):
            with torch.no_grad():
                y = _logits(reference(x)).argmax(-1)
        yield x, y


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    reduction="batchmean", log_target=True) * t * t


# how `finetune` builds its optimiser: part of a prune state's key (its saved optimiser has these groups)
FINETUNE_RECIPE = "adamw-timm-no-decay"


def finetune(model: nn.Module, batches: Iterable[Batch], steps: int, lr: float = 1e-4, weight_decay: float = 0.05,
             teacher: Optional[nn.Module] = None, kd_weight: float = 0.5, temperature: float = 1.0,
             progress: bool = False, desc: str = "fine-tune", resume: Optional[Mapping] = None,
             save: Optional[Callable[[dict], None]] = None, save_seconds: float = 60.0) -> dict:
    """AdamW with cosine decay for `steps` batches, no weight decay on norms, biases, LayerScale, position
    embeddings, tokens and attention bias tables (`supernet.train.decay_groups`). Loss: cross-entropy on the
    labels, mixed with KD (KL to the teacher's softened outputs) when a teacher is given; without labels, KD alone (or,
    without a teacher, the model's own current top-1: `prune` labels such batches with the unpruned
    model's top-1 first, `reference_labels`).

    `save(state)` is called after a step whenever `save_seconds` (and 20x the last call's duration) have passed
    since the last call, after every step if `save_seconds` is 0, never after the last step. `state` (steps
    done, optimiser, schedule, losses, RNG; the caller adds the weights), given back as `resume` with `model`
    holding the weights of that moment and `batches` starting at the next batch, continues to the result an
    uninterrupted call gives."""
    if steps <= 0:
        return {"steps": 0}
    from tqdm import tqdm
    from supernet.train import decay_groups
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(decay_groups(model.named_parameters(), weight_decay), lr=lr)  # timm's no-decay rule
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    done, losses = 0, []  # the first and the latest loss (a long fine-tuning keeps no per-step list)
    if resume is not None:
        done, kept = int(resume["done"]), [float(v) for v in resume["losses"]]  # a state of before kept every step's
        losses = kept[:1] + kept[1:][-1:]
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
    model.train()
    if teacher is not None:
        teacher.eval()
    bar = tqdm(total=steps, initial=done, desc=desc, disable=not progress, leave=False)
    last_save, save_cost = time.monotonic(), 0.0
    ran = done
    try:
        for step, (x, y) in enumerate(itertools.islice(batches, steps - done), start=done):
            ran = step + 1
            out = _logits(model(x))
            t_out = None
            if teacher is not None:
                with torch.no_grad():
                    t_out = _logits(teacher(x))
            if y is not None and t_out is not None:
                loss = (1 - kd_weight) * F.cross_entropy(out, y) + kd_weight * kd_loss(out, t_out, temperature)
            elif t_out is not None:
                loss = kd_loss(out, t_out, temperature)
            else:
                loss = default_loss(out, y)
            losses[1 if losses else 0:] = [float(loss.detach())]
            if not math.isfinite(losses[-1]):
                raise PruneError(f"fine-tuning step {step + 1}: the loss is {losses[-1]} (diverged), expected a finite "
                                 f"loss; lower --lr (now {lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if save is not None and step + 1 < steps and time.monotonic() - last_save >= (
                    max(save_seconds, 20 * save_cost) if save_seconds > 0 else 0):
                t0 = time.monotonic()  # a large model's save takes seconds: at most ~5% of the time goes to saving
                save({"done": step + 1, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                      "losses": list(losses), "rng": torch.get_rng_state()})
                last_save = time.monotonic()
                save_cost = last_save - t0
    finally:
        bar.close()  # also when interrupted: an open bar shifts every later one down a line
    model.eval()
    for p in params:
        p.grad = None
    return {"steps": ran, "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], reference: Optional[nn.Module] = None,
             progress: bool = False, desc: str = "evaluate") -> dict:
    """Mean cross-entropy and top-1 on the batches; without labels both are against `reference`'s
    top-1 (agreement with the unpruned model; `prune` labels its held-out batches once instead)."""
    from tqdm import tqdm
    was = model.training
    model.eval()
    tot, correct, n = 0.0, 0, 0
    for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
        out = _logits(model(x))
        if y is None:
            y = _logits(reference(x)).argmax(-1) if reference is not None else out.argmax(-1)
        tot += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(-1) == y).sum())
        n += len(x)
    model.train(was)
    return {"loss": tot / max(n, 1), "top1": correct / max(n, 1), "images": n}


# ---------------------------------------------------------------- cost models
def make_cost(target: Target, arch: Mapping, table=None, cost_fn: Optional[Callable] = None) -> CostModel:
    if cost_fn is not None:
        return ArchCost(cost_fn, arch, target.kind)
    if target.kind == "params":
        return ParamsCost()
    if target.kind == "macs":
        return MacsCost()
    if table is None:
        raise PruneError(f"--target {target}: a latency target needs --table (a latency table of the device)")
    return LatencyCost(table, arch)


def resolve_keep(specs, infos: Sequence) -> FrozenSet[Tuple[int, int]]:
    """--keep as block keys: each a flat block index (negative from the end) or `stages[S].blocks[B]`."""
    import re
    keys = [i.key for i in infos]
    n = len(keys)
    out = set()
    for spec in specs or ():
        s = str(spec).strip()
        m = re.fullmatch(r"stages\[(\d+)\]\.blocks\[(\d+)\]", s)
        if m and (int(m.group(1)), int(m.group(2))) in keys:
            out.add((int(m.group(1)), int(m.group(2))))
        elif re.fullmatch(r"-?\d+", s) and -n <= int(s) < n:
            out.add(keys[int(s)])
        else:
            raise PruneError(f"--keep: got {s!r}, expected a block index from {-n} to {n - 1} (negative: from the end) "
                             f"or stages[S].blocks[B] of this model's {n} blocks")
    return frozenset(out)


def lowest_cost(arch: Mapping, cost: CostModel, floor: Floor, depth: bool, embed: bool) -> float:
    """The least `cost` the floor allows (with depth moves: every branch but one removed)."""
    if depth:
        return floor_cost_depth(arch, cost, floor, embed=embed)
    if embed:
        return floor_cost_embed(arch, cost, floor)
    infos = block_infos(arch)
    return floor_cost(infos, cost, cost.base(arch, infos), floor)


def check_reachable(target: Target, goal: float, c0: float, lowest: float, min_keep, depth: bool,
                    round_to: int = 1, kept: int = 0) -> None:
    """A one-line error naming the floor when `goal` is below what removing units can reach."""
    if goal >= lowest - 1e-9 * max(abs(lowest), 1):
        return
    floor = f"--min-keep {min_keep_str(min_keep)}" + (f" and --round-to {round_to}" if round_to > 1 else "") \
        + (f", {kept} block(s) kept whole (--keep)" if kept else "")
    how = (f"with depth moves (on by default for latency targets): every branch removed but one, at {floor}; at least one block must stay, "
           "or the network is its patch embedding and classifier alone") if depth else f"with {floor}"
    hint = ("raise the target" if depth else ("raise the target or lower --min-keep" + (" or --round-to" if round_to > 1 else ""))) \
        + (", or --keep fewer blocks" if kept else "")
    if target.kind != "latency":
        raise PruneError(f"--target {target}: below what the floor allows (at best {target.kind}={lowest / c0:.3f} "
                         f"{how}); {hint}")
    raise PruneError(f"--target {target}: below what the table can reach for this model (floor {lowest:.3f} ms = "
                     f"{lowest / c0:.3f}x {how}; unpruned {c0:.3f} ms)")


def select_exact(fn, make_net, costs: Sequence[CostModel], budgets: Sequence[float], arch: Mapping,
                 max_rounds: int = 8):
    """(selection, select_constrained's info or None, [budgets selected under, when tightened]).

    Selections add up unit costs; the pruned network's cost is then computed whole (`cost.total` of the
    pruned arch). The two agree for block widths, but not exactly where units interact (the embedding
    width changes every block's cost; table entries interpolate between measured widths). When the
    network would run over a budget, the selection is repeated under that budget lowered by the
    overshoot (5% more each round), so a plan is never over its target by the cost model's error."""
    sel_budgets = [float(b) for b in budgets]
    tried, sel, info = [], None, None
    for _ in range(max_rounds):
        try:
            if len(costs) == 1:
                s = fn(make_net(costs[0]), sel_budgets[0])
            else:  # every budget met at once (budget.select_constrained)
                s, info = select_constrained(fn, make_net, costs, sel_budgets)
        except PruneError:
            if sel is None:
                raise
            break  # tightened below what removing units reaches: the last plan stays, the caller names it
        sel = s
        pa = pruned_arch(arch, sel.plan)
        over = [c.total(pa) - b for c, b in zip(costs, budgets)]
        if all(o <= 1e-6 * max(abs(b), 1e-9) for o, b in zip(over, budgets)):
            break
        tried.append(list(sel_budgets))
        sel_budgets = [sb - 1.05 * o - 1e-9 * abs(b) if o > 0 else sb for sb, o, b in zip(sel_budgets, over, budgets)]
    return sel, info, tried


def check_table(table, arch: Mapping) -> None:
    """A table must hold entries of this family's operators (and the latency machinery must be able
    to cut this family into entries)."""
    from latency_tables.segments import SegmentError, decompose
    fam = arch["family"]
    try:
        need = {s.key["op"] for s in decompose(arch)}
    except SegmentError:
        need = set()
    have = {e.key["op"] for e in table.entries.values()}
    if not need & have:
        bf = table.built_for or {}
        made_for = bf.get("family") or bf.get("families") or bf.get("space") or \
            (f"ops {', '.join(sorted(have)[:4])}" if have else "no entries")
        why = f"it has no entry for {', '.join(sorted(need))}" if need else \
            f"latency tables cannot yet cut a {fam} network into entries"
        from latency_tables.grid import grid_remedy
        raise PruneError(f"--table {getattr(table, 'path', None) or ''}: built for {made_for}, not for this {fam} "
                         f"model ({why}); {grid_remedy(table, 'CHECKPOINT', 'T.yaml', grid=False)}")
    from latency_tables.table import LatencyError
    try:  # the same family, but other geometry (width, patch, resolution) than the table was measured at
        ms = table.predict(arch, interpolate=True)
    except LatencyError as e:
        from latency_tables.grid import grid_remedy
        raise PruneError(f"--table {getattr(table, 'path', None) or ''}: cannot price this model ({e}); "
                         f"{grid_remedy(table, 'CHECKPOINT', 'T.yaml')}") from None
    if not ms > 0:  # every target and kept fraction is relative to it
        raise PruneError(f"--table {getattr(table, 'path', None) or ''}: predicts {ms:g} ms for this model (its entries "
                         "are 0 ms: a clock too coarse, or a failed measurement), expected a positive time; re-measure")


# ---------------------------------------------------------------- the pruner
@dataclass
class PruneConfig:
    target: Union[str, Target, Sequence[Union[str, Target]]]   # one, or several all met ("macs=0.5,latency=0.5x")
    criterion: str = "taylor"           # taylor | magnitude
    selection: str = "auto"             # knapsack | ratio | auto (both; keep the lower held-out loss)
    iterative_steps: int = 1
    finetune_steps: int = 0             # in all, spread evenly over the iterative steps
    kd: bool = False
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.05
    min_keep: Union[float, str, Mapping[str, float]] = 0.1  # a fraction, or per kind: "heads=1,ffn=0.25"
    keep: Sequence[Union[int, str]] = ()  # blocks left whole: flat indices (negative from the end) or stages[S].blocks[B]
    round_to: int = 1                   # every kept channel width a multiple of it (Torch-Pruning's round_to)
    prune_embed: bool = False           # also prune each stage's residual (embedding) width
    depth: Optional[bool] = None        # branch (depth) moves: None = auto, on for latency targets only
    momentum: float = 0.9               # smoothing of scores across iterative steps
    calib_batches: int = 8
    eval_batches: int = 4
    seed: int = 0

    def check(self) -> "PruneConfig":
        ts = parse_targets(self.target)
        self.target = ts[0] if len(ts) == 1 else ts
        if self.selection not in ("knapsack", "ratio", "auto"):
            raise PruneError(f"--selection: got {self.selection!r}, expected knapsack, ratio or auto")
        get_importance(self.criterion)
        for k, lo in (("iterative_steps", 1), ("finetune_steps", 0), ("calib_batches", 1), ("eval_batches", 0)):
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise PruneError(f"--{k.replace('_', '-')}: got {v!r}, expected an integer >= {lo}")
        if not 0 <= self.momentum < 1:
            raise PruneError(f"--momentum: got {self.momentum!r}, expected a number in [0, 1)")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise PruneError(f"--lr: got {self.lr!r}, expected a learning rate > 0")
        if self.kd and self.finetune_steps == 0:
            raise PruneError("--kd: distillation happens during fine-tuning, expected --finetune-steps N > 0 with it")
        self.min_keep = normalize_min_keep(self.min_keep)
        Floor(self.min_keep, round_to=self.round_to)
        if isinstance(self.keep, (str, int)):
            self.keep = [k for k in str(self.keep).split(",") if k.strip()]
        if self.depth is not None and not isinstance(self.depth, bool):
            raise PruneError(f"--depth: got {self.depth!r}, expected true, false or None (auto: on for latency "
                             "targets, off for params / MACs targets)")
        return self

    @property
    def targets(self) -> List[Target]:
        return parse_targets(self.target)

    @property
    def use_depth(self) -> bool:
        """Whether branch (depth) moves are on: `depth`, or when it is None (auto), when a target is a latency."""
        if self.depth is not None:
            return self.depth
        return any(t.kind == "latency" for t in self.targets)


@dataclass
class PruneResult:
    model: nn.Module
    arch: dict
    report: dict


def check_finite_weights(model: nn.Module) -> None:
    """A one-line error naming the first parameter or buffer holding NaN or Inf: every score, held-out loss and
    report figure would be NaN, and the selection arbitrary."""
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = t.detach()[~torch.isfinite(t.detach())]
            raise PruneError(f"checkpoint: {name} holds {bad.numel()} non-finite value(s) ({float(bad[0])}), expected "
                             "finite weights (a diverged training run or a damaged file)")


def block_widths(arch: Mapping) -> List[dict]:
    return [{"stage": i.stage, "block": i.index, "heads": i.heads, "qk_dim": i.qk_dim, "v_dim": i.v_dim,
             "ffn_hidden": i.ffn_hidden} for i in block_infos(arch)]


def prune(model: nn.Module, arch: Mapping, config: PruneConfig, data: Optional[DataSource] = None,
          calibration: Optional[Iterable[Batch]] = None, table=None, cost_fn: Optional[Callable] = None,
          progress: bool = False, importance: Optional[Importance] = None, state_path: Optional[str] = None,
          state_key: Optional[Mapping] = None) -> PruneResult:
    """Prune `model` (not modified) to `config.target`; returns the smaller model, its arch and the
    report (report.py adds the file-level fields). Calibration batches come from `calibration` (an iterable of
    (images, labels or None) batches, e.g. a DataLoader: its first `config.calib_batches` are read) or `data`;
    fine-tuning batches from `data`.

    `state_path`: the run saves its state there after every step but the last (the pruned network, the
    scores' momentum, the report so far, the RNG), once a step that fine-tunes (or the last step) is
    selected, and during fine-tuning every FINETUNE_SAVE_SECONDS (weights, optimiser, schedule); a later
    call with the same `state_key` (what the run depends on: config, checkpoint, data, table) continues
    from it, ending where an uninterrupted run ends. A state of another key is refused.
    The run seeds torch's RNG (config.seed, or the saved state); the caller's is as it was when it returns."""
    with torch.random.fork_rng(devices=[]):
        return _prune(model, arch, config, data=data, calibration=calibration, table=table, cost_fn=cost_fn,
                      progress=progress, importance=importance, state_path=state_path, state_key=state_key)


def _prune(model: nn.Module, arch: Mapping, config: PruneConfig, data: Optional[DataSource] = None,
           calibration: Optional[Iterable[Batch]] = None, table=None, cost_fn: Optional[Callable] = None,
           progress: bool = False, importance: Optional[Importance] = None, state_path: Optional[str] = None,
           state_key: Optional[Mapping] = None) -> PruneResult:
    from tqdm import tqdm
    cfg = config.check()
    arch = dict(arch)
    check_family(arch, depth=bool(cfg.depth))
    check_finite_weights(model)
    targets: List[Target] = cfg.targets
    if cost_fn is not None and len(targets) > 1:
        raise PruneError(f"cost_fn prices one target, got {len(targets)}: {', '.join(map(str, targets))}")
    torch.manual_seed(cfg.seed)
    imp = importance or get_importance(cfg.criterion)
    if cfg.finetune_steps and data is None:
        raise PruneError(f"finetune_steps={cfg.finetune_steps}: fine-tuning needs training images, expected data= "
                         "or train_batches= with it")
    if calibration is None:
        if data is None and imp.needs_data:
            raise PruneError("no calibration data: expected data=, calibration= or train_batches= (batches of "
                             "images to score the units on)")
        calibration = data.calibration(cfg.calib_batches) if data is not None else []
    else:  # the first calib_batches of the caller's iterable: a DataLoader over a training set is not read whole
        calibration = list(itertools.islice(calibration, cfg.calib_batches))
        for x, _ in calibration[:1]:
            check_images(x, arch)
    heldout = data.heldout(cfg.eval_batches) if (data is not None and cfg.eval_batches) else calibration[:cfg.eval_batches]
    if table is not None:
        check_table(table, arch)
    costs0 = [make_cost(t, arch, table, cost_fn) for t in targets]
    c0s = [c.total(arch) for c in costs0]
    goals = [t.value * c0 if t.is_fraction else t.value for t, c0 in zip(targets, c0s)]
    infos0 = block_infos(arch)
    kept_whole = resolve_keep(cfg.keep, infos0)
    floor = Floor(cfg.min_keep, round_to=cfg.round_to, keep=kept_whole).of(infos0)
    depth = cfg.use_depth
    for t, c, c0, goal in zip(targets, costs0, c0s, goals):
        check_reachable(t, goal, c0, lowest_cost(arch, c, floor, depth, cfg.prune_embed), min_keep_str(cfg.min_keep), depth, cfg.round_to,
                        len(kept_whole))
    before = analytic_count(arch)
    teacher = None
    if cfg.kd and cfg.finetune_steps > 0:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    reference = teacher if teacher is not None else copy.deepcopy(model).eval()  # both: the unpruned model, frozen
    # without labels of the model's classes, every loss is against the unpruned model's top-1: the scores of
    # later steps and fine-tuning without a teacher would otherwise chase the pruned model's own drifting top-1
    for x, _ in (calibration or heldout)[:1]:  # a model whose float32 activations overflow: every figure NaN
        with torch.no_grad():
            out = _logits(reference(x))
        if not bool(torch.isfinite(out).all()):
            raise PruneError("the unpruned model's logits on the first calibration batch are not finite (NaN or Inf: "
                             "its activations overflow float32, or the images hold NaN or Inf), expected a model "
                             "that runs on the data")
    calibration = _labelled(calibration, reference, arch["num_classes"], progress, "label calibration")
    # held-out batches too, once: evaluating every candidate against them would run the reference each time
    heldout, ref_eval = _labelled_scored(heldout, reference, arch["num_classes"], progress, "label held-out")
    last_ev = None  # the held-out figures of `cur` from its selection, while no fine-tuning has changed it
    cur, cur_arch = copy.deepcopy(model).eval(), copy.deepcopy(arch)
    prev: Optional[Scores] = None
    steps_report = []
    K = cfg.iterative_steps
    ft_per = [cfg.finetune_steps // K + (1 if k >= K - cfg.finetune_steps % K else 0) for k in range(K)]
    ft_start = 1000
    scoring_seconds = 0.0
    first = 0
    key = json.loads(json.dumps(dict(state_key or {}), sort_keys=True, default=str))
    key["finetune_recipe"] = FINETUNE_RECIPE  # a state saved by another recipe's optimiser is not continued
    pending = None  # a step selected before an interrupt: (its report so far, its fine-tuning state or None)
    st = _read_state(state_path, key) if state_path else None
    if st is not None:  # an interrupted run: continue from its last saved point
        from supernet.arch import validate
        from supernet.checkpoint import _check_shapes
        from supernet.errors import first_line
        try:  # a damaged or edited state: one line, and its arch checked against its tensors before a byte is allocated
            first, cur_arch = int(st["step"]), validate(st["arch"])
            if not 0 <= first <= K:
                raise ValueError(f"step {first}, expected 0 to {K}")
            _check_shapes(cur_arch, st["state_dict"], "its network")
            with no_weight_init():
                cur = get_family(cur_arch["family"]).build(cur_arch)
            cur.load_state_dict(st["state_dict"])
            cur.arch = cur_arch
            cur.eval()
            prev = Scores.from_state(st["prev"]) if st.get("prev") is not None else None
            steps_report, scoring_seconds, ft_start = json.loads(st["steps_report"]), float(st["scoring_seconds"]), int(st["ft_start"])
            torch.set_rng_state(st["rng"])
            if st.get("pending") is not None:
                pending = (json.loads(st["pending"]["step_report"]), st["pending"]["finetune"])
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # ArchError too
            raise PruneError(f"{state_path}: a damaged prune state ({first_line(e)[:160]}); delete it to start "
                             "over") from None

    def save_state(steps_done: int, step_report: Optional[dict] = None, ft_state: Optional[dict] = None) -> None:
        """The state after `steps_done` finished steps; with `step_report`, the next step is selected (cur is
        its network) and fine-tuning, from `ft_state` (None: not started)."""
        _write_state(state_path, {
            "key": json.dumps(key, sort_keys=True), "step": steps_done, "arch": cur_arch,
            "state_dict": {k: v.detach().cpu().clone() for k, v in cur.state_dict().items()},
            "prev": prev.to_state() if prev is not None else None, "steps_report": json.dumps(steps_report),
            "scoring_seconds": scoring_seconds, "ft_start": ft_start, "rng": torch.get_rng_state(),
            "pending": None if step_report is None else {"step_report": json.dumps(step_report), "finetune": ft_state}})

    for step in range(first, K):
        ft_resume = None
        if pending is not None:  # selected before the interrupt: fine-tune on from its last save
            srep, ft_resume = pending
            pending = None
        else:
            budgets = [c0 - (c0 - goal) * (step + 1) / K for c0, goal in zip(c0s, goals)]
            infos = block_infos(cur_arch)
            bar = tqdm(total=len(calibration) if imp.needs_data else 0, desc=f"score {step + 1}/{K}",
                       disable=not progress, leave=False)
            t0 = time.perf_counter()
            try:
                scores = imp.score(cur, cur_arch, calibration, progress=bar, embed=cfg.prune_embed)
            finally:
                bar.close()
            scoring_seconds += time.perf_counter() - t0
            scores = scores.blend(prev, cfg.momentum)
            if scores.all_zero():
                import warnings
                warnings.warn(f"step {step + 1}: {scores.criterion} importance is 0 for every unit (the loss has no "
                              "gradient on the calibration data: a model already certain of every label, or a zero "
                              "classifier), so the selection has nothing to go by and cuts blocks in index order; "
                              "calibrate on other data (labelled images) or use --criterion magnitude", stacklevel=2)
            costs = [make_cost(t, cur_arch, table, cost_fn) for t in targets]
            methods = ["ratio", "knapsack"] if cfg.selection == "auto" else [cfg.selection]
            cands, weights, tightenings = {}, {}, {}

            def make_net(c: CostModel) -> Network:
                return Network(cur_arch, scores, c, floor, embed=cfg.prune_embed, depth=depth)

            for m in methods:
                fn = select_ratio if m == "ratio" else select_knapsack
                sel, info, tightened = select_exact(fn, make_net, costs, budgets, cur_arch)
                if info is not None:
                    weights[m] = info["weights"]
                if tightened:
                    tightenings[m] = tightened
                pm, pa = apply_plan(cur, cur_arch, sel.plan)
                ev = evaluate(pm, heldout, reference, progress, f"held-out {m} {step + 1}/{K}") if heldout \
                    else {"loss": sel.removed_importance}
                cands[m] = (sel, pm, pa, ev)
            chosen = min(cands, key=lambda m: (cands[m][3]["loss"], m != "knapsack"))
            sel, cur, cur_arch, ev = cands[chosen]
            last_ev = ev if heldout else None
            for t, c, budget in zip(targets, costs, budgets):
                reached = c.total(cur_arch)
                if reached > budget + 1e-6 * max(abs(budget), 1e-9):  # never silently over a target
                    raise PruneError(f"--target {t}: step {step + 1} reached {reached:.6g} {c.unit}, above its budget "
                                     f"{budget:.6g} (the cost model is not reachable by removing units; raise the target)")
            prev = scores.restrict(infos, sel.plan)
            srep = {"step": step + 1, "budget": budgets[0], "cost": costs[0].total(cur_arch), "selection": chosen,
                    "_kept": plan_to_json(sel.plan, infos, stage_widths_of(infos, cur_arch)),
                    "candidates": {m: {"predicted_cost": c[0].cost, "removed_importance": c[0].removed_importance,
                                       "heldout_loss": c[3]["loss"], "heldout_top1": c[3].get("top1")}
                                   for m, c in cands.items()},
                    "finetune": None}
            if tightenings:  # selections repeated under lower budgets (select_exact)
                srep["tightened"] = tightenings
            if len(costs) > 1:
                srep["budgets"] = {str(t): b for t, b in zip(targets, budgets)}
                srep["costs"] = {str(t): c.total(cur_arch) for t, c in zip(targets, costs)}
                for m, w in weights.items():
                    srep["candidates"][m]["weights"] = {str(t): x for t, x in zip(targets, w)}
            cands = pm = None  # the other selection's network: not kept through fine-tuning
        ft = {"steps": 0}
        if ft_resume is not None or ft_per[step]:  # fine-tuned (or resumed mid-way): evaluated again at the end
            last_ev = None
        if state_path and ft_resume is None and (ft_per[step] or step + 1 == K):
            # selected: an interrupt from here on keeps the selection (fine-tuning or, after the last step,
            # the held-out evaluation still to come); a middle step without fine-tuning is saved at its end
            save_state(step, srep)
        if ft_per[step]:
            done = int(ft_resume["done"]) if ft_resume else 0
            batches = data.training(ft_per[step] - done, ft_start + done)
            if teacher is None:  # KD alone needs no labels; cross-entropy does
                batches = reference_labels(batches, reference, arch["num_classes"])
            ft = finetune(cur, batches, ft_per[step], cfg.lr,
                          cfg.weight_decay, teacher, cfg.kd_weight, cfg.kd_temperature, progress,
                          desc=f"fine-tune {step + 1}/{K}", resume=ft_resume,
                          save=(lambda fs, s=step, r=srep: save_state(s, r, fs)) if state_path else None,
                          save_seconds=FINETUNE_SAVE_SECONDS)
            ft_start += ft_per[step]
        srep["finetune"] = ft
        steps_report.append(srep)
        if state_path and step + 1 < K:
            save_state(step + 1)
    cur.eval()
    after = analytic_count(cur_arch)
    finals = [make_cost(t, cur_arch, table, cost_fn).total(cur_arch) for t in targets]
    target, cost0 = targets[0], costs0[0]
    rep = {
        "target": ",".join(map(str, targets)), "target_kind": target.kind, "target_value": target.value,
        "cost_unit": cost0.unit, "cost_before": c0s[0], "cost_after": finals[0], "cost_goal": goals[0],
        "targets": [{"target": str(t), "kind": t.kind, "value": t.value, "relative": t.relative, "unit": c.unit,
                     "before": c0, "goal": g, "after": f, "kept": f / c0 if c0 else None}
                    for t, c, c0, g, f in zip(targets, costs0, c0s, goals, finals)],
        "params_before": before["params"], "params_after": after["params"],
        "macs_before": before["macs"], "macs_after": after["macs"],
        "params_kept": after["params"] / before["params"], "macs_kept": after["macs"] / before["macs"],
        "criterion": imp.name, "selection": cfg.selection, "iterative_steps": K,
        "finetune_steps": cfg.finetune_steps, "kd": bool(cfg.kd), "min_keep": cfg.min_keep, "round_to": cfg.round_to,
        "keep": [f"stages[{k[0]}].blocks[{k[1]}]" for k in sorted(kept_whole)],
        "prune_embed": bool(cfg.prune_embed), "depth": depth,
        "stages": [{"stage": i, "width": st1["width"], "width_before": st0["width"]}
                   for i, (st0, st1) in enumerate(zip(arch["stages"], cur_arch["stages"]))],
        "momentum": cfg.momentum, "calib_batches": len(calibration),
        "calib_images": sum(len(x) for x, _ in calibration),
        "scoring_seconds": scoring_seconds,
        "steps": steps_report,
        "blocks": per_block(arch, cur_arch),
    }
    kept_blocks, kept_embed = compose_kept(arch, [s.pop("_kept", None) for s in steps_report])
    for b in rep["blocks"]:  # the original indices of what each block kept (the unpruned model's numbering)
        b["kept_index"] = kept_blocks[f"stages[{b['stage']}].blocks[{b['block']}]"]
    for st in rep["stages"]:
        st["kept_index"] = kept_embed[st["stage"]]
    lat = next((c for c in costs0 if isinstance(c, LatencyCost)), None)
    if lat is not None:  # blocks whose pruned widths the table's measured grid prices
        rep["latency_grid_blocks"] = sum(bool(lat.uses_grid(i)) for i in infos0)
        rep["blocks_total"] = len(infos0)
    if table is not None:
        rep["latency_before_ms"] = float(table.predict(arch, interpolate=True))
        after = table.predict_stages(cur_arch, interpolate=True)
        rep["latency_after_ms"] = float(after["total"])
        # the pruned widths' entries the table prices by interpolation (`latency predict --interpolate` lists them)
        rep["latency_estimated_entries"] = list(after.get("estimated", []))
        rep["latency_kept"] = rep["latency_after_ms"] / rep["latency_before_ms"]
    if heldout:
        rep["heldout_before"] = ref_eval or evaluate(reference, heldout, reference, progress, "held-out, unpruned")
        rep["heldout_after"] = last_ev or evaluate(cur, heldout, reference, progress, "held-out, pruned")
    rep["removed_blocks"] = [f"stages[{b['stage']}].blocks[{b['block']}]" for b in rep["blocks"]
                             if b["heads"] == 0 and b["ffn_hidden"] == 0
                             and (b["heads_before"] > 0 or b["ffn_hidden_before"] > 0)]
    rep["emptied"] = [f"stages[{b['stage']}].blocks[{b['block']}].{what}" for b in rep["blocks"]
                      for what, k in (("attention", "heads"), ("mlp", "ffn_hidden")) if b[k] == 0 and b[k + "_before"] > 0]
    return PruneResult(cur, cur_arch, rep)


STATE_FORMAT = "vitslim-prune-state"
STATE_VERSION = 1  # raise it when a change to selection, surgery or fine-tuning would make a resumed prune mix two rules


class _Missing:
    def __repr__(self):
        return "(none)"


_NONE = _Missing()  # a key setting a resume state does not hold
FINETUNE_SAVE_SECONDS = 60.0  # how often an interrupted fine-tuning may lose its work, at most


def _read_state(path: str, key: Mapping) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a state cut by a kill is written atomically; anything else is not ours
        raise PruneError(f"{path}: an unreadable prune state; delete it to start over") from None
    if not isinstance(st, Mapping) or st.get("format") != STATE_FORMAT:
        raise PruneError(f"{path}: not a prune state (format {st.get('format') if isinstance(st, Mapping) else None!r}); "
                         "delete it to start over")
    version = st.get("version", 1)  # the states of before the field were version 1
    if version != STATE_VERSION:  # its steps were taken under another vitslim's rules: resuming would mix the two
        raise PruneError(f"{path}: a prune state of version {version!r}, expected {STATE_VERSION} (written by "
                         f"{'a newer' if isinstance(version, int) and version > STATE_VERSION else 'another'} vitslim, "
                         "whose steps followed other rules): resume it with that vitslim, or pass --overwrite to start "
                         "this one")
    if st.get("key") != json.dumps(key, sort_keys=True):
        try:
            old = json.loads(st.get("key") or "{}")
        except (TypeError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise PruneError(f"{path}: not a prune state (key {st.get('key')!r:.40}); delete it to start over")
        diff, newer = [], False  # newer: a setting the state lacks (an earlier vitslim's, which had none such)
        for k in sorted(set(old) | set(key)):
            a, b = old.get(k, _NONE), key.get(k, _NONE)
            pairs = ([(f"{k}.{c}", a.get(c, _NONE), b.get(c, _NONE)) for c in sorted(set(a) | set(b))]
                     if isinstance(a, Mapping) and isinstance(b, Mapping) else [(k, a, b)])  # the setting, not all
            for name, x, y in pairs:
                if x != y:
                    newer |= x is _NONE
                    diff.append(f"{name}: {x!r} -> {y!r}")
        raise PruneError(f"{path}: an interrupted prune of other settings ({'; '.join(diff[:3])}); " + (
            "its state was written by an earlier vitslim: pass --overwrite to start this one" if newer else
            "re-run it with its settings to resume it, or pass --overwrite to start this one"))
    return dict(st)


def _write_state(path: str, state: dict) -> None:
    from supernet.arch import atomic_file
    from supernet.runlock import remove_stale_temps
    folder, base = os.path.split(os.path.abspath(path))
    remove_stale_temps(folder, base=base)  # a killed writer's .tmp.PID
    with atomic_file(path, "wb") as f:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, f)


def stage_widths_of(infos, arch_after: Mapping) -> List[int]:
    """Residual widths of the stages before a step (its input), from its block infos (a stage without blocks:
    its width after, which embedding pruning does not change)."""
    w = [st["width"] for st in arch_after["stages"]]
    for i in infos:
        w[i.stage] = i.dim
    return w


def plan_to_json(plan, infos, widths: Sequence[int]) -> dict:
    """A step's plan in the step input's numbering, as JSON (kept in the step report until the end, so a resumed run
    composes the same original indices)."""
    blocks = {}
    for i in infos:
        k = plan.get(i)
        blocks[i.name] = {"heads": list(k.heads), "qk": [list(k.qk[h]) for h in k.heads],
                          "v": [list(k.v[h]) for h in k.heads], "ffn": list(k.ffn)}
    return {"blocks": blocks, "embed": {str(s): list(plan.embed_keep(s, w)) for s, w in enumerate(widths)}}


def compose_kept(arch: Mapping, plans: Sequence[Optional[dict]]) -> Tuple[Dict[str, dict], Dict[int, List[int]]]:
    """Per block, the unpruned model's indices of the heads, Q/K and V channels (per kept head) and FFN channels the
    pruned model kept, and per stage its kept residual channels: the steps' plans composed in order."""
    cur = {}
    for i in block_infos(arch):
        hs = list(range(i.heads))
        cur[i.name] = {"heads": hs, "qk": [list(range(i.qk_dim)) for _ in hs], "v": [list(range(i.v_dim)) for _ in hs],
                       "ffn": list(range(i.ffn_hidden))}
    embed = {s: list(range(st["width"])) for s, st in enumerate(arch["stages"])}
    for p in plans:
        if not p:
            continue
        for name, k in p["blocks"].items():
            c = cur[name]
            cur[name] = {"heads": [c["heads"][h] for h in k["heads"]],
                         "qk": [[c["qk"][h][x] for x in qk] for h, qk in zip(k["heads"], k["qk"])],
                         "v": [[c["v"][h][x] for x in v] for h, v in zip(k["heads"], k["v"])],
                         "ffn": [c["ffn"][x] for x in k["ffn"]]}
        for s, kept in p["embed"].items():
            embed[int(s)] = [embed[int(s)][x] for x in kept]
    return cur, embed


def per_block(arch_before: Mapping, arch_after: Mapping) -> List[dict]:
    """Kept widths per block, with the originals and the kept fraction of every unit kind (Q/K and V
    as channels in all: heads x per-head width)."""
    rows = []
    for b0, b1 in zip(block_widths(arch_before), block_widths(arch_after)):
        r = {"stage": b0["stage"], "block": b0["block"]}
        r["dim"], r["dim_before"] = (arch_after["stages"][b0["stage"]]["width"],
                                     arch_before["stages"][b0["stage"]]["width"])
        for k in ("heads", "qk_dim", "v_dim", "ffn_hidden"):
            r[k] = b1[k]
            r[k + "_before"] = b0[k]
        qk0, qk1 = b0["heads"] * b0["qk_dim"], b1["heads"] * b1["qk_dim"]
        v0, v1 = b0["heads"] * b0["v_dim"], b1["heads"] * b1["v_dim"]
        r["kept"] = {"heads": _frac(b1["heads"], b0["heads"]), "qk": _frac(qk1, qk0), "v": _frac(v1, v0),
                     "ffn": _frac(b1["ffn_hidden"], b0["ffn_hidden"]), "embed": _frac(r["dim"], r["dim_before"])}
        rows.append(r)
    return rows


def _frac(a, b):
    return (a / b) if b else None
