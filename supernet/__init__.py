"""Model building: blocks, the five families (EfficientFormer, EfficientViT, SHViT, DeiT, Swin),
their presets, arch configs, and the MetaPath supernet. Imports nothing else from vitslim."""
from .errors import ArchError, CheckpointError, VitslimError
from .arch import ARCH_VERSION, validate, load_arch, save_arch, to_yaml
from .registry import FAMILIES, Family, get_family, get_preset, preset_names, register_family, register_preset

__all__ = ["ArchError", "CheckpointError", "VitslimError", "ARCH_VERSION", "validate", "load_arch",
           "save_arch", "to_yaml", "FAMILIES", "Family", "get_family", "get_preset", "preset_names",
           "register_family", "register_preset"]
