"""The public functions refuse a wrong kind of argument with one line naming it, the value and what was
expected, instead of an AttributeError deep inside or a silent default."""
import pytest
import torch

import vitslim
from supernet.errors import ArchError


def small():
    return dict(vitslim.get_preset("efficientvit_m0"), input_size=64, num_classes=10)


@pytest.mark.parametrize("size, match", [(0, "got 0"), (-32, "got -32"), ("64", "got '64'")])
def test_count_refuses_a_bad_input_size_also_zero(size, match):
    a = small()
    m = vitslim.build_model(a)
    for target in (a, m):
        with pytest.raises(ArchError, match=f"input_size: {match}, expected an integer"):
            vitslim.count(target, input_size=size)
    with pytest.raises(ArchError, match=f"input_size: {match}, expected an integer >= 1"):
        vitslim.count(torch.nn.Conv2d(3, 4, 3), input_size=size)  # a plain module too
    assert vitslim.count(a, input_size=None) == vitslim.count(a) == vitslim.count(m)


@pytest.mark.parametrize("bad", [None, "deit_tiny", {"family": "deit"}])
def test_fuse_and_save_checkpoint_want_a_module(tmp_path, bad):
    with pytest.raises(TypeError, match=rf"model: got {type(bad).__name__}, expected an nn.Module"):
        vitslim.fuse(bad)
    with pytest.raises(TypeError, match=rf"model: got {type(bad).__name__}, expected an nn.Module"):
        vitslim.save_checkpoint(bad, small(), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_predict_takes_a_model_vitslim_built_and_names_what_it_takes():
    from latency_tables import LatencyTable
    t = LatencyTable.load("cpu_torch_efficientformer_l1")
    m = vitslim.build_model("efficientformer_l1")
    assert t.predict(m) == t.predict(m.arch) == t.predict("efficientformer_l1")
    assert t.predict_stages(m) == t.predict_stages(m.arch)
    for bad, what in ((torch.nn.Linear(2, 3), "Linear without .arch"), (None, "NoneType"), (123, "int")):
        with pytest.raises(TypeError, match=f"arch: got {what}, expected an arch dict, a preset name, an arch .yaml path"):
            t.predict(bad)


def test_export_error_is_a_value_error_and_load_arch_is_documented():
    from vitslim.export import ExportError
    assert issubclass(ExportError, ValueError) and issubclass(ExportError, vitslim.VitslimError)
    assert "arch .yaml" in (vitslim.load_arch.__doc__ or "")
