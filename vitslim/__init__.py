"""vitslim: find and make fast vision transformers for a target device."""
from ._siblings import bind as _bind_siblings

_bind_siblings()  # before any sibling import: a folder named like one in the cwd must not hide it

from supernet.errors import ArchError, CheckpointError, VitslimError

from .export import export as export_model
from .api import (build_model, count, fuse, get_preset, list_presets, load_arch, load_checkpoint, prune_model,
                  resolve_arch, save_arch, save_checkpoint)

__version__ = "0.1.0"
__all__ = ["build_model", "count", "fuse", "get_preset", "list_presets", "load_arch", "load_checkpoint",
           "resolve_arch", "save_arch", "save_checkpoint", "export_model", "prune_model", "ArchError", "CheckpointError", "VitslimError"]
