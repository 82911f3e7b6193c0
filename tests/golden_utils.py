"""Golden-file helpers shared by the family tests (import as `golden_utils`: a unique module name, so
folder conftests never shadow it)."""
import os

import torch

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden")


def golden(name):
    return torch.load(os.path.join(GOLDEN, name + ".pt"), weights_only=True)


def write_shipped(g, path, wrap_model_key):
    """Write the golden state dict as the real release files are: official repos wrap it as
    {"model": sd}; timm files are the bare state dict."""
    sd = g["state_dict"]
    torch.save({"model": sd} if wrap_model_key else sd, path)
    return path


def assert_golden_logits(model, g):
    model.eval()
    with torch.no_grad():
        out = model(g["input"])
    ref = g["logits"]
    assert out.shape == ref.shape
    err = (out - ref).abs().max().item()
    tol = 1e-4 * ref.abs().max().item()
    assert err <= tol, f"max |diff| {err:.3g} > {tol:.3g}"


def with_matrix_1x1_convs(sd):
    """The state dict with every 1x1 convolution weight stored as a matrix (out, in), as the official
    EfficientViT / SHViT loaders expect some release files to hold them (they unsqueeze on a mismatch)."""
    out = dict(sd)
    n = 0
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 4 and v.shape[2:] == (1, 1):
            out[k] = v[:, :, 0, 0].clone()
            n += 1
    assert n > 0
    return out


def assert_matrix_1x1_release_loads(name, tmp_path):
    """A release file ({"model": sd}) whose 1x1 convolutions are matrices loads to the golden logits."""
    import vitslim
    g = golden(name)
    p = tmp_path / "release.pth"
    torch.save({"model": with_matrix_1x1_convs(g["state_dict"])}, p)
    model, _ = vitslim.load_checkpoint(p)
    assert_golden_logits(model, g)
