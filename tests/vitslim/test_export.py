"""`vitslim export`: each format is written atomically, checked against PyTorch, and refuses to
overwrite unless asked."""
import json
import os
import tempfile

import pytest
import torch

import vitslim
from vitslim.cli import main


def tiny_arch(name="deit_tiny"):
    a = vitslim.get_preset(name)
    if a["family"] == "deit":
        a.update(input_size=32, num_classes=5)
        a["stem"]["patch_size"] = 8
        a["stages"][0]["blocks"] = a["stages"][0]["blocks"][:2]
    return a


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    a = tiny_arch()
    m = vitslim.build_model(a)
    p = tmp_path / "m.pt"
    vitslim.save_checkpoint(m, a, p)
    return p


def test_yaml_export_writes_config_and_weights(ckpt, tmp_path):
    out = tmp_path / "out" / "arch.yaml"
    res = vitslim.export_model(str(ckpt), "yaml", out)
    assert vitslim.load_arch(out) == vitslim.resolve_arch(tiny_arch())
    m1, _ = vitslim.load_checkpoint(ckpt)
    m2, _ = vitslim.load_checkpoint(res["checkpoint"])
    for (k1, v1), (k2, v2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_onnx_export_matches_pytorch_in_onnxruntime(ckpt, tmp_path):
    import numpy as np
    import onnxruntime as ort
    out = tmp_path / "m.onnx"
    res = vitslim.export_model(str(ckpt), "onnx", out, batch=2)
    assert res["max_rel_error"] <= 1e-4
    m, a = vitslim.load_checkpoint(ckpt)
    x = torch.randn(3, 3, 32, 32)  # another batch size: the batch axis is dynamic
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_torchscript_export_round_trips(ckpt, tmp_path):
    out = tmp_path / "m.ts"
    res = vitslim.export_model(str(ckpt), "torchscript", out)
    assert res["max_rel_error"] <= 1e-5 and os.path.isfile(out)



def test_a_torchscript_export_passes_on_no_torch_deprecation_notice(ckpt, tmp_path):
    """torch deprecates TorchScript (2.11 on): torch.jit.save / load warned "switch to torch.export" to whoever
    asked vitslim for a TorchScript file (a FutureWarning, printed by default, in torch 2.15), advice they can not
    take here. The file is still written and checked."""
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = vitslim.export_model(str(ckpt), "torchscript", tmp_path / "m.ts", check=True)
    assert res["max_rel_error"] <= 1e-5 and os.path.isfile(tmp_path / "m.ts")
    assert [str(w.message) for w in seen if "deprecated" in str(w.message)] == []


def test_the_same_model_exports_to_the_same_torchscript_bytes(ckpt, tmp_path):
    """No temporary name inside the archive (its inner folder is named after the file). Separate processes:
    within one, TorchScript renames classes traced before (___torch_mangle_N)."""
    import subprocess
    import sys
    outs = [tmp_path / d / "m.ts" for d in ("a", "b")]
    for out in outs:
        subprocess.run([sys.executable, "-m", "vitslim", "export", str(ckpt), "--format", "torchscript", "--out",
                        str(out)], check=True, capture_output=True, cwd=os.path.dirname(os.path.dirname(vitslim.__file__)))
        assert sorted(os.listdir(out.parent)) == ["m.ts"]
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_coreml_export_writes_mlpackage(tmp_path):
    out = tmp_path / "m.mlpackage"
    res = vitslim.export_model(tiny_arch(), "coreml", out)
    assert os.path.isdir(out) and os.path.isfile(out / "Manifest.json") and res["format"] == "coreml"


def test_coreml_export_leaves_no_converted_package_in_the_temp_dir(tmp_path, monkeypatch):
    """coremltools converts into tempfile's dir (tmpXXXX.mlpackage, weights included) and removes it only at
    interpreter exit: every export by a long-lived process (or one killed) left a copy of the model in /tmp."""
    pytest.importorskip("coremltools")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    vitslim.export_model(tiny_arch(), "coreml", tmp_path / "m.mlpackage")
    assert (tmp_path / "m.mlpackage" / "Manifest.json").is_file()
    assert [p.name for p in tmp.iterdir() if p.name.endswith(".mlpackage")] == []


def test_a_symlinked_output_is_written_through_and_the_link_kept(ckpt, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "m.mlpackage").mkdir()
    (store / "m.mlpackage" / "old.bin").write_bytes(b"old")
    link = tmp_path / "m.mlpackage"
    link.symlink_to(store / "m.mlpackage")
    with pytest.raises(vitslim.VitslimError, match="already exists"):
        vitslim.export_model(str(ckpt), "coreml", link)
    vitslim.export_model(str(ckpt), "coreml", link, overwrite=True)  # was: "Cannot call rmtree on a symbolic link"
    assert link.is_symlink() and (store / "m.mlpackage" / "Manifest.json").is_file()
    assert not (store / "m.mlpackage" / "old.bin").exists()
    dangling = tmp_path / "new.mlpackage"  # a link whose target is still to be made: was "Not a directory"
    dangling.symlink_to(store / "new.mlpackage")
    vitslim.export_model(str(ckpt), "coreml", dangling)
    assert dangling.is_symlink() and (store / "new.mlpackage" / "Manifest.json").is_file()
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.ts")):  # a file format: the link's target replaced
        (store / name).write_bytes(b"old")
        (tmp_path / name).symlink_to(store / name)
        vitslim.export_model(str(ckpt), fmt, tmp_path / name, overwrite=True)
        assert (tmp_path / name).is_symlink() and (store / name).stat().st_size > 1000, fmt
    assert sorted(os.listdir(store)) == ["m.mlpackage", "m.onnx", "m.ts", "new.mlpackage"]  # no temporary left
    assert sorted(os.listdir(tmp_path)) == ["m.mlpackage", "m.onnx", "m.pt", "m.ts", "new.mlpackage", "store"]


def test_existing_output_is_refused_and_untouched(ckpt, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"precious")
    with pytest.raises(vitslim.VitslimError, match="already exists"):
        vitslim.export_model(str(ckpt), "onnx", out)
    assert out.read_bytes() == b"precious"
    vitslim.export_model(str(ckpt), "onnx", out, overwrite=True)
    assert out.read_bytes() != b"precious"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.pt"]  # no temp files left behind


def test_cli_export_bad_suffix_is_one_line(capsys, ckpt, tmp_path):
    code = main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "expected a path ending in .onnx" in err and len(err.strip().splitlines()) == 1


def test_cli_export_json(capsys, ckpt, tmp_path):
    code = main(["export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.ts"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["format"] == "torchscript"


def test_exported_files_get_the_usual_mode_and_no_temp_is_left(ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.ts"), ("yaml", "m.yaml")):
            vitslim.export_model(str(ckpt), fmt, tmp_path / "o" / name)
            assert os.stat(tmp_path / "o" / name).st_mode & 0o777 == 0o644, fmt
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "o")) == ["m.onnx", "m.pt", "m.ts", "m.yaml"]


def test_an_unwritable_output_folder_is_one_line(capsys, ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["export", str(ckpt), "--format", "onnx", "--out", str(blocker / "sub" / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"{blocker} is a file, expected a folder to write in" in err


def test_a_missing_checkpoint_says_no_such_file(capsys, tmp_path):
    rc = main(["export", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope.pt: no such file" in err and "preset" in err


def test_a_torchscript_file_as_input_is_named(capsys, ckpt, tmp_path):
    ts = tmp_path / "m.ts"
    vitslim.export_model(str(ckpt), "torchscript", ts)
    rc = main(["export", str(ts), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "a TorchScript archive" in err and not (tmp_path / "m.onnx").exists()


def test_export_at_another_input_size(ckpt, tmp_path):
    a = vitslim.get_preset("efficientformer_l1")
    a.update(num_classes=5)
    a["stages"] = [dict(s, blocks=s["blocks"][:1]) for s in a["stages"]]
    torch.manual_seed(0)
    m = vitslim.build_model(a)
    p = tmp_path / "ef.pt"
    vitslim.save_checkpoint(m, a, p)
    res = vitslim.export_model(str(p), "torchscript", tmp_path / "ef.ts", input_size=64)
    assert res["max_rel_error"] <= 1e-5
    traced = torch.jit.load(str(tmp_path / "ef.ts"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(traced(x), vitslim.fuse(m)(x), atol=1e-5)
    # a network whose weights are bound to its input size (DeiT's position embedding) is refused
    with pytest.raises(vitslim.VitslimError, match=r"--input-size: got 64, but these weights fit only 32 \(deit: .*pos_embed"):
        vitslim.export_model(str(ckpt), "onnx", tmp_path / "d.onnx", input_size=64)
    # a preset (no weights) is built at the size asked
    vitslim.export_model("deit_tiny", "torchscript", tmp_path / "d.ts", input_size=64, check=True)


def test_an_arch_yaml_with_its_weights_beside_it_exports_the_trained_network(capsys, ckpt, tmp_path):
    """export --format yaml writes X.yaml + X.pt; exporting X.yaml brings X.pt's weights, and an arch alone says
    its weights are random."""
    vitslim.export_model(str(ckpt), "yaml", tmp_path / "pair" / "net.yaml")
    rc = main(["export", str(tmp_path / "pair" / "net.yaml"), "--format", "torchscript", "--out", str(tmp_path / "a.ts")])
    out = capsys.readouterr().out
    assert rc == 0 and f"weights: {tmp_path / 'pair' / 'net.pt'}" in out and "untrained" not in out
    m, _ = vitslim.load_checkpoint(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "a.ts"))(x), m.eval()(x), atol=1e-5)
    vitslim.save_arch(tiny_arch(), tmp_path / "alone.yaml")
    rc = main(["export", str(tmp_path / "alone.yaml"), "--format", "torchscript", "--out", str(tmp_path / "b.ts")])
    assert rc == 0 and "note: untrained (random, seed 0) weights" in capsys.readouterr().out
    res = vitslim.export_model(str(tmp_path / "alone.yaml"), "torchscript", tmp_path / "c.ts")
    assert res["trained"] is False


def test_the_yaml_of_a_checkpoint_beside_it_needs_no_overwrite_and_keeps_it(ckpt, tmp_path):
    before = open(ckpt, "rb").read()
    res = vitslim.export_model(str(ckpt), "yaml", tmp_path / "m.yaml")  # ckpt is tmp_path/m.pt
    assert res["checkpoint"] == str(tmp_path / "m.pt") and open(ckpt, "rb").read() == before
    assert vitslim.load_arch(tmp_path / "m.yaml") == vitslim.resolve_arch(tiny_arch())


def test_a_checkpoint_with_a_flipped_byte_is_refused(capsys, ckpt, tmp_path):
    d = bytearray(open(ckpt, "rb").read())
    for i in range(len(d) // 2, len(d) // 2 + 64):
        d[i] ^= 0xFF
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(d))
    rc = main(["export", str(bad), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "corrupt (CRC mismatch in " in err
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_without_the_onnx_package_is_one_line(monkeypatch, ckpt, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(vitslim.VitslimError, match="the onnx package is not installed"):
        vitslim.export_model(str(ckpt), "onnx", tmp_path / "x.onnx", check=False)
    assert os.listdir(tmp_path) == ["m.pt"]


def test_overwrite_never_removes_a_directory_for_a_file_format(ckpt, tmp_path):
    d = tmp_path / "keep.onnx"
    d.mkdir()
    (d / "data.txt").write_text("precious")
    with pytest.raises(vitslim.VitslimError, match="is a directory, expected a file path for format onnx"):
        vitslim.export_model(str(ckpt), "onnx", d, overwrite=True)
    assert (d / "data.txt").read_text() == "precious"


def test_an_interrupted_checkpoint_write_leaves_no_temporary(monkeypatch, ckpt, tmp_path):
    real = torch.save

    def interrupted(obj, f, *a, **k):
        real(obj, f, *a, **k)
        raise KeyboardInterrupt  # Ctrl-C after the bytes, before the rename

    monkeypatch.setattr(torch, "save", interrupted)
    m, a = vitslim.load_checkpoint(ckpt)
    with pytest.raises(KeyboardInterrupt):
        vitslim.export_model(str(ckpt), "yaml", tmp_path / "o" / "n.yaml")
    with pytest.raises(KeyboardInterrupt):
        vitslim.save_checkpoint(m, a, tmp_path / "o" / "direct.pt")
    assert os.listdir(tmp_path / "o") == []


def test_a_core_ml_check_over_the_float16_tolerance_fails(monkeypatch, ckpt, tmp_path):
    """On macOS the package predicts: an output far from PyTorch's is an error, not a figure (faked here)."""
    import sys
    import numpy as np
    import vitslim.export as ex

    class Fake:
        def __init__(self, scale):
            self.scale = scale

        def save(self, path):
            os.makedirs(path)

        def predict(self, d):
            with torch.no_grad():
                ref = ex._deploy(*vitslim.load_checkpoint(ckpt), 1)[2].numpy()
            return {"logits": ref * self.scale}

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ex, "to_coreml", lambda model, x: Fake(1.001))
    assert vitslim.export_model(str(ckpt), "coreml", tmp_path / "ok.mlpackage")["max_rel_error"] < 2e-3
    monkeypatch.setattr(ex, "to_coreml", lambda model, x: Fake(np.float32(3.0)))
    with pytest.raises(vitslim.VitslimError, match="coreml check: Core ML output differs .* expected <= 0.05"):
        vitslim.export_model(str(ckpt), "coreml", tmp_path / "bad.mlpackage")
    assert not (tmp_path / "bad.mlpackage").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "m.pt") == ["ok.mlpackage"]  # no temporary left


def test_export_of_an_arch_leaves_the_callers_random_state_alone(tmp_path):
    """An arch (no weights) is exported with the random weights of seed 0, at its own input size and at another,
    without reseeding the caller's torch RNG."""
    from supernet.checkpoint import load_checkpoint
    a = tiny_arch("efficientvit_m0")
    a.update(input_size=64, num_classes=5)
    for size in (None, 96):
        torch.manual_seed(1234)
        state = torch.get_rng_state()
        out = tmp_path / f"{size}.safetensors"
        vitslim.export_model(a, "safetensors", out, input_size=size)
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(0)
        ref = vitslim.build_model(dict(a, input_size=size or 64))  # the weights exported: seed 0's, as before
        got, _ = load_checkpoint(out)
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in got.state_dict().items())


def test_safetensors_export_keeps_the_models_mode_and_dtype(tmp_path):
    a = tiny_arch("efficientvit_m0")
    a.update(input_size=64, num_classes=5)
    torch.manual_seed(0)
    m = vitslim.build_model(a).train()
    res = vitslim.export_model(m, "safetensors", tmp_path / "m.safetensors")
    assert m.training and res["max_rel_error"] == 0
    m.eval()
    vitslim.export_model(m, "safetensors", tmp_path / "m.safetensors", overwrite=True)
    assert not m.training
    for dtype in (torch.float64, torch.bfloat16):  # checked in the model's own dtype
        md = vitslim.build_model(a).to(dtype)
        with torch.no_grad():
            for p in md.parameters():
                p.add_(torch.randn(p.shape, dtype=torch.float64).to(dtype) * 1e-3)  # not float32-exact in float64
        res = vitslim.export_model(md, "safetensors", tmp_path / f"{dtype}.safetensors".replace("torch.", ""))
        assert res["max_rel_error"] <= 1e-5 and next(md.parameters()).dtype == dtype


@pytest.mark.parametrize("kw, match", [
    (dict(opset=99), r"opset: got 99, expected an integer from \d+ to \d+"),
    (dict(opset=5), r"opset: got 5, expected an integer from \d+ to \d+"),
    (dict(opset="17"), r"opset: got '17', expected an integer"),
    (dict(batch="1"), r"--batch: got '1', expected an integer >= 1"),
    (dict(batch=2.5), r"--batch: got 2.5, expected an integer >= 1"),
    (dict(batch=0), r"--batch: got 0, expected an integer >= 1"),
])
def test_bad_export_arguments_are_refused_up_front(ckpt, tmp_path, kw, match):
    from vitslim.export import ExportError
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=match) as e:
        vitslim.export_model(str(ckpt), "onnx", out, **kw)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value) and not out.exists()


def test_a_yaml_export_killed_between_its_two_files_is_finished_by_a_re_run(ckpt, tmp_path):
    """X.pt is written before X.yaml: a kill in between left X.pt, and the same export again was refused
    ("X.pt: already exists"), although the file was its own. A checkpoint of exactly this network is kept;
    another one is still refused."""
    out = tmp_path / "pair" / "net.yaml"
    vitslim.export_model(str(ckpt), "yaml", out)
    before = (tmp_path / "pair" / "net.pt").read_bytes()
    os.remove(out)   # as the kill left it
    res = vitslim.export_model(str(ckpt), "yaml", out)
    assert res["checkpoint"] == str(tmp_path / "pair" / "net.pt") and out.is_file()
    assert (tmp_path / "pair" / "net.pt").read_bytes() == before
    os.remove(out)
    torch.manual_seed(1)
    other = vitslim.build_model(tiny_arch())   # same arch, other weights
    with pytest.raises(vitslim.export.ExportError, match="net.pt: already exists"):
        vitslim.export_model(other, "yaml", out)


def test_weights_beside_a_yaml_of_another_arch_are_named_in_a_warning(ckpt, tmp_path):
    """An old X.yaml beside a new X.pt of another arch (an --overwrite export killed in between) exported
    random weights with no word about X.pt."""
    a = tiny_arch()
    a["num_classes"] = 7
    vitslim.save_arch(a, tmp_path / "m.yaml")     # ckpt is tmp_path/m.pt, 5 classes
    with pytest.warns(UserWarning, match=r"m.pt: the weights beside .*m.yaml are of another architecture"):
        res = vitslim.export_model(str(tmp_path / "m.yaml"), "torchscript", tmp_path / "m.ts")
    assert res["trained"] is False


def test_export_of_a_plain_state_dict_with_its_arch_given(tmp_path, capsys):
    """A bare torch.save(model.state_dict()) of a pruned DeiT (heads and scales not in it) exports as the arch given."""
    import numpy as np
    import onnxruntime as ort
    a = tiny_arch()
    a["stages"][0]["blocks"][0].update(heads=2, qk_dim=8, v_dim=40, scale=0.125)
    a = vitslim.resolve_arch(a)
    torch.manual_seed(0)
    m = vitslim.build_model(a).eval()
    torch.save(m.state_dict(), tmp_path / "plain.pt")
    vitslim.save_arch(a, tmp_path / "arch.yaml")
    assert main(["export", str(tmp_path / "plain.pt"), "--arch", str(tmp_path / "arch.yaml"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    x = torch.randn(1, 3, 32, 32)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4


@pytest.mark.parametrize("fmt,tol", [("onnx", 1e-4), ("torchscript", 1e-5)])
def test_an_onnx_or_torchscript_check_over_its_tolerance_fails(monkeypatch, ckpt, tmp_path, fmt, tol):
    """The exported file's output is compared with PyTorch's by the largest error relative to the largest
    logit: one logit off by 5x the tolerance is an error (and nothing is written), one off by a fifth of it
    is not (faked: the runtime's output, one element moved)."""
    import numpy as np
    import onnxruntime as ort

    def moved(out, frac):
        out = np.array(out, dtype=np.float32, copy=True)
        out.flat[3] += frac * tol * np.abs(out).max()
        return out

    for frac, name in ((0.2, "ok"), (5.0, "bad")):
        if fmt == "onnx":
            real = ort.InferenceSession

            class Session:
                def __init__(self, *a, **k):
                    self.s = real(*a, **k)

                def run(self, *a, frac=frac):
                    return [moved(self.s.run(*a)[0], frac)]
            monkeypatch.setattr(ort, "InferenceSession", Session)
        else:
            real_load = torch.jit.load
            monkeypatch.setattr(torch.jit, "load", lambda p, frac=frac, real_load=real_load:
                                (lambda x, m=real_load(p): torch.from_numpy(moved(m(x).numpy(), frac))))
        out = tmp_path / f"{name}.{'onnx' if fmt == 'onnx' else 'ts'}"
        if frac < 1:
            assert vitslim.export_model(str(ckpt), fmt, out, batch=2)["max_rel_error"] <= tol
            assert out.exists()
        else:
            with pytest.raises(vitslim.VitslimError, match=f"{fmt} check: .*differs .*by {5 * tol:.2e} \\(relative\\)"):
                vitslim.export_model(str(ckpt), fmt, out, batch=2)
            assert not out.exists()
        monkeypatch.undo()
