"""The prunable units of DeiT and Swin blocks, and the plan that says which of them survive.

Unit kinds, per attention block (the words of the arch config, EfficientViT's reallocation):

- ``qk``: a Q/K channel *pair* inside one head: row c of head h in the q part of the fused `qkv`
  Linear together with row c of head h in the k part. Removing the pair removes exactly the term
  q_c * k_c from every attention logit; the attention keeps the scale it was trained with
  (`scale` is written into the pruned block), so every other term is computed as before.
- ``v``: a V channel inside one head: row c of head h in the v part of `qkv` with the matching
  input column h * v_dim + c of `proj`.
- ``head``: a whole head: its q, k and v rows, its `proj` columns and (Swin) its column of
  `relative_position_bias_table`. Zero heads remove the attention branch (and its norm1).
- ``ffn``: one hidden channel of the MLP: row of `fc1` (weight and bias) and column of `fc2`.
  Zero channels remove the MLP branch (and its norm2).

Grouping forced by the arch vocabulary: `qk_dim` and `v_dim` are per block, the same for every
head, so the *count* of Q/K pairs (and of V channels) kept is chosen per block, while the
*indices* are chosen per head (each head keeps its own most important channels). The selectable
step "one Q/K slice" of a block therefore removes one pair from every kept head: the least
important remaining pair of each head. Heads, Q/K slices, V slices and FFN channels are chosen
independently, so a block may keep 2 of 64 Q/K channels per head and all 64 V channels.

- ``embed`` (optional, `prune_embed`): one channel of a stage's residual width, everywhere it is
  read or written: the patch embedding (and cls/dist tokens, position embedding) or the patch
  merging that feeds the stage, every LayerNorm, qkv and fc1 input column, proj and fc2 output
  row of its blocks, and what reads the stage's output (the next patch merging, or the final norm
  and classifier). Unlike the other kinds, removing it is not the same as gating it to zero: the
  LayerNorms then normalise over fewer channels.

`BlockInfo` records what selection and cost models need to know about one block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

import torch.nn as nn

from supernet.errors import VitslimError

SUPPORTED_FAMILIES = ("deit", "swin")
KINDS = ("head", "qk", "v", "ffn")
EMBED = "embed"


class PruneError(VitslimError, ValueError):
    """Bad input to the pruner: an unsupported model, target, table or calibration data."""


def check_family(arch: Mapping, depth: bool = False) -> str:
    fam = arch.get("family")
    if depth and fam not in SUPPORTED_FAMILIES:
        raise PruneError(f"--depth: got a {fam!r} model, expected one of {', '.join(SUPPORTED_FAMILIES)} (the families "
                         "whose blocks can drop a residual branch: heads 0 / ffn_hidden 0)")
    if fam not in SUPPORTED_FAMILIES:
        raise PruneError(f"family: got {fam!r}, expected one of {', '.join(SUPPORTED_FAMILIES)} "
                         "(the families whose attention the pruner can reshape)")
    return fam


@dataclass
class BlockInfo:
    """One attention block as the pruner sees it (widths from the arch, token counts at its input size)."""
    stage: int
    index: int
    path: str               # module path of the block in the model, e.g. "blocks.3", "layers.1.blocks.0"
    dim: int                # residual width
    heads: int
    qk_dim: int
    v_dim: int
    ffn_hidden: int
    scale: float            # the attention scale in use (kept through pruning)
    tokens: int             # tokens per image the MLP sees
    attn_tokens: int        # tokens per image the attention sees (Swin: padded to whole windows)
    window_tokens: int      # keys each query attends to (DeiT: all tokens; Swin: window^2)
    bias_rows: int = 0      # Swin: rows of the relative position bias table ((2w-1)^2)

    @property
    def key(self) -> Tuple[int, int]:
        return (self.stage, self.index)

    @property
    def name(self) -> str:
        return f"stages[{self.stage}].blocks[{self.index}]"


def block_infos(arch: Mapping) -> List[BlockInfo]:
    """Every block of a validated DeiT or Swin arch, in forward order."""
    fam = check_family(arch)
    out = []
    if fam == "deit":
        p = arch["stem"]["patch_size"]
        g = arch["input_size"] // p
        n = g * g + (2 if arch.get("distillation") else 1)
        st = arch["stages"][0]
        for j, b in enumerate(st["blocks"]):
            out.append(_info(0, j, f"blocks.{j}", st["width"], b, n, n, n, 0))
        return out
    from supernet.families.swin import stage_resolutions
    for i, (st, r) in enumerate(zip(arch["stages"], stage_resolutions(arch))):
        w = st["window_size"]
        padded = math.ceil(r / w) * w
        for j, b in enumerate(st["blocks"]):
            out.append(_info(i, j, f"layers.{i}.blocks.{j}", st["width"], b, r * r, padded * padded, w * w,
                             (2 * w - 1) ** 2))
    return out


def _info(i, j, path, dim, b, tokens, attn_tokens, window_tokens, bias_rows) -> BlockInfo:
    h, dq = b["heads"], b["qk_dim"]
    scale = float(b["scale"]) if b.get("scale") is not None else (dq ** -0.5 if dq else 1.0)
    return BlockInfo(i, j, path, dim, h, dq, b["v_dim"], b["ffn_hidden"], scale, tokens, attn_tokens,
                     window_tokens, bias_rows)


def block_module(model: nn.Module, info: BlockInfo) -> nn.Module:
    return model.get_submodule(info.path)


# ---------------------------------------------------------------- the plan
@dataclass
class BlockKeep:
    """What one block keeps, in original indices (sorted ascending, so kept units keep their order).

    heads: kept head indices; qk[h] / v[h]: kept channel indices inside kept head h (each list has
    the block's new qk_dim / v_dim entries); ffn: kept hidden channels.
    """
    heads: List[int]
    qk: Dict[int, List[int]]
    v: Dict[int, List[int]]
    ffn: List[int]

    @classmethod
    def full(cls, info: BlockInfo) -> "BlockKeep":
        hs = list(range(info.heads))
        return cls(hs, {h: list(range(info.qk_dim)) for h in hs}, {h: list(range(info.v_dim)) for h in hs},
                   list(range(info.ffn_hidden)))

    @property
    def widths(self) -> dict:
        h = len(self.heads)
        qk = len(self.qk[self.heads[0]]) if h else 0
        v = len(self.v[self.heads[0]]) if h else 0
        return {"heads": h, "qk_dim": qk, "v_dim": v, "ffn_hidden": len(self.ffn)}

    def check(self, info: BlockInfo) -> None:
        w = self.widths
        for h in self.heads:
            if len(self.qk[h]) != w["qk_dim"] or len(self.v[h]) != w["v_dim"]:
                raise ValueError(f"{info.name}: every kept head must keep the same number of Q/K and of V channels")
        if w["heads"] and (w["qk_dim"] < 1 or w["v_dim"] < 1):
            raise ValueError(f"{info.name}: a kept head needs at least one Q/K pair and one V channel")


@dataclass
class Plan:
    """Kept units of every block (keyed by (stage, block)); blocks not listed keep everything.
    `embed`: kept residual channels of a stage (stages not listed keep their width)."""
    keep: Dict[Tuple[int, int], BlockKeep] = field(default_factory=dict)
    embed: Dict[int, List[int]] = field(default_factory=dict)

    @classmethod
    def full(cls, infos: Sequence[BlockInfo]) -> "Plan":
        return cls({i.key: BlockKeep.full(i) for i in infos})

    def get(self, info: BlockInfo) -> BlockKeep:
        return self.keep.get(info.key) or BlockKeep.full(info)

    def embed_keep(self, stage: int, width: int) -> List[int]:
        return self.embed.get(stage, list(range(width)))


def pruned_arch(arch: Mapping, plan: Plan) -> dict:
    """The arch config after `plan`: new per-block widths, the trained attention scale written in."""
    import copy
    a = copy.deepcopy(dict(arch))
    for i, st in enumerate(a["stages"]):
        st["width"] = len(plan.embed_keep(i, st["width"]))
    for info in block_infos(arch):
        k = plan.get(info)
        w = k.widths
        b = a["stages"][info.stage]["blocks"][info.index]
        b.update(w)
        b.pop("scale", None)
        if w["heads"] and (w["qk_dim"] != info.qk_dim or "scale" in arch["stages"][info.stage]["blocks"][info.index]):
            b["scale"] = info.scale
    return a
