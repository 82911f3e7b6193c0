"""Layers shared by the families, and BatchNorm folding for deployment.

Fusion protocol: a module that can fold its BatchNorms defines `fuse()` returning its deploy
replacement (an nn.Module computing the same function in eval mode). `fuse_model` applies it
bottom-up, and also folds Conv/Linear -> BatchNorm pairs that sit next to each other in an
nn.Sequential (the EfficientFormer stem, say).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import threading

import torch
import torch.nn as nn

from .arch import check_int, is_int
from .errors import bad

_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")
_NO_INIT_LOCK = threading.Lock()  # guards _NO_INIT_USERS and the patching of torch.nn.init
_NO_INIT_USERS = 0  # threads (nesting counted) inside no_weight_init: torch.nn.init is patched while > 0
_NO_INIT_SAVED: dict = {}  # torch.nn.init's own functions while patched
_NO_INIT_THREAD = threading.local()  # .depth: the calling thread's nesting in no_weight_init


def _skip_init_in_this_thread(orig):
    """`orig` for every thread but one inside no_weight_init, for which it does nothing."""
    @functools.wraps(orig)
    def init_fn(tensor, *args, **kwargs):
        if getattr(_NO_INIT_THREAD, "depth", 0):
            return tensor
        return orig(tensor, *args, **kwargs)  # another thread's build keeps its random init
    return init_fn


@contextlib.contextmanager
def no_weight_init():
    """Builds in this block leave parameters uninitialised (torch.nn.init's functions do nothing): for a
    network whose every parameter and persistent buffer a strict `load_state_dict` then overwrites (a
    checkpoint, a sub-network extracted from the supernet, a pruned copy), or that is only counted on the
    meta device. The random init of a large network costs seconds (DeiT-B: 1.4 s of a 1.5 s build), and on
    the meta device it imports torch._dynamo. Buffers computed from shapes (index tables) are built as usual.
    Never for a network that runs with its own weights (latency measurement).

    Only the calling thread's builds skip their init: a network built meanwhile in another thread draws its
    random init as usual. torch.nn.init holds wrappers while any thread is inside, its own functions again
    once the last one leaves."""
    global _NO_INIT_USERS
    init = torch.nn.init
    with _NO_INIT_LOCK:
        if _NO_INIT_USERS == 0:
            _NO_INIT_SAVED.clear()
            _NO_INIT_SAVED.update((n, getattr(init, n)) for n in _INIT_FUNCTIONS if hasattr(init, n))
            for n, f in _NO_INIT_SAVED.items():
                setattr(init, n, _skip_init_in_this_thread(f))
        _NO_INIT_USERS += 1
    _NO_INIT_THREAD.depth = getattr(_NO_INIT_THREAD, "depth", 0) + 1
    try:
        yield
    finally:
        _NO_INIT_THREAD.depth -= 1
        with _NO_INIT_LOCK:
            _NO_INIT_USERS -= 1
            if _NO_INIT_USERS == 0:
                for n, f in _NO_INIT_SAVED.items():
                    setattr(init, n, f)
                _NO_INIT_SAVED.clear()


def fold_bn_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A new Conv2d/Linear equal to `bn(layer(x))` in eval mode."""
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std
    w = layer.weight
    b = layer.bias if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, layer.groups, bias=True, padding_mode=layer.padding_mode)
    elif isinstance(layer, nn.Linear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=True)
    else:
        raise TypeError(f"cannot fold BatchNorm into {type(layer).__name__}")
    new = new.to(device=w.device, dtype=w.dtype)
    shape = (-1,) + (1,) * (w.dim() - 1)
    with torch.no_grad():
        new.weight.copy_(w * scale.reshape(shape))
        new.bias.copy_((b - bn.running_mean) * scale + beta)
    return new


def fold_linear_after_bn(bn: nn.BatchNorm1d, lin: nn.Linear) -> nn.Linear:
    """A Linear equal to `lin(bn(x))` in eval mode (EfficientViT's BN + Linear head)."""
    std = (bn.running_var + bn.eps).sqrt()
    s = bn.weight / std
    t = bn.bias - bn.running_mean * s
    new = nn.Linear(lin.in_features, lin.out_features, bias=True).to(lin.weight)
    with torch.no_grad():
        new.weight.copy_(lin.weight * s[None, :])
        b = lin.bias if lin.bias is not None else torch.zeros_like(new.bias)
        new.bias.copy_(b + lin.weight @ t)
    return new


class Classifier:
    """timm's `get_classifier()` / `reset_classifier(num_classes)` for a family's network (a mixin).

    `_heads`: the attributes holding classifiers (the distillation head after the main one; one that is None
    is not built); `_new_head(old, num_classes)`: a freshly initialised classifier like `old` (an existing head)
    for `num_classes` classes."""

    _heads = ("head",)

    def _built_heads(self):
        return [n for n in self._heads if getattr(self, n, None) is not None]

    def get_classifier(self):
        """The module(s) `forward_head` maps the pooled features to logits with: the head, or (head,
        distillation head) for a distilled network, as timm returns them."""
        heads = tuple(getattr(self, n) for n in self._built_heads())
        return heads[0] if len(heads) == 1 else heads

    def reset_classifier(self, num_classes: int) -> None:
        """New, randomly initialised classifier(s) for `num_classes` classes, trainable, on the old head's device
        and dtype (fine-tuning on another dataset; a frozen backbone stays frozen). `.arch["num_classes"]` follows:
        the model saves and rebuilds as it now is."""
        if is_int(num_classes) and num_classes == 0:  # timm's "no classifier": no arch config describes one
            raise bad("num_classes", num_classes, "an integer >= 1 (forward_features gives the features)")
        n = check_int(num_classes, "num_classes")
        for name in self._built_heads():
            old = getattr(self, name)
            like = next(old.parameters())
            setattr(self, name, self._new_head(old, n).to(device=like.device, dtype=like.dtype))
        self.arch = dict(self.arch, num_classes=n)
        if hasattr(self, "num_classes"):
            self.num_classes = n


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d, the unit of EfficientViT/SHViT; keys `c.*`, `bn.*`."""

    def __init__(self, cin, cout, k=1, stride=1, pad=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        bn = nn.BatchNorm2d(cout)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)

    @torch.no_grad()
    def fuse(self):
        return fold_bn_into(self.c, self.bn)


class BNLinear(nn.Sequential):
    """BatchNorm1d + Linear, EfficientViT/SHViT's classifier; keys `bn.*`, `l.*`."""

    def __init__(self, cin, cout, bias=True, std=0.02):
        super().__init__()
        self.add_module("bn", nn.BatchNorm1d(cin))
        self.add_module("l", nn.Linear(cin, cout, bias=bias))
        nn.init.trunc_normal_(self.l.weight, std=std)
        if bias:
            nn.init.zeros_(self.l.bias)

    @torch.no_grad()
    def fuse(self):
        return fold_linear_after_bn(self.bn, self.l)


def _fold_sequential(seq: nn.Sequential) -> nn.Sequential:
    mods = list(seq._modules.items())
    out, i, changed = [], 0, False
    while i < len(mods):
        name, m = mods[i]
        nxt = mods[i + 1][1] if i + 1 < len(mods) else None
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(nxt, (nn.BatchNorm2d, nn.BatchNorm1d)) \
                and nxt.track_running_stats and nxt.running_var is not None:
            out.append((name, fold_bn_into(m, nxt)))
            out.append((mods[i + 1][0], nn.Identity()))  # keep indices so key names stay stable
            i += 2
            changed = True
            continue
        out.append((name, m))
        i += 1
    if not changed:
        return seq
    new = nn.Sequential()
    for n, m in out:
        new.add_module(n, m)
    return new


@torch.no_grad()
def fuse_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every BatchNorm folded into its neighbour. The layers it builds draw a
    random init that the folded weights then replace: drawn on a fork of torch's RNG, the caller's is kept."""
    with torch.random.fork_rng(devices=[]):
        return _fuse_model(model)


def _fuse_model(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()

    def visit(mod: nn.Module) -> nn.Module:
        for name, child in list(mod._modules.items()):
            if child is None:
                continue
            new = visit(child)
            if new is not child:
                setattr(mod, name, new)
        if type(mod) is nn.Sequential:
            mod = _fold_sequential(mod)
        fuse = getattr(mod, "fuse", None)
        if callable(fuse) and mod is not model:
            mod = fuse()
        return mod

    model = visit(model)
    if callable(getattr(model, "fuse", None)) and not isinstance(model, nn.Sequential):
        model = model.fuse()
    model.eval()
    model.fused = True
    return model
