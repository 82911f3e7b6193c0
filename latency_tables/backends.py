"""Backends that time a module on a device, behind one interface (`Backend`): PyTorch on the CPU
(eager, threads fixed), PyTorch on CUDA (synchronised), ONNX Runtime on the CPU, and Core ML
(macOS only; elsewhere an error that points to export-coreml / import).

A backend turns a deploy-ready module (BatchNorm already folded) and an input shape into a
zero-argument callable that runs one inference to completion; `latency_tables.measure` times it.
"""
from __future__ import annotations

import contextlib
import io
import platform
import sys
import warnings
from typing import Callable, Dict, Tuple, Type

import torch
import torch.nn as nn

from supernet.errors import VitslimError, first_line

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class BackendError(VitslimError, RuntimeError):
    """A backend that cannot run here, or that was asked for something it does not do."""


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo on Linux, sysctl on macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.machine()
        except Exception:  # noqa: BLE001 - best effort: a name is only a label
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _versions(*mods) -> Dict[str, str]:
    import numpy
    out = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": str(numpy.__version__)}
    for m in mods:
        out[m] = dist_version(m)
    return out


def dist_version(dist: str):
    """The installed version of a distribution, without importing it (coremltools warns on import); None if absent."""
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class Backend:
    """One way of running a module on a device. Subclass and register in BACKENDS."""

    name = ""

    def __init__(self, threads: int = 1, batch_size: int = 1, dtype: str = "float32", fused: bool = True):
        if not isinstance(threads, int) or threads < 1:
            raise BackendError(f"threads: got {threads!r}, expected an integer >= 1")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise BackendError(f"batch size: got {batch_size!r}, expected an integer >= 1")
        if dtype not in DTYPES:
            raise BackendError(f"dtype: got {dtype!r}, expected one of {', '.join(DTYPES)}")
        self.threads, self.batch_size, self.dtype, self.fused = threads, batch_size, dtype, fused

    # what the table header records; MATCH_FIELDS of it must agree for a table to apply
    def device_name(self) -> str:
        return cpu_model()

    def runtime(self) -> Dict[str, str]:
        return _versions()

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device_name(), "threads": self.threads,
                "batch_size": self.batch_size, "dtype": self.dtype, "fused": self.fused,
                "runtime": self.runtime(), "platform": f"{platform.system()}-{platform.machine()}"}

    def check_available(self) -> None:
        """Raise BackendError (saying what to do) when this backend cannot run here."""

    def default_clock(self) -> str:
        """'thread' (CPU time of the calling thread) where all the work runs on it, else 'wall'."""
        return "wall"

    @contextlib.contextmanager
    def session(self):
        """Process-wide settings held while timing (threads, inference mode)."""
        yield

    def prepare_fn(self, module: nn.Module, input_shape: Tuple[int, ...]):
        """(step, x0): `step(x)` runs one inference of `module` on an input in the backend's own type
        and returns its output when it is ready; `x0` is a fixed random input of `input_shape` (batch
        included). Steps chain: an arch's segments run one after another, as in the network."""
        raise NotImplementedError

    def prepare(self, module: nn.Module, input_shape: Tuple[int, ...]) -> Callable[[], None]:
        """A callable running one inference of `module` on a fixed random input of `input_shape`."""
        step, x0 = self.prepare_fn(module, input_shape)

        def run():
            step(x0)
        return run

    def example(self, input_shape) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(tuple(input_shape), generator=g)


def flushes_denormals() -> bool:
    """Whether this thread's CPU flushes denormal floats to zero (what torch.set_flush_denormal set)."""
    with torch.inference_mode():
        return (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() == 0.0


class TorchCPU(Backend):
    """PyTorch eager on the CPU, `torch.set_num_threads(threads)`, inference mode."""

    name = "torch-cpu"

    def default_clock(self):
        return "thread" if self.threads == 1 else "wall"

    @contextlib.contextmanager
    def session(self):
        old_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        # denormals from random weights would be slow in a way trained weights are not; the caller's setting is
        # restored (set_flush_denormal returns whether the CPU supports it, not what it was: there is no getter)
        old_denormal = flushes_denormals()
        torch.set_flush_denormal(True)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(old_threads)
            torch.set_flush_denormal(old_denormal)

    def prepare_fn(self, module, input_shape):
        dt = DTYPES[self.dtype]
        m = module.to(dtype=dt).eval()
        return m, self.example(input_shape).to(dt)


class TorchCUDA(Backend):
    """PyTorch eager on the first CUDA device; every call ends with torch.cuda.synchronize()."""

    name = "torch-cuda"

    def device_name(self) -> str:
        self.check_available()
        return torch.cuda.get_device_name(0)

    def runtime(self):
        r = _versions()
        r["cuda"] = str(torch.version.cuda)
        r["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else None
        return r

    def check_available(self):
        if not torch.cuda.is_available():
            raise BackendError("torch-cuda: no CUDA device visible to PyTorch here (torch "
                               f"{torch.__version__}); use --backend torch-cpu or onnxruntime, or run on a GPU machine")

    @contextlib.contextmanager
    def session(self):
        self.check_available()
        with torch.inference_mode():
            yield

    def prepare_fn(self, module, input_shape):
        self.check_available()
        dt = DTYPES[self.dtype]
        m = module.to(device="cuda", dtype=dt).eval()
        sync = torch.cuda.synchronize

        def step(x):
            y = m(x)
            sync()
            return y
        return step, self.example(input_shape).to(device="cuda", dtype=dt)


def to_onnx_bytes(module: nn.Module, x: torch.Tensor, opset: int = 17) -> bytes:
    """The module as an ONNX model (torch's TorchScript-based exporter, which needs the onnx package), in memory."""
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        kwargs = {"input_names": ["x"], "output_names": ["y"], "opset_version": opset}
        try:
            torch.onnx.export(module, (x,), f, dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5 has no `dynamo` argument
            torch.onnx.export(module, (x,), f, **kwargs)
    return f.getvalue()


class ONNXRuntime(Backend):
    """ONNX Runtime's CPU execution provider, all graph optimisations, `threads` intra-op threads."""

    name = "onnxruntime"

    def default_clock(self):
        return "thread" if self.threads == 1 else "wall"

    def runtime(self):
        return _versions("onnxruntime", "onnx")

    def _onnx(self, module, x) -> bytes:
        # deployed_segment hands out copies of one module per entry: export each entry once
        from collections import OrderedDict
        cache = self.__dict__.setdefault("_onnx_cache", OrderedDict())
        sig = (type(module).__name__, tuple(x.shape),
               tuple((n, tuple(p.shape), float(p.detach().flatten()[:4].float().sum())) for n, p in
                     list(module.named_parameters())[:64] + list(module.named_buffers())[:64] if p.numel()))
        if sig not in cache:
            cache[sig] = to_onnx_bytes(module, x)
            while len(cache) > 32:
                cache.popitem(last=False)
        return cache[sig]

    def check_available(self):
        for mod in ("onnxruntime", "onnx"):  # torch's ONNX exporter needs the onnx package too
            try:
                __import__(mod)
            except ImportError:
                raise BackendError(f"onnxruntime backend: the {mod} package is not installed, expected "
                                   "`pip install vitslim[export]` (onnx and onnxruntime)") from None
        if self.dtype != "float32":
            raise BackendError(f"onnxruntime: dtype {self.dtype} is not measured here, expected float32")

    @contextlib.contextmanager
    def session(self):
        # the PyTorch side only exports; keep it from competing for the cores
        old = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def prepare_fn(self, module, input_shape):
        self.check_available()
        import onnxruntime as ort
        x = self.example(input_shape)
        data = self._onnx(module.float().eval(), x)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        run_ = sess.run

        def step(a):
            return run_(None, {name: a})[0]
        return step, x.numpy()


COREML_OFF_MAC = ("coreml: Core ML models can be converted here but run only on macOS (coremltools cannot predict on "
                  "{system}). Measure on the device instead: `vitslim latency export-coreml --space S --out DIR` writes "
                  "one .mlpackage per entry and DIR/manifest.json; time them there (e.g. Xcode's Core ML performance "
                  "report) and fill a copy of DIR/times_template.csv; then `vitslim latency import --manifest "
                  "DIR/manifest.json --csv times.csv --device \"iPhone 12\" --out TABLE.yaml` (CSV format: latency_tables/README.md)")


class CoreML(Backend):
    """Core ML through coremltools' MLModel.predict (macOS only), compute units ALL by default."""

    name = "coreml"

    def __init__(self, *a, compute_units: str = "ALL", **kw):
        super().__init__(*a, **kw)
        self.compute_units = compute_units

    def runtime(self):
        return _versions("coremltools")

    def describe(self):
        d = super().describe()
        d["compute_units"] = self.compute_units
        return d

    def check_available(self):
        if platform.system() != "Darwin":
            raise BackendError(COREML_OFF_MAC.format(system=platform.system() or "this OS"))
        try:
            import coremltools  # noqa: F401
        except ImportError:
            raise BackendError("coreml: coremltools is not installed (pip install coremltools)") from None

    def prepare_fn(self, module, input_shape):
        self.check_available()
        import coremltools as ct
        from .coreml_io import convert_coreml
        x = self.example(input_shape)
        mlmodel = convert_coreml(module, x, compute_units=getattr(ct.ComputeUnit, self.compute_units))
        predict = mlmodel.predict
        try:  # once before timing: coremltools raises plain Exception where Core ML cannot load or run the model
            predict({"x": x.numpy()})
        except Exception as e:
            why = first_line(e)[:300]
            on_device = COREML_OFF_MAC.split("Measure on the device instead: ", 1)[1]
            raise BackendError(f"coreml: Core ML cannot run the converted model on this Mac "
                               f"({why}); measure on the device instead: {on_device}") from None

        def step(a):
            return next(iter(predict({"x": a}).values()))
        return step, x.numpy()


BACKENDS: Dict[str, Type[Backend]] = {b.name: b for b in (TorchCPU, TorchCUDA, ONNXRuntime, CoreML)}


def get_backend(name: str, threads: int = 1, batch_size: int = 1, dtype: str = "float32", fused: bool = True,
                **kw) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"backend: got {name!r}, expected one of {', '.join(BACKENDS)}")
    return BACKENDS[name](threads=threads, batch_size=batch_size, dtype=dtype, fused=fused, **kw)


def backend_for(device: Dict) -> Backend:
    """The backend a table's `device` header describes (backend, threads, batch size, dtype, fusing)."""
    return get_backend(device.get("backend") or "torch-cpu", threads=int(device.get("threads") or 1),
                       batch_size=int(device.get("batch_size") or 1), dtype=device.get("dtype") or "float32",
                       fused=bool(device.get("fused", True)))
