"""The arch config: validation errors name key, value and expectation; YAML round trips."""
import os

import pytest
import yaml

import vitslim
from supernet import arch as A


def test_unknown_family_names_value_and_choices():
    with pytest.raises(vitslim.ArchError) as e:
        A.validate({"family": "resnet", "stages": [{"width": 8, "blocks": []}]})
    msg = str(e.value)
    assert "'resnet'" in msg and "deit" in msg and "efficientformer" in msg


def test_non_mapping_config_is_rejected():
    with pytest.raises(vitslim.ArchError, match="expected a mapping"):
        A.validate(["family", "deit"])


def test_wrong_version_is_rejected():
    a = vitslim.get_preset("deit_tiny")
    a["version"] = 99
    with pytest.raises(vitslim.ArchError, match=r"version: got 99"):
        A.validate(a)


def test_bad_common_field_names_path():
    a = vitslim.get_preset("deit_tiny")
    a["stages"][0]["width"] = -3
    with pytest.raises(vitslim.ArchError, match=r"stages\[0\]\.width: got -3"):
        A.validate(a)
    a = vitslim.get_preset("deit_tiny")
    a["stages"][0]["blocks"][2]["type"] = "meta4d"
    with pytest.raises(vitslim.ArchError, match=r"stages\[0\]\.blocks\[2\]\.type: got 'meta4d'"):
        A.validate(a)


@pytest.mark.parametrize("name,size,drop", [("deit_tiny", 100, 4), ("swin_tiny", 65, 1)])
def test_an_input_size_the_patches_do_not_tile_is_refused(name, size, drop):
    """A stride-p patch embedding drops the last input_size % p rows and columns without a word."""
    a = vitslim.get_preset(name)
    a["input_size"] = size
    with pytest.raises(vitslim.ArchError, match=rf"input_size: got {size}, expected a multiple of stem.patch_size "
                                                rf"\(\d+\): the patch embedding would drop its last {drop} rows"):
        A.validate(a)


def test_unknown_preset_suggests_near_names():
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.get_preset("deit_tiney")
    assert "deit_tiny" in str(e.value) and "did you mean" in str(e.value)


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientvit_m2", "shvit_s1", "deit_small", "swin_tiny"])
def test_every_family_preset_round_trips_through_yaml(tmp_path, name):
    a = vitslim.get_preset(name)
    p = tmp_path / "arch.yaml"
    vitslim.save_arch(a, p)
    text = p.read_text()
    assert text.startswith("# vitslim arch config")
    assert yaml.safe_load(text) == a
    assert vitslim.load_arch(p) == a
    assert vitslim.count(str(p)) == vitslim.count(a)


def test_yaml_that_is_not_a_mapping_is_rejected(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(vitslim.ArchError, match="expected a mapping"):
        vitslim.build_model(str(p))


def test_invalid_yaml_is_one_clear_error(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("family: [deit\n")
    with pytest.raises(vitslim.ArchError, match="not valid YAML"):
        vitslim.load_arch(p)


def test_yaml_nested_past_the_recursion_limit_is_one_clear_error(tmp_path):
    """A few bytes of '[[[[...' made PyYAML's recursive composer raise RecursionError: a traceback, not an error."""
    p = tmp_path / "deep.yaml"
    p.write_text("family: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.load_arch(p)
    assert str(e.value) == f"{p}: nested too deeply to read (over Python's recursion limit), expected an arch config"
    from latency_tables.table import LatencyError, LatencyTable  # every YAML input reads through the same reader
    with pytest.raises(LatencyError, match="nested too deeply to read"):
        LatencyTable.load(p)


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a.update(input_size=10 ** 6), "input_size: got 1000000, expected an integer <= 4096"),
    (lambda a: a["stages"][0].update(blocks=a["stages"][0]["blocks"] * 100), "stages[0].blocks: 1200 blocks, expected at "
                                                                           "most 1000 in a stage"),
    (lambda a: a.update(stages=a["stages"] * 65), "stages: 65 stages, expected at most 64"),
])
def test_sizes_no_network_comes_near_are_refused_before_anything_is_built(edit, needle, monkeypatch):
    """A few bytes of YAML: a 10**6 px DeiT's position embedding is 3 TB (count() fell back to the CPU and tried to
    allocate it), a stage of a million blocks a million modules."""
    from supernet.families import deit
    built = []
    monkeypatch.setattr(deit, "VisionTransformer", lambda *a, **k: built.append(1))
    a = vitslim.get_preset("deit_tiny")
    edit(a)
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.count(a)
    assert needle in str(e.value) and built == []


def test_the_largest_networks_still_validate():
    for name, size in (("deit_base", 384), ("efficientformer_l7", 224), ("deit_base", 4096)):
        assert vitslim.resolve_arch({**vitslim.get_preset(name), "input_size": size})["input_size"] == size
    a = {**vitslim.get_preset("swin_base"), "input_size": 384}  # Swin-L at 384: 192 wide, 18 blocks in stage 2
    for i, st in enumerate(a["stages"]):
        st.update(window_size=12, width=192 * 2 ** i)
        for b in st["blocks"]:
            b.update(heads=6 * 2 ** i, ffn_hidden=4 * 192 * 2 ** i)
    assert len(a["stages"][2]["blocks"]) == 18
    assert 190e6 < vitslim.count(a)["params"] < 200e6  # Swin-L: 197M


def test_yaml_aliases_that_expand_to_billions_of_values_are_refused(tmp_path, monkeypatch):
    """1 kB of YAML, nine levels of nine aliases: safe_load shares them, but every JSON dump or walk of the data
    expands 387 million values (a latency table's device field took a search to a MemoryError)."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
                                                       for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nfamily: deit\n")
    from supernet import arch as arch_mod
    monkeypatch.setattr(arch_mod, "MAX_YAML_NODES", 10 ** 5, raising=False)  # the walk stops at the limit: 10**7 takes seconds
    with pytest.raises(vitslim.ArchError, match=r"bomb.yaml: YAML aliases \(\*name\) that expand to over 100,000 values"):
        vitslim.load_arch(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("a: &a [*a]\n")  # a list that holds itself: no end to expand
    with pytest.raises(vitslim.ArchError, match="YAML aliases"):
        vitslim.load_arch(loop)
    a = vitslim.get_preset("deit_tiny")  # aliases as people use them (a repeated block written once) still read
    text = yaml.safe_dump({k: v for k, v in a.items() if k != "stages"})
    text += "stages: [{width: 192, blocks: [&b {type: vit, heads: 3, qk_dim: 64, v_dim: 64, ffn_hidden: 768}, "
    text += ", ".join(["*b"] * 11) + "]}]\n"
    (tmp_path / "ok.yaml").write_text(text)
    assert vitslim.load_arch(tmp_path / "ok.yaml") == vitslim.resolve_arch(a)


def test_yaml_error_prefixes_the_file(tmp_path):
    a = vitslim.get_preset("deit_tiny")
    a["num_classes"] = "ten"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(a))
    with pytest.raises(vitslim.ArchError) as e:
        vitslim.load_arch(p)
    assert str(p) in str(e.value) and "num_classes: got 'ten'" in str(e.value)


def test_save_arch_is_atomic_and_leaves_no_temp_files(tmp_path):
    a = vitslim.get_preset("deit_tiny")
    p = tmp_path / "arch.yaml"
    vitslim.save_arch(a, p)
    before = p.read_text()
    bad = dict(a, num_classes=0)
    with pytest.raises(vitslim.ArchError):
        vitslim.save_arch(bad, p)
    assert p.read_text() == before  # invalid config never touches the file
    assert os.listdir(tmp_path) == ["arch.yaml"]


def test_presets_cover_interface_names():
    names = set(vitslim.list_presets())
    want = {"efficientformer_l1", "efficientformer_l3", "efficientformer_l7", "deit_tiny", "deit_small",
            "deit_base", "swin_tiny", "swin_small", "swin_base"}
    want |= {f"efficientvit_m{i}" for i in range(6)} | {f"shvit_s{i}" for i in range(1, 5)}
    assert want <= names
