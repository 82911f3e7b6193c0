"""The measured width grid that prices any pruned width of a DeiT or Swin arch.

A ViT/DeiT block is x + attn(LN(x)), then x + ffn(LN(x)), and `heads: 0` or `ffn_hidden: 0` are valid
widths (a block with one branch). So a block's latency is, to measurement accuracy, the latency of an
attention-only block (`ffn_hidden: 0`) at (heads, qk_dim, v_dim) plus that of an FFN-only block
(`heads: 0`) at ffn_hidden; the same holds for a Swin block (window attention part, FFN part). The
grid is ordinary `vit_block` / `swin_block` entries of those two kinds, for every distinct block
geometry of the arch (tokens or res, dim, window, shifted):

- attention-only on heads x qk_dim x v_dim (a few head counts; per-head widths 1, step, 2 step, ...,
  the unpruned width);
- FFN-only on ffn_hidden (1, step, 2 step, ..., the unpruned width).

`LatencyTable.estimate` prices a block key it lacks, when the grid of its geometry is there, as
attn(h, q, v) + ffn(f), each interpolated multilinearly between grid points (never by scaling
MACs); `grid_networks` packs the grid's entries into whole networks of the arch's shape so that
`build --procedure in-context` times every entry inside a network, as other entries are timed.
"""
from __future__ import annotations

import bisect
import math
import random
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .segments import SegmentError, decompose, key_str

GRID_OPS = ("vit_block", "swin_block")
GRID_FAMILIES = ("deit", "swin")


# ---------------------------------------------------------------- spacing
@dataclass
class GridSpec:
    """Grid spacing: per-head Q/K and V widths every `qk` / `v` channels, FFN widths every `ffn`
    channels (0: auto, the unpruned width / 16 rounded up to a multiple of 32, at least 32), and
    `heads` head counts spread evenly from 1 to the unpruned count. Width 1 and the unpruned widths
    are always grid points."""
    qk: int = 8
    v: int = 8
    ffn: int = 0
    heads: int = 3

    def __post_init__(self):
        for f in ("qk", "v", "ffn", "heads"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "ffn" else 1):
                raise SegmentError(f"--grid-step {f}: got {v!r}, expected an integer >= {0 if f == 'ffn' else 1}"
                                   + (" (0: auto)" if f == "ffn" else ""))

    def to_dict(self) -> dict:
        return asdict(self)


def parse_grid_step(text: Optional[str]) -> GridSpec:
    """`qk=8,v=8,ffn=64,heads=3` (any subset; the rest default) -> GridSpec."""
    if not text:
        return GridSpec()
    kw: Dict[str, int] = {}
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise SegmentError(f"--grid-step: got {part!r}, expected NAME=INT with NAME one of qk, v, ffn, heads "
                               "(as in qk=8,v=8,ffn=64,heads=3)")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in ("qk", "v", "ffn", "heads"):
            raise SegmentError(f"--grid-step: got {k!r}, expected qk, v, ffn or heads")
        try:
            kw[k] = int(v)
        except ValueError:
            raise SegmentError(f"--grid-step {k}: got {v!r}, expected an integer") from None
    return GridSpec(**kw)


def _axis(full: int, step: int) -> List[int]:
    """1, step, 2 step, ... below full, and full."""
    if full <= 0:
        return []
    pts = {1, full}
    pts.update(range(step, full, step))
    return sorted(pts)


def _heads_axis(full: int, n: int) -> List[int]:
    if full <= 0:
        return []
    if full == 1:  # one head: the axis is that point (n - 1 below would be 0)
        return [1]
    n = max(2, n)
    return sorted({max(1, round(1 + (full - 1) * i / (n - 1))) for i in range(n)} | {1, full})


def ffn_step(full: int, spec: GridSpec) -> int:
    if spec.ffn:
        return spec.ffn
    return max(32, 32 * math.ceil(full / 16 / 32))


# ---------------------------------------------------------------- geometries and keys
def _check_arch(arch: Mapping) -> dict:
    from supernet.arch import validate
    a = validate(arch)
    if a["family"] not in GRID_FAMILIES:
        raise SegmentError(f"--prune-grid: arch family {a['family']!r}, expected deit or swin (the families the "
                           "pruner reshapes; other families are priced by their own entries)")
    return a


def attn_geometry(key: Mapping) -> tuple:
    """What fixes the cost of a block's attention part besides its widths."""
    if key["op"] == "vit_block":
        return ("vit_block", key["tokens"], key["dim"])
    return ("swin_block", key["res"], key["dim"], key["window"], bool(key["shifted"]))


def ffn_geometry(key: Mapping) -> tuple:
    if key["op"] == "vit_block":
        return ("vit_block", key["tokens"], key["dim"])
    return ("swin_block", key["res"], key["dim"], key["window"])


def attn_key(geom: tuple, h: int, q: int, v: int) -> dict:
    if geom[0] == "vit_block":
        return {"op": "vit_block", "tokens": geom[1], "dim": geom[2], "heads": h, "qk_dim": q, "v_dim": v,
                "ffn_hidden": 0}
    return {"op": "swin_block", "res": geom[1], "dim": geom[2], "window": geom[3], "shifted": geom[4], "heads": h,
            "qk_dim": q, "v_dim": v, "ffn_hidden": 0}


def ffn_key(geom: tuple, f: int) -> dict:
    if geom[0] == "vit_block":
        return {"op": "vit_block", "tokens": geom[1], "dim": geom[2], "heads": 0, "qk_dim": 0, "v_dim": 0,
                "ffn_hidden": f}
    return {"op": "swin_block", "res": geom[1], "dim": geom[2], "window": geom[3], "shifted": False, "heads": 0,
            "qk_dim": 0, "v_dim": 0, "ffn_hidden": f}


def _block_segments(a: Mapping):
    return [s for s in decompose(a) if s.key["op"] in GRID_OPS]


def prune_grid_keys(arch: Mapping, spec: Optional[GridSpec] = None) -> List[dict]:
    """Every entry needed to price any pruned width of `arch`'s blocks (residual widths as they are):
    per distinct block geometry, attention-only entries on heads x qk_dim x v_dim and FFN-only entries
    on ffn_hidden, unpruned widths included."""
    spec = spec or GridSpec()
    a = _check_arch(arch)
    attn: Dict[tuple, Tuple[int, int, int]] = {}
    ffn: Dict[tuple, int] = {}
    for s in _block_segments(a):
        k = s.key
        if k["heads"]:
            g = attn_geometry(k)
            h0, q0, v0 = attn.get(g, (0, 0, 0))
            attn[g] = (max(h0, k["heads"]), max(q0, k["qk_dim"]), max(v0, k["v_dim"]))
        if k["ffn_hidden"]:
            g = ffn_geometry(k)
            ffn[g] = max(ffn.get(g, 0), k["ffn_hidden"])
    out, seen = [], set()

    def add(k):
        s = key_str(k)
        if s not in seen:
            seen.add(s)
            out.append(k)

    for g, (h0, q0, v0) in attn.items():
        for h in _heads_axis(h0, spec.heads):
            for q in _axis(q0, spec.qk):
                for v in _axis(v0, spec.v):
                    add(attn_key(g, h, q, v))
    for g, f0 in ffn.items():
        for f in _axis(f0, ffn_step(f0, spec)):
            add(ffn_key(g, f))
    return out


# ---------------------------------------------------------------- networks holding the grid
def _slots(a: Mapping) -> List[Tuple[int, int, tuple, tuple]]:
    """(stage, block, attention geometry, ffn geometry) of every block position of the arch (as if
    the block had both branches)."""
    out = []
    if a["family"] == "deit":
        st = a["stages"][0]
        prefix = 2 if a["distillation"] else 1
        g = a["input_size"] // a["stem"]["patch_size"]
        t = g * g + prefix
        for j in range(len(st["blocks"])):
            out.append((0, j, ("vit_block", t, st["width"]), ("vit_block", t, st["width"])))
        return out
    from supernet.families.swin import stage_resolutions, window_shift
    for i, (st, r) in enumerate(zip(a["stages"], stage_resolutions(a))):
        w = st["window_size"]
        has_shift = any(window_shift(r, r, w)) and len(st["blocks"]) >= 2
        for j in range(len(st["blocks"])):
            out.append((i, j, ("swin_block", r, st["width"], w, bool(j % 2) and has_shift),
                        ("swin_block", r, st["width"], w)))
    return out


def grid_networks(arch: Mapping, keys: Sequence[Mapping], contexts: int = 2, seed: int = 0) -> List[dict]:
    """Networks of `arch`'s shape (its stem, residual widths, depths and head) whose blocks are grid
    entries, together holding every grid key of `keys` at least `contexts` times. Each block position
    takes an entry of its own geometry: an attention-only one, an FFN-only one, or (FFN keys left,
    position free) either. Deterministic given the seed."""
    a = _check_arch(arch)
    slots = _slots(a)
    attn_by: Dict[tuple, List[dict]] = {}
    ffn_by: Dict[tuple, List[dict]] = {}
    for k in keys:
        if k.get("op") not in GRID_OPS:
            continue
        if k["ffn_hidden"] == 0 and k["heads"] > 0:
            attn_by.setdefault(attn_geometry(k), []).append(dict(k))
        elif k["heads"] == 0 and k["ffn_hidden"] > 0:
            ffn_by.setdefault(ffn_geometry(k), []).append(dict(k))
    rng = random.Random(seed)
    nets: List[dict] = []
    for c in range(max(1, contexts)):
        queues_a = {g: rng.sample(v, len(v)) for g, v in attn_by.items()}
        queues_f = {g: rng.sample(v, len(v)) for g, v in ffn_by.items()}
        while any(queues_a.values()) or any(queues_f.values()):
            net = _copy_arch(a)
            placed = 0
            for i, j, ga, gf in slots:
                b = net["stages"][i]["blocks"][j]
                qa, qf = queues_a.get(ga), queues_f.get(gf)
                if qa:
                    k = qa.pop()
                    b.update(heads=k["heads"], qk_dim=k["qk_dim"], v_dim=k["v_dim"], ffn_hidden=0)
                elif qf:
                    k = qf.pop()
                    b.update(heads=0, qk_dim=0, v_dim=0, ffn_hidden=k["ffn_hidden"])
                else:
                    continue  # keep the arch's own block here: a realistic neighbour
                b.pop("scale", None)
                placed += 1
            if not placed:
                left = [key_str(k) for q in list(queues_a.values()) + list(queues_f.values()) for k in q]
                raise SegmentError(f"--prune-grid: no block position of the arch fits {left[0]} "
                                   f"(and {len(left) - 1} more)")
            nets.append(net)
    return nets


def _copy_arch(a: Mapping) -> dict:
    import copy
    return copy.deepcopy(dict(a))


def grid_calibration_archs(arch: Mapping, n: int = 8, seed: int = 20_000) -> List[dict]:
    """Pruned variants of `arch` (each block at random widths, now and then a branch or the whole
    block removed) plus the arch itself: what a pruned network's prediction is checked and fitted on."""
    a = _check_arch(arch)
    rng = random.Random(seed)
    out = [_copy_arch(a)]
    for _ in range(max(0, n - 1)):
        net = _copy_arch(a)
        for st in net["stages"]:
            for b in st["blocks"]:
                h0, q0, v0, f0 = b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"]
                keep = rng.uniform(0.1, 1.0)
                h = max(1, round(h0 * rng.uniform(0.3, 1.0))) if h0 else 0
                q = max(1, round(q0 * keep * rng.uniform(0.3, 1.0))) if h0 else 0
                v = max(1, round(v0 * keep)) if h0 else 0
                f = max(1, round(f0 * rng.uniform(0.1, 1.0))) if f0 else 0
                r = rng.random()
                if r < 0.06:
                    h = q = v = 0
                elif r < 0.12:
                    f = 0
                elif r < 0.15:
                    h = q = v = f = 0
                b.update(heads=h, qk_dim=q, v_dim=v, ffn_hidden=f)
                b.pop("scale", None)
        out.append(net)
    return out


def grid_remedy(table, arch: str, out: str, grid: bool = True) -> str:
    """How to give `table` the entries (with `grid`, the pruning grid) of `arch`: `latency build` measures them on
    this machine; a table timed on a device (Core ML, `latency import`) cannot be built here, its entries go
    through `latency export-coreml`, the device, and `latency import` again."""
    flag = " --prune-grid" if grid else ""
    if (getattr(table, "device", None) or {}).get("backend") == "coreml":
        return (f"export one with `vitslim latency export-coreml --arch {arch}{flag} --out DIR`, time its "
                f"packages on the device and `vitslim latency import` them into {out}")
    return f"build one with `vitslim latency build --arch {arch}{flag} --out {out}`"


# ---------------------------------------------------------------- interpolation on the grid
class SplitIndex:
    """The grid entries of a table, by geometry: attention part {geometry: {(h, q, v): entry}} and
    FFN part {geometry: {f: entry}}, with each axis' measured values."""

    def __init__(self, entries: Iterable):
        self.attn: Dict[tuple, Dict[Tuple[int, int, int], object]] = {}
        self.ffn: Dict[tuple, Dict[int, object]] = {}
        entries_list = list(entries)
        for e in entries_list:
            k = e.key
            if k["op"] not in GRID_OPS or e.source == "estimated":
                continue
            if k["ffn_hidden"] == 0 and k["heads"] > 0:
                self.attn.setdefault(attn_geometry(k), {})[(k["heads"], k["qk_dim"], k["v_dim"])] = e
            elif k["heads"] == 0 and k["ffn_hidden"] > 0:
                self.ffn.setdefault(ffn_geometry(k), {})[k["ffn_hidden"]] = e
        self.attn_axes = {g: _lattice(pts) for g, pts in self.attn.items()}
        self.ffn_axes = {g: sorted(pts) for g, pts in self.ffn.items()}
        # Junction: a block with both branches is one segment, its two parts were measured as two
        # (two calls, two timed steps). What a measured whole block (the unpruned one, say) differs
        # from the sum of its parts is added to every two-branch block of that geometry, so that the
        # grid's price is continuous with (and at those widths equal to) the measured block entries.
        diffs: Dict[tuple, List[float]] = {}
        self.junction: Dict[tuple, float] = {}
        for e in entries_list:
            k = e.key
            if k["op"] in GRID_OPS and e.source != "estimated" and k["heads"] > 0 and k["ffn_hidden"] > 0:
                parts = self._parts(k)
                if parts is not None:
                    diffs.setdefault(attn_geometry(k), []).append(e.ms - parts[0])
        self.junction = {g: sum(d) / len(d) for g, d in diffs.items()}

    def __bool__(self):
        return bool(self.attn or self.ffn)

    def attn_part(self, geom: tuple, h: int, q: int, v: int) -> Optional[Tuple[float, float, float]]:
        """(ms, p10, p90) of the attention part, multilinear between the 8 (or fewer) grid points around
        (h, q, v); None when they are not all measured or (h, q, v) is outside the grid."""
        if h == 0:
            return (0.0, 0.0, 0.0)
        pts = self.attn.get(geom)
        if not pts:
            return None
        axes = self.attn_axes[geom]
        brackets = [_bracket(ax, x) for ax, x in zip(axes, (h, q, v))]
        if any(b is None for b in brackets):
            return None
        acc = [0.0, 0.0, 0.0]
        for (h_, wh), (q_, wq), (v_, wv) in _corners(brackets):
            w = wh * wq * wv
            if w == 0.0:
                continue
            e = pts.get((h_, q_, v_))
            if e is None:
                return None
            acc[0] += w * e.ms
            acc[1] += w * e.p10
            acc[2] += w * e.p90
        return tuple(acc)

    def ffn_part(self, geom: tuple, f: int) -> Optional[Tuple[float, float, float]]:
        if f == 0:
            return (0.0, 0.0, 0.0)
        pts = self.ffn.get(geom)
        if not pts:
            return None
        b = _bracket(self.ffn_axes[geom], f)
        if b is None:
            return None
        acc = [0.0, 0.0, 0.0]
        for x, w in b:
            if w:
                e = pts[x]
                acc[0] += w * e.ms
                acc[1] += w * e.p10
                acc[2] += w * e.p90
        return tuple(acc)

    def covers(self, key: Mapping) -> bool:
        """Whether the grid prices this block key (both of its parts)."""
        return self.block(key) is not None

    def block(self, key: Mapping) -> Optional[Tuple[float, float, float]]:
        """(ms, p10, p90) of a vit_block / swin_block key as attention part + FFN part (+ the junction
        of its geometry when it has both), or None when the grid does not cover it."""
        p = self._parts(key)
        if p is None or not (key["heads"] and key["ffn_hidden"]):
            return p
        j = self.junction.get(attn_geometry(key), 0.0)
        return (p[0] + j, p[1] + j, p[2] + j)

    def _parts(self, key: Mapping) -> Optional[Tuple[float, float, float]]:
        if key.get("op") not in GRID_OPS:
            return None
        h = key["heads"]
        a = self.attn_part(attn_geometry(key), h, key["qk_dim"] if h else 0, key["v_dim"] if h else 0)
        if a is None:
            return None
        f = self.ffn_part(ffn_geometry(key), key["ffn_hidden"])
        if f is None:
            return None
        return (a[0] + f[0], a[1] + f[1], a[2] + f[2])


def _lattice(pts) -> Tuple[List[int], List[int], List[int]]:
    """The (heads, qk_dim, v_dim) axes of the grid among the measured attention-only points, without the
    values of entries off it: a pruned block's own key (say qk_dim 11 on a grid of 1, 8, 16) would otherwise
    add its value to an axis where few other points have it, and every width bracketed by that value would
    lose its corners and fall back to MAC interpolation. A value goes when its slice (that value of one
    axis, every value of the others) misses more than half of its points, the sparsest first; such entries
    stay exact entries. A grid missing a corner here and there keeps its axes (and those widths fall back); an
    axis is never emptied, however scattered the points."""
    axes = [sorted({p[i] for p in pts}) for i in range(3)]
    while True:
        worst = None
        for i, ax in enumerate(axes):
            for x in ax if len(ax) > 1 else ():  # an axis keeps one value (scattered points: no lattice)
                cut = [a if j != i else [x] for j, a in enumerate(axes)]
                n = len(cut[0]) * len(cut[1]) * len(cut[2])
                miss = sum(c not in pts for c in _corners(cut)) / n
                if miss > 0.5 and (worst is None or miss > worst[0]):
                    worst = (miss, i, x)
        if worst is None:
            return tuple(axes)
        axes[worst[1]].remove(worst[2])


def _bracket(axis: Sequence[int], x: int):
    """[(lo, weight), (hi, weight)] of x between two neighbouring axis values (one pair with weight 1
    when x is on the axis); None outside."""
    if not axis or x < axis[0] or x > axis[-1]:
        return None
    i = bisect.bisect_left(axis, x)
    if axis[i] == x:
        return [(x, 1.0)]
    lo, hi = axis[i - 1], axis[i]
    t = (x - lo) / (hi - lo)
    return [(lo, 1.0 - t), (hi, t)]


def _corners(brackets):
    import itertools
    return itertools.product(*brackets)
