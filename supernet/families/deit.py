"""DeiT / ViT: "Training data-efficient image transformers & distillation through attention"
(Touvron et al., ICML 2021, arXiv 2012.12877) on the ViT of Dosovitskiy et al. (ICLR 2021), in
timm's `VisionTransformer` / `VisionTransformerDistilled` layout (= the official DeiT keys).

Patch embedding (Conv k=s=patch) -> [cls (, dist)] + patches + learned pos_embed -> blocks
`x + Attn(LN(x)); x + MLP(LN(x))` -> LN -> head on the cls token (+ head_dist on the dist token,
averaged at eval). LayerNorm eps 1e-6 as in timm.

What differs from timm / the official code, and why (the Taylor pruner shrinks this family):
- Every attention is flexible per block: `heads`, per-head `qk_dim` and `v_dim` (V may be wider or
  narrower than Q/K), `ffn_hidden`, and an optional `scale` that overrides qk_dim**-0.5 (pruning
  Q/K channels keeps the scale the network was trained with). The fused `qkv` Linear is laid out
  [q of all heads | k of all heads | v of all heads], each head-major: with qk_dim == v_dim that is
  exactly timm's layout, so released weights load unchanged.
- `heads: 0` removes the attention branch of a block (no norm1 / qkv / proj), `ffn_hidden: 0` the
  MLP branch (no norm2 / fc1 / fc2): what is left of a fully pruned branch is the residual.
- An input whose patch grid differs from the arch's resamples `pos_embed` bicubically (timm's
  `dynamic_img_size`) instead of failing.
- ViT/DeiT checkpoints do not record the number of heads; the loader assumes timm's model-zoo
  convention (64 channels per head: 192 -> 3, 384 -> 6, 768 -> 12 ...; 16 heads at 1280 and wider;
  other widths: the widest of 64/32/16 channels per head that divides the width). vitslim
  checkpoints record the heads (and scales) in their arch, so pruned models round-trip exactly.
"""
from __future__ import annotations

import math
import re
from numbers import Real
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import COMMON_KEYS, check_int, check_keys, check_list, req
from ..errors import bad
from ..layers import Classifier
from ..registry import Family, register_family, register_preset

ATTN_BLOCK_KEYS = ("type", "heads", "qk_dim", "v_dim", "ffn_hidden", "scale")


# ---------------------------------------------------------------- building blocks
def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (no RNG used when off)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def init_linear(m: nn.Module) -> None:
    """timm's ViT / Swin init: trunc_normal(.02) Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """Conv(k=s=patch) -> optional LayerNorm: (B, C_in, H, W) -> (B, H/p, W/p, dim), channels last."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, norm: bool = False, eps: float = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim, eps=eps) if norm else None

    def forward(self, x):
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, Hp, Wp, dim)
        return self.norm(x) if self.norm is not None else x


class Attention(nn.Module):
    """Multi-head self-attention with per-head Q/K width `qk_dim` and V width `v_dim`.

    qkv: Linear(dim -> heads * (2 qk_dim + v_dim)), output [q | k | v], each laid out (heads, per-head dim);
    proj: Linear(heads * v_dim -> dim). Works on any leading dims: (..., N, dim) -> (..., N, dim),
    with an optional additive `attn_bias` broadcastable to (..., heads, N, N).
    """

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, scale: Optional[float] = None,
                 qkv_bias: bool = True):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = heads, qk_dim, v_dim
        self.scale = float(scale) if scale is not None else qk_dim ** -0.5
        self.qkv = nn.Linear(dim, heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.proj = nn.Linear(heads * v_dim, dim)

    def forward(self, x, attn_bias: Optional[torch.Tensor] = None):
        # shapes from constants only (unflatten/flatten, no x.shape): traces export to ONNX / Core ML
        h, dq, dv = self.heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q = q.unflatten(-1, (h, dq)).transpose(-3, -2)  # (..., h, N, dq)
        k = k.unflatten(-1, (h, dq)).transpose(-3, -2)
        v = v.unflatten(-1, (h, dv)).transpose(-3, -2)  # (..., h, N, dv)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        # softmax(q k^T * scale + bias) v, the same numbers as timm's explicit path (to ~1e-6).
        # PyTorch's fused CPU kernel needs qk_dim == v_dim and otherwise falls back to a slow path:
        # for pruned blocks, explicit attention is faster at small batch and zero-padding q, k up
        # to v_dim (q.k unchanged) faster at large batch (benchmarks/attention_dispatch.py).
        # With an additive bias (Swin's relative position bias and shift mask) the CPU kernel is slower
        # than the explicit path at every batch size and width measured (1.7-2x at batch 1 and 16,
        # benchmarks/pruning_latency_target.py --attention), so biased attention on CPU runs explicitly.
        explicit = attn_bias is not None and q.device.type == "cpu"
        if not explicit and dq == dv:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        elif not explicit and dq < dv and q.dim() > 3 and not torch.compiler.is_compiling() and q.shape[0] >= 4:
            # (not under torch.compile / torch.export: a branch on the batch size would pin the batch there)
            pad = (0, dv - dq)
            x = F.scaled_dot_product_attention(F.pad(q, pad), F.pad(k, pad), v, attn_mask=attn_bias, scale=self.scale)
        else:
            a = (q @ k.transpose(-2, -1)) * self.scale
            if attn_bias is not None:
                a = a + attn_bias
            x = a.softmax(dim=-1) @ v
        return self.proj(x.transpose(-3, -2).flatten(-2))  # (..., N, h * dv)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (timm `Mlp`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x)). A zero width drops its branch."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, ffn_hidden: int,
                 scale: Optional[float] = None, drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim, eps=eps) if heads else None
        self.attn = Attention(dim, heads, qk_dim, v_dim, scale) if heads else None
        self.norm2 = nn.LayerNorm(dim, eps=eps) if ffn_hidden else None
        self.mlp = Mlp(dim, ffn_hidden) if ffn_hidden else None

    def forward(self, x):  # (B, N, dim)
        if self.attn is not None:
            x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        if self.mlp is not None:
            x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


# ---------------------------------------------------------------- network
class VisionTransformer(Classifier, nn.Module):
    """DeiT / ViT (timm `VisionTransformer`, `VisionTransformerDistilled` when `distillation`)."""

    _heads = ("head", "head_dist")

    def __init__(self, arch: dict, drop_path_rate: float = 0.0):
        super().__init__()
        self.arch = arch
        stage = arch["stages"][0]
        dim, p = stage["width"], arch["stem"]["patch_size"]
        self.distilled = arch["distillation"]
        self.distilled_training = False  # True: train mode returns (head, head_dist) for the distillation loss
        self.num_prefix_tokens = 2 if self.distilled else 1
        g = arch["input_size"] // p
        self.grid = (g, g)

        self.patch_embed = PatchEmbed(arch["in_chans"], dim, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, g * g + self.num_prefix_tokens, dim))
        blocks = stage["blocks"]
        dpr = [drop_path_rate * j / max(len(blocks) - 1, 1) for j in range(len(blocks))]
        self.blocks = nn.Sequential(*[
            Block(dim, b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"], b.get("scale"), dpr[j])
            for j, b in enumerate(blocks)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, arch["num_classes"])
        self.head_dist = nn.Linear(dim, arch["num_classes"]) if self.distilled else None

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.apply(init_linear)

    def _new_head(self, old, num_classes):
        head = nn.Linear(old.in_features, num_classes)
        init_linear(head)
        return head

    def block_modules(self):
        for j, blk in enumerate(self.blocks):
            yield (0, j), blk

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        if (gh, gw) == self.grid:
            return self.pos_embed
        # another input size: resample the patch positions as timm's resample_abs_pos_embed does
        n = self.num_prefix_tokens
        prefix, pos = self.pos_embed[:, :n], self.pos_embed[:, n:]
        pos = pos.reshape(1, *self.grid, -1).permute(0, 3, 1, 2).float()
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", antialias=True, align_corners=False)
        pos = pos.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(prefix.dtype)
        return torch.cat([prefix, pos], dim=1)

    def forward_features(self, x):
        x = self.patch_embed(x)  # (B, gh, gw, dim)
        gh, gw = int(x.shape[1]), int(x.shape[2])
        x = x.flatten(1, 2)
        one = x[:, :1]  # expand_as, not expand(B, ...): no batch size in the traced graph
        tokens = [self.cls_token.expand_as(one)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand_as(one))
        x = torch.cat(tokens + [x], dim=1) + self._pos_embed(gh, gw)
        x = self.blocks(x)
        return self.norm(x)  # (B, prefix + gh*gw, dim)

    def forward_head(self, x):
        if self.head_dist is None:
            return self.head(x[:, 0])
        x, x_dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        if self.training and self.distilled_training:
            return x, x_dist
        return (x + x_dist) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- presets
def vit_block(width: int, heads: int, ffn_ratio: int = 4, block_type: str = "vit") -> dict:
    d = width // heads
    return {"type": block_type, "heads": heads, "qk_dim": d, "v_dim": d, "ffn_hidden": ffn_ratio * width}


def _deit(width: int, heads: int, depth: int = 12, patch: int = 16) -> dict:
    return {"version": 1, "family": "deit", "input_size": 224, "in_chans": 3, "num_classes": 1000,
            "distillation": False, "stem": {"patch_size": patch},
            "stages": [{"width": width, "downsample": None, "blocks": [vit_block(width, heads) for _ in range(depth)]}]}


@register_preset("deit_tiny")
def deit_tiny():
    return _deit(192, 3)


@register_preset("deit_small")
def deit_small():
    return _deit(384, 6)


@register_preset("deit_base")
def deit_base():
    return _deit(768, 12)


# ---------------------------------------------------------------- validation (shared with Swin)
def validate_patch_stem(a: dict) -> int:
    stem = req(a, "stem", "")
    if not isinstance(stem, Mapping):
        raise bad("stem", stem, "a mapping like {patch_size: 16}")
    check_keys(stem, "stem", ("patch_size",))
    p = check_int(req(stem, "patch_size", "stem"), "stem.patch_size")
    if a["input_size"] < p:
        raise bad("input_size", a["input_size"], f"an integer >= stem.patch_size ({p})")
    if a["input_size"] % p:  # a stride-p convolution would silently drop the last rows and columns
        raise bad("input_size", a["input_size"], f"a multiple of stem.patch_size ({p}): the patch embedding would "
                  f"drop its last {a['input_size'] % p} rows and columns")
    a["stem"] = {"patch_size": p}
    return p


def validate_attention_block(b: Mapping, path: str, width: int) -> dict:
    """Check one `{type, heads, qk_dim, v_dim, ffn_hidden[, scale]}` block; defaults: qk_dim = v_dim =
    width / heads, ffn_hidden = 4 width; heads 0 (attention pruned away) makes qk_dim / v_dim 0."""
    check_keys(b, path, ATTN_BLOCK_KEYS)
    heads = check_int(req(b, "heads", path), path + ".heads", lo=0)
    out = {"type": b["type"], "heads": heads}
    for k in ("qk_dim", "v_dim"):
        if heads == 0:
            out[k] = check_int(b.get(k, 0), f"{path}.{k}", lo=0)
        elif k in b:
            out[k] = check_int(b[k], f"{path}.{k}", lo=1)
        elif width % heads:
            raise bad(path + ".heads", heads, f"a divisor of width ({width}) when {k} is not given")
        else:
            out[k] = width // heads
    out["ffn_hidden"] = check_int(b.get("ffn_hidden", 4 * width), path + ".ffn_hidden", lo=0)
    if "scale" in b:
        s = b["scale"]
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s) or s <= 0:
            raise bad(path + ".scale", s, "a positive number (the attention scale; omit it for qk_dim**-0.5)")
        out["scale"] = float(s)
    return out


# ---------------------------------------------------------------- checkpoints (shared with Swin)
def vit_default_heads(dim: int) -> int:
    """Heads of a timm/DeiT ViT of this width (state dicts do not record them)."""
    if dim >= 1280 and dim % 16 == 0:
        return 16  # ViT-H/g/G/e
    for per_head in (64, 32, 16):
        if dim % per_head == 0:
            return dim // per_head
    return 1


def attention_dims(sd: Mapping[str, torch.Tensor], prefix: str, dim: int, heads: Optional[int]) -> dict:
    """heads / qk_dim / v_dim of the attention at `prefix` (`...attn.`) from qkv and proj shapes.
    `heads` is known for Swin (bias table); None: guess it as described in the module docstring."""
    qkv, proj = sd.get(prefix + "qkv.weight"), sd.get(prefix + "proj.weight")
    if qkv is None and proj is None:
        return {"heads": 0, "qk_dim": 0, "v_dim": 0}
    if qkv is None or proj is None:  # one of the pair is missing: assume qk == v, the loader names the gap
        w = qkv.shape[0] // 3 if qkv is not None else proj.shape[1]
        h = heads or vit_default_heads(dim)
        return {"heads": h, "qk_dim": max(w // h, 1), "v_dim": max(w // h, 1)}
    v_total = proj.shape[1]
    rest = qkv.shape[0] - v_total
    if rest <= 0 or rest % 2:
        raise ValueError(f"{prefix}qkv.weight has {qkv.shape[0]} rows and {prefix}proj.weight {v_total} inputs: "
                         "expected rows = 2 * (Q/K width) + V width")
    qk_total = rest // 2
    if heads is None:
        h0 = vit_default_heads(dim)
        d0 = dim // h0
        if qk_total % h0 == 0 and v_total % h0 == 0:
            heads = h0  # channels pruned inside heads (or not pruned)
        elif v_total % d0 == 0 and qk_total % (v_total // d0) == 0:
            heads = v_total // d0  # whole heads pruned
        else:
            heads = 1
    if qk_total % heads or v_total % heads:
        raise ValueError(f"{prefix}qkv / proj widths ({qk_total} Q/K, {v_total} V) are not divisible by {heads} heads")
    return {"heads": heads, "qk_dim": qk_total // heads, "v_dim": v_total // heads}


def ffn_width(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    if prefix + "fc1.weight" in sd:
        return sd[prefix + "fc1.weight"].shape[0]
    if prefix + "fc2.weight" in sd:
        return sd[prefix + "fc2.weight"].shape[1]
    return 0


def block_count(sd: Mapping, pattern: str) -> int:
    """How many blocks the keys number 0..n-1; numbers with a gap (an edited or foreign file) are refused
    here, not found missing one by one up to the largest (a key `blocks.3000000.*` took minutes)."""
    idx = {int(m.group(1)) for k in sd for m in [re.match(pattern, k)] if m}
    if idx and max(idx) + 1 != len(idx):
        gap = next(i for i, v in enumerate(sorted(idx)) if v != i)
        raise KeyError(f"blocks numbered up to {max(idx)} but {len(idx)} present (no block {gap})")
    return len(idx)


_DEIT_KEY = re.compile(
    r"(cls_token|dist_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|head(_dist)?\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))")


def _convert_deit(sd: Mapping[str, torch.Tensor]):
    pw = sd["patch_embed.proj.weight"]
    dim, in_chans, p = pw.shape[0], pw.shape[1], pw.shape[-1]
    if pw.shape[-2] != p:
        raise ValueError(f"patch_embed.proj.weight {tuple(pw.shape)}: expected a square patch")
    distilled = "dist_token" in sd
    prefix = 2 if distilled else 1
    n = sd["pos_embed"].shape[1] - prefix
    g = math.isqrt(max(n, 0))
    if n < 1 or g * g != n:
        raise ValueError(f"pos_embed has {n + prefix} tokens: expected {prefix} + a square number of patches")
    blocks = []
    for j in range(block_count(sd, r"blocks\.(\d+)\.")):
        b = {"type": "vit", **attention_dims(sd, f"blocks.{j}.attn.", dim, None)}
        b["ffn_hidden"] = ffn_width(sd, f"blocks.{j}.mlp.")
        blocks.append(b)
    guessed = [j for j, b in enumerate(blocks) if b["heads"] and (b["heads"] * b["qk_dim"] != dim
                                                                  or b["heads"] * b["v_dim"] != dim)]
    if guessed:  # a plain state dict does not say how pruned Q/K and V widths split into heads
        import warnings
        b = blocks[guessed[0]]
        warnings.warn(f"a plain state dict of a pruned DeiT: the head counts of {len(guessed)} block(s) are guessed "
                      f"(block {guessed[0]}: {b['heads']} head(s) of Q/K {b['qk_dim']}, V {b['v_dim']}) and their "
                      "attention scale is not in the file (a pruned block keeps the scale of its unpruned Q/K width; "
                      "this one gets 1/sqrt(Q/K)): its outputs differ from the pruned model's; load the vitslim "
                      "checkpoint (model.pt, save_checkpoint) or the run's arch.yaml with these weights instead",
                      stacklevel=3)
    arch = {"version": 1, "family": "deit", "input_size": g * p, "in_chans": in_chans,
            "num_classes": sd["head.weight"].shape[0], "distillation": distilled,
            "stem": {"patch_size": p}, "stages": [{"width": dim, "downsample": None, "blocks": blocks}]}
    return arch, dict(sd)


# ---------------------------------------------------------------- family
class DeiTFamily(Family):
    name = "deit"
    block_types = ("vit",)
    default_input_size = 224
    paper = "Touvron et al., Training data-efficient image transformers & distillation through attention, ICML 2021"

    def validate(self, a: dict) -> dict:
        check_keys(a, "", COMMON_KEYS)
        validate_patch_stem(a)
        stages = check_list(a["stages"], "stages", length=1)
        st = stages[0]
        check_keys(st, "stages[0]", ("width", "downsample", "blocks"))
        if st.get("downsample") is not None:
            raise bad("stages[0].downsample", st["downsample"], "null (DeiT has one stage, fed by the patch embedding)")
        width = st["width"]
        blocks = [validate_attention_block(b, f"stages[0].blocks[{j}]", width) for j, b in enumerate(st["blocks"])]
        a["stages"] = [{"width": width, "downsample": None, "blocks": blocks}]
        return a

    def build(self, arch: dict) -> nn.Module:
        return VisionTransformer(arch)

    def match_state_dict(self, sd) -> bool:
        return all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight")) \
            and all(_DEIT_KEY.fullmatch(k) for k in sd)

    def unknown_keys(self, sd) -> list:
        """Keys DeiT does not have, when the rest says DeiT (e.g. DeiT III's LayerScale `ls1.gamma`)."""
        if not all(k in sd for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight")):
            return []
        return [k for k in sd if not _DEIT_KEY.fullmatch(k)]

    def convert_state_dict(self, sd) -> tuple:
        return _convert_deit(sd)

    def stage_summary(self, arch: dict):
        st = arch["stages"][0]
        heads = sorted({b["heads"] for b in st["blocks"]})
        return [{"stage": 0, "width": st["width"], "blocks": f"{len(st['blocks'])}x vit",
                 "heads": "/".join(map(str, heads)) or "-", "patch": arch["stem"]["patch_size"]}]


register_family(DeiTFamily())
