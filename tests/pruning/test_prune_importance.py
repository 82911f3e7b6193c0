"""Importance criteria score without touching the network, and Taylor scores are exactly the
squared derivative of the loss with respect to a gate on each unit."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pruning.importance import MagnitudeImportance, TaylorImportance
from pruning.units import BlockKeep, Plan, block_infos, block_module

from pruning_nets import batches, build, tiny_deit, tiny_swin


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m).__name__) for n, m in model.named_modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()))


@pytest.mark.parametrize("crit", [TaylorImportance, MagnitudeImportance])
def test_scoring_leaves_parameters_structure_grads_and_mode_untouched(net, crit):
    model, arch = net
    model.train()
    sd, mods, hooks = snapshot(model)
    scores = crit().score(model, arch, batches(arch, 2))
    sd2, mods2, hooks2 = snapshot(model)
    assert mods == mods2 and hooks == hooks2
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    for info in block_infos(arch):
        s = scores[info.key]
        assert s["qk"].shape == (info.heads, info.qk_dim) and s["v"].shape == (info.heads, info.v_dim)
        assert s["head"].shape == (info.heads,) and s["ffn"].shape == (info.ffn_hidden,)
        assert all(np.all(s[k] >= 0) for k in s)


def gate_grads(model, arch, x, y):
    """dL/dg for an explicit gate of value 1 on every unit (q channel, v channel, head output,
    FFN channel), by autograd through hooks that multiply the activations by the gates."""
    gates, hs = {}, []
    for info in block_infos(arch):
        blk = block_module(model, info)
        H, dq, dv = info.heads, info.qk_dim, info.v_dim
        gq = torch.ones(H, dq, requires_grad=True)
        gv = torch.ones(H, dv, requires_grad=True)
        gh = torch.ones(H, requires_grad=True)
        gf = torch.ones(info.ffn_hidden, requires_grad=True)
        gates[info.key] = (gq, gv, gh, gf)

        def qkv_hook(m, a, out, gq=gq, gv=gv, gh=gh, H=H, dq=dq, dv=dv):
            q, k, v = out.split([H * dq, H * dq, H * dv], -1)
            return torch.cat([q * gq.reshape(-1), k, v * (gv * gh[:, None]).reshape(-1)], -1)

        hs.append(blk.attn.qkv.register_forward_hook(qkv_hook))
        hs.append(blk.mlp.fc2.register_forward_pre_hook(lambda m, a, gf=gf: (a[0] * gf,)))
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    for h in hs:
        h.remove()
    return {k: tuple(g.grad.double().numpy() for g in v) for k, v in gates.items()}


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_taylor_is_the_squared_gate_derivative_averaged_over_batches(make):
    arch = make()
    model = build(arch)
    data = batches(arch, 2)
    expect = {}
    for x, y in data:
        g = gate_grads(model, arch, x, y)
        for key, (gq, gv, gh, gf) in g.items():
            e = expect.setdefault(key, {"qk": 0, "v": 0, "head": 0, "ffn": 0})
            e["qk"] = e["qk"] + gq ** 2 / 2
            e["v"] = e["v"] + gv ** 2 / 2
            e["head"] = e["head"] + gh ** 2 / 2
            e["ffn"] = e["ffn"] + gf ** 2 / 2
    scores = TaylorImportance().score(model, arch, data)
    for key, e in expect.items():
        for k in e:
            np.testing.assert_allclose(scores[key][k], e[k], rtol=1e-3, atol=1e-12, err_msg=f"{key} {k}")


def test_momentum_blends_scores_of_surviving_units():
    arch = tiny_deit()
    model = build(arch)
    a = TaylorImportance().score(model, arch, batches(arch, 1, seed=0))
    b = TaylorImportance().score(model, arch, batches(arch, 1, seed=1))
    c = b.blend(a, 0.9)
    key = block_infos(arch)[0].key
    np.testing.assert_allclose(c[key]["ffn"], 0.9 * a[key]["ffn"] + 0.1 * b[key]["ffn"])


def test_momentum_blends_residual_channel_and_branch_scores_as_it_blends_units():
    """Embedding (residual channel) and branch (depth) scores are smoothed across iterative steps with the
    same weights as unit scores: momentum on the previous step's, 1 - momentum on this step's."""
    arch = tiny_deit()
    model = build(arch)
    a = TaylorImportance().score(model, arch, batches(arch, 1, seed=0), embed=True)
    b = TaylorImportance().score(model, arch, batches(arch, 1, seed=1), embed=True)
    assert not np.allclose(a.embed[0], b.embed[0])  # the two steps' scores differ: the weights are visible
    c = b.blend(a, 0.9)
    np.testing.assert_allclose(c.embed[0], 0.9 * a.embed[0] + 0.1 * b.embed[0])
    for key in b.branch:
        assert not np.allclose(a.branch[key], b.branch[key])
        np.testing.assert_allclose(c.branch[key], 0.9 * a.branch[key] + 0.1 * b.branch[key])


def test_restrict_keeps_the_scores_of_the_kept_units_and_zeroes_the_removed_branches():
    """Scores carried to the next iterative step are those of the units the plan keeps, in the pruned
    network's order, and a branch the plan empties has no score left (the other branch keeps its own)."""
    arch = tiny_deit()
    model = build(arch)
    s = TaylorImportance().score(model, arch, batches(arch, 1))
    b0, b1 = block_infos(arch)
    plan = Plan({b0.key: BlockKeep([], {}, {}, list(range(b0.ffn_hidden))),               # attention emptied
                 b1.key: BlockKeep([0, 2], {0: [1, 5], 2: [0, 7]}, {0: [2, 3], 2: [4, 6]}, [])})  # FFN emptied
    r = s.restrict(block_infos(arch), plan)
    np.testing.assert_array_equal(r.branch[b0.key], [0.0, s.branch[b0.key][1]])
    np.testing.assert_array_equal(r.branch[b1.key], [s.branch[b1.key][0], 0.0])
    assert all(s.branch[k].min() > 0 for k in (b0.key, b1.key))
    np.testing.assert_array_equal(r[b1.key]["head"], s[b1.key]["head"][[0, 2]])
    np.testing.assert_array_equal(r[b1.key]["qk"], [s[b1.key]["qk"][0][[1, 5]], s[b1.key]["qk"][2][[0, 7]]])
    np.testing.assert_array_equal(r[b1.key]["v"], [s[b1.key]["v"][0][[2, 3]], s[b1.key]["v"][2][[4, 6]]])
    np.testing.assert_array_equal(r[b0.key]["ffn"], s[b0.key]["ffn"])
    assert r[b0.key]["head"].size == 0 and r[b1.key]["ffn"].size == 0


@pytest.mark.parametrize("make", [tiny_deit, tiny_swin])
def test_magnitude_is_the_squared_norm_of_the_weights_each_unit_owns(make):
    """Unit by unit, from the named weight slices (surgery's layout: qkv rows [q | k | v], head-major):
    a Q/K pair owns its q and k rows, a V channel its v row and proj input column, a head all of its
    channels, an FFN channel its fc1 row (and bias) and fc2 column; a branch the sum over its units."""
    arch = make()
    model = build(arch)
    scores = MagnitudeImportance().score(model, arch)
    for info in block_infos(arch):
        blk = block_module(model, info)
        H, dq, dv = info.heads, info.qk_dim, info.v_dim
        W, b = blk.attn.qkv.weight.detach().double(), blk.attn.qkv.bias.detach().double()
        P = blk.attn.proj.weight.detach().double()

        def row(r):
            return float(W[r].pow(2).sum() + b[r] ** 2)
        qk = np.array([[row(h * dq + c) + row(H * dq + h * dq + c) for c in range(dq)] for h in range(H)])
        v = np.array([[row(2 * H * dq + h * dv + c) + float(P[:, h * dv + c].pow(2).sum()) for c in range(dv)]
                      for h in range(H)])
        f1, f1b, f2 = blk.mlp.fc1.weight.detach().double(), blk.mlp.fc1.bias.detach().double(), blk.mlp.fc2.weight.detach().double()
        ffn = np.array([float(f1[c].pow(2).sum() + f1b[c] ** 2 + f2[:, c].pow(2).sum()) for c in range(info.ffn_hidden)])
        s = scores[info.key]
        np.testing.assert_allclose(s["qk"], qk, rtol=1e-12)
        np.testing.assert_allclose(s["v"], v, rtol=1e-12)
        np.testing.assert_allclose(s["head"], qk.sum(1) + v.sum(1), rtol=1e-12)
        np.testing.assert_allclose(s["ffn"], ffn, rtol=1e-12)
        np.testing.assert_allclose(scores.branch[info.key], [qk.sum() + v.sum(), ffn.sum()], rtol=1e-12)


def test_the_default_loss_of_a_two_head_output_is_that_of_the_mean_of_its_heads():
    """A distilled model in distillation-training mode returns (class head, distillation head): the loss
    scored is the cross-entropy of their mean (hand-made heads whose mean differs from either)."""
    from pruning.importance import default_loss
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    b = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    mean = torch.tensor([[1.0, 1.5, 0.0], [1.0, 0.0, 1.5]])
    y = torch.tensor([1, 2])
    assert float(default_loss((a, b), y)) == pytest.approx(float(F.cross_entropy(mean, y)), rel=1e-6)
    # without labels: the mean's own top-1 (1 and 2; either head alone would say otherwise)
    assert float(default_loss((a, b), None)) == pytest.approx(float(F.cross_entropy(mean, y)), rel=1e-6)
