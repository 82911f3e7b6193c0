"""EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention
(Liu et al., CVPR 2023, arXiv 2305.07027; official code microsoft/Cream, EfficientViT/classification).

A 16x16 convolutional patchify stem, three stages of "sandwich" blocks
(DW -> FFN -> cascaded group attention in local windows -> DW -> FFN), patch-merging
downsampling between stages, and a BatchNorm + Linear head.

This file also holds the pieces SHViT (shvit.py) shares: the stem, `Residual`, `FFN`,
`PatchMerging` with its squeeze-excite, the downsample (Res(DW)+Res(FFN), PatchMerging,
Res(DW)+Res(FFN)), the network skeleton (`StagedNet`) and the config/checkpoint helpers.

Differences from the official code (state-dict keys are the official ones, so official
checkpoints load after dropping the non-persistent `attention_bias_idxs`):
- Every width is a per-block (or per-downsample) config field: heads, qk_dim, v_dim, the DW
  kernel of each head, both FFN hidden widths, the window; the downsample's hidden, SE and FFN
  widths; the stem widths. The official code derives all of them from per-stage lists.
- v_dim must equal width / heads: the cascade adds head i-1's output (v_dim wide) to input chunk
  i (width / heads wide), so no other value is well defined; `v_dim` is kept in the config for
  the shared attention vocabulary and is checked.
- Any number of stages (the official code has three); a stage after the first may have
  `downsample: null` when its width equals the previous one (official down_ops ['']).
- The stage resolutions follow the convolution arithmetic ((r - 1) // 2 + 1 per stride-2 conv)
  rather than img_size // 16, and the network accepts other input sizes than the one it was built
  for as long as every attention window still fits its bias table (the official code asserts
  the build size). The bias indices are recomputed for smaller grids instead of cached.
- BatchNorm folding also folds the identity of Residual(DW conv) into the conv (as SHViT's
  deploy code does).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import COMMON_KEYS, check_choice, check_int, check_keys, check_list, req
from ..errors import bad
from ..layers import BNLinear, Classifier, ConvBN
from ..registry import Family, register_family, register_preset

__all__ = ["Residual", "FFN", "SqueezeExcite", "PatchMerging", "CascadedGroupAttention",
           "LocalWindowAttention", "EfficientViTBlock", "StagedNet", "EfficientViT"]


def conv_out(r: int) -> int:
    """Side of a 3x3 / stride 2 / pad 1 convolution's output."""
    return (r - 1) // 2 + 1


def make_divisible(v: float, divisor: int = 8) -> int:
    """timm's make_divisible with round_limit 0 (what SEModule uses for its reduced width)."""
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def se_default(hidden: int) -> int:
    return make_divisible(hidden * 0.25, 8)


# ---------------------------------------------------------------- building blocks
class Residual(nn.Module):
    """x + m(x) (with optional stochastic depth in training, like the official code)."""

    def __init__(self, m: nn.Module, drop: float = 0.0):
        super().__init__()
        self.m = m
        self.drop = drop

    def forward(self, x):
        if self.training and self.drop > 0:
            keep = torch.rand(x.size(0), 1, 1, 1, device=x.device).ge_(self.drop).div(1 - self.drop)
            return x + self.m(x) * keep.detach()
        return x + self.m(x)

    @torch.no_grad()
    def fuse(self):
        # After the bottom-up fold `m` is a plain conv; a depthwise "same" conv absorbs the identity.
        m = self.m
        if isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.stride == (1, 1) \
                and m.kernel_size[0] % 2 == 1 and m.kernel_size[0] == m.kernel_size[1] \
                and m.padding == (m.kernel_size[0] // 2, m.kernel_size[1] // 2) and m.dilation == (1, 1):
            k = m.kernel_size[0]
            m.weight[:, 0, k // 2, k // 2] += 1.0
            return m
        return self


def dw_conv_bn(width: int, bn_weight_init: float = 1.0) -> ConvBN:
    """3x3 depthwise ConvBN (the "token interaction" layer)."""
    return ConvBN(width, width, 3, 1, 1, groups=width, bn_weight_init=bn_weight_init)


class FFN(nn.Module):
    """ConvBN 1x1 -> ReLU -> ConvBN 1x1 (second BN weight starts at 0). Keys pw1, pw2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvBN(dim, hidden)
        self.act = nn.ReLU()
        self.pw2 = ConvBN(hidden, dim, bn_weight_init=0.0)

    def forward(self, x):  # (B, dim, H, W) -> (B, hidden, H, W) -> (B, dim, H, W)
        return self.pw2(self.act(self.pw1(x)))


class SqueezeExcite(nn.Module):
    """timm's SEModule: mean pool -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid gate."""

    def __init__(self, channels: int, rd_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)                    # (B, C, 1, 1)
        return x * self.fc2(self.act(self.fc1(s))).sigmoid()


class PatchMerging(nn.Module):
    """1x1 to hidden, ReLU, DW 3x3 stride 2, ReLU, SE, 1x1 to out: halves the resolution."""

    def __init__(self, dim: int, out_dim: int, hidden: int, se_hidden: int):
        super().__init__()
        self.conv1 = ConvBN(dim, hidden)
        self.act = nn.ReLU()
        self.conv2 = ConvBN(hidden, hidden, 3, 2, 1, groups=hidden)
        self.se = SqueezeExcite(hidden, se_hidden)
        self.conv3 = ConvBN(hidden, out_dim)

    def forward(self, x):  # (B, dim, H, W) -> (B, out_dim, H/2, W/2)
        return self.conv3(self.se(self.act(self.conv2(self.act(self.conv1(x))))))


def dw_ffn(width: int, ffn_hidden: int) -> nn.Sequential:
    """Res(DW 3x3) + Res(FFN): the half-block around the patch merging."""
    return nn.Sequential(Residual(dw_conv_bn(width)), Residual(FFN(width, ffn_hidden)))


def downsample_modules(prev: int, width: int, ds: Mapping) -> list:
    """The three entries the official code puts at the start of blocks{i+1}."""
    return [dw_ffn(prev, ds["ffn_hidden"]),
            PatchMerging(prev, width, ds["hidden"], ds["se_hidden"]),
            dw_ffn(width, ds["ffn2_hidden"])]


def make_stem(in_chans: int, widths) -> nn.Sequential:
    """Four 3x3 stride-2 ConvBN with ReLU between: a 16x16 patchify (keys 0, 2, 4, 6)."""
    layers, c = [], in_chans
    for i, w in enumerate(widths):
        if i:
            layers.append(nn.ReLU())
        layers.append(ConvBN(c, w, 3, 2, 1))
        c = w
    return nn.Sequential(*layers)


def bias_index(h: int, w: int, table: int, device=None) -> torch.Tensor:
    """(h*w, h*w) indices into a (table x table) bias table by (|dy|, |dx|), as the official
    offset dictionary numbers them (dy * table + dx)."""
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    return (ys[:, None] - ys[None, :]).abs() * table + (xs[:, None] - xs[None, :]).abs()


class CascadedGroupAttention(nn.Module):
    """Head i attends over (input chunk i + output of head i-1); Q gets a DW conv; a learned bias
    per head indexed by the (|dy|, |dx|) offset on the `resolution` x `resolution` grid."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, kernels, resolution: int):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = heads, qk_dim, v_dim
        self.scale = qk_dim ** -0.5
        self.resolution = resolution
        chunk = dim // heads
        self.qkvs = nn.ModuleList(ConvBN(chunk, 2 * qk_dim + v_dim) for _ in range(heads))
        self.dws = nn.ModuleList(ConvBN(qk_dim, qk_dim, k, 1, k // 2, groups=qk_dim) for k in kernels)
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(heads * v_dim, dim, bn_weight_init=0.0))
        self.attention_biases = nn.Parameter(torch.zeros(heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", bias_index(resolution, resolution, resolution), persistent=False)

    def _bias(self, h: int, w: int) -> torch.Tensor:
        r = self.resolution
        if h == r and w == r:
            idx = self.attention_bias_idxs
        elif h <= r and w <= r:
            idx = bias_index(h, w, r, self.attention_biases.device)
        else:
            raise RuntimeError(f"attention grid {h}x{w} is larger than the {r}x{r} bias table this block was built "
                               "with; build the model with the input_size you run it at")
        return self.attention_biases[:, idx]  # (heads, N, N)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        bias = self._bias(H, W)
        # heads x (B, C/heads, H, W); one head: x itself (coremltools cannot convert a chunk into one piece)
        chunks = x.chunk(self.heads, dim=1) if self.heads > 1 else (x,)
        outs, feat = [], chunks[0]
        for i in range(self.heads):
            if i > 0:
                feat = feat + chunks[i]                     # cascade: previous head's output
            q, k, v = self.qkvs[i](feat).split([self.qk_dim, self.qk_dim, self.v_dim], dim=1)
            q = self.dws[i](q)
            q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)  # (B, d, N)
            attn = ((q.transpose(-2, -1) @ k) * self.scale + bias[i]).softmax(dim=-1)  # (B, N, N)
            feat = (v @ attn.transpose(-2, -1)).view(B, self.v_dim, H, W)
            outs.append(feat)
        return self.proj(torch.cat(outs, dim=1))


class LocalWindowAttention(nn.Module):
    """Cascaded group attention inside non-overlapping windows (zero-padded to window multiples);
    global when the feature map fits in one window. Key: `attn`."""

    def __init__(self, dim, heads, qk_dim, v_dim, kernels, resolution, window_size):
        super().__init__()
        self.window_size = window_size
        self.attn = CascadedGroupAttention(dim, heads, qk_dim, v_dim, kernels, min(window_size, resolution))

    def forward(self, x):
        C, H, W = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])  # constants when traced (Core ML cannot fold
        # arithmetic on traced sizes); the batch stays -1, so a dynamic-batch ONNX export keeps it free
        ws = self.window_size
        if H <= ws and W <= ws:
            return self.attn(x)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = x.permute(0, 2, 3, 1)                                           # B H W C
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nH, nW = pH // ws, pW // ws
        x = x.view(-1, nH, ws, nW, ws, C).transpose(2, 3).reshape(-1, ws, ws, C).permute(0, 3, 1, 2)
        x = self.attn(x)                                                    # (B nH nW) C ws ws
        x = x.permute(0, 2, 3, 1).reshape(-1, nH, nW, ws, ws, C).transpose(2, 3).reshape(-1, pH, pW, C)
        if pad_b or pad_r:
            x = x[:, :H, :W].contiguous()
        return x.permute(0, 3, 1, 2)


class EfficientViTBlock(nn.Module):
    """Sandwich: Res(DW) -> Res(FFN) -> Res(window CGA) -> Res(DW) -> Res(FFN)."""

    def __init__(self, width: int, b: Mapping, resolution: int):
        super().__init__()
        self.dw0 = Residual(dw_conv_bn(width, 0.0))
        self.ffn0 = Residual(FFN(width, b["ffn_hidden"]))
        self.mixer = Residual(LocalWindowAttention(width, b["heads"], b["qk_dim"], b["v_dim"], b["kernels"],
                                                   resolution, b["window_size"]))
        self.dw1 = Residual(dw_conv_bn(width, 0.0))
        self.ffn1 = Residual(FFN(width, b["ffn2_hidden"]))

    def forward(self, x):
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


# ---------------------------------------------------------------- network
class StagedNet(Classifier, nn.Module):
    """Stem -> blocks1..N (each after the first opens with its downsample, as in the official
    layout: indices 0, 1, 2 = Res(DW)+Res(FFN), PatchMerging, Res(DW)+Res(FFN)) -> mean pool ->
    BN + Linear head (and `head_dist` with distillation). `make_block(width, block, resolution)`."""

    make_block: Callable = None
    _heads = ("head", "head_dist")

    def __init__(self, arch: Mapping):
        super().__init__()
        self.arch = arch
        self.distillation = arch["distillation"]
        self.distilled_training = False
        self.patch_embed = make_stem(arch["in_chans"], arch["stem"]["widths"])
        res = arch["input_size"]
        for _ in arch["stem"]["widths"]:
            res = conv_out(res)
        prev = arch["stem"]["widths"][-1]
        self._offsets = []
        for i, st in enumerate(arch["stages"]):
            mods = []
            if st["downsample"] is not None:
                mods += downsample_modules(prev, st["width"], st["downsample"])
                res = conv_out(res)
            self._offsets.append(len(mods))
            mods += [self.make_block(st["width"], b, res) for b in st["blocks"]]
            self.add_module(f"blocks{i + 1}", nn.Sequential(*mods))
            prev = st["width"]
        self.num_features = prev
        self.head = BNLinear(prev, arch["num_classes"])
        if self.distillation:
            self.head_dist = BNLinear(prev, arch["num_classes"])

    def _new_head(self, old, num_classes):
        return BNLinear(self.num_features, num_classes)

    def stage_modules(self):
        return [getattr(self, f"blocks{i + 1}") for i in range(len(self.arch["stages"]))]

    def block_modules(self):
        for i, (seq, off) in enumerate(zip(self.stage_modules(), self._offsets)):
            for j in range(len(seq) - off):
                yield (i, j), seq[off + j]

    def forward_features(self, x):  # (B, in, H, W) -> (B, C_last, H/64, W/64) for 3 stages
        x = self.patch_embed(x)
        for seq in self.stage_modules():
            x = seq(x)
        return x

    def forward_head(self, x):
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if not self.distillation:
            return self.head(x)
        a, b = self.head(x), self.head_dist(x)
        if self.training and self.distilled_training:
            return a, b
        return (a + b) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class EfficientViT(StagedNet):
    """EfficientViT (Cream): sandwich blocks with cascaded group attention."""

    @staticmethod
    def make_block(width, b, resolution):
        return EfficientViTBlock(width, b, resolution)


# ---------------------------------------------------------------- presets
_EVIT = {  # widths, depths, heads, kernels (official build.py)
    "efficientvit_m0": ([64, 128, 192], [1, 2, 3], [4, 4, 4], [5, 5, 5, 5]),
    "efficientvit_m1": ([128, 144, 192], [1, 2, 3], [2, 3, 3], [7, 5, 3, 3]),
    "efficientvit_m2": ([128, 192, 224], [1, 2, 3], [4, 3, 2], [7, 5, 3, 3]),
    "efficientvit_m3": ([128, 240, 320], [1, 2, 3], [4, 3, 4], [5, 5, 5, 5]),
    "efficientvit_m4": ([128, 256, 384], [1, 2, 3], [4, 4, 4], [7, 5, 3, 3]),
    "efficientvit_m5": ([192, 288, 384], [1, 3, 4], [3, 3, 4], [7, 5, 3, 3]),
}


def default_stem(width: int) -> dict:
    return {"widths": [width // 8, width // 4, width // 2, width]}


def default_downsample(prev: int, width: int) -> dict:
    return {"type": "patch_merging", "hidden": 4 * prev, "se_hidden": se_default(4 * prev),
            "ffn_hidden": 2 * prev, "ffn2_hidden": 2 * width}


def staged_preset(family: str, widths, depths, make_block, input_size: int = 224) -> dict:
    stages = []
    for i, (w, d) in enumerate(zip(widths, depths)):
        stages.append({"width": w, "downsample": default_downsample(widths[i - 1], w) if i else None,
                       "blocks": [make_block(i, w) for _ in range(d)]})
    return {"version": 1, "family": family, "input_size": input_size, "in_chans": 3, "num_classes": 1000,
            "distillation": False, "stem": default_stem(widths[0]), "stages": stages}


def evit_block(width: int, heads: int, kernels, qk_dim: int = 16, window_size: int = 7) -> dict:
    return {"type": "cga", "heads": heads, "qk_dim": qk_dim, "v_dim": width // heads,
            "kernels": list(kernels[:heads]), "ffn_hidden": 2 * width, "ffn2_hidden": 2 * width,
            "window_size": window_size}


def _evit_preset(name):
    widths, depths, heads, kernels = _EVIT[name]
    return lambda: staged_preset("efficientvit", widths, depths,
                                 lambda i, w: evit_block(w, heads[i], kernels))


for _name in _EVIT:
    register_preset(_name)(_evit_preset(_name))


# ---------------------------------------------------------------- config validation (shared)
def _pos_int(d: dict, key: str, path: str, default=None, lo: int = 1) -> int:
    if key not in d or d[key] is None:
        if default is None:
            req(d, key, path)
        d[key] = default
    return check_int(d[key], f"{path}.{key}", lo=lo)


def validate_staged(arch: dict, validate_block: Callable[[dict, str, int], dict]) -> dict:
    """Checks the keys EfficientViT and SHViT share (stem, stage keys, downsample) and calls
    `validate_block(block, path, width)` for each block; returns the normalised config."""
    check_keys(arch, "", COMMON_KEYS)
    stages = arch["stages"]
    w0 = stages[0]["width"]
    stem = arch.get("stem")
    if stem is None:
        stem = default_stem(w0)
    if not isinstance(stem, Mapping):
        raise bad("stem", stem, "a mapping {widths: [4 widths]}")
    stem = dict(stem)
    check_keys(stem, "stem", ("widths",))
    widths = check_list(stem.get("widths", default_stem(w0)["widths"]), "stem.widths", length=4)
    for k, w in enumerate(widths):
        check_int(w, f"stem.widths[{k}]")
    if widths[-1] != w0:
        raise bad("stem.widths[3]", widths[-1], f"the width of stages[0] ({w0})")
    arch["stem"] = {"widths": [int(w) for w in widths]}
    out, prev = [], w0
    for i, st in enumerate(stages):
        p = f"stages[{i}]"
        check_keys(st, p, ("width", "downsample", "blocks"))
        width = st["width"]
        ds = st.get("downsample")
        if ds is not None:
            if i == 0:
                raise bad(p + ".downsample", ds, "null (the stem feeds the first stage)")
            if not isinstance(ds, Mapping):
                raise bad(p + ".downsample", ds, "null or a mapping {type: patch_merging, hidden, se_hidden, "
                                                 "ffn_hidden, ffn2_hidden}")
            ds = dict(ds)
            dp = p + ".downsample"
            check_keys(ds, dp, ("type", "hidden", "se_hidden", "ffn_hidden", "ffn2_hidden"))
            check_choice(req(ds, "type", dp), dp + ".type", ["patch_merging"])
            d = default_downsample(prev, width)
            hidden = _pos_int(ds, "hidden", dp, d["hidden"])
            ds = {"type": "patch_merging", "hidden": hidden,
                  "se_hidden": _pos_int(ds, "se_hidden", dp, se_default(hidden)),
                  "ffn_hidden": _pos_int(ds, "ffn_hidden", dp, d["ffn_hidden"]),
                  "ffn2_hidden": _pos_int(ds, "ffn2_hidden", dp, d["ffn2_hidden"])}
        elif i > 0 and width != prev:
            raise bad(p + ".downsample", None, f"a patch_merging downsample (width changes from {prev} to {width})")
        blocks = [validate_block(dict(b), f"{p}.blocks[{j}]", width) for j, b in enumerate(st["blocks"])]
        out.append({"width": width, "downsample": ds, "blocks": blocks})
        prev = width
    arch["stages"] = out
    return arch


def _validate_cga(b: dict, path: str, width: int) -> dict:
    check_keys(b, path, ("type", "heads", "qk_dim", "v_dim", "kernels", "ffn_hidden", "ffn2_hidden", "window_size"))
    heads = _pos_int(b, "heads", path)
    if width % heads:
        raise bad(path + ".heads", heads, f"a divisor of the stage width ({width})")
    qk = _pos_int(b, "qk_dim", path, 16)
    v = _pos_int(b, "v_dim", path, width // heads)
    if v != width // heads:
        raise bad(path + ".v_dim", v, f"{width // heads} (width / heads: the cascade adds each head's output "
                                      "to the next head's input chunk)")
    kernels = check_list(b.get("kernels", [5] * heads), path + ".kernels", length=heads)
    for k, ks in enumerate(kernels):
        check_int(ks, f"{path}.kernels[{k}]")
        if ks % 2 == 0:
            raise bad(f"{path}.kernels[{k}]", ks, "an odd kernel size")
    return {"type": "cga", "heads": heads, "qk_dim": qk, "v_dim": v, "kernels": [int(k) for k in kernels],
            "ffn_hidden": _pos_int(b, "ffn_hidden", path, 2 * width),
            "ffn2_hidden": _pos_int(b, "ffn2_hidden", path, 2 * width),
            "window_size": _pos_int(b, "window_size", path, 7)}


# ---------------------------------------------------------------- checkpoints (shared)
def _shape(sd, key) -> Tuple[int, ...]:
    if key not in sd:
        raise KeyError(f"{key} missing")
    return tuple(sd[key].shape)


def _stage_count(sd) -> int:
    n = 0
    for k in sd:
        m = re.match(r"^blocks(\d+)\.", k)
        if m:
            n = max(n, int(m.group(1)))
    return max(n, 1)


def conv_weights_4d(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """1x1 convolution weights stored as matrices (out, in) made (out, in, 1, 1). The official EfficientViT
    and SHViT loaders do the same to their release files (`d[k][:, :, None, None]` on a shape mismatch):
    every other `.weight` of these networks is a convolution but the heads' Linear (`head*.l.weight`)."""
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and not k.startswith("head"):
            sd[k] = v[:, :, None, None]
    return sd


def fill_num_batches_tracked(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Older files lack BatchNorm's `num_batches_tracked`; it does not change the function."""
    for k in list(sd):
        if k.endswith(".running_mean"):
            nk = k[: -len("running_mean")] + "num_batches_tracked"
            if nk not in sd:
                sd[nk] = torch.tensor(0, dtype=torch.long)
    return sd


def read_staged(sd: Mapping[str, torch.Tensor], family: str, read_block, block_key: str) -> dict:
    """The arch of an official-layout state dict. `read_block(sd, prefix, width)` reads one block;
    `block_key` is a key suffix present in every block (to count them)."""
    widths = [_shape(sd, f"patch_embed.{2 * k}.c.weight")[0] for k in range(4)]
    in_chans = _shape(sd, "patch_embed.0.c.weight")[1]
    stages, prev = [], widths[-1]
    for s in range(1, _stage_count(sd) + 1):
        ds, off, width = None, 0, prev
        if f"blocks{s}.1.conv1.c.weight" in sd:
            hidden = _shape(sd, f"blocks{s}.1.conv1.c.weight")[0]
            width = _shape(sd, f"blocks{s}.1.conv3.c.weight")[0]
            ds = {"type": "patch_merging", "hidden": hidden,
                  "se_hidden": _shape(sd, f"blocks{s}.1.se.fc1.weight")[0],
                  "ffn_hidden": _shape(sd, f"blocks{s}.0.1.m.pw1.c.weight")[0],
                  "ffn2_hidden": _shape(sd, f"blocks{s}.2.1.m.pw1.c.weight")[0]}
            off = 3
        blocks, j = [], off
        while f"blocks{s}.{j}.{block_key}" in sd:
            blocks.append(read_block(sd, f"blocks{s}.{j}.", width))
            j += 1
        stages.append({"width": width, "downsample": ds, "blocks": blocks})
        prev = width
    num_classes = _shape(sd, "head.l.weight")[0]
    return {"version": 1, "family": family, "input_size": 224, "in_chans": in_chans, "num_classes": num_classes,
            "distillation": "head_dist.l.weight" in sd, "stem": {"widths": widths}, "stages": stages}


def timm_to_official(sd: Mapping[str, torch.Tensor], downsample_map: Callable[[str], str]) -> Dict[str, torch.Tensor]:
    """Rename a timm `stages.{i}.downsample.* / stages.{i}.blocks.{j}.*` state dict to the official
    `blocks{i+1}.*` layout. `downsample_map(rest)` maps the part after `downsample.`."""
    has_ds = {int(m.group(1)) for k in sd for m in [re.match(r"^stages\.(\d+)\.downsample\.", k)] if m}
    out = {}
    for k, v in sd.items():
        m = re.match(r"^stages\.(\d+)\.(downsample|blocks)\.(.*)$", k)
        if m:
            i, kind, rest = int(m.group(1)), m.group(2), m.group(3)
            if kind == "downsample":
                k = f"blocks{i + 1}.{downsample_map(rest)}"
            else:
                j, tail = rest.split(".", 1)
                k = f"blocks{i + 1}.{int(j) + (3 if i in has_ds else 0)}.{tail}"
        out[k] = v
    return out


def drop_keys(sd: Mapping[str, torch.Tensor], suffixes) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith(tuple(suffixes))}


# ---------------------------------------------------------------- EfficientViT checkpoints
_EVIT_OFFICIAL = re.compile(r"^blocks\d+\.\d+\.(dw0\.m\.c\.weight|mixer\.m\.attn\.)")
_EVIT_TIMM = re.compile(r"^stages\.\d+\.(blocks\.\d+\.dw0\.m\.conv\.weight|downsample\.patchmerge\.)")


def _evit_timm_to_official(sd):
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] == "conv":
            parts[-2] = "c"
        if len(parts) >= 2 and parts[-2] == "linear" and parts[0] in ("head", "head_dist"):
            parts[-2] = "l"
        if parts[0] == "patch_embed" and parts[1].startswith("conv"):
            parts[1] = str(2 * (int(parts[1][4:]) - 1))
        out[".".join(parts)] = v

    def ds(rest):
        for a, b in (("res1.", "0."), ("patchmerge.", "1."), ("res2.", "2.")):
            if rest.startswith(a):
                return b + rest[len(a):]
        return rest
    return timm_to_official(out, ds)


def _read_cga(sd, p, width):
    a = p + "mixer.m.attn."
    heads, table = _shape(sd, a + "attention_biases")
    qk = _shape(sd, a + "dws.0.c.weight")[0]
    v = _shape(sd, a + "qkvs.0.c.weight")[0] - 2 * qk
    r = math.isqrt(table)
    if r * r != table:
        raise ValueError(f"{a}attention_biases has {table} entries per head, expected a square window")
    return {"type": "cga", "heads": heads, "qk_dim": qk, "v_dim": v,
            "kernels": [_shape(sd, f"{a}dws.{i}.c.weight")[-1] for i in range(heads)],
            "ffn_hidden": _shape(sd, p + "ffn0.m.pw1.c.weight")[0],
            "ffn2_hidden": _shape(sd, p + "ffn1.m.pw1.c.weight")[0],
            "window_size": r}  # the bias-table side; fixed up with the input size below


_CANDIDATE_SIZES = (224, 256, 192, 288, 320, 384, 160, 448, 512, 128, 96, 64, 32, 16)


def _infer_windows(arch: dict) -> dict:
    """Pick the input size and the windows that explain every bias table (side r = min(window,
    stage resolution)): the first candidate size under which the fewest windows differ from the
    official 7 (224 first). A table smaller than its stage's resolution is the window itself; a
    table as large as the resolution means global attention, any window >= r (7 when possible)."""
    best = None
    for size in _CANDIDATE_SIZES:
        res = size
        for _ in range(4):
            res = conv_out(res)
        windows, ok = [], True
        for st in arch["stages"]:
            if st["downsample"] is not None:
                res = conv_out(res)
            for b in st["blocks"]:
                r = b["window_size"]
                if r > res:
                    ok = False
                    break
                windows.append(r if r < res else max(r, 7))
            if not ok:
                break
        if ok:
            cost = sum(w != 7 for w in windows)
            if best is None or cost < best[0]:
                best = (cost, size, windows)
    if best is None:
        raise ValueError("the attention bias tables fit no input size")
    _, arch["input_size"], windows = best
    it = iter(windows)
    for st in arch["stages"]:
        for b in st["blocks"]:
            b["window_size"] = next(it)
    return arch


class EfficientViTFamily(Family):
    name = "efficientvit"
    block_types = ("cga",)
    default_input_size = 224
    paper = "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention (Liu et al., CVPR 2023)"

    def validate(self, arch):
        return validate_staged(arch, _validate_cga)

    def build(self, arch):
        return EfficientViT(arch)

    def match_state_dict(self, sd):
        if "patch_embed.0.c.weight" in sd:
            return any(_EVIT_OFFICIAL.match(k) for k in sd)
        if "patch_embed.conv1.conv.weight" in sd:
            return any(_EVIT_TIMM.match(k) for k in sd)
        return False

    def convert_state_dict(self, sd):
        sd = dict(sd)
        if "patch_embed.conv1.conv.weight" in sd:
            sd = _evit_timm_to_official(sd)
        sd = conv_weights_4d(fill_num_batches_tracked(drop_keys(sd, ("attention_bias_idxs",))))
        arch = _infer_windows(read_staged(sd, self.name, _read_cga, "dw0.m.c.weight"))
        return arch, sd

    def stage_summary(self, arch):
        rows = []
        for i, st in enumerate(arch["stages"]):
            bl = st["blocks"]
            heads = sorted({b["heads"] for b in bl})
            rows.append({"stage": i, "width": st["width"], "blocks": f"{len(bl)}x cga" if bl else "-",
                         "heads": ",".join(map(str, heads)) or "-"})
        return rows


register_family(EfficientViTFamily())
