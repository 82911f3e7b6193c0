"""Randomized differential checks of the pruner against independent computations (seeded: a failure names
its case and reproduces): surgery against the unpruned network with the removed units masked by hooks,
Taylor importance against explicit gate variables differentiated by autograd, the closed-form counts
against a network built and counted at the level of torch functions, and the selections against brute
force over every combination of widths."""
import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vitslim
from pruning_nets import grid_table
from random_archs import random_arch, reference_macs
from latency_tables.grid import GridSpec
from pruning.budget import Floor, LatencyCost, MacsCost, Network, ParamsCost, analytic_count, select_knapsack, select_ratio
from pruning.importance import Scores
from pruning.importance import TaylorImportance
from pruning.surgery import apply_plan
from pruning.units import BlockKeep, Plan, block_infos, block_module, pruned_arch


def _random_plan(r, arch) -> Plan:
    keep = {}
    for info in block_infos(arch):
        heads = sorted(r.sample(range(info.heads), r.randint(0, info.heads)))
        nq, nv = (r.randint(1, info.qk_dim), r.randint(1, info.v_dim)) if heads else (0, 0)
        keep[info.key] = BlockKeep(heads, {h: sorted(r.sample(range(info.qk_dim), nq)) for h in heads},
                                   {h: sorted(r.sample(range(info.v_dim), nv)) for h in heads},
                                   sorted(r.sample(range(info.ffn_hidden), r.randint(0, info.ffn_hidden))))
    return Plan(keep)


def _random_net(arch, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    m = vitslim.build_model(arch).to(dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    return m


def _masked_forward(model, arch, plan, x):
    """The unpruned model with every unit the plan removes zeroed by hooks: Q/K pairs and V channels in the qkv
    output, FFN channels at fc2's input, a branch with nothing kept replaced by zeros (its output bias goes too)."""
    handles = []
    for info in block_infos(arch):
        k, blk = plan.get(info), block_module(model, info)
        H, dq, dv = info.heads, info.qk_dim, info.v_dim
        if H and not k.heads:
            handles.append(blk.attn.register_forward_hook(lambda m, a, o: torch.zeros_like(o)))
        elif H:
            mask = torch.zeros(H * (2 * dq + dv), dtype=x.dtype)
            for h in k.heads:
                mask[[h * dq + c for c in k.qk[h]]] = 1
                mask[[H * dq + h * dq + c for c in k.qk[h]]] = 1
                mask[[2 * H * dq + h * dv + c for c in k.v[h]]] = 1
            handles.append(blk.attn.qkv.register_forward_hook(lambda m, a, o, mask=mask: o * mask))
        if info.ffn_hidden and not k.ffn:
            handles.append(blk.mlp.register_forward_hook(lambda m, a, o: torch.zeros_like(o)))
        elif info.ffn_hidden:
            mask = torch.zeros(info.ffn_hidden, dtype=x.dtype)
            mask[k.ffn] = 1
            handles.append(blk.mlp.fc2.register_forward_pre_hook(lambda m, a, mask=mask: (a[0] * mask,)))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_surgery_equals_the_unpruned_network_with_the_removed_units_masked(family):
    r = random.Random(f"surgery-{family}")
    for case in range(8):
        arch = random_arch(family, r)
        model = _random_net(arch, case)
        plan = _random_plan(r, arch)
        pruned, parch = apply_plan(model, arch, plan)
        x = torch.randn(r.choice([1, 2, 5]), arch["in_chans"], arch["input_size"], arch["input_size"],
                        generator=torch.Generator().manual_seed(case), dtype=torch.float64)
        with torch.no_grad():
            got = pruned(x)
        want = _masked_forward(model, arch, plan, x)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"case {case}: {arch}\n{m}")
        # and the pruned network is counted as built: closed form = count() = torch-function-level MACs, params
        c = vitslim.count(parch)
        assert analytic_count(parch) == c, (case, parch)
        assert c == {"params": sum(p.numel() for p in pruned.parameters()),
                     "macs": reference_macs(pruned.float(), parch["input_size"], parch["in_chans"])}, (case, parch)


def _embed_masked_forward(model, arch, plan, x):
    """The unpruned model with the residual channels the plan removes held at zero and every LayerNorm that reads
    the residual width computed over the kept channels only (what a narrower LayerNorm computes), on top of
    _masked_forward's unit masks."""
    widths = [st["width"] for st in arch["stages"]]
    E = [torch.tensor(plan.embed_keep(i, w)) for i, w in enumerate(widths)]
    handles = []

    def norm_over(mod, keep):
        def hook(m, a, o):
            out = torch.zeros_like(o)
            out[..., keep] = F.layer_norm(a[0][..., keep], (len(keep),), m.weight[keep], m.bias[keep], m.eps)
            return out
        handles.append(mod.register_forward_hook(hook))

    def mask(keep, width):
        m = torch.zeros(width, dtype=x.dtype)
        m[keep] = 1
        return m
    for info in block_infos(arch):
        blk, m = block_module(model, info), mask(E[info.stage], widths[info.stage])
        for norm in (blk.norm1, blk.norm2):
            if norm is not None:
                norm_over(norm, E[info.stage])
        for branch in (blk.attn, blk.mlp):  # proj / fc2 rows of removed channels are gone
            if branch is not None:
                handles.append(branch.register_forward_hook(lambda mod, a, o, m=m: o * m))
    norm_over(model.norm, E[-1])
    if arch["family"] == "deit":  # patch embedding, tokens and position embedding: the first block's input
        m0 = mask(E[0], widths[0])
        handles.append(model.blocks[0].register_forward_pre_hook(lambda mod, a: (a[0] * m0,)))
    else:
        norm_over(model.patch_embed.norm, E[0])
        for i in range(1, len(widths)):
            ds, m = model.layers[i].downsample, mask(E[i], widths[i])
            norm_over(ds.norm, torch.cat([q * widths[i - 1] + E[i - 1] for q in range(4)]))  # 4 neighbours concatenated
            handles.append(ds.register_forward_hook(lambda mod, a, o, m=m: o * m))
    try:
        return _masked_forward(model, arch, plan, x)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_embedding_surgery_equals_narrower_layernorms_on_the_kept_channels(family):
    r = random.Random(f"embed-{family}")
    for case in range(8):
        arch = random_arch(family, r)
        model = _random_net(arch, case)
        plan = _random_plan(r, arch) if r.random() < 0.5 else Plan()
        plan.embed = {i: sorted(r.sample(range(st["width"]), r.randint(1, st["width"])))
                      for i, st in enumerate(arch["stages"]) if r.random() < 0.8}
        pruned, _ = apply_plan(model, arch, plan)
        x = torch.randn(r.choice([1, 3]), arch["in_chans"], arch["input_size"], arch["input_size"],
                        generator=torch.Generator().manual_seed(case), dtype=torch.float64)
        with torch.no_grad():
            got = pruned(x)
        torch.testing.assert_close(got, _embed_masked_forward(model, arch, plan, x), rtol=1e-9, atol=1e-9,
                                   msg=lambda m: f"case {case}: {arch} {plan.embed}\n{m}")


def _gated_scores(model, arch, batches, embed):
    """Taylor importance from explicit gates g = 1 (autograd's dL/dg, squared, averaged over batches): on q and on
    k of each Q/K pair separately, on each head's output channels and on the head as a whole at proj's input,
    on fc2's input channels, on each branch's output, and one per residual channel shared by every write into it."""
    acc = {}
    for x, y in batches:
        gates, handles = {}, []

        def gate(name, shape):
            gates[name] = torch.ones(shape, dtype=x.dtype, requires_grad=True)
            return gates[name]
        for info in block_infos(arch):
            blk, key, H, dq, dv = block_module(model, info), info.key, info.heads, info.qk_dim, info.v_dim
            if H:
                gq, gk, gv, gh, ga = gate((key, "q"), H * dq), gate((key, "k"), H * dq), gate((key, "v"), (H, dv)), \
                    gate((key, "head"), (H, 1)), gate((key, "attn"), ())
                handles += [
                    blk.attn.qkv.register_forward_hook(lambda m, a, o, gq=gq, gk=gk, n=H * dq: torch.cat(
                        [o[..., :n] * gq, o[..., n:2 * n] * gk, o[..., 2 * n:]], -1)),
                    blk.attn.proj.register_forward_pre_hook(lambda m, a, gv=gv, gh=gh, H=H, dv=dv: (
                        (a[0].unflatten(-1, (H, dv)) * gv * gh).flatten(-2),)),
                    blk.attn.register_forward_hook(lambda m, a, o, ga=ga: o * ga)]
            if info.ffn_hidden:
                gf, gm = gate((key, "ffn"), info.ffn_hidden), gate((key, "mlp"), ())
                handles += [blk.mlp.fc2.register_forward_pre_hook(lambda m, a, gf=gf: (a[0] * gf,)),
                            blk.mlp.register_forward_hook(lambda m, a, o, gm=gm: o * gm)]
        if embed:
            for i, st in enumerate(arch["stages"]):
                ge = gate(("embed", i), st["width"])
                for info in (i_ for i_ in block_infos(arch) if i_.stage == i):
                    blk = block_module(model, info)
                    if info.index == 0:
                        handles.append(blk.register_forward_pre_hook(lambda m, a, ge=ge: (a[0] * ge,) + tuple(a[1:])))
                    for branch in (blk.attn, blk.mlp):
                        if branch is not None:
                            handles.append(branch.register_forward_hook(lambda m, a, o, ge=ge: o * ge))
        try:
            logits = model(x)
            logits = (logits[0] + logits[1]) / 2 if isinstance(logits, tuple) else logits
            loss = F.cross_entropy(logits, y if y is not None else logits.detach().argmax(-1))
            names = list(gates)
            grads = torch.autograd.grad(loss, [gates[n] for n in names], allow_unused=True) if names else ()
        finally:
            for h in handles:
                h.remove()
        for n, g in zip(names, grads):
            g = torch.zeros_like(gates[n]) if g is None else g
            acc[n] = acc.get(n, 0) + g.detach().double().numpy() ** 2
    return {k: v / len(batches) for k, v in acc.items()}


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_taylor_importance_equals_explicit_gates(family):
    r = random.Random(f"taylor-{family}")
    for case in range(8):
        arch = random_arch(family, r)
        model = _random_net(arch, case)
        g = torch.Generator().manual_seed(case)
        s = arch["input_size"]
        batches = []
        for _ in range(r.randint(1, 3)):
            x = torch.randn(r.randint(1, 3), arch["in_chans"], s, s, generator=g, dtype=torch.float64)
            batches.append((x, torch.randint(0, arch["num_classes"], (len(x),), generator=g) if r.random() < 0.5 else None))
        embed = r.random() < 0.5
        got = TaylorImportance().score(model, arch, batches, embed=embed)
        ref = _gated_scores(model, arch, batches, embed)

        def same(mine, theirs, what):
            np.testing.assert_allclose(np.asarray(theirs, float), np.asarray(mine, float).reshape(np.shape(theirs)),
                                       rtol=1e-9, atol=1e-12 * (1 + float(np.max(np.abs(mine), initial=0))),
                                       err_msg=f"case {case} {what}: {arch}")
        for info in block_infos(arch):
            sc, br = got.blocks[info.key], got.branch[info.key]
            if info.heads:
                same(ref[(info.key, "q")], sc["qk"], "qk (gate on q)")
                same(ref[(info.key, "k")], sc["qk"], "qk (gate on k)")
                same(ref[(info.key, "v")], sc["v"], "v")
                same(ref[(info.key, "head")], sc["head"], "head")
                same(ref[(info.key, "attn")], br[0], "attention branch")
            if info.ffn_hidden:
                same(ref[(info.key, "ffn")], sc["ffn"], "ffn")
                same(ref[(info.key, "mlp")], br[1], "FFN branch")
        for i in (got.embed if embed else {}):
            same(ref[("embed", i)], got.embed[i], f"embed of stage {i}")


def test_taylor_importance_of_a_network_with_no_units_is_empty_not_an_error():
    # every block's branches removed: nothing to take a gradient of (autograd.grad refused an empty list), and no
    # "importance is 0 for every unit" warning about a network that has no unit
    arch = vitslim.resolve_arch({"family": "deit", "input_size": 16, "num_classes": 4, "stem": {"patch_size": 8},
                                 "stages": [{"width": 8, "blocks": [{"type": "vit", "heads": 0, "ffn_hidden": 0}] * 2}]})
    x = torch.randn(2, 3, 16, 16)
    scores = TaylorImportance().score(_random_net(arch, 0, torch.float32), arch, [(x, None)])
    assert all(v.size == 0 for b in scores.blocks.values() for v in b.values())
    assert not scores.all_zero()


def _removed(info, s, w) -> float:
    """Importance a block loses keeping widths w = (heads, qk, v, ffn): its least important heads, then in each kept
    head its least important Q/K pairs and V channels, and its least important FFN channels."""
    h, q, v, f = w
    order = np.argsort(s["head"], kind="stable")
    tot = s["head"][order[:info.heads - h]].sum() + np.sort(s["ffn"])[:info.ffn_hidden - f].sum()
    for hh in order[info.heads - h:]:
        tot += np.sort(s["qk"][hh])[:info.qk_dim - q].sum() + np.sort(s["v"][hh])[:info.v_dim - v].sum()
    return float(tot)


def _options(info, frac):
    lo = lambda n: max(1, math.ceil(frac * n - 1e-9)) if frac > 0 else 0  # noqa: E731
    out = set()
    for h, q, v, f in itertools.product(range(lo(info.heads), info.heads + 1), range(max(1, lo(info.qk_dim)), info.qk_dim + 1),
                                        range(max(1, lo(info.v_dim)), info.v_dim + 1), range(lo(info.ffn_hidden), info.ffn_hidden + 1)):
        out.add((h, q, v, f) if h else (0, 0, 0, f))
    return sorted(out)


def _instance(r, case, blocks):
    arch = vitslim.resolve_arch({"family": "deit", "input_size": 16, "num_classes": 4, "stem": {"patch_size": 8},
                                 "stages": [{"width": r.choice([4, 8]), "blocks": blocks}]})
    rs = np.random.default_rng(case)
    scores = {i.key: {"head": rs.random(i.heads), "qk": rs.random((i.heads, i.qk_dim)), "v": rs.random((i.heads, i.v_dim)),
                      "ffn": rs.random(i.ffn_hidden)} for i in block_infos(arch)}
    return arch, scores


@pytest.mark.parametrize("select", [select_knapsack, select_ratio])
def test_selection_against_brute_force(select):
    # over every combination of kept widths: the plan is within budget whenever one is, respects the floor, and
    # reports its true cost (recounted from the pruned arch) and the importance it removes
    r = random.Random(f"brute-{select.__name__}")
    for case in range(25):
        arch, scores = _instance(r, case, [
            {"type": "vit", "heads": r.randint(1, 3), "qk_dim": r.randint(1, 3), "v_dim": r.randint(1, 3),
             "ffn_hidden": r.randint(1, 5)} for _ in range(r.randint(1, 2))])
        infos = block_infos(arch)
        frac, kind = r.choice([0.0, 0.3, 0.5]), r.choice(["params", "macs"])
        cost = ParamsCost() if kind == "params" else MacsCost()
        options = [_options(i, frac) for i in infos]
        cheapest = vitslim.count(dict(arch, stages=[dict(arch["stages"][0], blocks=[
            dict(b, heads=o[0][0], qk_dim=o[0][1], v_dim=o[0][2], ffn_hidden=min(x[3] for x in o))
            for b, o in zip(arch["stages"][0]["blocks"], options)])]))[kind]
        budget = r.uniform(cheapest, vitslim.count(arch)[kind])
        sel = select(Network(arch, scores, cost, Floor(frac)), budget)
        parch = pruned_arch(arch, sel.plan)
        widths = [(b["heads"], b["qk_dim"], b["v_dim"], b["ffn_hidden"]) for b in parch["stages"][0]["blocks"]]
        assert all(w in o for w, o in zip(widths, options)), (case, widths)
        real = vitslim.count(parch)[kind]
        assert real <= budget and real == sel.cost, (case, real, sel.cost, budget)
        assert sel.removed_importance == pytest.approx(sum(_removed(i, scores[i.key], w) for i, w in zip(infos, widths)),
                                                       abs=1e-12), case


def test_the_knapsack_is_optimal_when_the_cost_is_separable():
    # FFN-only blocks under a params or MACs budget: groups independent and linear, the knapsack exact (brute force)
    r = random.Random("knapsack-exact")
    for case in range(40):
        arch, scores = _instance(r, case, [{"type": "vit", "heads": 0, "ffn_hidden": r.randint(1, 6)}
                                           for _ in range(r.randint(1, 4))])
        infos = block_infos(arch)
        cost = r.choice([ParamsCost(), MacsCost()])
        base = cost.base(arch, infos)
        combos = [(base + sum(cost.block(i, (0, 0, 0, f)) for i, f in zip(infos, fs)),
                   sum(_removed(i, scores[i.key], (0, 0, 0, f)) for i, f in zip(infos, fs)))
                  for fs in itertools.product(*[range(i.ffn_hidden + 1) for i in infos])]
        budget = r.uniform(min(combos)[0], max(combos)[0])
        best = min(m for c, m in combos if c <= budget)
        sel = select_knapsack(Network(arch, scores, cost, Floor(0.0)), budget)
        assert sel.cost <= budget and sel.removed_importance == pytest.approx(best, abs=1e-12), (case, sel, best)


@pytest.mark.parametrize("family", ["deit", "swin"])
def test_what_a_selection_prices_is_what_the_pruned_arch_costs(family):
    # random kept counts (and residual widths): Network.total() = count() of the pruned arch (params, MACs) or the
    # table's predict of it (latency on the width grid, the arch's own entries included as latency build has them)
    r = random.Random(f"price-{family}")
    for case in range(24):
        arch = random_arch(family, r)
        kind = ("params", "macs", "latency", "latency")[case % 4]
        embed = kind != "latency" and r.random() < 0.5
        rs = np.random.default_rng(case)
        scores = Scores({i.key: {"head": rs.random(i.heads), "qk": rs.random((i.heads, i.qk_dim)),
                                 "v": rs.random((i.heads, i.v_dim)), "ffn": rs.random(i.ffn_hidden)}
                         for i in block_infos(arch)}, "random", 1,
                        {s: rs.random(st["width"]) for s, st in enumerate(arch["stages"])} if embed else {})
        if kind == "latency":
            table = grid_table(arch, GridSpec(qk=4, v=4, ffn=8, heads=2))
            cost, price = LatencyCost(table, arch), lambda a: table.predict(a, interpolate=True)
        else:
            cost = ParamsCost() if kind == "params" else MacsCost()
            price = lambda a, kind=kind: vitslim.count(a)[kind]  # noqa: E731
        net = Network(arch, scores, cost, Floor(0.0), embed=embed)
        blocks, embeds = net.counts()
        for k, _ in blocks:
            for unit in k:
                k[unit] = r.randint(0, k[unit]) if unit in ("head", "ffn") else r.randint(1, max(1, k[unit]))
        net.set_counts((blocks, {i: r.randint(1, w) for i, w in embeds.items()}))
        assert net.total() == pytest.approx(price(vitslim.resolve_arch(pruned_arch(arch, net.plan()))), rel=1e-12), \
            (case, kind, arch)
