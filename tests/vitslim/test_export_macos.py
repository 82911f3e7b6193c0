"""Core ML export on a Mac (emulated: sys.platform darwin, a stand-in for coremltools' MLModel): where Core ML cannot
load the iOS 16 package (macOS before 13, or coremltools without its macOS library), MLModel.predict raises a plain
Exception; the export check let it escape as a traceback and the package was lost. It is now written unchecked,
with the reason; a package Core ML loads but cannot run is refused in one line."""
import json
import os
import sys

import pytest

import vitslim
import vitslim.export as E
from vitslim.cli import main


def tiny_arch():
    a = vitslim.get_preset("deit_tiny")
    a.update(input_size=32, num_classes=5)
    a["stem"]["patch_size"] = 8
    a["stages"][0]["blocks"] = a["stages"][0]["blocks"][:2]
    return a


class FakeMLModel:
    def __init__(self, loaded):
        self.__proxy__ = object() if loaded else None  # coremltools: None where Core ML could not load the model

    def save(self, path):
        os.makedirs(path)
        with open(os.path.join(path, "Manifest.json"), "w", encoding="utf-8") as f:
            f.write("{}")

    def predict(self, data):
        raise Exception("Unable to load CoreML.framework. Cannot make predictions.")


@pytest.fixture
def mac(monkeypatch, tmp_path):
    arch = tmp_path / "a.yaml"
    vitslim.save_arch(tiny_arch(), arch)

    def on(loaded):
        monkeypatch.setattr(E, "to_coreml", lambda model, x: FakeMLModel(loaded))
        monkeypatch.setattr(sys, "platform", "darwin")
    return arch, on


def test_a_package_core_ml_cannot_load_here_is_written_unchecked(mac, tmp_path, capsys):
    arch, on = mac
    on(loaded=False)
    out = tmp_path / "m.mlpackage"
    assert main(["export", str(arch), "--format", "coreml", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["predicted"] is False and "Unable to load CoreML.framework" in res["unchecked"]
    assert (out / "Manifest.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["a.yaml", "m.mlpackage"]  # no temporary left


def test_a_package_core_ml_loads_but_cannot_run_is_refused_in_one_line(mac, tmp_path, capsys):
    arch, on = mac
    on(loaded=True)
    out = tmp_path / "m.mlpackage"
    assert main(["export", str(arch), "--format", "coreml", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitslim export: error: coreml check: Core ML could not run the package on this Mac (")
    assert "--no-check" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["a.yaml"]
