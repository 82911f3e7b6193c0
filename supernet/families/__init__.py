"""One module per model family; importing this package registers them all."""
import importlib

_FAMILY_MODULES = ("efficientformer", "efficientvit", "shvit", "deit", "swin")

for _m in _FAMILY_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_m}")
    except ModuleNotFoundError as e:  # a family file not written yet must not break the others
        if e.name != f"{__name__}.{_m}":
            raise
