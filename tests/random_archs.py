"""Seeded random archs of every family, and an independent MAC counter, for the randomized
differential tests (import as `random_archs`). Each generator draws widths the family's validation
accepts (a draw it refuses is drawn again); inputs are small so that a case builds in milliseconds."""
import copy
import math
import random

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import vitslim
from supernet.errors import VitslimError


def _deit(r):
    p = r.choice([4, 8])
    blocks = []
    for _ in range(r.randint(1, 3)):
        h = r.choice([0, 1, 2, 3])
        q = r.randint(1, 9) if h else 0
        b = {"type": "vit", "heads": h, "qk_dim": q, "v_dim": r.choice([q, r.randint(1, 9)]) if h else 0,
             "ffn_hidden": r.choice([0, 1, r.randint(1, 40)])}  # qk_dim == v_dim: the fused attention kernel
        if h and r.random() < 0.5:
            b["scale"] = r.uniform(0.05, 1.0)
        blocks.append(b)
    return {"family": "deit", "input_size": p * r.randint(2, 4), "in_chans": r.choice([1, 3]),
            "num_classes": r.randint(1, 12), "distillation": r.random() < 0.5, "stem": {"patch_size": p},
            "stages": [{"width": r.choice([8, 12, 16]), "blocks": blocks}]}


def _swin(r):
    stages = []
    for i in range(r.randint(1, 3)):
        blocks = []
        for _ in range(r.randint(1, 2)):
            h = r.choice([0, 1, 2, 3])
            b = {"type": "swin", "heads": h, "qk_dim": r.randint(1, 8) if h else 0, "v_dim": r.randint(1, 8) if h else 0,
                 "ffn_hidden": r.choice([0, r.randint(1, 32)])}
            if h and r.random() < 0.3:
                b["scale"] = r.uniform(0.1, 1.0)
            blocks.append(b)
        stages.append({"width": r.choice([8, 12, 16]), "window_size": r.choice([2, 3, 4, 5]), "blocks": blocks,
                       "downsample": None if i == 0 else {"type": "patch_merging"}})
    return {"family": "swin", "input_size": r.choice([16, 24, 32, 40]), "in_chans": 3, "num_classes": r.randint(1, 12),
            "stem": {"patch_size": r.choice([2, 4])}, "stages": stages}


def _efficientformer(r):
    from supernet.space import load_space
    sp = load_space("tiny")
    a = vitslim.resolve_arch(sp.to_arch(sp.sample(r)))
    a["input_size"] = r.choice([64, 96])
    for st in a["stages"]:
        for b in st["blocks"]:
            if "ffn_hidden" in b and r.random() < 0.5:
                b["ffn_hidden"] = r.randint(1, 3 * st["width"])
    return a


def _staged(r, preset):
    a = copy.deepcopy(vitslim.get_preset(preset))
    a["input_size"] = r.choice([64, 96])
    for st in a["stages"]:
        st["blocks"] = st["blocks"][:r.randint(1, min(2, len(st["blocks"])))]
        for b in st["blocks"]:
            b["ffn_hidden"] = r.randint(1, 2 * st["width"])
            if b["type"] == "cga":
                b["qk_dim"] = r.randint(1, 20)
                b["ffn2_hidden"] = r.randint(1, 2 * st["width"])
                b["kernels"] = [r.choice([1, 3, 5]) for _ in b["kernels"]]
                b["window_size"] = r.choice([3, 5, 7])
            elif b["type"] == "shsa":
                b["pdim"] = r.randint(1, st["width"])
                b["qk_dim"] = r.randint(1, 20)
        if st["downsample"]:
            for k in ("hidden", "se_hidden", "ffn_hidden", "ffn2_hidden"):
                st["downsample"][k] = r.randint(1, 2 * st["width"])
    return a


GENERATORS = {"deit": _deit, "swin": _swin, "efficientformer": _efficientformer,
              "efficientvit": lambda r: _staged(r, "efficientvit_m0"), "shvit": lambda r: _staged(r, "shvit_s1")}
FAMILIES = tuple(GENERATORS)


def random_arch(family, r: random.Random) -> dict:
    """A validated random arch of `family` drawn from `r`."""
    for _ in range(100):
        try:
            return vitslim.resolve_arch(GENERATORS[family](r))
        except VitslimError:
            continue
    raise AssertionError(f"no valid {family} arch in 100 draws")


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm, torch.mm,
            torch.Tensor.mm}


class MacCounter(TorchFunctionMode):
    """MACs of what runs under it, counted at the level of torch functions (not aten ops, as torch's FLOP
    counter does): Linear and Conv2d layers, matmuls, and scaled_dot_product_attention as its two products.
    Anything else that multiplies matrices is refused, so a new op cannot go uncounted."""

    def __init__(self):
        super().__init__()
        self.macs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            x, w = args[0], args[1]
            self.macs += x.numel() // x.shape[-1] * w.shape[0] * w.shape[1]
        elif func in (F.conv2d, torch.conv2d):
            w = args[1]
            self.macs += out.numel() * w.shape[1] * w.shape[2] * w.shape[3]
        elif func in _MATMULS:
            self.macs += out.numel() * args[0].shape[-1]
        elif func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            self.macs += math.prod(q.shape[:-2]) * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        elif func in (torch.einsum, torch.addmm, torch.baddbmm, torch.addbmm, F.conv1d, F.conv3d, F.conv_transpose2d,
                      F.bilinear):
            raise AssertionError(f"MacCounter: {func} is not counted")
        return out


def reference_macs(model, input_size, in_chans=3) -> int:
    """MACs of one image through `model` (eval mode) by MacCounter, on the CPU with real tensors."""
    model.eval()
    with torch.no_grad(), MacCounter() as c:
        model(torch.randn(1, in_chans, input_size, input_size))
    return c.macs
