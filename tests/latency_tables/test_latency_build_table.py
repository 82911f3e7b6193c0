"""latency_tables.build_table: `vitslim latency build` from Python, on a Backend of one's own."""
import pytest

import latency_tables.measure as M
from latency_tables import Backend, LatencyTable, build_table
from latency_tables.build import needed_keys
from latency_tables.segments import build_segment, key_str
from supernet.errors import VitslimError

U = 2.0 ** -14  # seconds per 1000 parameters: sums of it are exact


class FakeClock:
    """The wall clock, moved only by the fake device's steps."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_seconds(module) -> float:
    """What the fake device takes for a (deployed) module: U per started 1000 parameters, never zero."""
    return U * (1 + sum(p.numel() for p in module.parameters()) // 1000)


class FakeNPU(Backend):
    """A user's own backend: a device vitslim does not know, whose steps take fake_seconds(module)."""

    name = "fake-npu"

    def __init__(self, clock, **kw):
        super().__init__(**kw)
        self.clock, self.prepared = clock, 0

    def device_name(self):
        return "Fake NPU 1"

    def runtime(self):
        return {"fake-sdk": "1.0"}

    def prepare_fn(self, module, input_shape):
        self.prepared += 1
        s = fake_seconds(module)

        def step(x):
            self.clock.now += s
            return x
        return step, None


@pytest.fixture
def npu(monkeypatch):
    clock = FakeClock()
    monkeypatch.setitem(M.CLOCKS, "wall", clock)
    return FakeNPU(clock)


def _archs(space):
    big = space.to_arch(space.largest_choice())
    small = space.largest_choice()
    small["widths"] = [space.widths(i)[0] for i in range(len(small["widths"]))]
    small["blocks"] = [["identity"] * (len(bl) - 1) + [bl[-1]] for bl in small["blocks"]]
    return space.to_arch(space.check_choice(small)), big


def _expected_ms(key) -> float:
    return 1e3 * fake_seconds(M.deploy(build_segment(key)[0], True))


QUICK = dict(time_per_network=1e-9, min_samples=3, contexts=1)


def test_build_table_times_every_entry_on_a_backend_subclass_and_writes_the_table(tmp_path, tiny_space, npu):
    small, _ = _archs(tiny_space)
    out = tmp_path / "npu.yaml"
    table = build_table(out, npu, archs=[small], calibrate=3, **QUICK)
    keys = needed_keys(None, [small])
    assert len(table) == len(keys) and not table.missing(keys)
    for k in keys:  # each entry timed in context on the fake device: exactly its module's fake time
        assert table.lookup(k).ms == pytest.approx(_expected_ms(k), rel=1e-9), key_str(k)
    assert table.device["backend"] == "fake-npu" and table.device["device"] == "Fake NPU 1"
    assert table.overhead["provenance"] == "measured"
    saved = LatencyTable.load(str(out))  # written, as returned
    assert saved.device == table.device and saved.overhead["provenance"] == "measured"
    assert {k: e.ms for k, e in saved.entries.items()} == pytest.approx({k: e.ms for k, e in table.entries.items()},
                                                                        rel=1e-5)  # saved to 6 figures
    assert saved.predict(small) == pytest.approx(table.predict(small))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["npu.yaml"]  # no temporaries, lock or sidecar left


def test_build_table_tops_up_an_existing_table_with_its_own_settings(tmp_path, tiny_space, npu):
    small, big = _archs(tiny_space)
    out = tmp_path / "npu.yaml"
    first = build_table(out, npu, archs=[small], calibrate=0, procedure="isolated", time_per_entry=1e-9,
                        min_samples=3)
    before = {k: e.ms for k, e in first.entries.items()}
    npu.prepared = 0
    new = needed_keys(None, [big])
    lines = []
    table = build_table(out, npu, archs=[small, big], calibrate=0, procedure="isolated", drift_reference=False,
                        log=lines.append)
    missing = [k for k in new if key_str(k) not in before]
    assert missing and npu.prepared == len(missing)  # only what the table lacked was timed (isolated: one each)
    assert {k: table.entries[k].ms for k in before} == pytest.approx(before, rel=1e-5)  # kept (as saved: 6 figures)
    assert all(table.lookup(k).ms == pytest.approx(_expected_ms(k), rel=1e-9) for k in missing)
    assert table.measurement["time_per_item_s"] == 1e-9 and table.measurement["min_samples"] == 3  # the table's
    assert lines[0].startswith(f"{out}: {len(needed_keys(None, [small, big]))} entries needed, {len(before)} present")
    assert lines[-1] == f"wrote {out}: {len(table)} entries"
    with pytest.raises(VitslimError, match=r"^time_per_entry 0.5: .* was measured with 1e-09; a resumed build keeps "
                                           r"its settings \(leave it out, or use a new out\)$"):
        build_table(out, npu, archs=[small], procedure="isolated", time_per_entry=0.5)
    with pytest.raises(VitslimError, match=r"measured with the isolated procedure, not in-context"):
        build_table(out, npu, archs=[small])


def test_build_table_dry_run_counts_without_timing_or_writing(tmp_path, tiny_space, npu):
    small, _ = _archs(tiny_space)
    lines = []
    t = build_table(tmp_path / "t.yaml", npu, archs=[small], dry_run=True, log=lines.append)
    assert len(t) == 0 and npu.prepared == 0 and list(tmp_path.iterdir()) == []
    assert lines == [f"{tmp_path / 't.yaml'}: {len(needed_keys(None, [small]))} entries needed, 0 present, "
                     f"{len(needed_keys(None, [small]))} to measure on fake-npu (Fake NPU 1, 1 thread(s), batch 1, "
                     "clock wall)"]


@pytest.mark.parametrize("kw, needle", [
    (dict(threads=2), "threads: got 2 with a Backend instance, expected it left out (set it on the instance: "
                      "FakeNPU(threads=...))"),
    (dict(backend=3), "backend: got int, expected a backend name or a latency_tables.Backend instance"),
    (dict(backend="tpu"), "backend: got 'tpu', expected one of torch-cpu"),
    (dict(archs=()), "build_table: expected space and/or archs"),
    (dict(procedure="fast"), "procedure: got 'fast', expected in-context or isolated"),
    (dict(group=0), "group: got 0, expected a number >= 1"),
    (dict(prune_grid=False, grid_step="qk=8"), "grid_step qk=8: only with prune_grid"),
    (dict(time_per_network=-1.0), "time_per_network: got -1, expected seconds > 0"),
])
def test_build_table_refuses_bad_settings_in_one_line_naming_them(tmp_path, tiny_space, npu, kw, needle):
    small, _ = _archs(tiny_space)
    args = dict(backend=npu, archs=[small], calibrate=0)
    args.update(kw)
    with pytest.raises(VitslimError) as e:
        build_table(tmp_path / "t.yaml", **args)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert npu.prepared == 0 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("given", ["name", "object", "dict"])
def test_build_table_takes_a_space_by_name_object_or_dict_and_records_its_file_only_when_it_has_one(tmp_path, npu,
                                                                                                 given):
    import yaml
    from supernet.space import load_space
    from lat_helpers import TINY
    space = {"name": "tiny", "object": load_space("tiny"), "dict": yaml.safe_load(open(TINY, encoding="utf-8"))}[given]
    t = build_table(tmp_path / "t.yaml", npu, space=space, dry_run=True)
    assert len(t.missing(needed_keys(load_space("tiny")))) == len(needed_keys(load_space("tiny")))
    want = {"space": "tiny", "input_size": 64}
    if given == "name":
        want["space_file"] = "supernet/spaces/tiny.yaml"
    assert t.built_for == want
