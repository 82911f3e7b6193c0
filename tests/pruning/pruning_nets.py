"""Tiny DeiT and Swin networks (32x32 inputs), batches and a made-up latency table shared by the
pruning tests."""
import itertools

import torch

import vitslim


def tiny_deit(distillation=False, qk=8, v=8, heads=3, ffn=64, blocks=2, in_chans=3):
    return vitslim.resolve_arch({
        "family": "deit", "input_size": 32, "in_chans": in_chans, "num_classes": 10, "distillation": distillation,
        "stem": {"patch_size": 8},
        "stages": [{"width": 24, "blocks": [{"type": "vit", "heads": heads, "qk_dim": qk, "v_dim": v,
                                             "ffn_hidden": ffn} for _ in range(blocks)]}]})


def tiny_swin():
    # stage 0 at 16x16 tokens with window 6: padded windows; stage 1 shifted blocks with a mask
    return vitslim.resolve_arch({
        "family": "swin", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 2},
        "stages": [{"width": 16, "window_size": 6, "blocks": [{"type": "swin", "heads": 2, "ffn_hidden": 32}] * 2},
                   {"width": 32, "window_size": 4, "blocks": [{"type": "swin", "heads": 4, "ffn_hidden": 64}] * 2}]})


def build(arch, seed=0, scale=1.0, after_init=False):
    """A random network whose weights are large enough that every unit matters. `after_init`: seeded after the
    model's own init, whose draws differ between torch versions (trunc_normal_), so the same weights on every torch."""
    if not after_init:
        torch.manual_seed(seed)
    m = vitslim.build_model(arch)
    if after_init:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 or "relative_position" in name:
                p.normal_(0, scale / max(p.shape[-1], 1) ** 0.5 if p.dim() >= 2 else 0.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return m.eval()


def batches(arch, n=2, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = arch["input_size"]
    return [(torch.randn(bs, arch["in_chans"], s, s, generator=g), torch.randint(0, arch["num_classes"], (bs,), generator=g))
            for _ in range(n)]


def proxy_macs(key) -> float:
    """A quick stand-in for latency_tables' MACs coordinate (monotone in every width): the tests are
    about how the pruner uses a table, not about counting MACs on the meta device."""
    ints = [v for k, v in key.items() if k != "op" and isinstance(v, int) and not isinstance(v, bool)]
    if "heads" not in key:
        out = 1.0
        for v in ints:
            out *= max(v, 1)
        return out
    t = key.get("tokens") or key["res"] ** 2
    n = key.get("window", 0) ** 2 or t
    d, h, q, v, f = key["dim"], key["heads"], key["qk_dim"], key["v_dim"], key["ffn_hidden"]
    return float(t * d * h * (2 * q + v) + t * n * h * (q + v) + t * h * v * d + 2 * t * d * f)


def fake_table(arch):
    """Entries for the arch's own keys and a grid of narrower blocks: ms = 0.05 + proxy MACs / 1e7."""
    from latency_tables.segments import decompose
    from latency_tables.table import LatencyTable
    t = LatencyTable({"backend": "torch-cpu", "device": "test", "threads": 1, "batch_size": 1},
                     built_for={"family": arch["family"]}, overhead={"intercept_ms": 0.1, "scale": 0.05})
    for seg in decompose(arch):
        keys = [seg.key]
        if "heads" in seg.key:
            k0 = seg.key
            keys = [dict(k0, heads=h, qk_dim=q, v_dim=v, ffn_hidden=f)
                    for h, q, v, f in itertools.product({1, k0["heads"]}, {1, k0["qk_dim"]}, {1, k0["v_dim"]},
                                                        {0, 1, k0["ffn_hidden"]})]
        for k in keys:
            ms = 0.05 + proxy_macs(k) / 1e7
            t.set(k, ms, ms, ms, 5)
    return t


def part_ms(key) -> float:
    """Made-up latency of a block as attention part + FFN part: multilinear in (heads, qk_dim, v_dim)
    and linear in ffn_hidden (so interpolation on the width grid is exact), and far from
    proportional to MACs (a Q/K channel costs as much as a V channel here)."""
    if key["op"] not in ("vit_block", "swin_block"):
        return 0.1 + proxy_macs(key) / 1e7
    h, q, v, d, f = key["heads"], key["qk_dim"], key["v_dim"], key["dim"], key["ffn_hidden"]
    attn = 0.05 + 0.01 * h + 0.002 * h * q + 0.002 * h * v + 0.0001 * q * v + 0.0002 * d if h else 0.0
    ffn = 0.02 + 0.0005 * f + 0.0002 * d if f else 0.0
    return attn + ffn


def grid_table(arch, spec=None, overhead=None):
    """A table with the arch's entries and its pruning width grid (latency_tables.grid), ms = part_ms."""
    from latency_tables.grid import GridSpec, prune_grid_keys
    from latency_tables.segments import arch_keys
    from latency_tables.table import LatencyTable
    t = LatencyTable({"backend": "torch-cpu", "device": "test", "threads": 1, "batch_size": 1},
                     built_for={"family": arch["family"]},
                     overhead=overhead or {"intercept_ms": 0.1, "scale": 0.05, "per_segment_ms": 0.02})
    for k in arch_keys(arch) + prune_grid_keys(arch, spec or GridSpec(qk=4, v=4, ffn=16, heads=2)):
        ms = part_ms(k)
        t.set(k, ms, ms, ms, 5)
    return t


def with_widths(arch, widths):
    """`arch` with block i at widths[i] = (heads, qk_dim, v_dim, ffn_hidden) (in block_infos order)."""
    import copy
    from pruning.units import block_infos
    a = copy.deepcopy(arch)
    for info, (h, q, v, f) in zip(block_infos(arch), widths):
        a["stages"][info.stage]["blocks"][info.index].update(heads=h, qk_dim=q if h else 0, v_dim=v if h else 0,
                                                             ffn_hidden=f)
    return a
