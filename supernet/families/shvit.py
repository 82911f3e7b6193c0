"""SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design
(Yun & Ro, CVPR 2024, arXiv 2401.16456; official code ysj9909/SHViT).

EfficientViT's 16x16 stem and patch-merging downsampling (imported from efficientvit.py), three
stages of Res(DW 3x3) -> Res(mixer) -> Res(FFN) blocks; the mixer is nothing in early stages
(block type `conv`, the official type 'i') and single-head self-attention on a partial set of
channels later (`shsa`, official 's').

Differences from the official code (state-dict keys are the official ones):
- Per-block widths in the config: `pdim` (the attended channels), `qk_dim`, `ffn_hidden`; the
  downsample's hidden, SE and FFN widths; the stem widths. The official code takes per-stage
  lists and fixes the FFN ratio at 2 and the patch-merging expansion at 4.
- Block types may mix within a stage and any number of stages is allowed (official: one type per
  stage, three stages); a stage after the first may skip its downsample when the width is kept.
- The input size is not stored in SHViT checkpoints (global attention, no bias tables): a converted
  checkpoint whose shapes are those of a preset gets that preset's size (shvit_s4: 256, the size it
  was trained at), any other 224.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from ..arch import check_keys
from ..errors import bad
from ..layers import ConvBN
from ..registry import Family, get_preset, register_family, register_preset
from .efficientvit import (FFN, Residual, StagedNet, _pos_int, _shape, conv_weights_4d, drop_keys, dw_conv_bn,
                           fill_num_batches_tracked, read_staged, staged_preset, timm_to_official,
                           validate_staged)

__all__ = ["SHSA", "SHViTBlock", "SHViT"]


# ---------------------------------------------------------------- building blocks
class SHSA(nn.Module):
    """Single-head self-attention over the first `pdim` channels (GroupNorm(1) first); the other
    channels pass untouched; ReLU + ConvBN 1x1 over all channels after the concat."""

    def __init__(self, dim: int, pdim: int, qk_dim: int):
        super().__init__()
        self.dim, self.pdim, self.qk_dim = dim, pdim, qk_dim
        self.scale = qk_dim ** -0.5
        self.pre_norm = nn.GroupNorm(1, pdim)
        self.qkv = ConvBN(pdim, 2 * qk_dim + pdim)
        self.proj = nn.Sequential(nn.ReLU(), ConvBN(dim, dim, bn_weight_init=0.0))

    def forward(self, x):  # (B, C, H, W) -> (B, C, H, W)
        B, C, H, W = x.shape
        x1, x2 = torch.split(x, [self.pdim, self.dim - self.pdim], dim=1)
        q, k, v = self.qkv(self.pre_norm(x1)).split([self.qk_dim, self.qk_dim, self.pdim], dim=1)
        q, k, v = q.flatten(2), k.flatten(2), v.flatten(2)                 # (B, d, N)
        attn = ((q.transpose(-2, -1) @ k) * self.scale).softmax(dim=-1)  # (B, N, N)
        x1 = (v @ attn.transpose(-2, -1)).reshape(B, self.pdim, H, W)
        return self.proj(torch.cat([x1, x2], dim=1))


class SHViTBlock(nn.Module):
    """Res(DW 3x3) -> Res(SHSA) or nothing -> Res(FFN). Keys conv, mixer, ffn."""

    def __init__(self, width: int, b):
        super().__init__()
        self.conv = Residual(dw_conv_bn(width, 0.0))
        self.mixer = Residual(SHSA(width, b["pdim"], b["qk_dim"])) if b["type"] == "shsa" else nn.Identity()
        self.ffn = Residual(FFN(width, b["ffn_hidden"]))

    def forward(self, x):
        return self.ffn(self.mixer(self.conv(x)))


class SHViT(StagedNet):
    """SHViT: EfficientViT's skeleton with SHViT blocks."""

    @staticmethod
    def make_block(width, b, resolution):
        return SHViTBlock(width, b)


# ---------------------------------------------------------------- presets
_SHVIT = {  # widths, depths, partial dims of stages 2-3, input size (official build.py)
    "shvit_s1": ([128, 224, 320], [2, 4, 5], [48, 68], 224),
    "shvit_s2": ([128, 308, 448], [2, 4, 5], [66, 96], 224),
    "shvit_s3": ([192, 352, 448], [3, 5, 5], [75, 96], 224),
    "shvit_s4": ([224, 336, 448], [4, 7, 6], [72, 96], 256),
}


def shvit_block(width: int, pdim: int | None, qk_dim: int = 16) -> dict:
    if pdim is None:
        return {"type": "conv", "ffn_hidden": 2 * width}
    return {"type": "shsa", "pdim": pdim, "qk_dim": qk_dim, "ffn_hidden": 2 * width}


def _shvit_preset(name):
    widths, depths, pdims, size = _SHVIT[name]
    return lambda: staged_preset("shvit", widths, depths,
                                 lambda i, w: shvit_block(w, pdims[i - 1] if i else None), input_size=size)


for _name in _SHVIT:
    register_preset(_name)(_shvit_preset(_name))


# ---------------------------------------------------------------- family
def _validate_block(b: dict, path: str, width: int) -> dict:
    if b["type"] == "conv":
        check_keys(b, path, ("type", "ffn_hidden"))
        return {"type": "conv", "ffn_hidden": _pos_int(b, "ffn_hidden", path, 2 * width)}
    check_keys(b, path, ("type", "pdim", "qk_dim", "ffn_hidden"))
    pdim = _pos_int(b, "pdim", path)
    if pdim > width:
        raise bad(path + ".pdim", pdim, f"at most the stage width ({width})")
    return {"type": "shsa", "pdim": pdim, "qk_dim": _pos_int(b, "qk_dim", path, 16),
            "ffn_hidden": _pos_int(b, "ffn_hidden", path, 2 * width)}


def _read_block(sd, p, width):
    ffn = _shape(sd, p + "ffn.m.pw1.c.weight")[0]
    if p + "mixer.m.qkv.c.weight" not in sd:
        return {"type": "conv", "ffn_hidden": ffn}
    pdim = _shape(sd, p + "mixer.m.pre_norm.weight")[0]
    qkv = _shape(sd, p + "mixer.m.qkv.c.weight")[0]
    if (qkv - pdim) % 2:
        raise ValueError(f"{p}mixer.m.qkv.c.weight has {qkv} outputs, expected 2 * qk_dim + pdim ({pdim})")
    return {"type": "shsa", "pdim": pdim, "qk_dim": (qkv - pdim) // 2, "ffn_hidden": ffn}


_OFFICIAL = re.compile(r"^blocks\d+\.\d+\.(conv\.m\.c\.weight|mixer\.m\.pre_norm\.)")
_TIMM = re.compile(r"^stages\.\d+\.(blocks\.\d+\.conv\.m\.c\.weight|downsample\.2\.conv1\.c\.weight)")


def _timm_downsample(rest: str) -> str:
    # timm: downsample.{0,1} = Res(DW), Res(FFN); 2 = PatchMerging; {3,4} = Res(DW), Res(FFN)
    i, tail = rest.split(".", 1)
    return {"0": "0.0.", "1": "0.1.", "2": "1.", "3": "2.0.", "4": "2.1."}[i] + tail


class SHViTFamily(Family):
    name = "shvit"
    block_types = ("conv", "shsa")
    default_input_size = 224
    paper = "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design (Yun & Ro, CVPR 2024)"

    def validate(self, arch):
        return validate_staged(arch, _validate_block)

    def build(self, arch):
        return SHViT(arch)

    def match_state_dict(self, sd):
        if "patch_embed.0.c.weight" not in sd:
            return False
        return any(_OFFICIAL.match(k) or _TIMM.match(k) for k in sd)

    def convert_state_dict(self, sd):
        sd = dict(sd)
        if any(k.startswith("stages.") for k in sd):
            sd = timm_to_official(sd, _timm_downsample)
        sd = conv_weights_4d(fill_num_batches_tracked(drop_keys(sd, ("attention_bias_idxs",))))
        arch = read_staged(sd, self.name, _read_block, "conv.m.c.weight")
        for name, (*_, size) in _SHVIT.items():  # the shapes of a preset: the size it was trained at
            if size != arch["input_size"]:
                try:
                    same = self.validate(dict(arch, input_size=size)) == get_preset(name)
                except ValueError:
                    same = False
                if same:
                    arch["input_size"] = size
        return arch, sd


register_family(SHViTFamily())
