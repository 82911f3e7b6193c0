"""Surgery: a real, smaller network from a plan (no masks), built in the same flexible family and
filled with the kept rows and columns of the original weights. No gradients are computed here.

Which slices move where (fused qkv laid out [q of all heads | k of all heads | v of all heads],
each head-major, as in supernet/families/deit.py):

    qkv rows  q: h*qk + c          k: H*qk + h*qk + c        v: 2*H*qk + h*v + c
    proj cols     h*v + c          (proj rows and bias: untouched, the residual width stays)
    relative_position_bias_table[:, h]   (Swin)
    fc1 rows c (weight, bias), fc2 cols c

With embedding pruning (optional), a stage's kept residual channels are also selected everywhere
the width is read or written (`_embed_rules`). Every other tensor is copied unchanged. Because kept indices keep their order and the attention
scale is written into the arch, an unpruned unit computes exactly what it computed before.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
import torch.nn as nn

from supernet.arch import validate
from supernet.layers import no_weight_init
from supernet.registry import get_family

from .units import BlockInfo, BlockKeep, Plan, block_infos, pruned_arch


def _rows(info: BlockInfo, k: BlockKeep) -> Tuple[torch.Tensor, torch.Tensor]:
    """(qkv rows kept, proj input columns kept), as index tensors in the original layout."""
    H, dq, dv = info.heads, info.qk_dim, info.v_dim
    q = [h * dq + c for h in k.heads for c in k.qk[h]]
    kk = [H * dq + h * dq + c for h in k.heads for c in k.qk[h]]
    v = [2 * H * dq + h * dv + c for h in k.heads for c in k.v[h]]
    cols = [h * dv + c for h in k.heads for c in k.v[h]]
    return torch.tensor(q + kk + v, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


@torch.no_grad()
def pruned_state_dict(model: nn.Module, arch: Mapping, plan: Plan) -> Dict[str, torch.Tensor]:
    """The state dict of the pruned network (keys of the network `pruned_arch(arch, plan)` builds)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = dict(sd)
    for info in block_infos(arch):
        k = plan.get(info)
        k.check(info)
        p = info.path + "."
        w = k.widths
        if info.heads:
            if w["heads"] == 0:
                for name in list(out):
                    if name.startswith((p + "attn.", p + "norm1.")):
                        del out[name]
            else:
                rows, cols = _rows(info, k)
                out[p + "attn.qkv.weight"] = sd[p + "attn.qkv.weight"].index_select(0, rows)
                if p + "attn.qkv.bias" in sd:
                    out[p + "attn.qkv.bias"] = sd[p + "attn.qkv.bias"].index_select(0, rows)
                out[p + "attn.proj.weight"] = sd[p + "attn.proj.weight"].index_select(1, cols)
                t = p + "attn.relative_position_bias_table"
                if t in sd:
                    out[t] = sd[t].index_select(1, torch.tensor(k.heads, dtype=torch.long))
        if info.ffn_hidden:
            if w["ffn_hidden"] == 0:
                for name in list(out):
                    if name.startswith((p + "mlp.", p + "norm2.")):
                        del out[name]
            else:
                idx = torch.tensor(k.ffn, dtype=torch.long)
                out[p + "mlp.fc1.weight"] = sd[p + "mlp.fc1.weight"].index_select(0, idx)
                out[p + "mlp.fc1.bias"] = sd[p + "mlp.fc1.bias"].index_select(0, idx)
                out[p + "mlp.fc2.weight"] = sd[p + "mlp.fc2.weight"].index_select(1, idx)
    if plan.embed:
        out = _slice_embed(out, arch, plan)
    return {k: v.clone().contiguous() for k, v in out.items()}


def _block_embed_rules(prefix: str, idx: torch.Tensor):
    """(key, dim, index) of every tensor of one block that reads or writes the residual width."""
    for name, dim in (("norm1.weight", 0), ("norm1.bias", 0), ("norm2.weight", 0), ("norm2.bias", 0),
                      ("attn.qkv.weight", 1), ("attn.proj.weight", 0), ("attn.proj.bias", 0),
                      ("mlp.fc1.weight", 1), ("mlp.fc2.weight", 0), ("mlp.fc2.bias", 0)):
        yield prefix + name, dim, idx


def _embed_rules(arch: Mapping, plan: Plan):
    widths = [st["width"] for st in arch["stages"]]
    E = [torch.tensor(plan.embed_keep(i, w), dtype=torch.long) for i, w in enumerate(widths)]
    last = E[-1]
    if arch["family"] == "deit":
        e = E[0]
        yield from (("patch_embed.proj.weight", 0, e), ("patch_embed.proj.bias", 0, e), ("cls_token", 2, e),
                    ("dist_token", 2, e), ("pos_embed", 2, e))
        for j in range(len(arch["stages"][0]["blocks"])):
            yield from _block_embed_rules(f"blocks.{j}.", e)
        yield from (("norm.weight", 0, e), ("norm.bias", 0, e), ("head.weight", 1, e), ("head_dist.weight", 1, e))
        return
    e0 = E[0]
    yield from (("patch_embed.proj.weight", 0, e0), ("patch_embed.proj.bias", 0, e0),
                ("patch_embed.norm.weight", 0, e0), ("patch_embed.norm.bias", 0, e0))
    for i, st in enumerate(arch["stages"]):
        if i > 0 and st["downsample"] is not None:
            # patch merging concatenates 4 neighbours of width C: channel c of neighbour q sits at q*C + c
            prev = widths[i - 1]
            four = torch.cat([q * prev + E[i - 1] for q in range(4)])
            p = f"layers.{i}.downsample."
            yield from ((p + "norm.weight", 0, four), (p + "norm.bias", 0, four), (p + "reduction.weight", 1, four),
                        (p + "reduction.weight", 0, E[i]))
        for j in range(len(st["blocks"])):
            yield from _block_embed_rules(f"layers.{i}.blocks.{j}.", E[i])
    yield from (("norm.weight", 0, last), ("norm.bias", 0, last), ("head.fc.weight", 1, last))


def _slice_embed(sd: Dict[str, torch.Tensor], arch: Mapping, plan: Plan) -> Dict[str, torch.Tensor]:
    out = dict(sd)
    for key, dim, idx in _embed_rules(arch, plan):
        if key in out:
            out[key] = out[key].index_select(dim, idx)
    return out


@torch.no_grad()
def apply_plan(model: nn.Module, arch: Mapping, plan: Plan) -> Tuple[nn.Module, dict]:
    """(pruned model, its arch): a new module in the mode `model` was in; `model` is not changed."""
    new_arch = validate(pruned_arch(arch, plan))
    fam = get_family(new_arch["family"])
    with no_weight_init():  # every tensor comes from the pruned state dict below (strict)
        new = fam.build(new_arch)
    new.arch = new_arch
    first = next((t for t in model.parameters() if t.is_floating_point()), None)
    if first is not None:  # the model's device and dtype (float64, half), before the copy: values kept exactly
        new.to(device=first.device, dtype=first.dtype)
    sd = pruned_state_dict(model, arch, plan)
    new.load_state_dict(sd, strict=True)
    new.train(model.training)
    return new, new_arch
