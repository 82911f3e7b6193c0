"""The table file: a round trip keeps every number, saving is atomic, and every malformed file is
refused with an error naming the entry, leaving the file byte-identical."""
import os
import re

import pytest
import yaml

from latency_tables import LatencyError, LatencyTable
from latency_tables.segments import key_str, parse_key_str
from lat_helpers import FAKE_DEVICE, fake_table


def test_round_trip_keeps_device_entries_and_overhead(tmp_path, tiny_table):
    p = str(tmp_path / "t.yaml")
    tiny_table.save(p)
    t = LatencyTable.load(p)
    assert t.device == FAKE_DEVICE
    assert t.overhead["scale"] == 0.1 and t.overhead["intercept_ms"] == 0.25
    assert set(t.entries) == set(tiny_table.entries)
    for s, e in tiny_table.entries.items():
        got = t.entries[s]
        assert (got.key, got.n, got.source) == (e.key, e.n, e.source)
        assert got.ms == pytest.approx(e.ms, rel=1e-5) and got.p90 == pytest.approx(e.p90, rel=1e-5)
    t.save(str(tmp_path / "u.yaml"))
    assert open(p).read() == open(tmp_path / "u.yaml").read()  # canonical: a re-save is byte-identical


def test_file_is_readable_yaml_with_one_line_per_entry(tmp_path, tiny_table):
    p = tmp_path / "t.yaml"
    tiny_table.save(str(p))
    text = p.read_text()
    d = yaml.safe_load(text)
    assert d["format"] == "vitslim-latency-table" and d["version"] == 1
    assert sum(line.startswith("- {key: {op: ") for line in text.splitlines()) == len(tiny_table)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # the temporary file was renamed away


def test_key_text_is_canonical():
    a = {"op": "meta4d", "res": 16, "dim": 32, "ffn_hidden": 128}
    b = {"ffn_hidden": 128, "dim": 32, "op": "meta4d", "res": 16}
    assert key_str(a) == key_str(b) == "meta4d|dim=32|ffn_hidden=128|res=16"
    assert parse_key_str(key_str(a)) == a


def test_key_text_round_trips_bools_and_text_fields():
    """Head keys carry booleans (distillation, from_map): they come back as bools, not as the text "true"."""
    k = {"op": "head", "dim": 64, "num_classes": 10, "distillation": True, "from_map": False, "kind": "deit"}
    assert key_str(k) == "head|dim=64|distillation=true|from_map=false|kind=deit|num_classes=10"
    back = parse_key_str(key_str(k))
    assert back == k and back["distillation"] is True and back["from_map"] is False


def test_a_device_field_asked_as_none_is_not_compared(tiny_table):
    """None in the asked device means "any": no mismatch, however the table's field reads."""
    assert tiny_table.matches(dict(FAKE_DEVICE, threads=None, dtype=None)) == []
    assert tiny_table.check_device(dict(FAKE_DEVICE, backend=None, device=None)) == []


def _corrupt(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize("edit,needle", [
    (lambda t: _corrupt(t, "format: vitslim-latency-table", "format: something-else"), "format"),
    (lambda t: _corrupt(t, "version: 1", "version: 7"), "version"),
    (lambda t: _corrupt(t, "backend: torch-cpu", "backend: ''"), "device.backend"),
    (lambda t: _corrupt(t, "n: 20, source", "source"), "n: missing"),
    (lambda t: _corrupt(t, "source: measured}", "source: guessed}"), "source"),
    (lambda t: _corrupt(t, ", ms: ", ", ms: -"), "ms"),
    (lambda t: _corrupt(t, ", ms: ", ", ms: fast, x: "), "ms"),
    (lambda t: _corrupt(t, "{op: meta4d,", "{op: meta5d,"), "unknown op"),
    (lambda t: _corrupt(t, "{op: meta4d, res:", "{op: meta4d, ress:"), "missing res"),
    (lambda t: re.sub(r"(op: meta4d, res: \d+, dim: \d+, ffn_hidden: )(\d+)", r"\1'\2'", t, count=1),
     "expected an integer (not a quoted string)"),  # keyed like 128, built as '128': a crash later
    (lambda t: t + t[t.index("- {key:"):t.index("\n", t.index("- {key:")) + 1], "appears twice"),
    (lambda t: t.replace("entries:", "entries: {}\nx:", 1), "entries"),
    (lambda t: "[1, 2", "not valid YAML"),
    (lambda t: t[:t.rindex("- {key:")], "expected the 74 its entry_count says"),  # cut at a line boundary
    (lambda t: t[:t.index("- {key:")], "expected the 74 its entry_count says"),
])
def test_malformed_table_is_refused_and_left_untouched(tmp_path, tiny_table, edit, needle):
    p = tmp_path / "t.yaml"
    tiny_table.save(str(p))
    bad = edit(p.read_text())
    p.write_text(bad)
    before = p.read_bytes()
    with pytest.raises(LatencyError) as e:
        LatencyTable.load(str(p))
    assert needle in str(e.value) and str(p) in str(e.value)
    assert p.read_bytes() == before


def test_table_for_another_device_is_refused_unless_allowed(tmp_path, tiny_table):
    p = str(tmp_path / "t.yaml")
    tiny_table.save(p)
    before = open(p, "rb").read()
    asked = dict(FAKE_DEVICE, backend="onnxruntime")
    with pytest.raises(LatencyError, match="onnxruntime"):
        LatencyTable.load(p, device=asked)
    with pytest.raises(LatencyError, match="device 'Fake CPU 3000' vs 'Other CPU'"):
        LatencyTable.load(p, device=dict(FAKE_DEVICE, device="Other CPU"))
    t = LatencyTable.load(p, device=asked, allow_mismatch=True)
    assert len(t) == len(tiny_table)
    assert open(p, "rb").read() == before



@pytest.mark.parametrize("field,other", [("backend", "onnxruntime"), ("device", "Other CPU"), ("threads", 4),
                                         ("batch_size", 8), ("dtype", "float16"), ("fused", False)])
def test_every_measurement_condition_must_match(tiny_table, field, other):
    """A table timed with 1 thread says nothing about 4 threads (nor batch 1 about batch 8, ...): each of
    backend, device, threads, batch size, dtype and fusion is checked; a field the asker leaves out is not."""
    asked = dict(FAKE_DEVICE, **{field: other})
    assert tiny_table.matches(FAKE_DEVICE) == []
    assert tiny_table.matches({k: v for k, v in asked.items() if k != field}) == []
    assert tiny_table.matches(asked) == [f"{field} {FAKE_DEVICE[field]!r} vs {other!r}"]
    with pytest.raises(LatencyError, match=f"{field} {FAKE_DEVICE[field]!r} vs {other!r}"):
        tiny_table.check_device(asked)
    assert tiny_table.check_device(asked, allow_mismatch=True) == [f"{field} {FAKE_DEVICE[field]!r} vs {other!r}"]

def test_entry_with_p10_above_median_is_refused(tiny_keys):
    t = fake_table(tiny_keys[:1])
    with pytest.raises(LatencyError, match="p10 <= ms <= p90"):
        t.set(tiny_keys[0], 1.0, 2.0, 3.0, 5)
