"""The command line: JSON outputs, help with examples, and one-line errors with exit code 2."""
import json
import subprocess
import sys

import pytest

import vitslim
from vitslim.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json_matches_count(capsys):
    code, out, err = run(capsys, "info", "efficientvit_m0", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d == {"family": "efficientvit", "input_size": 224, **vitslim.count("efficientvit_m0")}


def test_info_input_size_changes_macs(capsys):
    _, out1, _ = run(capsys, "info", "deit_tiny", "--json")
    _, out2, _ = run(capsys, "info", "deit_tiny", "--json", "--input-size", "112")
    assert json.loads(out2)["macs"] < json.loads(out1)["macs"]
    assert json.loads(out2)["input_size"] == 112


def test_info_at_another_input_size_counts_a_checkpoint_as_its_arch(capsys, tmp_path):
    a = {**vitslim.get_preset("deit_tiny"), "input_size": 64}
    vitslim.save_checkpoint(vitslim.build_model(a), a, tmp_path / "d.pt")
    vitslim.save_arch(a, tmp_path / "d.yaml")
    outs = []
    with pytest.warns(UserWarning, match=r"--input-size 128: these weights fit only 64 \(pos_embed is sized"):
        code, out, err = run(capsys, "info", str(tmp_path / "d.pt"), "--input-size", "128", "--json")
    assert code == 0, err
    outs.append(json.loads(out))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an arch has no weights to misfit
        code, out, err = run(capsys, "info", str(tmp_path / "d.yaml"), "--input-size", "128", "--json")
    assert code == 0, err
    outs.append(json.loads(out))
    assert outs[0] == outs[1] and outs[0]["params"] == vitslim.count(a, input_size=128)["params"]
    assert outs[0]["params"] != vitslim.count(a)["params"]  # DeiT's position embedding grows with the input


def test_info_human_output_has_stage_rows(capsys):
    code, out, _ = run(capsys, "info", "efficientformer_l1")
    assert code == 0
    assert "12,289,928" in out and "stage" in out


def test_info_reads_checkpoint_and_yaml(capsys, tmp_path):
    a = vitslim.get_preset("shvit_s1")
    vitslim.save_arch(a, tmp_path / "a.yaml")
    code, out, _ = run(capsys, "info", str(tmp_path / "a.yaml"), "--json")
    assert code == 0 and json.loads(out)["params"] == 6330808


def test_presets_lists_every_preset(capsys):
    code, out, _ = run(capsys, "presets", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["name"] for r in rows] == vitslim.list_presets()
    assert {r["name"]: r["params"] for r in rows}["deit_base"] == 86567656


def test_presets_are_counted_once_then_read_from_the_cache(capsys, scan_cache, monkeypatch):
    import supernet.count as sc
    _, first, _ = run(capsys, "presets", "--json")
    assert (scan_cache / "counts.json").is_file()

    def no_build(*a, **k):
        raise AssertionError("counted again")
    monkeypatch.setattr(sc, "count", no_build)
    code, again, _ = run(capsys, "presets", "--json")
    assert code == 0 and json.loads(again) == json.loads(first)


def test_the_count_cache_follows_the_code_and_survives_damage(scan_cache, monkeypatch):
    import supernet.count as sc
    archs = [vitslim.get_preset("deit_tiny"), dict(vitslim.get_preset("deit_tiny"), input_size=112)]
    real = sc.count
    built = []
    monkeypatch.setattr(sc, "count", lambda a: built.append(a["input_size"]) or real(a))
    want = [real(a) for a in archs]
    assert sc.count_cached(archs) == want and built == [224, 112]
    assert sc.count_cached(archs) == want and built == [224, 112]  # both remembered, each under its own arch
    monkeypatch.setattr(sc, "_CODE_FP", "another checkout")
    assert sc.count_cached(archs[:1]) == want[:1] and built == [224, 112, 224]  # other code: counted anew
    (scan_cache / "counts.json").write_text('{"format": "vitslim-counts", "version": 1, "code": "another checkout", '
                                            '"entries": {"x"')  # cut short
    assert sc.count_cached(archs[:1]) == want[:1] and built == [224, 112, 224, 224]
    assert json.loads((scan_cache / "counts.json").read_text())["code"] == "another checkout"
    monkeypatch.setenv("VITSLIM_CACHE_DIR", "")  # off: counted every time, nothing written
    (scan_cache / "counts.json").unlink()
    assert sc.count_cached(archs[:1]) == want[:1] and built == [224, 112, 224, 224, 224]
    assert not (scan_cache / "counts.json").exists()


@pytest.mark.parametrize("argv,needle", [
    (["info", "nosuchpreset"], "preset: got 'nosuchpreset'"),
    (["info", "deit_tiny", "--input-size", "0"], "--input-size: got 0"),
    (["info", "TMP"], "TMP: is a directory, expected a preset name"),
    (["info", "TMP/mk.py"], "TMP/mk.py: not a torch checkpoint (a text file)"),
    (["info", "TMP/hi.pt"], "TMP/hi.pt: not a torch checkpoint (a text file; KeyError while unpickling)"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    (tmp_path / "mk.py").write_text("import os\nprint(1)\n")
    (tmp_path / "hi.pt").write_text("hi\n")  # torch's weights-only unpickler raised KeyError on it
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    needle = needle.replace("TMP", str(tmp_path))
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("argv,said", [
    (["supernet"], "vitslim supernet: error: expected an action: train, show or extract"),
    (["latency"], "vitslim latency: error: expected a subcommand: build, predict"),
    (["latency", "build", "--out", "TMP/t.yaml"], "vitslim latency build: error: expected --space SPACE.yaml"),
    (["latency", "export-coreml", "--out", "TMP/x"], "vitslim latency export-coreml: error: expected --space"),
    (["latency", "validate", "--table", "cpu_torch_tiny", "--samples", "0", "--no-presets"],
     "vitslim latency validate: error: no networks to measure"),
])
def test_a_command_is_named_once_in_its_error(capsys, tmp_path, argv, said):
    """The CLI prefixes `vitslim <command>: error:`; a message that named its command again read
    "vitslim supernet: error: supernet: expected an action"."""
    code, out, err = run(capsys, *[a.replace("TMP", str(tmp_path)) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(said), err


@pytest.mark.parametrize("argv,prog,extra", [
    (["info", "deit_tiny", "--batch", "2"], "vitslim info", "--batch 2"),
    (["latency", "list", "extra"], "vitslim latency list", "extra"),
    (["supernet", "show", "TMP", "--bogus"], "vitslim supernet show", "--bogus"),
    (["--bogus"], "vitslim", "--bogus"),
])
def test_an_unknown_argument_is_refused_by_its_command(capsys, tmp_path, argv, prog, extra):
    """argparse reported it from the top parser ("vitslim: error: ... see `vitslim --help`"), whose help does
    not list the command's options."""
    with pytest.raises(SystemExit) as e:
        main([a.replace("TMP", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err == f"{prog}: error: unrecognized arguments: {extra} (see `{prog} --help`)", err


@pytest.mark.parametrize("argv,said", [
    (["supernet", "train", "--config", "TMP/sn.yaml", "--out", "TMP/r"], "TMP/tiny\\n: no such file, expected a search space"),
    (["info", "deit_tiny", "x\ny"], "unrecognized arguments: x\\ny (see `vitslim info --help`)"),
])
def test_a_line_break_in_a_value_keeps_the_error_on_one_line(capsys, tmp_path, argv, said):
    """A YAML block scalar (`space: |`) ends its value in a line break; the error naming that value printed it
    raw, on two lines."""
    (tmp_path / "sn.yaml").write_text("version: 1\nspace: |\n  tiny\nsteps: 2\n")
    try:
        code = main([a.replace("TMP", str(tmp_path)) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and said.replace("TMP", str(tmp_path)) in err, err


def test_info_at_another_input_size_shows_the_stages_at_it(capsys):
    code, out, _ = run(capsys, "info", "swin_tiny", "--input-size", "112")
    rows = [ln.split() for ln in out.splitlines()[3:]]
    assert code == 0 and [r[2] for r in rows] == ["28x28", "14x14", "7x7", "4x4"]  # not 224's 56x56 ...


def test_bad_checkpoint_via_cli(capsys, tmp_path):
    p = tmp_path / "x.pt"
    p.write_bytes(b"not a checkpoint at all")
    code, _, err = run(capsys, "info", str(p))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "x.pt" in err


def test_console_script_help_has_example():
    r = subprocess.run([sys.executable, "-m", "vitslim", "info", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "example:" in r.stdout and "vitslim info" in r.stdout


def test_python_dash_m_vitslim_cli_knows_every_command():
    """`python -m vitslim.cli` runs cli.py as __main__, a second copy of the module: the commands of the other
    modules registered into the package's copy, so only info and presets were known there."""
    r = subprocess.run([sys.executable, "-m", "vitslim.cli", "env", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: vitslim env"), r.stderr


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 307200000000 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error,said", [
    (RuntimeError(CPU_OOM), "tried to allocate 286.1 GiB"),  # an arch of width 10**8: torch's CPU allocator
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                                   "total capacity of 139.8 GiB"), "tried to allocate 20.00 GiB"),
    (MemoryError(), "MemoryError"),
])
def test_running_out_of_memory_is_one_line_naming_what_was_asked(capsys, monkeypatch, tmp_path, error, said):
    """A network, batch or input too large for the machine is its limit, not a bug: it was a traceback from deep
    inside torch (the allocator's message last, after forty lines)."""
    import vitslim.export as ex

    def build(*a, **k):
        raise error
    monkeypatch.setattr(ex, "resolve_source", build)
    code, out, err = run(capsys, "export", "deit_tiny", "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert code == 1 and out == ""
    assert err == (f"vitslim export: error: out of memory ({said}): use a smaller network, batch or input size, or a "
                   "machine or device with more memory; nothing was left half-written\n")
    assert not (tmp_path / "m.onnx").exists()


def test_other_runtime_errors_are_not_taken_for_out_of_memory(capsys, monkeypatch, tmp_path):
    import vitslim.export as ex

    def build(*a, **k):
        raise RuntimeError("shape '[2, 3]' is invalid for input of size 7")
    monkeypatch.setattr(ex, "resolve_source", build)
    with pytest.raises(RuntimeError, match="is invalid for input of size 7"):
        main(["export", "deit_tiny", "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
