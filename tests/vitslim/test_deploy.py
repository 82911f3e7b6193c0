"""What engineers do with vitslim's networks on the way to a device: an ONNX export over protobuf's 2 GB keeps its
weights in one OUT.data beside it (torch spilled one file per tensor into the folder, where the next export
overwrote them), every family converts to Core ML (EfficientViT's window attention did arithmetic on traced
sizes), and a pruned DeiT exports with a dynamic batch under torch.export."""
import os
import sys

import numpy as np
import pytest
import torch

import vitslim
import vitslim.export as ex

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "supernet"))
from test_deit import tiny_arch as pruned_deit  # noqa: E402
from test_efficientvit import tiny as tiny_efficientvit  # noqa: E402


def _spill_like_torch_over_2gb(monkeypatch):
    """torch.onnx.export as it behaves past 2 GB: every initializer written as its own file beside the graph."""
    import onnx
    real = torch.onnx.export

    def export(model, args, f, **kw):
        real(model, args, f, **kw)
        proto = onnx.load(f)
        onnx.save_model(proto, f, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    monkeypatch.setattr(torch.onnx, "export", export)


def test_a_large_onnx_export_keeps_its_weights_in_one_file_beside_it(monkeypatch, tmp_path):
    import onnxruntime as ort
    _spill_like_torch_over_2gb(monkeypatch)
    a = tiny_efficientvit()
    torch.manual_seed(0)
    m1, m2 = vitslim.build_model(a).eval(), vitslim.build_model(a).eval()
    m1.arch = m2.arch = a
    r1 = vitslim.export_model(m1, "onnx", tmp_path / "a.onnx")
    assert r1["data"] == str(tmp_path / "a.onnx.data") and r1["max_rel_error"] < 1e-4
    vitslim.export_model(m2, "onnx", tmp_path / "b.onnx")  # another network's weights, same tensor names
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data"]
    x = torch.randn(2, 3, a["input_size"], a["input_size"])
    got = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = vitslim.fuse(m1)(x).numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4  # a.onnx still runs model 1
    with pytest.raises(vitslim.VitslimError, match="a.onnx.data: already exists"):
        (tmp_path / "a.onnx").unlink()
        vitslim.export_model(m1, "onnx", tmp_path / "a.onnx")
    assert sorted(os.listdir(tmp_path)) == ["a.onnx.data", "b.onnx", "b.onnx.data"]  # nothing half-written


def test_every_family_converts_to_core_ml(tmp_path):
    """EfficientViT's window attention computed its padding from traced sizes (aten::Int of a tensor), which
    coremltools cannot fold: the shipped efficientvit_m0 failed with a 60-line traceback."""
    a = tiny_efficientvit()
    res = vitslim.export_model(a, "coreml", tmp_path / "e.mlpackage")
    assert res["format"] == "coreml" and (tmp_path / "e.mlpackage" / "Manifest.json").is_file()


def test_a_pruned_deit_exports_with_a_dynamic_batch():
    """Q/K narrower than V picked its attention kernel by batch size, which pinned torch.export's batch range
    (to 2..3 for an example of 2)."""
    a = vitslim.resolve_arch(pruned_deit(distillation=False))
    torch.manual_seed(0)
    m = vitslim.build_model(a).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (torch.randn(2, 3, 32, 32),), dynamic_shapes={"x": {0: batch}})
    for n in (1, 8, 16):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            got, ref = ep.module()(x), m(x)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-5, n


def test_an_opset_without_an_operator_is_one_error_without_torchs_graph_dump(tmp_path, capfd):
    a = vitslim.resolve_arch(pruned_deit(distillation=False))
    with pytest.raises(vitslim.VitslimError, match=r"onnx: torch.onnx.export failed at opset 9 \(.*unflatten.*\); a "
                                                   r"higher opset"):
        vitslim.export_model(a, "onnx", tmp_path / "m.onnx", opset=9)
    out, err = capfd.readouterr()
    assert "Torch IR graph" not in out + err and not os.listdir(tmp_path)


def test_a_core_ml_conversion_failure_is_one_error(monkeypatch, tmp_path):
    def fail(model, x):
        raise TypeError("only 0-dimensional arrays can be converted to Python scalars\n(60 lines of traceback)")
    monkeypatch.setattr(ex, "to_coreml", fail)
    with pytest.raises(vitslim.VitslimError, match=r"^coreml: coremltools could not convert this efficientvit network "
                                                   r"\(TypeError: only 0-dimensional arrays can be converted to Python "
                                                   r"scalars\)$"):
        vitslim.export_model(tiny_efficientvit(), "coreml", tmp_path / "e.mlpackage")
    assert not os.listdir(tmp_path)


def test_an_onnx_export_without_a_stdout_works(monkeypatch, tmp_path):
    """sys.stdout is None under pythonw, `>&-` and some service managers: dropping torch's graph dump flushed it."""
    monkeypatch.setattr(sys, "stdout", None)
    assert vitslim.export_model(vitslim.resolve_arch(pruned_deit()), "onnx", tmp_path / "m.onnx")["max_rel_error"] < 1e-4


def test_a_large_onnx_export_through_a_link_into_another_folder_is_refused(monkeypatch, tmp_path):
    """Its weights go beside the graph, where ONNX loaders opening the link's path do not look."""
    _spill_like_torch_over_2gb(monkeypatch)
    (tmp_path / "store").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "m.onnx").symlink_to(tmp_path / "store" / "real.onnx")
    with pytest.raises(vitslim.VitslimError, match=r"a link into another folder .*export to the target's path"):
        vitslim.export_model(vitslim.resolve_arch(tiny_efficientvit()), "onnx", tmp_path / "work" / "m.onnx")
    assert os.listdir(tmp_path / "store") == [] and os.listdir(tmp_path / "work") == ["m.onnx"]
