"""`vitslim env`: versions, which latency backends run here, and which tables this machine can measure for."""
import json
import os
import platform
from pathlib import Path

import pytest
import torch
import yaml

import latency_tables.backends as backends
from latency_tables.table import TABLES_DIR, shipped_tables
from vitslim.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def linux_box(monkeypatch):
    """A Linux machine with a CPU of a known name and no CUDA device, whatever runs the test."""
    monkeypatch.setattr(backends, "cpu_model", lambda: "Test CPU 9000")
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _table_on(tmp_path, device_name, backend="torch-cpu"):
    with open(os.path.join(TABLES_DIR, "cpu_torch_tiny.yaml"), encoding="utf-8") as f:
        d = yaml.safe_load(f)
    d["device"] = {**d["device"], "device": device_name, "backend": backend}
    p = tmp_path / f"{device_name.replace(' ', '_')}_{backend}.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return str(p)


def test_env_json_reports_versions_and_backends(capsys, linux_box):
    code, out, err = run(capsys, "env", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert d["torch"]["version"] == str(torch.__version__)
    assert d["cpu"] == "Test CPU 9000" and d["torch_threads"] == torch.get_num_threads()
    b = d["backends"]
    assert b["torch-cpu"] == {"available": True, "device": "Test CPU 9000"}
    assert b["torch-cuda"]["available"] is False and b["torch-cuda"]["why"].startswith("no CUDA device")
    assert b["coreml"]["available"] is False and "only on macOS" in b["coreml"]["why"]
    # every shipped table is listed; they were measured on another CPU than "Test CPU 9000"
    assert [os.path.basename(r["table"])[:-5] for r in d["tables"]] == shipped_tables()
    assert all(r["measurable_here"] is False and "Test CPU 9000" in r["why"] for r in d["tables"])


def test_env_says_which_tables_this_machine_can_measure_for(capsys, linux_box, tmp_path):
    here, phone_cpu = _table_on(tmp_path, "Test CPU 9000"), _table_on(tmp_path, "Apple M2")
    gpu = _table_on(tmp_path, "NVIDIA H200", backend="torch-cuda")
    code, out, err = run(capsys, "env", "--table", here, "--table", phone_cpu, "--table", gpu, "--json")
    assert code == 0, err
    rows = {r["table"]: r for r in json.loads(out)["tables"]}
    assert rows[here]["measurable_here"] is True and rows[here]["why"] is None
    assert rows[phone_cpu]["measurable_here"] is False and "'Apple M2'" in rows[phone_cpu]["why"]
    assert rows[gpu]["measurable_here"] is False and "torch-cuda cannot run here" in rows[gpu]["why"]
    code, out, err = run(capsys, "env", "--table", here, "--table", phone_cpu)
    assert code == 0, err
    assert f"  {here}: yes\n" in out
    assert f"  {phone_cpu}: no: the table was measured on 'Apple M2', this machine is 'Test CPU 9000'" in out
    assert "cannot check what they find by measuring here" in out  # the hint appears when a table is not measurable


def _not_installed(monkeypatch, missing):
    """importlib.metadata as if the distribution `missing` were not installed."""
    from importlib import metadata
    real = metadata.version

    def version(dist):
        if dist == missing:
            raise metadata.PackageNotFoundError(dist)
        return real(dist)
    monkeypatch.setattr(metadata, "version", version)


def test_env_human_output_names_missing_extras(capsys, linux_box, monkeypatch, tmp_path):
    _not_installed(monkeypatch, "onnxruntime")
    code, out, err = run(capsys, "env", "--table", _table_on(tmp_path, "Test CPU 9000"))
    assert code == 0, err
    assert "onnxruntime not installed (vitslim[export])" in out
    assert f"torch {torch.__version__} (CUDA" in out
    assert "  coreml       no: Core ML models can be converted here but run only on macOS" in out
    assert "cannot check what they find" not in out  # every listed table is measurable here: no hint


def test_env_missing_required_package_is_an_error(capsys, linux_box, monkeypatch):
    _not_installed(monkeypatch, "pillow")
    code, out, err = run(capsys, "env", "--json")
    assert code == 2 and json.loads(out)["packages"]["pillow"] is None  # the JSON form fails the same way
    assert err.strip().startswith("vitslim env: error: required packages missing: pillow")
    code, out, err = run(capsys, "env")
    assert code == 2
    assert "pillow MISSING" in out  # the report still printed, then the error
    assert err.strip() == ("vitslim env: error: required packages missing: pillow, expected them installed with "
                           "vitslim (pip install vitslim)")


def test_env_unknown_table_is_one_line(capsys, linux_box, tmp_path):
    code, out, err = run(capsys, "env", "--table", str(tmp_path / "nope.yaml"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "nope.yaml: no such file, expected a latency table .yaml" in err


def test_env_reports_a_damaged_shipped_table_as_a_row_not_a_traceback(capsys, linux_box, monkeypatch, tmp_path):
    """`vitslim env` is what a user runs when something is broken: a damaged shipped table is one row of the
    report, and the backends, versions and the other tables are still printed."""
    import latency_tables.table as table
    good = _table_on(tmp_path, "Test CPU 9000")
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    text = Path(good).read_text(encoding="utf-8")
    (shipped / "good.yaml").write_text(text, encoding="utf-8")
    (shipped / "torn.yaml").write_text(text[:300] + "\n  - [", encoding="utf-8")
    (shipped / "other.yaml").write_text("format: something-else\n", encoding="utf-8")
    monkeypatch.setattr(table, "TABLES_DIR", str(shipped))
    code, out, err = run(capsys, "env", "--json")
    assert code == 0, err
    rows = {os.path.basename(r["table"]): r for r in json.loads(out)["tables"]}
    assert rows["good.yaml"]["measurable_here"] is True
    for bad in ("torn.yaml", "other.yaml"):
        assert rows[bad]["measurable_here"] is False and rows[bad]["measured_on"] is None
        assert rows[bad]["why"].startswith(f"cannot read it: {shipped / bad}: ")
    code, out, err = run(capsys, "env")
    assert code == 0, err
    assert "  good: yes\n" in out and "  torn: no: cannot read it: " in out and "latency backends here:" in out
    assert "cannot check what they find by measuring here" not in out  # not a table from elsewhere: no such hint


def test_env_survives_a_cuda_that_raises(capsys, linux_box, monkeypatch):
    """torch.cuda can say a device is there and then fail to name it (a broken driver, CUDA_VISIBLE_DEVICES
    naming a missing device): the report says so where the GPUs go, and the rest of it is printed."""
    def broken(i=0):
        raise RuntimeError("CUDA error: unknown error\nCUDA kernel errors might be asynchronously reported")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", broken)
    code, out, err = run(capsys, "env", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["torch"]["cuda_devices"] == [] and d["torch"]["cuda_error"] == "CUDA error: unknown error"
    assert d["backends"]["torch-cuda"] == {"available": False, "why": "CUDA error: unknown error"}
    code, out, err = run(capsys, "env")
    assert code == 0, err
    assert ": error: CUDA error: unknown error; MPS" in out and "latency tables" in out


def test_env_does_not_say_a_table_of_this_cpu_was_measured_elsewhere(capsys, linux_box, monkeypatch, tmp_path):
    """A table measured on this very CPU whose backend is not installed here: the row says why (the backend), and
    the hint under the tables does not claim the table came from another machine."""
    def not_installed(self):
        raise backends.BackendError("onnxruntime backend: the onnxruntime package is not installed, expected "
                                    "`pip install vitslim[export]`")
    monkeypatch.setattr(backends.ONNXRuntime, "check_available", not_installed)
    t = _table_on(tmp_path, "Test CPU 9000", backend="onnxruntime")
    code, out, err = run(capsys, "env", "--table", t)
    assert code == 0, err
    assert f"  {t}: no: the table's backend onnxruntime cannot run here (onnxruntime backend: the onnxruntime " in out
    assert "  onnxruntime  no: the onnxruntime package is not installed, expected `pip install vitslim[export]`\n" in out
    assert "cannot check what they find by measuring here" in out and "measured elsewhere" not in out
