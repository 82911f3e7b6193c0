"""The search-strategy interface: a `SearchContext` (space, supernet, latency table, evaluator, target)
goes in, a `SearchResult` (the chosen Choice with its predicted latency and held-out accuracy) comes
out. Slimming, Optuna, random search and uniform shrinking are classes behind it.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from supernet.errors import VitslimError

from .evaluator import FunctionEvaluator, HeldoutEvaluator


class SearchError(VitslimError, ValueError):
    """A search that cannot run or cannot meet its target."""


@dataclass
class SearchContext:
    space: Any                      # supernet.space.SearchSpace
    supernet: Any                   # MetaPathSupernet (eval mode)
    table: Any                      # latency_tables.LatencyTable
    compiled: Any                   # table.compile(space): vectorised scoring of Choices
    evaluator: HeldoutEvaluator     # or your own fn(choice) -> {"acc", "loss"} (wrapped in a FunctionEvaluator)
    target_ms: float
    seed: int = 0
    progress: bool = True
    log_dir: Optional[str] = None   # where a strategy keeps its resumable log / storage
    lookup_seconds: float = 0.0     # time in table look-ups (the overhead figure)
    limit_ms: Optional[float] = None  # a tighter bound on predicted latency (set by verification; None: the target)

    def __post_init__(self):
        ev = self.evaluator
        if ev is not None and not (hasattr(ev, "prime") and hasattr(ev, "evaluations")):
            if not callable(ev):
                raise SearchError(f"evaluator: got {type(ev).__name__}, expected a nas.HeldoutEvaluator or a function "
                                  "choice -> {'acc', 'loss'}")
            self.evaluator = FunctionEvaluator(ev, self.space)

    @property
    def bound_ms(self) -> float:
        """What the predicted latency must meet: the target, or the bound verification tightened it to."""
        return float(self.target_ms if self.limit_ms is None else self.limit_ms)

    def latency(self, choice: Mapping) -> float:
        return float(self.latencies([choice])[0])

    def latencies(self, choices: Sequence[Mapping]) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.compiled.score_choices(list(choices))
        self.lookup_seconds += time.perf_counter() - t0
        return out


@dataclass
class SearchResult:
    strategy: str
    choice: dict
    predicted_ms: float
    acc: float
    loss: float
    evaluations: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)   # strategy-specific (steps, trials, pareto, ...)


class SearchStrategy:
    """One way of picking a Choice under ctx.target_ms. Subclasses set `name` and implement
    `search`; `args()` is what a resumed run must match."""
    name = "base"
    log_file: Optional[str] = None   # file in ctx.log_dir that makes the run resumable

    def args(self) -> dict:
        return {}

    def search(self, ctx: SearchContext) -> SearchResult:  # pragma: no cover - interface
        raise NotImplementedError


# ---------------------------------------------------------------- shared helpers
def check_target(target_ms) -> float:
    try:
        if isinstance(target_ms, bool):  # float(True) is 1.0: a flag where a number belongs, not 1 ms
            raise TypeError
        t = float(target_ms)
    except (TypeError, ValueError):
        raise SearchError(f"--target-ms: got {target_ms!r}, expected a number of milliseconds > 0") from None
    if not np.isfinite(t) or t <= 0:
        raise SearchError(f"--target-ms: got {target_ms!r}, expected a number of milliseconds > 0")
    return t


def largest_choice(supernet) -> dict:
    """Slimming's start, the paper's "largest subnet": every position keeps a block (the most probable
    non-identity MetaPath under the supernet's alphas, meta4d excluded after a meta3d) and every stage
    is at its maximum width."""
    space = supernet.space
    probs = supernet.probabilities()
    blocks = []
    for s, p in zip(space.stages, probs):
        bl, seen3d = [], False
        for j in range(s.max_depth):
            order = sorted(range(len(s.candidates)), key=lambda k: (-float(p[j, k]), k))
            t = next(s.candidates[k] for k in order
                     if s.candidates[k] != "identity" and not (seen3d and s.candidates[k] == "meta4d"))
            seen3d |= t == "meta3d"
            bl.append(t)
        blocks.append(bl)
    return space.check_choice({"widths": [s.max_width for s in space.stages], "blocks": blocks})


def _stage_block_options(st) -> List[List[str]]:
    """Cheapest-candidate block lists of one stage: all identity where allowed, else every 4D-then-3D
    split (which of them is cheaper depends on the table)."""
    d = st.max_depth
    if "identity" in st.candidates:
        return [["identity"] * d]
    opts = []
    for n3 in range(d + 1):
        bl = ["meta4d"] * (d - n3) + ["meta3d"] * n3
        if all(t in st.candidates for t in bl):
            opts.append(bl)
    return opts


def fastest_choice(ctx: SearchContext, max_rows: int = 200_000) -> dict:
    """The fastest Choice the space and table allow: identity wherever allowed; widths (all
    combinations when few enough, else each stage's minimum) and block splits scored on the table."""
    space = ctx.space
    width_sets = [space.widths(i) for i in range(len(space.stages))]
    if int(np.prod([len(w) for w in width_sets])) > max_rows:
        width_sets = [[s.min_width] for s in space.stages]
    block_sets = [_stage_block_options(st) for st in space.stages]
    choices = [{"widths": list(ws), "blocks": [list(b) for b in bs]}
               for bs in itertools.product(*block_sets) for ws in itertools.product(*width_sets)]
    ms = ctx.latencies(choices)
    return choices[int(np.argmin(ms))]


def unreachable(ctx: SearchContext) -> Optional[str]:
    """None if the target can be met, else the error text naming the fastest network."""
    fast = fastest_choice(ctx)
    ms = ctx.latency(fast)
    if ms <= ctx.bound_ms:
        return None
    if ctx.limit_ms is not None:
        return (f"the tightened bound {ctx.bound_ms:.4g} ms (target {ctx.target_ms:g} ms corrected by the table's "
                f"measured error) is unreachable: the fastest network this space and table allow is predicted at "
                f"{ms:.4g} ms (widths {fast['widths']}, blocks {describe_blocks(fast)})")
    return (f"target {ctx.target_ms:g} ms is unreachable: the fastest network this space and table allow is "
            f"predicted at {ms:.4g} ms (widths {fast['widths']}, blocks {describe_blocks(fast)}); "
            f"ask for at least {ceil_sig(ms)} ms, or use a table of a faster device")


def ceil_sig(x: float, digits: int = 4) -> str:
    """`x` rounded *up* to `digits` significant digits, as text: a minimum quoted to the user must itself
    be accepted when given back (0.36162 -> "0.3617", never "0.3616")."""
    if not (x > 0 and np.isfinite(x)):
        return f"{x:.{digits}g}"
    scale = 10.0 ** (digits - 1 - int(np.floor(np.log10(x))))
    v = np.ceil(x * scale - 1e-9) / scale
    while v < x:
        v += 1 / scale
    return f"{v:.{digits}g}"


def require_reachable(ctx: SearchContext) -> None:
    """Raise the unreachable-target error (naming the fastest network) before a search starts."""
    msg = unreachable(ctx)
    if msg:
        raise SearchError(msg)


_SHORT = {"meta4d": "4", "meta3d": "3", "identity": "-"}


def describe_blocks(choice: Mapping) -> str:
    return "/".join("".join(_SHORT[t] for t in bl) for bl in choice["blocks"])
