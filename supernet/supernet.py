"""EfficientFormer's MetaPath supernet (Li et al., NeurIPS 2022, Sec. 4.2), never released by the
authors: every block position of a SearchSpace chooses among MetaPaths (Meta4D, Meta3D, Identity)
with architecture weights alpha, trained by Gumbel-softmax; each stage runs at any width in steps
of 16 on a prefix of shared weights; any choice extracts to a plain EfficientFormer with its output.

Layout of the weights: the plain EfficientFormer's own modules (supernet/families/efficientformer.py)
at each stage's maximum width, so that extraction is "take the prefix of every tensor":

    stem.*                       the family's stem at [max_width0 / 2, max_width0]
    stages.{i}.downsample.*      Conv3x3 s2 + BN into stage i (i > 0)
    stages.{i}.blocks.{j}.meta4d.*, .meta3d.*   the candidates of position j (identity is free)
    norm.*, head.*, dist_head.*
    alphas.{i}                   (max_depth, len(candidates)) architecture logits of stage i

Forward modes (`forward(x, mode=...)`):

- "soft": the paper's mixture, every candidate runs and the position outputs
  sum_n softmax((alpha + g) / tau)_n * MP_n(x), g ~ Gumbel. The stage stays in the 4D map layout
  and a Meta3D candidate is applied through flatten -> tokens -> Meta3D -> map (the reshapes are
  exact permutations, so a fixed arch computes what the plain model computes). The 3D-after-4D
  rule cannot hold inside a mixture: every position mixes all of its candidates.
- "hard": straight-through Gumbel (GDAS / FBNetV2 style): one path per position is sampled
  (Gumbel-max, an exact sample of softmax(alpha)), only it runs, and the position outputs
  x + w_k * (MP_k(x) - x) with w = (one_hot - soft).detach() + soft (value 1), which gives the
  alphas their gradient. The weight goes on the residual MP_k(x) - x rather than on MP_k(x) (the
  usual form): the same value, but scaling the whole residual stream is undone by the BN/LN
  downstream (the alphas got ~1e-5 gradients that way); on the residual it is the soft mixture's
  gradient with the identity candidate as baseline. A custom autograd function returns MP_k(x)
  itself in the forward (bit-exact with the plain subnet, no extra activation kept) and applies
  the formula's gradient in the backward. Meta4D is masked out of every position after a sampled
  Meta3D, so every sample is a valid Choice.
- "fixed": a given Choice (space.check_choice), no alphas: the supernet as the extracted model.

Elastic width: stage i at width w uses every tensor's prefix along its channel dims (conv/linear
in and out, BN, LN, LayerScale), ffn hidden ffn_ratio * w, the stem at [w0 / 2, w0], the head's
first w inputs; attention heads, qk_dim, v_dim and the bias table stay fixed (space.attention).
BatchNorm running statistics are shared and sliced too (prefix channels keep one set of
statistics for every width); evaluating a reduced width is exactly what the extracted model
computes, and `recalibrate_bn` re-estimates the statistics of one width when accuracy matters.
`sort_channels` permutes every stage's channels so that the prefix keeps the important ones.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import is_int
from .errors import ArchError, bad
from .families.efficientformer import Meta3D, Meta4D, _trunc_normal_linear, conv_bn, stage_resolutions, stem
from .layers import no_weight_init
from .registry import get_family
from .space import SearchSpace, load_space

MODES = ("soft", "hard", "fixed")


# ---------------------------------------------------------------- elastic functional layers
def _pre(t: torch.Tensor, *sizes: int) -> torch.Tensor:
    """The prefix t[:sizes[0], :sizes[1], ...]; t itself when nothing is cut (no slicing cost)."""
    if all(s == n for s, n in zip(sizes, t.shape)):
        return t
    return t[tuple(slice(0, s) for s in sizes)]


def _conv(conv: nn.Conv2d, x: torch.Tensor, cout: int) -> torch.Tensor:
    cin = x.shape[1]
    b = None if conv.bias is None else _pre(conv.bias, cout)
    return F.conv2d(x, _pre(conv.weight, cout, cin), b, conv.stride, conv.padding)


def _linear(lin: nn.Linear, x: torch.Tensor, cout: int) -> torch.Tensor:
    b = None if lin.bias is None else _pre(lin.bias, cout)
    return F.linear(x, _pre(lin.weight, cout, x.shape[-1]), b)


def _bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    if bn.training and bn.momentum is None:  # recalibrate_bn's pass: the channels it updates (it keeps the others)
        bn.__dict__["_vitslim_width"] = max(bn.__dict__.get("_vitslim_width", 0), c)
    if c == bn.num_features:
        return bn(x)
    use_batch = bn.training or bn.running_mean is None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative average, as nn.BatchNorm2d does
            factor = 1.0 / float(bn.num_batches_tracked)
    rm = None if bn.running_mean is None else bn.running_mean[:c]  # views: updates land in the shared buffer
    rv = None if bn.running_var is None else bn.running_var[:c]
    return F.batch_norm(x, rm, rv, _pre(bn.weight, c), _pre(bn.bias, c), use_batch, factor, bn.eps)


def _ln(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    c = x.shape[-1]
    if c == ln.normalized_shape[0]:
        return ln(x)
    return F.layer_norm(x, (c,), _pre(ln.weight, c), _pre(ln.bias, c), ln.eps)


def meta4d_forward(m: Meta4D, x: torch.Tensor, hidden: int) -> torch.Tensor:
    """Meta4D on the first x.shape[1] channels with `hidden` FFN channels (B, C, H, W)."""
    c = x.shape[1]
    if c == m.layer_scale_1.shape[0] and hidden == m.mlp.fc1.out_channels:
        return m(x)
    x = x + _pre(m.layer_scale_1, c)[:, None, None] * (m.token_mixer(x) - x)
    y = F.gelu(_bn(m.mlp.norm1, _conv(m.mlp.fc1, x, hidden)))
    y = _bn(m.mlp.norm2, _conv(m.mlp.fc2, y, c))
    return x + _pre(m.layer_scale_2, c)[:, None, None] * y


def meta3d_forward(m: Meta3D, x: torch.Tensor, hidden: int) -> torch.Tensor:
    """Meta3D on the first x.shape[-1] channels of tokens (B, N, C); attention sizes fixed."""
    c = x.shape[-1]
    if c == m.layer_scale_1.shape[0] and hidden == m.mlp.fc1.out_features:
        return m(x)
    a = m.token_mixer
    B, N, _ = x.shape
    qkv = _linear(a.qkv, _ln(m.norm1, x), a.qkv.out_features).reshape(B, N, a.heads, -1).permute(0, 2, 1, 3)
    q, k, v = qkv.split([a.qk_dim, a.qk_dim, a.v_dim], dim=3)
    attn = (q @ k.transpose(-2, -1)) * a.scale + a.attention_biases[:, a.attention_bias_idxs]
    o = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, a.heads * a.v_dim)
    x = x + _pre(m.layer_scale_1, c) * _linear(a.proj, o, c)
    y = _linear(m.mlp.fc2, F.gelu(_linear(m.mlp.fc1, _ln(m.norm2, x), hidden)), c)
    return x + _pre(m.layer_scale_2, c) * y


class _StraightThrough(torch.autograd.Function):
    """Hard mode's output x + w * (y - x) for w == 1: the value is y itself (bit-exact with the
    plain subnet, no extra activation kept), the gradient is that of the formula: dy = g,
    dx = (1 - w) g = 0, dw = <g, y - x>."""

    @staticmethod
    def forward(ctx, y, x, w):
        ctx.save_for_backward(y, x)
        ctx.w_dtype = w.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        y, x = ctx.saved_tensors
        return g, None, (g.float() * (y.float() - x.float())).sum().to(ctx.w_dtype)


def _to_tokens(x):  # (B, C, H, W) -> (B, H*W, C), row-major like the attention bias grid
    return x.flatten(2).transpose(1, 2)


def _to_map(x, hw):  # (B, N, C) -> (B, C, H, W)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw)


# ---------------------------------------------------------------- modules
class MetaPath(nn.Module):
    """One block position: the max-width weights of each non-identity candidate."""

    def __init__(self, candidates: Sequence[str], width: int, hidden: int, attention: Mapping, resolution: int):
        super().__init__()
        self.candidates = tuple(candidates)
        if "meta4d" in self.candidates:
            self.meta4d = Meta4D(width, hidden)
        if "meta3d" in self.candidates:
            self.meta3d = Meta3D(width, attention["heads"], attention["qk_dim"], attention["v_dim"], hidden, resolution)


class SuperStage(nn.Module):
    def __init__(self, downsample: Optional[nn.Module], paths: Iterable[MetaPath]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(paths)


class MetaPathSupernet(nn.Module):
    """The supernet of a SearchSpace (a path, a dict or a SearchSpace). See the module docstring."""

    def __init__(self, space):
        super().__init__()
        self.space: SearchSpace = load_space(space)
        sp = self.space
        if sp.family != "efficientformer":
            raise bad("family", sp.family, "'efficientformer' (the MetaPath supernet's family)")
        mw = [s.max_width for s in sp.stages]
        self.max_widths = mw
        self.resolutions = stage_resolutions(sp.to_arch(sp.largest_choice()))
        self.stem = stem(sp.in_chans, [mw[0] // 2, mw[0]])
        stages = []
        for i, s in enumerate(sp.stages):
            ds = conv_bn(mw[i - 1], mw[i]) if i > 0 else None
            paths = [MetaPath(s.candidates, mw[i], sp.ffn_ratio * mw[i], sp.attention, self.resolutions[i])
                     for _ in range(s.max_depth)]
            stages.append(SuperStage(ds, paths))
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(mw[-1])
        self.head = nn.Linear(mw[-1], sp.num_classes)
        self.dist_head = nn.Linear(mw[-1], sp.num_classes) if sp.distillation else None
        for m in (self.head, self.dist_head):
            if m is not None:
                _trunc_normal_linear(m)
        self.alphas = nn.ParameterList([nn.Parameter(torch.zeros(s.max_depth, len(s.candidates))) for s in sp.stages])
        self.distilled_training = False
        # defaults of forward(); the trainer sets them once per step
        self.mode, self.tau, self.widths, self.choice, self.generator = "soft", 1.0, None, None, None
        self.last_choice: Optional[dict] = None  # what the last hard forward ran

    # ------------------------------------------------------------ parameters
    def arch_parameters(self) -> List[nn.Parameter]:
        return list(self.alphas)

    def weight_parameters(self) -> List[nn.Parameter]:
        ids = {id(p) for p in self.alphas}
        return [p for p in self.parameters() if id(p) not in ids]

    def named_weight_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("alphas.")]

    # ------------------------------------------------------------ forward
    def gumbel(self, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Gumbel(0, 1) noise shaped like the alphas, drawn on the CPU (the same on any device)."""
        out = []
        for a in self.alphas:
            u = torch.rand(a.shape, generator=generator).clamp_(1e-10, 1 - 1e-7)
            out.append(-torch.log(-torch.log(u)))
        return out

    def _check_widths(self, widths) -> List[int]:
        if widths is None:
            return list(self.max_widths)
        widths = list(widths)
        if len(widths) != len(self.max_widths):
            raise bad("widths", widths, f"one width per stage ({len(self.max_widths)})")
        for i, (w, s) in enumerate(zip(widths, self.space.stages)):
            if not is_int(w) or w % self.space.width_step or not s.min_width <= w <= s.max_width:
                raise bad(f"widths[{i}]", w, f"a multiple of {self.space.width_step} in [{s.min_width}, {s.max_width}]")
        return widths

    def _sample_stage(self, i: int, noise: torch.Tensor) -> Tuple[List[int], torch.Tensor]:
        """Hard mode: the sampled candidate index per position of stage i (argmax of alpha + g,
        decided on the CPU: one transfer per stage, no sync per block) and the mask of Meta4D
        after a sampled Meta3D."""
        cands = self.space.stages[i].candidates
        logits = self.alphas[i].detach().float().cpu() + noise.cpu()
        mask = torch.zeros(logits.shape, dtype=torch.bool)
        ks, seen3d = [], False
        for j in range(logits.shape[0]):
            if seen3d and "meta4d" in cands:
                mask[j, cands.index("meta4d")] = True
            k = int(torch.argmax(logits[j].masked_fill(mask[j], float("-inf"))))
            seen3d |= cands[k] == "meta3d"
            ks.append(k)
        return ks, mask

    def forward_features(self, x, mode: Optional[str] = None, choice: Optional[Mapping] = None,
                         widths: Optional[Sequence[int]] = None, tau: Optional[float] = None,
                         generator: Optional[torch.Generator] = None, noise: Optional[List[torch.Tensor]] = None):
        mode = mode or self.mode
        if mode not in MODES:
            raise bad("mode", mode, "one of " + ", ".join(MODES))
        tau = float(tau if tau is not None else self.tau)
        if mode == "fixed":
            choice = choice if choice is not None else self.choice
            if choice is None:
                raise ArchError("mode 'fixed': got no choice, expected {widths: [...], blocks: [[...], ...]}")
            c = self.space.check_choice(choice)
            widths, types = c["widths"], c["blocks"]
        else:
            widths = self._check_widths(widths if widths is not None else self.widths)
            types = None
            if noise is None:
                noise = self.gumbel(generator if generator is not None else self.generator)
        grad_alpha = torch.is_grad_enabled()
        ratio = self.space.ffn_ratio

        w0 = widths[0]
        st = self.stem
        x = F.relu(_bn(st.norm1, _conv(st.conv1, x, w0 // 2)))
        x = F.relu(_bn(st.norm2, _conv(st.conv2, x, w0)))
        sampled: List[List[str]] = []
        n_stages = len(self.stages)
        for i, stage in enumerate(self.stages):
            w, hid = widths[i], ratio * widths[i]
            if i > 0:
                x = _bn(stage.downsample.norm, _conv(stage.downsample.conv, x, w))
            hw = x.shape[2:]
            tokens = False  # layout of x: (B, C, H, W) or (B, N, C)
            alpha = self.alphas[i]
            cands = self.space.stages[i].candidates
            if mode == "soft":
                probs = F.softmax((alpha + noise[i].to(alpha.device)) / tau, dim=-1)
            elif mode == "hard":
                ks, mask = self._sample_stage(i, noise[i])
                if grad_alpha and alpha.requires_grad:
                    logits = (alpha + noise[i].to(alpha.device)).masked_fill(mask.to(alpha.device), float("-inf"))
                    soft = F.softmax(logits / tau, dim=-1)
                    p = soft[torch.arange(len(ks), device=soft.device), torch.tensor(ks, device=soft.device)]
                    stw = (1.0 - p).detach() + p  # == 1; carries d(sampled prob)/d(alpha)
                else:
                    stw = None
            picks = []
            for j, mp in enumerate(stage.blocks):
                if mode == "soft":
                    out = 0
                    for n, t in enumerate(cands):
                        if t == "identity":
                            y = x
                        elif t == "meta4d":
                            y = meta4d_forward(mp.meta4d, x, hid)
                        else:
                            y = _to_map(meta3d_forward(mp.meta3d, _to_tokens(x), hid), hw)
                        out = out + probs[j, n] * y
                    x = out
                    continue
                t = types[i][j] if mode == "fixed" else cands[ks[j]]
                picks.append(t)
                if t == "identity":
                    continue
                if t == "meta3d":
                    if not tokens:
                        x, tokens = _to_tokens(x), True
                    y = meta3d_forward(mp.meta3d, x, hid)
                else:
                    if tokens:  # never for a valid Choice (no Meta4D after a Meta3D)
                        x, tokens = _to_map(x, hw), False
                    y = meta4d_forward(mp.meta4d, x, hid)
                # straight-through on the path's residual (see the module docstring): value y,
                # d/dw = <g, y - x>, what the candidate adds over identity
                x = y if mode == "fixed" or stw is None else _StraightThrough.apply(y, x, stw[j])
            sampled.append(picks)
            if tokens and i < n_stages - 1:
                x = _to_map(x, hw)
            elif not tokens and i == n_stages - 1:
                x = _to_tokens(x)
        if mode == "hard":
            self.last_choice = {"widths": list(widths), "blocks": sampled}
        return _ln(self.norm, x)

    def forward_head(self, x, pre_logits: bool = False):
        x = x.mean(dim=1)
        if pre_logits:
            return x
        out = _linear(self.head, x, self.head.out_features)
        if self.dist_head is None:
            return out
        out_dist = _linear(self.dist_head, x, self.dist_head.out_features)
        if self.distilled_training and self.training:
            return out, out_dist
        return (out + out_dist) / 2

    def forward(self, x, **kw):
        """Logits. Keyword overrides of the defaults set on the module: mode, choice (fixed),
        widths, tau, generator, noise (hard/soft)."""
        return self.forward_head(self.forward_features(x, **kw))

    # ------------------------------------------------------------ architecture weights
    @torch.no_grad()
    def probabilities(self) -> List[torch.Tensor]:
        """softmax(alpha) per position: (max_depth, len(candidates)) per stage, on the CPU."""
        return [F.softmax(a.detach().float().cpu(), dim=-1) for a in self.alphas]

    def importance(self) -> dict:
        """The paper's importance scores, with softmax(alpha) standing for 'alpha':
        a MetaPath's importance is p(MB4D) / p(I) in stages 1-2 and (p(MB3D) + p(MB4D)) / p(I) in
        stages 3-4, i.e. (1 - p(I)) / p(I) at every position; a stage's importance is the sum over
        its positions. A stage without an identity candidate cannot lose a block: its scores are
        null."""
        probs = self.probabilities()
        mp, stage = [], []
        for s, p in zip(self.space.stages, probs):
            if "identity" in s.candidates:
                pi = p[:, s.candidates.index("identity")]
                scores = [float((1 - q) / q) for q in pi.clamp_min(1e-12)]
                mp.append(scores)
                stage.append(float(sum(scores)))
            else:
                mp.append([None] * s.max_depth)
                stage.append(None)
        return {"definition": "metapath = (sum of non-identity softmax(alpha)) / softmax(alpha)[identity]; "
                              "stage = sum of its metapaths (EfficientFormer, Sec. 4.2)",
                "candidates": [list(s.candidates) for s in self.space.stages],
                "probabilities": [p.tolist() for p in probs],
                "metapath": mp, "stage": stage}

    @torch.no_grad()
    def best_choice(self, widths: Optional[Sequence[int]] = None) -> dict:
        """The most probable valid Choice: argmax per position, Meta4D excluded after a Meta3D."""
        blocks = []
        for s, a in zip(self.space.stages, self.alphas):
            bl, seen3d = [], False
            for j in range(s.max_depth):
                order = torch.argsort(a[j].detach().cpu(), descending=True).tolist()
                t = next(s.candidates[k] for k in order if not (seen3d and s.candidates[k] == "meta4d"))
                seen3d |= t == "meta3d"
                bl.append(t)
            blocks.append(bl)
        return self.space.check_choice({"widths": list(widths or self.max_widths), "blocks": blocks})

    # ------------------------------------------------------------ extraction
    def _source_key(self, key: str, arch: Mapping) -> str:
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if not m:
            return key
        i, j = int(m.group(1)), int(m.group(2))
        return f"stages.{i}.blocks.{j}.{arch['stages'][i]['blocks'][j]['type']}.{m.group(3)}"

    @torch.no_grad()
    def extract(self, choice: Mapping) -> Tuple[nn.Module, dict]:
        """(plain EfficientFormer, arch config) of a Choice with the supernet's weights copied in:
        in eval mode its output equals forward(x, mode='fixed', choice=choice)."""
        arch = self.space.to_arch(choice)
        with no_weight_init():  # every tensor is copied from the supernet below (strict)
            model = get_family(arch["family"]).build(arch)
        model.arch = arch
        own = self.state_dict()
        sd = {}
        for k, v in model.state_dict().items():
            src = own[self._source_key(k, arch)]
            sd[k] = src[tuple(slice(0, n) for n in v.shape)].clone()
        model.load_state_dict(sd, strict=True)
        return model.to(next(self.parameters()).device).train(self.training), arch

    # ------------------------------------------------------------ channel order
    def channel_groups(self) -> Dict[str, List[Tuple[str, int]]]:
        """Every set of channels that must be permuted together: name -> [(tensor name, dim)].

        'stem': the stem's middle channels; 'stage{i}': stage i's residual channels (stem or
        downsample output, every block's LayerScale / norms / mlp and attention in-out dims, the
        next downsample's input, the final norm and heads); 'stage{i}.block{j}.{meta4d|meta3d}':
        that block's FFN hidden channels."""
        bn = ("weight", "bias", "running_mean", "running_var")
        g: Dict[str, List[Tuple[str, int]]] = {
            "stem": [("stem.conv1.weight", 0), ("stem.conv1.bias", 0)] + [(f"stem.norm1.{t}", 0) for t in bn]
            + [("stem.conv2.weight", 1)]}
        n = len(self.stages)
        for i, stage in enumerate(self.stages):
            if i == 0:
                into = [("stem.conv2.weight", 0), ("stem.conv2.bias", 0)] + [(f"stem.norm2.{t}", 0) for t in bn]
            else:
                p = f"stages.{i}.downsample"
                into = [(f"{p}.conv.weight", 0), (f"{p}.conv.bias", 0)] + [(f"{p}.norm.{t}", 0) for t in bn]
            grp = list(into)
            for j, mp in enumerate(stage.blocks):
                for t in mp.candidates:
                    if t == "identity":
                        continue
                    p = f"stages.{i}.blocks.{j}.{t}"
                    grp += [(f"{p}.layer_scale_1", 0), (f"{p}.layer_scale_2", 0), (f"{p}.mlp.fc1.weight", 1),
                            (f"{p}.mlp.fc2.weight", 0), (f"{p}.mlp.fc2.bias", 0)]
                    hid = [(f"{p}.mlp.fc1.weight", 0), (f"{p}.mlp.fc1.bias", 0), (f"{p}.mlp.fc2.weight", 1)]
                    if t == "meta4d":
                        grp += [(f"{p}.mlp.norm2.{x}", 0) for x in bn]
                        hid += [(f"{p}.mlp.norm1.{x}", 0) for x in bn]
                    else:
                        grp += [(f"{p}.norm1.weight", 0), (f"{p}.norm1.bias", 0), (f"{p}.norm2.weight", 0),
                                (f"{p}.norm2.bias", 0), (f"{p}.token_mixer.qkv.weight", 1),
                                (f"{p}.token_mixer.proj.weight", 0), (f"{p}.token_mixer.proj.bias", 0)]
                    g[f"stage{i}.block{j}.{t}"] = hid
            if i + 1 < n:
                grp.append((f"stages.{i + 1}.downsample.conv.weight", 1))
            else:
                grp += [("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1)]
                if self.dist_head is not None:
                    grp.append(("dist_head.weight", 1))
            g[f"stage{i}"] = grp
        return g

    @torch.no_grad()
    def channel_scores(self, criterion: str = "l1") -> Dict[str, torch.Tensor]:
        """An importance per channel of every group. 'l1': sum over the group's conv/linear weights
        of each channel's L1 norm, each weight normalised by its mean so that no layer dominates
        by scale; 'norm': sum of |gamma| of the group's BatchNorm/LayerNorm and |LayerScale| (l1
        for a group without any, Meta3D's FFN hidden channels)."""
        tensors = dict(self.named_parameters())
        out = {}
        for name, members in self.channel_groups().items():
            score = None
            for key, dim in members:
                t = tensors.get(key)
                if t is None:
                    continue
                leaf = key.rsplit(".", 1)[-1]
                if criterion == "l1":
                    if t.dim() < 2:
                        continue
                    s = t.detach().abs().transpose(0, dim).flatten(1).sum(1)
                    s = s / s.mean().clamp_min(1e-12)
                elif criterion == "norm":
                    if t.dim() != 1 or leaf == "bias":
                        continue
                    s = t.detach().abs()
                    s = s / s.mean().clamp_min(1e-12)
                else:
                    raise bad("criterion", criterion, "'l1' or 'norm'")
                score = s.float() if score is None else score + s.float()
            if score is None and criterion == "norm":  # a group without norms (Meta3D's FFN hidden)
                score = self.channel_scores("l1").get(name)
            if score is not None:
                out[name] = score.cpu()
        return out

    @torch.no_grad()
    def sort_channels(self, criterion="l1", optimizers: Sequence[torch.optim.Optimizer] = ()) -> Dict[str, torch.Tensor]:
        """Permute every channel group so that channels come in decreasing importance: a width-w
        prefix then keeps the w most important. `criterion` is 'l1', 'norm' or a dict of scores
        per group (see channel_groups). The full-width function is unchanged; optimiser state
        (Adam moments) is permuted with the weights. Returns the permutation of each group."""
        scores = self.channel_scores(criterion) if isinstance(criterion, str) else dict(criterion)
        groups = self.channel_groups()
        named = dict(self.named_parameters())
        named.update(dict(self.named_buffers()))
        perms = {}
        for name, s in scores.items():
            if name not in groups:
                raise bad("sort_channels scores", name, "a group name of channel_groups()")
            perm = torch.argsort(torch.as_tensor(s).float(), descending=True, stable=True)
            perms[name] = perm
            for key, dim in groups[name]:
                t = named.get(key)
                if t is None:
                    continue
                idx = perm.to(t.device)
                t.copy_(t.index_select(dim, idx))
                for opt in optimizers:
                    st = opt.state.get(t, {}) if isinstance(t, nn.Parameter) else {}
                    for v in st.values():
                        if torch.is_tensor(v) and v.shape == t.shape:
                            v.copy_(v.index_select(dim, idx))
        return perms


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, forward=None, max_batches: int = 50) -> None:
    """Re-estimate BatchNorm running statistics of `model` as it runs now (a width, a choice) from
    a few training batches: cumulative averages, weights untouched (OFA/BigNAS practice). Only what the
    forward runs is re-estimated: in a supernet, the norms of blocks the choice skips and the channels
    past its widths keep their statistics (the shared prefix is the running width's, as in training)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    before = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
              for m in bns if m.running_mean is not None and m.num_batches_tracked is not None}
    was = model.training
    model.train()
    for m in bns:
        m.__dict__.pop("_vitslim_width", None)
        m.reset_running_stats()
        m.momentum = None
    dev = next(model.parameters()).device
    for k, batch in enumerate(batches):
        if k >= max_batches:
            break
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        (forward or model)(x.to(dev))
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        c = m.__dict__.pop("_vitslim_width", None)
        if m in before:
            rm, rv, nb = before[m]
            if int(m.num_batches_tracked) == 0:  # not run: as it was
                c = 0
                m.num_batches_tracked.copy_(nb)
            elif c is None:  # a plain BatchNorm module: all of its channels ran
                c = m.num_features
            with torch.no_grad():
                m.running_mean[c:] = rm[c:]
                m.running_var[c:] = rv[c:]
    model.train(was)
