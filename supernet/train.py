"""Training the MetaPath supernet: a config (YAML, validated), the loop (AdamW + cosine with warm-up,
label smoothing, optional distillation from a teacher checkpoint, Adam on the alphas, a Gumbel
temperature schedule, AMP on CUDA, DDP under torchrun), and the run directory it writes.

Run directory:
    config.yaml       the resolved config (search space inlined): what --resume compares against
    checkpoint.pt     everything needed to continue bit-for-bit (weights, alphas, both optimisers,
                      scheduler, AMP scaler, RNG states, step), written atomically every N steps
    metrics.jsonl     one JSON object per logged step ({"step", "loss", "lr", "tau", ...})
    importance.json   per-position probabilities, MetaPath and stage importance (atomically)
    report.json       written at the end: final loss, held-out accuracy, the most probable arch

Config (see experiments/supernet_tiny.yaml):
    version: 1
    space: tiny                     # a shipped space's name, a path relative to the config file, or the mapping
    data: {type: synthetic, train_size: 20000, heldout_size: 1000}
    seed: 0
    steps: 400
    batch_size: 64                  # global: split across torchrun processes
    mode: hard                      # hard (single path, straight-through) | soft (the paper's mixture)
    widths: max                     # max | random (each stage's width drawn per step)
    label_smoothing: 0.1
    optimizer: {lr: 0.002, weight_decay: 0.025, warmup_steps: 20, min_lr: 1.0e-5, grad_clip: 5.0}
    alpha: {lr: 0.01, betas: [0.5, 0.999], weight_decay: 0.001, start_step: 50}
    temperature: {start: 5.0, end: 0.5, schedule: exponential}
    distillation: null              # or {teacher: teacher.pt, weight: 0.5, tau: 1.0, kind: soft}
    amp: auto                       # bf16/fp16 autocast on CUDA; ignored on CPU
    checkpoint_every: 100
    eval_every: 0                   # 0: only at the end
    eval_batches: 10
    log_every: 10
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from .arch import atomic_file, atomic_write_text, read_yaml
from .checkpoint import read_file
from .data import DataConfig, build_datasets, heldout_batches, make_loader
from .errors import CheckpointError, VitslimError, check_device
from .runlock import LOCK_FILE, run_lock, remove_stale_temps
from .space import SearchSpace
from .supernet import MetaPathSupernet

CONFIG_VERSION = 1
RUN_FORMAT = "vitslim-supernet-run"
RUN_VERSION = 1
# Keys that may change between a run and its resume: they change what is logged or saved, never
# the numbers computed.
RESUME_FREE = ("log_every", "checkpoint_every", "eval_every", "eval_batches", "data.workers")


class ConfigError(VitslimError, ValueError):
    """A training config that cannot run: unknown key, wrong type, value out of range."""


class DivergedError(VitslimError, RuntimeError):
    """The training diverged: a weight or architecture weight became NaN or Inf."""


def non_finite_parameter(model: nn.Module) -> Optional[str]:
    """The name of the first parameter holding NaN or Inf, or None (one device sync when all are finite)."""
    named = list(model.named_parameters())
    if not named or bool(torch.stack([p.detach().isfinite().all() for _, p in named]).all()):
        return None
    return next(n for n, p in named if not bool(p.detach().isfinite().all()))


def _bad(path, value, expected) -> ConfigError:
    return ConfigError(f"{path}: got {value!r}, expected {expected}")


def _num(d: Mapping, key: str, path: str, default, lo=None, hi=None, integer=False, allow_none=False):
    v = d.get(key, default)
    if v is None and allow_none:
        return None
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise _bad(f"{path}{key}", v, "an integer" if integer else "a number")
    if not math.isfinite(v):
        raise _bad(f"{path}{key}", v, "a finite number")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise _bad(f"{path}{key}", v, f"a number {rng}")
    return v


def _keys(d, path: str, allowed) -> Mapping:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise _bad(path.rstrip("."), d, "a mapping")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{path}{k}: unknown key, expected one of {', '.join(allowed)}")
    return d


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.025
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    min_lr: float = 1e-5
    grad_clip: Optional[float] = None


@dataclass
class AlphaConfig:
    """Adam on the architecture weights, as DARTS/FBNet; frozen (kept uniform) before start_step."""
    lr: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    weight_decay: float = 1e-3
    start_step: int = 0


@dataclass
class TemperatureConfig:
    start: float = 5.0
    end: float = 0.5
    schedule: str = "exponential"  # exponential | linear | cosine | constant

    def at(self, step: int, steps: int) -> float:
        t = step / max(1, steps - 1)
        if self.schedule == "constant":
            return self.start
        if self.schedule == "linear":
            return self.start + (self.end - self.start) * t
        if self.schedule == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * t)) / 2
        return self.start * (self.end / self.start) ** t


@dataclass
class DistillConfig:
    teacher: str = ""
    weight: float = 0.5       # loss = (1 - weight) * CE + weight * KD
    tau: float = 1.0
    kind: str = "soft"        # soft (KL at temperature tau) | hard (CE on the teacher's argmax, DeiT)


@dataclass
class TrainConfig:
    space: SearchSpace
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    steps: int = 300
    batch_size: int = 64
    mode: str = "hard"
    widths: str = "max"
    label_smoothing: float = 0.1
    optimizer: OptimConfig = field(default_factory=OptimConfig)
    alpha: AlphaConfig = field(default_factory=AlphaConfig)
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    distillation: Optional[DistillConfig] = None
    amp: Any = "auto"
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_batches: int = 10
    log_every: int = 10
    threads: Optional[int] = None

    KEYS = ("version", "space", "data", "seed", "steps", "batch_size", "mode", "widths", "label_smoothing",
            "optimizer", "alpha", "temperature", "distillation", "amp", "checkpoint_every", "eval_every",
            "eval_batches", "log_every", "threads")

    @classmethod
    def from_dict(cls, d: Mapping, base_dir: str = ".") -> "TrainConfig":
        d = _keys(d, "", cls.KEYS)
        ver = d.get("version", CONFIG_VERSION)
        if ver != CONFIG_VERSION:
            raise _bad("version", ver, str(CONFIG_VERSION))
        if "space" not in d:
            raise ConfigError("space: missing, expected a search space .yaml path or mapping")
        sp = d["space"]
        if isinstance(sp, Mapping):
            space = SearchSpace.from_dict(sp)
        elif isinstance(sp, str):
            space = SearchSpace.load(sp, base_dir=base_dir)  # a path, or a shipped space's name (tiny)
        else:
            raise _bad("space", sp, "a path to a search space .yaml or a mapping")
        c = cls(space=space)
        c.data = DataConfig.from_dict(d.get("data") or {}, base_dir=base_dir)
        for k, want in (("image_size", space.input_size), ("num_classes", space.num_classes)):
            got = getattr(c.data, k)
            if got is not None and got != want:  # the supernet is built for the space's input and classes
                what = "input_size" if k == "image_size" else k
                raise ConfigError(f"data.{k}: got {got}, expected the search space's {what} ({want}); leave it out, "
                                  f"or set the space's {what}")
        c.seed = _num(d, "seed", "", 0, lo=0, integer=True)
        c.steps = _num(d, "steps", "", 300, lo=1, integer=True)
        c.batch_size = _num(d, "batch_size", "", 64, lo=1, integer=True)
        c.mode = d.get("mode", "hard")
        if c.mode not in ("hard", "soft"):
            raise _bad("mode", c.mode, "'hard' (single path) or 'soft' (Gumbel-softmax mixture)")
        c.widths = d.get("widths", "max")
        if c.widths not in ("max", "random"):
            raise _bad("widths", c.widths, "'max' or 'random'")
        c.label_smoothing = _num(d, "label_smoothing", "", 0.1, lo=0, hi=0.99)
        o = _keys(d.get("optimizer"), "optimizer.", ("lr", "weight_decay", "betas", "warmup_steps", "min_lr", "grad_clip"))
        c.optimizer = OptimConfig(
            lr=_num(o, "lr", "optimizer.", 1e-3, lo=0), weight_decay=_num(o, "weight_decay", "optimizer.", 0.025, lo=0),
            betas=_betas(o.get("betas", [0.9, 0.999]), "optimizer.betas"),
            warmup_steps=_num(o, "warmup_steps", "optimizer.", 0, lo=0, integer=True),
            min_lr=_num(o, "min_lr", "optimizer.", 1e-5, lo=0),
            grad_clip=_num(o, "grad_clip", "optimizer.", None, lo=0, allow_none=True))
        if c.optimizer.min_lr > c.optimizer.lr:
            raise ConfigError(f"optimizer.min_lr: got {c.optimizer.min_lr:g}, expected at most optimizer.lr "
                              f"({c.optimizer.lr:g}): the schedule decays from lr down to min_lr")
        if c.optimizer.warmup_steps > c.steps:
            raise ConfigError(f"optimizer.warmup_steps: got {c.optimizer.warmup_steps}, expected at most steps "
                              f"({c.steps}): the learning rate would never reach optimizer.lr")
        a = _keys(d.get("alpha"), "alpha.", ("lr", "betas", "weight_decay", "start_step"))
        c.alpha = AlphaConfig(lr=_num(a, "lr", "alpha.", 0.01, lo=0), betas=_betas(a.get("betas", [0.5, 0.999]), "alpha.betas"),
                              weight_decay=_num(a, "weight_decay", "alpha.", 1e-3, lo=0),
                              start_step=_num(a, "start_step", "alpha.", 0, lo=0, integer=True))
        t = _keys(d.get("temperature"), "temperature.", ("start", "end", "schedule"))
        c.temperature = TemperatureConfig(start=_num(t, "start", "temperature.", 5.0, lo=1e-3),
                                          end=_num(t, "end", "temperature.", 0.5, lo=1e-3),
                                          schedule=t.get("schedule", "exponential"))
        if c.temperature.schedule not in ("exponential", "linear", "cosine", "constant"):
            raise _bad("temperature.schedule", c.temperature.schedule, "exponential, linear, cosine or constant")
        dist = d.get("distillation")
        if dist:
            dist = _keys(dist, "distillation.", ("teacher", "weight", "tau", "kind"))
            teacher = dist.get("teacher")
            if not isinstance(teacher, str) or not teacher:
                raise _bad("distillation.teacher", teacher, "a path to a teacher checkpoint (.pt/.pth/.safetensors)")
            c.distillation = DistillConfig(
                teacher=os.path.normpath(os.path.join(base_dir, os.path.expanduser(teacher))),
                weight=_num(dist, "weight", "distillation.", 0.5, lo=0, hi=1), tau=_num(dist, "tau", "distillation.", 1.0, lo=1e-3),
                kind=dist.get("kind", "soft"))
            if c.distillation.kind not in ("soft", "hard"):
                raise _bad("distillation.kind", c.distillation.kind, "'soft' or 'hard'")
        c.amp = d.get("amp", "auto")
        if c.amp not in ("auto", True, False, "bf16", "fp16"):
            raise _bad("amp", c.amp, "auto, true, false, bf16 or fp16")
        c.checkpoint_every = _num(d, "checkpoint_every", "", 100, lo=0, integer=True)
        c.eval_every = _num(d, "eval_every", "", 0, lo=0, integer=True)
        c.eval_batches = _num(d, "eval_batches", "", 10, lo=1, integer=True)
        c.log_every = _num(d, "log_every", "", 10, lo=1, integer=True)
        c.threads = _num(d, "threads", "", None, lo=1, integer=True, allow_none=True)
        return c

    def to_dict(self) -> dict:
        d = {"version": CONFIG_VERSION, "space": self.space.to_dict(), "data": self.data.to_dict()}
        for k in ("seed", "steps", "batch_size", "mode", "widths", "label_smoothing"):
            d[k] = getattr(self, k)
        d["optimizer"] = dataclasses.asdict(self.optimizer)
        d["alpha"] = dataclasses.asdict(self.alpha)
        d["temperature"] = dataclasses.asdict(self.temperature)
        d["distillation"] = dataclasses.asdict(self.distillation) if self.distillation else None
        for k in ("amp", "checkpoint_every", "eval_every", "eval_batches", "log_every", "threads"):
            d[k] = getattr(self, k)
        return d


def _betas(v, path):
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in v):
        raise _bad(path, v, "two numbers in [0, 1)")
    return [float(b) for b in v]


def load_config(path) -> TrainConfig:
    path = os.fspath(path)
    d = read_yaml(path, ConfigError, "a supernet training config .yaml")
    try:
        return TrainConfig.from_dict(d if d is not None else {}, base_dir=os.path.dirname(os.path.abspath(path)))
    except VitslimError as e:
        raise type(e)(f"{path}: {e}") from None


def _metric_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn line (killed mid-write) or a blank one sorts last (dropped)."""
    try:
        return float(json.loads(line).get("step", 0)) if line.strip() else float("inf")
    except (ValueError, AttributeError):
        return float("inf")


def _check_not_foreign(out_dir: str, cfg_dict: Mapping) -> None:
    """A fresh run overwrites config.yaml, metrics.jsonl and report.json: only where they are its own (an
    earlier start of the same config, interrupted before its first checkpoint), never someone else's."""
    mine = [f for f in ("config.yaml", "metrics.jsonl", "report.json") if os.path.exists(os.path.join(out_dir, f))]
    if not mine:
        return
    ours = False
    try:
        with open(os.path.join(out_dir, "config.yaml"), encoding="utf-8") as f:
            prev = yaml.safe_load(f)
        ours = isinstance(prev, Mapping) and not config_diff(prev, cfg_dict)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        pass
    if not ours:
        raise ConfigError(f"{out_dir}: holds {', '.join(mine)} but no checkpoint.pt (not a run of this config); "
                          "choose another --out")


def _started_here(out_dir: str) -> bool:
    return os.path.isdir(out_dir) and any(os.path.exists(os.path.join(out_dir, f)) for f in ("config.yaml", "metrics.jsonl"))


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> List[str]:
    """'key: old -> new' for every leaf that differs (RESUME_FREE keys ignored)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        p = f"{prefix}{k}"
        if p in RESUME_FREE:
            continue
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, p + ".")
        elif a != b:
            out.append(f"{p}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------- pieces of the loop
def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# parameters timm's models name in `no_weight_decay()` (ViT/DeiT, Swin, EfficientFormer, EfficientViT)
NO_DECAY_NAMES = frozenset(("pos_embed", "cls_token", "dist_token", "absolute_pos_embed",
                            "relative_position_bias_table", "attention_biases"))


def decay_groups(named_parameters, weight_decay: float) -> list:
    """AdamW parameter groups by timm's rule: no weight decay on norms, biases and LayerScale (every
    tensor of at most one dimension), position embeddings, class / distillation tokens and attention
    bias tables (`NO_DECAY_NAMES`); `weight_decay` on the rest. Frozen parameters are left out."""
    decay, no = [], []
    for n, p in named_parameters:
        if p.requires_grad:
            (no if p.dim() <= 1 or n.rsplit(".", 1)[-1] in NO_DECAY_NAMES else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no, "weight_decay": 0.0}]


def param_groups(model: MetaPathSupernet, weight_decay: float):
    """The supernet's weights (not its architecture parameters) by `decay_groups`."""
    return decay_groups(model.named_weight_parameters(), weight_decay)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, cfg: DistillConfig) -> torch.Tensor:
    if cfg.kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=-1))
    T = cfg.tau
    return F.kl_div(F.log_softmax(student / T, dim=-1), F.log_softmax(teacher / T, dim=-1),
                    reduction="batchmean", log_target=True) * (T * T)


def alpha_stats(model: MetaPathSupernet) -> dict:
    """How far the alphas are from uniform: mean |p - 1/n| and mean entropy / log n."""
    dev, ent, n = 0.0, 0.0, 0
    for p in model.probabilities():
        k = p.shape[1]
        dev += (p - 1 / k).abs().sum(1).mean().item() * p.shape[0]
        ent += (-(p * p.clamp_min(1e-12).log()).sum(1) / math.log(k)).sum().item()
        n += p.shape[0]
    return {"alpha_dev": dev / n, "alpha_entropy": ent / n}


class _Dist:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        self.started_here = False
        self.device = torch.device("cpu")

    def init(self, device: torch.device):
        self.device = device  # nccl reduces CUDA tensors only
        if self.enabled and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.started_here = True

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a small tensor; returned on the CPU."""
        if self.enabled:
            t = t.to(self.device).clone()
            torch.distributed.all_reduce(t)
        return t.cpu()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_sum(t) / self.world

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def check_same_data(self, train_ds, held_ds, data_cfg) -> None:
        """Every rank must index the same images: a rank whose image folder lists other files (another copy
        on another node, files added or unreadable during the scan) would silently train on mislabelled or
        repeated batches. Every rank compares all digests, so all of them raise together."""
        if not self.enabled:
            return
        import hashlib
        mine = []
        for ds in (train_ds, held_ds):
            h = hashlib.sha256(f"{type(ds).__name__}:{len(ds)}".encode())
            for p, label in getattr(ds, "samples", ()):
                h.update(f"{p}\0{label}\n".encode("utf-8", "surrogateescape"))
            mine.append((len(ds), h.hexdigest()))
        every = [None] * self.world
        torch.distributed.all_gather_object(every, mine)
        for r, theirs in enumerate(every):
            if theirs != every[0]:
                where = data_cfg.train_dir or "the data"
                raise ConfigError(f"data.train_dir {where}: rank {r} sees {theirs[0][0]} training and {theirs[1][0]} "
                                  f"held-out images, rank 0 {every[0][0][0]} and {every[0][1][0]} (or other files), "
                                  "expected the same images on every rank (one copy of the folder, unchanged while "
                                  "the run starts)")

    def close(self):
        if self.started_here:
            torch.distributed.destroy_process_group()


def _atomic_save(obj, path: str) -> None:
    """torch.save through a synced temporary: the previous checkpoint stays until the new one is whole on disk
    (a crash or power cut never leaves a truncated checkpoint.pt, an error never leaves the temporary)."""
    with atomic_file(path, "wb") as f:
        torch.save(obj, f)


def _atomic_json(obj, path: str) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


@torch.no_grad()
def evaluate(model: MetaPathSupernet, loader, device, choice: Mapping, dist: Optional[_Dist] = None,
             amp_dtype=None) -> float:
    """Top-1 accuracy of `choice` (fixed mode, eval-mode BatchNorm) on the loader's batches."""
    was = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x, mode="fixed", choice=choice)
        correct += torch.tensor([(out.argmax(-1) == y).sum().item(), y.numel()], dtype=torch.float64)
    model.train(was)
    if dist is not None:
        correct = dist.all_sum(correct)
    return float(correct[0] / max(1.0, float(correct[1])))


def read_run(run_dir: str) -> dict:
    """The training-state checkpoint of a run directory (weights_only)."""
    path = os.path.join(os.fspath(run_dir), "checkpoint.pt")
    if not os.path.isdir(os.fspath(run_dir)):
        raise CheckpointError(f"{run_dir}: no such run directory")
    if not os.path.isfile(path):
        raise CheckpointError(f"{run_dir}: no checkpoint.pt, expected a run directory written by 'vitslim supernet train'")
    obj = read_file(path)
    if not isinstance(obj, Mapping) or obj.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path}: not a supernet run checkpoint (format {obj.get('format') if isinstance(obj, Mapping) else None!r}, "
                              f"expected {RUN_FORMAT!r})")
    if obj.get("version") != RUN_VERSION:
        raise CheckpointError(f"{path}: run checkpoint version {obj.get('version')!r}, expected {RUN_VERSION}")
    _check_run(obj, path)
    return obj


def _check_run(obj: Mapping, path: str) -> None:
    """The parts every reader of a run uses: config (its space and steps), step and the supernet's weights, these
    checked against the space built on the meta device (a damaged or edited file allocates nothing, and says so in
    one line)."""
    from .checkpoint import check_fit, unwrap_state_dict
    from .errors import first_line
    from .layers import no_weight_init
    try:
        cfg = obj["config"]
        if not isinstance(cfg, Mapping):
            raise TypeError(f"config is a {type(cfg).__name__}, expected a mapping")
        int(cfg["steps"]), int(obj["step"])
        sd = unwrap_state_dict(obj["model"], "model")
        with no_weight_init(), torch.device("meta"):
            ref = MetaPathSupernet(cfg["space"])
        check_fit(ref, sd, "model")
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # Arch/CheckpointError too
        raise CheckpointError(f"{path}: a damaged run checkpoint ({first_line(e)[:160]}), expected what "
                              "'vitslim supernet train' writes") from None


def load_supernet(run_dir: str):
    """(MetaPathSupernet with the run's latest weights and alphas, in eval mode, the run checkpoint)."""
    from .layers import no_weight_init
    obj = read_run(run_dir)
    with no_weight_init():  # every tensor comes from the run (strict): no random init drawn from the caller's RNG
        model = MetaPathSupernet(obj["config"]["space"])
    model.load_state_dict(obj["model"])
    return model.eval(), obj


# ---------------------------------------------------------------- the loop
def train(config: TrainConfig, out_dir: str, resume: bool = False, progress: bool = True,
          stop_at: Optional[int] = None, device: Optional[str] = None) -> dict:
    """Train a supernet into out_dir; returns the final report. `stop_at`: stop after that many
    steps with a checkpoint written, as if interrupted (a later resume continues exactly). The caller's torch
    RNG state and thread count are as they were when it returns."""
    out_dir = os.fspath(out_dir)
    cfg = config
    dist = _Dist()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if device == "cuda":
        device = f"cuda:{dist.local_rank}"  # one GPU per torchrun process
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init(dev)
    threads = torch.get_num_threads()  # the caller's, back when the run ends (the config's `threads` is the run's)
    try:
        # the run seeds torch's RNG (cfg.seed, or the checkpoint's state): the caller's is restored afterwards
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            if dist.rank != 0:  # rank 0 holds the directory for all of them
                return _train(cfg, out_dir, resume, progress, stop_at, dev, dist)
            existed = os.path.isdir(out_dir)
            try:
                with run_lock(out_dir, error=ConfigError, what="supernet training"):
                    remove_stale_temps(out_dir)  # what a killed run left half-written (never a result)
                    return _train(cfg, out_dir, resume, progress, stop_at, dev, dist)
            except BaseException:
                if not existed and os.path.isdir(out_dir) and set(os.listdir(out_dir)) <= {LOCK_FILE}:
                    shutil.rmtree(out_dir, ignore_errors=True)  # refused before it wrote anything: nothing left behind
                raise
    finally:
        torch.set_num_threads(threads)
        dist.close()


def _train(cfg: TrainConfig, out_dir: str, resume: bool, progress: bool, stop_at, dev: torch.device, dist: _Dist) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    main = dist.rank == 0
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    cfg_dict = cfg.to_dict()
    state = None
    if resume and not os.path.exists(ckpt_path) and _started_here(out_dir):
        # a start of this config killed before its first checkpoint: nothing to resume, so it starts over
        _check_not_foreign(out_dir, cfg_dict)
        if main:
            print(f"{out_dir}: no checkpoint yet (stopped before the first one): starting from step 0", file=sys.stderr)
        resume = False
    if resume:
        state = read_run(out_dir)
        diff = config_diff(state["config"], cfg_dict)
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ConfigError(f"cannot resume {out_dir}: the config differs from the run's: {'; '.join(diff[:3])}{more}")
    elif os.path.exists(ckpt_path):  # the same command again: it continues (a different config is refused)
        state = read_run(out_dir)
        diff = config_diff(state["config"], cfg_dict)
        if diff:
            more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
            raise ConfigError(f"{out_dir}: already holds a run (checkpoint.pt at step {state['step']}) of another "
                              f"config: {'; '.join(diff[:3])}{more}; choose another --out")
        if main and int(state["step"]) < cfg.steps:
            print(f"{out_dir}: resuming at step {state['step']} of {cfg.steps}", file=sys.stderr)
        resume = True
    else:
        _check_not_foreign(out_dir, cfg_dict)
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size: got {cfg.batch_size}, expected a multiple of the number of processes ({dist.world})")

    # --- data (build first: a bad data directory fails before any file is written)
    space = cfg.space
    train_ds, held_ds = build_datasets(cfg.data, space.input_size, space.num_classes, seed=cfg.seed,
                                       progress=progress and dist.rank == 0)
    dist.check_same_data(train_ds, held_ds, cfg.data)
    if cfg.batch_size > len(train_ds):
        raise ConfigError(f"batch_size: got {cfg.batch_size}, expected at most the training split's "
                          f"{len(train_ds)} images (each batch would repeat images)")

    # --- model, optimisers, schedule
    torch.manual_seed(cfg.seed)
    model = MetaPathSupernet(space).to(dev)
    model.distilled_training = bool(space.distillation and cfg.distillation)
    opt = torch.optim.AdamW(param_groups(model, cfg.optimizer.weight_decay), lr=cfg.optimizer.lr,
                            betas=tuple(cfg.optimizer.betas))
    alpha_opt = torch.optim.Adam(model.arch_parameters(), lr=cfg.alpha.lr, betas=tuple(cfg.alpha.betas),
                                 weight_decay=cfg.alpha.weight_decay)
    min_ratio = cfg.optimizer.min_lr / cfg.optimizer.lr if cfg.optimizer.lr > 0 else 0.0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.optimizer.warmup_steps, min_ratio))
    amp_dtype = None
    if dev.type == "cuda" and cfg.amp:
        amp_dtype = torch.float16 if cfg.amp == "fp16" or (cfg.amp in ("auto", True) and not torch.cuda.is_bf16_supported()) \
            else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    arch_gen = torch.Generator().manual_seed(cfg.seed + 1)   # Gumbel noise: the same on every rank
    width_gen = torch.Generator().manual_seed(cfg.seed + 2)  # widths per step: the same on every rank
    teacher = None
    if cfg.distillation:
        from .checkpoint import load_checkpoint
        teacher, tarch = load_checkpoint(cfg.distillation.teacher)
        if tarch["num_classes"] != space.num_classes:
            raise ConfigError(f"distillation.teacher {cfg.distillation.teacher}: has {tarch['num_classes']} classes, "
                              f"expected {space.num_classes} (the search space's)")
        teacher = teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        alpha_opt.load_state_dict(state["alpha_optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        arch_gen.set_state(rng["arch"])
        width_gen.set_state(rng["width"])
        if dev.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], dev)
        start = int(state["step"])

    if main:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "config.yaml"),
                          "# resolved supernet training config (the search space inlined)\n"
                          + yaml.safe_dump(cfg_dict, sort_keys=False))
        mpath = os.path.join(out_dir, "metrics.jsonl")
        kept = []
        if resume and os.path.exists(mpath):  # drop what ran after the checkpoint: one continuous curve
            on_schedule = start % cfg.log_every == 0 or bool(cfg.eval_every and start % cfg.eval_every == 0)
            with open(mpath, encoding="utf-8") as f:  # (a stop's own last line is not the uninterrupted curve's)
                kept = [ln for ln in f for st in (_metric_step(ln),) if st < start or (st == start and on_schedule)]
        atomic_write_text(mpath, "".join(kept))

    net: nn.Module = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                  find_unused_parameters=True)
    loader = make_loader(train_ds, cfg.batch_size, cfg.steps, seed=cfg.seed, start_step=start, rank=dist.rank,
                         world_size=dist.world, workers=cfg.data.workers, pin_memory=dev.type == "cuda")
    held = heldout_batches(held_ds, cfg.batch_size, max_batches=cfg.eval_batches, rank=dist.rank,
                           world_size=dist.world, workers=cfg.data.workers) if len(held_ds) else None

    saved_at = [start if state is not None else None]

    def check_finite(step: int):
        """Stop before a diverged model is logged or saved over the last good checkpoint."""
        bad = non_finite_parameter(model)
        if bad is None:
            return
        kept = f"checkpoint.pt (step {saved_at[0]}) is kept" if saved_at[0] is not None else "no checkpoint was written"
        last = f"; loss {float(loss.detach()):g}" if loss is not None else ""
        raise DivergedError(f"step {step}: {bad} became NaN or Inf (the training diverged{last}); {kept}; lower "
                            "optimizer.lr or alpha.lr, or set optimizer.grad_clip, and train into another --out")

    def save(step: int):
        check_finite(step)
        saved_at[0] = step
        if not main:
            return
        imp = {"step": step, "tau": cfg.temperature.at(max(0, step - 1), cfg.steps), **model.importance()}
        obj = {"format": RUN_FORMAT, "version": RUN_VERSION, "step": step, "config": cfg_dict,
               "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "optimizer": opt.state_dict(), "alpha_optimizer": alpha_opt.state_dict(),
               "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
               "rng": {"torch": torch.get_rng_state(), "arch": arch_gen.get_state(), "width": width_gen.get_state(),
                       "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None},
               "importance": imp}
        _atomic_save(obj, ckpt_path)
        _atomic_json(imp, os.path.join(out_dir, "importance.json"))

    bar = None
    if main and progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=start, desc="supernet", unit="step", dynamic_ncols=True)
    metrics_f = open(os.path.join(out_dir, "metrics.jsonl"), "a", encoding="utf-8") if main else None
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    model.train()
    t0, last = time.perf_counter(), None
    loss = None
    try:
        for step, (x, y) in zip(range(start, end), loader):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            tau = cfg.temperature.at(step, cfg.steps)
            if cfg.widths == "random":
                widths = [s.min_width + space.width_step * int(torch.randint(
                    (s.max_width - s.min_width) // space.width_step + 1, (1,), generator=width_gen))
                    for s in space.stages]
            else:
                widths = list(model.max_widths)
            noise = model.gumbel(arch_gen)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = net(x, mode=cfg.mode, widths=widths, noise=noise, tau=tau)
                cls_out, dist_out = out if isinstance(out, tuple) else (out, out)
                ce = F.cross_entropy(cls_out.float(), y, label_smoothing=cfg.label_smoothing)
                loss = ce
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(x)
                    kd = distill_loss(dist_out.float(), t_out.float(), cfg.distillation)
                    loss = (1 - cfg.distillation.weight) * ce + cfg.distillation.weight * kd
            opt.zero_grad(set_to_none=True)
            alpha_opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optimizer.grad_clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.weight_parameters(), cfg.optimizer.grad_clip)
            scaler.step(opt)
            if step >= cfg.alpha.start_step:
                scaler.step(alpha_opt)
            scaler.update()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            done = step + 1
            if done % cfg.log_every == 0 or done == end or (cfg.eval_every and done % cfg.eval_every == 0):
                check_finite(done)
                with torch.no_grad():
                    acc = (cls_out.argmax(-1) == y).float().mean()
                    red = dist.all_mean(torch.stack([loss.detach().float(), acc]))
                rec = {"step": done, "loss": float(red[0]), "train_acc": float(red[1]),
                       "lr": lr, "tau": tau, "widths": widths, **alpha_stats(model)}
                if cfg.mode == "hard" and model.last_choice:
                    rec["path"] = ["".join({"meta4d": "4", "meta3d": "3", "identity": "-"}[t] for t in bl)
                                   for bl in model.last_choice["blocks"]]
                if cfg.eval_every and done % cfg.eval_every == 0 and held is not None:
                    rec["heldout_acc"] = evaluate(model, held, dev, model.best_choice(), dist, amp_dtype)
                now = time.perf_counter()
                rec["sec_per_step"] = (now - t0) / (done - (last if last is not None else start))
                t0, last = now, done
                if metrics_f:
                    metrics_f.write(json.dumps(rec) + "\n")
                    metrics_f.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tau=f"{tau:.2f}")
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < end:
                save(done)
    finally:
        if bar is not None:
            bar.close()
        if metrics_f:
            metrics_f.close()
    done = max(start, end)
    save(done)
    report = {"step": done, "steps": cfg.steps, "finished": done >= cfg.steps}
    if done >= cfg.steps:
        best = model.best_choice()
        report["best_choice"] = best
        if held is not None:
            report["heldout_acc_best"] = evaluate(model, held, dev, best, dist, amp_dtype)
        report["importance"] = {k: v for k, v in model.importance().items() if k in ("metapath", "stage")}
        report.update(alpha_stats(model))
        if main:
            with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
                last = [json.loads(ln) for ln in f if _metric_step(ln) == done]
            if last:  # the last step is always logged
                report["final_loss"] = last[-1]["loss"]
                report["final_train_acc"] = last[-1].get("train_acc")
            _atomic_json(report, os.path.join(out_dir, "report.json"))
    dist.barrier()
    return report
