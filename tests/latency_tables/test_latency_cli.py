"""`vitslim latency ...`: JSON outputs, and one-line errors (exit 2) that leave table files untouched."""
import json
import os

import pytest

import vitslim
from vitslim.cli import main
from lat_helpers import TINY, fake_table
from latency_tables.segments import arch_keys, space_keys


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (an invalid choice) exit from parse_args
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def table_file(tmp_path, tiny_keys):
    keys = tiny_keys + arch_keys(vitslim.get_preset("efficientformer_l1"))
    p = tmp_path / "t.yaml"
    fake_table(keys).save(str(p))
    return p


def test_predict_json_has_total_and_stages(capsys, table_file):
    code, out, err = run(capsys, "latency", "predict", "--table", table_file, "efficientformer_l1", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) >= {"predicted_ms", "stages", "overhead_ms", "estimated", "device"}
    assert d["predicted_ms"] == pytest.approx(sum(d["stages"].values()) + d["overhead_ms"])
    from latency_tables import LatencyTable
    assert d["predicted_ms"] == pytest.approx(LatencyTable.load(str(table_file)).predict(vitslim.get_preset("efficientformer_l1")))


def test_predict_reads_arch_yaml_and_prints_stages(capsys, table_file, tmp_path, tiny_space):
    vitslim.save_arch(tiny_space.to_arch(tiny_space.largest_choice()), tmp_path / "a.yaml")
    code, out, _ = run(capsys, "latency", "predict", "--table", table_file, tmp_path / "a.yaml")
    assert code == 0 and "ms predicted on torch-cpu / Fake CPU 3000" in out and "stage3" in out


def test_show_and_dry_run(capsys, table_file, tmp_path):
    code, out, _ = run(capsys, "latency", "show", "--table", table_file, "--json")
    assert code == 0 and json.loads(out)["entries"] > 70
    code, out, _ = run(capsys, "latency", "build", "--space", TINY, "--out", tmp_path / "new.yaml", "--dry-run")
    assert code == 0 and "74 entries needed, 0 present, 74 to measure" in out
    assert not (tmp_path / "new.yaml").exists()


def test_validate_json_keys_are_fractions(capsys, table_file):
    code, out, err = run(capsys, "latency", "validate", "--table", table_file, "--space", TINY, "--samples", 2,
                         "--time-per-network", 0.001, "--min-samples", 3, "--no-presets", "--no-drift-reference",
                         "--allow-device-mismatch", "--json", "--quiet")
    assert code == 0, err
    d = json.loads(out)
    assert {"samples", "mape", "within_5", "within_10", "spearman"} <= set(d)
    assert d["samples"] == 2 and 0 <= d["within_5"] <= d["within_10"] <= 1


@pytest.mark.parametrize("argv,needle", [
    (["predict", "--table", "{t}", "efficientformer_l1", "--backend", "onnxruntime"], "backend 'torch-cpu' vs 'onnxruntime'"),
    (["validate", "--table", "{t}", "--space", TINY, "--samples", "1"], "measured on torch-cpu / Fake CPU 3000"),
    (["predict", "--table", "{t}", "deit_tiny"], "entries the table lacks: vit_embed"),
    (["predict", "--table", "{t}", "nosuchpreset"], "preset: got 'nosuchpreset'"),
    (["predict", "--table", "{bad}", "efficientformer_l1"], "entries[0]"),
    (["predict", "--table", "{t}.missing", "efficientformer_l1"], "no such file"),
    (["build", "--out", "{t}"], "vitslim latency build: error: expected --space"),
    (["export-coreml", "--arch", "deit_tiny", "--out", "{t}"], "vitslim latency export-coreml: error: --out {t}: is a file"),
    (["build", "--space", TINY, "--out", "{t}", "--backend", "onnxruntime"], "would mix devices"),
    (["export-coreml", "--out", "{t}.d"], "vitslim latency export-coreml: error: expected --space"),
    (["import", "--manifest", "{t}.json", "--csv", "{t}.csv", "--out", "{t}", "--device", "x"], "no such file"),
    (["build", "--space", TINY, "--out", "{t}/sub/t.yaml"], "cannot be created ("),
    (["validate", "--table", "{t}", "--samples", "1", "--report", "{t}/r.json", "--allow-device-mismatch"],
     "--report {t}/r.json: cannot be created ("),
    (["import", "--manifest", "{t}.json", "--csv", "{t}.csv", "--out", "{t}/x.yaml", "--device", "x"],
     "cannot be created ("),
    (["build", "--space", TINY, "--out", "{t}.new", "--threads", "0", "--dry-run"], "--threads: got 0, expected"),
    (["build", "--space", TINY, "--out", "{t}.new", "--batch", "0", "--dry-run"], "--batch: got 0, expected"),
    (["predict", "--table", "{t}", "efficientformer_l1", "--backend", "tpu"], "invalid choice: 'tpu' (choose from"),
    (["build", "--space", TINY, "--out", "{t}.new", "--time-per-network", "0"], "--time-per-network: got 0, expected"),
    (["build", "--space", TINY, "--out", "{t}.new", "--procedure", "isolated", "--time-per-entry", "-1"],
     "--time-per-entry: got -1, expected"),
    (["validate", "--table", "{t}", "--samples", "1", "--time-per-network", "0", "--allow-device-mismatch"],
     "--time-per-network: got 0, expected"),
    (["import", "--manifest", "{t}.json", "--csv", "{t}.csv", "--out", "{t}.new", "--device", " "],
     "--device: got ' ', expected a non-empty one-line name"),
])
def test_bad_input_is_one_line_exit_2_and_the_table_is_untouched(capsys, table_file, tmp_path, argv, needle):
    bad = tmp_path / "bad.yaml"
    text = table_file.read_text()
    bad.write_text(text.replace("{key: {op: ", "{key: {opp: ", 1))
    before, before_bad = table_file.read_bytes(), bad.read_bytes()
    argv = [a.format(t=table_file, bad=bad) for a in argv]
    code, out, err = run(capsys, "latency", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    needle = needle.format(t=table_file)
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert table_file.read_bytes() == before and bad.read_bytes() == before_bad


def test_latency_without_subcommand_is_a_clear_error(capsys):
    code, _, err = run(capsys, "latency")
    assert code == 2 and err.startswith("vitslim latency: error: expected a subcommand"), err


def test_coreml_backend_off_macos_is_one_line_pointing_to_export(capsys, tmp_path, monkeypatch):
    import platform
    monkeypatch.setattr(platform, "system", lambda: "Linux")  # off macOS, everywhere
    code, _, err = run(capsys, "latency", "build", "--space", TINY, "--backend", "coreml", "--out", tmp_path / "t.yaml")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "only on macOS" in lines[0] and "export-coreml" in lines[0]
    assert not (tmp_path / "t.yaml").exists()


def test_a_resumed_build_keeps_the_clock_its_entries_were_timed_with(capsys, tmp_path, tiny_space):
    vitslim.save_arch(tiny_space.to_arch(tiny_space.largest_choice()), tmp_path / "a.yaml")
    t = tmp_path / "t.yaml"
    quick = ["--arch", tmp_path / "a.yaml", "--out", t, "--time-per-network", 0.001, "--min-samples", 3,
             "--calibrate", 0, "--contexts", 1, "--no-drift-reference", "--quiet"]
    code, out, err = run(capsys, "latency", "build", *quick, "--clock", "wall")
    assert code == 0, err
    before = t.read_bytes()
    code, out, err = run(capsys, "latency", "build", *quick, "--clock", "thread")
    assert code == 2 and "--clock thread:" in err and "measured with the wall clock" in err and len(err.splitlines()) == 1
    assert t.read_bytes() == before
    code, out, err = run(capsys, "latency", "build", *quick, "--dry-run")  # no --clock: the table's
    assert code == 0 and "clock wall)" in out, out + err
    # the sampling settings likewise: the table's header describes every entry
    for opt, val, needle in (("--time-per-network", "0.5", "--time-per-network 0.5: "),
                             ("--min-samples", "40", "--min-samples 40: ")):
        args = [a for a in quick if str(a) not in ("--time-per-network", "0.001", "--min-samples", "3")]
        code, out, err = run(capsys, "latency", "build", *args, opt, val)
        assert code == 2 and needle in err and "a resumed build keeps its settings" in err, err
    assert t.read_bytes() == before
    args = [a for a in quick if str(a) not in ("--time-per-network", "0.001", "--min-samples", "3")]
    code, out, err = run(capsys, "latency", "build", *args, "--dry-run")
    assert code == 0, err


def test_validate_finds_the_tables_space_beside_it_from_any_folder(capsys, table_file, tmp_path, monkeypatch):
    from latency_tables import LatencyTable
    t = LatencyTable.load(str(table_file))
    t.built_for = {"space": "mine", "space_file": "spaces/mine.yaml"}  # no shipped space of that name
    t.save(str(table_file))
    args = ["latency", "validate", "--table", table_file, "--samples", 1, "--time-per-network", 0.001,
            "--min-samples", 3, "--no-presets", "--no-drift-reference", "--allow-device-mismatch", "--json", "--quiet"]
    monkeypatch.chdir(tmp_path.parent)
    code, out, err = run(capsys, *args)  # named but nowhere: said, not silently fewer samples
    assert code == 2 and "built for spaces/mine.yaml (built_for.space_file), which is not found" in err
    (tmp_path / "spaces").mkdir()
    (tmp_path / "spaces" / "mine.yaml").write_text(open(TINY).read())
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["samples"] == 1


@pytest.mark.parametrize("recorded", ["experiments/spaces/tiny.yaml", "supernet/spaces/tiny.yaml"])
def test_validate_finds_a_shipped_space_from_any_folder(capsys, table_file, tmp_path, monkeypatch, recorded):
    # a table built before the spaces moved into the package (experiments/...) or after (supernet/...), copied
    # away from any checkout: the shipped space of that file name is the one it was built for
    from latency_tables import LatencyTable
    t = LatencyTable.load(str(table_file))
    t.built_for = {"space": "tiny", "space_file": recorded}
    t.save(str(table_file))
    monkeypatch.chdir(tmp_path)
    args = ["latency", "validate", "--table", "t.yaml", "--samples", 1, "--time-per-network", 0.001, "--min-samples", 3,
            "--no-presets", "--no-drift-reference", "--allow-device-mismatch", "--json", "--quiet"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads(out)["samples"] == 1
    t.built_for = {"space": "other", "space_file": recorded}  # the file name alone does not make it the same space
    t.save(str(table_file))
    code, out, err = run(capsys, *args)
    assert code == 2 and f"built for {recorded} (built_for.space_file), which is not found" in err


def test_the_shipped_tables_record_their_shipped_space():
    import os
    from supernet.space import load_space, shipped_space_file
    from latency_tables import LatencyTable
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for f in sorted(os.listdir(os.path.join(root, "latency_tables"))):
        if f.endswith(".yaml"):
            table = LatencyTable.load(os.path.join(root, "latency_tables", f))
            bf = table.built_for
            assert os.path.isfile(os.path.join(root, bf["space_file"])), (f, bf)  # the folder above the table's
            space = load_space(shipped_space_file(bf["space"]))
            assert space.name == bf["space"] and not table.missing(space_keys(space)), f  # what `run` reuses it for


def test_build_takes_a_shipped_space_by_name_and_records_its_package_path(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no spaces folder here
    code, out, err = run(capsys, "latency", "build", "--space", "tiny", "--out", "t.yaml", "--dry-run")
    assert code == 0 and "t.yaml: " in out, err
    from vitslim.cmd_latency import _space_record
    assert _space_record("tiny.yaml") == "supernet/spaces/tiny.yaml"  # validate finds it from any folder
    code, out, err = run(capsys, "latency", "build", "--space", "tiniest", "--out", "t.yaml", "--dry-run")
    assert code == 2 and err.strip().endswith("tiniest: no such file, expected a search space .yaml or a shipped "
                                              "space name (efficientformer_l1, tiny)"), err


def test_a_shipped_table_is_reached_by_name_from_any_folder(capsys, tmp_path, monkeypatch):
    from latency_tables import LatencyTable
    from latency_tables.table import TABLES_DIR, shipped_tables
    monkeypatch.chdir(tmp_path)
    assert "cpu_torch_tiny" in shipped_tables()
    for given in ("cpu_torch_tiny", "cpu_torch_tiny.yaml", "latency_tables/cpu_torch_tiny.yaml"):
        t = LatencyTable.load(given)
        assert t.path == os.path.join(TABLES_DIR, "cpu_torch_tiny.yaml") and t.built_for["space"] == "tiny"
        code, out, err = run(capsys, "latency", "show", "--table", given, "--json")
        assert code == 0 and json.loads(out)["entries"] == len(t), err
    code, out, err = run(capsys, "latency", "predict", "--table", "cpu_torch_tni", "efficientformer_l1")
    assert code == 2 and err.strip().endswith(
        "cpu_torch_tni: no such file, expected a latency table .yaml or a shipped table name "
        "(" + ", ".join(shipped_tables()) + ")"), err
    code, out, err = run(capsys, "latency", "show", "--table", "tables/cpu_torch_tiny.yaml")  # a path is a path
    assert code == 2 and "tables/cpu_torch_tiny.yaml: no such file" in err, err
    (tmp_path / "cpu_torch_tiny.yaml").write_text("format: x\n")  # a file of that name here comes first
    code, out, err = run(capsys, "latency", "show", "--table", "cpu_torch_tiny.yaml")
    assert code == 2 and "cpu_torch_tiny.yaml: format: got 'x'" in err, err


def test_validate_of_a_shipped_table_by_name_finds_its_space(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "latency", "validate", "--table", "cpu_torch_tiny", "--samples", 1,
                         "--time-per-network", 0.001, "--min-samples", 3, "--no-presets", "--no-drift-reference",
                         "--allow-device-mismatch", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["samples"] == 1


def test_latency_list_names_the_shipped_tables(capsys):
    from latency_tables import LatencyTable
    from latency_tables.table import shipped_tables
    code, out, err = run(capsys, "latency", "list", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["name"] for r in rows] == shipped_tables()
    tiny = next(r for r in rows if r["name"] == "cpu_torch_tiny")
    assert tiny["backend"] == "torch-cpu" and tiny["built_for"] == "space tiny"
    assert tiny["entries"] == len(LatencyTable.load("cpu_torch_tiny"))
    code, out, err = run(capsys, "latency", "list")
    assert code == 0 and out.splitlines()[0].split() == ["name", "built", "for", "entries", "device"]
    assert any(l.startswith("cpu_torch_tiny ") and "space tiny" in l for l in out.splitlines())


def _quick_build(tmp_path, tiny_space, out):
    vitslim.save_arch(tiny_space.to_arch(tiny_space.largest_choice()), tmp_path / "a.yaml")
    return ["latency", "build", "--arch", tmp_path / "a.yaml", "--out", out, "--time-per-network", 0.001,
            "--min-samples", 3, "--calibrate", 0, "--contexts", 1, "--no-drift-reference", "--quiet"]


def test_a_second_build_of_a_table_being_built_is_refused(capsys, tmp_path, tiny_space):
    """Both saved the whole table (the last one's entries won) and shared, then deleted, NAME.partial.json."""
    from vitslim.cmd_latency import _table_lock
    t = tmp_path / "t.yaml"
    build = _quick_build(tmp_path, tiny_space, t)
    assert run(capsys, *build)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["a.yaml", "t.yaml"]  # no lock left
    before = t.read_bytes()
    with _table_lock(str(t)):  # a build mid-way, its sidecar as it left it
        (tmp_path / "t.yaml.partial.json").write_text("{}")
        code, out, err = run(capsys, *build)
        assert code == 2 and err.strip().splitlines() == [
            f"vitslim latency build: error: --out {t}: another latency build (or import) is writing this table; wait "
            "for it to finish (a build resumes from what the other measured), or choose another --out"]
        assert t.read_bytes() == before and (tmp_path / "t.yaml.partial.json").read_text() == "{}"
        os.symlink(t, tmp_path / "link.yaml")  # the same table under another name
        code, out, err = run(capsys, *build[:5], tmp_path / "link.yaml", *build[6:])
        assert code == 2 and "another latency build (or import) is writing this table" in err, err
        code, out, err = run(capsys, *build, "--dry-run")  # reads only: not refused
        assert code == 0 and "0 to measure" in out, err
    assert t.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["a.yaml", "link.yaml", "t.yaml",
                                                                         "t.yaml.partial.json"]


def test_an_import_into_a_table_being_built_is_refused(capsys, tmp_path):
    from vitslim.cmd_latency import _table_lock
    t = tmp_path / "t.yaml"
    with _table_lock(str(t)):
        code, out, err = run(capsys, "latency", "import", "--manifest", tmp_path / "m.json", "--csv", tmp_path / "c.csv",
                             "--device", "phone", "--out", t)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "another latency build (or import) is writing" in err
    assert os.listdir(tmp_path) == []


def test_a_table_name_its_temporaries_would_not_fit_is_refused_before_timing(capsys, tmp_path, tiny_space, monkeypatch):
    """NAME.partial.json.tmp.PID is the longest name a build writes: it failed after the first network was timed."""
    import latency_tables.build as lb
    from supernet.runlock import name_max
    monkeypatch.setattr(lb, "measure_in_context", lambda *a, **k: pytest.fail("timed"))
    name = "t" * (name_max(str(tmp_path)) - len(".yaml.partial.json.tmp.9999999") + 1) + ".yaml"
    code, out, err = run(capsys, *_quick_build(tmp_path, tiny_space, tmp_path / name))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "too long a name for the temporary and lock files written beside it" in err
    assert err.strip().endswith("expected a name at least 1 bytes shorter")
    assert os.listdir(tmp_path) == ["a.yaml"]


def test_a_build_killed_while_it_refits_the_overhead_refits_it_on_resume(capsys, tmp_path, tiny_space, monkeypatch):
    """Entries added to a calibrated table are saved before the overhead is refitted; a kill in between left an
    overhead 'measured' without the new networks, and the re-run ("0 to measure") kept it silently."""
    import latency_tables.build as cl   # _build imports calibrate from here at each call
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    vitslim.save_arch(tiny_space.to_arch(tiny_space.largest_choice()), a)
    small = tiny_space.largest_choice()
    small["widths"] = [tiny_space.widths(i)[0] for i in range(len(small["widths"]))]
    small["blocks"] = [["identity"] * (len(bl) - 1) + [bl[-1]] for bl in small["blocks"]]
    vitslim.save_arch(tiny_space.to_arch(tiny_space.check_choice(small)), b)
    t = tmp_path / "t.yaml"
    quick = ["--out", t, "--time-per-network", 0.001, "--min-samples", 3, "--calibrate", 2, "--contexts", 1,
             "--no-drift-reference", "--quiet"]
    code, out, err = run(capsys, "latency", "build", "--arch", a, *quick)
    assert code == 0, err
    fits = []
    real = cl.calibrate

    def killed(*args, **kw):
        fits.append(1)
        raise KeyboardInterrupt   # as a kill while the overhead is refitted

    monkeypatch.setattr(cl, "calibrate", killed)
    code, out, err = run(capsys, "latency", "build", "--arch", b, *quick)
    assert code == 130 and fits == [1]
    from latency_tables import LatencyTable
    assert LatencyTable.load(str(t)).overhead.get("calibration_pending") is True   # the new entries are kept

    def counted(table, backend, nets, *args, **kw):
        fits.append(len(nets))
        return real(table, backend, nets, *args, **kw)

    monkeypatch.setattr(cl, "calibrate", counted)
    code, out, err = run(capsys, "latency", "build", "--arch", b, *quick)
    assert code == 0, err
    assert len(fits) == 2, "the resumed build did not refit the overhead"
    over = LatencyTable.load(str(t)).overhead
    assert over["provenance"] == "measured" and "calibration_pending" not in over
    code, out, err = run(capsys, "latency", "build", "--arch", b, *quick)   # nothing new: no refit
    assert code == 0 and len(fits) == 2


def test_the_build_progress_bar_names_its_unit_on_every_supported_tqdm(capsys):
    """The bar's format wrote `{unit}`, a key tqdm 4.27 (the declared floor) does not fill: every `latency build`
    with its progress bar stopped there with KeyError 'unit' (found by `bash .ci/run-oldest`)."""
    from vitslim.cmd_latency import _bar
    bar = _bar(3, "entries", quiet=False)
    bar.update(2)
    bar.refresh()
    bar.close()
    assert "2/3 entries [" in capsys.readouterr().err
