"""Training data for the supernet, the search and the pruner: a procedural dataset whose classes
need shape and layout (SyntheticShapes), an ImageFolder read with PIL (no torchvision), and a
loader whose order is a pure function of (seed, step) so that a resumed run sees the same batches.

Every random choice a sample needs (what to draw, the crop, the flip) comes from a generator
seeded by (seed, split, epoch, index), never from a global RNG: a sample is the same in any
worker, on any rank, before or after a resume.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import VitslimError


class DataError(VitslimError, ValueError):
    """A data source that cannot feed training: no images, nothing readable, a bad option."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_SPLITS = {"train": 0, "heldout": 1}


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def _to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, C) float in [0, 1] -> normalised (C, H, W) float32."""
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (x - m) / s


# ---------------------------------------------------------------- synthetic shapes
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
# Pairs are visited so that every shape appears early: 10 classes already use all six shapes.
_PAIR_ORDER = ((0, 1), (2, 3), (4, 5), (0, 2), (1, 3), (2, 4), (3, 5), (0, 4), (1, 5), (0, 3),
               (1, 4), (2, 5), (0, 5), (1, 2), (3, 4))


def synthetic_classes(num_classes: int) -> List[Tuple[str, str, str]]:
    """(first shape, second shape, layout) of each class; layout 'h' = first left of second,
    'v' = first above second. Each pair of shapes gives four classes that differ only in order
    and orientation, so no class can be told apart by which shapes are present alone."""
    out = []
    for a, b in _PAIR_ORDER:
        for lay in ("h", "v"):
            out.append((SHAPES[a], SHAPES[b], lay))
            out.append((SHAPES[b], SHAPES[a], lay))
    if not 2 <= num_classes <= len(out):
        raise DataError(f"data.num_classes: got {num_classes}, expected 2..{len(out)} for the synthetic dataset")
    return out[:num_classes]


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Soft mask (0..1) of a shape of radius r centred at the origin of the (u, v) frame."""
    if kind == "circle":
        d = np.hypot(u, v) - r
    elif kind == "square":
        d = np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    elif kind == "diamond":
        d = (np.abs(u) + np.abs(v)) / math.sqrt(2) - 0.72 * r
    elif kind == "ring":
        d = np.abs(np.hypot(u, v) - 0.75 * r) - 0.25 * r
    elif kind == "cross":
        arm = 0.3 * r
        d = np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - r))
    elif kind == "triangle":  # pointing up, in image coordinates (v grows downwards)
        k = math.sqrt(3)
        d = np.maximum(np.maximum((k * u - v) / 2, (-k * u - v) / 2), v) - 0.5 * r
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)
    return np.clip(0.5 - d, 0.0, 1.0)  # one pixel of anti-aliasing


class SyntheticShapes(Dataset):
    """Two shapes on a cluttered background; the class is (which shape, which shape, left-right or
    top-bottom order). Colours, sizes, positions, small rotations, the background and distractor
    dots are random and carry no class information: a model has to see shapes and where they sit
    relative to each other (a left-right flip changes the class, so no flip augmentation).

    `length` samples per split, fixed (like a real dataset, repeated each epoch); sample i of a
    split is a pure function of (seed, split, i).
    """

    def __init__(self, num_classes: int = 10, image_size: int = 64, length: int = 20000, split: str = "train",
                 seed: int = 0, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25),
                 distractors: int = 2):
        if split not in _SPLITS:
            raise DataError(f"split: got {split!r}, expected one of {', '.join(_SPLITS)}")
        if image_size < 16:
            raise DataError(f"data.image_size: got {image_size}, expected >= 16")
        self.classes = synthetic_classes(num_classes)
        self.num_classes, self.image_size, self.length = num_classes, image_size, int(length)
        self.split, self.seed, self.mean, self.std, self.distractors = split, seed, tuple(mean), tuple(std), distractors
        s = image_size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        self._xx, self._yy = xx + 0.5, yy + 0.5

    def __len__(self) -> int:
        return self.length

    def label(self, index: int) -> int:
        return int(index % self.num_classes)

    def render(self, index: int) -> np.ndarray:
        """The image (H, W, 3) in [0, 1] of sample `index` (any int; taken modulo the length)."""
        i = int(index) % self.length
        rng = _rng(self.seed, _SPLITS[self.split], i, 0x5EED)
        a, b, lay = self.classes[self.label(i)]
        s, xx, yy = self.image_size, self._xx, self._yy
        # background: a random linear gradient between two random colours, plus pixel noise
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        ang = rng.uniform(0, 2 * math.pi)
        t = ((xx * math.cos(ang) + yy * math.sin(ang)) / s + 1) / 2
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        img = img + rng.normal(0, rng.uniform(0.01, 0.05), img.shape)
        # two objects, the first left of (or above) the second, far enough apart not to touch
        r = rng.uniform(0.12, 0.2, 2) * s
        for _ in range(20):
            p1 = rng.uniform(r[0], s - r[0], 2)
            p2 = rng.uniform(r[1], s - r[1], 2)
            along, across = (0, 1) if lay == "h" else (1, 0)
            gap = p2[along] - p1[along]
            if gap > r[0] + r[1] + 1 and abs(p2[across] - p1[across]) < 0.6 * gap:
                break
        else:  # a layout that always fits: on the diagonal-free midline
            m = s / 2
            p1 = np.array([m, m], dtype=float)
            p2 = p1.copy()
            along = 0 if lay == "h" else 1
            p1[along], p2[along] = r[0] + 0.5, s - r[1] - 0.5
        # dots first, so that an object drawn later hides a dot rather than the other way round
        for _ in range(int(rng.integers(0, self.distractors + 1))):
            pd, rd = rng.uniform(0, s, 2), rng.uniform(0.03, 0.06) * s
            mask = np.clip(rd + 0.5 - np.hypot(xx - pd[0], yy - pd[1]), 0, 1)[..., None]
            img = img * (1 - mask) + rng.uniform(0, 1, 3) * mask
        for kind, p, rad in ((a, p1, r[0]), (b, p2, r[1])):
            th = rng.uniform(-0.26, 0.26)  # +-15 degrees: a rotated square never looks like a diamond
            u = (xx - p[0]) * math.cos(th) + (yy - p[1]) * math.sin(th)
            v = -(xx - p[0]) * math.sin(th) + (yy - p[1]) * math.cos(th)
            mask = _shape_mask(kind, u, v, rad)[..., None]
            img = img * (1 - mask) + self._contrasting(rng, img[int(p[1]), int(p[0])]) * mask
        return np.clip(img, 0, 1).astype(np.float32)

    @staticmethod
    def _contrasting(rng: np.random.Generator, bg: np.ndarray) -> np.ndarray:
        """A random colour that stands out from the background under the object (luminance
        difference about 0.3 or more): the shape must be visible, its colour must not matter."""
        lum = np.array([0.299, 0.587, 0.114])
        c = rng.uniform(0, 1, 3)
        bl, cl = float(bg @ lum), float(c @ lum)
        if abs(cl - bl) < 0.3:
            c = np.clip(c + ((bl + 0.3) if bl < 0.5 else (bl - 0.3)) - cl, 0, 1)
        return c

    def __getitem__(self, index: int):
        return _to_tensor(self.render(index), self.mean, self.std), self.label(int(index) % self.length)


# ---------------------------------------------------------------- image folder
def _pil():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    return Image


SCAN_CACHE_ENV = "VITSLIM_CACHE_DIR"


def cache_dir() -> Optional[str]:
    """vitslim's cache folder: $VITSLIM_CACHE_DIR (empty: no cache, None returned), else $XDG_CACHE_HOME/vitslim,
    else ~/.cache/vitslim. Only what can be recomputed lives there (a damaged or missing cache costs time)."""
    base = os.environ.get(SCAN_CACHE_ENV)
    if base is None:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "vitslim")
    return base or None


def scan_cache_path(root: str) -> Optional[str]:
    """Where the header checks of image folder `root` are remembered: $VITSLIM_CACHE_DIR (empty: off), else
    $XDG_CACHE_HOME/vitslim, else ~/.cache/vitslim; under scans/, one file per folder (its real path)."""
    import hashlib
    base = cache_dir()
    if not base:
        return None
    key = hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(base, "scans", f"{key}.json")


def _read_scan_cache(path: Optional[str], root: str) -> Dict[str, dict]:
    """{folder relative to root: {"fp": fingerprint, "bad": {file: error}}}; empty when there is none or it is
    not ours (a damaged cache only costs the header checks again)."""
    import json
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        if c.get("format") == "vitslim-scan" and c.get("version") == 1 and c.get("root") == os.path.realpath(root) \
                and isinstance(c.get("dirs"), dict):
            return c["dirs"]
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def _write_scan_cache(path: Optional[str], root: str, dirs: Dict[str, dict]) -> None:
    import json

    from .arch import atomic_file
    from .runlock import remove_stale_temps
    if not path:
        return
    try:
        remove_stale_temps(os.path.dirname(path), os.path.basename(path))
        with atomic_file(path) as f:
            json.dump({"format": "vitslim-scan", "version": 1, "root": os.path.realpath(root), "dirs": dirs}, f)
    except OSError:  # a read-only home or cache: the next scan checks the headers again, nothing else is lost
        pass


def _fingerprint(dirpath: str, files: Sequence[str]) -> Optional[str]:
    """The names, sizes and modification times of a folder's image files: equal fingerprints, same headers."""
    import hashlib
    h = hashlib.sha256()
    for fn in files:
        try:
            st = os.stat(os.path.join(dirpath, fn))
        except OSError:
            return None  # gone while scanning: check this folder's headers
        h.update(f"{fn}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def scan_image_folder(root: str, verify: bool = True, progress: bool = False,
                      cache: bool = True) -> Tuple[List[str], List[Tuple[str, int]], int]:
    """(class names, [(path, label)], number of files skipped) of root/<class>/**/<image>.

    With `verify`, each file's header is opened with PIL (cheap: no decoding) and files that do
    not open are skipped with one warning giving the count. Raises DataError when nothing is left.
    With `cache` (and `verify`), the outcome is remembered per folder under `scan_cache_path(root)`,
    keyed by its image files' names, sizes and modification times: a later scan of an unchanged
    folder (a resumed run, the search after training, ImageNet's 1.28M headers) opens no file, a
    changed folder is checked again.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"data directory {root}: no such directory, expected root/<class>/<images>")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not _junk(d))
    if not classes:
        raise DataError(f"data directory {root}: no class sub-directories, expected root/<class>/<images>")
    Image = _pil()
    from tqdm import tqdm
    cache_path = scan_cache_path(root) if (cache and verify) else None
    known = _read_scan_cache(cache_path, root)
    dirs: Dict[str, dict] = {}
    bar = tqdm(desc=f"scanning {root}", unit=" files", disable=not progress, leave=False)  # ImageNet: minutes
    samples, skipped, first_bad, empty = [], 0, None, []
    # links are followed (a class folder may link to images elsewhere), but a linked folder that leads back
    # into the data, to the root, another class or a folder this class already walked (a loop), is not:
    # it would list other classes' images under this one, or the same images again until ELOOP
    reserved = {_dir_id(root)} | {_dir_id(os.path.join(root, c)) for c in classes}
    looped: List[str] = []
    try:
        for label, c in enumerate(classes):
            n0 = len(samples)
            seen = {_dir_id(os.path.join(root, c))}
            for dirpath, dirnames, files in os.walk(os.path.join(root, c), followlinks=True):
                keep = []
                for d in sorted(d for d in dirnames if not _junk(d)):
                    full = os.path.join(dirpath, d)
                    i = _dir_id(full)
                    if i is None or i in seen or (i in reserved and os.path.islink(full)):
                        looped.append(full)
                        continue
                    seen.add(i)
                    keep.append(d)
                dirnames[:] = keep
                images = [fn for fn in sorted(files) if not _junk(fn) and fn.lower().endswith(IMAGE_EXTENSIONS)]
                bad: Optional[Dict[str, str]] = None
                if verify:
                    rel = os.path.relpath(dirpath, root)
                    fp = _fingerprint(dirpath, images) if cache_path else None
                    hit = known.get(rel)
                    if fp is not None and isinstance(hit, dict) and hit.get("fp") == fp and isinstance(hit.get("bad"), dict):
                        bad = {str(k): str(v) for k, v in hit["bad"].items()}
                        bar.update(len(images))
                    else:
                        bad = {}
                        for fn in images:
                            bar.update(1)
                            try:
                                with Image.open(os.path.join(dirpath, fn)) as im:
                                    im.verify()
                            except Exception as e:  # PIL raises many types for a bad file
                                bad[fn] = type(e).__name__
                    if fp is not None:
                        dirs[rel] = {"fp": fp, "bad": bad}
                if not verify:
                    bar.update(len(images))
                for fn in images:
                    p = os.path.join(dirpath, fn)
                    if bad and fn in bad:
                        skipped += 1
                        first_bad = first_bad or f"{p} ({bad[fn]})"
                        continue
                    samples.append((p, label))
            if len(samples) == n0:
                empty.append(c)
    finally:
        bar.close()  # also when interrupted (a notebook holding the traceback kept it open)
    if cache_path and dirs != known:
        _write_scan_cache(cache_path, root, dirs)
    if looped:
        warnings.warn(f"data directory {root}: skipped {len(looped)} linked folder(s) leading back into the data "
                      f"(a loop, or another class's folder), e.g. {looped[0]}", stacklevel=2)
    if skipped:
        warnings.warn(f"data directory {root}: skipped {skipped} unreadable image file(s), e.g. {first_bad}; "
                      f"{len(samples)} remain", stacklevel=2)
    if not samples:
        what = f"all {skipped} image files are unreadable" if skipped else \
            f"no image files ({', '.join(IMAGE_EXTENSIONS[:4])}, ...) under its class directories"
        raise DataError(f"data directory {root}: {what}, expected at least one readable image")
    if empty:  # every sub-directory is a class: an empty one would shift the labels after it
        has = "directory has" if len(empty) == 1 else "directories have"
        raise DataError(f"data directory {root}: {len(empty)} class {has} "
                        f"no readable image ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}), expected "
                        "images in every sub-directory (each is a class): remove or fill them")
    return classes, samples, skipped


def _dir_id(path: str):
    """(device, inode) of the folder `path` leads to, None when it cannot be reached (a dangling link, ELOOP)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _junk(name: str) -> bool:
    """Hidden files and folders (.DS_Store, AppleDouble ._x.jpg, .ipynb_checkpoints) and the __MACOSX folder
    of archives made on a Mac: never classes or images."""
    return name.startswith(".") or name == "__MACOSX"


def _convert(im, mode: str):
    """`im` in `mode` (L, RGB or RGBA) with 8 bits per channel. PIL's own convert() clips 16- and 32-bit
    greyscale (I;16, I) at 255 and floats (F) likewise, so those are rescaled first: I;16 from 16 bits, I
    from the smallest of 8, 16 or 31 bits that holds its values, F from [0, 1] (or [0, 255] beyond 1)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        Image = _pil()
        a = np.asarray(im, dtype=np.float64)
        top = a.max(initial=0.0)
        if im.mode.startswith("I;16"):
            a = a * (255.0 / 65535.0)
        elif im.mode == "I":
            a = a * (255.0 / next(t for t in (255.0, 65535.0, 2.0 ** 31 - 1) if top <= t))
        elif top <= 1.0:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im if im.mode == mode else im.convert(mode)


_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class ImageFolder(Dataset):
    """root/<class>/<image> decoded with PIL. Train: random-resized crop and horizontal flip drawn
    from (seed, epoch, index); eval: resize to image_size / crop_pct, centre crop (DeiT/timm's
    eval transform). A file that fails to decode later (truncated data past the header) is
    replaced by the next sample and counted in `self.decode_failures`.

    Indices past len() address later epochs (index = epoch * len + i): the loader below uses that
    to give each epoch its own augmentation without any state in the dataset.
    """
    class_ordered = True  # samples are listed class by class: a prefix holds the first classes only

    def __init__(self, root: str, image_size: int = 224, train: bool = True, seed: int = 0,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 scale: Tuple[float, float] = (0.08, 1.0), hflip: bool = True, crop_pct: float = 0.875,
                 verify: bool = True, samples: Optional[List[Tuple[str, int]]] = None,
                 classes: Optional[List[str]] = None, in_chans: int = 3):
        self.root = os.fspath(root)
        if in_chans not in _PIL_MODES:
            raise DataError(f"in_chans: got {in_chans!r}, expected one of {', '.join(map(str, _PIL_MODES))} "
                            "(grey, RGB, RGBA images)")
        self.mode = _PIL_MODES[in_chans]
        if in_chans != 3 and tuple(mean) == tuple(IMAGENET_MEAN):  # ImageNet's statistics, per channel count
            mean = (sum(IMAGENET_MEAN) / 3,) * in_chans if in_chans == 1 else tuple(IMAGENET_MEAN) + (0.5,)
            std = (sum(IMAGENET_STD) / 3,) * in_chans if in_chans == 1 else tuple(IMAGENET_STD) + (0.5,)
        if samples is None:
            classes, samples, self.skipped = scan_image_folder(self.root, verify=verify)
        else:
            self.skipped = 0
        self.classes, self.samples = list(classes or []), list(samples)
        self.num_classes = len(self.classes)
        self.image_size, self.train, self.seed = image_size, train, seed
        self.mean, self.std, self.scale, self.hflip, self.crop_pct = tuple(mean), tuple(std), tuple(scale), hflip, crop_pct
        self.decode_failures = 0

    def __len__(self) -> int:
        return len(self.samples)

    def _crop_box(self, w: int, h: int, rng: np.random.Generator):
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            logr = rng.uniform(math.log(3 / 4), math.log(4 / 3))
            ratio = math.exp(logr)
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return (x0, y0, x0 + cw, y0 + ch)
        c = min(w, h)  # fall back to a centre square
        return ((w - c) // 2, (h - c) // 2, (w - c) // 2 + c, (h - c) // 2 + c)

    def load(self, index: int) -> Tuple[np.ndarray, int]:
        Image = _pil()
        n = len(self.samples)
        epoch, i = divmod(int(index), n)
        for attempt in range(min(n, 16)):
            path, label = self.samples[(i + attempt) % n]
            try:
                with Image.open(path) as im:
                    im = _convert(im, self.mode)
                    w, h = im.size
                    s = self.image_size
                    if self.train:
                        rng = _rng(self.seed, epoch, (i + attempt) % n, 0xC0FFEE)
                        box = self._crop_box(w, h, rng)
                        im = im.resize((s, s), Image.BILINEAR, box=box)
                        if self.hflip and rng.uniform() < 0.5:
                            im = im.transpose(Image.FLIP_LEFT_RIGHT)
                    else:
                        short = int(math.floor(s / self.crop_pct))
                        scale = short / min(w, h)
                        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
                        im = im.resize((nw, nh), Image.BILINEAR)
                        x0, y0 = (nw - s) // 2, (nh - s) // 2
                        im = im.crop((x0, y0, x0 + s, y0 + s))
                    arr = np.asarray(im, dtype=np.float32) / 255.0
                    if arr.ndim == 2:
                        arr = arr[:, :, None]
                return arr, label
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # the bomb: over PIL's pixel limit
                self.decode_failures += 1
                if self.decode_failures in (1, 10, 100, 1000):
                    warnings.warn(f"{path}: could not be decoded, used the next image instead "
                                  f"({self.decode_failures} such file(s) so far)", stacklevel=2)
        raise DataError(f"data directory {self.root}: {min(n, 16)} images in a row could not be decoded")

    def __getitem__(self, index: int):
        arr, label = self.load(index)
        return _to_tensor(arr, self.mean, self.std), label


# ---------------------------------------------------------------- config and factory
@dataclass
class DataConfig:
    """The `data:` section of a training config (see supernet/train.py)."""
    type: str = "synthetic"                  # synthetic | imagefolder
    image_size: Optional[int] = None         # default: the search space's input_size
    num_classes: Optional[int] = None        # default: the search space's num_classes
    mean: Optional[List[float]] = None       # default: 0.5 (synthetic) / ImageNet's
    std: Optional[List[float]] = None
    workers: int = 0
    # synthetic
    train_size: int = 20000
    heldout_size: int = 1000
    distractors: int = 2
    # imagefolder
    train_dir: Optional[str] = None
    val_dir: Optional[str] = None            # held-out images; without it val_fraction of train_dir
    val_fraction: float = 0.0
    verify: bool = True                      # open every header at start (skip the unreadable)
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    crop_pct: float = 0.875

    KEYS = ("type", "image_size", "num_classes", "mean", "std", "workers", "train_size", "heldout_size",
            "distractors", "train_dir", "val_dir", "val_fraction", "verify", "scale", "hflip", "crop_pct")

    @classmethod
    def from_dict(cls, d: Mapping, base_dir: str = ".", path: str = "data") -> "DataConfig":
        if not isinstance(d, Mapping):
            raise DataError(f"{path}: got {d!r}, expected a mapping")
        for k in d:
            if k not in cls.KEYS:
                raise DataError(f"{path}.{k}: unknown key, expected one of {', '.join(cls.KEYS)}")
        c = cls(**dict(d))
        if c.type not in ("synthetic", "imagefolder"):
            raise DataError(f"{path}.type: got {c.type!r}, expected 'synthetic' or 'imagefolder'")
        for k in ("train_dir", "val_dir"):
            v = getattr(c, k)
            if v is not None:
                setattr(c, k, os.path.normpath(os.path.join(base_dir, os.path.expanduser(str(v)))))
        if c.type == "imagefolder" and not c.train_dir:
            raise DataError(f"{path}.train_dir: missing, expected a directory root/<class>/<images> for type imagefolder")
        for k, lo in (("train_size", 1), ("heldout_size", 1), ("distractors", 0), ("image_size", 16), ("num_classes", 2)):
            v = getattr(c, k)
            if v is None and k in ("image_size", "num_classes"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise DataError(f"{path}.{k}: got {v!r}, expected an integer >= {lo}")
        if not isinstance(c.workers, int) or c.workers < 0:
            raise DataError(f"{path}.workers: got {c.workers!r}, expected an integer >= 0")
        if not _is_num(c.val_fraction) or not 0 <= float(c.val_fraction) < 1:
            raise DataError(f"{path}.val_fraction: got {c.val_fraction!r}, expected a number in [0, 1)")
        for k in ("mean", "std"):
            v = getattr(c, k)
            if v is not None and (not isinstance(v, (list, tuple)) or len(v) != 3 or not all(map(_is_num, v))
                                  or (k == "std" and min(v) <= 0)):
                raise DataError(f"{path}.{k}: got {v!r}, expected a list of 3 numbers" + (" > 0" if k == "std" else ""))
        sc = c.scale
        if not (isinstance(sc, (list, tuple)) and len(sc) == 2 and all(map(_is_num, sc)) and 0 < sc[0] <= sc[1] <= 1):
            raise DataError(f"{path}.scale: got {sc!r}, expected [low, high] with 0 < low <= high <= 1 (the area "
                            "fraction of a random-resized crop)")
        if not (_is_num(c.crop_pct) and 0 < c.crop_pct <= 1):
            raise DataError(f"{path}.crop_pct: got {c.crop_pct!r}, expected a number in (0, 1] (0.875: DeiT's eval crop)")
        for k in ("hflip", "verify"):
            if not isinstance(getattr(c, k), bool):
                raise DataError(f"{path}.{k}: got {getattr(c, k)!r}, expected true or false")
        return c

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def build_datasets(cfg: DataConfig, image_size: int, num_classes: int, seed: int = 0,
                   progress: bool = False) -> Tuple[Dataset, Dataset]:
    """(train, held-out) datasets for a data config; image size and classes default to the caller's
    (the search space's) when the config leaves them out. `progress`: a bar while image folders are scanned."""
    size = cfg.image_size or image_size
    if cfg.type == "synthetic":
        n = cfg.num_classes or num_classes
        kw = dict(num_classes=n, image_size=size, seed=seed, distractors=cfg.distractors,
                  mean=cfg.mean or (0.5, 0.5, 0.5), std=cfg.std or (0.25, 0.25, 0.25))
        return (SyntheticShapes(length=cfg.train_size, split="train", **kw),
                SyntheticShapes(length=cfg.heldout_size, split="heldout", **kw))
    kw = dict(image_size=size, seed=seed, mean=cfg.mean or IMAGENET_MEAN, std=cfg.std or IMAGENET_STD)
    classes, samples, _ = scan_image_folder(cfg.train_dir, verify=cfg.verify, progress=progress)
    if cfg.val_dir:
        vclasses, vsamples, _ = scan_image_folder(cfg.val_dir, verify=cfg.verify, progress=progress)
        if vclasses != classes:
            extra = sorted(set(vclasses) ^ set(classes))[:3]
            raise DataError(f"data.val_dir {cfg.val_dir}: its classes differ from train_dir's (e.g. {', '.join(extra)})")
    elif cfg.val_fraction > 0:
        perm = _rng(seed, 0xDA7A).permutation(len(samples))
        k = max(1, int(round(cfg.val_fraction * len(samples))))
        if k >= len(samples):
            raise DataError(f"data.val_fraction: got {cfg.val_fraction}, leaves no training image of {len(samples)}")
        held = set(perm[:k].tolist())
        vsamples = [s for j, s in enumerate(samples) if j in held]
        samples = [s for j, s in enumerate(samples) if j not in held]
    else:
        vsamples = []
    want = cfg.num_classes or num_classes
    if len(classes) != want:
        raise DataError(f"data.train_dir {cfg.train_dir}: has {len(classes)} classes, expected {want} "
                        f"(the search space's num_classes; set the space's num_classes to {len(classes)})")
    train = ImageFolder(cfg.train_dir, train=True, samples=samples, classes=classes, scale=tuple(cfg.scale),
                        hflip=cfg.hflip, crop_pct=cfg.crop_pct, **kw)
    held = ImageFolder(cfg.val_dir or cfg.train_dir, train=False, samples=vsamples, classes=classes,
                       crop_pct=cfg.crop_pct, **kw)
    return train, held


# ---------------------------------------------------------------- loader
class StepBatchSampler(Sampler):
    """Yields, for steps start..steps-1, this rank's part of the global batch of each step.

    The global batch of step t is positions [t*B, (t+1)*B) of the infinite sequence
    perm(epoch 0) ++ perm(epoch 1) ++ ..., perm(e) a permutation of the dataset drawn from
    (seed, e); indices are returned as e * len + i so that the dataset can draw the epoch's
    augmentation. Rank r of R takes the r-th contiguous slice of B / R. Nothing depends on how
    many steps ran before: starting at step t is the resume.
    """

    def __init__(self, length: int, batch_size: int, steps: int, seed: int = 0, start: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if batch_size % world_size:
            raise DataError(f"batch_size: got {batch_size}, expected a multiple of the number of processes ({world_size})")
        self.n, self.B, self.steps, self.seed, self.start = length, batch_size, steps, seed, start
        self.rank, self.world, self.shuffle = rank, world_size, shuffle
        self._perm_cache: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perm_cache.get(epoch)
        if p is None:
            p = _rng(self.seed, epoch, 0x0DE7).permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_cache = {epoch: p}  # consecutive steps touch at most two epochs
        return p

    def global_batch(self, step: int) -> List[int]:
        out, pos = [], step * self.B
        while len(out) < self.B:
            e, k = divmod(pos, self.n)
            take = min(self.B - len(out), self.n - k)
            perm = self._perm(e)
            out.extend(int(e * self.n + i) for i in perm[k:k + take])
            pos += take
        return out

    def __iter__(self) -> Iterator[List[int]]:
        per = self.B // self.world
        for t in range(self.start, self.steps):
            yield self.global_batch(t)[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def make_loader(dataset: Dataset, batch_size: int, steps: int, seed: int = 0, start_step: int = 0,
                rank: int = 0, world_size: int = 1, workers: int = 0, shuffle: bool = True,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over steps [start_step, steps) of the deterministic order above; batch_size is
    the global batch (each of world_size ranks loads batch_size / world_size)."""
    sampler = StepBatchSampler(len(dataset), batch_size, steps, seed=seed, start=start_step, rank=rank,
                               world_size=world_size, shuffle=shuffle)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=False, generator=_loader_generator(seed))


def subset_indices(dataset: Dataset, n: int) -> List[int]:
    """n fixed indices of a dataset to evaluate on: the first n, or, for a dataset listed class by class
    (`class_ordered`: an ImageFolder), n spread evenly over it, so that every class is in the subset in
    its share (the first 512 of ImageNet's validation set are 11 of its 1000 classes)."""
    total = len(dataset)
    n = min(int(n), total)
    if n < total and getattr(dataset, "class_ordered", False):
        return [k * total // n for k in range(n)]
    return list(range(n))


def heldout_batches(dataset: Dataset, batch_size: int, max_batches: Optional[int] = None, rank: int = 0,
                    world_size: int = 1, workers: int = 0) -> DataLoader:
    """This rank's share of the held-out set in order (max_batches global batches of `subset_indices`)."""
    n = len(dataset)
    steps = math.ceil(n / batch_size) if max_batches is None else min(max_batches, math.ceil(n / batch_size))
    idx = subset_indices(dataset, steps * batch_size)
    mine = idx[rank::world_size]
    per = max(1, batch_size // world_size)
    batches = [mine[i:i + per] for i in range(0, len(mine), per)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, generator=_loader_generator(0))


def _loader_generator(seed: int) -> torch.Generator:
    """The generator a DataLoader draws its workers' base seed from each time it starts iterating (the
    samples use none of it), so that it draws nothing from torch's global RNG: a run resumed from a
    checkpoint would otherwise draw once more than an uninterrupted one and save another RNG state."""
    return torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFF)
