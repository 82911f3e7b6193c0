"""EfficientFormer V1: "EfficientFormer: Vision Transformers at MobileNet Speed" (Li et al.,
NeurIPS 2022, arXiv 2206.01191); official code snap-research/EfficientFormer (models/efficientformer.py).

A 4-stage network: a Conv-BN-ReLU x2 stem (1/4), Meta4D blocks (pool mixer + 1x1-conv MLP with BN)
on feature maps, then Meta3D blocks (LeViT-style attention + linear MLP with LayerNorm) on tokens.

What differs from the official code, and why (the MetaPath search and the pruner need it):
- Every width that search or pruning can change is a per-block field: `ffn_hidden` of every block,
  `heads` / `qk_dim` / `v_dim` of every attention (the official code fixes 8 / 32 / 128).
- Meta3D blocks may sit in stage 3 as well as stage 4 (the paper's search space), always after the
  stage's Meta4D blocks; the attention bias grid is the real token grid of its stage
  (input_size/16 or input_size/32), not a fixed 7x7. A stage that ends on tokens and is followed by
  another stage reshapes them back to a feature map before the next downsample.
- `identity` blocks (the search's 'I' MetaPath) are allowed anywhere.
- The flatten to tokens is done by the stage, not by a `Flat` module in the block list, so block
  indices in the state dict equal block indices in the arch config (converters below read the
  official and the timm layouts, where `Flat` takes a slot).
- The attention bias is gathered on every forward instead of being cached in eval: same outputs,
  and no stale cache after loading weights.
- A network without Meta3D flattens before the final LayerNorm (the official code needs >= 1).
- In train mode the distilled model returns the mean of both heads unless `distilled_training` is
  True (timm convention; the official code always returns the pair when training).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn

from ..arch import COMMON_KEYS, check_choice, check_int, check_keys, check_list
from ..errors import ArchError, CheckpointError, bad
from ..layers import Classifier
from ..registry import Family, register_family, register_preset

BLOCK_KEYS = {
    "meta4d": ("type", "ffn_hidden"),
    "meta3d": ("type", "heads", "qk_dim", "v_dim", "ffn_hidden"),
    "identity": ("type",),
}
FIRST_3D_STAGE = 2  # Meta3D only in stages 3 and later (index >= 2), as in the paper's search space


def _trunc_normal_linear(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------- blocks
class Meta4D(nn.Module):
    """x + ls1 * (AvgPool3x3(x) - x); x + ls2 * MLP(x), MLP = 1x1 conv-BN-GELU-1x1 conv-BN."""

    def __init__(self, dim: int, ffn_hidden: int, layer_scale_init: float = 1e-5):
        super().__init__()
        self.token_mixer = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.mlp = nn.Sequential()  # a plain Sequential: fuse_model folds both BNs into the convs
        self.mlp.add_module("fc1", nn.Conv2d(dim, ffn_hidden, 1))
        self.mlp.add_module("norm1", nn.BatchNorm2d(ffn_hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Conv2d(ffn_hidden, dim, 1))
        self.mlp.add_module("norm2", nn.BatchNorm2d(dim))
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.mlp.fc1.apply(_trunc_normal_linear)
        self.mlp.fc2.apply(_trunc_normal_linear)

    def forward(self, x):  # (B, C, H, W)
        x = x + self.layer_scale_1[:, None, None] * (self.token_mixer(x) - x)
        return x + self.layer_scale_2[:, None, None] * self.mlp(x)


class Attention(nn.Module):
    """LeViT-style multi-head attention with a learned per-head bias over (|dx|, |dy|).

    qkv's output is head-major: [q qk_dim, k qk_dim, v v_dim] for head 0, then head 1, ...
    """

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, resolution: int):
        super().__init__()
        self.heads, self.qk_dim, self.v_dim, self.resolution = heads, qk_dim, v_dim, resolution
        self.scale = qk_dim ** -0.5
        self.qkv = nn.Linear(dim, heads * (2 * qk_dim + v_dim))
        self.proj = nn.Linear(heads * v_dim, dim)
        # token n sits at (n // r, n % r); the offset (a, b) = (|drow|, |dcol|) owns bias entry a * r + b,
        # the numbering of the official code (first-appearance order) and of timm alike
        pos = torch.stack(torch.meshgrid(torch.arange(resolution), torch.arange(resolution), indexing="ij")).flatten(1)
        rel = (pos[:, :, None] - pos[:, None, :]).abs()
        self.attention_biases = nn.Parameter(torch.zeros(heads, resolution * resolution))
        self.register_buffer("attention_bias_idxs", rel[0] * resolution + rel[1], persistent=False)

    def forward(self, x):  # (B, N, C)
        B, N, _ = x.shape
        if N != self.resolution ** 2:  # the bias table is tied to the grid, as in the official code
            raise ArchError(f"input: got {N} tokens at an attention built for a {self.resolution}x{self.resolution} "
                            "grid, expected images of the arch's input_size (rebuild with input_size set to theirs)")
        qkv = self.qkv(x).reshape(B, N, self.heads, -1).permute(0, 2, 1, 3)  # (B, h, N, 2qk+v)
        q, k, v = qkv.split([self.qk_dim, self.qk_dim, self.v_dim], dim=3)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.attention_bias_idxs]
        attn = attn.softmax(dim=-1)  # (B, h, N, N)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.heads * self.v_dim)
        return self.proj(x)


class Meta3D(nn.Module):
    """x + ls1 * Attn(LN(x)); x + ls2 * MLP(LN(x)), MLP = Linear-GELU-Linear. On tokens (B, N, C)."""

    def __init__(self, dim: int, heads: int, qk_dim: int, v_dim: int, ffn_hidden: int, resolution: int,
                 layer_scale_init: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = Attention(dim, heads, qk_dim, v_dim, resolution)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, ffn_hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(ffn_hidden, dim))
        self.layer_scale_1 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.layer_scale_2 = nn.Parameter(layer_scale_init * torch.ones(dim))
        self.apply(_trunc_normal_linear)

    def forward(self, x):  # (B, N, C)
        x = x + self.layer_scale_1 * self.token_mixer(self.norm1(x))
        return x + self.layer_scale_2 * self.mlp(self.norm2(x))


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    """Conv3x3 stride 2 pad 1 (with bias) + BN: the downsample between stages."""
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(cin, cout, 3, 2, 1))
    m.add_module("norm", nn.BatchNorm2d(cout))
    return m


def stem(in_chans: int, widths) -> nn.Sequential:
    """Conv3x3 s2 + BN + ReLU, twice: 1/4 resolution."""
    m = nn.Sequential()
    m.add_module("conv1", nn.Conv2d(in_chans, widths[0], 3, 2, 1))
    m.add_module("norm1", nn.BatchNorm2d(widths[0]))
    m.add_module("act1", nn.ReLU())
    m.add_module("conv2", nn.Conv2d(widths[0], widths[1], 3, 2, 1))
    m.add_module("norm2", nn.BatchNorm2d(widths[1]))
    m.add_module("act2", nn.ReLU())
    return m


def make_block(b: Mapping, dim: int, resolution: int) -> nn.Module:
    if b["type"] == "meta4d":
        return Meta4D(dim, b["ffn_hidden"])
    if b["type"] == "meta3d":
        return Meta3D(dim, b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"], resolution)
    return nn.Identity()


class EfficientFormerStage(nn.Module):
    """Optional downsample, then blocks: Meta4D on maps, flatten before the first Meta3D, Meta3D on
    tokens. Returns a map (B, C, H, W) unless `keep_tokens` (the last stage) and it went 3D."""

    def __init__(self, st: Mapping, in_width: int, resolution: int, keep_tokens: bool):
        super().__init__()
        w = st["width"]
        self.downsample = conv_bn(in_width, w) if st["downsample"] else nn.Identity()
        self.blocks = nn.ModuleList(make_block(b, w, resolution) for b in st["blocks"])
        types = [b["type"] for b in st["blocks"]]
        self.flat_at = types.index("meta3d") if "meta3d" in types else None
        self.keep_tokens = keep_tokens

    def forward(self, x):  # (B, C, H, W)
        x = self.downsample(x)
        B, C, H, W = x.shape
        for j, blk in enumerate(self.blocks):
            if j == self.flat_at:
                x = x.flatten(2).transpose(1, 2)  # (B, H*W, C), row-major like the bias grid
            x = blk(x)
        if self.flat_at is not None and not self.keep_tokens:
            x = x.transpose(1, 2).reshape(B, C, H, W)
        return x


def stage_resolutions(arch: Mapping):
    """Feature-map side of every stage at arch['input_size'] (ceil division, as the convs do)."""
    r = -(-arch["input_size"] // 4)
    out = []
    for st in arch["stages"]:
        if st["downsample"]:
            r = -(-r // 2)
        out.append(r)
    return out


class EfficientFormer(Classifier, nn.Module):
    _heads = ("head", "dist_head")

    def __init__(self, arch: dict):
        super().__init__()
        self.arch = arch
        self.num_classes = arch["num_classes"]
        self.distillation = arch["distillation"]
        self.distilled_training = False
        self.stem = stem(arch["in_chans"], arch["stem"]["widths"])
        res = stage_resolutions(arch)
        stages, prev = [], arch["stem"]["widths"][-1]
        for i, st in enumerate(arch["stages"]):
            stages.append(EfficientFormerStage(st, prev, res[i], keep_tokens=i == len(arch["stages"]) - 1))
            prev = st["width"]
        self.stages = nn.ModuleList(stages)
        self.num_features = prev
        self.norm = nn.LayerNorm(prev)
        self.head = nn.Linear(prev, self.num_classes)
        self.dist_head = nn.Linear(prev, self.num_classes) if self.distillation else None
        for m in (self.head, self.dist_head):
            if m is not None:
                _trunc_normal_linear(m)

    def _new_head(self, old, num_classes):
        head = nn.Linear(self.num_features, num_classes)
        _trunc_normal_linear(head)
        return head

    def block_modules(self):
        for i, stage in enumerate(self.stages):
            for j, blk in enumerate(stage.blocks):
                yield (i, j), blk

    def forward_features(self, x):  # (B, 3, H, W) -> (B, N, C) normalised tokens
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        if x.dim() == 4:  # no Meta3D in the last stage
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=1)
        if pre_logits:
            return x
        if self.dist_head is None:
            return self.head(x)
        out, out_dist = self.head(x), self.dist_head(x)
        if self.distilled_training and self.training:
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- presets
def _preset(widths, depths, vit_num):
    stages = []
    for i, (w, d) in enumerate(zip(widths, depths)):
        n3d = vit_num if i == len(widths) - 1 else 0
        blocks = [{"type": "meta4d", "ffn_hidden": 4 * w} for _ in range(d - n3d)]
        blocks += [{"type": "meta3d", "heads": 8, "qk_dim": 32, "v_dim": 128, "ffn_hidden": 4 * w} for _ in range(n3d)]
        stages.append({"width": w, "downsample": None if i == 0 else {"type": "conv"}, "blocks": blocks})
    return {"version": 1, "family": "efficientformer", "input_size": 224, "in_chans": 3, "num_classes": 1000,
            "distillation": True, "stem": {"widths": [widths[0] // 2, widths[0]]}, "stages": stages}


@register_preset("efficientformer_l1")
def efficientformer_l1():
    return _preset((48, 96, 224, 448), (3, 2, 6, 4), 1)


@register_preset("efficientformer_l3")
def efficientformer_l3():
    return _preset((64, 128, 320, 512), (4, 4, 12, 6), 4)


@register_preset("efficientformer_l7")
def efficientformer_l7():
    return _preset((96, 192, 384, 768), (6, 6, 18, 8), 8)


# ---------------------------------------------------------------- checkpoint layouts
_T = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_BLOCK = (r"(layer_scale_[12]|ls[12]\.gamma|mlp\.(fc1|fc2|norm1|norm2)\." + _T + r"|(norm1|norm2)\.(weight|bias)"
          r"|token_mixer\.(qkv|proj)\.(weight|bias)|token_mixer\.attention_bias(es|_idxs))")
_OFFICIAL = re.compile(r"(patch_embed\.[0134]\." + _T + r"|network\.\d+\.(proj|norm)\." + _T +
                       r"|network\.\d+\.\d+\." + _BLOCK + r"|(norm|head|dist_head)\.(weight|bias))")
_STAGED = re.compile(r"(stem\.(conv1|norm1|conv2|norm2)\." + _T + r"|stages\.\d+\.downsample\.(conv|norm)\." + _T +
                     r"|stages\.\d+\.blocks\.\d+\." + _BLOCK + r"|(norm|head|dist_head|head_dist)\.(weight|bias))")


def _layout(sd: Mapping) -> str | None:
    """'official', 'timm', 'vitslim' or None: every key must fit one grammar (no other family's does)."""
    keys = list(sd)
    if "patch_embed.0.weight" in sd and "head.weight" in sd and all(_OFFICIAL.fullmatch(k) for k in keys):
        return "official"
    if "stem.conv1.weight" in sd and "head.weight" in sd and all(_STAGED.fullmatch(k) for k in keys):
        timm = any(".ls1.gamma" in k or k.startswith("head_dist.") for k in keys)
        return "timm" if timm else "vitslim"
    return None


def _to_staged(sd: Mapping, layout: str):
    """Re-key an official/timm state dict to stages.{i}.{downsample,blocks.{j}} (gaps kept as in the
    file), returning (state dict, {our key: file key})."""
    out: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}

    def put(k, orig):
        out[k] = sd[orig]
        origin[k] = orig

    if layout == "official":
        stem_names = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}
        groups: Dict[int, list] = {}
        for k in sd:
            m = re.match(r"network\.(\d+)\.(.*)", k)
            if m:
                groups.setdefault(int(m.group(1)), []).append((k, m.group(2)))
            elif k.startswith("patch_embed."):
                _, idx, rest = k.split(".", 2)
                put(f"stem.{stem_names[idx]}.{rest}", k)
            else:
                put(k, k)
        stage, pending = -1, None  # `pending`: a downsample waiting for the stage it feeds
        for n in sorted(groups):
            items = groups[n]
            if any(r.startswith(("proj.", "norm.")) for _, r in items):
                if pending is not None or stage < 0:  # a stage without blocks sits before this downsample
                    stage += 1
                    for k, r in pending or []:
                        put(f"stages.{stage}.downsample.{r.replace('proj.', 'conv.', 1)}", k)
                pending = items
                continue
            stage += 1
            for k, r in pending or []:
                put(f"stages.{stage}.downsample.{r.replace('proj.', 'conv.', 1)}", k)
            pending = None
            for k, r in items:
                put(f"stages.{stage}.blocks.{r}", k)
        if pending:
            stage += 1
            for k, r in pending:
                put(f"stages.{stage}.downsample.{r.replace('proj.', 'conv.', 1)}", k)
        return out, origin
    for k in sd:
        nk = k.replace(".ls1.gamma", ".layer_scale_1").replace(".ls2.gamma", ".layer_scale_2")
        if nk.startswith("head_dist."):
            nk = "dist_head." + nk[len("head_dist."):]
        put(nk, k)
    return out, origin


def _file_key(key: str, origin: Mapping[str, str]) -> str:
    """The name `key` (ours) has, or would have, in the file: found through a sibling key."""
    if key in origin:
        return origin[key]
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        pre = ".".join(parts[:cut]) + "."
        for k, o in origin.items():
            if k.startswith(pre) and o.endswith(k[len(pre):]):
                return o[:len(o) - len(k) + len(pre)] + key[len(pre):]
    return key


def _convert(sd: Mapping) -> Tuple[dict, Dict[str, torch.Tensor], Dict[str, str]]:
    layout = _layout(sd)
    if layout is None:
        raise CheckpointError("not an EfficientFormer state dict (keys do not fit the official, timm or vitslim layout)")
    staged, origin = _to_staged(sd, layout)

    def get(key, why):
        if key not in staged:
            raise CheckpointError(f"efficientformer checkpoint: missing key {_file_key(key, origin)} (needed for {why})")
        return staged[key]

    c1, c2 = get("stem.conv1.weight", "the stem widths"), get("stem.conv2.weight", "the stem widths")
    stem_widths = [int(c1.shape[0]), int(c2.shape[0])]
    in_chans = int(c1.shape[1])
    head = get("head.weight", "num_classes")

    per_stage: Dict[int, Dict[int, str]] = {}
    downs = set()
    for k in staged:
        m = re.match(r"stages\.(\d+)\.(downsample|blocks\.(\d+))\.", k)
        if not m:
            continue
        i = int(m.group(1))
        per_stage.setdefault(i, {})
        if m.group(3) is None:
            downs.add(i)
        else:
            per_stage[i].setdefault(int(m.group(3)), k)
    n_stages = max(per_stage) + 1 if per_stage else 0
    if n_stages == 0:
        raise CheckpointError("efficientformer checkpoint: no stage found (no network.* / stages.* keys)")

    out_sd: Dict[str, torch.Tensor] = {}
    out_origin: Dict[str, str] = {}
    stages, width, stride, sizes = [], stem_widths[1], 4, []
    for i in range(n_stages):
        ds = None
        if i in downs:
            width = int(get(f"stages.{i}.downsample.conv.weight", f"stage {i} width").shape[0])
            stride *= 2
            ds = {"type": "conv"}
            for k in [k for k in staged if k.startswith(f"stages.{i}.downsample.")]:
                out_sd[k], out_origin[k] = staged[k], origin[k]
        idxs = sorted(per_stage.get(i, {}))
        blocks = []
        # official/timm: the only gap in a stage is the Flat slot, so renumber; vitslim: gaps are identity
        # blocks (identity blocks at the end of a stage leave no trace in the weights and are not recovered)
        slots = range(idxs[-1] + 1) if (layout == "vitslim" and idxs) else idxs
        for j in slots:
            pre = f"stages.{i}.blocks.{j}."
            if j not in per_stage.get(i, {}):
                blocks.append({"type": "identity"})
                continue
            new_pre = f"stages.{i}.blocks.{len(blocks)}."
            if any(k.startswith(pre + "token_mixer.") for k in staged) or f"{pre}norm1.weight" in staged:
                ab = get(pre + "token_mixer.attention_biases", "the number of heads")
                heads, n_off = int(ab.shape[0]), int(ab.shape[1])
                r = math.isqrt(n_off)
                if r * r != n_off:
                    raise CheckpointError(f"efficientformer checkpoint: {origin[pre + 'token_mixer.attention_biases']} has "
                                          f"{n_off} offsets per head, expected a square (r*r for an r x r grid)")
                qkv_out = int(get(pre + "token_mixer.qkv.weight", "qk_dim").shape[0])
                v_total = int(get(pre + "token_mixer.proj.weight", "v_dim").shape[1])
                v_dim = v_total // heads
                qk_dim = (qkv_out // heads - v_dim) // 2
                if v_dim * heads != v_total or heads * (2 * qk_dim + v_dim) != qkv_out:
                    raise CheckpointError(f"efficientformer checkpoint: {origin[pre + 'token_mixer.qkv.weight']} "
                                          f"({qkv_out} outputs) and {origin[pre + 'token_mixer.proj.weight']} ({v_total} "
                                          f"inputs) do not split into {heads} heads of [q, k, v]")
                ffn = int(get(pre + "mlp.fc1.weight", "ffn_hidden").shape[0])
                blocks.append({"type": "meta3d", "heads": heads, "qk_dim": qk_dim, "v_dim": v_dim, "ffn_hidden": ffn})
                sizes.append((r * stride, origin[pre + "token_mixer.attention_biases"]))
            else:
                ffn = int(get(pre + "mlp.fc1.weight", "ffn_hidden").shape[0])
                blocks.append({"type": "meta4d", "ffn_hidden": ffn})
            for k in [k for k in staged if k.startswith(pre)]:
                if k.endswith("attention_bias_idxs"):
                    continue  # rebuilt by the module (a non-persistent buffer)
                nk = new_pre + k[len(pre):]
                out_sd[nk], out_origin[nk] = staged[k], origin[k]
        stages.append({"width": width, "downsample": ds, "blocks": blocks})
    for k in staged:
        if not k.startswith("stages."):
            out_sd[k], out_origin[k] = staged[k], origin[k]

    input_size = sizes[0][0] if sizes else 224
    for s, key in sizes:
        if s != input_size:
            raise CheckpointError(f"efficientformer checkpoint: {key} implies input_size {s} but "
                                  f"{sizes[0][1]} implies {input_size}")
    arch = {"version": 1, "family": "efficientformer", "input_size": input_size, "in_chans": in_chans,
            "num_classes": int(head.shape[0]), "distillation": "dist_head.weight" in out_sd,
            "stem": {"widths": stem_widths}, "stages": stages}
    return arch, out_sd, out_origin


def _check_shapes(arch: dict, sd: Mapping[str, torch.Tensor], origin: Mapping[str, str]) -> None:
    """Name the file's own key when a tensor does not fit the architecture read from the others."""
    with torch.device("meta"):
        own = EfficientFormer(arch).state_dict()
    for k in own:  # BN step counters carry no weights; some exports leave them out
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.tensor(0, dtype=torch.long)
    missing = [_file_key(k, origin) for k in own if k not in sd]
    extra = [origin.get(k, k) for k in sd if k not in own]
    wrong = [f"{origin.get(k, k)} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append("missing keys " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    if extra:
        parts.append("unexpected keys " + ", ".join(extra[:4]) + (" ..." if len(extra) > 4 else ""))
    if wrong:
        parts.append("wrong shapes " + ", ".join(wrong[:3]) + " (file vs expected)")
    if parts:
        raise CheckpointError("efficientformer checkpoint does not fit the architecture its shapes describe: " + "; ".join(parts))


# ---------------------------------------------------------------- family
class EfficientFormerFamily(Family):
    name = "efficientformer"
    block_types = ("meta4d", "meta3d", "identity")
    default_input_size = 224
    paper = "EfficientFormer: Vision Transformers at MobileNet Speed (Li et al., NeurIPS 2022)"

    def validate(self, arch: dict) -> dict:
        check_keys(arch, "", COMMON_KEYS)
        stages = arch["stages"]
        w0 = stages[0]["width"]
        stem_cfg = arch.get("stem")
        if stem_cfg is None:
            stem_cfg = {}
        if not isinstance(stem_cfg, Mapping):
            raise bad("stem", stem_cfg, "a mapping {widths: [C/2, C]}")
        check_keys(stem_cfg, "stem", ("widths",))
        widths = check_list(stem_cfg.get("widths", [max(w0 // 2, 1), w0]), "stem.widths", length=2)
        for k, v in enumerate(widths):
            check_int(v, f"stem.widths[{k}]")
        if widths[1] != w0:
            raise bad("stem.widths[1]", widths[1], f"the width of stages[0] ({w0}): the stem feeds the first stage")
        arch["stem"] = {"widths": [int(v) for v in widths]}

        out, prev, n_down = [], None, 0
        for i, st in enumerate(stages):
            p = f"stages[{i}]"
            check_keys(st, p, ("width", "downsample", "blocks"))
            w = st["width"]
            ds = st.get("downsample", None if i == 0 else {"type": "conv"})
            if i == 0:
                if ds is not None:
                    raise bad(p + ".downsample", ds, "null (the stem feeds the first stage)")
            elif ds is None:
                if w != prev:
                    raise bad(p + ".downsample", ds, f"{{type: conv}}: width changes {prev} -> {w}, which needs a downsample")
            else:
                if not isinstance(ds, Mapping):
                    raise bad(p + ".downsample", ds, "null or {type: conv}")
                check_keys(ds, p + ".downsample", ("type",))
                check_choice(ds.get("type"), p + ".downsample.type", ("conv",))
                ds = {"type": "conv"}
                n_down += 1
            blocks, first_3d = [], None
            for j, b in enumerate(st["blocks"]):
                bp = f"{p}.blocks[{j}]"
                t = b["type"]
                check_keys(b, bp, BLOCK_KEYS[t])
                if t == "identity":
                    blocks.append({"type": "identity"})
                    continue
                if t == "meta4d" and first_3d is not None:
                    raise bad(bp + ".type", t, f"meta3d or identity: 3D blocks only after 4D ones "
                                                f"({p}.blocks[{first_3d}] is meta3d)")
                if t == "meta3d":
                    if i < FIRST_3D_STAGE:
                        raise bad(bp + ".type", t, f"meta4d or identity: meta3d blocks only in stages[{FIRST_3D_STAGE}] "
                                                    "and later (attention at 1/16 and 1/32)")
                    if first_3d is None:
                        first_3d = j
                    nb = {"type": t}
                    nb["heads"] = check_int(b.get("heads", 8), bp + ".heads")
                    nb["qk_dim"] = check_int(b.get("qk_dim", 32), bp + ".qk_dim")
                    nb["v_dim"] = check_int(b.get("v_dim", 4 * nb["qk_dim"]), bp + ".v_dim")
                    nb["ffn_hidden"] = check_int(b.get("ffn_hidden", 4 * w), bp + ".ffn_hidden")
                    blocks.append(nb)
                else:
                    blocks.append({"type": t, "ffn_hidden": check_int(b.get("ffn_hidden", 4 * w), bp + ".ffn_hidden")})
            out.append({"width": w, "downsample": ds, "blocks": blocks})
            prev = w
        arch["stages"] = out
        stride = 4 * 2 ** n_down
        if arch["input_size"] % stride:
            raise bad("input_size", arch["input_size"], f"a multiple of {stride} (the network's total stride: "
                                                        "the attention bias grids depend on it)")
        return arch

    def build(self, arch: dict) -> nn.Module:
        return EfficientFormer(arch)

    def match_state_dict(self, sd) -> bool:
        return _layout(sd) is not None

    def convert_state_dict(self, sd):
        from ..arch import validate
        arch, out, origin = _convert(sd)
        arch = validate(arch)
        _check_shapes(arch, out, origin)
        return arch, out

    def stage_summary(self, arch: dict):
        rows = []
        for i, (st, r) in enumerate(zip(arch["stages"], stage_resolutions(arch))):
            n = {t: sum(b["type"] == t for b in st["blocks"]) for t in self.block_types}
            rows.append({"stage": i, "width": st["width"], "resolution": f"{r}x{r}",
                         "meta4d": n["meta4d"], "meta3d": n["meta3d"], "identity": n["identity"]})
        return rows


register_family(EfficientFormerFamily())
