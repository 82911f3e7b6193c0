"""One module per model family; importing this package registers them all (in this order: the order
checkpoints are matched against the families)."""
from . import efficientformer, efficientvit, shvit, deit, swin  # noqa: F401,I001
