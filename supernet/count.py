"""Parameters and multiply-accumulates of a network, counted the way the papers' tables are:
parameters of the training graph (BN unfused), MACs = torch's FLOP counter / 2 over one image
(matmuls and convolutions, attention products included)."""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _macs(model: nn.Module, input_size: int, in_chans: int, device) -> int:
    x = torch.zeros(1, in_chans, input_size, input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        model.train(was_training)
    return int(fc.get_total_flops()) // 2


def count(model_or_arch: Union[nn.Module, Mapping], input_size: int | None = None) -> dict:
    """{"params": int, "macs": int} for a module or an arch config (one image, eval mode)."""
    from .arch import validate
    from .registry import get_family

    if isinstance(model_or_arch, nn.Module):
        model = model_or_arch
        arch = getattr(model, "arch", None) or {}
        size = input_size if input_size is not None else arch.get("input_size", 224)
        if arch:
            # MACs from the arch on the meta device: the same figure as count(arch), and it includes
            # attention products that fused CPU kernels hide from the FLOP counter. Some families
            # also fix grids by input size (attention bias tables, position embeddings), so another
            # size is a rebuild: params and MACs both of the network at that size, as count(arch, size).
            if size != arch.get("input_size", size):
                return count(dict(arch, input_size=size))
            return {"params": count_params(model), "macs": count(dict(arch, input_size=size))["macs"]}
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:  # an arch validates its own below
            from .errors import bad
            raise bad("input_size", size, "an integer >= 1")
        chans = arch.get("in_chans", 3)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        return {"params": count_params(model), "macs": _macs(model, size, chans, dev)}
    arch = dict(model_or_arch) if isinstance(model_or_arch, Mapping) else model_or_arch
    if input_size is not None and isinstance(arch, dict):  # 0 too: refused by validate, not the arch's size
        arch["input_size"] = input_size
    arch = validate(arch)
    size = arch["input_size"]
    fam = get_family(arch["family"])
    try:  # on the meta device nothing is allocated or computed: a preset counts in milliseconds
        with torch.device("meta"):
            model = fam.build(arch)
        return {"params": count_params(model), "macs": _macs(model, size, arch["in_chans"], "meta")}
    except (NotImplementedError, RuntimeError):
        model = fam.build(arch)
        return {"params": count_params(model), "macs": _macs(model, size, arch["in_chans"], "cpu")}


_CODE_FP: Optional[str] = None


def _code_fingerprint() -> str:
    """What a count depends on besides the arch: torch's version and the source of this package (the
    families' builders and this counter). Any edit, an upgrade, another checkout: another fingerprint."""
    global _CODE_FP
    if _CODE_FP is None:
        h = hashlib.sha256(f"torch {torch.__version__}\n".encode())
        root = os.path.dirname(os.path.abspath(__file__))
        for dirpath, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for fn in sorted(f for f in files if f.endswith(".py")):
                p = os.path.join(dirpath, fn)
                h.update(os.path.relpath(p, root).encode("utf-8", "surrogateescape") + b"\0")
                with open(p, "rb") as f:
                    h.update(f.read())
        _CODE_FP = h.hexdigest()
    return _CODE_FP


def count_cached(archs: Sequence[Mapping], progress: bool = False) -> List[dict]:
    """count(arch) of each arch, remembered in counts.json of vitslim's cache folder (`supernet.data.cache_dir`)
    under the normalised arch and `_code_fingerprint()`: listing the presets again costs no network build.
    A missing, damaged or unwritable cache only costs the counting. `progress`: a bar over the archs counted
    (on a terminal)."""
    from .arch import atomic_file, validate
    from .data import cache_dir
    from .runlock import remove_stale_temps
    base = cache_dir()
    path = os.path.join(base, "counts.json") if base else None
    fp = _code_fingerprint()
    entries = {}
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                c = json.load(f)
            if c.get("format") == "vitslim-counts" and c.get("version") == 1 and c.get("code") == fp \
                    and isinstance(c.get("entries"), dict):
                entries = c["entries"]
        except (OSError, ValueError, AttributeError):
            pass
    norm = [validate(dict(a)) for a in archs]
    keys = [hashlib.sha256(json.dumps(a, sort_keys=True, default=str).encode()).hexdigest()[:32] for a in norm]

    def known(hit):
        return isinstance(hit, dict) and isinstance(hit.get("params"), int) and isinstance(hit.get("macs"), int)
    todo = [(k, a) for k, a in zip(keys, norm) if not known(entries.get(k))]
    if todo:
        from tqdm import tqdm
        for k, a in tqdm(todo, desc="counting", unit="arch", leave=False, disable=None if progress else True):
            c = count(a)
            entries[k] = {"params": int(c["params"]), "macs": int(c["macs"])}
    new = bool(todo)
    out = [{"params": entries[k]["params"], "macs": entries[k]["macs"]} for k in keys]
    if path and new:
        try:
            os.makedirs(base, exist_ok=True)
            remove_stale_temps(base, "counts.json")
            with atomic_file(path) as f:  # entries of an older fingerprint are dropped with it
                json.dump({"format": "vitslim-counts", "version": 1, "code": fp, "entries": entries}, f)
        except OSError:
            pass
    return out
