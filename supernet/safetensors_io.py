"""The safetensors format (https://github.com/huggingface/safetensors), read and written without the
`safetensors` package: timm's weights on the Hugging Face Hub are `model.safetensors`, and the format
holds only tensors (no pickle, nothing to run), so a checked reader is short.

Layout: 8 bytes little-endian u64 N, then N bytes of UTF-8 JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}} (space-padded), then the data; offsets are
relative to the data, which the tensors cover with no hole and no overlap. Every field is checked
against the file before a byte of data is read (an untrusted file cannot make us read out of range);
errors are one line naming the file and what is wrong.

vitslim checkpoints may be written in this format too (`save_checkpoint(..., "x.safetensors")`): the
arch config rides in the metadata (`format`, `version`, `arch` as JSON), so the file loads back with
`load_checkpoint` and stays readable by any safetensors reader.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import warnings
from typing import Dict, Mapping, Optional, Tuple

import torch

from .errors import CheckpointError

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
          "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64, "F16": torch.float16,
          "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference implementation's limit
MAX_ELEMENTS = 2 ** 48
SUFFIX = ".safetensors"


def is_safetensors(path) -> bool:
    """The file starts like a safetensors file: a header length that fits the file, then '{'."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n <= min(MAX_HEADER, size - 8) and head[8:9] == b"{"


def _header(path: str, f, size: int) -> Tuple[dict, dict, int]:
    def bad(why):
        return CheckpointError(f"{path}: a damaged safetensors file ({why}), expected a complete .safetensors file")

    if size < 8:
        raise bad(f"{size} bytes, shorter than the 8-byte header length")
    n = struct.unpack("<Q", f.read(8))[0]
    if n > MAX_HEADER or 8 + n > size:
        raise bad(f"header length {n} does not fit a file of {size} bytes")
    raw = f.read(n)
    def no_repeats(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"a name appears twice: {k!r}")
            seen.add(k)
        return dict(pairs)

    try:
        hdr = json.loads(raw.decode("utf-8"), object_pairs_hook=no_repeats)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"header is not JSON: {str(e)[:60]}") from None
    if not isinstance(hdr, dict):
        raise bad(f"header is a JSON {type(hdr).__name__}, not an object")
    meta = hdr.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ is not a mapping of strings to strings")
    data_len = size - 8 - n
    spans = []
    for name, t in hdr.items():
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
        if not isinstance(t["dtype"], str) or t["dtype"] not in DTYPES:
            raise bad(f"tensor {name!r}: dtype {t['dtype']!r:.40}, expected one of {', '.join(DTYPES)}")
        shape, off = t["shape"], t["data_offsets"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r:.60}, expected a list of sizes >= 0")
        span = 1
        for d in shape:
            span *= max(d, 1)
        if span > MAX_ELEMENTS:  # a 0 in the shape lets any other size "fit" in no bytes: still unbuildable
            raise bad(f"tensor {name!r}: shape {shape!r:.60} is too large to build (over 2**48 elements)")
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off)
                and 0 <= off[0] <= off[1] <= data_len):
            raise bad(f"tensor {name!r}: data_offsets {off!r} outside the {data_len} bytes of data")
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=DTYPES[t["dtype"]]).element_size()
        if off[1] - off[0] != numel * itemsize:
            raise bad(f"tensor {name!r}: {off[1] - off[0]} bytes for shape {shape} of {t['dtype']}")
        spans.append((off[0], off[1], name))
    at = 0
    for b, e, name in sorted(spans):
        if b != at:
            raise bad(f"tensor {name!r} starts at byte {b} of the data, expected {at} (a hole or an overlap)")
        at = e
    if at != data_len:
        raise bad(f"the tensors end at byte {at} of {data_len} bytes of data")
    return hdr, meta, 8 + n


def read_safetensors(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; tensors are CPU copies, in the header's order."""
    if sys.byteorder != "little":
        raise CheckpointError(f"{path}: safetensors data is little-endian; this machine is not")
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        hdr, meta, start = _header(path, f, size)
        out: Dict[str, torch.Tensor] = {}
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > start else None
        try:
            for name, t in hdr.items():
                dtype, (b, e) = DTYPES[t["dtype"]], t["data_offsets"]
                if e == b:
                    out[name] = torch.empty(t["shape"], dtype=dtype)
                    continue
                with warnings.catch_warnings():  # read-only buffer: copied at once below
                    warnings.simplefilter("ignore")
                    raw = torch.frombuffer(mm, dtype=torch.uint8, count=e - b, offset=start + b)
                out[name] = raw.clone().view(dtype).reshape(t["shape"])
                del raw
        finally:
            if mm is not None:
                mm.close()
    return out, meta


def write_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write atomically (temp file + rename). Tensors are laid out widest dtype first (every tensor
    aligned to its element size, as the reference writer does), then by name."""
    path = os.fspath(path)
    items = []
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r}: expected a name -> tensor mapping")
        if v.dtype not in NAMES:
            raise CheckpointError(f"{path}: tensor {k!r} has dtype {v.dtype}, which safetensors cannot store")
        items.append((k, v.detach().cpu().contiguous()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    hdr: Dict[str, object] = {}
    if metadata:
        hdr["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    at = 0
    for k, v in items:
        nbytes = v.numel() * v.element_size()
        hdr[k] = {"dtype": NAMES[v.dtype], "shape": list(v.shape), "data_offsets": [at, at + nbytes]}
        at += nbytes
    text = json.dumps(hdr, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    from .arch import atomic_file
    with atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, v in items:
            if v.numel():
                f.write(v.reshape(-1).view(torch.uint8).numpy().tobytes())
