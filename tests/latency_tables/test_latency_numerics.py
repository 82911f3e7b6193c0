"""Degenerate numbers in latency tables: a network timed at 0 ms (a failed or too coarse measurement) is refused
before the overhead fit, whose weights are 1 / time (a failed SVD, or a NaN scale saved into a table that no
command can load again, an existing table merged into included)."""
import copy
import csv
import json

import pytest

from latency_tables.build import fit_overhead
from latency_tables.coreml_io import MANIFEST_FORMAT, MANIFEST_VERSION, CSVImportError, import_csv
from latency_tables.segments import decompose, key_str
from latency_tables.table import LatencyError, LatencyTable

NET = {"version": 1, "family": "efficientformer", "input_size": 32, "in_chans": 3, "num_classes": 10,
       "distillation": True, "stem": {"widths": [8, 16]},
       "stages": [{"width": 16, "downsample": None, "blocks": [{"type": "meta4d", "ffn_hidden": 64}]},
                  {"width": 32, "downsample": {"type": "conv"}, "blocks": [{"type": "meta4d", "ffn_hidden": 64}]}]}


def _export(tmp_path, n_nets):
    nets = []
    for f in (32, 64, 128)[:n_nets]:
        a = copy.deepcopy(NET)
        for st in a["stages"]:
            for b in st["blocks"]:
                b["ffn_hidden"] = f
        nets.append(a)
    keys = {key_str(s.key): s.key for a in nets for s in decompose(a)}
    entries = [{"name": f"e{i:04d}", "key": k, "key_str": ks, "package": f"e{i:04d}.mlpackage"}
               for i, (ks, k) in enumerate(keys.items())]
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps({"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "entries": entries,
                               "networks": [{"name": f"net{i:02d}", "package": f"net{i:02d}.mlpackage", "arch": a}
                                            for i, a in enumerate(nets)]}))
    return str(man), entries


def _csv(path, entries, net_ms):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "median_ms"])
        w.writerows([e["name"], f"{0.1 + 0.01 * i:.3f}"] for i, e in enumerate(entries))
        w.writerows([f"net{i:02d}", ms] for i, ms in enumerate(net_ms))
    return str(path)


@pytest.mark.parametrize("net_ms", [[0.0], [1.0, 0.0, 3.0]])
def test_a_network_timed_at_zero_is_refused_and_the_table_left_loadable(tmp_path, net_ms):
    man, entries = _export(tmp_path, len(net_ms))
    out = str(tmp_path / "t.yaml")
    import_csv(man, _csv(tmp_path / "good.csv", entries, [2.0 + i for i in range(len(net_ms))]), out, "phone")
    before = open(out).read()
    with pytest.raises(CSVImportError, match=r"network net0\d: median_ms 0, expected the time of a whole network"):
        import_csv(man, _csv(tmp_path / "bad.csv", entries, net_ms), out, "phone")
    assert open(out).read() == before
    LatencyTable.load(out)


@pytest.mark.parametrize("measured", [[1.0, 0.0, 3.0], [0.0], [0.0, 0.0, 0.0, 0.0]])
def test_the_overhead_fit_refuses_a_network_timed_at_zero(measured):
    with pytest.raises(LatencyError, match="measured at 0 ms, expected a positive time"):
        fit_overhead([1.0, 2.0, 3.0, 4.0][:len(measured)], measured, [3] * len(measured))


def test_predict_of_a_network_priced_at_zero_prints_no_shares(tmp_path, capsys):
    """A table whose entries are all 0 ms (a clock too coarse) predicts 0 ms: its per-stage shares were 0 / 0."""
    import vitslim
    from vitslim.cli import main
    t = LatencyTable({"backend": "torch-cpu", "device": "test", "threads": 1, "batch_size": 1},
                     built_for={"family": "efficientformer"})
    for s in decompose(NET):
        t.set(s.key, 0.0, 0.0, 0.0, 5)
    t.save(str(tmp_path / "t.yaml"))
    vitslim.save_arch(NET, str(tmp_path / "net.yaml"))
    assert main(["latency", "predict", "--table", str(tmp_path / "t.yaml"), str(tmp_path / "net.yaml")]) == 0
    out = capsys.readouterr().out
    assert "0.000 ms predicted" in out and "stage0" in out and "%" not in out
