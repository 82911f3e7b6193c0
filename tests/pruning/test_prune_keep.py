"""Torch-Pruning's ignored_layers and pruning_ratio_dict, in vitslim's words: `--keep` leaves blocks whole (no
unit, no branch, and with --prune-embed not their stage's residual width), `--min-keep KIND=F,...` sets the
floor per unit kind. Both selections, depth moves and the reachability check respect them."""
import json
import re

import pytest

from pruning.budget import Floor, MacsCost, Network, select_knapsack, select_ratio
from pruning.importance import TaylorImportance
from pruning.pruner import PruneConfig, prune, resolve_keep
from pruning.surgery import apply_plan
from pruning.units import PruneError, block_infos
from vitslim.cli import main

from pruning_nets import batches, build, tiny_deit, tiny_swin


def _blocks(arch):
    return [b for st in arch["stages"] for b in st["blocks"]]


def test_keep_names_blocks_by_flat_index_or_path_and_refuses_others():
    infos = block_infos(tiny_swin())  # 2 + 2 blocks
    assert resolve_keep(["0", "-1"], infos) == {(0, 0), (1, 1)}
    assert resolve_keep(["stages[1].blocks[0]"], infos) == {(1, 0)}
    for bad in ("4", "-5", "stages[2].blocks[0]", "first"):
        with pytest.raises(PruneError, match=re.escape(f"--keep: got '{bad}'") + ".*of this model's 4 blocks"):
            resolve_keep([bad], infos)


@pytest.mark.parametrize("select", [select_ratio, select_knapsack])
@pytest.mark.parametrize("kw", [{}, {"depth": True}, {"embed": True}])
def test_kept_blocks_stay_whole_under_every_move(select, kw):
    arch = tiny_deit(blocks=3, heads=3, qk=8, v=8, ffn=64)
    model = build(arch)
    sc = TaylorImportance().score(model, arch, batches(arch, 2), embed=bool(kw.get("embed")))
    cost = MacsCost()
    sel = select(Network(arch, sc, cost, Floor(0.1, keep={(0, 1)}), **kw), 0.6 * cost.total(arch))
    _, small = apply_plan(model, arch, sel.plan)
    assert _blocks(small)[1] == _blocks(arch)[1]
    assert small["stages"][0]["width"] == arch["stages"][0]["width"]  # a kept block's stage keeps its width
    assert cost.total(small) <= 0.6 * cost.total(arch)
    assert _blocks(small)[0] != _blocks(arch)[0] or _blocks(small)[2] != _blocks(arch)[2]


def test_per_kind_floor():
    arch = tiny_deit(blocks=2, heads=3, qk=8, v=8, ffn=64)
    model = build(arch)
    sc = TaylorImportance().score(model, arch, batches(arch, 2))
    cost = MacsCost()
    floor = Floor({"heads": 1, "ffn": 0.5})
    assert floor.kinds == {"heads": 1.0, "qk": 0.1, "v": 0.1, "ffn": 0.5, "embed": 0.1}
    for select in (select_ratio, select_knapsack):
        sel = select(Network(arch, sc, cost, floor), 0.5 * cost.total(arch))
        _, small = apply_plan(model, arch, sel.plan)
        for b in _blocks(small):
            assert b["heads"] == 3 and b["ffn_hidden"] >= 32, b


def test_prune_reports_keep_and_names_it_when_the_target_is_out_of_reach():
    arch = tiny_deit(blocks=3)
    cfg = PruneConfig(target="macs=0.8", keep="0,-1", min_keep="heads=1", calib_batches=1, eval_batches=0)
    res = prune(build(arch), arch, cfg, calibration=batches(arch, 1))
    assert res.report["keep"] == ["stages[0].blocks[0]", "stages[0].blocks[2]"]
    assert res.report["min_keep"] == {"heads": 1.0}
    assert _blocks(res.arch)[0] == _blocks(arch)[0] and _blocks(res.arch)[2] == _blocks(arch)[2]
    cfg = PruneConfig(target="macs=0.3", keep="0,-1", calib_batches=1, eval_batches=0)
    with pytest.raises(PruneError, match=r"below what the floor allows .*2 block\(s\) kept whole \(--keep\)\); raise the target or lower --min-keep, or --keep fewer blocks"):
        prune(build(arch), arch, cfg, calibration=batches(arch, 1))


def test_cli_keep_and_min_keep_per_kind(tmp_path, capsys):
    import vitslim
    arch = tiny_deit(blocks=3)
    ck = tmp_path / "m.pt"
    vitslim.save_checkpoint(build(arch), arch, ck)
    common = ["prune", "--checkpoint", str(ck), "--data", "synthetic", "--calib-batches", "1", "--eval-batches", "0",
              "--batch-size", "4", "--quiet"]
    assert main(common + ["--target", "macs=0.7", "--keep", "stages[0].blocks[1]", "--min-keep", "ffn=0.5,qk=0.25",
                          "--out", str(tmp_path / "run")]) == 0
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["keep"] == ["stages[0].blocks[1]"] and rep["min_keep"] == {"ffn": 0.5, "qk": 0.25}
    assert rep["blocks"][1]["ffn_hidden"] == rep["blocks"][1]["ffn_hidden_before"]
    assert all(b["ffn_hidden"] >= b["ffn_hidden_before"] // 2 for b in rep["blocks"])
    for args, msg in ((["--keep", "7"], "--keep: got '7', expected a block index from -3 to 2"),
                      (["--min-keep", "ffn=2"], "--min-keep: got ffn=2, expected a fraction in [0, 1]"),
                      (["--min-keep", "mlp=0.5"], "--min-keep: got 'mlp=0.5', expected a fraction or KIND=F")):
        assert main(common + ["--target", "macs=0.6", "--out", str(tmp_path / "bad")] + args) == 2
        assert msg in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / "bad").exists()


def test_keeping_a_block_already_emptied_names_the_real_floor():
    """An empty kept block holds no branch: the depth floor still needs one other branch (it was priced as if every
    other block could go, and the target then failed mid-run with a vaguer error)."""
    import vitslim
    arch = tiny_deit(qk=8, v=8, ffn=64, heads=3, blocks=3)
    arch["stages"][0]["blocks"][0].update(heads=0, qk_dim=0, v_dim=0, ffn_hidden=0)
    arch = vitslim.resolve_arch(arch)
    floors = []
    for keep in ("0", ""):
        cfg = PruneConfig(target="macs=0.1", keep=keep, depth=True, calib_batches=1, eval_batches=0, selection="ratio")
        with pytest.raises(PruneError, match=r"below what the floor allows \(at best macs=") as e:
            prune(build(arch), arch, cfg, calibration=batches(arch, 1))
        floors.append(re.search(r"at best macs=(\d\.\d+)", str(e.value)).group(1))
    assert floors[0] == floors[1], floors  # keeping an empty block changes nothing


def test_a_kind_named_twice_in_min_keep_is_refused():
    with pytest.raises(PruneError, match=r"--min-keep: got heads twice \(heads=1,heads=0\), expected each kind once"):
        PruneConfig(target="macs=0.5", min_keep="heads=1,heads=0").check()


def test_keep_counts_negative_indices_down_to_the_first_block():
    infos = block_infos(tiny_swin())  # 2 + 2 blocks
    assert resolve_keep(["-4"], infos) == {(0, 0)} and resolve_keep(["3", "-2"], infos) == {(1, 1), (1, 0)}


@pytest.mark.parametrize("spec,expected", [(0, 0.0), (1, 1.0), ("1", 1.0), (" 0.25 ", 0.25),
                                           ("heads=1,ffn=0", {"heads": 1.0, "ffn": 0.0}), ({"embed": 0}, {"embed": 0.0})])
def test_min_keep_boundaries_that_are_accepted(spec, expected):
    from pruning.budget import normalize_min_keep
    assert normalize_min_keep(spec) == expected


@pytest.mark.parametrize("spec,shown", [(1.0000001, "1"), (-0.1, "-0.1"), ("heads=1.5", "heads=1.5"), (True, "True"),
                                        ({"ffn": False}, "ffn=False"), ("nan", "nan")])
def test_min_keep_boundaries_that_are_refused(spec, shown):
    """Fractions in [0, 1] only (a bool is not a fraction, though Python counts True as 1)."""
    from pruning.budget import normalize_min_keep
    with pytest.raises(PruneError, match=re.escape(f"--min-keep: got {shown}") + r".*expected a fraction in \[0, 1\]"):
        normalize_min_keep(spec)
