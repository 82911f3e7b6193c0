"""An arch's segments, run one after another, compute exactly the model's forward (so the sum of their
latencies means something), and a space's enumeration covers every network it can sample."""
import random

import pytest
import torch

import vitslim
from latency_tables.segments import build_segment, decompose, key_str, space_keys


def compose(arch, x):
    """Run the segments of `arch` with the weights of the model built from it."""
    torch.manual_seed(0)
    model = vitslim.build_model(arch).eval()
    sd = model.state_dict()
    h = x
    for seg in decompose(arch):
        mod, shape = build_segment(seg.key)
        assert tuple(h.shape[1:]) == shape, seg.id
        if seg.path is not None:  # "" = pieces at the model's top level (embeddings, final norm, heads)
            pre = seg.path + "." if seg.path else ""
            target = getattr(mod, "block", mod)
            own = set(target.state_dict())
            sub = {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre) and k[len(pre):] in own}
            assert set(sub) == own, (seg.id, sorted(own - set(sub))[:3])
            target.load_state_dict(sub, strict=True)
        h = mod.eval()(h)
    with torch.no_grad():
        return h, model(x)


@pytest.mark.parametrize("seed", range(6))
def test_efficientformer_segments_compose_to_the_model(tiny_space, seed):
    arch = tiny_space.to_arch(tiny_space.sample(random.Random(seed)))
    arch["distillation"] = seed % 2 == 0
    with torch.no_grad():
        got, ref = compose(arch, torch.randn(2, 3, 64, 64))
    assert torch.allclose(got, ref, atol=1e-5)


def test_deit_segments_compose_with_pruned_blocks():
    a = vitslim.get_preset("deit_tiny")
    a.update(input_size=64, distillation=True)
    a["stem"]["patch_size"] = 16
    blocks = a["stages"][0]["blocks"][:4]
    blocks[1].update(heads=0, qk_dim=0, v_dim=0)        # attention pruned away
    blocks[2].update(heads=2, qk_dim=32, v_dim=48)      # V wider than Q/K
    blocks[3].update(heads=0, qk_dim=0, v_dim=0, ffn_hidden=0)  # the whole block: identity, no entry
    a["stages"][0]["blocks"] = blocks
    with torch.no_grad():
        got, ref = compose(a, torch.randn(1, 3, 64, 64))
    assert torch.allclose(got, ref, atol=1e-5)
    assert sum(s.key["op"] == "vit_block" for s in decompose(a)) == 3


def test_swin_segments_compose_with_shifted_windows():
    a = vitslim.get_preset("swin_tiny")
    a["input_size"] = 64
    for st in a["stages"]:
        st["window_size"] = 4
        st["blocks"] = st["blocks"][:2]
    with torch.no_grad():
        got, ref = compose(a, torch.randn(1, 3, 64, 64))
    assert torch.allclose(got, ref, atol=1e-5)
    shifted = [s.key["shifted"] for s in decompose(a) if s.key["op"] == "swin_block"]
    assert shifted[:2] == [False, True]


@pytest.mark.parametrize("name", ["efficientvit_m0", "shvit_s1"])
def test_staged_family_segments_compose(name):
    a = vitslim.get_preset(name)
    a.update(input_size=128, distillation=name.startswith("efficientvit"))
    for st in a["stages"]:
        st["blocks"] = st["blocks"][:2]
    with torch.no_grad():
        got, ref = compose(a, torch.randn(1, 3, 128, 128))
    assert torch.allclose(got, ref, atol=1e-5)


def test_space_enumeration_covers_every_sample(tiny_space):
    keys = {key_str(k) for k in space_keys(tiny_space)}
    rng = random.Random(3)
    for _ in range(200):
        for s in decompose(tiny_space.to_arch(tiny_space.sample(rng))):
            assert s.id in keys
    widths = {k["dim"] for k in space_keys(tiny_space) if k["op"] == "meta4d" and k["res"] == 4}
    assert widths == set(tiny_space.widths(2))  # every width, in steps of 16


def _vit_block_macs(n, d, h, q, v, f):
    """Hand count: qkv, scores, attention x V, proj, fc1, fc2."""
    return n * d * h * (2 * q + v) + n * n * h * q + n * n * h * v + n * h * v * d + 2 * n * d * f


@pytest.mark.parametrize("key,macs", [
    # conv 3 -> 24, kernel 8, 4x4 outputs
    ({"op": "vit_embed", "res_in": 32, "cin": 3, "patch": 8, "dim": 24, "prefix": 2}, 16 * 24 * 3 * 64),
    ({"op": "vit_block", "tokens": 18, "dim": 24, "heads": 3, "qk_dim": 8, "v_dim": 8, "ffn_hidden": 64},
     _vit_block_macs(18, 24, 3, 8, 8, 64)),
    # pruned, Q/K and V widths apart
    ({"op": "vit_block", "tokens": 18, "dim": 24, "heads": 2, "qk_dim": 4, "v_dim": 6, "ffn_hidden": 16},
     _vit_block_macs(18, 24, 2, 4, 6, 16)),
    ({"op": "vit_block", "tokens": 18, "dim": 24, "heads": 0, "qk_dim": 0, "v_dim": 0, "ffn_hidden": 16},
     2 * 18 * 24 * 16),
    ({"op": "vit_head", "tokens": 18, "dim": 24, "classes": 10, "distillation": True}, 2 * 24 * 10),
    ({"op": "vit_head", "tokens": 17, "dim": 24, "classes": 10, "distillation": False}, 24 * 10),
    ({"op": "swin_embed", "res_in": 32, "cin": 3, "patch": 2, "dim": 16}, 16 * 16 * 16 * 3 * 4),
    # 16x16 padded to 18x18 for window 6 (9 windows of 36 tokens); the MLP runs on the 256 real tokens
    ({"op": "swin_block", "res": 16, "dim": 16, "heads": 2, "qk_dim": 8, "v_dim": 8, "ffn_hidden": 32, "window": 6,
      "shifted": True},
     324 * 16 * 48 + 2 * 9 * 36 * 36 * 16 + 324 * 16 * 16 + 2 * 256 * 16 * 32),
    ({"op": "swin_patch_merging", "res_in": 16, "cin": 16, "cout": 32}, 8 * 8 * 64 * 32),
    ({"op": "swin_head", "res": 8, "dim": 32, "classes": 10}, 32 * 10),
])
def test_segment_macs_are_the_hand_counted_multiply_accumulates(key, macs):
    """MACs (not FLOPs) of each segment kind at batch 1, counted by hand: they place a missing width
    between measured ones when the table interpolates."""
    from latency_tables.segments import segment_macs
    assert segment_macs(key) == macs


def test_an_entry_key_with_a_negative_width_is_refused_in_one_line():
    from latency_tables.segments import SegmentError, check_key
    assert check_key({"op": "meta4d", "res": 7, "dim": 0, "ffn_hidden": 8})["dim"] == 0
    with pytest.raises(SegmentError, match=r"^entry key meta4d\|dim=-3\|ffn_hidden=8\|res=7: dim=-3, expected a "
                                           r"non-negative integer or true/false$"):
        check_key({"op": "meta4d", "res": 7, "dim": -3, "ffn_hidden": 8})
