"""An arch config cut into the segments a latency table holds: (entry key, standalone module, input
shape). Running an arch's segments one after another computes the model's forward, so the sum of
their latencies is the model's latency up to what composition costs (the table's overhead).

An entry key is the operator kind plus the shape fields that fix its cost, e.g.
`{op: meta4d, res: 56, dim: 48, ffn_hidden: 192}`; `key_str` writes it canonically (op first, then
the other fields sorted) so that a lookup is one dict hit. One decomposition function per family
is registered in `DECOMPOSE`; one builder per operator in `OPS`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Tuple

import torch
import torch.nn as nn

from supernet.errors import VitslimError


class SegmentError(VitslimError, ValueError):
    """An arch or entry key the latency machinery has no segment for."""


# ---------------------------------------------------------------- keys
def key_str(key: Mapping) -> str:
    """Canonical text of an entry key: `op|field=value|...`, other fields sorted by name."""
    if "op" not in key:
        raise SegmentError(f"entry key {dict(key)!r}: missing 'op'")
    rest = "|".join(f"{k}={_fmt(key[k])}" for k in sorted(key) if k != "op")
    return f"{key['op']}|{rest}" if rest else str(key["op"])


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def parse_key_str(s: str) -> dict:
    """Inverse of key_str (values become int / bool where they read as such)."""
    parts = s.strip().split("|")
    key = {"op": parts[0]}
    for p in parts[1:]:
        if "=" not in p:
            raise SegmentError(f"entry key {s!r}: {p!r} is not field=value")
        k, v = p.split("=", 1)
        if v in ("true", "false"):
            key[k] = v == "true"
        else:
            try:
                key[k] = int(v)
            except ValueError:
                key[k] = v
    return key


@dataclass
class Segment:
    """One entry of an arch: its key, the part of the forward it stands for ('stem', 'stage2',
    'head'), and where its module sits in the built model (None: a reshape with no parameters)."""
    key: dict
    part: str
    path: str | None = None

    @property
    def id(self) -> str:
        return key_str(self.key)


@dataclass
class OpSpec:
    """How to build one operator kind standalone: `build(key) -> (module, input shape without batch)`.
    `fields` are the key's shape fields; `widths` those among them that interpolation may vary."""
    build: Callable[[Mapping], Tuple[nn.Module, Tuple[int, ...]]]
    fields: Tuple[str, ...]
    widths: Tuple[str, ...]
    kind: str = ""   # the words of the issue: "Meta4D block", "stem", ...


OPS: Dict[str, OpSpec] = {}
DECOMPOSE: Dict[str, Callable[[Mapping], List[Segment]]] = {}


def register_op(name: str, fields, widths, kind: str = ""):
    def deco(fn):
        OPS[name] = OpSpec(fn, tuple(fields), tuple(widths), kind)
        return fn
    return deco


def register_family(name: str):
    def deco(fn):
        DECOMPOSE[name] = fn
        return fn
    return deco


def check_key(key: Mapping) -> dict:
    """A key whose op is known and whose fields are exactly the op's, all scalars."""
    if not isinstance(key, Mapping) or "op" not in key:
        raise SegmentError(f"entry key: got {key!r}, expected a mapping with an 'op'")
    op = key["op"]
    if op not in OPS:
        raise SegmentError(f"entry key {key_str(key)}: unknown op {op!r}, expected one of {', '.join(sorted(OPS))}")
    spec = OPS[op]
    have = set(key) - {"op"}
    if have != set(spec.fields):
        missing = sorted(set(spec.fields) - have)
        extra = sorted(have - set(spec.fields))
        what = "; ".join(x for x in (f"missing {', '.join(missing)}" if missing else "",
                                     f"unexpected {', '.join(extra)}" if extra else "") if x)
        raise SegmentError(f"entry key {key_str(key)}: {what} (an {op} key has {', '.join(spec.fields)})")
    for k in spec.fields:
        v = key[k]
        if isinstance(v, str) and (k in spec.widths or re.fullmatch(r"[+-]?\d+(\.\d*)?", v.strip())):
            # a quoted number keys like the number (key_str) but builds nothing: refused, not half-accepted
            raise SegmentError(f"entry key {key_str(key)}: {k}={v!r}, expected an integer (not a quoted string)")
        if isinstance(v, str):
            if not v or any(c in v for c in "|= "):
                raise SegmentError(f"entry key {key_str(key)}: {k}={v!r}, expected a word without '|', '=' or spaces")
        elif not isinstance(v, (int, bool)) or (not isinstance(v, bool) and v < 0):
            raise SegmentError(f"entry key {key_str(key)}: {k}={v!r}, expected a non-negative integer or true/false")
    return {"op": op, **{k: key[k] for k in spec.fields}}


def build_segment(key: Mapping, seed: int = 0) -> Tuple[nn.Module, Tuple[int, ...]]:
    """(module with random weights in eval mode, input shape without batch) of an entry key."""
    k = check_key(key)
    with torch.random.fork_rng(devices=[]):  # the same weights every time, the caller's RNG left as it was
        torch.manual_seed(seed)
        module, shape = OPS[k["op"]].build(k)
    _randomise_bn(module)
    return module.eval(), tuple(shape)


def _randomise_bn(m: nn.Module) -> None:
    # Trained-looking statistics, so folded weights are not all-equal (and never denormal).
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
            with torch.no_grad():
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=g))


def segment_macs(key: Mapping) -> int:
    """MACs of one entry at batch 1 (counted on the meta device: nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode
    k = check_key(key)
    try:
        with torch.device("meta"):
            module, shape = OPS[k["op"]].build(k)
            x = torch.zeros((1,) + tuple(shape))
        module.eval()  # as deployed (and as build_segment's): BatchNorm1d in training refuses a batch of 1
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(x)
        return int(fc.get_total_flops()) // 2
    except (NotImplementedError, RuntimeError):
        module, shape = build_segment(k)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(torch.zeros((1,) + tuple(shape)))
        return int(fc.get_total_flops()) // 2


def input_numel(key: Mapping) -> int:
    k = check_key(key)
    with torch.device("meta"):
        _, shape = OPS[k["op"]].build(k)
    return int(math.prod(shape))


# ---------------------------------------------------------------- whole archs
def decompose(arch: Mapping) -> List[Segment]:
    """The segments of an arch config, in forward order."""
    from supernet.arch import validate
    a = validate(arch)
    fam = a["family"]
    if fam not in DECOMPOSE:
        raise SegmentError(f"family: got {fam!r}, expected one the latency tables cover "
                           f"({', '.join(sorted(DECOMPOSE))})")
    return DECOMPOSE[fam](a)


def arch_keys(arch: Mapping) -> List[dict]:
    """Distinct entry keys one arch needs, in forward order."""
    seen, out = set(), []
    for s in decompose(arch):
        if s.id not in seen:
            seen.add(s.id)
            out.append(s.key)
    return out


def space_keys(space) -> List[dict]:
    """Every entry a search space can need: each candidate block at each width (steps of
    `width_step`) at its stage's resolution, every downsample between allowed widths, every stem,
    head and reshape."""
    fam = getattr(space, "family", None)
    if fam not in SPACE_ENUMERATORS:
        raise SegmentError(f"search space family {fam!r}: no enumeration, expected one of {', '.join(sorted(SPACE_ENUMERATORS))}")
    seen, out = set(), []
    for k in SPACE_ENUMERATORS[fam](space):
        s = key_str(k)
        if s not in seen:
            seen.add(s)
            out.append(k)
    return out


SPACE_ENUMERATORS: Dict[str, Callable] = {}


# ================================================================ EfficientFormer
class ToTokens(nn.Module):
    """(B, C, H, W) -> (B, H*W, C): what an EfficientFormer stage does before its first Meta3D."""

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class ToMap(nn.Module):
    """(B, H*W, C) -> (B, C, H, W): a stage ending on tokens that feeds a downsample."""

    def __init__(self, res: int, dim: int):
        super().__init__()
        self.res, self.dim = res, dim

    def forward(self, x):  # shapes from constants: traces convert to Core ML
        return x.transpose(1, 2).reshape(-1, self.dim, self.res, self.res)


class EfficientFormerHead(nn.Module):
    """The end of EfficientFormer.forward: tokens (flattened from a map if the last stage has no
    Meta3D), final LayerNorm, mean over tokens, classifier(s). Attribute names = the model's."""

    def __init__(self, dim: int, classes: int, distillation: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.dist_head = nn.Linear(dim, classes) if distillation else None

    def forward(self, x):
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        x = self.norm(x).mean(dim=1)
        if self.dist_head is None:
            return self.head(x)
        return (self.head(x) + self.dist_head(x)) / 2


def _ef():
    from supernet.families import efficientformer as ef
    return ef


@register_op("efficientformer_stem", ("res_in", "cin", "c1", "c2"), ("c1", "c2"), "stem")
def _ef_stem(k):
    return _ef().stem(k["cin"], [k["c1"], k["c2"]]), (k["cin"], k["res_in"], k["res_in"])


@register_op("efficientformer_downsample", ("res_in", "cin", "cout"), ("cin", "cout"), "downsampling")
def _ef_down(k):
    return _ef().conv_bn(k["cin"], k["cout"]), (k["cin"], k["res_in"], k["res_in"])


@register_op("meta4d", ("res", "dim", "ffn_hidden"), ("dim", "ffn_hidden"), "Meta4D block")
def _meta4d(k):
    return _ef().Meta4D(k["dim"], k["ffn_hidden"]), (k["dim"], k["res"], k["res"])


def _side(tokens: int, what: str) -> int:
    r = math.isqrt(tokens)
    if r * r != tokens:
        raise SegmentError(f"{what}: tokens={tokens}, expected a square number (an r x r grid)")
    return r


@register_op("meta3d", ("tokens", "dim", "heads", "qk_dim", "v_dim", "ffn_hidden"),
             ("dim", "heads", "qk_dim", "v_dim", "ffn_hidden"), "Meta3D block")
def _meta3d(k):
    r = _side(k["tokens"], "meta3d")
    return _ef().Meta3D(k["dim"], k["heads"], k["qk_dim"], k["v_dim"], k["ffn_hidden"], r), (k["tokens"], k["dim"])


@register_op("efficientformer_to_tokens", ("res", "dim"), ("dim",), "reshape")
def _ef_tok(k):
    return ToTokens(), (k["dim"], k["res"], k["res"])


@register_op("efficientformer_to_map", ("res", "dim"), ("dim",), "reshape")
def _ef_map(k):
    return ToMap(k["res"], k["dim"]), (k["res"] * k["res"], k["dim"])


@register_op("efficientformer_head", ("res", "dim", "classes", "distillation", "from_map"), ("dim",), "head")
def _ef_head(k):
    shape = (k["dim"], k["res"], k["res"]) if k["from_map"] else (k["res"] * k["res"], k["dim"])
    return EfficientFormerHead(k["dim"], k["classes"], k["distillation"]), shape


@register_family("efficientformer")
def _decompose_efficientformer(a: Mapping) -> List[Segment]:
    res = _ef().stage_resolutions(a)
    size, w_stem = a["input_size"], a["stem"]["widths"]
    segs = [Segment({"op": "efficientformer_stem", "res_in": size, "cin": a["in_chans"], "c1": w_stem[0], "c2": w_stem[1]},
                    "stem", "stem")]
    prev_w, prev_r = w_stem[1], -(-size // 4)
    last = len(a["stages"]) - 1
    tokens_out = False
    for i, st in enumerate(a["stages"]):
        part, w, r = f"stage{i}", st["width"], res[i]
        if st["downsample"]:
            segs.append(Segment({"op": "efficientformer_downsample", "res_in": prev_r, "cin": prev_w, "cout": w},
                                part, f"stages.{i}.downsample"))
        types = [b["type"] for b in st["blocks"]]
        flat_at = types.index("meta3d") if "meta3d" in types else None
        for j, b in enumerate(st["blocks"]):
            if j == flat_at:
                segs.append(Segment({"op": "efficientformer_to_tokens", "res": r, "dim": w}, part))
            if b["type"] == "meta4d":
                segs.append(Segment({"op": "meta4d", "res": r, "dim": w, "ffn_hidden": b["ffn_hidden"]},
                                    part, f"stages.{i}.blocks.{j}"))
            elif b["type"] == "meta3d":
                segs.append(Segment({"op": "meta3d", "tokens": r * r, "dim": w, "heads": b["heads"], "qk_dim": b["qk_dim"],
                                     "v_dim": b["v_dim"], "ffn_hidden": b["ffn_hidden"]}, part, f"stages.{i}.blocks.{j}"))
        if flat_at is not None and i != last:
            segs.append(Segment({"op": "efficientformer_to_map", "res": r, "dim": w}, part))
        tokens_out = flat_at is not None and i == last
        prev_w, prev_r = w, r
    segs.append(Segment({"op": "efficientformer_head", "res": prev_r, "dim": prev_w, "classes": a["num_classes"],
                         "distillation": bool(a["distillation"]), "from_map": not tokens_out}, "head", ""))
    return segs


def _enumerate_efficientformer_space(space):
    res = space.resolutions()
    att = space.attention
    widths = [space.widths(i) for i in range(len(space.stages))]
    for w in widths[0]:
        yield {"op": "efficientformer_stem", "res_in": space.input_size, "cin": space.in_chans, "c1": w // 2, "c2": w}
    last = len(space.stages) - 1
    for i, st in enumerate(space.stages):
        r = res[i]
        for w in widths[i]:
            if i > 0:
                for wp in widths[i - 1]:
                    yield {"op": "efficientformer_downsample", "res_in": res[i - 1], "cin": wp, "cout": w}
            if "meta4d" in st.candidates:
                yield {"op": "meta4d", "res": r, "dim": w, "ffn_hidden": space.ffn_ratio * w}
            if "meta3d" in st.candidates:
                yield {"op": "efficientformer_to_tokens", "res": r, "dim": w}
                yield {"op": "meta3d", "tokens": r * r, "dim": w, "heads": att["heads"], "qk_dim": att["qk_dim"],
                       "v_dim": att["v_dim"], "ffn_hidden": space.ffn_ratio * w}
                if i != last:
                    yield {"op": "efficientformer_to_map", "res": r, "dim": w}
    for w in widths[last]:
        for from_map in ((False, True) if "meta3d" in space.stages[last].candidates else (True,)):
            yield {"op": "efficientformer_head", "res": res[last], "dim": w, "classes": space.num_classes,
                   "distillation": bool(space.distillation), "from_map": from_map}


SPACE_ENUMERATORS["efficientformer"] = _enumerate_efficientformer_space


# ================================================================ DeiT / ViT
def _deit():
    from supernet.families import deit
    return deit


class ViTEmbed(nn.Module):
    """The start of VisionTransformer.forward_features: patchify, prepend cls (and dist) tokens, add
    position embeddings. Attribute names = the model's."""

    def __init__(self, cin: int, patch: int, dim: int, grid: int, prefix: int):
        super().__init__()
        self.patch_embed = _deit().PatchEmbed(cin, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if prefix == 2 else None
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, grid * grid + prefix, dim))

    def forward(self, x):
        x = self.patch_embed(x).flatten(1, 2)
        one = x[:, :1]
        tokens = [self.cls_token.expand_as(one)]
        if self.dist_token is not None:
            tokens.append(self.dist_token.expand_as(one))
        return torch.cat(tokens + [x], dim=1) + self.pos_embed


class ViTHead(nn.Module):
    """The end of VisionTransformer: final LayerNorm, classifier on the cls token (+ dist head, averaged)."""

    def __init__(self, dim: int, classes: int, distillation: bool):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        self.head_dist = nn.Linear(dim, classes) if distillation else None

    def forward(self, x):
        x = self.norm(x)
        if self.head_dist is None:
            return self.head(x[:, 0])
        return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2


@register_op("vit_embed", ("res_in", "cin", "patch", "dim", "prefix"), ("dim",), "stem (patch embedding)")
def _vit_embed(k):
    g = k["res_in"] // k["patch"]
    return ViTEmbed(k["cin"], k["patch"], k["dim"], g, k["prefix"]), (k["cin"], k["res_in"], k["res_in"])


@register_op("vit_block", ("tokens", "dim", "heads", "qk_dim", "v_dim", "ffn_hidden"),
             ("dim", "heads", "qk_dim", "v_dim", "ffn_hidden"), "ViT block")
def _vit_block(k):
    d = _deit()
    return d.Block(k["dim"], k["heads"], k["qk_dim"], k["v_dim"], k["ffn_hidden"]), (k["tokens"], k["dim"])


@register_op("vit_head", ("tokens", "dim", "classes", "distillation"), ("dim",), "head")
def _vit_head(k):
    return ViTHead(k["dim"], k["classes"], k["distillation"]), (k["tokens"], k["dim"])


@register_family("deit")
def _decompose_deit(a: Mapping) -> List[Segment]:
    st = a["stages"][0]
    dim, p = st["width"], a["stem"]["patch_size"]
    prefix = 2 if a["distillation"] else 1
    g = a["input_size"] // p
    tokens = g * g + prefix
    segs = [Segment({"op": "vit_embed", "res_in": a["input_size"], "cin": a["in_chans"], "patch": p, "dim": dim,
                     "prefix": prefix}, "stem", "")]
    for j, b in enumerate(st["blocks"]):
        if not b["heads"] and not b["ffn_hidden"]:
            continue  # both branches pruned away: the block is the identity
        segs.append(Segment({"op": "vit_block", "tokens": tokens, "dim": dim, "heads": b["heads"], "qk_dim": b["qk_dim"],
                             "v_dim": b["v_dim"], "ffn_hidden": b["ffn_hidden"]}, "stage0", f"blocks.{j}"))
    segs.append(Segment({"op": "vit_head", "tokens": tokens, "dim": dim, "classes": a["num_classes"],
                         "distillation": bool(a["distillation"])}, "head", ""))
    return segs


# ================================================================ Swin
def _swin():
    from supernet.families import swin
    return swin


class SwinBlockAt(nn.Module):
    """A Swin block as its stage calls it: plain, or (odd blocks) with shifted windows and the mask of
    its feature size. Holds the block as `block` and the mask as a non-persistent buffer."""

    def __init__(self, res: int, dim: int, heads: int, qk_dim: int, v_dim: int, ffn_hidden: int, window: int,
                 shifted: bool):
        super().__init__()
        sw = _swin()
        self.block = sw.SwinBlock(dim, heads, qk_dim, v_dim, ffn_hidden, window)
        self.shift = sw.window_shift(res, res, window) if shifted else (0, 0)
        mask = None
        if any(self.shift):
            padded = math.ceil(res / window) * window
            mask = sw.shifted_window_mask(padded, padded, window, self.shift)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):  # (B, H, W, C)
        if any(self.shift):
            return self.block(x, self.shift, self.mask)
        return self.block(x)


class SwinHead(nn.Module):
    """The end of SwinTransformer: LayerNorm, global average pool, fc. Attribute names = the model's."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = _swin().ClassifierHead(dim, classes)

    def forward(self, x):
        return self.head(self.norm(x))


@register_op("swin_embed", ("res_in", "cin", "patch", "dim"), ("dim",), "stem (patch embedding)")
def _swin_embed(k):
    return _deit().PatchEmbed(k["cin"], k["dim"], k["patch"], norm=True), (k["cin"], k["res_in"], k["res_in"])


@register_op("swin_patch_merging", ("res_in", "cin", "cout"), ("cin", "cout"), "downsampling")
def _swin_merge(k):
    return _swin().PatchMerging(k["cin"], k["cout"]), (k["res_in"], k["res_in"], k["cin"])


@register_op("swin_block", ("res", "dim", "heads", "qk_dim", "v_dim", "ffn_hidden", "window", "shifted"),
             ("dim", "heads", "qk_dim", "v_dim", "ffn_hidden"), "Swin block")
def _swin_block(k):
    return (SwinBlockAt(k["res"], k["dim"], k["heads"], k["qk_dim"], k["v_dim"], k["ffn_hidden"], k["window"], k["shifted"]),
            (k["res"], k["res"], k["dim"]))


@register_op("swin_head", ("res", "dim", "classes"), ("dim",), "head")
def _swin_head(k):
    return SwinHead(k["dim"], k["classes"]), (k["res"], k["res"], k["dim"])


@register_family("swin")
def _decompose_swin(a: Mapping) -> List[Segment]:
    sw = _swin()
    p = a["stem"]["patch_size"]
    res = sw.stage_resolutions(a)
    w0 = a["stages"][0]["width"]
    segs = [Segment({"op": "swin_embed", "res_in": a["input_size"], "cin": a["in_chans"], "patch": p, "dim": w0},
                    "stem", "patch_embed")]
    prev_w, prev_r = w0, a["input_size"] // p
    for i, st in enumerate(a["stages"]):
        part, w, r, win = f"stage{i}", st["width"], res[i], st["window_size"]
        if st["downsample"] is not None:
            segs.append(Segment({"op": "swin_patch_merging", "res_in": prev_r, "cin": prev_w, "cout": w}, part,
                                f"layers.{i}.downsample"))
        has_shift = any(sw.window_shift(r, r, win)) and len(st["blocks"]) >= 2
        for j, b in enumerate(st["blocks"]):
            if not b["heads"] and not b["ffn_hidden"]:
                continue
            shifted = bool(j % 2) and has_shift and b["heads"] > 0
            segs.append(Segment({"op": "swin_block", "res": r, "dim": w, "heads": b["heads"], "qk_dim": b["qk_dim"],
                                 "v_dim": b["v_dim"], "ffn_hidden": b["ffn_hidden"], "window": win, "shifted": shifted},
                                part, f"layers.{i}.blocks.{j}"))
        prev_w, prev_r = w, r
    segs.append(Segment({"op": "swin_head", "res": prev_r, "dim": prev_w, "classes": a["num_classes"]}, "head", ""))
    return segs


# ================================================================ EfficientViT / SHViT (StagedNet)
def _evit():
    from supernet.families import efficientvit
    return efficientvit


def _ints(text: str):
    return [int(v) for v in str(text).split("-")]


def _dashed(values) -> str:
    """A list of ints as one key field: [5, 5, 3] -> '5-5-3'."""
    return "-".join(str(int(v)) for v in values)


class StagedHead(nn.Module):
    """The end of EfficientViT / SHViT: global average pool, BN + Linear head (+ head_dist, averaged)."""

    def __init__(self, dim: int, classes: int, distillation: bool):
        super().__init__()
        from supernet.layers import BNLinear
        self.head = BNLinear(dim, classes)
        self.head_dist = BNLinear(dim, classes) if distillation else None

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2


@register_op("staged_stem", ("res_in", "cin", "widths"), (), "stem (16x16 patchify, EfficientViT/SHViT)")
def _staged_stem(k):
    return _evit().make_stem(k["cin"], _ints(k["widths"])), (k["cin"], k["res_in"], k["res_in"])


@register_op("staged_downsample", ("res_in", "cin", "cout", "hidden", "se_hidden", "ffn_hidden", "ffn2_hidden"),
             ("cin", "cout", "hidden", "se_hidden", "ffn_hidden", "ffn2_hidden"), "downsampling (EfficientViT/SHViT)")
def _staged_down(k):
    mods = _evit().downsample_modules(k["cin"], k["cout"], k)
    return nn.Sequential(*mods), (k["cin"], k["res_in"], k["res_in"])


@register_op("cga_block", ("res", "dim", "heads", "qk_dim", "v_dim", "kernels", "ffn_hidden", "ffn2_hidden", "window"),
             ("dim", "qk_dim", "v_dim", "ffn_hidden", "ffn2_hidden"), "sandwich / CGA block (EfficientViT)")
def _cga_block(k):
    b = {"heads": k["heads"], "qk_dim": k["qk_dim"], "v_dim": k["v_dim"], "kernels": _ints(k["kernels"]),
         "ffn_hidden": k["ffn_hidden"], "ffn2_hidden": k["ffn2_hidden"], "window_size": k["window"]}
    return _evit().EfficientViTBlock(k["dim"], b, k["res"]), (k["dim"], k["res"], k["res"])


@register_op("shvit_conv_block", ("res", "dim", "ffn_hidden"), ("dim", "ffn_hidden"), "SHViT block without attention")
def _shvit_conv(k):
    from supernet.families import shvit
    return shvit.SHViTBlock(k["dim"], {"type": "conv", "ffn_hidden": k["ffn_hidden"]}), (k["dim"], k["res"], k["res"])


@register_op("shsa_block", ("res", "dim", "pdim", "qk_dim", "ffn_hidden"), ("dim", "pdim", "qk_dim", "ffn_hidden"),
             "SHSA block (SHViT)")
def _shsa(k):
    from supernet.families import shvit
    b = {"type": "shsa", "pdim": k["pdim"], "qk_dim": k["qk_dim"], "ffn_hidden": k["ffn_hidden"]}
    return shvit.SHViTBlock(k["dim"], b), (k["dim"], k["res"], k["res"])


@register_op("staged_head", ("res", "dim", "classes", "distillation"), ("dim",), "head (EfficientViT/SHViT)")
def _staged_head(k):
    return StagedHead(k["dim"], k["classes"], k["distillation"]), (k["dim"], k["res"], k["res"])


def _decompose_staged(a: Mapping, block_key) -> List[Segment]:
    ev = _evit()
    res = a["input_size"]
    for _ in a["stem"]["widths"]:
        res = ev.conv_out(res)
    segs = [Segment({"op": "staged_stem", "res_in": a["input_size"], "cin": a["in_chans"],
                     "widths": _dashed(a["stem"]["widths"])}, "stem", "patch_embed")]
    prev = a["stem"]["widths"][-1]
    for i, st in enumerate(a["stages"]):
        part, w = f"stage{i}", st["width"]
        off = 0
        if st["downsample"] is not None:
            ds = st["downsample"]
            segs.append(Segment({"op": "staged_downsample", "res_in": res, "cin": prev, "cout": w, "hidden": ds["hidden"],
                                 "se_hidden": ds["se_hidden"], "ffn_hidden": ds["ffn_hidden"],
                                 "ffn2_hidden": ds["ffn2_hidden"]}, part, f"blocks{i + 1}"))
            res = ev.conv_out(res)
            off = 3
        for j, b in enumerate(st["blocks"]):
            segs.append(Segment(block_key(b, res, w), part, f"blocks{i + 1}.{off + j}"))
        prev = w
    segs.append(Segment({"op": "staged_head", "res": res, "dim": prev, "classes": a["num_classes"],
                         "distillation": bool(a["distillation"])}, "head", ""))
    return segs


@register_family("efficientvit")
def _decompose_efficientvit(a: Mapping) -> List[Segment]:
    def key(b, res, w):
        return {"op": "cga_block", "res": res, "dim": w, "heads": b["heads"], "qk_dim": b["qk_dim"], "v_dim": b["v_dim"],
                "kernels": _dashed(b["kernels"]), "ffn_hidden": b["ffn_hidden"], "ffn2_hidden": b["ffn2_hidden"],
                "window": b["window_size"]}
    return _decompose_staged(a, key)


@register_family("shvit")
def _decompose_shvit(a: Mapping) -> List[Segment]:
    def key(b, res, w):
        if b["type"] == "conv":
            return {"op": "shvit_conv_block", "res": res, "dim": w, "ffn_hidden": b["ffn_hidden"]}
        return {"op": "shsa_block", "res": res, "dim": w, "pdim": b["pdim"], "qk_dim": b["qk_dim"],
                "ffn_hidden": b["ffn_hidden"]}
    return _decompose_staged(a, key)


# ---------------------------------------------------------------- covering networks (in-context measurement)
SPACE_COVERS: Dict[str, Callable] = {}


def _cover_efficientformer(space, wanted: set, rng) -> List[dict]:
    """Members of an EfficientFormer space that together contain every wanted key: each new network
    takes the widths that cover the most wanted keys left (a longest path through the stages, edges
    = downsamples), and per stage Meta4D / Meta3D blocks when their entries at that width are wanted."""
    S = len(space.stages)
    W = [space.widths(i) for i in range(S)]
    left = set(wanted)
    out: List[dict] = []
    all_keys = {key_str(k) for k in space_keys(space)}
    left &= all_keys
    while left:
        proto = _ef_layout_keys(space)

        def node(i, w):
            return sum(1 for k in proto(i, w) if k in left) + 1e-3 * rng.random()

        def edge(i, a, b):  # downsample into stage i
            return 1.0 if key_str({"op": "efficientformer_downsample", "res_in": space.resolutions()[i - 1], "cin": a,
                                   "cout": b}) in left else 0.0
        best = {w: (node(0, w), [w]) for w in W[0]}
        for i in range(1, S):
            nxt = {}
            for b in W[i]:
                cands = [(v + edge(i, a, b), path) for a, (v, path) in best.items()]
                v, path = max(cands, key=lambda t: t[0])
                nxt[b] = (v + node(i, b), path + [b])
            best = nxt
        widths = max(best.values(), key=lambda t: t[0])[1]
        blocks = []
        for i, (w, st) in enumerate(zip(widths, space.stages)):
            k4 = key_str({"op": "meta4d", "res": space.resolutions()[i], "dim": w, "ffn_hidden": space.ffn_ratio * w})
            k3 = key_str(_ef_meta3d(space, i, w))
            want4 = "meta4d" in st.candidates and (k4 in left or rng.random() < 0.5)
            want3 = "meta3d" in st.candidates and (k3 in left or _ef_wants_3d_context(space, i, w, left) or rng.random() < 0.5)
            if i == S - 1 and "meta3d" in st.candidates:
                head3 = _ef_head_key(space, w, from_map=False)
                head4 = _ef_head_key(space, w, from_map=True)
                if head4 in left and head3 not in left:
                    want3 = False
                elif head3 in left:
                    want3 = True
            n4 = (1 + rng.randrange(max(1, st.max_depth - (1 if want3 else 0)))) if want4 else 0
            n4 = min(n4, st.max_depth - (1 if want3 else 0))
            n3 = (1 + rng.randrange(st.max_depth - n4)) if want3 and st.max_depth > n4 else 0
            if n4 + n3 == 0:
                n4 = 1 if "meta4d" in st.candidates else 0
                n3 = 0 if n4 else 1
            blocks.append(["meta4d"] * n4 + ["meta3d"] * n3 + ["identity"] * (st.max_depth - n4 - n3))
        arch = space.to_arch({"widths": widths, "blocks": blocks})
        got = {s.id for s in decompose(arch)}
        if not (got & left):
            raise SegmentError(f"cannot cover {len(left)} entries of the space with its members: "
                               + ", ".join(sorted(left)[:3]))
        left -= got
        out.append(arch)
    return out


def _ef_meta3d(space, i, w):
    att = space.attention
    r = space.resolutions()[i]
    return {"op": "meta3d", "tokens": r * r, "dim": w, "heads": att["heads"], "qk_dim": att["qk_dim"],
            "v_dim": att["v_dim"], "ffn_hidden": space.ffn_ratio * w}


def _ef_head_key(space, w, from_map):
    return key_str({"op": "efficientformer_head", "res": space.resolutions()[-1], "dim": w, "classes": space.num_classes,
                    "distillation": bool(space.distillation), "from_map": from_map})


def _ef_wants_3d_context(space, i, w, left):
    r = space.resolutions()[i]
    return (key_str({"op": "efficientformer_to_tokens", "res": r, "dim": w}) in left
            or key_str({"op": "efficientformer_to_map", "res": r, "dim": w}) in left)


def _ef_layout_keys(space):
    S = len(space.stages)
    res = space.resolutions()

    def keys(i, w):
        r = res[i]
        out = [key_str({"op": "meta4d", "res": r, "dim": w, "ffn_hidden": space.ffn_ratio * w})]
        if "meta3d" in space.stages[i].candidates:
            out += [key_str(_ef_meta3d(space, i, w)), key_str({"op": "efficientformer_to_tokens", "res": r, "dim": w})]
            if i != S - 1:
                out.append(key_str({"op": "efficientformer_to_map", "res": r, "dim": w}))
        if i == 0:
            out.append(key_str({"op": "efficientformer_stem", "res_in": space.input_size, "cin": space.in_chans,
                                "c1": w // 2, "c2": w}))
        if i == S - 1:
            out += [_ef_head_key(space, w, True), _ef_head_key(space, w, False)]
        return out
    return keys


SPACE_COVERS["efficientformer"] = _cover_efficientformer
