"""Randomized differential checks of the arch machinery on every family (seeded: a failure names its case and
reproduces): a random valid arch survives YAML and checkpoint round trips unchanged, `count` agrees with the
parameters of the built module and with MACs counted independently at the level of torch functions
(random_archs.MacCounter: Linear, Conv2d, matmuls and the attention products), and the fused network computes
what the unfused one does."""
import random

import pytest
import torch
import yaml

import vitslim
from family_utils import randomise, randomise_bn
from random_archs import FAMILIES, random_arch, reference_macs
from supernet.arch import to_yaml

CASES = {"deit": 6, "swin": 6, "efficientformer": 3, "efficientvit": 2, "shvit": 2}


@pytest.mark.parametrize("family", FAMILIES)
def test_random_archs_round_trip_count_and_fuse(family, tmp_path):
    r = random.Random(f"arch-{family}")
    for case in range(CASES[family]):
        arch = random_arch(family, r)
        assert vitslim.resolve_arch(yaml.safe_load(to_yaml(arch))) == arch, case
        vitslim.save_arch(arch, tmp_path / "a.yaml")
        assert vitslim.load_arch(tmp_path / "a.yaml") == arch, case

        torch.manual_seed(case)
        model = (randomise if family in ("deit", "swin") else randomise_bn)(vitslim.build_model(arch), case)
        size, chans = arch["input_size"], arch["in_chans"]
        c = vitslim.count(arch)
        assert c == {"params": sum(p.numel() for p in model.parameters()),
                     "macs": reference_macs(model, size, chans)}, (case, arch)
        assert vitslim.count(model) == c, case

        x = torch.randn(2, chans, size, size, generator=torch.Generator().manual_seed(case))
        with torch.no_grad():
            want = model(x)
            fused = vitslim.fuse(model)(x)
        vitslim.save_checkpoint(model, arch, tmp_path / "m.pt")
        loaded, arch2 = vitslim.load_checkpoint(tmp_path / "m.pt")
        with torch.no_grad():
            assert arch2 == arch and torch.equal(loaded(x), want), case
        assert (fused - want).abs().max() <= 1e-5 * want.abs().max(), (case, arch)
