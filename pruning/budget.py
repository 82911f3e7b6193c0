"""Budgets and the choice of what to keep: cost models (params, MACs, latency from a table, or any
`cost(arch) -> float`) and the two global selections, ranking by importance per unit of cost and
a knapsack under the budget (HALP).

Both selections work on the same moves (`Network`): in each block, remove the least important
remaining head, Q/K slice (one pair from every kept head), V slice, or FFN channel (units.py); with
embedding pruning, also a stage's least important residual channel. A move's importance is the
Taylor (or magnitude) estimate of what it removes; its cost is the exact change of the network's
cost at the current widths (heads and Q/K widths interact: a Q/K slice is cheaper once heads are
gone; a residual channel is priced through every block of its stage). Ranking is global across
blocks and unit kinds, with no per-layer normalisation (Molchanov et al.), so a cheap unit survives
when its importance per unit of cost is high. A per-block floor (`Floor`) keeps every kind from
being emptied unless asked.

Depth moves (`depth=True`): a block's attention branch and its FFN branch are each also one move,
"remove the branch": all its remaining heads (or FFN channels) at once, with its LayerNorm, output
bias and residual add. Its importance is the branch's own gate-form Taylor score (`Scores.branch`),
its cost saved the block's cost with the branch minus without it (with LatencyCost: the branch's
table entry, fixed work included, and the per-segment overhead when the block goes whole). Branch
moves compete with unit moves in both selections; once a branch is gone its units are gone too (and
`grow` may put it back only whole). With depth on, unit moves never empty a branch (a branch goes
only as a whole), the floor does not hold a branch move back, and the last remaining branch of the
network is never removed.
"""
from __future__ import annotations

import copy
import heapq
import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .units import EMBED, KINDS, BlockInfo, BlockKeep, Plan, PruneError, block_infos

Widths = Tuple[int, int, int, int]  # (heads, qk_dim, v_dim, ffn_hidden)
BRANCHES = ("attn", "mlp")            # depth moves: a block's attention branch, its FFN branch
BRANCH_UNITS = {"attn": ("head", "qk", "v"), "mlp": ("ffn",)}
KIND_BRANCH = {"head": "attn", "qk": "attn", "v": "attn", "ffn": "mlp"}


# ---------------------------------------------------------------- cost models
class CostModel:
    """What a network costs. `total(arch)` is exact; `block(info, widths)` is the part of it one
    block accounts for (the rest of the network does not depend on the block's widths)."""
    name = ""
    unit = ""
    linear = True  # cost linear in each width: a one-unit lookahead is exact

    def total(self, arch: Mapping) -> float:
        raise NotImplementedError

    def block(self, info: BlockInfo, w: Widths) -> float:
        raise NotImplementedError

    def base(self, arch: Mapping, infos: Sequence[BlockInfo]) -> float:
        """Cost of everything but the prunable blocks."""
        return self.total(arch) - sum(self.block(i, (i.heads, i.qk_dim, i.v_dim, i.ffn_hidden)) for i in infos)

    def base_at(self, arch: Mapping, dims: Sequence[int]) -> float:
        """Cost of everything but the blocks when the stages' residual widths are `dims`: by default
        the cost of the network with those widths and every block emptied (memoised)."""
        memo = self.__dict__.setdefault("_base_memo", {})
        key = (id(arch), tuple(dims))
        if key not in memo:
            memo[key] = float(self.total(emptied(arch, dims)))
        return memo[key]


def emptied(arch: Mapping, dims: Sequence[int]) -> dict:
    """`arch` with stage widths `dims` and every block's branches removed (heads 0, ffn_hidden 0)."""
    a = copy.deepcopy(dict(arch))
    for st, d in zip(a["stages"], dims):
        st["width"] = int(d)
        st["blocks"] = [{"type": b["type"], "heads": 0, "qk_dim": 0, "v_dim": 0, "ffn_hidden": 0} for b in st["blocks"]]
    return a


def _stem_head(arch: Mapping, dims: Sequence[int]):
    """(params, MACs) of everything outside the blocks of a DeiT or Swin arch at residual widths
    `dims` (patch embedding, tokens and position embedding, patch merging, final norm, classifier)."""
    p, cin, k = arch["stem"]["patch_size"], arch["in_chans"], arch["num_classes"]
    g = arch["input_size"] // p
    if arch["family"] == "deit":
        c = dims[0]
        heads = 2 if arch.get("distillation") else 1
        prefix = heads
        params = c * cin * p * p + c + prefix * c + (g * g + prefix) * c + 2 * c + heads * (c * k + k)
        macs = g * g * c * cin * p * p + heads * c * k
        return params, macs
    from supernet.families.swin import stage_resolutions
    res = stage_resolutions(arch)
    c0 = dims[0]
    params = c0 * cin * p * p + c0 + 2 * c0
    macs = g * g * c0 * cin * p * p
    for i, st in enumerate(arch["stages"]):
        if i and st["downsample"] is not None:
            params += 2 * 4 * dims[i - 1] + 4 * dims[i - 1] * dims[i]
            macs += res[i] * res[i] * 4 * dims[i - 1] * dims[i]
    cl = dims[-1]
    params += 2 * cl + cl * k + k
    macs += cl * k
    return params, macs


def analytic_count(arch: Mapping) -> dict:
    """supernet.count's {"params", "macs"} of a DeiT or Swin arch, in closed form (stem and head, plus every
    block at its widths): the same integers (tests/pruning compare them on presets and pruned networks),
    without building the network on the meta device under torch's FLOP counter (seconds at Base size, and
    torch._dynamo's import on the first call)."""
    infos = block_infos(arch)
    p, m = _stem_head(arch, [st["width"] for st in arch["stages"]])
    pc, mc = ParamsCost(), MacsCost()
    for i in infos:
        w = (i.heads, i.qk_dim, i.v_dim, i.ffn_hidden)
        p += pc.block(i, w)
        m += mc.block(i, w)
    return {"params": int(p), "macs": int(m)}


class ParamsCost(CostModel):
    """Parameters (supernet.count's, computed in closed form: analytic_count; the training graph)."""
    name, unit = "params", "parameters"

    def total(self, arch):
        return float(analytic_count(arch)["params"])

    def base_at(self, arch, dims):
        return float(_stem_head(arch, dims)[0])

    def block(self, info, w):
        h, q, v, f = w
        c = info.dim
        n = 0
        if h:
            width = h * (2 * q + v)
            n += 2 * c + c * width + width + h * v * c + c + info.bias_rows * h
        if f:
            n += 2 * c + c * f + f + f * c + c
        return float(n)


class MacsCost(CostModel):
    """Multiply-accumulates of one image, counted as supernet.count counts them (matmuls, attention
    products included)."""
    name, unit = "macs", "MACs"

    def total(self, arch):
        return float(analytic_count(arch)["macs"])

    def base_at(self, arch, dims):
        return float(_stem_head(arch, dims)[1])

    def block(self, info, w):
        h, q, v, f = w
        c, t = info.dim, info.attn_tokens
        n = 0
        if h:
            n += t * c * h * (2 * q + v) + t * info.window_tokens * h * (q + v) + t * h * v * c
        if f:
            n += 2 * info.tokens * c * f
        return float(n)


class ArchCost(CostModel):
    """Any additive `cost(arch) -> float` (a latency table's predict, a measured model, ...).
    A block's cost is cost(arch with that block at the widths) - cost(arch with that block empty),
    memoised; the network is assumed to be a sum over blocks plus a rest that does not change."""

    linear = False

    def __init__(self, fn: Callable[[Mapping], float], arch: Mapping, name: str = "cost", unit: str = ""):
        self.fn, self.name, self.unit = fn, name, unit
        self.arch = copy.deepcopy(dict(arch))
        self._memo: Dict[tuple, float] = {}
        self._empty: Dict[tuple, float] = {}

    def total(self, arch):
        return float(self.fn(arch))

    def _with(self, info: BlockInfo, w: Widths) -> dict:
        a = copy.deepcopy(self.arch)
        a["stages"][info.stage]["width"] = info.dim
        b = a["stages"][info.stage]["blocks"][info.index]
        b.update(heads=w[0], qk_dim=w[1] if w[0] else 0, v_dim=w[2] if w[0] else 0, ffn_hidden=w[3])
        b.pop("scale", None)
        return a

    def block(self, info, w):
        if not w[0]:
            w = (0, 0, 0, w[3])
        k = (info.key, info.dim, w)
        if k not in self._memo:
            e = (info.key, info.dim)
            if e not in self._empty:
                self._empty[e] = float(self.fn(self._with(info, (0, 0, 0, 0))))
            self._memo[k] = float(self.fn(self._with(info, w))) - self._empty[e]
        return self._memo[k]


class LatencyCost(ArchCost):
    """Predicted milliseconds from a latency table, priced as `LatencyTable.predict` prices them. A
    block is its table entry (the key of the block in `latency_tables.segments.decompose(arch)`, with
    the widths replaced) times the table's overhead scale, plus the table's per-segment overhead
    (`per_segment_ms`: a block that loses both branches is no segment any more and saves it too).

    Widths the table has no entry for: when the table holds the pruning width grid of the block's
    geometry (`vitslim latency build --prune-grid`, latency_tables/grid.py), the block is its
    attention part plus its FFN part, each interpolated multilinearly between measured grid points
    (the table's `estimate` does this, so the price equals `predict` of the pruned arch); without the
    grid, the table's fallback interpolation (linear in MACs between entries of other widths). The
    rest of `predict` (stem, downsampling, head, intercept) does not change."""

    FFN_STEP = 8

    def __init__(self, table, arch: Mapping, interpolate: bool = True):
        from latency_tables.segments import decompose
        self.table, self.interpolate = table, interpolate
        super().__init__(lambda a: table.predict(a, interpolate=interpolate), arch, "latency", "ms")
        self._keys = {s.path: dict(s.key) for s in decompose(arch) if s.path}
        self._scale = 1.0 + float(table.overhead.get("scale", 0.0))
        self._per_segment = float(table.overhead.get("per_segment_ms", 0.0))

    def _key(self, info: BlockInfo, key0: Mapping, w: Widths) -> dict:
        key = dict(key0, dim=info.dim, heads=w[0], qk_dim=w[1], v_dim=w[2], ffn_hidden=w[3])
        if "shifted" in key:  # Swin: a block with no attention has no windows to shift
            key["shifted"] = bool(key0["shifted"]) and w[0] > 0
        return key

    def uses_grid(self, info: BlockInfo) -> bool:
        """Whether this block's pruned widths are priced from the measured width grid."""
        key0 = self._keys.get(info.path)
        if key0 is None:
            return False
        return self.table.has_split_grid(self._key(info, key0, (1, 1, 1, 1)))

    def block(self, info, w):
        key0 = self._keys.get(info.path)
        if key0 is None:  # a block the decomposition skipped (both branches already pruned)
            return super().block(info, w)
        if not w[0]:
            w = (0, 0, 0, w[3])
        if not w[0] and not w[3]:
            return 0.0  # the block is the identity: no entry, no segment
        k = (info.key, info.dim, w)
        if k in self._memo:
            return self._memo[k]
        key = self._key(info, key0, w)
        step = self.FFN_STEP
        if w[3] % step and w[3] > step and key not in self.table and not self.table.has_split_grid(key):
            # no grid: FFN widths between multiples of FFN_STEP linear between the two (the fallback
            # interpolates linearly in MACs, which are linear in ffn_hidden): 8x fewer estimates
            lo = w[3] - w[3] % step
            c0, c1 = self.block(info, w[:3] + (lo,)), self.block(info, w[:3] + (lo + step,))
            self._memo[k] = c0 + (c1 - c0) * (w[3] - lo) / step
            return self._memo[k]
        ms = float(self.table.lookup(key, interpolate=self.interpolate).ms)
        self._memo[k] = self._scale * ms + self._per_segment
        return self._memo[k]


class MixedCost(CostModel):
    """A weighted sum of cost models, sum_i w_i cost_i (additive when each is): the Lagrangian of
    several budgets at once, used by `select_constrained`."""

    def __init__(self, parts: Sequence[Tuple[float, CostModel]]):
        self.parts = [(float(w), c) for w, c in parts]
        self.linear = all(c.linear for _, c in self.parts)
        self.name = "+".join(c.name for _, c in self.parts)
        self.unit = "weighted"

    def total(self, arch):
        return sum(w * c.total(arch) for w, c in self.parts if w)

    def block(self, info, w):
        return sum(x * c.block(info, w) for x, c in self.parts if x)

    def base(self, arch, infos):
        return sum(w * c.base(arch, infos) for w, c in self.parts if w)

    def base_at(self, arch, dims):
        return sum(w * c.base_at(arch, dims) for w, c in self.parts if w)


# ---------------------------------------------------------------- targets
TARGET_KINDS = ("params", "macs", "latency")
TARGET_HELP = ("params=F or macs=F (fraction kept, in (0, 1]), latency=MS (milliseconds on --table's device) or "
               "latency=Fx (fraction of the unpruned network's predicted latency), or several joined by commas")


@dataclass
class Target:
    """`params=F`, `macs=F` (fractions kept, in (0, 1]), `latency=MS`, or `latency=Fx` (a fraction of the
    unpruned network's latency as the table predicts it: `relative`)."""
    kind: str
    value: float
    relative: bool = False

    def __str__(self):
        return f"{self.kind}={self.value:g}" + ("x" if self.relative else "")

    @property
    def is_fraction(self) -> bool:
        return self.kind in ("params", "macs") or self.relative


def parse_target(s: str) -> Target:
    if not isinstance(s, str) or "=" not in s:
        raise PruneError(f"--target: got {s!r}, expected {TARGET_HELP}")
    kind, val = s.split("=", 1)
    kind, val = kind.strip().lower(), val.strip()
    if kind not in TARGET_KINDS:
        raise PruneError(f"--target: got {kind!r}, expected params, macs or latency (as in macs=0.5)")
    relative = kind == "latency" and val.lower().endswith("x")
    try:
        v = float(val[:-1] if relative else val)
    except ValueError:
        raise PruneError(f"--target {s}: {val!r} is not a number" +
                         (" (latency=MS in milliseconds, or latency=Fx: a fraction of the unpruned latency)"
                          if kind == "latency" else "")) from None
    if not math.isfinite(v):
        raise PruneError(f"--target {s}: expected a finite number")
    if (kind != "latency" or relative) and not 0 < v <= 1:
        what = "the unpruned latency" if relative else f"the {kind}"
        raise PruneError(f"--target {s}: got {v:g}, expected a fraction kept in (0, 1] (0.5 keeps half {what})")
    if kind == "latency" and v <= 0:
        raise PruneError(f"--target {s}: got {v:g} ms, expected a positive number of milliseconds")
    return Target(kind, v, relative)


def parse_targets(s) -> List[Target]:
    """One target or several at once (`macs=0.5,latency=0.5x`: every one of them is met). Accepts a
    string, a Target, or a list of either; each kind at most once."""
    if isinstance(s, Target):
        items = [s]
    elif isinstance(s, str) and s.strip():  # an empty --target is no target, not one "between commas"
        items = [x for x in s.split(",")]
    elif isinstance(s, (list, tuple)) and s:
        items = list(s)
    else:
        raise PruneError(f"--target: got {s!r}, expected {TARGET_HELP}")
    out = []
    for x in items:
        if isinstance(x, str) and not x.strip():
            raise PruneError(f"--target {s}: an empty target between commas")
        t = x if isinstance(x, Target) else parse_target(x.strip() if isinstance(x, str) else x)
        if any(o.kind == t.kind for o in out):
            raise PruneError(f"--target {s}: {t.kind} given twice, expected each of params, macs, latency at most once")
        out.append(t)
    return out


# ---------------------------------------------------------------- floor
@dataclass
class Floor:
    """Each block keeps at least ceil(fraction * n) of each unit kind: heads, Q/K and V channels per
    head, FFN channels. With fraction > 0 that is at least one of each; with 0 a block may lose its
    whole attention (heads 0) or MLP (ffn_hidden 0), and the report lists it. A kept head always
    keeps one Q/K pair and one V channel (the arch has no narrower head).

    `fraction` may also be a mapping per kind ({"heads": 1, "ffn": 0.25}: kinds heads, qk, v, ffn, embed; the
    others 0.1), as `--min-keep heads=1,ffn=0.25` gives it; `keep`: blocks ((stage, index) keys) left whole, no
    unit or branch of theirs removed, and their stage's residual width too (Torch-Pruning's ignored_layers)."""
    fraction: "float | Mapping[str, float]" = 0.1
    original: Optional[Dict[Tuple[int, int], BlockInfo]] = None  # widths the fraction is of
    round_to: int = 1  # every channel width kept (Q/K and V per head, FFN, residual) a multiple of it, or unpruned
    keep: FrozenSet[Tuple[int, int]] = frozenset()

    def __post_init__(self):
        self.kinds = min_keep_kinds(self.fraction)
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise PruneError(f"--round-to: got {self.round_to!r}, expected an integer >= 1 (1: any width)")
        self.keep = frozenset(self.keep)

    def of(self, infos: Sequence[BlockInfo]) -> "Floor":
        """The same floor, as fractions of these (the unpruned) widths: iterative steps do not
        compound it."""
        return Floor(self.fraction, {i.key: i for i in infos}, self.round_to, self.keep)

    def _min(self, n: int, n0: int, kind: str, at_least: int, g: int = 1) -> int:
        if n == 0:
            return 0
        return min(n, round_up(max(at_least, math.ceil(self.kinds[kind] * n0 - 1e-9)), g))

    def mins(self, info: BlockInfo) -> Dict[str, int]:
        if info.key in self.keep:
            return {"head": info.heads, "qk": info.qk_dim, "v": info.v_dim, "ffn": info.ffn_hidden}
        o = (self.original or {}).get(info.key, info)
        g = self.round_to
        return {"head": self._min(info.heads, o.heads, "heads", 1 if self.kinds["heads"] > 0 else 0),
                "qk": self._min(info.qk_dim, o.qk_dim, "qk", 1, g), "v": self._min(info.v_dim, o.v_dim, "v", 1, g),
                "ffn": self._min(info.ffn_hidden, o.ffn_hidden, "ffn", 1 if self.kinds["ffn"] > 0 else 0, g)}

    def embed_min(self, width: int, original: int, stage: Optional[int] = None) -> int:
        """The least residual width a stage of `width` (`original` unpruned) keeps (all of it where a block of
        the stage is kept whole)."""
        if stage is not None and any(k[0] == stage for k in self.keep):
            return width
        return min(width, round_up(max(1, math.ceil(self.kinds["embed"] * original - 1e-9)), self.round_to))


MIN_KEEP_KINDS = ("heads", "qk", "v", "ffn", "embed")


def normalize_min_keep(spec) -> "float | Dict[str, float]":
    """--min-keep checked: one fraction for every kind (a float), or the kinds named with theirs (a dict) from a
    mapping or "heads=1,ffn=0.25"."""
    def frac(name, v):
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if isinstance(v, bool) or not 0 <= f <= 1:
            shown = f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else \
                (v.strip() if isinstance(v, str) else repr(v))
            raise PruneError(f"--min-keep: got {name}{shown}, expected a fraction in [0, 1]")
        return f
    if isinstance(spec, str):
        s = spec.strip()
        if "=" not in s:
            return frac("", s)
        parts = {}
        for item in s.split(","):
            name, eq, v = item.partition("=")
            name = name.strip()
            if not eq or name not in MIN_KEEP_KINDS:
                raise PruneError(f"--min-keep: got {item.strip()!r}, expected a fraction or KIND=F with KIND one of "
                                 f"{', '.join(MIN_KEEP_KINDS)} (e.g. heads=1,ffn=0.25)")
            if name in parts:
                raise PruneError(f"--min-keep: got {name} twice ({s}), expected each kind once")
            parts[name] = v.strip()
        spec = parts
    if isinstance(spec, Mapping):
        bad = [k for k in spec if k not in MIN_KEEP_KINDS]
        if bad:
            raise PruneError(f"--min-keep: got kind {bad[0]!r}, expected one of {', '.join(MIN_KEEP_KINDS)}")
        return {k: frac(f"{k}=", v) for k, v in spec.items()}
    return frac("", spec)


def min_keep_kinds(spec) -> Dict[str, float]:
    """--min-keep as a fraction per kind (the kinds a per-kind spec does not name keep the default 0.1)."""
    f = normalize_min_keep(spec)
    return {k: f.get(k, 0.1) for k in MIN_KEEP_KINDS} if isinstance(f, dict) else dict.fromkeys(MIN_KEEP_KINDS, f)


def min_keep_str(spec) -> str:
    """--min-keep as the user gave it (for messages)."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return f"{spec:g}"
    if isinstance(spec, Mapping):
        return ",".join(f"{k}={float(v):g}" for k, v in spec.items())
    return str(spec)


def round_up(n: int, g: int) -> int:
    return -(-n // g) * g


def removals(k: int, lowest: int, g: int, limit: Optional[int] = None) -> List[int]:
    """The numbers of units that may go from `k` kept: those leaving a multiple of `g` (at least `lowest`),
    the first `limit` of them (all if None). With g = 1: 1, 2, ..., k - lowest."""
    first = k - (k // g) * g or g  # down to the next multiple below k
    ms = list(range(first, k - lowest + 1, g))
    return ms if limit is None else ms[:limit]


# ---------------------------------------------------------------- the state a selection works on
class BlockState:
    """Counts kept of each kind in one block, and which units those are (the most important).
    `info` carries the block's current residual width (it changes when the embedding is pruned).
    With `depth`, `gone[branch]` marks a branch removed whole (its counts stay as they were, so that
    `grow` can put it back as it was), and unit moves keep at least one head / FFN channel."""

    def __init__(self, info: BlockInfo, scores: Mapping[str, np.ndarray], floor: Floor, depth: bool = False,
                 branch: Optional[Sequence[float]] = None):
        self.info = info
        self.s = scores
        self.mins = floor.mins(info)
        self.depth = depth
        if depth:  # a branch goes only as a whole (a branch move), never unit by unit
            self.mins["head"] = max(self.mins["head"], 1) if info.heads else 0
            self.mins["ffn"] = min(info.ffn_hidden, max(self.mins["ffn"], floor.round_to)) if info.ffn_hidden else 0
        if branch is None:  # no branch scores (a custom Importance): the sum over the branch's units
            branch = (float(np.sum(scores["head"])), float(np.sum(scores["ffn"])))
        self.b = {"attn": float(branch[0]), "mlp": float(branch[1])}
        self.gone = {"attn": False, "mlp": False}
        self.head_order = np.argsort(scores["head"], kind="stable") if info.heads else np.zeros(0, int)
        self.qk_order = np.argsort(scores["qk"], axis=1, kind="stable") if info.heads else None
        self.v_order = np.argsort(scores["v"], axis=1, kind="stable") if info.heads else None
        self.ffn_order = np.argsort(scores["ffn"], kind="stable") if info.ffn_hidden else np.zeros(0, int)
        self.n = {"head": info.heads, "qk": info.qk_dim, "v": info.v_dim, "ffn": info.ffn_hidden}
        self.k = dict(self.n)  # kept counts
        self.g = {"head": 1, "qk": floor.round_to, "v": floor.round_to, "ffn": floor.round_to}  # width granularity
        self.version = 0

    def _widths(self, k: Mapping[str, int], gone: Mapping[str, bool]) -> Widths:
        f = 0 if gone["mlp"] else k["ffn"]
        if k["head"] == 0 or gone["attn"]:
            return (0, 0, 0, f)
        return (k["head"], k["qk"], k["v"], f)

    @property
    def widths(self) -> Widths:
        return self._widths(self.k, self.gone)

    def live(self, branch: str) -> bool:
        """Whether the branch is there (not removed whole, not emptied unit by unit)."""
        return not self.gone[branch] and self.k["head" if branch == "attn" else "ffn"] > 0

    def kept_heads(self) -> np.ndarray:
        return self.head_order[self.n["head"] - self.k["head"]:]

    def can_remove(self, kind: str) -> int:
        """How many more units of `kind` may go."""
        if self.gone[KIND_BRANCH[kind]]:
            return 0
        if kind in ("qk", "v") and self.k["head"] == 0:
            return 0
        return self.k[kind] - self.mins[kind]

    def removals(self, kind: str, limit: Optional[int] = None) -> List[int]:
        """The numbers of `kind` units that may go at once (each leaves a width of the floor's granularity)."""
        if self.can_remove(kind) <= 0:
            return []
        return removals(self.k[kind], self.mins[kind], self.g[kind], limit)

    def regrowth(self, kind: str) -> int:
        """How many removed `kind` units come back at once (to the next width of the granularity, or all)."""
        k, g = self.k[kind], self.g[kind]
        return min(self.n[kind], (k // g + 1) * g) - k

    def step_importance(self, kind: str, steps: int) -> np.ndarray:
        """Importance of each of the next `steps` removals of `kind` (what each takes away)."""
        k, n = self.k[kind], self.n[kind]
        if kind == "head":
            return self.s["head"][self.head_order[n - k:n - k + steps]]
        if kind == "ffn":
            return self.s["ffn"][self.ffn_order[n - k:n - k + steps]]
        order, imp = (self.qk_order, self.s["qk"]) if kind == "qk" else (self.v_order, self.s["v"])
        heads = self.kept_heads()
        cols = order[heads, n - k:n - k + steps]             # (kept heads, steps) channel indices
        return imp[heads[:, None], cols].sum(axis=0)

    def widths_after(self, kind: str, steps: int) -> Widths:
        k = dict(self.k)
        k[kind] -= steps
        return self._widths(k, self.gone)

    def widths_without(self, branch: str) -> Widths:
        """The widths with `branch` removed whole."""
        return self._widths(self.k, dict(self.gone, **{branch: True}))

    def keep(self) -> BlockKeep:
        info = self.info
        heads = sorted(int(h) for h in self.kept_heads()) if info.heads and not self.gone["attn"] else []
        qk = {h: sorted(int(c) for c in self.qk_order[h, info.qk_dim - self.k["qk"]:]) for h in heads}
        v = {h: sorted(int(c) for c in self.v_order[h, info.v_dim - self.k["v"]:]) for h in heads}
        ffn = sorted(int(c) for c in self.ffn_order[info.ffn_hidden - self.k["ffn"]:]) \
            if info.ffn_hidden and not self.gone["mlp"] else []
        return BlockKeep(heads, qk, v, ffn)


class EmbedState:
    """Kept residual channels of one stage (embedding pruning)."""

    def __init__(self, stage: int, width: int, scores: np.ndarray, floor: Floor, original: int):
        self.stage, self.n, self.k, self.s = stage, width, width, np.asarray(scores, dtype=float)
        self.order = np.argsort(self.s, kind="stable")
        self.min = floor.embed_min(width, original, stage)
        self.g = floor.round_to
        self.version = 0

    def can_remove(self) -> int:
        return self.k - self.min

    def removals(self, limit: Optional[int] = None) -> List[int]:
        return removals(self.k, self.min, self.g, limit) if self.can_remove() > 0 else []

    def regrowth(self) -> int:
        return min(self.n, (self.k // self.g + 1) * self.g) - self.k

    def step_importance(self, steps: int) -> np.ndarray:
        return self.s[self.order[self.n - self.k:self.n - self.k + steps]]

    def keep(self) -> List[int]:
        return sorted(int(c) for c in self.order[self.n - self.k:])


class Network:
    """What a selection works on: the blocks' kept counts, optionally the stages' kept residual
    widths, and the cost model that prices them. `total()` is the cost of the network they describe."""

    def __init__(self, arch: Mapping, scores, cost: CostModel, floor: Floor, embed: bool = False,
                 depth: bool = False):
        from .importance import Scores
        self.arch, self.cost, self.floor, self.depth = arch, cost, floor, bool(depth)
        blocks = scores.blocks if isinstance(scores, Scores) else scores
        branch = scores.branch if isinstance(scores, Scores) else {}
        self.infos = block_infos(arch)
        self.blocks = [BlockState(i, blocks[i.key], floor, self.depth, branch.get(i.key)) for i in self.infos]
        self.widths0 = [st["width"] for st in arch["stages"]]
        self.embeds: Dict[int, EmbedState] = {}
        if embed:
            if not isinstance(scores, Scores) or not scores.embed:
                raise ValueError("embedding pruning needs scores with embed= (Importance.score(..., embed=True))")
            orig = floor.original or {}
            for i, w in enumerate(self.widths0):
                w0 = max((o.dim for o in orig.values() if o.stage == i), default=w)
                self.embeds[i] = EmbedState(i, w, scores.embed[i], floor, w0)
        self.stage_blocks = {i: [b for b, st in enumerate(self.blocks) if st.info.stage == i]
                             for i in range(len(self.widths0))}
        self._base = cost.base(arch, self.infos)

    # ------------------------------------------------------------ pricing
    def dims(self, change: Optional[Tuple[int, int]] = None) -> Tuple[int, ...]:
        d = [self.embeds[i].k if i in self.embeds else w for i, w in enumerate(self.widths0)]
        if change:
            d[change[0]] = change[1]
        return tuple(d)

    def base(self, dims: Optional[Tuple[int, ...]] = None) -> float:
        if not self.embeds:
            return self._base
        return self.cost.base_at(self.arch, dims or self.dims())

    def total(self) -> float:
        return self.base() + sum(self.cost.block(st.info, st.widths) for st in self.blocks)

    def block_delta(self, bi: int, kind: str, m: int) -> float:
        """Cost saved by removing m units of `kind` in block bi (at its current widths)."""
        st = self.blocks[bi]
        return self.cost.block(st.info, st.widths) - self.cost.block(st.info, st.widths_after(kind, m))

    def live_branches(self) -> int:
        return sum(st.live(b) for st in self.blocks for b in BRANCHES)

    def can_remove_branch(self, bi: int, branch: str) -> bool:
        """A depth move is open: depth on, the branch there, and not the network's last branch."""
        return self.depth and self.blocks[bi].live(branch) and self.live_branches() > 1 \
            and self.blocks[bi].info.key not in self.floor.keep

    def branch_delta(self, bi: int, branch: str) -> float:
        """Cost saved by removing the branch whole (at the block's current widths)."""
        st = self.blocks[bi]
        return self.cost.block(st.info, st.widths) - self.cost.block(st.info, st.widths_without(branch))

    def embed_delta(self, stage: int, m: int) -> float:
        """Cost saved by removing m residual channels of `stage` (every block of it gets narrower)."""
        e = self.embeds[stage]
        new = e.k - m
        d = self.base() - self.base(self.dims((stage, new)))
        for bi in self.stage_blocks[stage]:
            st = self.blocks[bi]
            d += self.cost.block(st.info, st.widths) - self.cost.block(replace(st.info, dim=new), st.widths)
        return d

    def set_embed(self, stage: int, k: int) -> None:
        self.embeds[stage].k = k
        self.embeds[stage].version += 1
        for bi in self.stage_blocks[stage]:
            st = self.blocks[bi]
            st.info = replace(st.info, dim=k)
            st.version += 1

    # ------------------------------------------------------------ results
    def plan(self) -> Plan:
        return Plan({st.info.key: st.keep() for st in self.blocks},
                    {i: e.keep() for i, e in self.embeds.items() if e.k < e.n})

    def removed_importance(self) -> float:
        """Importance removed by the current counts, priced step by step from the full block (heads
        first: Q/K and V slices are then priced over the heads that stay)."""
        tot = 0.0
        for st in self.blocks:
            probe = BlockState(st.info, st.s, Floor(0.0))
            for br in BRANCHES:  # a branch removed whole removes its own (branch) importance
                if st.gone[br]:
                    tot += st.b[br]
            for kind in ("head", "qk", "v", "ffn"):
                if st.gone[KIND_BRANCH[kind]]:
                    continue
                m = probe.k[kind] - st.k[kind]
                if m > 0 and (kind not in ("qk", "v") or probe.k["head"] > 0):
                    tot += float(probe.step_importance(kind, m).sum())
                probe.k[kind] = st.k[kind]
        for e in self.embeds.values():
            tot += float(e.s[e.order[:e.n - e.k]].sum())
        return tot

    def counts(self):
        return [(dict(st.k), dict(st.gone)) for st in self.blocks], {i: e.k for i, e in self.embeds.items()}

    def set_counts(self, counts) -> None:
        blocks, embeds = counts
        for i, k in embeds.items():
            self.set_embed(i, k)
        for st, (k, gone) in zip(self.blocks, blocks):
            st.k, st.gone = dict(k), dict(gone)
            st.version += 1


# ---------------------------------------------------------------- selection
@dataclass
class Selection:
    plan: Plan
    cost: float            # predicted by the cost model
    removed_importance: float
    method: str


def _lookahead(cost: CostModel, kind: str) -> int:
    return 1 if cost.linear else (4 if kind in ("qk", "v", "head") else 8)


def _best(imps: np.ndarray, deltas: Sequence[float]):
    """(ratio, steps, importance, cost saved) of the best prefix of a run of removals. When no prefix
    saves anything (a measured cost need not fall with every unit: timing noise, alignment), the whole
    run is a move of last resort (ratio inf): taken only when nothing else is left, so that the
    floor, which the target was checked against, stays reachable."""
    best = None
    cum = np.cumsum(imps)
    for m, dc in enumerate(deltas, start=1):
        if dc <= 0:
            continue
        r = float(cum[m - 1]) / dc
        if best is None or r < best[0]:
            best = (r, m, float(cum[m - 1]), dc)
    if best is None and len(deltas):
        m = len(deltas)
        best = (math.inf, m, float(cum[m - 1]), float(deltas[m - 1]))
    return best


def select_ratio(net: Network, budget: float) -> Selection:
    """Global greedy: repeatedly remove the move with the least importance per unit of cost saved
    (a block's head, Q/K slice, V slice or FFN channel, or a stage's residual channel), re-pricing
    the moves its removal changes, until the cost fits the budget; then add back what the last
    removal's overshoot can pay for."""
    total = net.total()
    heap: list = []
    epoch = {i: 0 for i in net.embeds}

    def push_block(bi: int):
        st = net.blocks[bi]
        for kind in KINDS:
            ms = st.removals(kind, _lookahead(net.cost, kind))
            if not ms:
                continue
            L, allowed = ms[-1], set(ms)  # a width between two of the granularity's is no move: priced 0, skipped
            mv = _best(st.step_importance(kind, L),
                       [net.block_delta(bi, kind, m) if m in allowed else 0.0 for m in range(1, L + 1)])
            if mv is not None:
                heapq.heappush(heap, (mv[0], 0, bi, kind, st.version, mv[1], mv[2], mv[3]))
        for br in BRANCHES:  # depth moves: the whole branch, its importance per unit of its whole cost
            if net.can_remove_branch(bi, br):
                dc = net.branch_delta(bi, br)
                if dc > 0:
                    heapq.heappush(heap, (st.b[br] / dc, 0, bi, br, st.version, 1, st.b[br], dc))

    def push_embed(i: int):
        e = net.embeds[i]
        ms = e.removals(1 if net.cost.linear else 8)
        if not ms:
            return
        L, allowed = ms[-1], set(ms)
        mv = _best(e.step_importance(L), [net.embed_delta(i, m) if m in allowed else 0.0 for m in range(1, L + 1)])
        if mv is not None:
            heapq.heappush(heap, (mv[0], 1, i, EMBED, epoch[i], mv[1], mv[2], mv[3]))

    for bi in range(len(net.blocks)):
        push_block(bi)
    for i in net.embeds:
        push_embed(i)
    while total > budget and heap:
        r, is_embed, idx, kind, ver, steps, dimp, dc = heapq.heappop(heap)
        if is_embed:
            if ver != epoch[idx]:
                continue
            net.set_embed(idx, net.embeds[idx].k - steps)
            for bi in net.stage_blocks[idx]:
                push_block(bi)
            for i in net.embeds:  # patch merging couples neighbouring stages' widths
                epoch[i] += 1
                push_embed(i)
        else:
            st = net.blocks[idx]
            if ver != st.version:
                continue
            if kind in BRANCHES:
                if not net.can_remove_branch(idx, kind):  # meanwhile the network's last branch
                    continue
                st.gone[kind] = True
            else:
                st.k[kind] -= steps
            st.version += 1
            push_block(idx)
            i = st.info.stage
            if i in net.embeds:
                epoch[i] += 1
                push_embed(i)
        total -= dc
    if total > budget and net.depth:  # the last branch left is not one the budget can hold
        total = _one_branch_left(net, budget)
    if total <= budget:
        total = grow(net, budget)
    return Selection(net.plan(), total, net.removed_importance(), "ratio")


def _one_branch_left(net: Network, budget: float) -> float:
    """Greedy depth moves end with the branch nothing cheaper outranked, and a network's last branch
    never goes: at a budget below it but above the depth floor (`floor_cost_depth`: the cheapest
    branch alone, at its floor widths) they stop over budget. Keep instead, of the branches that fit
    the budget alone at their floor widths (every residual width at its floor too), the most
    important; `grow` then adds back what the budget pays for. Returns the cost (still over budget
    only when no branch fits, i.e. below the floor). Blocks kept whole (`Floor.keep`) hold the last branches:
    nothing to choose."""
    if any(st.info.key in net.floor.keep and (st.info.heads or st.info.ffn_hidden) for st in net.blocks):
        return net.total()
    start = net.counts()
    blocks0 = start[0]
    embeds = {i: e.min for i, e in net.embeds.items()}
    options = []
    for bi, st in enumerate(net.blocks):
        for br in BRANCHES:
            if not (st.info.heads if br == "attn" else st.info.ffn_hidden):
                continue
            blocks = [(dict(k), {b: True for b in BRANCHES}) for k, _ in blocks0]
            k, gone = blocks[bi]
            gone[br] = False
            for kind in BRANCH_UNITS[br]:
                k[kind] = st.mins[kind]
            net.set_counts(start)
            net.set_counts((blocks, embeds))
            options.append((net.total(), st.b[br], (blocks, embeds)))
    net.set_counts(start)
    fits = [o for o in options if o[0] <= budget]
    if not fits:
        return net.total()
    net.set_counts(max(fits, key=lambda o: (o[1], -o[0]))[2])
    return net.total()


def grow(net: Network, budget: float) -> float:
    """Add back, one at a time, the removed unit with the most importance per unit of cost that
    still fits the budget; returns the final cost."""
    total = net.total()
    while True:
        best = None
        for bi, st in enumerate(net.blocks):
            for br in BRANCHES:  # a branch removed whole comes back whole, as it was
                if st.gone[br]:
                    st.gone[br] = False
                    dc = net.branch_delta(bi, br)
                    st.gone[br] = True
                    if total + dc <= budget:
                        r = st.b[br] / dc if dc > 0 else float("inf")
                        if best is None or r > best[0]:
                            best = (r, bi, br, dc, 1)
            for kind in KINDS:
                if st.k[kind] >= st.n[kind] or (kind in ("qk", "v") and st.k["head"] == 0) \
                        or st.gone[KIND_BRANCH[kind]]:
                    continue
                up = st.regrowth(kind)
                st.k[kind] += up
                gain = float(st.step_importance(kind, up).sum())
                dc = net.block_delta(bi, kind, up)
                st.k[kind] -= up
                if total + dc <= budget:
                    r = gain / dc if dc > 0 else float("inf")
                    if best is None or r > best[0]:
                        best = (r, bi, kind, dc, up)
        for i, e in net.embeds.items():
            if e.k >= e.n:
                continue
            up = e.regrowth()
            net.set_embed(i, e.k + up)
            gain, dc = float(e.step_importance(up).sum()), net.embed_delta(i, up)
            net.set_embed(i, e.k - up)
            if total + dc <= budget:
                r = gain / dc if dc > 0 else float("inf")
                if best is None or r > best[0]:
                    best = (r, -1 - i, EMBED, dc, up)
        if best is None:
            return total
        _, bi, kind, dc = best[:4]
        if kind == EMBED:
            net.set_embed(-1 - bi, net.embeds[-1 - bi].k + best[4])
        elif kind in BRANCHES:
            net.blocks[bi].gone[kind] = False
            net.blocks[bi].version += 1
        else:
            net.blocks[bi].k[kind] += best[4]
        total += dc


def _options(allowed: Sequence[int], linear: bool, max_options: int) -> np.ndarray:
    """The removal counts a knapsack group offers: none, and the allowed ones (at most `max_options` spread
    evenly over them where the cost is not linear, the last always among them)."""
    ms = np.concatenate([[0], np.asarray(allowed, dtype=int)])
    if linear or len(ms) <= max_options:
        return ms
    return ms[np.unique(np.linspace(0, len(ms) - 1, max_options).round().astype(int))]


def _knapsack_step(prev: np.ndarray, imps, w, bins: int, arg: np.ndarray):
    """One group of a multiple-choice knapsack: best[c] = min over options o of prev[c - w[o]] + imps[o]
    (options heavier than `bins` skipped); returns (best, the option taken per capacity, written into
    `arg`, whose initial value marks capacities no option reaches)."""
    new = np.full(bins + 1, np.inf)
    for o in range(len(imps)):
        wo = int(w[o])
        if wo > bins:
            continue
        cand = prev[:bins + 1 - wo] + imps[o]
        better = cand < new[wo:]
        new[wo:][better] = cand[better]
        arg[wo:][better] = o
    return new, arg


def select_knapsack(net: Network, budget: float, bins: int = 2000, rounds: int = 3,
                    max_options: int = 64) -> Selection:
    """HALP's latency-saliency knapsack as a multiple-choice knapsack: for every (block, kind), and
    every stage's residual width when it is pruned, choose how many units to remove, minimising the
    importance removed subject to the summed cost. Costs are linearised around the current widths
    (one group's cost with the others held) and re-linearised around the solution `rounds` times;
    a final greedy pass repairs any excess the linearisation left, and adds back the most important
    units the slack can pay for (costs are rounded to `bins` steps of the budget).

    With depth moves, the unit groups of a branch (heads, Q/K, V; or FFN) and "remove the branch"
    are one group: its options are every combination of unit removals (their min-importance profile
    over the rounded cost) or the branch removal, so a solution never counts a unit's saving inside
    a branch it also removes."""
    if net.total() <= budget:
        return Selection(net.plan(), net.total(), 0.0, "knapsack")
    start = net.counts()
    candidates = []
    for _ in range(rounds):
        raw = []  # per group: list of (kind, index, option counts, importance removed, cost saved) + branch option
        for bi, st in enumerate(net.blocks):
            for br in BRANCHES:
                subs = []
                for kind in BRANCH_UNITS[br]:
                    allowed = st.removals(kind)
                    if not allowed:
                        continue
                    avail = allowed[-1]
                    ms = _options(allowed, net.cost.linear, max_options)
                    cum = np.concatenate([[0.0], np.cumsum(st.step_importance(kind, avail))])
                    saved = np.array([net.block_delta(bi, kind, int(m)) if m else 0.0 for m in ms])
                    subs.append((kind, bi, ms, cum[ms], saved))
                branch = None
                if net.can_remove_branch(bi, br):
                    branch = (bi, br, st.b[br], net.branch_delta(bi, br))
                if branch is None:  # no depth move here: each kind its own group, as without depth
                    raw.extend(([g], None) for g in subs)
                else:
                    raw.append((subs, branch))
        for i, e in net.embeds.items():
            allowed = e.removals()
            if not allowed:
                continue
            avail = allowed[-1]
            ms = _options(allowed, False, max_options)  # each option prices every block of the stage
            cum = np.concatenate([[0.0], np.cumsum(e.step_importance(avail))])
            saved = np.array([net.embed_delta(i, int(m)) if m else 0.0 for m in ms])
            raw.append(([(EMBED, i, ms, cum[ms], saved)], None))
        now = net.total()
        # linearised: cost = now - sum of savings; keep it <= budget, i.e. sum of (max saving - saving) <= cap
        tops = [max(sum(float(np.max(g[4])) for g in subs), branch[3] if branch else -math.inf)
                for subs, branch in raw]
        cap = budget - now + sum(tops)
        if cap < 0 or not raw:
            break
        unit = max(cap / bins, 1e-12)
        groups = [_group(subs, branch, top, unit, bins) for (subs, branch), top in zip(raw, tops)]
        dp = np.zeros(bins + 1)
        choice = np.zeros((len(groups), bins + 1), dtype=np.int32)
        for gi, (picks_of, imps, w) in enumerate(groups):
            dp, choice[gi] = _knapsack_step(dp, imps, w, bins, np.zeros(bins + 1, dtype=np.int32))
        if not np.isfinite(dp[bins]):
            break
        c, picks = bins, []
        for gi in range(len(groups) - 1, -1, -1):
            o = int(choice[gi, c])
            picks.extend(groups[gi][0][o])
            c -= int(groups[gi][2][o])
        blocks, embeds = net.counts()
        for kind, idx, m in picks:
            if kind == EMBED:
                embeds[idx] -= m
            elif kind in BRANCHES:
                blocks[idx][1][kind] = True
            else:
                blocks[idx][0][kind] -= m
        net.set_counts(start)
        net.set_counts((blocks, embeds))
        if net.depth and net.live_branches() == 0:  # never the whole network: keep its most important branch
            bi, br = max(((bi, br) for bi, st in enumerate(net.blocks) for br in BRANCHES if st.gone[br]),
                         key=lambda t: net.blocks[t[0]].b[t[1]])
            net.blocks[bi].gone[br] = False
        candidates.append((net.total(), net.removed_importance(), net.counts()))
    if not candidates:  # nothing fitted the linearised budget: greedy from the full network
        net.set_counts(start)
        sel = select_ratio(net, budget)
        return Selection(sel.plan, sel.cost, sel.removed_importance, "knapsack")
    # every round's plan finished as the answer is (an excess the linearisation left removed greedily, then the
    # slack grown back), and the finished plans compared: an over-budget round can end better than a feasible one
    finals, seen = [], set()
    for k, (total, _, counts) in enumerate(candidates):
        key = repr(counts)
        if key in seen:  # a round that repeated an earlier one's plan
            continue
        seen.add(key)
        net.set_counts(start)
        net.set_counts(counts)
        if total > budget:
            select_ratio(net, budget)
        total = grow(net, budget)
        finals.append((total > budget, net.removed_importance(), total, k, net.counts()))
    over, removed, total, _, counts = min(finals, key=lambda f: f[:4])
    net.set_counts(start)
    net.set_counts(counts)
    return Selection(net.plan(), total, net.removed_importance(), "knapsack")


def _group(subs, branch, top: float, unit: float, bins: int):
    """One multiple-choice group: (picks of each option, importance removed, rounded weight), weight =
    (top - cost saved) / unit. `subs`: unit groups (kind, index, counts, importance, saved) whose
    options combine freely (saved and importance add); `branch`: (block, branch, importance, saved)
    or None, an option exclusive with every unit removal of the group."""
    if branch is None and len(subs) == 1:  # a plain group (as without depth moves)
        kind, idx, ms, imps, saved = subs[0]
        w = np.round(np.maximum(top - saved, 0) / unit).astype(np.int64)
        return [[(kind, idx, int(m))] if m else [] for m in ms], np.asarray(imps, float), w
    # min-importance profile of the unit combinations over the rounded weight (exact weights)
    shift = top - sum(float(np.max(g[4])) for g in subs)
    prof = np.full(bins + 1, np.inf)
    base = int(round(max(shift, 0) / unit))
    if base <= bins:
        prof[base] = 0.0
    back = []
    for kind, idx, ms, imps, saved in subs:
        gtop = float(np.max(saved))
        w = np.round(np.maximum(gtop - saved, 0) / unit).astype(np.int64)
        new, arg = _knapsack_step(prof, imps, w, bins, np.full(bins + 1, -1, dtype=np.int64))
        back.append((kind, idx, ms, w, arg))
        prof = new
    opts, imps_out, w_out = [], [], []
    best = np.inf
    for wt in range(bins + 1):  # Pareto front: more weight (less saved) only with less importance
        if prof[wt] < best:
            best = prof[wt]
            picks, c = [], wt
            for kind, idx, ms, w, arg in reversed(back):
                o = int(arg[c])
                if ms[o]:
                    picks.append((kind, idx, int(ms[o])))
                c -= int(w[o])
            opts.append(picks)
            imps_out.append(float(prof[wt]))
            w_out.append(wt)
    if branch is not None:
        bi, br, imp, saved = branch
        opts.append([(br, bi, 1)])
        imps_out.append(float(imp))
        w_out.append(int(round(max(top - saved, 0) / unit)))
    return opts, np.array(imps_out), np.array(w_out, dtype=np.int64)


def select_constrained(select: Callable[[Network, float], Selection], make_net: Callable[[CostModel], Network],
                       costs: Sequence[CostModel], budgets: Sequence[float], iters: int = 12) -> Tuple[Selection, dict]:
    """Several budgets met at once (MACs and latency, say): `select` (select_ratio or select_knapsack)
    runs on the weighted sum  sum_i lambda_i cost_i / budget_i  under a budget of 1 (the Lagrangian
    relaxation, sum lambda = 1), and the plan that meets every budget with the least importance removed
    is kept. First each budget alone: when its plan already meets the others (a latency budget whose
    plan keeps fewer MACs than asked), that plan is the answer. Otherwise the weights of the budgets the
    plan breaks are doubled, the factor's exponent halved whenever the set of broken budgets changes (a
    bisection in log-weights); a weighted budget of 1 leaves the binding constraints a hair either side
    of theirs, so if no plan met all, the closest is re-selected under a weighted budget tightened by
    its excess (and more, geometrically, until every budget holds). `make_net(cost)`
    builds a fresh Network of the same state priced by `cost`. Returns the selection and a record of
    the weights tried (`trace`: each plan's cost as a fraction of each budget)."""
    n = len(costs)
    if n != len(budgets) or n == 0:
        raise ValueError("select_constrained: one budget per cost model")
    probes = [make_net(c) for c in costs]
    trace: List[dict] = []
    best: list = []

    def run(lam: Sequence[float], scale: float = 1.0):
        net = make_net(costs[0] if n == 1 else MixedCost([(l / b, c) for l, c, b in zip(lam, costs, budgets)]))
        sel = select(net, budgets[0] * scale if n == 1 else scale)
        counts = net.counts()
        r = []
        for p, b in zip(probes, budgets):
            p.set_counts(counts)
            r.append(p.total() / b)
        ok = max(r) <= 1 + 1e-9
        trace.append({"weights": [float(x) for x in lam], "scale": scale, "of_budget": r,
                      "removed_importance": sel.removed_importance, "meets": ok})
        if ok and (not best or sel.removed_importance < best[0].removed_importance):
            best[:] = [sel, list(lam)]
        return r, ok

    for i in range(n):  # each budget alone
        lam = [1.0 if j == i else 0.0 for j in range(n)]
        r, ok = run(lam)
        if ok:
            return best[0], {"weights": lam, "trace": trace}
    lam, step, prev = [1.0 / n] * n, 1.0, None
    for _ in range(max(iters, 1)):
        r, ok = run(lam)
        broken = tuple(x > 1 + 1e-9 for x in r)
        if ok and prev is not None and not any(prev):
            break  # met twice in a row: the weights have settled
        if prev is not None and broken != prev:
            step /= 2  # the broken set flipped: a bisection in log-weights
        prev = broken
        if not any(broken):
            continue
        lam = [l * (2.0 ** step if b else 1.0) for l, b in zip(lam, broken)]
        z = sum(lam)
        lam = [max(l / z, 1e-6) for l in lam]
    if not best:  # the closest plan, its weighted budget tightened until every budget holds
        t = min(trace[n:], key=lambda e: max(e["of_budget"]))
        lam, scale = t["weights"], 1.0
        for k in range(10):
            excess = max(t["of_budget"]) - 1.0
            scale *= 1.0 - max(excess, 0.002 * 2 ** k)
            r, ok = run(lam, scale)
            if ok:
                break
            t = trace[-1]
    if not best:
        worst = min(trace, key=lambda e: max(e["of_budget"]))["of_budget"]
        raise PruneError("the budgets cannot all be met at once by removing units: the closest plan is at "
                         + ", ".join(f"{x:.3f}" for x in worst) + " of them; loosen one")
    return best[0], {"weights": best[1], "trace": trace}


def floor_cost(infos: Sequence[BlockInfo], cost: CostModel, base: float, floor: Floor) -> float:
    """The cheapest network the floor allows (residual widths as they are)."""
    tot = base
    for i in infos:
        m = floor.mins(i)
        w = (m["head"], m["qk"], m["v"], m["ffn"]) if m["head"] else (0, 0, 0, m["ffn"])
        tot += cost.block(i, w)
    return tot


def floor_cost_embed(arch: Mapping, cost: CostModel, floor: Floor) -> float:
    """The cheapest network the floor allows with every residual width at its floor too."""
    infos = block_infos(arch)
    dims = tuple(floor.embed_min(st["width"], st["width"], i) for i, st in enumerate(arch["stages"]))
    tot = cost.base_at(arch, dims)
    for i in infos:
        m = floor.mins(i)
        w = (m["head"], m["qk"], m["v"], m["ffn"]) if m["head"] else (0, 0, 0, m["ffn"])
        tot += cost.block(replace(i, dim=dims[i.stage]), w)
    return tot


def floor_cost_depth(arch: Mapping, cost: CostModel, floor: Floor, embed: bool = False) -> float:
    """The cheapest network depth moves allow: every branch removed but one, that one at its floor
    widths (and, with `embed`, every residual width at its floor)."""
    infos = block_infos(arch)
    if embed:
        dims = tuple(floor.embed_min(st["width"], st["width"], i) for i, st in enumerate(arch["stages"]))
        base = cost.base_at(arch, dims)
        infos = [replace(i, dim=dims[i.stage]) for i in infos]
    else:
        base = cost.base(arch, infos)
    kept = [i for i in infos if i.key in floor.keep and (i.heads or i.ffn_hidden)]  # an empty kept block holds no branch
    if kept:  # blocks kept whole hold the network's last branches: every other block can go
        return base + sum(cost.block(i, (i.heads, i.qk_dim, i.v_dim, i.ffn_hidden)) for i in kept)
    best = math.inf
    for i in infos:
        m = floor.mins(i)
        if i.heads:
            best = min(best, cost.block(i, (max(1, m["head"]), m["qk"], m["v"], 0)))
        if i.ffn_hidden:
            best = min(best, cost.block(i, (0, 0, 0, min(i.ffn_hidden, max(floor.round_to, m["ffn"])))))
    return base + (best if math.isfinite(best) else 0.0)
