"""A search space: per stage, the candidate MetaPaths at each block position and the widths a
stage may take; and the encoding of one sub-network in it (a `Choice`) into an arch config.

File format (YAML; the shipped spaces are in supernet/spaces/, loadable by name: `tiny`, `efficientformer_l1`):

    version: 1
    family: efficientformer
    input_size: 224
    num_classes: 1000
    distillation: false
    width_step: 16
    ffn_ratio: 4                             # ffn_hidden = ffn_ratio * stage width
    attention: {heads: 8, qk_dim: 32, v_dim: 128}   # Meta3D attention, fixed across widths
    stages:
      - {max_depth: 3, max_width: 48, min_width: 16, candidates: [meta4d, identity]}
      ...

A Choice is {"widths": [w per stage], "blocks": [[type per position] per stage]}; every stage
lists exactly max_depth positions. Rules (EfficientFormer): widths are multiples of width_step
within [min_width, max_width]; within a stage no meta4d follows a meta3d (4D first, then 3D).
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field
from typing import Dict, List, Mapping


from .arch import MAX_BLOCKS, MAX_INPUT_SIZE, check_choice, check_int, check_keys, check_list, is_int, read_yaml, req, validate
from .errors import ArchError, bad

SPACE_VERSION = 1
BLOCK_KINDS = ("meta4d", "meta3d", "identity")
# Total stride at the input of each stage (EfficientFormer: stem /4, then /2 per stage).
STAGE_STRIDES = (4, 8, 16, 32)


@dataclass
class StageSpace:
    max_depth: int
    max_width: int
    min_width: int
    candidates: List[str]


@dataclass
class SearchSpace:
    family: str
    input_size: int
    num_classes: int
    stages: List[StageSpace]
    width_step: int = 16
    ffn_ratio: int = 4
    attention: Dict[str, int] = field(default_factory=lambda: {"heads": 8, "qk_dim": 32, "v_dim": 128})
    distillation: bool = False
    in_chans: int = 3
    name: str = ""

    # ------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: Mapping, name: str = "") -> "SearchSpace":
        if not isinstance(d, Mapping):
            raise ArchError(f"search space: got {type(d).__name__}, expected a mapping")
        check_keys(d, "", ("version", "family", "input_size", "in_chans", "num_classes", "distillation",
                           "width_step", "ffn_ratio", "attention", "stages", "name"))
        ver = d.get("version", SPACE_VERSION)
        if ver != SPACE_VERSION:
            raise bad("version", ver, f"{SPACE_VERSION}")
        fam = check_choice(req(d, "family", ""), "family", ("efficientformer",))
        step = check_int(d.get("width_step", 16), "width_step")
        size = check_int(d.get("input_size", 224), "input_size", lo=32, hi=MAX_INPUT_SIZE)
        if size % 32:
            raise bad("input_size", size, "a multiple of 32 (four stride-2 stages after a stride-4 stem)")
        att = dict(d.get("attention") or {"heads": 8, "qk_dim": 32, "v_dim": 128})
        check_keys(att, "attention", ("heads", "qk_dim", "v_dim"))
        for k in ("heads", "qk_dim", "v_dim"):
            check_int(req(att, k, "attention"), f"attention.{k}")
        stages = []
        raw = check_list(req(d, "stages", ""), "stages", length=4)
        for i, s in enumerate(raw):
            p = f"stages[{i}]"
            if not isinstance(s, Mapping):
                raise bad(p, s, "a mapping with max_depth, max_width, candidates")
            check_keys(s, p, ("max_depth", "max_width", "min_width", "candidates"))
            depth = check_int(req(s, "max_depth", p), p + ".max_depth", hi=MAX_BLOCKS)
            mw = check_int(req(s, "max_width", p), p + ".max_width")
            mn = check_int(s.get("min_width", step), p + ".min_width")
            for key, w in (("max_width", mw), ("min_width", mn)):
                if w % step:
                    raise bad(f"{p}.{key}", w, f"a multiple of width_step ({step})")
            if mn > mw:
                raise bad(p + ".min_width", mn, f"at most max_width ({mw})")
            if i == 0 and mn < 2:  # the stem's first convolution has half the first stage's width
                raise bad(p + ".min_width", mn, "at least 2 for stage 0 (the stem's first convolution is half of it)")
            cands = check_list(req(s, "candidates", p), p + ".candidates")
            for j, c in enumerate(cands):
                check_choice(c, f"{p}.candidates[{j}]", BLOCK_KINDS)
                if c in cands[:j]:
                    raise bad(p + ".candidates", cands, f"each candidate once ({c!r} listed twice)")
            if not any(c != "identity" for c in cands):
                raise bad(p + ".candidates", cands, "at least one of meta4d, meta3d (an empty stage)")
            if "meta3d" in cands and i < 2:
                raise bad(p + ".candidates", cands, "no meta3d in stages 1-2 (attention is too costly at 1/4 and 1/8 resolution)")
            stages.append(StageSpace(depth, mw, mn, list(cands)))
        return cls(family=fam, input_size=size, num_classes=check_int(d.get("num_classes", 1000), "num_classes"),
                   stages=stages, width_step=step, ffn_ratio=check_int(d.get("ffn_ratio", 4), "ffn_ratio"),
                   attention=att, distillation=bool(d.get("distillation", False)),
                   in_chans=check_int(d.get("in_chans", 3), "in_chans"), name=str(d.get("name", name)))

    @classmethod
    def load(cls, path, base_dir=None) -> "SearchSpace":
        """A space from a .yaml file (relative to `base_dir` when given), or a shipped space by name."""
        path = resolve_space_path(path, base_dir)
        d = read_yaml(path, ArchError, "a search space .yaml")
        try:
            return cls.from_dict(d, name=os.path.splitext(os.path.basename(path))[0])
        except ArchError as e:
            raise ArchError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        return {"version": SPACE_VERSION, "name": self.name, "family": self.family, "input_size": self.input_size,
                "in_chans": self.in_chans, "num_classes": self.num_classes, "distillation": self.distillation,
                "width_step": self.width_step, "ffn_ratio": self.ffn_ratio, "attention": dict(self.attention),
                "stages": [{"max_depth": s.max_depth, "max_width": s.max_width, "min_width": s.min_width,
                            "candidates": list(s.candidates)} for s in self.stages]}

    # ------------------------------------------------------------ geometry
    def resolutions(self) -> List[int]:
        return [self.input_size // s for s in STAGE_STRIDES]

    def widths(self, stage: int) -> List[int]:
        s = self.stages[stage]
        return list(range(s.min_width, s.max_width + 1, self.width_step))

    # ------------------------------------------------------------ choices
    def largest_choice(self) -> dict:
        """Every position meta4d at full width: the network slimming starts from (before the
        supernet's importance turns positions into meta3d or identity)."""
        return {"widths": [s.max_width for s in self.stages],
                "blocks": [["meta4d" if "meta4d" in s.candidates else s.candidates[0]] * s.max_depth
                           for s in self.stages]}

    def check_choice(self, choice: Mapping) -> dict:
        if isinstance(choice, Mapping):
            extra = sorted(str(k) for k in choice if k not in ("widths", "blocks"))
            if extra:
                raise bad(f"choice.{extra[0]}", choice[extra[0]], "no other keys than widths and blocks (a typo?)")
        else:
            raise bad("choice", choice, '{"widths": [...], "blocks": [[...], ...]}')
        c = {"widths": list(req(choice, "widths", "choice")), "blocks": [list(b) for b in req(choice, "blocks", "choice")]}
        for part in ("widths", "blocks"):
            if len(c[part]) != len(self.stages):
                raise bad(f"choice.{part}", c[part], f"{len(self.stages)} entries, one per stage")
        for i, (w, bl, s) in enumerate(zip(c["widths"], c["blocks"], self.stages)):
            if not is_int(w) or w % self.width_step or not s.min_width <= w <= s.max_width:
                raise bad(f"choice.widths[{i}]", w, f"a multiple of {self.width_step} in [{s.min_width}, {s.max_width}]")
            if len(bl) != s.max_depth:
                raise bad(f"choice.blocks[{i}]", bl, f"{s.max_depth} positions")
            seen3d = False
            for j, t in enumerate(bl):
                if t not in s.candidates:
                    raise bad(f"choice.blocks[{i}][{j}]", t, "one of " + ", ".join(s.candidates))
                if t == "meta3d":
                    seen3d = True
                elif t == "meta4d" and seen3d:
                    raise bad(f"choice.blocks[{i}][{j}]", t, "meta3d or identity after a meta3d (3D blocks only after 4D ones)")
        return c

    def sample(self, rng: random.Random) -> dict:
        """A random valid choice: each stage's width uniform over its widths, each position's type uniform
        over the kinds its predecessors allow (no meta4d after a meta3d). Not uniform over whole valid
        choices: a stage's patterns with an early meta3d are likelier (in the L1 space's last stage, all
        meta3d 1/192 vs all meta4d 1/2187); the random-search baseline and table sampling use this."""
        widths, blocks = [], []
        for s in self.stages:
            widths.append(rng.choice(list(range(s.min_width, s.max_width + 1, self.width_step))))
            bl, seen3d = [], False
            for _ in range(s.max_depth):
                opts = [t for t in s.candidates if not (t == "meta4d" and seen3d)]
                t = rng.choice(opts)
                seen3d |= t == "meta3d"
                bl.append(t)
            blocks.append(bl)
        return {"widths": widths, "blocks": blocks}

    def to_arch(self, choice: Mapping) -> dict:
        """The standalone arch config (EfficientFormer family) of a choice."""
        c = self.check_choice(choice)
        stages = []
        for i, (w, bl) in enumerate(zip(c["widths"], c["blocks"])):
            blocks = []
            for t in bl:
                if t == "meta4d":
                    blocks.append({"type": "meta4d", "ffn_hidden": self.ffn_ratio * w})
                elif t == "meta3d":
                    blocks.append({"type": "meta3d", **self.attention, "ffn_hidden": self.ffn_ratio * w})
                else:
                    blocks.append({"type": "identity"})
            stages.append({"width": w, "downsample": None if i == 0 else {"type": "conv"}, "blocks": blocks})
        w0 = c["widths"][0]
        return validate({"version": 1, "family": self.family, "input_size": self.input_size, "in_chans": self.in_chans,
                         "num_classes": self.num_classes, "distillation": self.distillation,
                         "stem": {"widths": [w0 // 2, w0]}, "stages": stages})

    def choice_from_arch(self, arch: Mapping) -> dict:
        """Inverse of to_arch for an arch inside this space (identity positions are explicit)."""
        a = validate(arch)
        c = {"widths": [st["width"] for st in a["stages"]],
             "blocks": [[b["type"] for b in st["blocks"]] for st in a["stages"]]}
        c = self.check_choice(c)
        diff = _first_difference(a, validate(self.to_arch(c)))
        if diff:  # e.g. an ffn_hidden, class count or input size the space does not have
            path, got, want = diff
            raise ArchError(f"arch {path}: got {got!r}, expected {want!r} (the search space's value: the arch is "
                            "not inside this space)")
        return c


def _first_difference(a, b, path: str = ""):
    """(path, a's value, b's value) of the first leaf where two configs differ, or None."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


SPACES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spaces")  # shipped as package data


def yaml_names(folder: str) -> List[str]:
    """The NAMEs of the NAME.yaml files in a folder of shipped files (spaces, latency tables)."""
    try:
        return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".yaml") and not f.startswith("."))
    except OSError:
        return []


def shipped_file(folder: str, name) -> str:
    """folder/NAME.yaml for a bare name (with or without .yaml / .yml), or "" when `name` is a path or
    there is no such file."""
    name = os.fspath(name)
    if not name or os.path.basename(name) != name or name.startswith("."):  # a bare name, not a path
        return ""
    base = name[:-5] if name.endswith(".yaml") else name[:-4] if name.endswith(".yml") else name
    path = os.path.join(folder, base + ".yaml")
    return path if os.path.isfile(path) else ""


def shipped_spaces() -> List[str]:
    """Names of the search spaces shipped with vitslim (supernet/spaces/NAME.yaml)."""
    return yaml_names(SPACES_DIR)


def shipped_space_file(name) -> str:
    """The file of the shipped space `name` (with or without .yaml), or "" when there is none."""
    return shipped_file(SPACES_DIR, name)


def resolve_space_path(path, base_dir=None) -> str:
    """The file a space argument names: the path (relative to `base_dir` when given) when it exists, else the
    shipped space of that bare name (`tiny`, `tiny.yaml`); one line naming the shipped names when neither."""
    text = os.path.expanduser(os.fspath(path))
    cand = os.path.normpath(os.path.join(base_dir, text)) if base_dir else text
    if os.path.exists(cand):
        return cand
    shipped = shipped_space_file(text)
    if shipped:
        return shipped
    raise ArchError(f"{cand}: no such file, expected a search space .yaml or a shipped space name "
                    f"({', '.join(shipped_spaces()) or 'none installed'})")


def load_space(path_or_dict) -> SearchSpace:
    if isinstance(path_or_dict, SearchSpace):
        return copy.deepcopy(path_or_dict)
    if isinstance(path_or_dict, Mapping):
        return SearchSpace.from_dict(path_or_dict)
    return SearchSpace.load(path_or_dict)
