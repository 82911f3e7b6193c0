"""The run directory of `vitslim prune`: arch.yaml, model.pt (a vitslim checkpoint), report.json and
the reallocation plot (kept fraction per block for each unit kind, the figure EfficientViT drew
for Swin-T and DeiT-T). Written into a temporary directory beside the target, then renamed."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping, Optional

import torch.nn as nn

from supernet.arch import atomic_savefig, figures, write_target
from supernet.errors import VitslimError, check_writable
from supernet.runlock import check_names_fit, file_lock, lock_beside, pid_alive, plain_mode, remove_stale_temps, temp_names, temp_prefix

from .units import PruneError

KIND_LABELS = (("qk", "Q/K channels"), ("v", "V channels"), ("heads", "heads"), ("ffn", "FFN channels"))


def check_out_dir(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise PruneError(f"--out {out}: already exists, expected a new directory (or pass --overwrite)")
    try:  # also: a file where the directory should be
        check_writable(out, "--out", is_dir=True)
    except VitslimError as e:
        raise PruneError(str(e)) from None


def lock_path(out: str) -> str:
    """The lock of a prune writing `out`: .NAME.lock beside the run folder (which appears only at the end)."""
    return lock_beside(out)


def check_out_names(out: str, state_path: str) -> None:
    """Refuse up front an --out whose lock, temporary folders or resume state would have too long a name."""
    real = os.path.abspath(write_target(out))
    try:
        check_names_fit("--out", out, os.path.dirname(real),
                        [os.path.basename(lock_path(out))] + temp_names(os.path.basename(real), folder=True))
        check_names_fit("--out", out, os.path.dirname(state_path),
                        [os.path.basename(state_path)] + temp_names(os.path.basename(state_path)))
    except VitslimError as e:
        raise PruneError(str(e)) from None


def prune_lock(out: str):
    """Hold the lock of a prune on `out` from before its resume state is read until its run folder is written:
    a second prune of the same --out (or of a link to it) is refused instead of replacing the first's result
    or taking its resume state for an interrupted run's."""
    path = lock_path(out)
    return file_lock(path, busy=f"--out {out}: another prune is running in it; wait for it, or choose another --out",
                     cannot=f"--out {out}: cannot write in {os.path.dirname(path)}", error=PruneError)


def plot_reallocation(report: Mapping, path: str) -> Optional[str]:
    """Kept fraction per block (x) of Q/K, V, heads and FFN; returns the path, or None without
    matplotlib."""
    try:
        plt = figures()
    except ImportError:
        return None
    return atomic_savefig(reallocation_figure(report, plt), path, bbox_inches="tight")


FAMILY_NAMES = {"deit": "DeiT", "swin": "Swin"}
KIND_STYLE = {"qk": ("o", "blue"), "v": ("s", "orange"), "heads": ("^", "green"), "ffn": ("D", "vermillion"),
              "embed": ("x", "purple")}  # (marker, PLOT_COLOURS key): told apart by shape as well as colour


def reallocation_figure(report: Mapping, plt):
    """The figure of `plot_reallocation`, not saved: blocks numbered within their stage as in the report
    (stages[s].blocks[b]), the stages named above the plot and split by dashed lines."""
    from supernet.arch import PLOT_COLOURS
    blocks = report["blocks"]
    xs = list(range(len(blocks)))
    stages = [b["stage"] for b in blocks]
    multi = len(set(stages)) > 1
    fig, ax = plt.subplots(figsize=(max(6.4, 0.42 * len(blocks) + 3.0), 3.8), dpi=120)
    kinds = list(KIND_LABELS) + ([("embed", "embedding width")] if report.get("prune_embed") else [])
    for k, label in kinds:
        ys = [b["kept"].get(k) if b["kept"].get(k) is not None else float("nan") for b in blocks]
        marker, colour = KIND_STYLE[k]
        ax.plot(xs, ys, marker=marker, color=PLOT_COLOURS[colour], label=label, linewidth=1.5, markersize=4.5)
    first = [0] + [j for j in range(1, len(stages)) if stages[j] != stages[j - 1]]
    for j in first[1:]:
        ax.axvline(j - 0.5, color="0.3", linestyle="--", linewidth=0.9)
    if multi:  # the stage names above the axes, centred on their blocks
        for j, nxt in zip(first, first[1:] + [len(stages)]):
            ax.text((j + nxt - 1) / 2, 1.01, f"stage {stages[j]}", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(b["block"]) for b in blocks], fontsize=8)
    ax.set_xlim(-0.5, len(blocks) - 0.5)
    ax.set_xlabel("block (numbered within its stage, from 0)" if multi else "block (from 0)")
    ax.set_ylabel("kept fraction of the block's units")
    ax.set_ylim(-0.04, 1.05)  # a unit kind emptied (0) or kept whole (1): its markers fully in view
    ax.grid(alpha=0.3)
    whole = (f"params {report['params_after'] / report['params_before']:.2f}, "
             f"MACs {report['macs_after'] / report['macs_before']:.2f}")
    if report.get("latency_kept") is not None:
        whole += f", predicted latency {report['latency_kept']:.2f}"
    family = report.get("family", "")
    ax.set_title(f"{FAMILY_NAMES.get(family, family)} pruned to {report.get('target', '')}: kept fraction per block\n"
                 f"(whole network kept: {whole}; Q/K and V: channels over all heads)", fontsize=9,
                 pad=16 if multi else 6)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    return fig


def _recover(out: str, parent: str, base: str) -> None:
    """A run killed between its two renames (the previous run moved aside, the new one not yet in place)
    left no `out`: put the previous run back before the leftovers are swept."""
    if os.path.exists(out):
        return
    for name in sorted(os.listdir(parent)):
        if name.startswith(f".{base}.pid") and ".old." in name and os.path.isfile(os.path.join(parent, name, "report.json")):
            pid = name[len(f".{base}.pid"):].split(".", 1)[0]
            if pid.isdigit() and not pid_alive(int(pid)):
                os.replace(os.path.join(parent, name), out)
                return


def write_run(out: str, model: nn.Module, arch: Mapping, report: dict, overwrite: bool = False) -> dict:
    """Write the run directory atomically; returns {"arch", "model", "report", "plot"} paths. A symlinked
    `out` is written through (its target replaced, the link kept). Concurrent writers of one `out` are the
    caller's to exclude (`prune_lock`); without `overwrite` an `out` that appeared meanwhile is not replaced."""
    from supernet.arch import save_arch
    from supernet.checkpoint import save_checkpoint
    given = os.fspath(out)
    check_out_dir(given, overwrite)
    out = write_target(given)
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(out)
    _recover(out, parent, base)
    remove_stale_temps(parent, base=base)  # a killed run's half-written folders
    tmp = tempfile.mkdtemp(prefix=temp_prefix(base), dir=parent)
    plain_mode(tmp)  # becomes the run folder
    try:
        save_arch(arch, os.path.join(tmp, "arch.yaml"))
        save_checkpoint(model, arch, os.path.join(tmp, "model.pt"))
        plot = plot_reallocation(report, os.path.join(tmp, "reallocation.png"))
        report = dict(report)
        report["files"] = {"arch": "arch.yaml", "model": "model.pt", "report": "report.json",
                           "plot": "reallocation.png" if plot else None}
        if not plot:
            report["plot_note"] = "matplotlib is not installed: the plot's data is blocks[*].kept (pip install matplotlib)"
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        if os.path.lexists(out) and not overwrite:
            raise PruneError(f"--out {given}: appeared while this prune ran (another program wrote it), expected a new "
                             "directory; choose another --out, or pass --overwrite to replace it")
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=temp_prefix(base) + "old.", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {k: (os.path.join(given, v) if v else None) for k, v in report["files"].items()}
