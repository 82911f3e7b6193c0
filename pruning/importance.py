"""Importance criteria: one `Importance` interface, two criteria (Taylor, magnitude). Scoring
reads the network (forward hooks that only record, gradients taken with torch.autograd.grad with
respect to activations) and never edits modules, parameters or their .grad.

What `TaylorImportance` computes (Molchanov et al., CVPR 2019, "Taylor-FO" in gate form): put a
gate g = 1 on a unit's activations; the first-order change of the loss when the gate goes to 0 is
g * dL/dg = sum over the unit's activations a of a * dL/da. Per calibration batch (L = mean
cross-entropy over the batch), with a summed over the batch, tokens (and windows):

    qk pair (h, c):  G = sum q_hc * dL/dq_hc   (the gate sits on the channel's term q_c k_c of the
                     logits; gating q or k alone gives the same number, we average the two)
    v channel (h, c): G = sum v_hc * dL/dv_hc  (= the same sum over the head output's channel c)
    head h:          G = sum over the head's V channels of G_v  (a gate on the head's output)
    ffn channel c:   G = sum h_c * dL/dh_c     (h = the GELU output entering fc2)

and the unit's importance is G^2, averaged over batches. Across the steps of iterative pruning the
scores of surviving units are smoothed, I <- momentum * I_prev + (1 - momentum) * I_now.

Branches (depth pruning, `Scores.branch`): the same gate form on a whole residual branch, a gate on
what the branch adds to the residual stream (its LayerNorm, its units and its output bias with it):

    attention branch: G = sum over the branch output (attn.proj's output) of a * dL/da
    FFN branch:       G = sum over the branch output (mlp.fc2's output) of a * dL/da

importance G^2, averaged over batches: the first-order change of the loss when the branch's residual
contribution is zeroed. (Swin: the attention output holds the zero-padded window tokens too; the
crop after the windows gives them zero gradient, so they add nothing.)

With `embed=True`, a stage's residual channel c is scored with a gate on every write into it (the
stage's input and each block's proj and fc2 outputs): G = sum over those writes of a_c * dL/da_c.

`MagnitudeImportance` (baseline, data-free): the squared L2 norm of the weights a unit owns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .units import BlockInfo, Plan, PruneError, block_infos, block_module

BlockScores = Dict[str, np.ndarray]  # head (H,), qk (H, qk_dim), v (H, v_dim), ffn (F,)
BRANCHES = ("attn", "mlp")  # branch scores: np.array([attention branch, FFN branch]); 0 where absent


@dataclass
class Scores:
    """Importance of every atomic unit of every block, keyed by (stage, block)."""
    blocks: Dict[Tuple[int, int], BlockScores]
    criterion: str = ""
    batches: int = 0
    embed: Dict[int, np.ndarray] = field(default_factory=dict)  # stage -> (width,), when asked for
    branch: Dict[Tuple[int, int], np.ndarray] = field(default_factory=dict)  # (stage, block) -> [attn, mlp]

    def __getitem__(self, key):
        return self.blocks[key]

    def all_zero(self) -> bool:
        """Whether every unit, residual channel and branch scores exactly 0 (nothing to select by)."""
        arrays = [v for b in self.blocks.values() for v in b.values()] + list(self.embed.values())
        for key, br in self.branch.items():  # a branch's score where the branch is there (0 stands for absent)
            b = self.blocks.get(key, {})
            arrays.append(np.asarray(br)[[np.size(b.get("head", ())) > 0, np.size(b.get("ffn", ())) > 0]])
        arrays = [v for v in arrays if np.size(v)]  # a network with no units has nothing to select, not all zeros
        return bool(arrays) and all(not np.any(np.asarray(v)) for v in arrays)

    def restrict(self, infos: Sequence[BlockInfo], plan: Plan) -> "Scores":
        """The scores of the units `plan` keeps, in the pruned network's order."""
        out = {}
        for info in infos:
            s, k = self.blocks[info.key], plan.get(info)
            hs = k.heads
            out[info.key] = {
                "head": s["head"][hs] if hs else np.zeros(0),
                "qk": np.stack([s["qk"][h][k.qk[h]] for h in hs]) if hs else np.zeros((0, 0)),
                "v": np.stack([s["v"][h][k.v[h]] for h in hs]) if hs else np.zeros((0, 0)),
                "ffn": s["ffn"][k.ffn] if k.ffn else np.zeros(0),
            }
        embed = {i: e[plan.embed_keep(i, len(e))] for i, e in self.embed.items()}
        branch = {}
        for info in infos:  # a branch the plan removes has no score in the pruned network
            if info.key in self.branch:
                w = plan.get(info).widths
                branch[info.key] = self.branch[info.key] * np.array([w["heads"] > 0, w["ffn_hidden"] > 0])
        return Scores(out, self.criterion, self.batches, embed, branch)

    def blend(self, prev: Optional["Scores"], momentum: float) -> "Scores":
        """momentum * prev + (1 - momentum) * self, unit by unit (prev already restricted)."""
        if prev is None or momentum <= 0:
            return self
        out = {}
        for key, s in self.blocks.items():
            p = prev.blocks.get(key)
            if p is None or any(p[k].shape != s[k].shape for k in s):
                out[key] = s
                continue
            out[key] = {k: momentum * p[k] + (1 - momentum) * s[k] for k in s}
        embed = {i: (momentum * prev.embed[i] + (1 - momentum) * e
                     if i in prev.embed and prev.embed[i].shape == e.shape else e) for i, e in self.embed.items()}
        branch = {k: (momentum * prev.branch[k] + (1 - momentum) * b if k in prev.branch else b)
                  for k, b in self.branch.items()}
        return Scores(out, self.criterion, self.batches, embed, branch)

    def to_state(self) -> dict:
        """Tensors only (loads with torch.load(weights_only=True)): a resumable prune keeps its momentum."""
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        return {"criterion": self.criterion, "batches": int(self.batches),
                "blocks": {f"{i}.{j}": {k: t(v) for k, v in b.items()} for (i, j), b in self.blocks.items()},
                "embed": {str(i): t(e) for i, e in self.embed.items()},
                "branch": {f"{i}.{j}": t(b) for (i, j), b in self.branch.items()}}

    @classmethod
    def from_state(cls, d: Mapping) -> "Scores":
        key = lambda s: tuple(int(x) for x in s.split("."))  # noqa: E731
        a = lambda v: v.numpy()  # noqa: E731
        return cls({key(k): {n: a(v) for n, v in b.items()} for k, b in d["blocks"].items()}, d["criterion"],
                   int(d["batches"]), {int(i): a(e) for i, e in d["embed"].items()},
                   {key(k): a(b) for k, b in d["branch"].items()})


def _empty_block(info: BlockInfo) -> BlockScores:
    return {"head": np.zeros(info.heads), "qk": np.zeros((info.heads, info.qk_dim)),
            "v": np.zeros((info.heads, info.v_dim)), "ffn": np.zeros(info.ffn_hidden)}


class Importance:
    """Scores the prunable units of a network. Subclasses never edit the network."""
    name = ""
    needs_data = True

    def score(self, model: nn.Module, arch: Mapping, batches: Iterable, progress=None, embed: bool = False) -> Scores:
        """Scores of every head, Q/K pair, V channel and FFN channel; with `embed`, also of every
        stage's residual channels."""
        raise NotImplementedError


def default_loss(logits: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy with the data's labels; without labels (or labels outside the model's
    classes) with the model's own top-1 as the label."""
    if isinstance(logits, (tuple, list)):
        logits = (logits[0] + logits[1]) / 2
    if not labels_fit(labels, logits.shape[-1]):
        labels = logits.detach().argmax(-1)
    return F.cross_entropy(logits, labels)


def labels_fit(labels: Optional[torch.Tensor], num_classes: int) -> bool:
    """Whether `labels` are class indices of a model with `num_classes` outputs (None or empty: no)."""
    return labels is not None and labels.numel() > 0 and 0 <= int(labels.min()) and int(labels.max()) < num_classes


class TaylorImportance(Importance):
    """First-order Taylor importance in gate form (see the module docstring for the exact sums)."""
    name = "taylor"

    def __init__(self, loss_fn: Callable = default_loss):
        self.loss_fn = loss_fn

    def score(self, model, arch, batches, progress=None, embed: bool = False) -> Scores:
        infos = block_infos(arch)
        acc = {i.key: _empty_block(i) for i in infos}
        emb = {i: np.zeros(st["width"]) for i, st in enumerate(arch["stages"])} if embed else {}
        captured: Dict[tuple, torch.Tensor] = {}
        handles = []

        def keep_output(key):
            def hook(mod, args, out):
                captured[key] = out
            return hook

        def keep_input(key):
            def hook(mod, args):
                captured[key] = args[0]
            return hook

        branch = {i.key: np.zeros(2) for i in infos}
        for info in infos:
            blk = block_module(model, info)
            if info.heads:
                handles.append(blk.attn.qkv.register_forward_hook(keep_output((info.key, "qkv"))))
                handles.append(blk.attn.proj.register_forward_hook(keep_output((info.key, "branch_attn"))))
            if info.ffn_hidden:
                handles.append(blk.mlp.fc2.register_forward_pre_hook(keep_input((info.key, "ffn"))))
                handles.append(blk.mlp.fc2.register_forward_hook(keep_output((info.key, "branch_mlp"))))
            if embed:
                # a gate on residual channel c of the stage scales every write into it: the stage's
                # input (what its first block reads) and each block's proj and fc2 outputs
                if info.index == 0:
                    handles.append(blk.register_forward_pre_hook(keep_input((info.key, "embed_in"))))
                if info.heads:
                    handles.append(blk.attn.proj.register_forward_hook(keep_output((info.key, "embed_attn"))))
                if info.ffn_hidden:
                    handles.append(blk.mlp.fc2.register_forward_hook(keep_output((info.key, "embed_mlp"))))
        was_training = model.training
        model.eval()  # no dropout / stochastic depth: the gradient of the network as deployed
        n = 0
        try:
            for x, y in batches:
                captured.clear()
                x = x.detach().requires_grad_(True)  # activations need grad even if weights are frozen
                with torch.enable_grad():
                    loss = self.loss_fn(model(x), y)
                    if not bool(torch.isfinite(loss.detach()).all()):
                        raise PruneError(f"calibration batch {n + 1}: the loss is {float(loss.detach().reshape(-1)[0])} "
                                         "on the model being scored (its activations overflow float32, or its weights "
                                         "or images hold NaN or Inf): Taylor importance needs a finite loss")
                    keys = list(captured)  # none: no block has a unit or branch left to score
                    grads = torch.autograd.grad(loss, [captured[k] for k in keys], allow_unused=True) if keys else ()
                infos_by_key = {i.key: i for i in infos}
                G_embed = {i: np.zeros_like(e) for i, e in emb.items()}
                for (key, what), g in zip(keys, grads):
                    a = captured[(key, what)]
                    if g is None:
                        continue
                    if what.startswith("branch"):  # one gate on the whole branch output
                        Gb = float((a.detach().double() * g.double()).sum())
                        branch[key][0 if what == "branch_attn" else 1] += Gb ** 2
                        continue
                    G = (a.detach() * g).reshape(-1, a.shape[-1]).sum(0).double().cpu().numpy()
                    s, info = acc[key], infos_by_key[key]
                    if what.startswith("embed"):
                        G_embed[info.stage] += G
                        continue
                    if what == "ffn":
                        s["ffn"] += G ** 2
                        continue
                    H, dq, dv = info.heads, info.qk_dim, info.v_dim
                    gq = G[:H * dq].reshape(H, dq)
                    gk = G[H * dq:2 * H * dq].reshape(H, dq)
                    gv = G[2 * H * dq:].reshape(H, dv)
                    s["qk"] += ((gq + gk) / 2) ** 2
                    s["v"] += gv ** 2
                    s["head"] += gv.sum(1) ** 2
                for i, G in G_embed.items():
                    emb[i] += G ** 2
                n += 1
                captured.clear()
                if progress is not None:
                    progress.update(1)
        finally:
            for h in handles:
                h.remove()
            captured.clear()
            model.train(was_training)
        if n == 0:
            raise ValueError("TaylorImportance.score: no calibration batches")
        _check_finite(acc, emb, branch, self.name)
        for s in acc.values():
            for k in s:
                s[k] /= n
        for i in emb:
            emb[i] /= n
        for b in branch.values():
            b /= n
        return Scores(acc, self.name, n, emb, branch)


def _check_finite(blocks, embed, branch, criterion: str) -> None:
    """A one-line error when a score is NaN or Inf: a selection would rank such units arbitrarily (NaN compares
    false both ways) and the report would hold NaN, which is not JSON."""
    parts = [(f"stages[{i}].blocks[{j}] {k}", v) for (i, j), b in blocks.items() for k, v in b.items()]
    parts += [(f"stages[{i}] residual channels", e) for i, e in embed.items()]
    parts += [(f"stages[{i}].blocks[{j}] branches", b) for (i, j), b in branch.items()]
    for where, v in parts:
        if not np.all(np.isfinite(v)):
            raise PruneError(f"{criterion} importance of {where} is not finite (NaN or Inf: gradients or weights "
                             "overflow float32, or the checkpoint holds NaN or Inf)")


class MagnitudeImportance(Importance):
    """Squared L2 norm of the weights (and biases) each unit owns: a Q/K pair its q and k rows, a V
    channel its v row and proj column, a head all of those of its channels, an FFN channel its fc1
    row and fc2 column; a branch (depth pruning) the sum over its units. Data-free: the batches are
    not used."""
    name = "magnitude"
    needs_data = False

    @torch.no_grad()
    def score(self, model, arch, batches=(), progress=None, embed: bool = False) -> Scores:
        out, branch = {}, {}
        emb = {i: np.zeros(st["width"]) for i, st in enumerate(arch["stages"])} if embed else {}
        for info in block_infos(arch):
            blk = block_module(model, info)
            s = _empty_block(info)
            if info.heads:
                H, dq, dv = info.heads, info.qk_dim, info.v_dim
                w = blk.attn.qkv.weight.double().pow(2).sum(1)
                if blk.attn.qkv.bias is not None:
                    w = w + blk.attn.qkv.bias.double().pow(2)
                q, k, v = w[:H * dq].reshape(H, dq), w[H * dq:2 * H * dq].reshape(H, dq), w[2 * H * dq:].reshape(H, dv)
                pcol = blk.attn.proj.weight.double().pow(2).sum(0).reshape(H, dv)
                s["qk"] = (q + k).cpu().numpy()
                s["v"] = (v + pcol).cpu().numpy()
                s["head"] = s["qk"].sum(1) + s["v"].sum(1)
            if info.ffn_hidden:
                f = blk.mlp.fc1.weight.double().pow(2).sum(1) + blk.mlp.fc1.bias.double().pow(2) \
                    + blk.mlp.fc2.weight.double().pow(2).sum(0)
                s["ffn"] = f.cpu().numpy()
            if embed:  # a residual channel owns its column of every read and its row of every write
                for lin, dim in ((getattr(blk.attn, "qkv", None), 0), (getattr(blk.attn, "proj", None), 1),
                                 (getattr(blk.mlp, "fc1", None), 0), (getattr(blk.mlp, "fc2", None), 1)):
                    if lin is not None:
                        emb[info.stage] += lin.weight.double().pow(2).sum(dim).cpu().numpy()
            out[info.key] = s
            branch[info.key] = np.array([float(s["head"].sum()), float(s["ffn"].sum())])
            if progress is not None:
                progress.update(0)
        _check_finite(out, emb, branch, self.name)
        return Scores(out, self.name, 0, emb, branch)


CRITERIA = {"taylor": TaylorImportance, "magnitude": MagnitudeImportance}


def get_importance(name: str) -> Importance:
    from .units import PruneError
    if name not in CRITERIA:
        raise PruneError(f"--criterion: got {name!r}, expected one of {', '.join(CRITERIA)}")
    return CRITERIA[name]()
