"""Surgery builds a real smaller network whose outputs are exactly those of the unpruned network
with the removed units gated to zero."""
import random

import pytest
import torch

import vitslim
from pruning.surgery import apply_plan
from pruning.units import BlockKeep, Plan, block_infos, block_module

from pruning_nets import batches, build, tiny_deit, tiny_swin


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def random_plan(arch, seed=0, empty=False):
    rnd = random.Random(seed)
    keep = {}
    for info in block_infos(arch):
        H = info.heads
        nh = 0 if empty else rnd.randint(1, H)
        heads = sorted(rnd.sample(range(H), nh))
        dq, dv = rnd.randint(1, info.qk_dim), rnd.randint(1, info.v_dim)
        qk = {h: sorted(rnd.sample(range(info.qk_dim), dq)) for h in heads}
        v = {h: sorted(rnd.sample(range(info.v_dim), dv)) for h in heads}
        nf = 0 if empty else rnd.randint(1, info.ffn_hidden)
        keep[info.key] = BlockKeep(heads, qk, v, sorted(rnd.sample(range(info.ffn_hidden), nf)))
    return Plan(keep)


def gated(model, arch, plan, zero_branch_bias=False):
    """Hooks that zero, in the unpruned model, exactly the activations of the removed units."""
    handles = []
    for info in block_infos(arch):
        k = plan.get(info)
        blk = block_module(model, info)
        H, dq, dv = info.heads, info.qk_dim, info.v_dim
        mask = torch.ones(H * (2 * dq + dv))
        for h in range(H):
            for c in range(dq):
                if h not in k.heads or c not in k.qk[h]:
                    mask[h * dq + c] = 0  # gating q alone removes the pair's term q_c k_c
            for c in range(dv):
                if h not in k.heads or c not in k.v[h]:
                    mask[2 * H * dq + h * dv + c] = 0
        handles.append(blk.attn.qkv.register_forward_hook(lambda m, a, out, mask=mask: out * mask))
        fmask = torch.zeros(info.ffn_hidden)
        fmask[k.ffn] = 1
        handles.append(blk.mlp.fc2.register_forward_pre_hook(lambda m, a, fmask=fmask: (a[0] * fmask,)))
        if zero_branch_bias:  # a removed branch also loses its output bias
            if not k.heads:
                handles.append(blk.attn.proj.register_forward_hook(lambda m, a, out: out - m.bias))
            if not k.ffn:
                handles.append(blk.mlp.fc2.register_forward_hook(lambda m, a, out: out - m.bias))
    return handles


def gated_output(model, arch, plan, x, **kw):
    """The unpruned model's output on x with the plan's removed units gated to zero (hooks removed after)."""
    hs = gated(model, arch, plan, **kw)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hs:
            h.remove()


def test_nothing_pruned_reproduces_outputs_exactly(net):
    model, arch = net
    x = batches(arch, 1)[0][0]
    new, new_arch = apply_plan(model, arch, Plan.full(block_infos(arch)))
    with torch.no_grad():
        assert rel_err(new(x), model(x)) <= 1e-5
    assert new_arch["stages"] == arch["stages"]


def test_surgery_equals_gating_the_removed_units_to_zero(net):
    model, arch = net
    x = batches(arch, 1)[0][0]
    for seed in range(2):
        plan = random_plan(arch, seed)
        small, small_arch = apply_plan(model, arch, plan)
        ref = gated_output(model, arch, plan, x)
        with torch.no_grad():
            out = small(x)
        assert rel_err(out, ref) <= 1e-5, seed
        assert vitslim.count(small)["params"] < vitslim.count(model)["params"]
        # Q/K and V widths are independent and the trained scale is kept
        for info, b in zip(block_infos(arch), [b for st in small_arch["stages"] for b in st["blocks"]]):
            k = plan.get(info)
            assert (b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"]) == tuple(k.widths.values())
            if b["qk_dim"] != info.qk_dim:
                assert b["scale"] == info.scale


@pytest.mark.parametrize("qk,v", [(4, 8), (8, 4)])
def test_surgery_with_unequal_qk_and_v_widths_equals_gating(qk, v):
    """proj's input columns are head-major in the V width (h*v_dim + c), not the Q/K width: the shared
    fixtures have qk_dim == v_dim, where the two layouts coincide."""
    arch = tiny_deit(qk=qk, v=v)
    model = build(arch)
    x = batches(arch, 1)[0][0]
    plan = random_plan(arch, 3)
    assert any(k.heads != list(range(3)) and k.heads[-1] > 0 for k in plan.keep.values())
    small, _ = apply_plan(model, arch, plan)
    ref = gated_output(model, arch, plan, x)
    with torch.no_grad():
        assert rel_err(small(x), ref) <= 1e-5


def test_emptied_branches_equal_gating_plus_their_output_bias():
    arch = tiny_deit()
    model = build(arch)
    x = batches(arch, 1)[0][0]
    plan = random_plan(arch, 0, empty=True)
    small, small_arch = apply_plan(model, arch, plan)
    assert all(b["heads"] == 0 and b["ffn_hidden"] == 0 for b in small_arch["stages"][0]["blocks"])
    assert small.blocks[0].attn is None and small.blocks[0].mlp is None
    ref = gated_output(model, arch, plan, x, zero_branch_bias=True)
    with torch.no_grad():
        assert rel_err(small(x), ref) <= 1e-5


def test_surgery_keeps_the_input_model_and_its_mode():
    arch = tiny_swin()
    model = build(arch).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small, _ = apply_plan(model, arch, random_plan(arch, 1))
    assert small.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    small, _ = apply_plan(model.eval(), arch, random_plan(arch, 1))  # an eval-mode model gives an eval-mode one
    assert not small.training and not any(m.training for m in small.modules())


def test_surgery_keeps_the_models_dtype(net):
    """A float64 (or half) model stays one: the copy is exact and the pruned model takes the original's inputs."""
    model, arch = net
    x = batches(arch, 1)[0][0].double()
    model = model.double().eval()
    plan = random_plan(arch, 0)
    small, _ = apply_plan(model, arch, plan)
    assert {p.dtype for p in small.parameters()} == {torch.float64}
    ref = gated_output(model, arch, plan, x)
    with torch.no_grad():
        assert rel_err(small(x), ref) <= 1e-12
    half, _ = apply_plan(model.half(), arch, plan)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_a_plain_state_dict_of_a_pruned_deit_warns_that_its_heads_are_guessed(tmp_path):
    """The arch travels in vitslim checkpoints; torch.save(model.state_dict()) of a pruned DeiT keeps only the
    total Q/K and V widths, which split into heads more than one way."""
    import warnings
    arch = tiny_deit()
    model = build(arch)
    infos = block_infos(arch)
    keep = {i.key: BlockKeep([0, 2], {0: [0, 1, 2, 3], 2: [1, 2, 3, 4]}, {0: list(range(8)), 2: list(range(8))},
                             list(range(i.ffn_hidden))) for i in infos}
    small, small_arch = apply_plan(model, arch, Plan(keep))
    torch.save(small.state_dict(), tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match=r"head counts of 2 block\(s\) are guessed"):
        vitslim.load_checkpoint(tmp_path / "plain.pt")
    vitslim.save_checkpoint(small, small_arch, tmp_path / "ours.pt")
    torch.save(model.state_dict(), tmp_path / "unpruned.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back, back_arch = vitslim.load_checkpoint(tmp_path / "ours.pt")  # the arch is in the file
        vitslim.load_checkpoint(tmp_path / "unpruned.pt")  # the official layout: nothing to guess
    assert back_arch == small_arch


def test_a_plain_state_dict_of_a_pruned_swin_warns_that_its_attention_scale_is_lost(tmp_path):
    """A pruned block keeps the scale of its unpruned Q/K width (arch `scale`); torch.save(model.state_dict())
    drops it, and the loaded model silently computed other outputs with 1/sqrt(pruned Q/K)."""
    import warnings
    arch = tiny_swin()
    model = build(arch)
    infos = block_infos(arch)
    keep = {i.key: BlockKeep(list(range(i.heads)), {h: [0, 1, 2] for h in range(i.heads)},
                             {h: list(range(i.v_dim)) for h in range(i.heads)}, list(range(i.ffn_hidden)))
            for i in infos}
    small, small_arch = apply_plan(model, arch, Plan(keep))
    torch.save(small.state_dict(), tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match=r"pruned Swin: the attention scale of 4 block\(s\) is not in the file"):
        back, _ = vitslim.load_checkpoint(tmp_path / "plain.pt")
    x = batches(arch, 1)[0][0]
    with torch.no_grad():
        assert rel_err(back(x), small.eval()(x)) > 1e-3  # what the warning is about
    torch.save(model.state_dict(), tmp_path / "unpruned.pt")
    vitslim.save_checkpoint(small, small_arch, tmp_path / "ours.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vitslim.load_checkpoint(tmp_path / "unpruned.pt")
        ours, _ = vitslim.load_checkpoint(tmp_path / "ours.pt")
    with torch.no_grad():
        assert rel_err(ours(x), small(x)) == 0


def test_a_plain_state_dict_of_a_network_whose_first_block_went_loads_with_its_arch_given(tmp_path):
    """A DeiT pruned with --depth whose first block lost both branches leaves no key of that block: the shapes
    cannot describe it ('no block 0'), and load_checkpoint refused it even with its arch given (the README's
    torch.save(small.state_dict()) -> load_checkpoint(..., arch=small_arch) round trip)."""
    arch = tiny_deit(blocks=3)
    keep = {i.key: BlockKeep([] if i.key == (0, 0) else list(range(i.heads)),
                             {h: list(range(i.qk_dim)) for h in range(i.heads)},
                             {h: list(range(i.v_dim)) for h in range(i.heads)},
                             [] if i.key == (0, 0) else list(range(i.ffn_hidden))) for i in block_infos(arch)}
    small, small_arch = apply_plan(build(arch), arch, Plan(keep))
    assert not any(k.startswith("blocks.0.") for k in small.state_dict())
    torch.save(small.state_dict(), tmp_path / "plain.pt")
    back, back_arch = vitslim.load_checkpoint(tmp_path / "plain.pt", arch=small_arch)
    x = batches(arch, 1)[0][0]
    with torch.no_grad():
        assert back_arch == small_arch and rel_err(back(x), small.eval()(x)) == 0
    with pytest.raises(vitslim.CheckpointError, match="no block 0"):  # without the arch: what it cannot tell
        vitslim.load_checkpoint(tmp_path / "plain.pt")


def test_a_plain_state_dict_loads_exactly_with_its_arch_given(tmp_path):
    """What the shapes cannot tell (a pruned Swin's scales, a pruned DeiT's head split, a ViT whose heads are not 64
    channels wide) comes from the arch given: load_checkpoint(path, arch=...), prune --arch."""
    import warnings
    from vitslim.cli import main
    for arch in (tiny_swin(), tiny_deit(heads=3, qk=8, v=8)):
        model = build(arch)
        infos = block_infos(arch)
        keep = {i.key: BlockKeep(list(range(i.heads))[:-1] or [0], {h: [0, 1, 2] for h in range(i.heads)},
                                 {h: list(range(i.v_dim))[1:] for h in range(i.heads)}, list(range(i.ffn_hidden))[2:])
                for i in infos}
        small, small_arch = apply_plan(model, arch, Plan(keep))
        torch.save(small.state_dict(), tmp_path / "plain.pt")
        vitslim.save_arch(small_arch, tmp_path / "arch.yaml")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing guessed, nothing to warn about
            back, back_arch = vitslim.load_checkpoint(tmp_path / "plain.pt", arch=tmp_path / "arch.yaml")
        x = batches(arch, 1)[0][0]
        with torch.no_grad():
            assert back_arch == small_arch and rel_err(back(x), small.eval()(x)) == 0
    with pytest.raises(vitslim.CheckpointError, match=r"a deit state dict, but the arch given is a swin network"):
        vitslim.load_checkpoint(tmp_path / "plain.pt", arch=tiny_swin())
    with pytest.raises(vitslim.CheckpointError, match=r"with the arch given"):  # shapes that do not fit it
        vitslim.load_checkpoint(tmp_path / "plain.pt", arch=tiny_deit(heads=3, qk=8, v=8))
    assert main(["prune", "--checkpoint", str(tmp_path / "plain.pt"), "--arch", str(tmp_path / "arch.yaml"),
                 "--data", "synthetic", "--target", "macs=0.8", "--calib-batches", "1", "--eval-batches", "0",
                 "--batch-size", "4", "--quiet", "--out", str(tmp_path / "run")]) == 0


def test_a_plain_state_dict_of_a_swin_pruned_in_heads_only_loads_exactly_without_a_warning(tmp_path):
    """Only Q/K pruning changes the attention scale: heads removed whole keep theirs, and nothing is guessed."""
    import warnings
    arch = tiny_swin()
    model = build(arch)
    keep = {i.key: BlockKeep(list(range(i.heads))[1:], {h: list(range(i.qk_dim)) for h in range(i.heads)},
                             {h: list(range(i.v_dim)) for h in range(i.heads)}, list(range(i.ffn_hidden)))
            for i in block_infos(arch)}
    small, _ = apply_plan(model, arch, Plan(keep))
    torch.save(small.state_dict(), tmp_path / "plain.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back, _ = vitslim.load_checkpoint(tmp_path / "plain.pt")
    x = batches(arch, 1)[0][0]
    with torch.no_grad():
        assert rel_err(back(x), small.eval()(x)) == 0


def test_pruning_a_pruned_model_again_keeps_the_attention_scale_it_was_trained_with():
    """A pruned arch carries its attention scale (the unpruned qk_dim ** -0.5): pruning it again reads that scale,
    not the new qk_dim's, and the result still equals gating the removed units of the pruned model."""
    arch = tiny_deit()
    model = build(arch)
    x = batches(arch, 1)[0][0]
    once, once_arch = apply_plan(model, arch, random_plan(arch, 0))
    scales = [b.get("scale") for b in once_arch["stages"][0]["blocks"]]
    assert any(s is not None for s in scales)
    plan = random_plan(once_arch, 5)
    twice, twice_arch = apply_plan(once, once_arch, plan)
    for b0, b1, s in zip(arch["stages"][0]["blocks"], twice_arch["stages"][0]["blocks"], scales):
        if b1["heads"] and (s is not None or b1["qk_dim"] != b0["qk_dim"]):
            assert b1["scale"] == b0["qk_dim"] ** -0.5
    with torch.no_grad():
        assert rel_err(twice(x), gated_output(once, once_arch, plan, x)) <= 1e-5
