"""The MetaPath supernet: extraction equals the supernet, hard mode runs one path, soft mode is
the paper's mixture, elastic widths use weight prefixes, channel sorting keeps the function."""
import copy
import os
import random

import pytest
import torch
import torch.nn.functional as F

import vitslim
from supernet.errors import ArchError
from supernet.space import SearchSpace
from supernet.supernet import MetaPathSupernet, recalibrate_bn

SPACE = {"version": 1, "name": "t", "family": "efficientformer", "input_size": 64, "num_classes": 7,
         "width_step": 16, "ffn_ratio": 2, "attention": {"heads": 2, "qk_dim": 8, "v_dim": 16},
         "stages": [{"max_depth": 1, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 2, "max_width": 32, "min_width": 16, "candidates": ["meta4d", "identity"]},
                    {"max_depth": 3, "max_width": 48, "min_width": 16, "candidates": ["meta4d", "meta3d", "identity"]},
                    {"max_depth": 2, "max_width": 64, "min_width": 32, "candidates": ["meta4d", "meta3d", "identity"]}]}


def randomised(space=SPACE, seed=0):
    """A supernet whose LayerScales, norms and BN statistics are far from their init, so that
    every block and every channel changes the output."""
    torch.manual_seed(seed)
    sn = MetaPathSupernet(space)
    with torch.no_grad():
        for n, p in sn.named_parameters():
            if n.startswith("alphas"):
                continue
            if "layer_scale" in n or (n.endswith("weight") and p.dim() == 1):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1 or n.endswith("attention_biases"):
                p.normal_(0, 0.1)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
        for n, b in sn.named_buffers():
            if n.endswith("running_mean"):
                b.normal_(0, 0.2)
            elif n.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return sn.eval()


def close(a, b):
    tol = 1e-4 * b.abs().max().item()
    return (a - b).abs().max().item() <= tol


FIXED_CHOICES = [
    {"widths": [32, 32, 48, 64], "blocks": [["meta4d"], ["meta4d", "meta4d"], ["meta4d", "meta4d", "meta4d"], ["meta4d", "meta4d"]]},
    {"widths": [16, 32, 32, 48], "blocks": [["identity"], ["meta4d", "identity"], ["meta4d", "meta3d", "meta3d"], ["identity", "meta3d"]]},
    {"widths": [32, 16, 48, 32], "blocks": [["meta4d"], ["identity", "identity"], ["meta3d", "identity", "meta3d"], ["meta4d", "identity"]]},
    {"widths": [16, 16, 16, 32], "blocks": [["identity"], ["identity", "identity"], ["identity", "identity", "identity"], ["identity", "identity"]]},
]


@pytest.mark.parametrize("k", range(len(FIXED_CHOICES) + 4))
def test_extracted_model_equals_the_supernet(k):
    sn = randomised()
    choice = FIXED_CHOICES[k] if k < len(FIXED_CHOICES) else sn.space.sample(random.Random(k))
    model, arch = sn.extract(choice)
    assert arch == sn.space.to_arch(choice) and arch["family"] == "efficientformer"
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        assert close(model(x), sn(x, mode="fixed", choice=choice))
    assert vitslim.count(model)["params"] == vitslim.count(arch)["params"]


def test_extracted_model_saves_and_loads_as_a_vitslim_checkpoint(tmp_path):
    space = dict(SPACE, distillation=True)
    sn = randomised(space)
    choice = FIXED_CHOICES[1]
    model, arch = sn.extract(choice)
    vitslim.save_checkpoint(model, arch, tmp_path / "m.pt")
    loaded, arch2 = vitslim.load_checkpoint(tmp_path / "m.pt")
    assert arch2 == arch and arch2["distillation"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert close(loaded(x), sn(x, mode="fixed", choice=choice))


def test_hard_mode_runs_only_the_sampled_path_and_samples_valid_choices():
    sn = randomised().train()
    calls = []
    for n, m in sn.named_modules():
        if n.endswith((".meta4d", ".meta3d")):
            m.register_forward_pre_hook(lambda mod, inp, n=n: calls.append(n))
    # meta4d_forward / meta3d_forward call the module itself at full width
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        calls.clear()
        sn(torch.randn(2, 3, 64, 64), mode="hard", generator=g)
        c = sn.space.check_choice(sn.last_choice)  # raises on a Meta4D after a Meta3D
        ran = {f"stages.{i}.blocks.{j}.{t}" for i, bl in enumerate(c["blocks"]) for j, t in enumerate(bl) if t != "identity"}
        assert set(calls) == ran
        seen.add(str(c["blocks"]))
    assert len(seen) > 20


def test_hard_mode_gives_alphas_gradients_and_unsampled_paths_none():
    sn = randomised().train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 7, (4,))
    noise = [torch.zeros_like(a) for a in sn.alphas]
    with torch.no_grad():  # make stage 3 position 0 prefer meta3d, everything else meta4d
        for a in sn.alphas:
            a[:, 0] = 1.0
        sn.alphas[2][0, 1] = 2.0
    F.cross_entropy(sn(x, mode="hard", noise=noise, tau=1.0), y).backward()
    assert sn.last_choice["blocks"][2] == ["meta3d", "meta3d", "meta3d"]  # meta4d masked after meta3d
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in sn.alphas)
    blk = sn.stages[2].blocks
    assert blk[0].meta4d.mlp.fc1.weight.grad is None and blk[0].meta3d.token_mixer.qkv.weight.grad is not None
    # with the same path fixed, the value is the plain subnet's (the straight-through weight is 1)
    sn.eval()
    with torch.no_grad():
        assert close(sn(x, mode="hard", noise=noise), sn(x, mode="fixed", choice=sn.last_choice))


def test_soft_mode_is_the_mixture_and_a_peaked_mixture_is_the_fixed_net():
    sn = randomised()
    choice = FIXED_CHOICES[2]
    with torch.no_grad():
        for i, (a, bl) in enumerate(zip(sn.alphas, choice["blocks"])):
            a.fill_(-40.0)
            for j, t in enumerate(bl):
                a[j, sn.space.stages[i].candidates.index(t)] = 40.0
    x = torch.randn(2, 3, 64, 64)
    noise = [torch.zeros_like(a) for a in sn.alphas]
    with torch.no_grad():
        assert close(sn(x, mode="soft", noise=noise, widths=choice["widths"]), sn(x, mode="fixed", choice=choice))
    sn.train()
    with torch.no_grad():
        for a in sn.alphas:
            a.zero_()
    out = sn(x, mode="soft", generator=torch.Generator().manual_seed(1), tau=2.0)
    out.sum().backward()
    assert all(a.grad.abs().sum() > 0 for a in sn.alphas)
    assert all(p.grad is not None for n, p in sn.named_weight_parameters())  # every candidate ran


def test_soft_mode_divides_by_the_temperature():
    """Alphas only 1 apart: at tau 1 the mixture is far from the chosen path, at tau 0.01 softmax(alpha / tau)
    is one-hot (e^-100) and the soft output is the fixed network's."""
    sn = randomised()
    choice = FIXED_CHOICES[2]
    with torch.no_grad():
        for i, (a, bl) in enumerate(zip(sn.alphas, choice["blocks"])):
            a.zero_()
            for j, t in enumerate(bl):
                a[j, sn.space.stages[i].candidates.index(t)] = 1.0
    sn.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    noise = [torch.zeros_like(a) for a in sn.alphas]
    with torch.no_grad():
        fixed = sn(x, mode="fixed", choice=choice)
        assert close(sn(x, mode="soft", noise=noise, widths=choice["widths"], tau=0.01), fixed)
        assert not close(sn(x, mode="soft", noise=noise, widths=choice["widths"], tau=1.0), fixed)


def test_reduced_width_trains_the_prefix_only():
    sn = MetaPathSupernet(SPACE).train()
    before = sn.stages[1].downsample.norm.running_mean.clone()
    out = sn(torch.randn(4, 3, 64, 64), mode="hard", widths=[16, 16, 32, 32], generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    after = sn.stages[1].downsample.norm.running_mean
    assert not torch.equal(after[:16], before[:16]) and torch.equal(after[16:], before[16:])
    g = sn.stages[1].downsample.conv.weight.grad
    assert g[:16, :16].abs().sum() > 0 and g[16:].abs().sum() == 0 and g[:, 16:].abs().sum() == 0


@pytest.mark.parametrize("criterion", ["l1", "norm"])
def test_sort_channels_keeps_the_full_width_function(criterion):
    sn = randomised()
    x = torch.randn(2, 3, 64, 64)
    noise = [torch.randn_like(a) for a in sn.alphas]
    with torch.no_grad():
        ref = [sn(x, mode="fixed", choice=c) for c in FIXED_CHOICES[:1]] + [sn(x, mode="soft", noise=noise)]
        full3d = {"widths": sn.max_widths, "blocks": [["meta4d"], ["meta4d", "identity"], ["meta4d", "meta3d", "meta3d"], ["meta3d", "meta3d"]]}
        ref.append(sn(x, mode="fixed", choice=full3d))
    perms = sn.sort_channels(criterion)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    with torch.no_grad():
        new = [sn(x, mode="fixed", choice=c) for c in FIXED_CHOICES[:1]] + [sn(x, mode="soft", noise=noise)]
        new.append(sn(x, mode="fixed", choice=full3d))
    assert all(close(a, b) for a, b in zip(new, ref))
    scores = sn.channel_scores(criterion)
    for name in ("stage0", "stage3", "stem", "stage2.block1.meta3d"):
        s = scores[name]
        assert torch.all(s[:-1] >= s[1:] - 1e-5), name  # the prefix now holds the highest scores


def test_sort_channels_permutes_the_optimiser_state_with_the_weights():
    sn = randomised().train()
    opt = torch.optim.AdamW(sn.weight_parameters(), lr=1e-3)
    sn(torch.randn(2, 3, 64, 64), mode="hard", generator=torch.Generator().manual_seed(0)).sum().backward()
    opt.step()
    w = sn.stages[3].downsample.norm.weight
    m_before = opt.state[w]["exp_avg"].clone()
    perms = sn.sort_channels("l1", optimizers=[opt])
    assert torch.equal(opt.state[w]["exp_avg"], m_before[perms["stage3"]])


def test_importance_is_the_papers_ratio_and_stage_sum():
    sn = MetaPathSupernet(SPACE)
    with torch.no_grad():
        sn.alphas[0][0] = torch.log(torch.tensor([3.0, 1.0]))          # p(4D) = .75, p(I) = .25 -> 3
        sn.alphas[2][1] = torch.log(torch.tensor([1.0, 1.0, 2.0]))     # p(I) = .5 -> (p4D + p3D) / p(I) = 1
    imp = sn.importance()
    assert imp["metapath"][0][0] == pytest.approx(3.0)
    assert imp["metapath"][2][1] == pytest.approx(1.0)
    assert imp["metapath"][2][0] == pytest.approx(2.0)                  # uniform over 3: 2/3 / 1/3
    assert imp["stage"][2] == pytest.approx(2.0 + 1.0 + 2.0)
    assert imp["candidates"][2] == ["meta4d", "meta3d", "identity"]


def test_best_choice_never_puts_meta4d_after_meta3d():
    sn = MetaPathSupernet(SPACE)
    with torch.no_grad():
        sn.alphas[2][0] = torch.tensor([0.0, 5.0, 0.0])   # meta3d
        sn.alphas[2][1] = torch.tensor([5.0, 0.0, 1.0])   # meta4d most probable, but after a meta3d
    c = sn.best_choice()
    assert c["blocks"][2][:2] == ["meta3d", "identity"]


def test_recalibrate_bn_reestimates_statistics_of_the_running_width():
    sn = randomised()
    choice = FIXED_CHOICES[1]
    batches = [torch.randn(4, 3, 64, 64) for _ in range(3)]
    recalibrate_bn(sn, batches, forward=lambda x: sn(x, mode="fixed", choice=choice))
    assert not sn.training
    rm = sn.stages[1].downsample.norm.running_mean
    assert rm[:32].abs().sum() > 0 and torch.isfinite(rm).all()


def test_recalibrating_one_choice_leaves_the_rest_of_the_supernet_alone():
    """Norms of blocks the choice skips, and channels past its widths, keep their statistics."""
    sn = randomised()
    bns = {n: m for n, m in sn.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    for m in bns.values():  # trained-looking statistics, so that a reset would show
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in bns.items()}
    ran = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: ran.setdefault(n, a[0].shape[1])) for n, m in bns.items()]
    import supernet.supernet as ss
    real = ss._bn

    def spy(bn, x):
        ran.setdefault(next(n for n, m in bns.items() if m is bn), x.shape[1])
        return real(bn, x)
    ss._bn = spy
    try:
        choice = {"widths": [16, 16, 32, 32], "blocks": [["identity"], ["meta4d", "identity"],
                                                         ["meta4d", "identity", "identity"], ["meta4d", "identity"]]}
        recalibrate_bn(sn, [torch.randn(4, 3, 64, 64) for _ in range(2)],
                       forward=lambda x: sn(x, mode="fixed", choice=choice))
    finally:
        ss._bn = real
        for h in hooks:
            h.remove()
    assert ran and len(ran) < len(bns)
    for n, m in bns.items():
        c = ran.get(n, 0)
        assert torch.equal(m.running_mean[c:], before[n][0][c:]) and torch.equal(m.running_var[c:], before[n][1][c:]), n
        if c:
            assert not torch.equal(m.running_mean[:c], before[n][0][:c]), n


@pytest.mark.parametrize("patch,needle", [
    ({"width_step": 16, "stages": [dict(SPACE["stages"][0], max_width=40)] + SPACE["stages"][1:]},
     "stages[0].max_width: got 40, expected a multiple of width_step (16)"),
    ({"stages": [dict(SPACE["stages"][0], candidates=["identity"])] + SPACE["stages"][1:]}, "an empty stage"),
    ({"stages": [dict(SPACE["stages"][0], candidates=[])] + SPACE["stages"][1:]}, "stages[0].candidates: got []"),
    ({"stages": [dict(SPACE["stages"][0], max_depth=0)] + SPACE["stages"][1:]}, "stages[0].max_depth: got 0"),
    ({"stages": [dict(SPACE["stages"][0], max_depth=10 ** 6)] + SPACE["stages"][1:]},  # a million MetaPaths to build
     "stages[0].max_depth: got 1000000, expected an integer <= 1000"),
    ({"input_size": 10 ** 6}, "input_size: got 1000000, expected an integer <= 4096"),
    ({"stages": [dict(SPACE["stages"][0], candidates=["meta4d", "meta4d"])] + SPACE["stages"][1:]}, "listed twice"),
    ({"width_step": 1, "stages": [dict(SPACE["stages"][0], min_width=1)] + SPACE["stages"][1:]},
     "stages[0].min_width: got 1, expected at least 2 for stage 0"),  # its arch would not build (a stem of 0)
])
def test_bad_search_spaces_are_refused_naming_the_value(patch, needle):
    with pytest.raises(ArchError) as e:
        SearchSpace.from_dict({**SPACE, **patch})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_3d_block_before_a_4d_one_is_refused():
    sn = MetaPathSupernet(SPACE)
    bad = copy.deepcopy(FIXED_CHOICES[0])
    bad["blocks"][2] = ["meta3d", "meta4d", "identity"]
    with pytest.raises(ArchError, match=r"choice.blocks\[2\]\[1\]: got 'meta4d'.*3D blocks only after 4D"):
        sn.extract(bad)
    with pytest.raises(ArchError, match="widths\\[3\\]: got 40"):
        sn(torch.randn(1, 3, 64, 64), mode="hard", widths=[32, 32, 48, 40])


def test_recalibrate_bn_uses_exactly_max_batches_as_a_cumulative_average():
    """The statistics are the plain average over the first `max_batches` batches (momentum None), not more."""
    bn = torch.nn.BatchNorm1d(3)
    batches = [torch.randn(8, 3) + k for k in range(3)]
    recalibrate_bn(bn, batches, max_batches=2)
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches[:2]]).mean(0))
    assert int(bn.num_batches_tracked) == 2 and bn.momentum == 0.1


def test_hard_mode_alpha_gradient_is_that_of_the_softmax_at_the_temperature():
    """With every alpha equal and no noise the sampled path and the forward value do not depend on
    tau, and p = softmax((alpha + g) / tau) over the allowed candidates is uniform whatever tau:
    dp/dalpha = p (delta - p) / tau, so the alphas' gradients at tau = 2 are half those at tau = 1."""
    grads = []
    for tau in (1.0, 2.0):
        sn = randomised().train()
        x, y = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 5, 6])
        noise = [torch.zeros_like(a) for a in sn.alphas]
        F.cross_entropy(sn(x, mode="hard", noise=noise, tau=tau), y).backward()
        grads.append([a.grad.clone() for a in sn.alphas])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for g1, g2 in zip(*grads):
        assert torch.allclose(g2, g1 / 2, rtol=1e-4, atol=1e-9)


def test_extracted_model_is_in_the_supernets_mode():
    """An eval-mode supernet extracts an eval-mode model (BatchNorm on running statistics, as the
    supernet's fixed-mode output it equals), a training one a training one."""
    sn = randomised().eval()
    model, _ = sn.extract(FIXED_CHOICES[0])
    assert not model.training and not any(m.training for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert close(model(x), sn(x, mode="fixed", choice=FIXED_CHOICES[0]))
    model, _ = sn.train().extract(FIXED_CHOICES[0])
    assert model.training


def test_the_package_exports_the_supernet_and_load_space_without_importing_them_up_front():
    """A training loop of one's own imports MetaPathSupernet and load_space; they were only in submodules. They
    are loaded on first use, so `import supernet` imports no more than before (no cycle, no slower start)."""
    import subprocess
    import sys
    code = ("import sys, supernet; assert 'supernet.supernet' not in sys.modules, 'imported up front'; "
            "from supernet import MetaPathSupernet, load_space; import supernet.supernet as s, supernet.space as sp; "
            "assert MetaPathSupernet is s.MetaPathSupernet and load_space is sp.load_space; "
            "assert {'MetaPathSupernet', 'load_space'} <= set(supernet.__all__); "
            "assert load_space('tiny').name == 'tiny' and MetaPathSupernet(load_space('tiny')).space.name == 'tiny'; "
            "print('ok')")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    import supernet
    with pytest.raises(AttributeError, match="module 'supernet' has no attribute 'MetaPathSuper'"):
        supernet.MetaPathSuper
