"""What a call may change in the process beyond its result (vitslim as a library: a notebook, a service):
`process_state()` before and after, `state_changes(before, after)` -> {what: (before, after)}, empty when kept."""
import hashlib
import logging
import os
import random
import signal
import sys
import warnings

import numpy as np
import torch


def flushes_denormals() -> bool:
    """Whether the CPU flushes denormal floats to zero (torch.set_flush_denormal has no getter)."""
    return (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() == 0.0


def _digest(state) -> str:
    return hashlib.sha1(state if isinstance(state, bytes) else state.encode()).hexdigest()[:12]


def process_state() -> dict:
    s = {"torch threads": torch.get_num_threads(), "torch interop threads": torch.get_num_interop_threads(),
         "grad enabled": torch.is_grad_enabled(), "inference mode": torch.is_inference_mode_enabled(),
         "default dtype": torch.get_default_dtype(),
         "deterministic algorithms": torch.are_deterministic_algorithms_enabled(),
         "cudnn.benchmark": torch.backends.cudnn.benchmark, "mkldnn": torch.backends.mkldnn.enabled,
         "flush denormal": flushes_denormals(),
         "torch RNG": _digest(bytes(torch.get_rng_state().numpy())), "numpy RNG": _digest(repr(np.random.get_state())),
         "random RNG": _digest(repr(random.getstate())),
         "warnings.filters": list(warnings.filters), "warnings.formatwarning": warnings.formatwarning,
         "root logger": (logging.root.level, list(logging.root.handlers)),
         "coremltools logger": logging.getLogger("coremltools").level,
         "stdout/stderr": (sys.stdout, sys.stderr), "environ": dict(os.environ), "cwd": os.getcwd(),
         "signals": (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)), "sys.path": list(sys.path)}
    if "matplotlib" in sys.modules:  # the backend as set, without resolving an automatic one
        import matplotlib
        s["matplotlib backend"] = dict.__getitem__(matplotlib.rcParams, "backend")
    if "tqdm" in sys.modules:
        from tqdm import tqdm
        s["open tqdm bars"] = sorted(str(getattr(b, "desc", "")) for b in list(tqdm._instances))
    return s


def state_changes(before: dict, after: dict) -> dict:
    out = {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}
    if "environ" in out:  # the variables that changed, not the whole environment
        a, b = out.pop("environ")
        out.update({f"${k}": (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)})
    return out
