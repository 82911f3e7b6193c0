"""A latency table compiled against one search space: per-stage cost arrays, so that a batch of
Choices (integer codes, see `CompiledTable.encode`) is scored with a few numpy gathers.

Code of one Choice: a row of `n_stages + n_positions` integers, first the index of each stage's
width in `space.widths(i)`, then, position by position (stage 0 first), the index of its block
kind in `KINDS`. Scores equal `LatencyTable.predict(space.to_arch(choice))`.
"""
from __future__ import annotations

from typing import List, Mapping, Sequence

import numpy as np

from .segments import key_str, space_keys
from .table import LatencyError, MissingEntriesError

KINDS = ("meta4d", "meta3d", "identity")


class CompiledTable:
    def __init__(self, table, space, interpolate: bool = False):
        if space.family != "efficientformer":
            raise LatencyError(f"compile: search space family {space.family!r}, expected efficientformer")
        self.table, self.space = table, space
        keys = space_keys(space)
        miss = table.missing(keys)
        if miss and not interpolate:
            raise MissingEntriesError(miss, f"search space {space.name or ''}".strip())
        self.estimated = [key_str(k) for k in miss]

        def ms(key):
            return table.lookup(key, interpolate).ms

        S = len(space.stages)
        res = space.resolutions()
        att = space.attention
        self.widths = [space.widths(i) for i in range(S)]
        self.depths = [st.max_depth for st in space.stages]
        self.n_stages, self.n_positions = S, sum(self.depths)
        self.stem = np.array([ms({"op": "efficientformer_stem", "res_in": space.input_size, "cin": space.in_chans,
                                  "c1": w // 2, "c2": w}) for w in self.widths[0]])
        self.down: List[np.ndarray] = [np.zeros((1, len(self.widths[0])))]
        self.blocks: List[np.ndarray] = []   # (3 kinds, n widths); identity costs nothing
        self.tokens: List[np.ndarray] = []   # flatten before the first Meta3D of a stage
        self.to_map: List[np.ndarray] = []   # back to a map after a 3D stage that is not the last
        self.allowed = np.zeros((S, len(KINDS)), dtype=bool)
        for i, st in enumerate(space.stages):
            r, W = res[i], self.widths[i]
            for k, kind in enumerate(KINDS):
                self.allowed[i, k] = kind in st.candidates
            if i > 0:
                self.down.append(np.array([[ms({"op": "efficientformer_downsample", "res_in": res[i - 1], "cin": wp,
                                                "cout": w}) for w in W] for wp in self.widths[i - 1]]))
            b = np.zeros((len(KINDS), len(W)))
            tok = np.zeros(len(W))
            tmap = np.zeros(len(W))
            for c, w in enumerate(W):
                if "meta4d" in st.candidates:
                    b[0, c] = ms({"op": "meta4d", "res": r, "dim": w, "ffn_hidden": space.ffn_ratio * w})
                if "meta3d" in st.candidates:
                    b[1, c] = ms({"op": "meta3d", "tokens": r * r, "dim": w, "heads": att["heads"], "qk_dim": att["qk_dim"],
                                  "v_dim": att["v_dim"], "ffn_hidden": space.ffn_ratio * w})
                    tok[c] = ms({"op": "efficientformer_to_tokens", "res": r, "dim": w})
                    if i != S - 1:
                        tmap[c] = ms({"op": "efficientformer_to_map", "res": r, "dim": w})
            self.blocks.append(b)
            self.tokens.append(tok)
            self.to_map.append(tmap)
        last_3d = "meta3d" in space.stages[-1].candidates
        head = np.zeros((len(self.widths[-1]), 2))  # column: from_map (0 = last stage ends on tokens)
        for c, w in enumerate(self.widths[-1]):
            for fm in ((False, True) if last_3d else (True,)):
                head[c, int(fm)] = ms({"op": "efficientformer_head", "res": res[-1], "dim": w, "classes": space.num_classes,
                                       "distillation": bool(space.distillation), "from_map": fm})
        self.head = head
        self.scale = float(table.overhead.get("scale", 0.0))
        self.intercept = float(table.overhead.get("intercept_ms", 0.0))
        self.per_segment = float(table.overhead.get("per_segment_ms", 0.0))
        self._pos = np.cumsum([0] + self.depths)

    # ------------------------------------------------------------ encoding
    def encode(self, choice: Mapping) -> np.ndarray:
        c = self.space.check_choice(choice)
        row = [self.widths[i].index(w) for i, w in enumerate(c["widths"])]
        for bl in c["blocks"]:
            row += [KINDS.index(t) for t in bl]
        return np.array(row, dtype=np.int64)

    def encode_batch(self, choices: Sequence[Mapping]) -> np.ndarray:
        return np.stack([self.encode(c) for c in choices]) if choices else np.zeros((0, self.n_stages + self.n_positions), np.int64)

    def decode(self, row) -> dict:
        row = [int(v) for v in row]
        widths = [self.widths[i][row[i]] for i in range(self.n_stages)]
        blocks = []
        for i in range(self.n_stages):
            a, b = self.n_stages + self._pos[i], self.n_stages + self._pos[i + 1]
            blocks.append([KINDS[k] for k in row[a:b]])
        return {"widths": widths, "blocks": blocks}

    # ------------------------------------------------------------ scoring
    def check(self, codes: np.ndarray) -> None:
        """Raise LatencyError naming the first row that is not a valid Choice of the space."""
        codes = np.asarray(codes)
        S = self.n_stages
        if codes.ndim != 2 or codes.shape[1] != S + self.n_positions:
            raise LatencyError(f"codes: got shape {codes.shape}, expected (batch, {S + self.n_positions})")
        for i in range(S):
            w = codes[:, i]
            bad = (w < 0) | (w >= len(self.widths[i]))
            if bad.any():
                r = int(np.argmax(bad))
                raise LatencyError(f"codes[{r}, {i}]: got width index {int(w[r])}, expected 0..{len(self.widths[i]) - 1}")
            k = codes[:, S + self._pos[i]:S + self._pos[i + 1]]
            ok = (k >= 0) & (k < len(KINDS))
            ok &= self.allowed[i][np.clip(k, 0, len(KINDS) - 1)]
            seen3d = np.maximum.accumulate(k == 1, axis=1)
            ok &= ~((k == 0) & np.concatenate([np.zeros_like(seen3d[:, :1]), seen3d[:, :-1]], axis=1))
            if not ok.all():
                r, p = map(int, np.argwhere(~ok)[0])
                raise LatencyError(f"codes[{r}]: stage {i} position {p}: kind {int(k[r, p])} is not allowed there "
                                   f"(candidates {self.space.stages[i].candidates}, no meta4d after a meta3d)")

    def score(self, codes, check: bool = True) -> np.ndarray:
        """Predicted milliseconds of each row of `codes` (shape (batch, n_stages + n_positions))."""
        codes = np.asarray(codes, dtype=np.int64)
        if check:
            self.check(codes)
        S = self.n_stages
        w = codes[:, :S]
        total = self.stem[w[:, 0]].copy()
        count = np.full(len(codes), 2 + (S - 1), dtype=np.int64)  # stem, head, a downsample per later stage
        any3d_last = None
        for i in range(S):
            wi = w[:, i]
            if i > 0:
                total += self.down[i][w[:, i - 1], wi]
            k = codes[:, S + self._pos[i]:S + self._pos[i + 1]]
            total += self.blocks[i][k, wi[:, None]].sum(axis=1)
            has3d = (k == 1).any(axis=1)
            total += has3d * self.tokens[i][wi]
            count += (k != 2).sum(axis=1) + has3d
            if i < S - 1:
                total += has3d * self.to_map[i][wi]
                count += has3d
            else:
                any3d_last = has3d
        total += self.head[w[:, S - 1], (~any3d_last).astype(np.int64)]
        return total * (1.0 + self.scale) + self.intercept + self.per_segment * count

    def score_choices(self, choices: Sequence[Mapping]) -> np.ndarray:
        return self.score(self.encode_batch(choices), check=False)
