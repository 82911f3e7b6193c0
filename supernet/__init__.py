"""Model building: blocks, the five families (EfficientFormer, EfficientViT, SHViT, DeiT, Swin),
their presets, arch configs, and the MetaPath supernet. Imports nothing else from vitslim.

`MetaPathSupernet` and `load_space` (what a training loop of one's own starts from) are here too, imported on
first use: `import supernet` stays as quick as it was."""
from .errors import ArchError, CheckpointError, VitslimError
from .arch import ARCH_VERSION, validate, load_arch, save_arch, to_yaml
from .registry import FAMILIES, Family, get_family, get_preset, preset_names, register_family, register_preset

__all__ = ["ArchError", "CheckpointError", "VitslimError", "ARCH_VERSION", "validate", "load_arch",
           "save_arch", "to_yaml", "FAMILIES", "Family", "get_family", "get_preset", "preset_names",
           "register_family", "register_preset", "MetaPathSupernet", "load_space"]

_LAZY = {"MetaPathSupernet": "supernet", "load_space": "space"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
