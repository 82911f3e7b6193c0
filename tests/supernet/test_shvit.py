"""SHViT: presets, official checkpoints, BN folding, arch configs, errors."""
import copy
import re

import pytest
import torch

import vitslim
from supernet.registry import get_family

from family_utils import arch_error as _err, assert_checkpoint_reproduces, assert_fuse_keeps_outputs, \
    assert_yaml_round_trip_same_shapes, randomise_bn
from golden_utils import golden

# model: (exact params, published MACs in M, input size), from seeds.md
TABLE = {
    "shvit_s1": (6_330_808, 241, 224),
    "shvit_s2": (11_483_072, 365, 224),
    "shvit_s3": (14_245_273, 601, 224),
    "shvit_s4": (16_588_484, 986, 256),
}
FAM = get_family("shvit")


def tiny(distillation=False):
    """A small SHViT whose per-block widths differ like a pruned one (pdim == width included)."""
    return {
        "family": "shvit", "input_size": 64, "num_classes": 5, "distillation": distillation,
        "stem": {"widths": [3, 5, 9, 16]},
        "stages": [
            {"width": 16, "downsample": None,
             "blocks": [{"type": "conv", "ffn_hidden": 20}, {"type": "shsa", "pdim": 16, "qk_dim": 4, "ffn_hidden": 8}]},
            {"width": 24, "downsample": {"type": "patch_merging", "hidden": 36, "se_hidden": 10,
                                         "ffn_hidden": 12, "ffn2_hidden": 44},
             "blocks": [{"type": "shsa", "pdim": 5, "qk_dim": 12, "ffn_hidden": 40},
                        {"type": "conv", "ffn_hidden": 16}]},
            {"width": 32, "downsample": {"type": "patch_merging", "hidden": 128, "se_hidden": 32,
                                         "ffn_hidden": 48, "ffn2_hidden": 64},
             "blocks": [{"type": "shsa", "pdim": 9, "qk_dim": 8, "ffn_hidden": 72}]},
        ],
    }


# ---------------------------------------------------------------- 1. presets
@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_params_exact_and_macs_within_2_percent(name):
    params, macs, size = TABLE[name]
    a = vitslim.get_preset(name)
    assert a["input_size"] == size
    c = vitslim.count(a)
    assert c["params"] == params
    assert abs(c["macs"] / 1e6 - macs) <= 0.02 * macs


def test_presets_use_official_widths_and_partial_dims():
    a = vitslim.get_preset("shvit_s3")
    assert [s["width"] for s in a["stages"]] == [192, 352, 448]
    assert [len(s["blocks"]) for s in a["stages"]] == [3, 5, 5]
    assert {b["type"] for b in a["stages"][0]["blocks"]} == {"conv"}
    assert [s["blocks"][0].get("pdim") for s in a["stages"]] == [None, 75, 96]
    assert a["stages"][1]["blocks"][0] == {"type": "shsa", "pdim": 75, "qk_dim": 16, "ffn_hidden": 704}


# ---------------------------------------------------------------- 2. golden file
def test_golden_official_checkpoint_loads_without_hint_and_matches_logits(golden_file):
    from golden_utils import assert_golden_logits
    g, path = golden_file("shvit_tiny", wrap_model_key=True)
    model, arch = vitslim.load_checkpoint(path)
    assert arch["family"] == "shvit"
    assert_golden_logits(model, g)
    cfg = g["config"]
    assert [s["width"] for s in arch["stages"]] == cfg["embed_dim"]
    assert [len(s["blocks"]) for s in arch["stages"]] == cfg["depth"]
    assert arch["num_classes"] == cfg["num_classes"] and arch["distillation"] is False
    for i, st in enumerate(arch["stages"]):
        for b in st["blocks"]:
            assert b["type"] == {"i": "conv", "s": "shsa"}[cfg["types"][i]]
            assert b["ffn_hidden"] == 2 * st["width"]
            if b["type"] == "shsa":
                assert b["pdim"] == cfg["partial_dim"][i] and b["qk_dim"] == cfg["qk_dim"][i]


def test_golden_logits_survive_bn_folding(golden_file):
    g, path = golden_file("shvit_tiny", wrap_model_key=True)
    model, _ = vitslim.load_checkpoint(path)
    with torch.no_grad():
        out = vitslim.fuse(model)(g["input"])
    assert (out - g["logits"]).abs().max() <= 1e-4 * g["logits"].abs().max()


def test_matcher_claims_only_shvit_layouts():
    assert FAM.match_state_dict(golden("shvit_tiny")["state_dict"])
    for other in ("efficientvit_tiny", "efficientformer_tiny", "deit_p4_d48_h3_l2", "deit_distilled_p4_d48_h3_l2",
                  "swin_p2_w4_d24_official", "swin_p2_w4_d24_timm"):
        assert not FAM.match_state_dict(golden(other)["state_dict"]), other


def _to_timm(sd):
    """The golden weights renamed to timm's shvit layout (stages.i.downsample.0-4 / blocks)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"^blocks(\d)\.(\d+)\.(.*)$", k)
        if m:
            s, j, rest = int(m.group(1)) - 1, int(m.group(2)), m.group(3)
            if s > 0 and j < 3:
                if j == 1:
                    k = f"stages.{s}.downsample.2.{rest}"
                else:
                    sub, tail = rest.split(".", 1)
                    k = f"stages.{s}.downsample.{(0 if j == 0 else 3) + int(sub)}.{tail}"
            else:
                k = f"stages.{s}.blocks.{j - 3 if s > 0 else j}.{rest}"
        out[k] = v
    return out


def test_timm_layout_loads_with_same_logits(tmp_path):
    g = golden("shvit_tiny")
    sd = _to_timm(g["state_dict"])
    assert "stages.2.downsample.4.m.pw2.c.weight" in sd and "stages.1.blocks.1.mixer.m.qkv.c.weight" in sd
    p = tmp_path / "timm.pth"
    torch.save(sd, p)
    model, arch = vitslim.load_checkpoint(p)
    assert arch["family"] == "shvit"
    with torch.no_grad():
        assert torch.allclose(model(g["input"]), g["logits"], atol=1e-4 * g["logits"].abs().max().item())


# ---------------------------------------------------------------- 3. BN folding
@pytest.mark.parametrize("distillation", [False, True])
def test_fuse_equals_unfused_eval_and_leaves_no_batchnorm(distillation):
    torch.manual_seed(0)
    model = randomise_bn(vitslim.build_model(tiny(distillation)))
    assert_fuse_keeps_outputs(model, torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------- 4. arch round trips
def test_preset_yaml_round_trip_builds_same_state_dict_shapes():
    assert_yaml_round_trip_same_shapes("shvit_s4")


def test_pruned_config_builds_runs_and_checkpoint_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    model = randomise_bn(vitslim.build_model(tiny(distillation=True)))
    assert model.blocks2[3].mixer.m.qkv.c.weight.shape == (2 * 12 + 5, 5, 1, 1)
    assert isinstance(model.blocks2[4].mixer, torch.nn.Identity)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    assert_checkpoint_reproduces(model, model.arch, x, tmp_path / "pruned.pt")


def test_bare_own_state_dict_reads_back_the_arch_from_shapes(tmp_path):
    torch.manual_seed(0)
    a = vitslim.resolve_arch(tiny(distillation=True))
    model = randomise_bn(vitslim.build_model(a))
    p = tmp_path / "bare.pth"
    torch.save(model.state_dict(), p)
    loaded, arch = vitslim.load_checkpoint(p)
    assert arch == dict(a, input_size=224)  # SHViT checkpoints do not record the input size
    x = torch.randn(1, 3, 80, 48)           # global attention: any input size runs
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_block_modules_walk_every_block_in_arch_order():
    model = vitslim.build_model(tiny())
    got = [(ij, type(m.mixer).__name__) for ij, m in model.block_modules()]
    assert got == [((0, 0), "Identity"), ((0, 1), "Residual"), ((1, 0), "Residual"), ((1, 1), "Identity"),
                   ((2, 0), "Residual")]


# ---------------------------------------------------------------- 5. validation errors
def test_partial_dim_must_fit_the_width():
    a = tiny()
    a["stages"][1]["blocks"][0]["pdim"] = 25
    assert re.search(r"stages\[1\]\.blocks\[0\]\.pdim: got 25, expected at most the stage width \(24\)", _err(a))
    a = tiny()
    a["stages"][1]["blocks"][0]["pdim"] = 0
    assert re.search(r"stages\[1\]\.blocks\[0\]\.pdim: got 0, expected an integer >= 1", _err(a))
    a = tiny()
    del a["stages"][2]["blocks"][0]["pdim"]
    assert re.search(r"stages\[2\]\.blocks\[0\]\.pdim: missing", _err(a))


def test_bad_sizes_are_rejected_with_their_path():
    a = tiny()
    a["stages"][2]["blocks"][0]["qk_dim"] = 0
    assert re.search(r"stages\[2\]\.blocks\[0\]\.qk_dim: got 0, expected an integer >= 1", _err(a))
    a = tiny()
    a["stages"][0]["blocks"][0]["ffn_hidden"] = 2.5
    assert re.search(r"stages\[0\]\.blocks\[0\]\.ffn_hidden: got 2\.5, expected an integer", _err(a))
    a = tiny()
    a["stages"][1]["downsample"]["se_hidden"] = 0
    assert re.search(r"stages\[1\]\.downsample\.se_hidden: got 0", _err(a))


def test_block_type_of_another_family_is_rejected():
    a = tiny()
    a["stages"][0]["blocks"][1]["type"] = "cga"
    assert re.search(r"stages\[0\]\.blocks\[1\]\.type: got 'cga', expected one of 'conv', 'shsa'", _err(a))


def test_unknown_keys_are_rejected():
    a = tiny()
    a["stages"][0]["blocks"][0]["pdim"] = 4  # a conv block has no attention widths
    assert "stages[0].blocks[0].pdim: unknown key" in _err(a)
    a = tiny()
    a["stages"][1]["blocks"][0]["heads"] = 1
    assert "stages[1].blocks[0].heads: unknown key" in _err(a)
    a = tiny()
    a["stem"]["depth"] = 4
    assert "stem.depth: unknown key" in _err(a)


def test_downsample_placement_is_checked():
    a = tiny()
    a["stages"][0]["downsample"] = copy.deepcopy(a["stages"][1]["downsample"])
    assert re.search(r"stages\[0\]\.downsample: got \{.*\}, expected null", _err(a))
    a = tiny()
    a["stages"][1]["downsample"] = None
    assert re.search(r"stages\[1\]\.downsample: got None, expected a patch_merging downsample", _err(a))


# ---------------------------------------------------------------- 6. bad checkpoints
def test_tensor_of_wrong_shape_names_the_key(tmp_path):
    sd = dict(golden("shvit_tiny")["state_dict"])
    sd["blocks2.4.mixer.m.proj.1.c.weight"] = torch.zeros(48, 47, 1, 1)
    p = tmp_path / "bad.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"blocks2\.4\.mixer\.m\.proj\.1\.c\.weight"):
        vitslim.load_checkpoint(p)


def test_missing_key_names_the_key(tmp_path):
    sd = dict(golden("shvit_tiny")["state_dict"])
    del sd["blocks3.1.se.fc2.bias"]
    p = tmp_path / "bad.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"missing keys blocks3\.1\.se\.fc2\.bias"):
        vitslim.load_checkpoint(p)


@pytest.mark.parametrize("name", ["shvit_s4", "shvit_s2"])
def test_official_file_of_a_preset_gets_the_size_it_was_trained_at(tmp_path, name):
    """The shapes do not say the input size; those of a preset give its size (S4: 256, not 224)."""
    with torch.device("meta"):
        sd = vitslim.build_model(name).state_dict()
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in sd.items()}
    p = tmp_path / f"{name}.pth"
    torch.save({"model": sd}, p)
    _, arch = vitslim.load_checkpoint(p)
    assert arch == vitslim.get_preset(name)
    assert vitslim.count(arch)["macs"] == vitslim.count(name)["macs"]


def test_release_file_with_matrix_1x1_convs_loads_to_the_golden_logits(tmp_path):
    from golden_utils import assert_matrix_1x1_release_loads
    assert_matrix_1x1_release_loads("shvit_tiny", tmp_path)
