"""Model families and presets register here by name; everything else looks them up here.

A family is one class (see `Family`): adding one is a new file in `supernet/families/`, not a
new `if` anywhere else.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Mapping, Tuple

import torch
import torch.nn as nn

from .errors import ArchError

FAMILIES: Dict[str, "Family"] = {}
PRESETS: Dict[str, Callable[[], dict]] = {}


class Family:
    """What a model family supplies. Subclass, fill in, then `register_family(MyFamily())`.

    - `validate(arch)`: family-specific checks on a config whose common keys are already checked
      (supernet.arch.validate); returns the config with the family's defaults filled in.
    - `build(arch)`: the nn.Module for a validated config. The module has `forward_features`,
      `forward_head` and `forward`, and keeps the config it was built from in `.arch`.
    - `match_state_dict(sd)`: True when `sd` (already unwrapped from {"model": ...}) is in one of
      the layouts this family reads (official repository, timm, vitslim's own).
    - `convert_state_dict(sd)`: (arch, state_dict in the layout of `build(arch)`), with the
      architecture read from tensor shapes alone.
    """

    name: str = ""
    block_types: Tuple[str, ...] = ()
    default_input_size: int = 224
    paper: str = ""

    def validate(self, arch: dict) -> dict:
        raise NotImplementedError

    def build(self, arch: dict) -> nn.Module:
        raise NotImplementedError

    def match_state_dict(self, sd: Mapping[str, torch.Tensor]) -> bool:
        return False

    def convert_state_dict(self, sd: Mapping[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
        raise NotImplementedError

    def stage_summary(self, arch: dict):
        """Rows for `vitslim info`: one dict per stage (override for something richer)."""
        rows = []
        for i, st in enumerate(arch["stages"]):
            kinds = {}
            for b in st["blocks"]:
                kinds[b["type"]] = kinds.get(b["type"], 0) + 1
            rows.append({"stage": i, "width": st["width"], "blocks": ", ".join(f"{n}x {k}" for k, n in kinds.items()) or "-"})
        return rows


def register_family(fam: Family) -> Family:
    if not fam.name:
        raise ValueError("a Family needs a name")
    FAMILIES[fam.name] = fam
    return fam


def get_family(name) -> Family:
    _load_families()
    if name not in FAMILIES:
        raise ArchError(f"family: got {name!r}, expected one of {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def register_preset(name: str):
    """Decorator for a function returning a preset's arch config (a plain dict)."""
    def deco(fn: Callable[[], dict]):
        PRESETS[name] = fn
        return fn
    return deco


def preset_names():
    _load_families()
    return sorted(PRESETS)


def get_preset(name: str) -> dict:
    _load_families()
    if name not in PRESETS:
        import difflib
        near = difflib.get_close_matches(str(name), PRESETS, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ArchError(f"preset: got {name!r}, expected one of {', '.join(sorted(PRESETS))}{hint}")
    return copy.deepcopy(PRESETS[name]())


def _load_families():
    # Importing the package registers every family and preset exactly once.
    from . import families  # noqa: F401
