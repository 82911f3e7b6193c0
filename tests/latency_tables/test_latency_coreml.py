"""The phone path: every block kind converts to a Core ML package listed in a manifest; on-device
times read back from a CSV give the table (and its overhead); bad CSVs leave the table untouched.
The Core ML backend itself says clearly that it only runs on macOS."""
import csv
import json
import os
import platform

import pytest

from latency_tables import BackendError, LatencyTable, get_backend
from latency_tables.coreml_io import CSVImportError, export_coreml, import_csv
from latency_tables.segments import OPS, decompose, key_str

# one small key per operator kind the tables know (every block of every family covered)
KINDS = [
    {"op": "efficientformer_stem", "res_in": 32, "cin": 3, "c1": 8, "c2": 16},
    {"op": "efficientformer_downsample", "res_in": 8, "cin": 16, "cout": 32},
    {"op": "meta4d", "res": 8, "dim": 16, "ffn_hidden": 64},
    {"op": "efficientformer_to_tokens", "res": 4, "dim": 32},
    {"op": "meta3d", "tokens": 16, "dim": 32, "heads": 2, "qk_dim": 8, "v_dim": 16, "ffn_hidden": 64},
    {"op": "efficientformer_to_map", "res": 4, "dim": 32},
    {"op": "efficientformer_head", "res": 2, "dim": 32, "classes": 10, "distillation": True, "from_map": False},
    {"op": "vit_embed", "res_in": 32, "cin": 3, "patch": 8, "dim": 32, "prefix": 2},
    {"op": "vit_block", "tokens": 18, "dim": 32, "heads": 2, "qk_dim": 8, "v_dim": 16, "ffn_hidden": 64},
    {"op": "vit_head", "tokens": 18, "dim": 32, "classes": 10, "distillation": True},
    {"op": "swin_embed", "res_in": 32, "cin": 3, "patch": 4, "dim": 16},
    {"op": "swin_patch_merging", "res_in": 8, "cin": 16, "cout": 32},
    {"op": "swin_block", "res": 8, "dim": 16, "heads": 2, "qk_dim": 8, "v_dim": 8, "ffn_hidden": 32, "window": 4,
     "shifted": True},
    {"op": "swin_head", "res": 4, "dim": 32, "classes": 10},
    {"op": "staged_stem", "res_in": 64, "cin": 3, "widths": "4-8-16-32"},
    {"op": "staged_downsample", "res_in": 4, "cin": 32, "cout": 48, "hidden": 64, "se_hidden": 16, "ffn_hidden": 64,
     "ffn2_hidden": 96},
    {"op": "cga_block", "res": 4, "dim": 32, "heads": 2, "qk_dim": 8, "v_dim": 16, "kernels": "5-3", "ffn_hidden": 64,
     "ffn2_hidden": 64, "window": 7},
    {"op": "shvit_conv_block", "res": 4, "dim": 32, "ffn_hidden": 64},
    {"op": "shsa_block", "res": 2, "dim": 48, "pdim": 16, "qk_dim": 8, "ffn_hidden": 96},
    {"op": "staged_head", "res": 2, "dim": 48, "classes": 10, "distillation": True},
]

NET = {"version": 1, "family": "efficientformer", "input_size": 32, "in_chans": 3, "num_classes": 10,
       "distillation": True, "stem": {"widths": [8, 16]},
       "stages": [{"width": 16, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 64}]},
                  {"width": 32, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 64}]},
                  {"width": 32, "downsample": {"type": "conv"}, "blocks": [
                      {"type": "meta3d", "heads": 2, "qk_dim": 8, "v_dim": 16, "ffn_hidden": 64}]}]}


def test_every_op_kind_is_covered_here():
    assert {k["op"] for k in KINDS} == set(OPS)


def test_coreml_backend_off_macos_points_to_export_and_import(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Linux")  # off macOS, everywhere
    with pytest.raises(BackendError) as e:
        get_backend("coreml").check_available()
    msg = str(e.value)
    assert "only on macOS" in msg and "export-coreml" in msg and "latency import" in msg


def test_coreml_backend_on_a_mac_that_cannot_run_the_model_says_so_in_one_line(monkeypatch):
    """macOS before 13 (an iOS 16 mlprogram), or coremltools without its macOS library: MLModel.predict raises a
    plain Exception, which escaped `latency build --backend coreml` as a traceback from the first timed call."""
    pytest.importorskip("coremltools")
    import torch

    import latency_tables.coreml_io as cio

    class Unloadable:
        def predict(self, data):
            raise Exception("Unable to load CoreML.framework. Cannot make predictions.")

    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(cio, "convert_coreml", lambda module, x, compute_units=None: Unloadable())
    with pytest.raises(BackendError) as e:
        get_backend("coreml").prepare_fn(torch.nn.Identity(), (1, 3, 8, 8))
    msg = str(e.value)
    assert msg.startswith("coreml: Core ML cannot run the converted model on this Mac (Unable to load CoreML.framework")
    assert "export-coreml" in msg and "latency import" in msg and "\n" not in msg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("coremltools")
    import torch
    torch.set_num_threads(1)
    out = str(tmp_path_factory.mktemp("coreml"))
    needed = KINDS + [s.key for s in decompose(NET) if key_str(s.key) not in {key_str(k) for k in KINDS}]
    manifest = export_coreml(needed, out, networks=[NET])
    return out, manifest


def test_every_block_kind_converts_to_an_mlpackage(exported):
    out, manifest = exported
    ops = {r["key"]["op"] for r in manifest["entries"]}
    assert ops == set(OPS)
    for r in manifest["entries"] + manifest["networks"]:
        assert os.path.isdir(os.path.join(out, r["package"])), r["package"]
        assert os.path.exists(os.path.join(out, r["package"], "Manifest.json"))
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert [r["name"] for r in on_disk["entries"]] == [r["name"] for r in manifest["entries"]]
    rows = list(csv.DictReader(open(os.path.join(out, "times_template.csv"))))
    assert len(rows) == len(manifest["entries"]) + 1 and rows[-1]["name"] == "net00"


def test_export_leaves_no_converted_package_in_the_temp_dir(tmp_path, monkeypatch):
    """coremltools converts each entry into tempfile's dir (tmpXXXX.mlpackage, weights included) and removes
    them only at interpreter exit: an export of a whole space held every package twice until the end, and a killed
    export left them all in /tmp."""
    pytest.importorskip("coremltools")
    import tempfile
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    manifest = export_coreml(KINDS[2:4], str(tmp_path / "out"), networks=[NET])
    assert len(manifest["entries"]) == 2 and len(manifest["networks"]) == 1
    assert [p.name for p in tmp.iterdir() if p.name.endswith(".mlpackage")] == []


def _write_csv(path, rows, header=("name", "median_ms", "p10_ms", "p90_ms", "samples")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _fake_times(manifest):
    return {r["name"]: 0.1 + 0.01 * i for i, r in enumerate(manifest["entries"])}


def test_import_round_trip_gives_the_table_and_overhead(exported, tmp_path):
    out, manifest = exported
    times = _fake_times(manifest)
    rows = [[n, f"{ms:.4f}", f"{ms * 0.9:.4f}", f"{ms * 1.2:.4f}", 50] for n, ms in times.items()]
    net_sum = sum(times[next(r["name"] for r in manifest["entries"] if r["key_str"] == s.id)] for s in decompose(NET))
    rows.append(["net00.mlpackage", f"{net_sum + 0.5:.4f}", "", "", ""])  # package names work too
    csv_path = _write_csv(tmp_path / "times.csv", rows)
    table = import_csv(os.path.join(out, "manifest.json"), csv_path, str(tmp_path / "t.yaml"), "iPhone 12 (A14)")
    t = LatencyTable.load(str(tmp_path / "t.yaml"))
    assert t.device["backend"] == "coreml" and t.device["device"] == "iPhone 12 (A14)"
    assert len(t) == len(manifest["entries"])
    for r in manifest["entries"]:
        e = t.get(r["key"])
        assert e.source == "imported" and e.n == 50 and e.ms == pytest.approx(times[r["name"]], abs=1e-4)
    assert t.overhead["provenance"] == "imported"
    assert t.predict(NET) == pytest.approx(net_sum + 0.5, abs=1e-3)  # one network: the residual is the overhead
    assert len(table) == len(t)


@pytest.mark.parametrize("rows,needle", [
    ([["e9999_meta4d", "1.0", "", "", ""]], "name no package"),
    ([["{first}", "-0.5", "", "", ""]], "expected a finite time >= 0"),
    ([["{first}", "fast", "", "", ""]], "expected a number of milliseconds"),
    ([["{first}", "nan", "", "", ""]], "expected a finite time >= 0"),
    ([["{first}", "", "", "", ""]], "median_ms: missing"),
    ([["{first}", "1.0", "", "", "many"]], "samples"),
    ([["{first}", "1.0", "1.5", "", ""]], "p10 <= median <= p90"),
    ([["{first}", "1.0", "", "", ""], ["{first}", "1.1", "", "", ""]], "appears twice"),
])
def test_bad_csv_is_refused_and_the_table_left_untouched(exported, tmp_path, rows, needle):
    out, manifest = exported
    first = manifest["entries"][0]["name"]
    t_path = str(tmp_path / "t.yaml")
    good = _write_csv(tmp_path / "good.csv", [[first, "0.5", "", "", ""]])
    import_csv(os.path.join(out, "manifest.json"), good, t_path, "iPhone 12")
    before = open(t_path, "rb").read()
    bad = _write_csv(tmp_path / "bad.csv", [[c.format(first=first) for c in r] for r in rows])
    with pytest.raises(CSVImportError) as e:
        import_csv(os.path.join(out, "manifest.json"), bad, t_path, "iPhone 12")
    assert needle in str(e.value)
    assert open(t_path, "rb").read() == before


def test_csv_without_the_required_columns_is_refused(exported, tmp_path):
    out, _ = exported
    bad = _write_csv(tmp_path / "bad.csv", [["x", "1"]], header=("package", "time"))
    with pytest.raises(CSVImportError, match="expected at least name,median_ms"):
        import_csv(os.path.join(out, "manifest.json"), bad, str(tmp_path / "t.yaml"), "iPhone 12")
    assert not os.path.exists(tmp_path / "t.yaml")


def test_import_into_a_table_of_another_device_is_refused(exported, tmp_path):
    out, manifest = exported
    first = manifest["entries"][0]["name"]
    t_path = str(tmp_path / "t.yaml")
    good = _write_csv(tmp_path / "good.csv", [[first, "0.5", "", "", ""]])
    import_csv(os.path.join(out, "manifest.json"), good, t_path, "iPhone 12")
    before = open(t_path, "rb").read()
    with pytest.raises(CSVImportError, match="another device"):
        import_csv(os.path.join(out, "manifest.json"), good, t_path, "iPhone 15 Pro")
    assert open(t_path, "rb").read() == before


def _manifest(tmp_path, entries=(), networks=()):
    from latency_tables.coreml_io import MANIFEST_FORMAT, MANIFEST_VERSION
    p = tmp_path / "manifest.json"
    p.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "entries": list(entries),
                             "networks": list(networks)}))
    return str(p)


GOOD_ENTRY = {"name": "e0001_x", "key": KINDS[0], "key_str": key_str(KINDS[0]), "package": "e0001_x.mlpackage"}


@pytest.mark.parametrize("entries,networks,needle", [
    ([{k: v for k, v in GOOD_ENTRY.items() if k != "name"}], [], "entries[0]: name: got None, expected a non-empty string"),
    (["e0001_x"], [], "entries[0]: got 'e0001_x', expected an object"),
    ([{**GOOD_ENTRY, "key": {"op": "warp"}}], [], "entries[0] (e0001_x): key:"),
    ([GOOD_ENTRY], [{"name": "net00", "package": "net00.mlpackage"}], "networks[0] (net00): arch:"),
    ([GOOD_ENTRY], [{"name": "net00", "package": "net00.mlpackage", "arch": {**NET, "family": "resnet"}}],
     "networks[0] (net00): arch:"),
])
def test_a_damaged_manifest_is_refused_in_one_line_naming_the_entry(tmp_path, entries, networks, needle):
    csv_path = _write_csv(tmp_path / "t.csv", [["e0001_x", "0.5", "", "", ""]])
    with pytest.raises(CSVImportError) as e:
        import_csv(_manifest(tmp_path, entries, networks), csv_path, str(tmp_path / "t.yaml"), "iPhone 12")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "t.yaml")


def test_a_manifest_nested_past_the_recursion_limit_is_refused_in_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    csv_path = _write_csv(tmp_path / "t.csv", [["e0001_x", "0.5", "", "", ""]])
    with pytest.raises(CSVImportError) as e:
        import_csv(str(tmp_path / "manifest.json"), csv_path, str(tmp_path / "t.yaml"), "iPhone 12")
    assert "manifest.json: nested too deeply to read" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "t.yaml")


@pytest.mark.parametrize("payload", [b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01",
                                     "name,median_ms\ne0001_x,0.5\n".encode("utf-16")])
def test_a_binary_times_file_is_refused_in_one_line(tmp_path, payload):
    (tmp_path / "t.csv").write_bytes(payload)
    with pytest.raises(CSVImportError) as e:
        import_csv(_manifest(tmp_path, [GOOD_ENTRY]), str(tmp_path / "t.csv"), str(tmp_path / "t.yaml"), "iPhone 12")
    assert "not a UTF-8 text CSV" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "t.yaml")


def test_the_key_column_must_be_this_exports(exported, tmp_path):
    """Package names are numbered per export: another export's CSV (its key column says so) is refused."""
    out, manifest = exported
    e0, e1 = manifest["entries"][0], manifest["entries"][1]
    header = ("name", "median_ms", "p10_ms", "p90_ms", "samples", "key")
    man = os.path.join(out, "manifest.json")
    bad = _write_csv(tmp_path / "other.csv", [[e0["name"], "0.5", "", "", "", e1["key_str"]]], header)
    with pytest.raises(CSVImportError, match=f"key column '{e1['key_str']}'.*expected the CSV of this export"):
        import_csv(man, bad, str(tmp_path / "t.yaml"), "iPhone 12")
    assert not os.path.exists(tmp_path / "t.yaml")
    rows = list(csv.DictReader(open(os.path.join(out, "times_template.csv"))))
    assert rows[-1]["key"].startswith("network ") and len(rows[-1]["key"]) == len("network ") + 12
    net_bad = _write_csv(tmp_path / "net.csv", [[e0["name"], "0.5", "", "", "", e0["key_str"]],
                                                 ["net00", "9", "", "", "", "network 000000000000"]], header)
    with pytest.raises(CSVImportError, match="net00 of this manifest is 'network "):
        import_csv(man, net_bad, str(tmp_path / "t.yaml"), "iPhone 12")
    good = _write_csv(tmp_path / "good.csv", [[e0["name"], "0.5", "", "", "", e0["key_str"]],
                                              [e1["name"], "0.6", "", "", "", ""]], header)  # an empty key: by name
    t = import_csv(man, good, str(tmp_path / "t.yaml"), "iPhone 12")
    assert t.get(e0["key"]).ms == 0.5 and t.get(e1["key"]).ms == 0.6


def test_import_refuses_other_compute_units_or_precision_and_a_blank_device(exported, tmp_path):
    out, manifest = exported
    man = os.path.join(out, "manifest.json")
    good = _write_csv(tmp_path / "good.csv", [[manifest["entries"][0]["name"], "0.5", "", "", ""]])
    t_path = str(tmp_path / "t.yaml")
    import_csv(man, good, t_path, "iPhone 12")
    before = open(t_path, "rb").read()
    with pytest.raises(CSVImportError, match="compute_units 'ALL' vs 'CPU_ONLY'"):
        import_csv(man, good, t_path, "iPhone 12", compute_units="CPU_ONLY")
    other = json.load(open(man))
    other["dtype"] = "float32 inputs, float32 compute"
    (tmp_path / "m32.json").write_text(json.dumps(other))
    with pytest.raises(CSVImportError, match="dtype 'float32 inputs, float16 compute' vs 'float32 inputs, float32"):
        import_csv(str(tmp_path / "m32.json"), good, t_path, "iPhone 12")
    assert open(t_path, "rb").read() == before
    for device in ("", "   ", "iPhone\n12"):
        with pytest.raises(CSVImportError, match=r"--device: got .*, expected a non-empty one-line name"):
            import_csv(man, good, str(tmp_path / "blank.yaml"), device)
    assert not os.path.exists(tmp_path / "blank.yaml")


def test_times_that_look_like_seconds_are_warned_about(exported, tmp_path):
    out, manifest = exported
    rows = [[r["name"], f"{t / 1000:.8f}", "", "", ""] for r, t in zip(manifest["entries"], (0.2, 0.3, 0.4))]
    with pytest.warns(UserWarning, match="times in seconds"):
        import_csv(os.path.join(out, "manifest.json"), _write_csv(tmp_path / "s.csv", rows), str(tmp_path / "t.yaml"),
                   "iPhone 12")


def test_continuing_an_export_keeps_the_packages_written_and_converts_only_the_new_entries(exported, tmp_path):
    """An export re-run with the same settings (after an interruption, or for more entries) reuses every package
    it wrote; a new entry gets a name no earlier package has."""
    import shutil
    out = str(tmp_path / "again")
    shutil.copytree(exported[0], out)
    old = exported[1]["entries"][0]
    pkg = os.path.join(out, old["package"], "Manifest.json")
    before = os.stat(pkg).st_mtime_ns
    new_key = {"op": "meta4d", "res": 8, "dim": 16, "ffn_hidden": 32}
    manifest = export_coreml([old["key"], new_key], out)
    assert manifest["entries"][0] == old and os.stat(pkg).st_mtime_ns == before
    names = {r["name"] for r in exported[1]["entries"]}
    new = manifest["entries"][1]
    assert new["key_str"] == key_str(new_key) and new["name"] not in names
    assert os.path.isdir(os.path.join(out, new["package"]))
    assert json.load(open(os.path.join(out, "manifest.json")))["entries"] == manifest["entries"]
    with open(os.path.join(out, "times_template.csv")) as f:
        assert [r[0] for r in csv.reader(f)][1:] == [old["name"], new["name"]]


def test_continuing_an_export_with_another_batch_or_precision_is_refused(exported, tmp_path):
    out, manifest = exported
    for kw, needle in (({"precision": "float32"}, "precision 'float32 inputs, float16 compute', asked 'float32 inputs, "
                        "float32 compute'"), ({"batch_size": 4}, "batch 1, asked 4")):
        with pytest.raises(CSVImportError, match=needle):
            export_coreml([manifest["entries"][0]["key"]], out, **kw)
    assert json.load(open(os.path.join(out, "manifest.json")))["entries"] == manifest["entries"]


# ---------------------------------------------------------------- the pruning grid through the device
def _tiny_deit():
    import vitslim
    return vitslim.resolve_arch({
        "family": "deit", "input_size": 32, "num_classes": 10, "stem": {"patch_size": 8},
        "stages": [{"width": 24, "blocks": [{"type": "vit", "heads": 3, "qk_dim": 8, "v_dim": 8,
                                             "ffn_hidden": 64} for _ in range(2)]}]})


def _device_ms(key):
    """Made-up on-device times: a block is its attention part (multilinear in heads, qk_dim, v_dim) plus its FFN
    part (linear in ffn_hidden), so the grid prices any pruned width exactly; MACs would not."""
    if key["op"] != "vit_block":
        return 0.1
    h, q, v, f = key["heads"], key["qk_dim"], key["v_dim"], key["ffn_hidden"]
    return (0.05 + 0.01 * h + 0.002 * h * q + 0.002 * h * v if h else 0.0) + (0.02 + 0.0005 * f if f else 0.0)


def _fill_template(out, path, network_ms):
    """times_template.csv with median_ms filled: entries by _device_ms, networks by network_ms(sum of entries)."""
    m = json.load(open(os.path.join(out, "manifest.json")))
    rows = list(csv.DictReader(open(os.path.join(out, "times_template.csv"))))
    by_name = {r["name"]: r for r in m["entries"] + m["networks"]}
    for row in rows:
        r = by_name[row["name"]]
        row["median_ms"] = f"{_device_ms(r['key']):.6f}" if "key" in r else \
            f"{network_ms(sum(_device_ms(s.key) for s in decompose(r['arch']))):.6f}"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _cli(capsys, *argv):
    from vitslim.cli import main
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_export_coreml_prune_grid_gives_a_phone_table_prune_prices_from_the_grid(tmp_path, capsys):
    """`export-coreml --prune-grid` writes the entries `build --prune-grid` measures and pruned calibration
    networks; `import` prices those through the grid and records it; `prune --target latency` on the phone
    table then uses the grid for every block (no note about MACs). Times: a formula, as the phone would give."""
    pytest.importorskip("coremltools")
    import vitslim
    from latency_tables.build import grid_calibration_networks
    from latency_tables.grid import GridSpec, prune_grid_keys
    from latency_tables.segments import arch_keys
    arch = _tiny_deit()
    ck = tmp_path / "deit.pt"
    vitslim.save_checkpoint(vitslim.build_model(arch), arch, ck)
    out = tmp_path / "cm"
    step = "qk=8,v=8,ffn=32,heads=2"
    code, so, err = _cli(capsys, "latency", "export-coreml", "--arch", ck, "--prune-grid", "--grid-step", step,
                         "--out", out, "--quiet")
    assert code == 0, err
    m = json.load(open(out / "manifest.json"))
    want = {key_str(k) for k in arch_keys(arch) + prune_grid_keys(arch, GridSpec(8, 8, 32, 2))}
    assert {r["key_str"] for r in m["entries"]} == want  # what `latency build --prune-grid` measures
    nets = grid_calibration_networks(None, [arch], 4)
    assert [r["arch"] for r in m["networks"]] == json.loads(json.dumps(nets)) and len(nets) == 4  # --networks 4
    assert m["built_for"]["prune_grid"] == {"qk": 8, "v": 8, "ffn": 32, "heads": 2}
    assert "whole networks written" not in so

    csv_path = _fill_template(str(out), tmp_path / "times.csv", lambda s: 1.1 * s + 0.05)
    table = tmp_path / "iphone.yaml"
    code, so, err = _cli(capsys, "latency", "import", "--manifest", out / "manifest.json", "--csv", csv_path,
                         "--device", "iPhone 12", "--out", table)
    assert code == 0, err
    assert "overhead: e2e = (1 +0.1000) * sum +0.0500 ms on 4 networks" in so  # the pruned ones priced on the grid
    t = LatencyTable.load(str(table))
    assert t.built_for["prune_grid"] == {"qk": 8, "v": 8, "ffn": 32, "heads": 2}
    assert t.overhead["networks"] == 4 and t.overhead["mape_fitted"] == pytest.approx(0.0, abs=1e-4)

    code, so, err = _cli(capsys, "prune", "--checkpoint", ck, "--data", "synthetic", "--target", "latency=0.5x",
                         "--table", table, "--out", tmp_path / "p", "--threads", "1", "--calib-batches", "1",
                         "--eval-batches", "1", "--batch-size", "4", "--quiet")
    assert code == 0, err
    assert "no pruning grid" not in so, so
    rep = json.load(open(tmp_path / "p" / "report.json"))
    assert rep["latency_grid_blocks"] == rep["blocks_total"] == 2
    assert rep["latency_kept"] <= 0.5 + 1e-6

    # every network at the same time (the Neural Engine's dispatch floor): a slope of 0 would price every pruned
    # network alike; the fit falls back to a constant, says so, and prune still finds the target
    flat = _fill_template(str(out), tmp_path / "flat.csv", lambda s: 0.6)
    code, so, err = _cli(capsys, "latency", "import", "--manifest", out / "manifest.json", "--csv", flat,
                         "--device", "iPhone 12", "--out", tmp_path / "flat.yaml")
    assert code == 0, err
    assert "note: overhead: the least-squares slope 0.000 (scale -1.0000, intercept +0.6000 ms) is outside [0.5, 1.5]" \
        in so, so
    o = LatencyTable.load(str(tmp_path / "flat.yaml")).overhead
    assert 0.5 <= 1 + o["scale"] <= 1.5 and "note" in o
    code, so, err = _cli(capsys, "prune", "--checkpoint", ck, "--data", "synthetic", "--target", "latency=0.5x",
                         "--table", tmp_path / "flat.yaml", "--out", tmp_path / "pf", "--threads", "1",
                         "--calib-batches", "1", "--eval-batches", "1", "--batch-size", "4", "--quiet")
    assert code == 0, err


def test_export_coreml_says_when_it_writes_fewer_networks_than_asked(tmp_path, capsys, monkeypatch):
    """With --arch alone the whole networks are the archs themselves: fewer than --networks, said in one line
    with what would give more (conversion stubbed: only the count matters here)."""
    import vitslim
    import latency_tables.coreml_io as cio
    monkeypatch.setattr(cio, "convert_coreml", lambda *a, **k: None)
    monkeypatch.setattr(cio, "_save_package", lambda ml, path: os.makedirs(path))
    deit, ef = tmp_path / "deit.yaml", tmp_path / "ef.yaml"
    vitslim.save_arch(_tiny_deit(), deit)
    vitslim.save_arch(NET, ef)
    code, so, err = _cli(capsys, "latency", "export-coreml", "--arch", deit, "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    notes = [l for l in so.splitlines() if l.startswith("note:")]
    assert notes == ["note: 1 of --networks 4 whole networks written: without --space or --prune-grid they are the "
                     "--arch networks themselves, and on fewer than 3 `latency import` fits the overhead as a constant "
                     "alone; add --prune-grid for pruned variants"], so
    code, so, err = _cli(capsys, "latency", "export-coreml", "--arch", deit, "--arch", ef, "--networks", "3",
                         "--out", tmp_path / "b", "--quiet")
    assert code == 0, err
    assert "note: 2 of --networks 3 whole networks written" in so and "add --space SPACE.yaml" in so, so
    code, so, err = _cli(capsys, "latency", "export-coreml", "--arch", deit, "--prune-grid", "--out", tmp_path / "c",
                         "--quiet")
    assert code == 0 and "whole networks written" not in so, so
    assert len(json.load(open(tmp_path / "c" / "manifest.json"))["networks"]) == 4
    code, so, err = _cli(capsys, "latency", "export-coreml", "--arch", deit, "--networks", "1", "--out",
                         tmp_path / "d", "--quiet")
    assert code == 0 and "note:" not in so, so


def test_export_coreml_prune_grid_needs_a_deit_or_swin_arch(tmp_path, capsys):
    code, _, err = _cli(capsys, "latency", "export-coreml", "--arch", "efficientformer_l1", "--prune-grid",
                        "--out", tmp_path / "x")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--prune-grid: arch family 'efficientformer', expected deit or swin" \
        in lines[0], err
    code, _, err = _cli(capsys, "latency", "export-coreml", "--arch", "deit_tiny", "--grid-step", "qk=4",
                        "--out", tmp_path / "x")
    assert code == 2 and "--grid-step qk=4: only with --prune-grid" in err
    assert not (tmp_path / "x").exists()


def test_importing_into_an_existing_table_the_new_times_win_and_the_rest_is_kept(tmp_path):
    """Merging a second CSV into a table: an entry timed again takes its new time, an entry not in the
    new CSV keeps its old one, a new entry is added; the manifest's prune grid is recorded."""
    ents = [{"name": f"e{i:04d}_x", "key": KINDS[i], "key_str": key_str(KINDS[i]), "package": f"e{i:04d}_x.mlpackage"}
            for i in (0, 2, 8)]
    m = _manifest(tmp_path, entries=ents)
    t_path = str(tmp_path / "t.yaml")
    import_csv(m, _write_csv(tmp_path / "a.csv", [["e0000_x", "0.5", "", "", ""], ["e0002_x", "0.7", "", "", ""]]),
               t_path, "iPhone 12")
    d = json.loads(open(m).read())
    d["built_for"] = {"prune_grid": {"qk": 4, "v": 4, "ffn": 16, "heads": 2}}
    open(m, "w").write(json.dumps(d))
    import_csv(m, _write_csv(tmp_path / "b.csv", [["e0000_x", "0.9", "", "", ""], ["e0008_x", "1.1", "", "", ""]]),
               t_path, "iPhone 12")
    t = LatencyTable.load(t_path)
    assert len(t) == 3
    assert t.get(KINDS[0]).ms == pytest.approx(0.9)
    assert t.get(KINDS[2]).ms == pytest.approx(0.7)
    assert t.get(KINDS[8]).ms == pytest.approx(1.1)
    assert t.built_for["prune_grid"] == {"qk": 4, "v": 4, "ffn": 16, "heads": 2}
