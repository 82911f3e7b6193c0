"""Swin family: presets, official/timm/vitslim checkpoints, shifted windows at any size, arch configs."""
import pytest
import torch

import vitslim
from family_utils import assert_fuse_keeps_outputs, assert_yaml_round_trip_same_shapes, randomise
from golden_utils import assert_golden_logits, golden
from supernet.families.swin import PatchMerging, shifted_window_mask, window_partition, window_reverse
from supernet.registry import get_family

SEEDS = {  # seeds.md: params exact, MACs (M) at 224
    "swin_tiny": (28_288_354, 4491),
    "swin_small": (49_606_258, 8741),
    "swin_base": (87_768_224, 15431),
}


def tiny_arch(**over):
    """A pruned-looking 3-stage Swin at 32 px (patch 2: sides 16, 8, 4): per-block heads, qk_dim != v_dim,
    a kept scale, a pruned-away attention (on a shifted block) and MLP, per-stage windows."""
    a = {
        "family": "swin", "input_size": 32, "num_classes": 7,
        "stem": {"patch_size": 2},
        "stages": [
            {"width": 12, "window_size": 4, "blocks": [
                {"type": "swin", "heads": 2, "qk_dim": 3, "v_dim": 8, "ffn_hidden": 20},
                {"type": "swin", "heads": 3, "qk_dim": 5, "v_dim": 4, "ffn_hidden": 0, "scale": 0.25}]},
            {"width": 20, "window_size": 3, "downsample": {"type": "patch_merging"}, "blocks": [
                {"type": "swin", "heads": 4, "qk_dim": 2, "v_dim": 6, "ffn_hidden": 33},
                {"type": "swin", "heads": 0, "ffn_hidden": 40},
                {"type": "swin", "heads": 1, "qk_dim": 7, "v_dim": 20, "ffn_hidden": 80}]},
            {"width": 24, "window_size": 7, "downsample": {"type": "patch_merging"}, "blocks": [
                {"type": "swin", "heads": 3, "qk_dim": 8, "v_dim": 8, "ffn_hidden": 96},
                {"type": "swin", "heads": 2, "qk_dim": 4, "v_dim": 12, "ffn_hidden": 50}]},
        ],
    }
    a.update(over)
    return a


def timm_to_official(sd):
    """What the official repository stores: downsample at the end of the previous stage, `head`."""
    import re
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k)
        out[k.replace("head.fc.", "head.")] = v
    return out


# ---------------------------------------------------------------- 1. presets
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_preset_params_exact_and_macs_within_2_percent(name):
    params, macs_m = SEEDS[name]
    c = vitslim.count(vitslim.get_preset(name))
    assert c["params"] == params
    assert abs(c["macs"] / 1e6 - macs_m) <= 0.02 * macs_m


# ---------------------------------------------------------------- 2. goldens
@pytest.mark.parametrize("name, wrapped, input_size", [
    ("swin_p2_w4_d24_official", True, 32),   # official: size read from the attn_mask buffers
    ("swin_p2_w4_d24_timm", False, 224),     # timm: no masks in the file, default size
])
def test_golden_loads_without_hint_and_matches_logits(golden_file, name, wrapped, input_size):
    g, path = golden_file(name, wrapped)
    model, arch = vitslim.load_checkpoint(path)
    assert_golden_logits(model, g)
    cfg = g["config"]
    assert arch["family"] == "swin" and arch["input_size"] == input_size
    assert arch["stem"]["patch_size"] == cfg["patch_size"] and arch["num_classes"] == cfg["num_classes"]
    assert [len(st["blocks"]) for st in arch["stages"]] == list(cfg["depths"])
    assert [st["width"] for st in arch["stages"]] == [cfg["embed_dim"] * 2 ** i for i in range(len(cfg["depths"]))]
    assert [st["window_size"] for st in arch["stages"]] == [cfg["window_size"]] * len(cfg["depths"])
    for st, h in zip(arch["stages"], cfg["num_heads"]):
        d = st["width"] // h
        assert all((b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"]) == (h, d, d, 4 * st["width"])
                   for b in st["blocks"])
    assert [st["downsample"] for st in arch["stages"]] == [None] + [{"type": "patch_merging"}] * (len(cfg["depths"]) - 1)


def test_official_and_timm_goldens_give_the_same_state_dict():
    fam = get_family("swin")
    _, a = fam.convert_state_dict(golden("swin_p2_w4_d24_official")["state_dict"])
    _, b = fam.convert_state_dict(golden("swin_p2_w4_d24_timm")["state_dict"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- 3. fuse
def test_fuse_keeps_outputs_and_leaves_no_batchnorm():
    torch.manual_seed(0)
    m = randomise(vitslim.build_model(tiny_arch()))
    assert_fuse_keeps_outputs(m, torch.randn(2, 3, 32, 32))


# ---------------------------------------------------------------- 4. arch round trips
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_preset_yaml_round_trip_builds_same_shapes(name):
    assert_yaml_round_trip_same_shapes(name)


def test_pruned_config_builds_runs_and_vitslim_checkpoint_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    a = tiny_arch()
    m = randomise(vitslim.build_model(a))
    sd = m.state_dict()
    assert sd["layers.0.blocks.0.attn.qkv.weight"].shape == (2 * (3 + 3 + 8), 12)
    assert sd["layers.1.blocks.2.attn.relative_position_bias_table"].shape == (25, 1)
    assert sd["layers.1.downsample.reduction.weight"].shape == (20, 48)
    assert not any(k.startswith(("layers.1.blocks.1.attn", "layers.1.blocks.1.norm1", "layers.0.blocks.1.mlp")) for k in sd)
    assert not any("relative_position_index" in k or "attn_mask" in k for k in sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    assert ref.shape == (2, 7) and torch.isfinite(ref).all()
    p = tmp_path / "pruned.pt"
    vitslim.save_checkpoint(m, a, p)
    m2, a2 = vitslim.load_checkpoint(p)
    assert a2 == vitslim.resolve_arch(a)
    with torch.no_grad():
        assert torch.equal(m2(x), ref)


def test_bare_and_official_layout_copies_of_own_module_load_exactly(tmp_path):
    # heads come from the bias tables, Q/K and V widths from qkv/proj; a `scale` is not in the
    # tensors (vitslim checkpoints keep it), so this network uses the default scales
    a = tiny_arch()
    del a["stages"][0]["blocks"][1]["scale"]
    torch.manual_seed(0)
    m = randomise(vitslim.build_model(a))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    # official layout: downsample at the end of the previous stage, `head`
    torch.save({"model": timm_to_official(m.state_dict())}, tmp_path / "official.pth")
    want = [st["blocks"] for st in vitslim.resolve_arch(a)["stages"]]
    for f in ("bare.pth", "official.pth"):
        with pytest.warns(UserWarning, match=r"plain state dict of a pruned Swin: the attention scale of 5 block\(s\)"):
            m2, a2 = vitslim.load_checkpoint(tmp_path / f)
        assert [st["blocks"] for st in a2["stages"]] == want
        assert [st["window_size"] for st in a2["stages"]] == [4, 3, 4]
        with torch.no_grad():
            assert torch.equal(m2(x), ref)


def test_runs_at_other_input_sizes_with_padding_and_odd_merging():
    torch.manual_seed(0)
    m = randomise(vitslim.build_model(tiny_arch()))
    with torch.no_grad():
        for hw in [(32, 32), (44, 36), (30, 22), (8, 8)]:
            assert m(torch.randn(1, 3, *hw)).shape == (1, 7)


def test_window_clamped_to_stage_resolution_and_shift_dropped():
    a = vitslim.resolve_arch(tiny_arch())
    assert [st["window_size"] for st in a["stages"]] == [4, 3, 4]  # stage 3 is 4x4 < window 7
    m = vitslim.build_model(a)
    assert m.layers[0].attn_mask.shape == (16, 16, 16)  # 16x16 side, 4x4 windows: shifted mask
    assert m.layers[1].attn_mask.shape == (9, 9, 9)      # 8x8 padded to 9x9, 3x3 windows
    assert m.layers[2].attn_mask is None                 # one window covers the map: no shift


def test_shifted_window_mask_matches_official_construction():
    h = w = 8
    ws, s = 4, 2
    img = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = img.view(1, h // ws, ws, w // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    ref = win.unsqueeze(1) - win.unsqueeze(2)
    ref = ref.masked_fill(ref != 0, -100.0).masked_fill(ref == 0, 0.0)
    assert torch.equal(shifted_window_mask(h, w, ws, (s, s)), ref)


def test_window_partition_round_trip_and_patch_merging_order():
    x = torch.randn(2, 8, 12, 5)
    wins = window_partition(x, 4)
    assert wins.shape == (2, 6, 16, 5)
    assert torch.equal(wins[1, 4].reshape(4, 4, 5), x[1, 4:8, 4:8])  # row-major windows
    assert torch.equal(window_reverse(wins, 4, 8, 12), x)
    pm = PatchMerging(5, 3)
    with torch.no_grad():
        pm.norm.weight.fill_(1.0)
        pm.norm.bias.zero_()
    xx = torch.randn(1, 4, 4, 5)
    ref = torch.cat([xx[:, 0::2, 0::2], xx[:, 1::2, 0::2], xx[:, 0::2, 1::2], xx[:, 1::2, 1::2]], -1)
    with torch.no_grad():
        assert torch.allclose(pm(xx), pm.reduction(pm.norm(ref)))


def test_block_modules_yield_every_block_in_order():
    m = vitslim.build_model(tiny_arch())
    assert [idx for idx, _ in m.block_modules()] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]


# ---------------------------------------------------------------- 5. validation errors
def _with_block(**b):
    a = tiny_arch()
    a["stages"][1]["blocks"][0] = {"type": "swin", **b}
    return a


def _with_stage(i, **st):
    a = tiny_arch()
    a["stages"][i].update(st)
    return a


@pytest.mark.parametrize("arch, needle", [
    (_with_block(heads=3), "stages[1].blocks[0].heads: got 3"),  # 3 does not divide 20 and no qk_dim
    (_with_block(heads=2, qk_dim=0, v_dim=4), "stages[1].blocks[0].qk_dim: got 0"),
    (_with_block(heads=2, qk_dim=2, v_dim=2, ffn_hidden=-1), "stages[1].blocks[0].ffn_hidden: got -1"),
    (_with_block(heads=2, scale=0), "stages[1].blocks[0].scale: got 0"),
    (_with_block(heads=2, shift=True), "stages[1].blocks[0].shift: unknown key"),
    (_with_block(heads=2, type="vit"), "stages[1].blocks[0].type: got 'vit'"),
    (_with_stage(0, downsample={"type": "patch_merging"}), "stages[0].downsample: got"),
    (_with_stage(1, downsample=None), "stages[1].downsample: got None"),
    (_with_stage(1, downsample={"type": "conv"}), "stages[1].downsample: got"),
    (_with_stage(1, downsample={"type": "patch_merging", "ratio": 2}), "stages[1].downsample.ratio: unknown key"),
    (_with_stage(2, window_size=0), "stages[2].window_size: got 0"),
    (_with_stage(2, depths=[2]), "stages[2].depths: unknown key"),
    (tiny_arch(distillation=True), "distillation: got True"),
    (tiny_arch(stem={"patch_size": 2, "norm": True}), "stem.norm: unknown key"),
    (tiny_arch(input_size=16, stem={"patch_size": 32}), "input_size: got 16"),
    (tiny_arch(window_size=7), "window_size: unknown key"),
])
def test_validation_error_names_key_and_value(arch, needle):
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.resolve_arch(arch)
    assert needle in str(e.value)


# ---------------------------------------------------------------- 6. bad checkpoints
def test_wrong_shape_in_timm_file_names_the_key(tmp_path):
    sd = dict(golden("swin_p2_w4_d24_timm")["state_dict"])
    sd["layers.1.blocks.0.norm2.weight"] = torch.zeros(5)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"layers\.1\.blocks\.0\.norm2\.weight"):
        vitslim.load_checkpoint(tmp_path / "bad.pth")


def test_missing_key_in_official_file_names_the_key(tmp_path):
    sd = dict(golden("swin_p2_w4_d24_official")["state_dict"])
    del sd["layers.0.downsample.norm.bias"]  # official key; the loader names it in timm's layout
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"layers\.1\.downsample\.norm\.bias"):
        vitslim.load_checkpoint(tmp_path / "bad.pth")


def test_bad_bias_table_names_the_key(tmp_path):
    sd = dict(golden("swin_p2_w4_d24_timm")["state_dict"])
    sd["layers.0.blocks.1.attn.relative_position_bias_table"] = torch.zeros(50, 2)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"layers\.0\.blocks\.1\.attn\.relative_position_bias_table"):
        vitslim.load_checkpoint(tmp_path / "bad.pth")


def test_matcher_claims_only_swin_layouts():
    fam = get_family("swin")
    assert fam.match_state_dict(golden("swin_p2_w4_d24_official")["state_dict"])
    assert fam.match_state_dict(golden("swin_p2_w4_d24_timm")["state_dict"])
    for other in ("deit_p4_d48_h3_l2", "efficientformer_tiny", "efficientvit_tiny", "shvit_tiny"):
        assert not fam.match_state_dict(golden(other)["state_dict"])
