"""Deployable artefacts of one network: its arch config (+ weights), ONNX (checked with
onnxruntime), Core ML (.mlpackage; converts on any OS, runs only on Apple's), TorchScript.

Every artefact is of the fused network (BatchNorm folded), as latency is measured, and is written
under a temporary name first and renamed, so an interrupted export never leaves half a file."""
from __future__ import annotations

import contextlib
import numbers
import os
import shutil
import sys
import tempfile
import warnings
from typing import Mapping, Tuple

import torch
import torch.nn as nn

from supernet.errors import VitslimError, first_line, nearest_existing

FORMATS = ("yaml", "onnx", "coreml", "torchscript", "safetensors")
_SUFFIX = {"yaml": (".yaml", ".yml"), "onnx": (".onnx",), "coreml": (".mlpackage",), "torchscript": (".pt", ".ts", ".torchscript"),
           "safetensors": (".safetensors",)}


class ExportError(VitslimError, ValueError):
    """An export that cannot be done as asked (a bad argument, a missing extra, an artefact that fails its check)."""


# The modules a format needs beyond torch (the `export` extra), with the one line naming each when it is missing.
EXTRA_HINT = "expected `pip install vitslim[export]`"
EXTRA_MODULES = {"onnx": (("onnx", "onnx: the onnx package is not installed"),
                          ("onnxruntime", "onnx check: onnxruntime is not installed")),  # the check only
                 "coreml": (("coremltools", "coreml: coremltools is not installed"),)}


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (coremltools takes seconds)."""
    import importlib.util
    import sys
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra(fmt: str, check: bool = True) -> str:
    """The one-line reason `fmt` cannot be exported here (a module of the export extra is missing), or ""."""
    for i, (module, what) in enumerate(EXTRA_MODULES.get(fmt, ())):
        if (check or i == 0) and not _installed(module):
            return f"{what}, {EXTRA_HINT}"
    return ""


def resolve_source(target) -> Tuple[nn.Module, dict, bool]:
    """(model, arch, has_trained_weights) from a module, checkpoint, arch .yaml, preset or dict. An arch .yaml
    with a vitslim checkpoint of the same arch beside it (X.yaml + X.pt, as `export --format yaml` writes
    them) brings those weights."""
    from . import api
    if isinstance(target, nn.Module):
        arch = getattr(target, "arch", None)
        if arch is None:
            raise ExportError("model: has no .arch (build it with vitslim.build_model or load_checkpoint)")
        return target, api.resolve_arch(arch), True  # validated: defaults filled in (a hand-set .arch)
    if isinstance(target, (str, os.PathLike)) and os.path.isfile(target) and not os.fspath(target).endswith((".yaml", ".yml")):
        model, arch = api.load_checkpoint(target)
        return model, arch, True
    arch = api.resolve_arch(target)
    beside = weights_beside(target)
    if beside is not None:
        model, warch = api.load_checkpoint(beside)
        if warch == arch:
            return model, arch, True
        warnings.warn(f"{beside}: the weights beside {os.fspath(target)} are of another architecture (left from an "
                      f"interrupted export, or another model's?): not used, the network gets random weights")
    with torch.random.fork_rng(devices=[]):  # random weights of seed 0, the caller's RNG left as it was
        torch.manual_seed(0)
        return api.build_model(arch), arch, False


def weights_beside(target) -> "str | None":
    """X.pt or X.safetensors beside an arch file X.yaml (the pair `export --format yaml` writes), or None."""
    if not isinstance(target, (str, os.PathLike)) or not os.fspath(target).endswith((".yaml", ".yml")):
        return None
    stem = os.path.splitext(os.fspath(target))[0]
    return next((stem + e for e in (".pt", ".safetensors") if os.path.isfile(stem + e)), None)


def _example(arch: Mapping, batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, arch["in_chans"], arch["input_size"], arch["input_size"], generator=g)


_TEMPS: list = []  # temporary paths of the export in progress: removed whatever happens


def _tmp_beside(out: str, is_dir: bool = False) -> str:
    """A fresh temporary path in the output's folder (so the final rename is atomic), with the mode a
    plain file created there would get (mkstemp's are 0600: other users could not read the artefact)."""
    from supernet.arch import write_target
    from supernet.runlock import plain_mode, remove_stale_temps, temp_prefix
    dest = write_target(out)  # a symlinked output is written through: the temporary goes beside its target
    d = os.path.dirname(os.path.abspath(dest)) or "."
    base = os.path.basename(dest)
    try:
        os.makedirs(d, exist_ok=True)
        remove_stale_temps(d, base=base)  # what a killed export of this path left
        if is_dir:
            p = tempfile.mkdtemp(prefix=temp_prefix(base), dir=d)
        else:
            fd, p = tempfile.mkstemp(prefix=temp_prefix(base), dir=d)
            os.close(fd)
            plain_mode(p)
    except OSError as e:
        up = nearest_existing(d)
        if os.path.isfile(up):
            raise ExportError(f"--out {out}: {up} is a file, expected a folder to write in") from None
        raise ExportError(f"--out {out}: cannot write in {d} ({e.strerror or e}), expected a writable folder") from None
    _TEMPS.append(p)
    return p


def _commit(tmp: str, out: str, overwrite: bool) -> None:
    """Put `tmp` in place as `out`; a symlinked `out` (even one whose target is missing) is written through:
    the link kept, its target replaced, as every other vitslim output is."""
    from supernet.arch import write_target
    dest = write_target(out)
    if os.path.exists(dest):
        if not overwrite:
            raise ExportError(f"{out}: already exists, expected a new path (or pass overwrite=True / --overwrite)")
        if os.path.isdir(dest) and not os.path.isdir(tmp):  # checked up front too: --overwrite replaces files only
            raise ExportError(f"--out {out}: is a directory, expected a file path (--overwrite replaces a file)")
        if os.path.isdir(dest):  # a .mlpackage folder: the old one moved aside, the new one renamed in, the old removed
            old = _tmp_beside(out, is_dir=True)
            os.rmdir(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
    os.replace(tmp, dest)


def export(target, fmt: str, out, batch: int = 1, overwrite: bool = False, check: bool = True,
           opset: int = 17, input_size=None) -> dict:
    """Write `target` as `fmt` to `out`; returns {"format", "path", ...check figures}."""
    if fmt not in FORMATS:
        raise ExportError(f"format: got {fmt!r}, expected one of {', '.join(FORMATS)}")
    out = os.fspath(out)
    if not out.endswith(_SUFFIX[fmt]):
        raise ExportError(f"--out: got {out!r}, expected a path ending in {' or '.join(_SUFFIX[fmt])} for format {fmt}")
    if os.path.exists(out) and not overwrite:
        raise ExportError(f"{out}: already exists, expected a new path (or pass --overwrite)")
    if os.path.isdir(out) and fmt != "coreml":
        raise ExportError(f"--out {out}: is a directory, expected a file path for format {fmt}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ExportError(f"--batch: got {batch!r}, expected an integer >= 1")
    batch = int(batch)
    opset = _check_opset(opset)
    model, arch, trained = resolve_source(target)
    if input_size is not None and input_size != arch["input_size"]:
        if not (isinstance(input_size, int) and input_size >= 16):
            raise ExportError(f"--input-size: got {input_size!r}, expected an integer >= 16")
        model, arch = _with_input_size(model, arch, trained, input_size)
    del _TEMPS[:]
    try:
        res = {"yaml": _yaml, "onnx": _onnx, "coreml": _coreml, "torchscript": _torchscript,
               "safetensors": _safetensors}[fmt](
            model, arch, trained, out, batch=batch, overwrite=overwrite, check=check, opset=opset, source=target)
        res["trained"] = bool(trained)
        if not isinstance(target, nn.Module) and trained and weights_beside(target):
            res["weights"] = weights_beside(target)
        return res
    except OSError as e:
        raise ExportError(f"--out {out}: cannot write ({e.strerror or e})") from None
    finally:
        for p in _TEMPS:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.exists(p):
                os.remove(p)
        del _TEMPS[:]


def _opset_range() -> "Tuple[int, int] | None":
    """The ONNX opsets the installed torch.onnx exports (min, max), or None where it does not say."""
    try:
        from torch.onnx import _constants
        return int(_constants.ONNX_MIN_OPSET), int(_constants.ONNX_MAX_OPSET)
    except (ImportError, AttributeError):
        return None


def _check_opset(opset) -> int:
    rng = _opset_range()
    ok = not isinstance(opset, bool) and isinstance(opset, numbers.Integral) and opset >= 1
    if ok and rng is not None:
        ok = rng[0] <= opset <= rng[1]
    if not ok:
        what = f"an integer from {rng[0]} to {rng[1]} (the opsets torch {torch.__version__} exports)" if rng \
            else "a positive integer"
        raise ExportError(f"opset: got {opset!r}, expected {what}")
    return int(opset)


def size_bound_key(model: nn.Module, arch: Mapping):
    """The first tensor of `model` that does not fit the network `arch` describes (the same network at
    another input size: DeiT's position embedding, Swin's windows, EfficientFormer's and EfficientViT's
    attention bias tables are sized by the input), or None."""
    from . import api
    from supernet.layers import no_weight_init
    sd = model.state_dict()
    with torch.device("meta"), no_weight_init():
        ref = api.build_model(arch).state_dict()
    return next((k for k in ref if k not in sd or sd[k].shape != ref[k].shape), None)


def _with_input_size(model: nn.Module, arch: Mapping, trained: bool, size: int):
    """(model, arch) at another input side: the network built anew at that size, with the trained weights
    where it has them. Weights whose shapes depend on the input (DeiT's position embedding, Swin's
    attention windows and masks) do not fit the network at another size, and are refused."""
    from supernet.arch import validate
    from . import api
    a = validate({**arch, "input_size": size})
    if trained:
        bad = size_bound_key(model, a)
        if bad:
            raise ExportError(f"--input-size: got {size}, but these weights fit only {arch['input_size']} "
                              f"({arch['family']}: {bad} is sized for it); export at {arch['input_size']}")
    with torch.random.fork_rng(devices=[]):  # as resolve_source: seed 0, the caller's RNG left as it was
        torch.manual_seed(0)
        new = api.build_model(a)
    if trained:
        new.load_state_dict(model.state_dict())
    new.arch = a
    return new.eval(), a


def _yaml(model, arch, trained, out, overwrite, source=None, **_):
    from supernet.arch import to_yaml, validate
    from supernet.checkpoint import save_checkpoint
    tmp = _tmp_beside(out)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(to_yaml(validate(arch)))
    res = {"format": "yaml", "path": out}
    wpath = os.path.splitext(out)[0] + ".pt"
    if trained and isinstance(source, (str, os.PathLike)) and os.path.isfile(source) and os.path.exists(wpath) \
            and os.path.samefile(source, wpath):  # the yaml of a checkpoint, beside it: the pair is already there
        res["checkpoint"] = wpath
    elif trained:  # weights travel beside the config: arch.yaml + arch.pt
        if os.path.exists(wpath) and not overwrite and not _same_checkpoint(wpath, model, arch):
            os.remove(tmp)
            raise ExportError(f"{wpath}: already exists, expected a new path (or pass --overwrite)")
        if not os.path.exists(wpath) or overwrite:
            from supernet.runlock import remove_stale_temps
            remove_stale_temps(os.path.dirname(os.path.abspath(wpath)), base=os.path.basename(wpath))
            save_checkpoint(model, arch, wpath)
        # else: this export's own checkpoint, left by a run killed before its .yaml was put in place
        res["checkpoint"] = wpath
    _commit(tmp, out, overwrite)
    return res


def _same_checkpoint(path: str, model: nn.Module, arch: Mapping) -> bool:
    """Whether the checkpoint at `path` holds exactly this arch and these weights."""
    from . import api
    try:
        other, oarch = api.load_checkpoint(path)
    except Exception:  # unreadable, another format: not ours
        return False
    mine, theirs = model.state_dict(), other.state_dict()
    return oarch == dict(arch) and mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k])
        for k in mine)


def _safetensors(model, arch, trained, out, batch, overwrite, check, **_):
    """The weights (unfused, as trained: the file fine-tunes and prunes like any checkpoint) with the arch
    config in the metadata; loads back with vitslim.load_checkpoint, and reads in any safetensors reader."""
    from supernet.checkpoint import load_checkpoint, save_checkpoint
    tmp = _tmp_beside(out) + ".safetensors"
    _TEMPS.append(tmp)
    save_checkpoint(model, arch, tmp)
    res = {"format": "safetensors", "path": out, "trained": bool(trained)}
    if check:
        p = next(model.parameters(), None)
        dtype, device = (p.dtype, p.device) if p is not None else (torch.float32, torch.device("cpu"))
        x = _example(arch, batch).to(device, dtype)
        back, _ = load_checkpoint(tmp)  # a float32 network on the CPU: compared in the model's dtype and device
        back = back.to(device, dtype)
        was_training = model.training
        try:
            with torch.no_grad():
                err = _rel_err(back(x), model.eval()(x))
        finally:
            model.train(was_training)  # the caller's model keeps its mode
        # exact where float32 holds the weights exactly; float64 weights are rounded to float32 on loading
        tol = 1e-5 if torch.finfo(dtype).bits > 32 else 0.0
        if err > tol:
            raise ExportError(f"safetensors check: the reloaded network differs by {err:.2e} (relative), "
                              f"expected {'0' if not tol else f'<= {tol:g}'}")
        res["max_rel_error"] = err
    _commit(tmp, out, overwrite)
    return res


def _deploy(model, arch, batch):
    from supernet.layers import fuse_model
    fused = fuse_model(model).float()
    x = _example(arch, batch)
    with torch.no_grad():
        ref = fused(x)
    return fused, x, ref


def _rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float32)
    b = torch.as_tensor(b, dtype=torch.float32)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@contextlib.contextmanager
def _stdout_dropped():
    """Standard output (file descriptor 1, where torch's C++ side prints) discarded for the block."""
    def flush():  # sys.stdout is None without a stdout (pythonw, `>&-`, some services), or may be closed
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stdout.flush()
    flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to redirect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        flush()
        os.dup2(saved, 1)
        os.close(saved)


def _onnx(model, arch, trained, out, batch, overwrite, check, opset, **_):
    try:
        import onnx  # noqa: F401 - torch.onnx.export writes through it
    except ImportError:
        raise ExportError(f"{EXTRA_MODULES['onnx'][0][1]}, {EXTRA_HINT}") from None
    fused, x, ref = _deploy(model, arch, batch)
    # exported in a temporary folder: over 2 GB torch writes every tensor as its own file beside the graph
    # (head.weight, onnx__MatMul_281, ...); those are gathered into one OUT.data that travels with OUT
    tmp_dir = _tmp_beside(out, is_dir=True)
    tmp = os.path.join(tmp_dir, os.path.basename(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with _stdout_dropped():  # torch dumps the whole TorchScript graph to stdout when an operator fails
                torch.onnx.export(fused, (x,), tmp, input_names=["image"], output_names=["logits"],
                                  opset_version=opset, dynamo=False,
                                  dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        except (RuntimeError, ValueError, TypeError) as e:  # torch's exporter: an operator this opset lacks, ...
            if isinstance(e, OSError):
                raise
            what = first_line(e)
            raise ExportError(f"onnx: torch.onnx.export failed at opset {opset} ({what[:300]}); a higher opset "
                              "(export_model(..., opset=N)) may have the operator") from None
    data = None
    if len(os.listdir(tmp_dir)) > 1:  # over protobuf's 2 GB: the weights in one file beside the graph
        from supernet.arch import write_target
        from supernet.runlock import plain_mode
        dest = write_target(out)  # where the graph lands (a symlink's target): its data goes beside it
        if os.path.dirname(os.path.abspath(dest)) != os.path.dirname(os.path.abspath(out)):
            raise ExportError(f"--out {out}: a link into another folder ({dest}), and this network's weights (over "
                              "2 GB) go in a file beside the graph, which ONNX loaders look for beside the link: "
                              "export to the target's path, or link the folder instead")
        data = os.path.basename(dest) + ".data"
        if os.path.exists(dest + ".data") and not overwrite:
            raise ExportError(f"{dest}.data: already exists, expected a new path (or pass --overwrite)")
        proto = onnx.load(tmp)
        for f in os.listdir(tmp_dir):
            os.remove(os.path.join(tmp_dir, f))
        onnx.save_model(proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        del proto
        plain_mode(os.path.join(tmp_dir, data))
    res = {"format": "onnx", "path": out, "opset": opset}
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"{EXTRA_MODULES['onnx'][1][1]}, {EXTRA_HINT} (or pass --no-check)") from None
        sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.numpy()})[0]
        err = _rel_err(got, ref)
        if err > 1e-4:
            raise ExportError(f"onnx check: onnxruntime output differs from PyTorch by {err:.2e} (relative), expected <= 1e-4")
        res["max_rel_error"] = err
    if data:
        os.replace(os.path.join(tmp_dir, data), os.path.join(os.path.dirname(os.path.abspath(dest)), data))
        res["data"] = os.path.join(os.path.dirname(os.path.abspath(dest)), data)
    _commit(tmp, out, overwrite)
    return res


@contextlib.contextmanager
def _torchscript_deprecation_quiet():
    """torch >= 2.11 deprecates TorchScript: torch.jit.save / load warn (a DeprecationWarning in torch 2.13, a
    FutureWarning, shown to every user, in 2.15) to "switch to torch.export". Whoever asked for a TorchScript file
    can not take that advice here, so only those deprecation notices are dropped (trace's go with its others)."""
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=category)
        yield


def _torchscript(model, arch, trained, out, batch, overwrite, check, **_):
    fused, x, ref = _deploy(model, arch, batch)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fused, x)
    # saved under its final name in a temporary folder: the archive's inner folder is named after the file,
    # so the same model exports to the same bytes
    tmp_dir = _tmp_beside(out, is_dir=True)
    tmp = os.path.join(tmp_dir, os.path.basename(out))
    with _torchscript_deprecation_quiet():
        torch.jit.save(traced, tmp)
    res = {"format": "torchscript", "path": out}
    if check:
        with torch.no_grad(), _torchscript_deprecation_quiet():
            got = torch.jit.load(tmp)(x)
        err = _rel_err(got, ref)
        if err > 1e-5:
            raise ExportError(f"torchscript check: output differs by {err:.2e} (relative), expected <= 1e-5")
        res["max_rel_error"] = err
    _commit(tmp, out, overwrite)
    return res


def to_coreml(model: nn.Module, example: torch.Tensor):
    """A converted (not yet saved) Core ML mlprogram of a fused eval model."""
    from latency_tables.coreml_io import keeps_numpy_rng
    try:
        import coremltools as ct
    except ImportError:
        raise ExportError(f"{EXTRA_MODULES['coreml'][0][1]}, {EXTRA_HINT}") from None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        with keeps_numpy_rng():
            return ct.convert(traced, inputs=[ct.TensorType(name="image", shape=tuple(example.shape))],
                              outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                              minimum_deployment_target=ct.target.iOS16)


COREML_TOLERANCE = 5e-2  # float16 compute (coremltools' default for an iOS 16 mlprogram): ~1e-3 typical


def _coreml(model, arch, trained, out, batch, overwrite, check, **_):
    import sys
    fused, x, ref = _deploy(model, arch, batch)
    try:
        ml = to_coreml(fused, x)
    except ExportError:
        raise
    except Exception as e:  # coremltools' converter: an operator or pattern it cannot convert
        what = first_line(e, "")
        raise ExportError(f"coreml: coremltools could not convert this {arch['family']} network "
                          f"({type(e).__name__}{': ' + what[:300] if what else ''})") from None
    from latency_tables.coreml_io import release_temp_package
    try:
        tmpdir = _tmp_beside(out, is_dir=True)
        pkg = os.path.join(tmpdir, os.path.basename(out))
        ml.save(pkg)
        res = {"format": "coreml", "path": out, "predicted": False}
        if check and sys.platform == "darwin":  # Core ML predicts only on Apple's OSes
            got = None
            try:
                got = ml.predict({"image": x.numpy()})["logits"]
            except Exception as e:  # coremltools raises plain Exception: no Core ML it can load, or a model it cannot run
                why = first_line(e)[:300]
                if getattr(ml, "__proxy__", True) is not None:  # loaded, but failed to run: the package is at fault
                    shutil.rmtree(tmpdir, ignore_errors=True)  # nothing half-written is left beside --out
                    raise ExportError(f"coreml check: Core ML could not run the package on this Mac ({why}); pass "
                                      "--no-check to write it unchecked") from None
                # Core ML cannot load an iOS 16 mlprogram here (macOS before 13, or coremltools without its macOS
                # library): the package is still what the phone runs; written unchecked, as on Linux
                res["unchecked"] = f"Core ML cannot load it on this Mac ({why})"
            if got is not None:
                err = _rel_err(got, ref)
                if err > COREML_TOLERANCE:
                    raise ExportError(f"coreml check: Core ML output differs from PyTorch by {err:.2e} (relative), "
                                      f"expected <= {COREML_TOLERANCE:g} (the package computes in float16)")
                res["max_rel_error"] = err
                res["predicted"] = True
        _commit(pkg, out, overwrite)
        shutil.rmtree(tmpdir, ignore_errors=True)
        return res
    finally:  # coremltools would keep its converted copy in /tmp until the interpreter exits
        release_temp_package(ml)
