"""Reading and writing checkpoints: vitslim's one-file format, the official / timm layouts of
every family and Hugging Face transformers' ViT / DeiT / Swin (hf_layouts.py), with the architecture
read from tensor shapes."""
from __future__ import annotations

import json
import os
import pickle
import struct
import sys
import zipfile
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from . import hf_layouts
from .arch import validate
from .errors import ArchError, CheckpointError
from .layers import no_weight_init
from .registry import FAMILIES, _load_families, get_family
from .safetensors_io import SUFFIX as SAFETENSORS, is_safetensors, read_safetensors, write_safetensors

FORMAT = "vitslim-checkpoint"
VERSION = 1
_WRAPPERS = ("model", "state_dict", "model_ema", "module", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # key prefixes of DistributedDataParallel and torch.compile


def read_file(path) -> object:
    """torch.load with weights_only=True and errors that say what is wrong with the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file, expected a checkpoint (.pt/.pth/.safetensors)")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, expected a checkpoint")
    if path.endswith(SAFETENSORS) or is_safetensors(path):  # our reader, also for a damaged one: one-line errors
        return _from_safetensors(path)
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: a TorchScript archive (an export), expected a checkpoint with weights "
                              "(a vitslim model.pt, or an official / timm .pth)")
    try:
        _check_crcs(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:  # ours, already one line (it is a ValueError too: not the unpickler's below)
        raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported operand" in msg or "invalid load key" in msg:  # not a pickle at all (a text file, ...)
            raise CheckpointError(f"{path}: not a torch checkpoint ({_looks_like(path)}), expected a checkpoint "
                                  "(.pt/.pth/.safetensors)") from None
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise CheckpointError(f"{path}: needs pickle to load (it stores Python objects, not only tensors); "
                                  "refusing to run code from a file, expected a plain state dict") from None
        raise CheckpointError(f"{path}: not a readable torch file ({msg.splitlines()[0] if msg else 'unpickling failed'})") from None
    except (EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: truncated or corrupt ({type(e).__name__}), expected a complete torch checkpoint") from None
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first.split(". ")[0][:120]  # PyTorch's reader appends advice on its zip internals
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({first})") from None
    except (KeyError, IndexError, TypeError, ValueError, struct.error) as e:  # torch's weights-only unpickler on
        # bytes that are no pickle it knows (a short text file named .pt: KeyError 105)
        raise CheckpointError(f"{path}: not a torch checkpoint ({_looks_like(path)}; {type(e).__name__} while "
                              "unpickling), expected a checkpoint (.pt/.pth/.safetensors)") from None
    except OSError as e:  # e.g. a truncated zip: "[Errno 22] Invalid argument" from the reader's seek
        raise CheckpointError(f"{path}: truncated or unreadable ({e.strerror or e}), expected a complete torch "
                              "checkpoint") from None


MAX_ZIP_RATIO = 100  # torch.save stores members uncompressed (1x); a re-zipped file of weights packs to ~1.1x
ZIP_RATIO_FLOOR = 1 << 30  # below 1 GiB unpacked, any ratio: small files full of zeros are no threat


def _check_crcs(path: str) -> None:
    """torch.load does not check the CRC of a zip checkpoint's members: a flipped byte in a tensor loads as a
    wrong weight. Every member is read and checked here first (about 1 s per GB); legacy (non-zip) files pass.
    torch.load also inflates deflated members, each into one allocation of the size its header states: a file
    that unpacks to over MAX_ZIP_RATIO times its size (a zip bomb: 1 MB of zeros is 1 GB) is refused unread."""
    if not zipfile.is_zipfile(path):
        return
    with zipfile.ZipFile(path) as z:
        size, unpacked = os.path.getsize(path), sum(i.file_size for i in z.infolist())
        if unpacked > max(ZIP_RATIO_FLOOR, MAX_ZIP_RATIO * size):
            raise CheckpointError(f"{path}: a zip that unpacks to {unpacked:,} bytes from {size:,} (over {MAX_ZIP_RATIO}x, "
                                  "a zip bomb), expected a checkpoint as torch.save writes it (uncompressed)")
        bad = z.testzip()
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt (CRC mismatch in {bad}), expected an intact checkpoint: copy it again")


def _from_safetensors(path: str) -> object:
    """A plain state dict, or (a vitslim checkpoint written as .safetensors) the checkpoint dict."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != FORMAT:
        return tensors
    try:
        version, arch = int(meta.get("version", "")), json.loads(meta.get("arch", ""))
        extra = json.loads(meta["extra"]) if "extra" in meta else None
    except ValueError:
        raise CheckpointError(f"{path}: vitslim metadata (version, arch) unreadable, expected what "
                              "save_checkpoint writes") from None
    obj = {"format": FORMAT, "version": version, "arch": arch, "state_dict": tensors}
    if extra is not None:
        obj["extra"] = extra
    return obj


def _looks_like(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "unknown binary data"


def _is_torchscript(path: str) -> bool:
    """A TorchScript archive is a zip with code/ and constants.pkl beside data.pkl."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1] == "constants.pkl" for n in names) and any("/code/" in n for n in names)


def unwrap_state_dict(obj, path="checkpoint") -> Dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for k in _WRAPPERS:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: got {type(obj).__name__}, expected a state dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict: entries {', '.join(map(repr, bad[:3]))} are not name -> tensor")
    sd = dict(obj)
    # saved from a wrapped model: DistributedDataParallel ("module."), torch.compile ("_orig_mod."), or both
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            return sd
        sd = {k[len(prefix):]: v for k, v in sd.items()}


def check_fit(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming the first few missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    parts = []
    if missing:
        parts.append(f"missing keys {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} ({len(missing)} in all)")
    if unexpected:
        parts.append(f"unexpected keys {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)} in all)")
    if shapes:
        parts.append(f"wrong shapes {', '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''} (file vs expected)")
    if parts:
        raise CheckpointError(f"{where}: does not fit the architecture: " + "; ".join(parts))


def _check_shapes(arch: Mapping, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """check_fit against the arch built on the meta device (an arch that does not fit the tensors allocates
    nothing), on the CPU for a family that cannot build there."""
    fam = get_family(arch["family"])
    with no_weight_init():
        try:
            with torch.device("meta"):
                ref = fam.build(arch)
        except (NotImplementedError, RuntimeError):
            ref = fam.build(arch)
    check_fit(ref, sd, where)


def _build_loaded(arch: dict, sd: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    _check_shapes(arch, sd, where)
    with no_weight_init():  # every parameter comes from `sd` (strict)
        model = get_family(arch["family"]).build(arch)
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def load_checkpoint(path, arch: Optional[Mapping] = None) -> Tuple[nn.Module, dict]:
    """(model in eval mode, arch config) from a vitslim, official, timm or Hugging Face checkpoint file.

    `arch` (a validated arch config): the network a plain state dict holds, instead of the one its shapes suggest:
    what a bare `torch.save(model.state_dict())` of a pruned model (heads, attention scale) or of a ViT whose head
    count is not timm's 64 channels per head cannot tell. The shapes must fit it; a vitslim checkpoint must hold it."""
    import warnings
    path = os.fspath(path)
    given = validate(arch) if arch is not None else None
    obj = read_file(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        ver = obj.get("version")
        if ver != VERSION:
            raise CheckpointError(f"{path}: vitslim checkpoint version {ver!r}, expected {VERSION}")
        try:
            arch = validate(obj.get("arch"))
        except ArchError as e:
            raise CheckpointError(f"{path}: arch: {e}") from None
        if given is not None and given != arch:
            raise CheckpointError(f"{path}: a vitslim checkpoint holds its own arch, which differs from the one given; "
                                  "expected the same arch (or load it without one)")
        sd = unwrap_state_dict(obj.get("state_dict"), path)
        return _build_loaded(arch, sd, path), arch
    sd = unwrap_state_dict(obj, path)
    hints, where = None, path
    with warnings.catch_warnings():
        if given is not None:  # what the shapes cannot tell is given: no guess is used, none is warned about
            warnings.simplefilter("ignore")
        prefix = hf_layouts.hf_prefix(sd)
        if prefix is not None:  # Hugging Face transformers: re-keyed to the official / timm layout first
            sd, hints = hf_layouts.convert(sd, path)
            where = f"{path} (Hugging Face {prefix} re-keyed to the timm layout)"
        _load_families()
        for fam in FAMILIES.values():
            if fam.match_state_dict(sd):
                try:
                    arch, sd2 = fam.convert_state_dict(sd)
                    if hints:
                        arch = hf_layouts.apply_hints(arch, hints)
                    arch = validate(arch)
                except (ArchError, KeyError, IndexError, ValueError) as e:
                    if isinstance(e, CheckpointError):
                        raise
                    if given is not None and given["family"] == fam.name and prefix is None:
                        # what the shapes cannot describe, the arch given does: a pruned network whose first block
                        # lost both branches has no key of it (vitslim's own layout, loaded as it is)
                        return _build_loaded(given, sd, f"{where} with the arch given"), given
                    why = str(e)
                    if isinstance(e, KeyError) and len(e.args) == 1:  # str(KeyError) quotes: ('head.fc.weight')
                        why = str(e.args[0]) + ("" if " " in str(e.args[0]) else " missing")
                    raise CheckpointError(f"{path}: looks like a {fam.name} checkpoint but its shapes do not describe one ({why})") from None
                if given is not None:
                    if given["family"] != fam.name:
                        raise CheckpointError(f"{path}: a {fam.name} state dict, but the arch given is a "
                                              f"{given['family']} network; expected a {fam.name} arch")
                    return _build_loaded(given, sd2, f"{where} with the arch given"), given
                return _build_loaded(arch, sd2, where), arch
    for fam in FAMILIES.values():  # the core keys of a family, with keys it does not have
        extra = fam.unknown_keys(sd) if hasattr(fam, "unknown_keys") else []
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            raise CheckpointError(f"{path}: looks like a {fam.name} checkpoint, but has keys {fam.name} does not have: "
                                  f"{', '.join(extra[:3])}{more} (a variant vitslim does not build, e.g. DeiT III's "
                                  "LayerScale), expected a state dict of one of the supported families")
    keys = list(sd)[:4]
    raise CheckpointError(f"{path}: unrecognised checkpoint layout (first keys {', '.join(keys)}), expected a state dict "
                          f"of one of the supported families: {', '.join(sorted(FAMILIES))}")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside the wrappers a training script puts around it, whose state dicts prefix every key:
    DistributedDataParallel / DataParallel (`module.`) and torch.compile (`_orig_mod.`), in any nesting."""
    while True:
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(model: nn.Module, arch: Mapping, path, extra: Mapping | None = None) -> None:
    """One file: {"format", "version", "arch", "state_dict"}; written atomically. A path ending in
    .safetensors gets that format, the arch (and `extra`) as JSON in its metadata. A model wrapped by
    DistributedDataParallel or torch.compile is saved as the network inside (keys without their prefixes)."""
    arch = validate(arch)
    model = unwrap_model(model)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_shapes(arch, sd, f"save_checkpoint {os.fspath(path)}: the model")  # a file that would not load back
    obj = {"format": FORMAT, "version": VERSION, "arch": arch, "state_dict": sd}
    if extra:
        obj["extra"] = dict(extra)
    path = os.fspath(path)
    if path.endswith(SAFETENSORS):  # the arch in the metadata: loads back here, readable by any safetensors reader
        meta = {"format": FORMAT, "version": str(VERSION), "arch": json.dumps(arch, sort_keys=True)}
        if extra:
            meta["extra"] = json.dumps(obj["extra"], sort_keys=True, default=str)
        write_safetensors(obj["state_dict"], path, meta)
        return
    from .arch import atomic_file
    with atomic_file(path, "wb") as f:  # synced, then renamed; the temporary removed on any error or Ctrl-C
        torch.save(obj, f)
