"""The few public functions users script against (see README and interface.md)."""
from __future__ import annotations

import os
from typing import Mapping, Tuple, Union

import torch.nn as nn

from supernet import arch as _arch
from supernet import checkpoint as _ckpt
from supernet.count import count as _count
from supernet.errors import ArchError
from supernet.layers import fuse_model
from supernet.registry import get_family, get_preset as _get_preset, preset_names

ArchLike = Union[str, os.PathLike, Mapping]


def _check_module(model, name: str = "model") -> None:
    if not isinstance(model, nn.Module):
        hint = " (build one with vitslim.build_model or load one with vitslim.load_checkpoint)" \
            if isinstance(model, (str, os.PathLike, Mapping)) else ""
        raise TypeError(f"{name}: got {type(model).__name__}, expected an nn.Module{hint}")


def list_presets() -> list:
    """Names of every preset arch, sorted."""
    return preset_names()


def get_preset(name: str) -> dict:
    """The arch config (a plain dict) of a preset, validated and with defaults filled in."""
    return _arch.validate(_get_preset(name))


def resolve_arch(target: ArchLike) -> dict:
    """An arch config from a dict, a preset name or a path to an arch .yaml."""
    if isinstance(target, Mapping):
        return _arch.validate(target)
    if isinstance(target, (str, os.PathLike)):
        s = os.fspath(target)
        if s in preset_names():
            return get_preset(s)
        if s.endswith((".yaml", ".yml")) or os.path.isfile(s):
            return _arch.load_arch(s)
        if os.path.isdir(s):
            raise ArchError(f"{s}: is a directory, expected a preset name, an arch .yaml or a checkpoint file")
        if s.endswith((".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")) or os.sep in s:
            raise ArchError(f"{s}: no such file, expected a preset name, an arch .yaml or a checkpoint (.pt/.pth/.safetensors)")
        return get_preset(s)  # raises with the list of presets and near matches
    raise ArchError(f"arch: got {type(target).__name__}, expected a dict, a preset name or a path to an arch .yaml")


def build_model(target: ArchLike) -> nn.Module:
    """A freshly initialised nn.Module for an arch config, preset name or arch .yaml path."""
    a = resolve_arch(target)
    model = get_family(a["family"]).build(a)
    model.arch = a
    return model


def load_checkpoint(path, arch: "ArchLike | None" = None) -> Tuple[nn.Module, dict]:
    """(model in eval mode, arch) from an official, timm, Hugging Face or vitslim checkpoint; no hint needed.
    `arch` (dict, preset name or arch .yaml): the network a plain state dict holds where its shapes cannot tell
    (a bare `torch.save(model.state_dict())` of a pruned model, a ViT whose heads are not 64 channels wide)."""
    return _ckpt.load_checkpoint(path, resolve_arch(arch) if arch is not None else None)


def save_checkpoint(model: nn.Module, arch: Mapping, path) -> None:
    """Write one file that `load_checkpoint` reads back (arch config + state dict); a path ending in
    .safetensors writes that format (the arch in its metadata), else a torch file."""
    _check_module(model)
    _ckpt.save_checkpoint(model, arch, path)


def count(model_or_arch, input_size: int | None = None) -> dict:
    """{"params": int, "macs": int} of a module, arch config, preset name or arch .yaml."""
    if not isinstance(model_or_arch, nn.Module):
        model_or_arch = resolve_arch(model_or_arch)
    return _count(model_or_arch, input_size)


def fuse(model: nn.Module) -> nn.Module:
    """An inference copy with BatchNorm folded into the neighbouring conv/linear, as deployed."""
    _check_module(model)
    return fuse_model(model)


def save_arch(arch: Mapping, path) -> dict:
    """Validate and write an arch config as YAML (atomically); returns the normalised config."""
    return _arch.save_arch(arch, path)


def load_arch(path) -> dict:
    """The arch config (a plain dict, validated, defaults filled in) of an arch .yaml file, as `save_arch`
    writes it; ArchError (a ValueError) naming the file when it is missing, unreadable or not a valid arch.
    A preset by name is `get_preset`; `resolve_arch` takes either."""
    return _arch.load_arch(path)


def prune_model(target, prune_target, data=None, calibration=None, table=None, batch_size: int = 32,
                labels: str = "auto", progress: bool = False, arch: "ArchLike | None" = None,
                mean=None, std=None, crop_pct=None, importance=None, train_batches=None, heldout_batches=None,
                **config) -> Tuple[nn.Module, dict, dict]:
    """Taylor structured pruning from Python, as `vitslim prune` does it: (pruned model, its arch, report).

    target: a DeiT or Swin module built by vitslim (with `.arch`; also wrapped by DDP or torch.compile) or a checkpoint path (official, timm, Hugging
    Face or vitslim; `arch`: see load_checkpoint). prune_target: "macs=0.5", "params=0.5", "latency=0.5x" (with `table`) or several joined by
    commas. data: "synthetic", an ImageFolder directory (normalised with `mean` / `std`, eval-cropped by `crop_pct`:
    ImageNet's and 0.875 by default) or a .pt of images, for calibration (and fine-tuning);
    or give `calibration`, an iterable of (images, labels or None) batches from your own loader (a DataLoader:
    only its first `calib_batches`, 8 by default, are read; without `data` the held-out figures share them), or
    `train_batches`, such an iterable to calibrate on (its first batches) and, with `finetune_steps`, to fine-tune
    on between iterative steps (read on from step to step, started again when it runs out), with `heldout_batches`
    for the held-out figures (the first training batches without it). table: a latency
    table (path, shipped name or LatencyTable) for latency targets. **config: any `pruning.pruner.PruneConfig`
    field (criterion, selection, iterative_steps, finetune_steps, kd, min_keep, keep, round_to, prune_embed,
    depth, calib_batches, eval_batches, seed, ...). importance: your own criterion instead of `criterion`, a
    `pruning.Importance` (e.g. `pruning.TaylorImportance(loss_fn)` with your loss(logits, labels or None), or a
    subclass whose `score` returns `pruning.Scores`); the budgets and surgery are vitslim's. The input model is
    not modified."""
    from pruning.pruner import BatchSource, DataSource, PruneConfig, prune
    if isinstance(target, nn.Module):
        target = _ckpt.unwrap_model(target)  # the network inside DistributedDataParallel / torch.compile
        own = getattr(target, "arch", None)
        if arch is not None and own is not None and resolve_arch(arch) != resolve_arch(own):
            raise ArchError("arch: differs from the model's own .arch, expected the model's (or a model without one)")
        arch = arch if arch is not None else own
        if arch is None:
            raise ArchError("model: has no .arch (build it with vitslim.build_model or load_checkpoint, or pass arch=)")
        model, arch = target, resolve_arch(arch)
    else:
        model, arch = load_checkpoint(target, arch)
    if importance is not None:
        from pruning import Importance, PruneError
        if not isinstance(importance, Importance):
            raise TypeError(f"importance: got {type(importance).__name__}, expected a pruning.Importance (a subclass "
                            "with score(model, arch, batches, progress=None, embed=False) -> pruning.Scores)")
        if "criterion" in config:
            raise PruneError(f"criterion={config['criterion']!r} and importance: both name the criterion, expected one")
    cfg = PruneConfig(target=prune_target, **config).check()
    src = None
    if train_batches is not None:
        from pruning import PruneError
        if data is not None:
            raise PruneError(f"data={os.fspath(data)!r} and train_batches: both give training images, expected one")
        src = BatchSource(arch, train_batches, heldout_batches)
    elif heldout_batches is not None:
        from pruning import PruneError
        raise PruneError("heldout_batches: given without train_batches, expected both (or data=, which holds out "
                         "its own)")
    if data is not None:
        src = DataSource(os.fspath(data), arch, batch_size=batch_size, seed=cfg.seed, labels=labels,
                         mean=mean, std=std, crop_pct=crop_pct,
                         heldout_images=cfg.eval_batches * batch_size)
    if table is not None and not hasattr(table, "predict"):
        from latency_tables.table import LatencyTable
        table = LatencyTable.load(os.fspath(table))
    res = prune(model, arch, cfg, data=src, calibration=calibration,
                table=table, progress=progress, importance=importance)
    res.model.arch = res.arch
    return res.model, res.arch, res.report
