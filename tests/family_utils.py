"""Checks every family's tests share (import as `family_utils`, a unique module name): random weights
that make every branch count, BatchNorm folding, arch YAML round trips, checkpoint round trips and
arch validation errors."""
import pytest
import torch
import yaml

import vitslim
from supernet.arch import to_yaml

_BN = torch.nn.modules.batchnorm._BatchNorm


def randomise(model, seed=0):
    """Every parameter random (weights x0.3, vectors x0.5): for the LayerNorm families."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5))
    return model.eval()


def randomise_bn(model, seed=0):
    """Random BatchNorm statistics and affine parameters (and attention bias tables): for the
    BatchNorm families, whose folding is only tested by non-trivial statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        for n, p in model.named_parameters():
            if n.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def assert_fuse_keeps_outputs(model, x):
    """`vitslim.fuse` gives the eval outputs to 1e-5 relative and leaves no BatchNorm."""
    fused = vitslim.fuse(model)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not any(isinstance(m, _BN) for m in fused.modules())


def assert_yaml_round_trip_same_shapes(name):
    """A preset written as YAML and read back resolves to itself and builds the same tensors."""
    a = vitslim.get_preset(name)
    b = yaml.safe_load(to_yaml(a))
    assert vitslim.resolve_arch(b) == a
    with torch.device("meta"):
        s1 = {k: v.shape for k, v in vitslim.build_model(a).state_dict().items()}
        s2 = {k: v.shape for k, v in vitslim.build_model(b).state_dict().items()}
    assert s1 == s2


def assert_checkpoint_reproduces(model, arch, x, path):
    """Saved as a vitslim checkpoint and loaded back: the same arch and bit-identical outputs.
    Returns (loaded model, loaded arch)."""
    with torch.no_grad():
        ref = model(x)
    vitslim.save_checkpoint(model, arch, path)
    loaded, a2 = vitslim.load_checkpoint(path)
    assert a2 == vitslim.resolve_arch(arch)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    return loaded, a2


def arch_error(a) -> str:
    """The one-line ArchError an invalid arch raises."""
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.resolve_arch(a)
    return str(e.value)
