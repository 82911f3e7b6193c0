"""Hugging Face `transformers` checkpoints of ViT, DeiT and Swin (`pytorch_model.bin`,
`model.safetensors`), re-keyed to the official / timm layouts that the deit and swin families
read. Written from the key names and forward passes of transformers' modeling_vit.py,
modeling_deit.py and modeling_swin.py (4.x hub files and the 5.x names of a model's own
`state_dict()` both read):

- ViTForImageClassification (`vit.*`, `classifier`; the non-distilled `facebook/deit-*-patch16-224`
  files are this class): timm's ViT with one prefix token. A `vit.pooler.*` left in a
  classification file is not on the logits' path and is dropped.
- DeiTForImageClassificationWithTeacher (`deit.*`, `cls_classifier`, `distillation_classifier`):
  a distilled DeiT, eval logits the mean of both heads as in vitslim (`distillation: true`).
- DeiTForImageClassification (`deit.*`, one `classifier`): HF keeps the distillation token in the
  sequence but classifies the cls token alone. vitslim builds that as a distilled DeiT whose
  class head is twice `classifier` and whose distillation head is zero: (2 h + 0) / 2 = h, the
  same logits (exactly: scaling by 2 is exact in floating point); a warning says so.
- SwinForImageClassification (`swin.*`, `classifier`): downsample at the end of a stage as in the
  official Swin; its 2x2 concatenation is (0,0), (1,0), (0,1), (1,1) (row, column), the official
  x0, x1, x2, x3 order, so merging weights load unchanged.

HF keeps query / key / value as three Linear layers; they are concatenated into the fused `qkv`
[q | k | v] (each head-major, as HF's view(..., heads, head_dim) splits them).

What is not exact: HF ViT / DeiT LayerNorms use `layer_norm_eps` 1e-12 by default, vitslim's DeiT
timm's 1e-6. Normalising features of variance s^2 differs by about 1e-6 / (2 s^2) relative per
LayerNorm: below float32 noise for trained weights (s^2 >> 1e-3), measured in the tests. HF Swin's
1e-5 is vitslim's. HF Swin pads a feature map to window multiples before shifting it, timm (and
vitslim) after: outputs agree whenever the stage sides are window multiples (every released
model at its own image size).

A `config.json` beside the weights (as on the hub) is read as JSON when present: `image_size` gives a
Swin's input size (its tensors do not record it), `num_attention_heads` a ViT / DeiT's heads
(otherwise timm's 64-channel guess, with a warning at widths no released model has), and a `hidden_act` other than gelu is refused.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Dict, Mapping, Optional, Tuple

import torch

from .errors import CheckpointError

SUPPORTED = ("ViTForImageClassification (vit.*), DeiTForImageClassification and "
             "DeiTForImageClassificationWithTeacher (deit.*), SwinForImageClassification (swin.*)")
_PATCH = re.compile(r"(?:(\w+)\.)?embeddings\.patch_embeddings\.projection\.weight")
_QKV = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v"}

# ViT / DeiT: (pattern on the key without its `vit.` / `deit.` prefix, target); None drops the key
_VIT_RULES = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q_proj|k_proj|v_proj))"
     r"\.(weight|bias)", "QKV"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
    (r"pooler\.dense\.(weight|bias)", None),
]
_SWIN_BLOCK = r"encoder\.layers\.(\d+)\.blocks\.(\d+)\."
_SWIN_RULES = [
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"embeddings\.norm\.(weight|bias)", r"patch_embed.norm.\1"),
    (_SWIN_BLOCK + r"attention\.(?:self\.(query|key|value)|(q_proj|k_proj|v_proj))\.(weight|bias)", "QKV"),
    (_SWIN_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_bias_table",
     r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (_SWIN_BLOCK + r"attention\.(?:self|relative_position_bias)\.relative_position_index", None),
    (_SWIN_BLOCK + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", r"layers.\1.blocks.\2.attn.proj.\3"),
    (_SWIN_BLOCK + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (_SWIN_BLOCK + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    (_SWIN_BLOCK + r"layernorm_before\.(weight|bias)", r"layers.\1.blocks.\2.norm1.\3"),
    (_SWIN_BLOCK + r"layernorm_after\.(weight|bias)", r"layers.\1.blocks.\2.norm2.\3"),
    (r"encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", r"layers.\1.downsample.\2"),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
]
_RULES = {"vit": [(re.compile(p), t) for p, t in _VIT_RULES], "deit": [(re.compile(p), t) for p, t in _VIT_RULES],
          "swin": [(re.compile(p), t) for p, t in _SWIN_RULES]}
_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
_BACKBONES = {"vit": "ViTModel", "deit": "DeiTModel", "swin": "SwinModel"}
_EXPLAIN = {  # keys of HF variants vitslim does not build, and what they mean
    "embeddings.position_embeddings": "absolute position embeddings (use_absolute_embeddings: true), "
                                      "which vitslim's Swin does not build",
    "embeddings.mask_token": "a mask token (a masked-image-modeling model)",
    "decoder.": "a masked-image-modeling decoder",
}


def hf_prefix(sd: Mapping) -> Optional[str]:
    """The model prefix ('vit', 'deit', 'swin', another, or '' for a bare backbone) of a transformers
    state dict, None when `sd` is not one."""
    for k in sd:
        m = _PATCH.fullmatch(k)
        if m:
            return m.group(1) or ""
    return None


def read_config(path: str, prefix: str) -> dict:
    """config.json beside `path`, as JSON (never executed); {} when absent or for another model type."""
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    if not os.path.isfile(cfg_path):
        return {}
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: '[[[[...' nested
        warnings.warn(f"{cfg_path}: not readable JSON ({type(e).__name__}), ignored: the architecture is read "
                      "from the tensors alone", stacklevel=3)
        return {}
    if not isinstance(cfg, dict) or cfg.get("model_type") != prefix:
        return {}
    return cfg


def _rename(sd: Mapping[str, torch.Tensor], prefix: str) -> Tuple[dict, dict, list]:
    """(renamed tensors, {(block key, 'q'|'k'|'v', 'weight'|'bias'): tensor}, unknown keys)."""
    out, qkv, unknown = {}, {}, []
    rules = _RULES[prefix]
    for k, v in sd.items():
        if k.startswith(prefix + "."):
            rest = k[len(prefix) + 1:]
            for pat, target in rules:
                m = pat.fullmatch(rest)
                if not m:
                    continue
                if target == "QKV":
                    g = [x for x in m.groups() if x is not None]
                    block = f"blocks.{g[0]}" if prefix != "swin" else f"layers.{g[0]}.blocks.{g[1]}"
                    qkv[(block, _QKV[g[-2]], g[-1])] = v
                elif target is not None:
                    out[m.expand(target)] = v
                break
            else:
                unknown.append(k)
        else:
            m = re.fullmatch(r"(classifier|cls_classifier|distillation_classifier)\.(weight|bias)", k)
            if m:
                out[f"{_HEADS[m.group(1)]}.{m.group(2)}"] = v
            else:
                unknown.append(k)
    return out, qkv, unknown


def _fuse_qkv(out: dict, qkv: dict, where: str) -> None:
    blocks = sorted({b for b, _, _ in qkv})
    for b in blocks:
        for kind in ("weight", "bias"):
            parts = [qkv.get((b, n, kind)) for n in ("q", "k", "v")]
            if all(p is None for p in parts) and kind == "bias":
                raise CheckpointError(f"{where}: {b} has no query/key/value biases (qkv_bias: false), expected "
                                      "them: vitslim's attention has a bias")
            if any(p is None for p in parts):
                miss = [n for n, p in zip(("query", "key", "value"), parts) if p is None]
                raise CheckpointError(f"{where}: {b} has no attention {'/'.join(miss)} {kind}, expected "
                                      "query, key and value")
            target = f"{b}.attn.qkv.{kind}"
            out[target] = torch.cat(parts, dim=0)


def convert(sd: Mapping[str, torch.Tensor], path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state dict in the official / timm layout, arch overrides from config.json) of a transformers
    checkpoint; CheckpointError for a transformers layout vitslim does not read."""
    prefix = hf_prefix(sd)
    if prefix not in ("vit", "deit", "swin"):
        what = f"model prefix '{prefix}.'" if prefix else "a bare backbone (no model prefix, no classifier)"
        raise CheckpointError(f"{path}: a Hugging Face transformers checkpoint ({what}) that vitslim does not read, "
                              f"expected one of {SUPPORTED}")
    out, qkv, unknown = _rename(sd, prefix)
    if unknown:
        rests = [k[len(prefix) + 1:] if k.startswith(prefix + ".") else k for k in unknown]
        why = next((e for key, e in _EXPLAIN.items() if any(r.startswith(key) for r in rests)), None)
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise CheckpointError(f"{path}: a Hugging Face transformers {prefix} checkpoint with keys vitslim does not "
                              f"read: {', '.join(unknown[:3])}{more}{f' ({why})' if why else ''}, expected one of "
                              f"{SUPPORTED}")
    if "head.weight" not in out:
        raise CheckpointError(f"{path}: a Hugging Face transformers {prefix} backbone without a classifier "
                              f"(e.g. {_BACKBONES[prefix]}), expected one of {SUPPORTED}")
    _fuse_qkv(out, qkv, path)
    cfg = read_config(path, prefix)
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"{path}: config.json hidden_act {act!r}, expected 'gelu' (vitslim's MLP uses exact GELU)")
    hints = {}
    eps, own = cfg.get("layer_norm_eps"), (1e-5 if prefix == "swin" else 1e-6)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > (1e-4 if prefix == "swin" else 1e-5) * 1.001:
        warnings.warn(f"{path}: config.json layer_norm_eps {eps:g}, vitslim's {prefix} LayerNorms use {own:g}: logits "
                      f"differ from the Hugging Face model's by about {eps / 2:.0e} relative per LayerNorm on "
                      "unit-variance features", stacklevel=3)
    if "dist_token" in out and "head_dist.weight" not in out:
        # DeiTForImageClassification: the distillation token runs through the blocks, one classifier on the
        # cls token: a distilled DeiT with head 2h and a zero distillation head has the same eval logits
        w, b = out["head.weight"], out.get("head.bias")
        out["head.weight"] = w * 2
        out["head_dist.weight"] = torch.zeros_like(w)
        if b is not None:
            out["head.bias"] = b * 2
            out["head_dist.bias"] = torch.zeros_like(b)
        warnings.warn(f"{path}: a Hugging Face DeiTForImageClassification (distillation token, one classifier) "
                      "loads as a distilled DeiT with a doubled class head and a zero distillation head: "
                      "the same logits at eval", stacklevel=3)
    if prefix == "swin":
        size = cfg.get("image_size")
        if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
            size = size[0]
        if size is not None and (not isinstance(size, int) or isinstance(size, bool)):  # "224", 224.0, [224, 256], true
            raise CheckpointError(f"{path}: config.json image_size {size!r:.40}, expected an integer (or a square "
                                  "[n, n] pair); fix or remove config.json")
        if size is not None:
            patch = out["patch_embed.proj.weight"].shape[-1]
            n_stages = 1 + max((int(m.group(1)) for k in out for m in [re.match(r"layers\.(\d+)\.", k)] if m), default=0)
            lo = patch * 2 ** (n_stages - 1)
            if not lo <= size <= 4096:  # every stage at least one token; not a typo that allocates gigabytes of masks
                raise CheckpointError(f"{path}: config.json image_size {size}, expected {lo} to 4096 for this Swin "
                                      f"(patch {patch}, {n_stages} stages); fix or remove config.json")
            hints["input_size"] = size
            _warn_swin_padding(out, size, path)
    else:
        heads = cfg.get("num_attention_heads")
        hidden = out["patch_embed.proj.weight"].shape[0]
        if heads is not None and not (isinstance(heads, int) and not isinstance(heads, bool) and heads > 0
                                      and hidden % heads == 0):  # not silently replaced by a guess
            raise CheckpointError(f"{path}: config.json num_attention_heads {heads!r:.40}, expected a positive integer "
                                  f"that divides the width {hidden}; fix or remove config.json")
        if heads is not None:
            hints["head_dim"] = hidden // heads
        elif hidden % 64 and not (hidden >= 1280 and hidden % 16 == 0):  # not a width of a released model
            from .families.deit import vit_default_heads
            h = vit_default_heads(hidden)
            warnings.warn(f"{path}: no config.json with num_attention_heads beside this Hugging Face {prefix} file: "
                          f"{h} heads of {hidden // h} channels guessed from the width {hidden}; outputs are right only "
                          "if the guess is (put the model's config.json beside it)", stacklevel=3)
    return out, hints


def _warn_swin_padding(out: Mapping[str, torch.Tensor], size: int, path: str) -> None:
    """HF Swin pads a feature map to window multiples before its cyclic shift, vitslim (timm) after: the shifted
    blocks of a stage whose side is larger than its window and not a multiple of it give other outputs."""
    stages: Dict[int, Tuple[int, int]] = {}  # stage -> (window, blocks)
    for k, v in out.items():
        m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", k)
        if m:
            i, j, w = int(m.group(1)), int(m.group(2)), (int(v.shape[0] ** 0.5) + 1) // 2
            stages[i] = (w, max(stages.get(i, (w, 0))[1], j + 1))
    side = -(-size // out["patch_embed.proj.weight"].shape[-1])
    bad = []
    for i in range(max(stages, default=-1) + 1):
        if i:
            side = -(-side // 2)
        w, n = stages.get(i, (0, 0))
        if n >= 2 and side > w and side % w:
            bad.append(f"stage {i}: {side}x{side}, window {w}")
    if bad:
        warnings.warn(f"{path}: config.json image_size {size} gives Swin feature maps that are not window multiples "
                      f"({'; '.join(bad)}): Hugging Face pads them before the shifted windows, vitslim (as timm) after, "
                      "so logits differ from the Hugging Face model's (by several percent on random weights)", stacklevel=4)


def apply_hints(arch: dict, hints: Mapping) -> dict:
    """The arch of a converted file with what config.json says and the tensors do not."""
    if "input_size" in hints:
        arch["input_size"] = hints["input_size"]
    d = hints.get("head_dim")
    if d:
        for st in arch["stages"]:
            for b in st["blocks"]:
                total = b["heads"] * b["qk_dim"]
                if b["heads"] and total == b["heads"] * b["v_dim"] and total % d == 0:
                    b.update(heads=total // d, qk_dim=d, v_dim=d)
    return arch
