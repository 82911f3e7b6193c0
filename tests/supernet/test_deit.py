"""DeiT/ViT family: presets, official/timm/vitslim checkpoints, flexible attention, arch configs."""
import pytest
import torch

import vitslim
from family_utils import assert_fuse_keeps_outputs, assert_yaml_round_trip_same_shapes, randomise
from golden_utils import assert_golden_logits, golden
from supernet.families.deit import Attention, vit_default_heads
from supernet.registry import get_family

SEEDS = {  # seeds.md: params exact, MACs (M) at 224, no distillation token
    "deit_tiny": (5_717_416, 1254),
    "deit_small": (22_050_664, 4599),
    "deit_base": (86_567_656, 17564),
}


def tiny_arch(**over):
    """A pruned-looking DeiT at 32 px: per-block heads, qk_dim != v_dim, a scale kept from training,
    a block whose attention was pruned away and one without MLP."""
    a = {
        "family": "deit", "input_size": 32, "num_classes": 7, "distillation": True,
        "stem": {"patch_size": 8},
        "stages": [{"width": 24, "blocks": [
            {"type": "vit", "heads": 3, "qk_dim": 4, "v_dim": 10, "ffn_hidden": 40},
            {"type": "vit", "heads": 2, "qk_dim": 6, "v_dim": 5, "ffn_hidden": 0, "scale": 0.125},
            {"type": "vit", "heads": 0, "ffn_hidden": 17},
            {"type": "vit", "heads": 1, "qk_dim": 3, "v_dim": 24, "ffn_hidden": 96},
        ]}],
    }
    a.update(over)
    return a


# ---------------------------------------------------------------- 1. presets
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_preset_params_exact_and_macs_within_2_percent(name):
    params, macs_m = SEEDS[name]
    c = vitslim.count(vitslim.get_preset(name))
    assert c["params"] == params
    assert abs(c["macs"] / 1e6 - macs_m) <= 0.02 * macs_m


# ---------------------------------------------------------------- 2. goldens
@pytest.mark.parametrize("name", ["deit_p4_d48_h3_l2", "deit_distilled_p4_d48_h3_l2"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["official_model_key", "timm_bare"])
def test_golden_loads_without_hint_and_matches_logits(golden_file, name, wrapped):
    g, path = golden_file(name, wrapped)
    model, arch = vitslim.load_checkpoint(path)
    assert_golden_logits(model, g)
    cfg = g["config"]
    st = arch["stages"][0]
    assert arch["family"] == "deit"
    assert arch["input_size"] == cfg["img_size"] and arch["stem"]["patch_size"] == cfg["patch_size"]
    assert arch["num_classes"] == cfg["num_classes"] and arch["distillation"] == cfg["distilled"]
    assert st["width"] == cfg["embed_dim"] and len(st["blocks"]) == cfg["depth"]
    d = cfg["embed_dim"] // cfg["num_heads"]
    for b in st["blocks"]:
        assert (b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"]) == (cfg["num_heads"], d, d, 4 * cfg["embed_dim"])


def test_heads_of_zoo_widths_follow_timm_convention():
    assert [vit_default_heads(w) for w in (192, 384, 768, 1024, 1280, 48)] == [3, 6, 12, 16, 16, 3]


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
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * (4 + 4 + 10), 24)
    assert sd["blocks.0.attn.proj.weight"].shape == (24, 30)
    assert not any(k.startswith(("blocks.2.attn.", "blocks.2.norm1", "blocks.1.mlp.", "blocks.1.norm2")) for k in sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    assert ref.shape == (2, 7) and torch.isfinite(ref).all()
    p = tmp_path / "pruned.pt"
    vitslim.save_checkpoint(m, a, p)
    m2, a2 = vitslim.load_checkpoint(p)
    assert a2 == vitslim.resolve_arch(a) and a2["stages"][0]["blocks"][1]["scale"] == 0.125
    with torch.no_grad():
        assert torch.equal(m2(x), ref)


def test_flexible_attention_matches_explicit_softmax_with_timm_qkv_layout():
    torch.manual_seed(0)
    h, dq, dv, n, dim = 3, 4, 7, 5, 12
    attn = Attention(dim, h, dq, dv, scale=0.3)
    x = torch.randn(2, n, dim)
    qkv = attn.qkv(x)
    q = qkv[..., :h * dq].reshape(2, n, h, dq).transpose(1, 2)
    k = qkv[..., h * dq:2 * h * dq].reshape(2, n, h, dq).transpose(1, 2)
    v = qkv[..., 2 * h * dq:].reshape(2, n, h, dv).transpose(1, 2)
    ref = attn.proj(((q @ k.transpose(-2, -1)) * 0.3).softmax(-1).matmul(v).transpose(1, 2).reshape(2, n, h * dv))
    with torch.no_grad():
        assert torch.allclose(attn(x), ref, atol=1e-6)
    assert Attention(dim, h, 16, dv).scale == 16 ** -0.5


def test_bare_state_dict_of_own_module_loads_with_inferred_pruned_widths(tmp_path):
    # a bare state dict cannot record heads: widths kept whole-head (64 per head) come back exactly
    a = {"family": "deit", "input_size": 32, "num_classes": 3, "stem": {"patch_size": 16},
         "stages": [{"width": 192, "blocks": [
             {"type": "vit", "heads": 2, "qk_dim": 64, "v_dim": 64, "ffn_hidden": 100},
             {"type": "vit", "heads": 3, "qk_dim": 16, "v_dim": 48, "ffn_hidden": 0},
             {"type": "vit", "heads": 0, "ffn_hidden": 8}]}]}
    torch.manual_seed(0)
    m = vitslim.build_model(a).eval()
    torch.save(m.state_dict(), tmp_path / "bare.pth")
    with pytest.warns(UserWarning, match=r"plain state dict of a pruned DeiT: the head counts of 2 block\(s\) are guessed"):
        m2, a2 = vitslim.load_checkpoint(tmp_path / "bare.pth")
    assert a2 == vitslim.resolve_arch(a)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def test_other_input_size_resamples_pos_embed_and_distilled_training_returns_both_heads():
    torch.manual_seed(0)
    m = randomise(vitslim.build_model(tiny_arch()))
    with torch.no_grad():
        assert m(torch.randn(1, 3, 48, 40)).shape == (1, 7)
    m.train()
    out = m(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor)
    m.distilled_training = True
    cls, dist = m(torch.randn(2, 3, 32, 32))
    assert cls.shape == dist.shape == (2, 7)


def test_block_modules_yield_every_block_in_order():
    m = vitslim.build_model(tiny_arch())
    assert [idx for idx, _ in m.block_modules()] == [(0, j) for j in range(4)]


# ---------------------------------------------------------------- 5. validation errors
def _with_block(**b):
    a = tiny_arch()
    a["stages"][0]["blocks"][0] = {"type": "vit", **b}
    return a


@pytest.mark.parametrize("arch, needle", [
    (_with_block(heads=5), "stages[0].blocks[0].heads: got 5"),  # 5 does not divide 24 and no qk_dim
    (_with_block(heads=2, qk_dim=0, v_dim=4), "stages[0].blocks[0].qk_dim: got 0"),
    (_with_block(heads=2, qk_dim=4, v_dim=-1), "stages[0].blocks[0].v_dim: got -1"),
    (_with_block(heads=-1), "stages[0].blocks[0].heads: got -1"),
    (_with_block(heads=2, ffn_hidden=-3), "stages[0].blocks[0].ffn_hidden: got -3"),
    (_with_block(heads=2, scale=-0.5), "stages[0].blocks[0].scale: got -0.5"),
    (_with_block(heads=2, window_size=7), "stages[0].blocks[0].window_size: unknown key"),
    (_with_block(heads=2, type="swin"), "stages[0].blocks[0].type: got 'swin'"),
    (tiny_arch(stem={"patch": 8}), "stem.patch: unknown key"),
    (tiny_arch(stem={"patch_size": 0}), "stem.patch_size: got 0"),
    (tiny_arch(input_size=16, stem={"patch_size": 32}), "input_size: got 16"),
    (tiny_arch(stages=[{"width": 24, "blocks": []}, {"width": 24, "blocks": []}]), "stages: got"),
    (tiny_arch(stages=[{"width": 24, "downsample": {"type": "conv"}, "blocks": []}]), "stages[0].downsample: got"),
    (tiny_arch(stages=[{"width": 24, "depth": 3, "blocks": []}]), "stages[0].depth: unknown key"),
    (tiny_arch(window_size=7), "window_size: unknown key"),
])
def test_validation_error_names_key_and_value(arch, needle):
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.resolve_arch(arch)
    assert needle in str(e.value)


def test_defaults_fill_head_dims_and_mlp_ratio_4():
    a = vitslim.resolve_arch(_with_block(heads=4))
    assert a["stages"][0]["blocks"][0] == {"type": "vit", "heads": 4, "qk_dim": 6, "v_dim": 6, "ffn_hidden": 96}


# ---------------------------------------------------------------- 6. bad checkpoints
def test_wrong_shape_in_timm_file_names_the_key(tmp_path):
    sd = dict(golden("deit_p4_d48_h3_l2")["state_dict"])
    sd["blocks.1.norm2.weight"] = torch.zeros(47)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"blocks\.1\.norm2\.weight"):
        vitslim.load_checkpoint(tmp_path / "bad.pth")


def test_missing_key_in_official_file_names_the_key(tmp_path):
    sd = dict(golden("deit_distilled_p4_d48_h3_l2")["state_dict"])
    del sd["blocks.0.mlp.fc2.bias"]
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"blocks\.0\.mlp\.fc2\.bias"):
        vitslim.load_checkpoint(tmp_path / "bad.pth")


def test_wrong_shape_in_vitslim_checkpoint_names_the_key(tmp_path):
    a = tiny_arch()
    sd = vitslim.build_model(a).state_dict()
    sd["blocks.3.attn.qkv.weight"] = torch.zeros(5, 24)
    torch.save({"format": "vitslim-checkpoint", "version": 1, "arch": vitslim.resolve_arch(a), "state_dict": sd},
               tmp_path / "bad.pt")
    with pytest.raises(vitslim.CheckpointError, match=r"blocks\.3\.attn\.qkv\.weight"):
        vitslim.load_checkpoint(tmp_path / "bad.pt")


def test_matcher_claims_only_deit_layouts():
    fam = get_family("deit")
    assert fam.match_state_dict(golden("deit_p4_d48_h3_l2")["state_dict"])
    assert not fam.match_state_dict(golden("swin_p2_w4_d24_timm")["state_dict"])
    assert not fam.match_state_dict(golden("efficientformer_tiny")["state_dict"])
    assert not fam.match_state_dict({**golden("deit_p4_d48_h3_l2")["state_dict"], "blocks.0.ls1.gamma": torch.ones(48)})
