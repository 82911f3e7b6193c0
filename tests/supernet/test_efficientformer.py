"""EfficientFormer V1 family: presets, official/timm/vitslim checkpoints, fusion, arch configs."""
import copy
import re

import pytest
import torch
import yaml

import vitslim
from golden_utils import assert_golden_logits, golden
from supernet.arch import to_yaml
from supernet.families.efficientformer import Attention, Meta3D, _layout
from supernet.registry import get_family

SEEDS = {  # seeds.md: params exact (with dist_head), MACs (M) at 224
    "efficientformer_l1": (12_289_928, 1291),
    "efficientformer_l3": (31_406_000, 3907),
    "efficientformer_l7": (82_229_328, 10119),
}


def tiny_arch(**over):
    """4 stages at 64 px (grids 16, 8, 4, 2) with Meta3D in stages 3 and 4 and identity blocks;
    widths differ per block the way a pruned network's would."""
    a = {
        "family": "efficientformer", "input_size": 64, "num_classes": 7, "distillation": True,
        "stem": {"widths": [6, 12]},
        "stages": [
            {"width": 12, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 20}, {"type": "identity"}]},
            {"width": 16, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 40}]},
            {"width": 24, "downsample": {"type": "conv"}, "blocks": [
                {"type": "meta4d", "ffn_hidden": 48},
                {"type": "meta3d", "heads": 3, "qk_dim": 4, "v_dim": 10, "ffn_hidden": 36},
                {"type": "identity"}]},
            {"width": 32, "downsample": {"type": "conv"}, "blocks": [
                {"type": "identity"},
                {"type": "meta4d", "ffn_hidden": 64},
                {"type": "meta3d", "heads": 2, "qk_dim": 8, "v_dim": 5, "ffn_hidden": 100},
                {"type": "meta3d", "heads": 5, "qk_dim": 3, "v_dim": 6, "ffn_hidden": 80}]},
        ],
    }
    a.update(over)
    return a


def randomise(model, seed=0):
    """Unit-scale weights, layer scales near 1 and random BatchNorm statistics, so every branch counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.5) + (1.0 if "layer_scale" in name else 0.0))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def official_to_timm(sd):
    """Rename an official EfficientFormer state dict into timm's layout (as timm's filter does)."""
    out = {}
    stem = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}
    for k, v in sd.items():
        m = re.match(r"patch_embed\.(\d)\.(.*)", k)
        n = re.match(r"network\.(\d+)\.(.*)", k)
        if m:
            k = f"stem.{stem[m.group(1)]}.{m.group(2)}"
        elif n:
            i, rest = int(n.group(1)), n.group(2)
            k = (f"stages.{(i + 1) // 2}.downsample.{rest.replace('proj.', 'conv.')}" if i % 2
                 else f"stages.{i // 2}.blocks.{rest}")
        k = k.replace("layer_scale_1", "ls1.gamma").replace("layer_scale_2", "ls2.gamma")
        out[k.replace("dist_head.", "head_dist.")] = v
    return out


# ---------------------------------------------------------------- 1. presets
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_preset_params_exact_and_macs_within_2_percent_of_seeds(name):
    params, macs_m = SEEDS[name]
    c = vitslim.count(vitslim.get_preset(name))
    assert c["params"] == params
    assert abs(c["macs"] / 1e6 - macs_m) <= 0.02 * macs_m


def test_preset_l1_has_one_meta3d_at_the_end_of_stage_4_with_official_widths():
    a = vitslim.get_preset("efficientformer_l1")
    assert [s["width"] for s in a["stages"]] == [48, 96, 224, 448]
    assert [len(s["blocks"]) for s in a["stages"]] == [3, 2, 6, 4]
    assert a["stages"][3]["blocks"][-1] == {"type": "meta3d", "heads": 8, "qk_dim": 32, "v_dim": 128, "ffn_hidden": 1792}
    assert a["stem"] == {"widths": [24, 48]} and a["distillation"] is True


# ---------------------------------------------------------------- 2. golden
def _check_golden_arch(arch, cfg):
    assert [s["width"] for s in arch["stages"]] == cfg["embed_dims"]
    assert [len(s["blocks"]) for s in arch["stages"]] == cfg["layers"]
    n3d = [sum(b["type"] == "meta3d" for b in s["blocks"]) for s in arch["stages"]]
    assert n3d == [0, 0, 0, cfg["vit_num"]]
    assert arch["stages"][3]["blocks"][-1] == {"type": "meta3d", "heads": 8, "qk_dim": 32, "v_dim": 128,
                                               "ffn_hidden": 4 * cfg["embed_dims"][3]}
    assert arch["num_classes"] == cfg["num_classes"] and arch["distillation"] == cfg["distillation"]
    assert arch["input_size"] == 224 and arch["stem"]["widths"] == [cfg["embed_dims"][0] // 2, cfg["embed_dims"][0]]


def test_golden_official_checkpoint_loads_without_hint_and_reproduces_logits(golden_file):
    g, path = golden_file("efficientformer_tiny", True)
    model, arch = vitslim.load_checkpoint(path)
    _check_golden_arch(arch, g["config"])
    assert_golden_logits(model, g)


def test_golden_in_timm_layout_and_bare_vitslim_layout_load_to_the_same_logits(tmp_path):
    g = golden("efficientformer_tiny")
    timm_path = tmp_path / "timm.pth"
    torch.save(official_to_timm(g["state_dict"]), timm_path)
    model, arch = vitslim.load_checkpoint(timm_path)
    _check_golden_arch(arch, g["config"])
    assert_golden_logits(model, g)
    bare = tmp_path / "bare.pth"
    torch.save(model.state_dict(), bare)
    model2, arch2 = vitslim.load_checkpoint(bare)
    assert arch2 == arch
    assert_golden_logits(model2, g)


def test_matcher_claims_no_other_familys_golden_checkpoint():
    for name in ("deit_p4_d48_h3_l2", "deit_distilled_p4_d48_h3_l2", "swin_p2_w4_d24_official",
                 "swin_p2_w4_d24_timm", "efficientvit_tiny", "shvit_tiny"):
        assert not get_family("efficientformer").match_state_dict(golden(name)["state_dict"]), name
    assert _layout(golden("efficientformer_tiny")["state_dict"]) == "official"


# ---------------------------------------------------------------- 3. fusion
def test_fuse_removes_every_batchnorm_and_keeps_outputs():
    torch.manual_seed(0)
    model = randomise(vitslim.build_model(tiny_arch()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        fused = vitslim.fuse(model)
        out = fused(x)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# ---------------------------------------------------------------- 4. arch round trips
@pytest.mark.parametrize("name", sorted(SEEDS))
def test_preset_yaml_round_trip_builds_the_same_state_dict_shapes(name):
    a = vitslim.get_preset(name)
    b = yaml.safe_load(to_yaml(a))
    assert vitslim.get_preset(name) == vitslim.resolve_arch(b)
    with torch.device("meta"):
        s1 = {k: tuple(v.shape) for k, v in vitslim.build_model(a).state_dict().items()}
        s2 = {k: tuple(v.shape) for k, v in vitslim.build_model(b).state_dict().items()}
    assert s1 == s2


def test_pruned_config_runs_and_its_vitslim_checkpoint_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    arch = vitslim.resolve_arch(tiny_arch())
    model = randomise(vitslim.build_model(arch), seed=1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (2, 7)
    path = tmp_path / "m.pt"
    vitslim.save_checkpoint(model, arch, path)
    model2, arch2 = vitslim.load_checkpoint(path)
    assert arch2 == arch
    with torch.no_grad():
        assert torch.equal(model2(x), ref)


def test_meta3d_in_stage_3_uses_that_stages_grid_and_hands_a_map_to_the_next_downsample():
    model = vitslim.build_model(tiny_arch(input_size=128))
    attn = {ij: m.token_mixer for ij, m in model.block_modules() if isinstance(m, Meta3D)}
    assert {ij: a.resolution for ij, a in attn.items()} == {(2, 1): 8, (3, 2): 4, (3, 3): 4}
    assert attn[(2, 1)].attention_biases.shape == (3, 64)
    seen = []
    model.stages[3].downsample.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 128, 128))
    assert seen == [(1, 24, 8, 8)]


def test_bare_vitslim_state_dict_reads_identity_blocks_from_index_gaps(tmp_path):
    arch = vitslim.resolve_arch(tiny_arch())
    model = randomise(vitslim.build_model(arch))
    path = tmp_path / "bare.pth"
    torch.save({"model": model.state_dict()}, path)
    model2, arch2 = vitslim.load_checkpoint(path)
    want = copy.deepcopy(arch)
    for st in want["stages"]:  # an identity at the end of a stage leaves no trace in the weights
        while st["blocks"] and st["blocks"][-1]["type"] == "identity":
            st["blocks"].pop()
    assert arch2 == want
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))


def test_attention_bias_matches_official_first_appearance_numbering():
    import itertools
    r = 5
    attn = Attention(8, 2, 4, 4, r)
    offsets, idxs = {}, []
    pts = list(itertools.product(range(r), range(r)))
    for p1 in pts:
        for p2 in pts:
            off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(off, len(offsets)))
    assert torch.equal(attn.attention_bias_idxs, torch.tensor(idxs).view(r * r, r * r))
    assert "attention_bias_idxs" not in attn.state_dict()


def test_distilled_model_averages_heads_unless_distilled_training():
    model = randomise(vitslim.build_model(tiny_arch())).train()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    pooled = feats.mean(1)
    mean = (model.head(pooled) + model.dist_head(pooled)) / 2
    assert torch.allclose(model.forward_head(feats), mean)
    model.distilled_training = True
    out, out_dist = model.forward_head(feats)
    assert torch.allclose(out, model.head(pooled)) and torch.allclose(out_dist, model.dist_head(pooled))


def test_stage_summary_lists_width_resolution_and_block_kinds():
    rows = get_family("efficientformer").stage_summary(vitslim.resolve_arch(tiny_arch()))
    assert rows[2] == {"stage": 2, "width": 24, "resolution": "4x4", "meta4d": 1, "meta3d": 1, "identity": 1}
    assert [r["resolution"] for r in rows] == ["16x16", "8x8", "4x4", "2x2"]


def test_missing_widths_get_the_official_defaults():
    a = vitslim.resolve_arch({"family": "efficientformer", "stages": [
        {"width": 16, "blocks": [{"type": "meta4d"}]}, {"width": 16, "blocks": []},
        {"width": 32, "blocks": [{"type": "meta3d"}]}]})
    assert a["stem"] == {"widths": [8, 16]}
    assert a["stages"][1]["downsample"] == {"type": "conv"}
    assert a["stages"][2]["blocks"][0] == {"type": "meta3d", "heads": 8, "qk_dim": 32, "v_dim": 128, "ffn_hidden": 128}


# ---------------------------------------------------------------- 5. validation
def _with(fn):
    a = tiny_arch()
    fn(a)
    return a


BAD = [
    ("unknown block key", lambda a: a["stages"][1]["blocks"][0].update(heads=2), "stages[1].blocks[0].heads"),
    ("meta3d in stage 2", lambda a: a["stages"][1]["blocks"].append(
        {"type": "meta3d", "heads": 2, "qk_dim": 4, "v_dim": 4, "ffn_hidden": 8}), "stages[1].blocks[1].type: got 'meta3d'"),
    ("4D after 3D", lambda a: a["stages"][2]["blocks"].append({"type": "meta4d", "ffn_hidden": 8}),
     "stages[2].blocks[3].type: got 'meta4d'"),
    ("heads 0", lambda a: a["stages"][3]["blocks"][2].update(heads=0), "stages[3].blocks[2].heads: got 0"),
    ("qk_dim not int", lambda a: a["stages"][3]["blocks"][2].update(qk_dim=2.5), "stages[3].blocks[2].qk_dim: got 2.5"),
    ("ffn_hidden 0", lambda a: a["stages"][0]["blocks"][0].update(ffn_hidden=0), "stages[0].blocks[0].ffn_hidden: got 0"),
    ("input not multiple of stride", lambda a: a.update(input_size=80), "input_size: got 80"),
    ("stem does not feed stage 1", lambda a: a["stem"].update(widths=[6, 10]), "stem.widths[1]: got 10"),
    ("stem key", lambda a: a["stem"].update(width=3), "stem.width"),
    ("downsample on first stage", lambda a: a["stages"][0].update(downsample={"type": "conv"}), "stages[0].downsample"),
    ("downsample type", lambda a: a["stages"][2].update(downsample={"type": "pool"}), "stages[2].downsample.type: got 'pool'"),
    ("no downsample but width change", lambda a: a["stages"][1].update(downsample=None), "stages[1].downsample: got None"),
    ("unknown stage key", lambda a: a["stages"][1].update(depth=3), "stages[1].depth"),
    ("unknown top-level key", lambda a: a.update(vit_num=1), "vit_num"),
]


@pytest.mark.parametrize("what,edit,needle", BAD, ids=[b[0] for b in BAD])
def test_invalid_config_raises_arch_error_naming_key_and_value(what, edit, needle):
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.build_model(_with(edit))
    assert needle in str(e.value)


def test_meta4d_after_meta3d_error_says_3d_blocks_come_after_4d_ones():
    with pytest.raises(vitslim.ArchError, match="3D blocks only after 4D ones"):
        vitslim.resolve_arch(_with(lambda a: a["stages"][3]["blocks"].append({"type": "meta4d", "ffn_hidden": 8})))


# ---------------------------------------------------------------- 6. bad checkpoints
def test_checkpoint_with_a_wrong_shape_names_the_files_key(tmp_path):
    sd = dict(golden("efficientformer_tiny")["state_dict"])
    sd["network.6.2.mlp.fc2.weight"] = torch.zeros(64, 255)
    torch.save({"model": sd}, tmp_path / "x.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"network\.6\.2\.mlp\.fc2\.weight"):
        vitslim.load_checkpoint(tmp_path / "x.pth")


@pytest.mark.parametrize("key", ["network.4.1.mlp.norm1.running_var", "network.6.2.token_mixer.qkv.weight",
                                 "patch_embed.4.weight"])
def test_checkpoint_with_a_missing_key_names_it(tmp_path, key):
    sd = dict(golden("efficientformer_tiny")["state_dict"])
    del sd[key]
    torch.save({"model": sd}, tmp_path / "x.pth")
    with pytest.raises(vitslim.CheckpointError, match=re.escape(key)):
        vitslim.load_checkpoint(tmp_path / "x.pth")


def test_vitslim_checkpoint_with_a_wrong_shape_names_the_key(tmp_path):
    arch = vitslim.resolve_arch(tiny_arch())
    model = vitslim.build_model(arch)
    vitslim.save_checkpoint(model, arch, tmp_path / "m.pt")
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    obj["state_dict"]["stages.2.blocks.1.token_mixer.attention_biases"] = torch.zeros(3, 15)
    torch.save(obj, tmp_path / "m.pt")
    with pytest.raises(vitslim.CheckpointError, match=r"stages\.2\.blocks\.1\.token_mixer\.attention_biases"):
        vitslim.load_checkpoint(tmp_path / "m.pt")


def own_to_official(sd, arch):
    """Our state dict in the official layout: network.{2i} stages with a Flat slot before the first
    Meta3D, network.{2i-1} downsamples, patch_embed.{0,1,3,4}."""
    stem = {"conv1": "0", "norm1": "1", "conv2": "3", "norm2": "4"}
    out = {}
    for k, v in sd.items():
        m = re.match(r"stages\.(\d+)\.(downsample|blocks)\.(.*)", k)
        if k.startswith("stem."):
            _, name, rest = k.split(".", 2)
            k = f"patch_embed.{stem[name]}.{rest}"
        elif m:
            i, kind, rest = int(m.group(1)), m.group(2), m.group(3)
            if kind == "downsample":
                k = f"network.{2 * i - 1}.{rest.replace('conv.', 'proj.')}"
            else:
                j, rest = rest.split(".", 1)
                types = [b["type"] for b in arch["stages"][i]["blocks"]]
                j = int(j) + (1 if "meta3d" in types and int(j) >= types.index("meta3d") else 0)
                k = f"network.{2 * i}.{j}.{rest}"
        out[k] = v
    return out


def test_official_layout_with_an_all_meta3d_last_stage_like_l7_loads(tmp_path):
    a = tiny_arch()
    a["stages"][2]["blocks"] = [{"type": "meta4d", "ffn_hidden": 48}]
    a["stages"][0]["blocks"] = [{"type": "meta4d", "ffn_hidden": 20}]
    a["stages"][3]["blocks"] = [{"type": "meta3d", "heads": 8, "qk_dim": 32, "v_dim": 128, "ffn_hidden": 128}] * 2
    arch = vitslim.resolve_arch(a)
    model = randomise(vitslim.build_model(arch))
    sd = own_to_official(model.state_dict(), arch)
    assert "network.6.1.token_mixer.qkv.weight" in sd and not any(k.startswith("network.6.0.") for k in sd)
    torch.save({"model": sd}, tmp_path / "l7like.pth")
    model2, arch2 = vitslim.load_checkpoint(tmp_path / "l7like.pth")
    assert arch2 == arch
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))


def test_running_at_another_input_size_than_the_attention_grid_says_so():
    model = vitslim.build_model(tiny_arch()).eval()
    with pytest.raises(vitslim.ArchError, match="input_size"):
        model(torch.randn(1, 3, 96, 96))


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_preset_in_official_and_timm_layouts_is_read_back_as_the_preset(name):
    arch = vitslim.get_preset(name)
    with torch.device("meta"):  # shapes are all the reader looks at
        sd = vitslim.build_model(arch).state_dict()
    official = own_to_official(sd, arch)
    fam = get_family("efficientformer")
    for layout in (official, official_to_timm(official)):
        assert fam.match_state_dict(layout)
        arch2, sd2 = fam.convert_state_dict(layout)
        assert arch2 == arch
        assert {k: v.shape for k, v in sd2.items()} == {k: v.shape for k, v in sd.items()}
