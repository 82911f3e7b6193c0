"""EfficientViT (Cream): presets, official checkpoints, BN folding, arch configs, errors."""
import copy
import re

import pytest
import torch

import vitslim
from supernet.registry import get_family

from family_utils import arch_error as _err, assert_checkpoint_reproduces, assert_fuse_keeps_outputs, \
    assert_yaml_round_trip_same_shapes, randomise_bn
from golden_utils import golden

# model: (exact params, published MACs in M) at 224, from seeds.md
TABLE = {
    "efficientvit_m0": (2_349_436, 79),
    "efficientvit_m1": (2_980_560, 167),
    "efficientvit_m2": (4_187_554, 201),
    "efficientvit_m3": (6_900_722, 263),
    "efficientvit_m4": (8_804_228, 299),
    "efficientvit_m5": (12_473_772, 522),
}
FAM = get_family("efficientvit")


def tiny(input_size=64, distillation=False):
    """A small three-stage EfficientViT with per-block widths that differ like a pruned one."""
    def blk(heads, qk, width, kernels, f1, f2, win=7):
        return {"type": "cga", "heads": heads, "qk_dim": qk, "v_dim": width // heads, "kernels": kernels,
                "ffn_hidden": f1, "ffn2_hidden": f2, "window_size": win}
    return {
        "family": "efficientvit", "input_size": input_size, "num_classes": 7, "distillation": distillation,
        "stem": {"widths": [4, 6, 10, 16]},
        "stages": [
            {"width": 16, "downsample": None, "blocks": [blk(2, 8, 16, [5, 3], 24, 40, win=2)]},
            {"width": 24, "downsample": {"type": "patch_merging", "hidden": 40, "se_hidden": 12,
                                         "ffn_hidden": 20, "ffn2_hidden": 36},
             "blocks": [blk(3, 4, 24, [3, 5, 7], 48, 30), blk(1, 12, 24, [3], 16, 8)]},
            {"width": 32, "downsample": {"type": "patch_merging", "hidden": 64, "se_hidden": 8,
                                         "ffn_hidden": 28, "ffn2_hidden": 64},
             "blocks": [blk(4, 6, 32, [1, 3, 5, 7], 20, 52)]},
        ],
    }


# ---------------------------------------------------------------- 1. presets
@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_params_exact_and_macs_within_2_percent(name):
    params, macs = TABLE[name]
    c = vitslim.count(vitslim.get_preset(name))
    assert c["params"] == params
    assert abs(c["macs"] / 1e6 - macs) <= 0.02 * macs


def test_presets_use_official_widths_heads_and_kernels():
    a = vitslim.get_preset("efficientvit_m5")
    assert [s["width"] for s in a["stages"]] == [192, 288, 384]
    assert [len(s["blocks"]) for s in a["stages"]] == [1, 3, 4]
    assert [s["blocks"][0]["heads"] for s in a["stages"]] == [3, 3, 4]
    assert a["stages"][2]["blocks"][0]["kernels"] == [7, 5, 3, 3]
    assert a["stages"][1]["downsample"] == {"type": "patch_merging", "hidden": 768, "se_hidden": 192,
                                            "ffn_hidden": 384, "ffn2_hidden": 576}
    assert a["stem"] == {"widths": [24, 48, 96, 192]} and a["distillation"] is False


# ---------------------------------------------------------------- 2. golden file
def test_golden_official_checkpoint_loads_without_hint_and_matches_logits(golden_file):
    from golden_utils import assert_golden_logits
    g, path = golden_file("efficientvit_tiny", wrap_model_key=True)
    model, arch = vitslim.load_checkpoint(path)
    assert arch["family"] == "efficientvit"
    assert_golden_logits(model, g)
    cfg = g["config"]
    assert [s["width"] for s in arch["stages"]] == cfg["embed_dim"]
    assert [len(s["blocks"]) for s in arch["stages"]] == cfg["depth"]
    assert arch["num_classes"] == cfg["num_classes"] and arch["input_size"] == cfg["img_size"]
    for i, st in enumerate(arch["stages"]):
        for b in st["blocks"]:
            assert b["heads"] == cfg["num_heads"][i]
            assert b["qk_dim"] == cfg["key_dim"][i]
            assert b["v_dim"] == cfg["embed_dim"][i] // cfg["num_heads"][i]
            assert b["window_size"] == cfg["window_size"][i]
            assert b["kernels"] == cfg["kernels"][: b["heads"]]
            assert b["ffn_hidden"] == b["ffn2_hidden"] == 2 * st["width"]
    assert arch["distillation"] is False


def test_golden_logits_survive_bn_folding(golden_file):
    g, path = golden_file("efficientvit_tiny", wrap_model_key=True)
    model, _ = vitslim.load_checkpoint(path)
    fused = vitslim.fuse(model)
    with torch.no_grad():
        out = fused(g["input"])
    assert (out - g["logits"]).abs().max() <= 1e-4 * g["logits"].abs().max()


def test_matcher_claims_only_efficientvit_layouts():
    evit = golden("efficientvit_tiny")["state_dict"]
    assert FAM.match_state_dict(evit)
    for other in ("shvit_tiny", "efficientformer_tiny", "deit_p4_d48_h3_l2", "deit_distilled_p4_d48_h3_l2",
                  "swin_p2_w4_d24_official", "swin_p2_w4_d24_timm"):
        assert not FAM.match_state_dict(golden(other)["state_dict"]), other


def _to_timm(sd):
    """The golden weights renamed to timm's efficientvit_msra layout (stages.i.downsample/blocks)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[-2] == "c":
            parts[-2] = "conv"
        if parts[0] == "head" and parts[1] == "l":
            parts[1] = "linear"
        if parts[0] == "patch_embed":
            parts[1] = f"conv{int(parts[1]) // 2 + 1}"
        m = re.match(r"blocks(\d)", parts[0])
        if m:
            s, j = int(m.group(1)) - 1, int(parts[1])
            if s > 0 and j < 3:
                parts[:2] = [f"stages.{s}.downsample", ("res1", "patchmerge", "res2")[j]]
            else:
                parts[:2] = [f"stages.{s}.blocks", str(j - 3 if s > 0 else j)]
        out[".".join(parts)] = v
    return out


def test_timm_layout_loads_with_same_logits(tmp_path):
    g = golden("efficientvit_tiny")
    sd = _to_timm(g["state_dict"])
    assert "stages.1.downsample.patchmerge.se.fc1.weight" in sd and "head.linear.weight" in sd
    p = tmp_path / "timm.pth"
    torch.save(sd, p)
    model, arch = vitslim.load_checkpoint(p)
    with torch.no_grad():
        assert torch.allclose(model(g["input"]), g["logits"], atol=1e-4 * g["logits"].abs().max().item())
    assert [len(s["blocks"]) for s in arch["stages"]] == [1, 1, 1]


# ---------------------------------------------------------------- 3. BN folding
@pytest.mark.parametrize("distillation", [False, True])
def test_fuse_equals_unfused_eval_and_leaves_no_batchnorm(distillation):
    torch.manual_seed(0)
    model = randomise_bn(vitslim.build_model(tiny(distillation=distillation)))
    assert_fuse_keeps_outputs(model, torch.randn(2, 3, 64, 64))


# ---------------------------------------------------------------- 4. arch round trips
def test_preset_yaml_round_trip_builds_same_state_dict_shapes():
    assert_yaml_round_trip_same_shapes("efficientvit_m1")


def test_pruned_config_builds_runs_and_checkpoint_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    a = tiny(distillation=True)
    model = randomise_bn(vitslim.build_model(a))
    attn = model.blocks2[3].mixer.m.attn
    assert attn.qkvs[0].c.weight.shape == (2 * 4 + 8, 8, 1, 1) and attn.dws[2].c.weight.shape[-1] == 7
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    assert_checkpoint_reproduces(model, model.arch, x, tmp_path / "pruned.pt")


def test_bare_own_state_dict_reads_back_the_arch_from_shapes(tmp_path):
    torch.manual_seed(0)
    a = vitslim.resolve_arch(tiny(input_size=224, distillation=True))
    model = randomise_bn(vitslim.build_model(a))
    p = tmp_path / "bare.pth"
    torch.save(model.state_dict(), p)
    loaded, arch = vitslim.load_checkpoint(p)
    # the 2x2 window of stage 0 is smaller than its 14x14 map: recovered from the bias table
    assert arch == a
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_block_modules_walk_every_block_in_arch_order():
    model = vitslim.build_model(tiny())
    got = [(ij, type(m).__name__) for ij, m in model.block_modules()]
    assert got == [((0, 0), "EfficientViTBlock"), ((1, 0), "EfficientViTBlock"), ((1, 1), "EfficientViTBlock"),
                   ((2, 0), "EfficientViTBlock")]
    assert [m.mixer.m.attn.heads for _, m in model.block_modules()] == [2, 3, 1, 4]


def test_other_input_sizes_run_while_windows_fit_their_bias_tables():
    model = vitslim.build_model(tiny(input_size=64)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 7)
        assert model(torch.randn(1, 3, 64, 48)).shape == (1, 7)


# ---------------------------------------------------------------- 5. validation errors
def test_heads_must_divide_the_width():
    a = tiny()
    a["stages"][1]["blocks"][0]["heads"] = 5
    assert re.search(r"stages\[1\]\.blocks\[0\]\.heads: got 5, expected a divisor of the stage width \(24\)", _err(a))


def test_v_dim_must_be_width_over_heads():
    a = tiny()
    a["stages"][2]["blocks"][0]["v_dim"] = 16
    assert re.search(r"stages\[2\]\.blocks\[0\]\.v_dim: got 16, expected 8", _err(a))


def test_kernels_need_one_odd_size_per_head():
    a = tiny()
    a["stages"][0]["blocks"][0]["kernels"] = [5]
    assert re.search(r"stages\[0\]\.blocks\[0\]\.kernels: got \[5\], expected a list of 2 items", _err(a))
    a = tiny()
    a["stages"][0]["blocks"][0]["kernels"] = [5, 4]
    assert re.search(r"stages\[0\]\.blocks\[0\]\.kernels\[1\]: got 4, expected an odd kernel size", _err(a))


def test_bad_sizes_are_rejected_with_their_path():
    a = tiny()
    a["stages"][1]["blocks"][1]["qk_dim"] = 0
    assert re.search(r"stages\[1\]\.blocks\[1\]\.qk_dim: got 0, expected an integer >= 1", _err(a))
    a = tiny()
    a["stages"][2]["downsample"]["hidden"] = -4
    assert re.search(r"stages\[2\]\.downsample\.hidden: got -4", _err(a))
    a = tiny()
    a["stem"]["widths"][3] = 12
    assert re.search(r"stem\.widths\[3\]: got 12, expected the width of stages\[0\] \(16\)", _err(a))


def test_block_type_of_another_family_is_rejected():
    a = tiny()
    a["stages"][1]["blocks"][0]["type"] = "shsa"
    assert re.search(r"stages\[1\]\.blocks\[0\]\.type: got 'shsa', expected one of 'cga'", _err(a))


def test_unknown_keys_are_rejected():
    a = tiny()
    a["stages"][0]["blocks"][0]["pdim"] = 4
    assert "stages[0].blocks[0].pdim: unknown key" in _err(a)
    a = tiny()
    a["stages"][1]["downsample"]["ratio"] = 4
    assert "stages[1].downsample.ratio: unknown key" in _err(a)
    a = tiny()
    a["stages"][1]["depth"] = 2
    assert "stages[1].depth: unknown key" in _err(a)
    a = tiny()
    a["window"] = 7
    assert "window: unknown key" in _err(a)


def test_downsample_placement_is_checked():
    a = tiny()
    a["stages"][0]["downsample"] = copy.deepcopy(a["stages"][1]["downsample"])
    assert re.search(r"stages\[0\]\.downsample: got \{.*\}, expected null", _err(a))
    a = tiny()
    a["stages"][2]["downsample"] = None
    assert re.search(r"stages\[2\]\.downsample: got None, expected a patch_merging downsample", _err(a))
    a = tiny()
    a["stages"][1]["downsample"]["type"] = "conv"
    assert re.search(r"stages\[1\]\.downsample\.type: got 'conv', expected one of 'patch_merging'", _err(a))


# ---------------------------------------------------------------- 6. bad checkpoints
def test_tensor_of_wrong_shape_names_the_key(tmp_path):
    sd = dict(golden("efficientvit_tiny")["state_dict"])
    sd["blocks2.3.ffn1.m.pw2.c.weight"] = torch.zeros(48, 95, 1, 1)
    p = tmp_path / "bad.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"blocks2\.3\.ffn1\.m\.pw2\.c\.weight"):
        vitslim.load_checkpoint(p)


def test_missing_key_names_the_key(tmp_path):
    sd = dict(golden("efficientvit_tiny")["state_dict"])
    del sd["blocks3.3.mixer.m.attn.proj.1.bn.running_var"]
    p = tmp_path / "bad.pth"
    torch.save({"model": sd}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"missing keys blocks3\.3\.mixer\.m\.attn\.proj\.1\.bn\.running_var"):
        vitslim.load_checkpoint(p)
    del sd["head.l.weight"]
    torch.save({"model": sd}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"head\.l\.weight"):
        vitslim.load_checkpoint(p)


def test_release_file_with_matrix_1x1_convs_loads_to_the_golden_logits(tmp_path):
    from golden_utils import assert_matrix_1x1_release_loads
    assert_matrix_1x1_release_loads("efficientvit_tiny", tmp_path)
