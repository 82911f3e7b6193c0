"""Swin Transformer: "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows"
(Liu et al., ICCV 2021, arXiv 2103.14030), in timm's (>= 0.9) layout: channels-last features,
patch merging at the START of stages 2.. (`layers.{i}.downsample`), `head.fc`.

Patch embedding (Conv k=s=patch + LayerNorm) -> stages of windowed-attention blocks (relative
position bias per block; every odd block shifts its windows by window//2 and masks the wrapped
regions, as the official code does: the shift follows the block index, it is not a config key)
-> LayerNorm -> global average pool -> head. Patch merging: 2x2 neighbours concatenated in the
order (0,0), (1,0), (0,1), (1,1) -> LayerNorm(4C) -> Linear(4C -> C', no bias).

What differs from timm / the official code, and why:
- Per block `heads`, per-head `qk_dim` / `v_dim` and `ffn_hidden`, optional `scale`, and `heads: 0` /
  `ffn_hidden: 0` to drop a branch (the attention and MLP are deit.py's, see there); per stage
  `width` and `window_size` (per stage rather than global, so a stage's window can differ).
- `window_size` is the window the bias tables are built for. Validation clamps it to the stage's
  resolution at `input_size` (official/timm build a window = resolution when the resolution is not
  larger), so the config always describes the tables that exist.
- The model runs at any input size: the shift (none along a side no larger than the window) and the
  shifted-window mask are worked out for the actual feature size, and features are zero-padded to
  window multiples as timm does. The mask for the arch's own input size is precomputed in a
  non-persistent buffer; other sizes compute it on the fly.
- Window partition / patch merging keep tensors at rank <= 5 with the batch as -1 (timm views to
  rank 6 and reads the batch size), so a trace converts to Core ML and ONNX with a dynamic batch.
- No distillation head (neither timm nor the official Swin has one).
- Official checkpoints (downsample at the END of stage i, `head`) are re-keyed to this layout
  (`layers.{i}.downsample` -> `layers.{i+1}.downsample`, `head` -> `head.fc`) and their
  `relative_position_index` / `attn_mask` buffers dropped; the input size is read from the
  `attn_mask` shapes when the file has them (otherwise 224).
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..arch import COMMON_KEYS, check_int, check_keys
from ..errors import bad
from ..layers import Classifier
from ..registry import Family, register_family, register_preset
from .deit import (Attention, Mlp, PatchEmbed, attention_dims, block_count, drop_path, ffn_width, init_linear,
                   validate_attention_block, validate_patch_stem, vit_block)

MASK_VALUE = -100.0  # the official/timm value for "other region" in shifted windows


# ---------------------------------------------------------------- window helpers
def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, w*w, C), windows in row-major order (H, W multiples of w).
    Batch as -1 and rank <= 5, so traces export to ONNX and Core ML."""
    h, wd, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
    x = x.reshape(-1, w, wd // w, w, c).permute(0, 2, 1, 3, 4)  # (B*H/w, W/w, w, w, C)
    return x.reshape(-1, (h // w) * (wd // w), w * w, c)


def window_reverse(x: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """(B, nW, w*w, C) -> (B, H, W, C)."""
    c = int(x.shape[-1])
    x = x.reshape(-1, wd // w, w, w, c).permute(0, 2, 1, 3, 4)  # (B*H/w, w, W/w, w, C)
    return x.reshape(-1, h, wd, c)


def relative_position_index(w: int) -> torch.Tensor:
    """(w*w, w*w) row of the ((2w-1)^2, heads) bias table for every query/key pair of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (N, N, 2), >= 0
    return rel[:, :, 0] * (2 * w - 1) + rel[:, :, 1]


def window_shift(h: int, wd: int, w: int) -> Tuple[int, int]:
    """Shift of a shifted block: w//2 along each side longer than the window, else 0 (official/timm)."""
    return (w // 2 if h > w else 0, w // 2 if wd > w else 0)


def shifted_window_mask(h: int, wd: int, w: int, shift: Tuple[int, int], device=None) -> torch.Tensor:
    """(nW, w*w, w*w) additive mask: 0 within a region, -100 across the regions that the cyclic shift
    brought together. h, wd: the padded feature size (multiples of w); regions as in timm."""
    def regions(n, s):  # along one side: [0, n-w) -> 0, [n-w, n-s) -> 1, [n-s, n) -> 2
        r = torch.zeros(n, device=device)
        if s:
            r[n - w:n - s] = 1
            r[n - s:] = 2
        return r

    img = regions(h, shift[0])[:, None] * 3 + regions(wd, shift[1])[None, :]
    win = window_partition(img[None, :, :, None], w)[0, :, :, 0]  # (nW, N)
    diff = win[:, None, :] - win[:, :, None]  # (nW, N, N)
    return torch.zeros_like(diff).masked_fill(diff != 0, MASK_VALUE)


# ---------------------------------------------------------------- building blocks
class WindowAttention(Attention):
    """deit.Attention over windows, plus a learned relative position bias ((2w-1)^2, heads)."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, window_size: int,
                 scale: Optional[float] = None):
        super().__init__(dim, heads, qk_dim, v_dim, scale)
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x, mask: Optional[torch.Tensor] = None):  # x: (B, nW, N, C); mask: (nW, N, N)
        n = self.window_size ** 2
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.reshape(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        if mask is not None:
            bias = bias + mask.unsqueeze(1)  # (nW, heads, N, N)
        return super().forward(x, bias)


class SwinBlock(nn.Module):
    """x + WindowAttn(LN(x)) (windows shifted by `shift`, masked by `mask`); x + MLP(LN(x)).
    A zero width drops its branch."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, ffn_hidden: int, window_size: int,
                 scale: Optional[float] = None, drop_path: float = 0.0):
        super().__init__()
        self.window_size = window_size
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim) if heads else None
        self.attn = WindowAttention(dim, heads, qk_dim, v_dim, window_size, scale) if heads else None
        self.norm2 = nn.LayerNorm(dim) if ffn_hidden else None
        self.mlp = Mlp(dim, ffn_hidden) if ffn_hidden else None

    def _attn(self, x, shift: Tuple[int, int], mask: Optional[torch.Tensor]):
        h, wd, w = int(x.shape[1]), int(x.shape[2]), self.window_size
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        ph, pw = (w - h % w) % w, (w - wd % w) % w
        if ph or pw:  # timm pads after the shift
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        x = window_reverse(self.attn(window_partition(x, w), mask), w, h + ph, wd + pw)
        if ph or pw:
            x = x[:, :h, :wd]
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x

    def forward(self, x, shift: Tuple[int, int] = (0, 0), mask: Optional[torch.Tensor] = None):  # (B, H, W, C)
        if self.attn is not None:
            x = x + drop_path(self._attn(self.norm1(x), shift, mask), self.drop_path, self.training)
        if self.mlp is not None:
            x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x


class PatchMerging(nn.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C'): 2x2 concat -> LayerNorm(4C) -> Linear(4C -> C')."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):
        h, w, c = int(x.shape[1]), int(x.shape[2]), int(x.shape[3])
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        # (B*H/2, row, W/2, col, C) -> (B*H/2, W/2, col, row, C): order (0,0), (1,0), (0,1), (1,1)
        x = x.reshape(-1, 2, w // 2, 2, c).permute(0, 2, 3, 1, 4).reshape(-1, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then blocks; odd blocks use shifted windows."""

    def __init__(self, in_dim: int, stage: dict, resolution: int, dpr):
        super().__init__()
        dim, w = stage["width"], stage["window_size"]
        self.window_size = w
        self.downsample = PatchMerging(in_dim, dim) if stage["downsample"] is not None else None
        self.blocks = nn.ModuleList([
            SwinBlock(dim, b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"], w, b.get("scale"), dpr[j])
            for j, b in enumerate(stage["blocks"])])
        # the mask for the arch's own input size, computed once (not saved: it follows from the config)
        self.mask_size = (resolution, resolution)
        self.register_buffer("attn_mask", self._make_mask(resolution, resolution), persistent=False)

    def _make_mask(self, h: int, wd: int, device=None) -> Optional[torch.Tensor]:
        w = self.window_size
        shift = window_shift(h, wd, w)
        if not any(shift) or len(self.blocks) < 2:
            return None
        return shifted_window_mask(math.ceil(h / w) * w, math.ceil(wd / w) * w, w, shift, device)

    def forward(self, x):  # (B, H, W, C_in) -> (B, H', W', C)
        if self.downsample is not None:
            x = self.downsample(x)
        h, wd = int(x.shape[1]), int(x.shape[2])
        shift = window_shift(h, wd, self.window_size)
        mask = self.attn_mask if (h, wd) == self.mask_size else self._make_mask(h, wd, x.device)
        for j, blk in enumerate(self.blocks):
            x = blk(x, shift, mask) if j % 2 else blk(x)
        return x


class ClassifierHead(nn.Module):
    """Global average pool over (H, W) -> fc (timm `ClassifierHead`, key `head.fc`)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):  # (B, H, W, C)
        return self.fc(x.mean(dim=(1, 2)))


# ---------------------------------------------------------------- network
def stage_resolutions(arch: dict):
    """Feature side of every stage at the arch's input size (patch merging pads odd sides)."""
    r = arch["input_size"] // arch["stem"]["patch_size"]
    out = []
    for st in arch["stages"]:
        if st["downsample"] is not None:
            r = (r + 1) // 2
        out.append(r)
    return out


class SwinTransformer(Classifier, nn.Module):
    """Swin (timm >= 0.9 layout)."""

    def __init__(self, arch: dict, drop_path_rate: float = 0.0):
        super().__init__()
        self.arch = arch
        stages = arch["stages"]
        self.patch_embed = PatchEmbed(arch["in_chans"], stages[0]["width"], arch["stem"]["patch_size"], norm=True)
        total = sum(len(st["blocks"]) for st in stages)
        dpr = [drop_path_rate * k / max(total - 1, 1) for k in range(total)]
        layers, in_dim, k = [], stages[0]["width"], 0
        for st, res in zip(stages, stage_resolutions(arch)):
            layers.append(SwinStage(in_dim, st, res, dpr[k:k + len(st["blocks"])]))
            in_dim, k = st["width"], k + len(st["blocks"])
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(in_dim)
        self.head = ClassifierHead(in_dim, arch["num_classes"])
        self.apply(init_linear)

    def _new_head(self, old, num_classes):
        return ClassifierHead(old.fc.in_features, num_classes).apply(init_linear)

    def block_modules(self):
        for i, stage in enumerate(self.layers):
            for j, blk in enumerate(stage.blocks):
                yield (i, j), blk

    def forward_features(self, x):
        x = self.layers(self.patch_embed(x))
        return self.norm(x)  # (B, H, W, C)

    def forward_head(self, x):
        return self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- presets
def _swin(embed: int, depths, heads, window: int = 7, patch: int = 4) -> dict:
    stages = []
    for i, (d, h) in enumerate(zip(depths, heads)):
        width = embed * 2 ** i
        stages.append({"width": width, "window_size": window,
                       "downsample": None if i == 0 else {"type": "patch_merging"},
                       "blocks": [vit_block(width, h, block_type="swin") for _ in range(d)]})
    return {"version": 1, "family": "swin", "input_size": 224, "in_chans": 3, "num_classes": 1000,
            "distillation": False, "stem": {"patch_size": patch}, "stages": stages}


@register_preset("swin_tiny")
def swin_tiny():
    return _swin(96, (2, 2, 6, 2), (3, 6, 12, 24))


@register_preset("swin_small")
def swin_small():
    return _swin(96, (2, 2, 18, 2), (3, 6, 12, 24))


@register_preset("swin_base")
def swin_base():
    return _swin(128, (2, 2, 18, 2), (4, 8, 16, 32))


# ---------------------------------------------------------------- checkpoints
_SWIN_KEY = re.compile(
    r"(patch_embed\.(proj|norm)\.(weight|bias)|norm\.(weight|bias)|head(\.fc)?\.(weight|bias)"
    r"|layers\.\d+\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)"
    r"|layers\.\d+\.blocks\.\d+\.(attn_mask|attn\.relative_position_bias_table|attn\.relative_position_index"
    r"|(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)))")


def _is_official(sd: Mapping) -> bool:
    """Official: downsample at the end of a stage (so layers.0 has one) and a bare `head`."""
    return "head.weight" in sd or any(k.startswith("layers.0.downsample.") for k in sd)


def _to_timm(sd: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k)
        k = re.sub(r"^head\.(weight|bias)$", r"head.fc.\1", k)
        out[k] = v
    return out


def _input_size_from_masks(sd: Mapping, patch: int) -> Optional[int]:
    """Official files store each shifted block's mask (nW, w*w, w*w): stage side = sqrt(nW) * w."""
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.blocks\.\d+\.attn_mask$", k)
        if m and v.dim() == 3:
            nw, w = v.shape[0], math.isqrt(v.shape[1])
            g = math.isqrt(nw)
            if g * g == nw and w * w == v.shape[1]:
                return g * w * 2 ** int(m.group(1)) * patch
    return None


def _convert_swin(sd: Mapping[str, torch.Tensor]):
    size = None
    if _is_official(sd):
        patch = sd["patch_embed.proj.weight"].shape[-1]
        size = _input_size_from_masks(sd, patch)
        sd = _to_timm(sd)
    else:
        sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    pw = sd["patch_embed.proj.weight"]
    dim, in_chans, patch = pw.shape[0], pw.shape[1], pw.shape[-1]
    if pw.shape[-2] != patch:
        raise ValueError(f"patch_embed.proj.weight {tuple(pw.shape)}: expected a square patch")
    stages, window = [], 7
    for i in range(block_count(sd, r"layers\.(\d+)\.")):
        if i > 0:
            red = sd.get(f"layers.{i}.downsample.reduction.weight")
            if red is None:
                raise KeyError(f"layers.{i}.downsample.reduction.weight")
            dim = red.shape[0]
        blocks = []
        for j in range(block_count(sd, rf"layers\.{i}\.blocks\.(\d+)\.")):
            pre = f"layers.{i}.blocks.{j}."
            table = sd.get(pre + "attn.relative_position_bias_table")
            heads = table.shape[1] if table is not None else None
            if table is not None:
                w = (math.isqrt(table.shape[0]) + 1) // 2
                if (2 * w - 1) ** 2 != table.shape[0]:
                    raise ValueError(f"{pre}attn.relative_position_bias_table has {table.shape[0]} rows: "
                                     "expected (2 * window - 1)^2")
                window = w
            b = {"type": "swin", **attention_dims(sd, pre + "attn.", dim, heads)}
            b["ffn_hidden"] = ffn_width(sd, pre + "mlp.")
            blocks.append(b)
        stages.append({"width": dim, "window_size": window,
                       "downsample": None if i == 0 else {"type": "patch_merging"}, "blocks": blocks})
    widest = [max((b["qk_dim"] for b in st["blocks"] if b["heads"]), default=0) for st in stages]
    pruned = [(i, j) for i, st in enumerate(stages) for j, b in enumerate(st["blocks"])
              if b["heads"] and (b["qk_dim"] != b["v_dim"] or b["qk_dim"] < widest[i])]
    if pruned:  # Q/K narrower than V or than its stage's other blocks': Q/K pruned, a scale the file does not hold
        import warnings
        i, j = pruned[0]
        warnings.warn(f"a plain state dict of a pruned Swin: the attention scale of {len(pruned)} block(s) is not in "
                      f"the file (first layers.{i}.blocks.{j}, Q/K {stages[i]['blocks'][j]['qk_dim']} per head). A block "
                      "whose Q/K width was pruned keeps the scale of its unpruned width; here it gets 1/sqrt(Q/K), and "
                      "its outputs then differ from the pruned model's: load the vitslim checkpoint (model.pt, "
                      "save_checkpoint), or this file with load_checkpoint(path, arch=the run's arch.yaml)", stacklevel=3)
    head = sd.get("head.fc.weight")
    if head is None:
        raise KeyError("head.fc.weight")
    if size is None:  # no attn_mask to read it from (timm files): the smallest input at which no stage's
        # window is clamped below the window its bias tables were trained for (224 for window 7; 384 for the
        # window-12 models), and at least 224
        size = max([224] + [st["window_size"] * patch * 2 ** i for i, st in enumerate(stages)])
    arch = {"version": 1, "family": "swin", "input_size": size, "in_chans": in_chans,
            "num_classes": head.shape[0], "distillation": False, "stem": {"patch_size": patch}, "stages": stages}
    return arch, sd


# ---------------------------------------------------------------- family
class SwinFamily(Family):
    name = "swin"
    block_types = ("swin",)
    default_input_size = 224
    paper = "Liu et al., Swin Transformer: Hierarchical Vision Transformer using Shifted Windows, ICCV 2021"

    def validate(self, a: dict) -> dict:
        check_keys(a, "", COMMON_KEYS)
        if a["distillation"]:
            raise bad("distillation", a["distillation"], "false (Swin has no distillation head)")
        p = validate_patch_stem(a)
        res = a["input_size"] // p
        stages = []
        for i, st in enumerate(a["stages"]):
            path = f"stages[{i}]"
            check_keys(st, path, ("width", "window_size", "downsample", "blocks"))
            ds = st.get("downsample", None if i == 0 else {"type": "patch_merging"})
            if i == 0 and ds is not None:
                raise bad(path + ".downsample", ds, "null (the patch embedding feeds the first stage)")
            if i > 0:
                if not isinstance(ds, Mapping) or ds.get("type") != "patch_merging":
                    raise bad(path + ".downsample", ds, "{type: patch_merging}")
                check_keys(ds, path + ".downsample", ("type",))
                ds = {"type": "patch_merging"}
                res = (res + 1) // 2
            w = check_int(st.get("window_size", 7), path + ".window_size")
            width = st["width"]
            blocks = [validate_attention_block(b, f"{path}.blocks[{j}]", width) for j, b in enumerate(st["blocks"])]
            # official/timm: a window larger than the stage's feature map shrinks to it
            stages.append({"width": width, "window_size": min(w, res), "downsample": ds, "blocks": blocks})
        a["stages"] = stages
        return a

    def build(self, arch: dict) -> nn.Module:
        return SwinTransformer(arch)

    def match_state_dict(self, sd) -> bool:
        return all(k in sd for k in ("patch_embed.proj.weight", "patch_embed.norm.weight")) \
            and ("head.fc.weight" in sd or "head.weight" in sd) and all(_SWIN_KEY.fullmatch(k) for k in sd)

    def convert_state_dict(self, sd) -> tuple:
        return _convert_swin(sd)

    def stage_summary(self, arch: dict):
        rows = []
        for i, (st, r) in enumerate(zip(arch["stages"], stage_resolutions(arch))):
            heads = sorted({b["heads"] for b in st["blocks"]})
            rows.append({"stage": i, "width": st["width"], "resolution": f"{r}x{r}", "window": st["window_size"],
                         "blocks": f"{len(st['blocks'])}x swin", "heads": "/".join(map(str, heads)) or "-"})
        return rows


register_family(SwinFamily())
