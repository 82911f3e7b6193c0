"""The pruner counts params and MACs in closed form (pruning.budget.analytic_count) instead of building every
network on the meta device under torch's FLOP counter: the same integers as vitslim.count, on full-size presets
and on pruned, emptied and embedding-pruned networks."""
import pytest

import vitslim
from pruning.budget import analytic_count

from pruning_nets import tiny_deit, tiny_swin


@pytest.mark.parametrize("name", ["deit_tiny", "deit_base", "swin_tiny", "swin_base"])
def test_closed_form_counts_equal_the_flop_counter_on_presets(name):
    arch = vitslim.get_preset(name)
    assert analytic_count(arch) == {k: vitslim.count(arch)[k] for k in ("params", "macs")}


def test_closed_form_counts_equal_the_flop_counter_on_pruned_networks():
    d = tiny_deit(distillation=True, qk=8, v=8, heads=3, ffn=64, blocks=3)
    d["stages"][0]["width"] = 20  # embedding pruned
    b = d["stages"][0]["blocks"]
    b[0].update(heads=2, qk_dim=3, v_dim=7, ffn_hidden=17)
    b[1].update(heads=0, qk_dim=0, v_dim=0, ffn_hidden=9)  # attention gone
    b[2].update(heads=1, qk_dim=1, v_dim=2, ffn_hidden=0)  # MLP gone
    s = tiny_swin()
    s["stages"][0]["width"] = 12
    s["stages"][1]["blocks"][0] = dict(s["stages"][1]["blocks"][0], heads=0, qk_dim=0, v_dim=0, ffn_hidden=0)
    s["stages"][1]["blocks"][1] = dict(s["stages"][1]["blocks"][1], heads=3, qk_dim=5, v_dim=8, ffn_hidden=40)
    for a in (d, s):
        a = vitslim.resolve_arch(a)
        assert analytic_count(a) == {k: vitslim.count(a)[k] for k in ("params", "macs")}, a["family"]
