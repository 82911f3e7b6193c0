"""safetensors without the safetensors package: files written by the reference implementation read
exactly, vitslim checkpoints round-trip in the format (arch in the metadata), timm's hub layout loads
and reproduces the official outputs, and damaged files are refused in one line before any data is read."""
import json
import os
import struct

import pytest
import torch

import vitslim
from golden_utils import assert_golden_logits, golden
from supernet.safetensors_io import is_safetensors, read_safetensors, write_safetensors
from vitslim.cli import main

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "safetensors")


def sample():
    """The tensors of sample_official.safetensors (see tests/data/safetensors/README.md)."""
    a = torch.arange(60, dtype=torch.float64)
    return {"w.f32": ((a[:15] - 7) / 8).float().reshape(3, 5), "w.f16": ((a[:7] - 3) / 4).half(),
            "w.bf16": ((a[:6] - 2) / 2).bfloat16().reshape(2, 3), "i64": torch.arange(-3, 4),
            "i8": torch.arange(-5, 5, dtype=torch.int8), "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
            "b": torch.tensor([True, False, True]), "f64": (a[:4] / 3).reshape(2, 2), "scalar": torch.tensor(2.5),
            "empty": torch.zeros(0, 4), "i32": torch.arange(5, dtype=torch.int32), "i16": torch.arange(3, dtype=torch.int16)}


def same(a, b):
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])
                                    for k in a)


def test_a_file_of_the_reference_writer_reads_exactly():
    path = os.path.join(DATA, "sample_official.safetensors")
    assert is_safetensors(path)
    got, meta = read_safetensors(path)
    assert same(got, sample())
    assert meta == {"format": "pt", "producer": "safetensors 0.8.0"}


def test_what_we_write_reads_back_exactly_and_is_aligned(tmp_path):
    p = tmp_path / "x.safetensors"
    write_safetensors(sample(), p, {"k": "v"})
    got, meta = read_safetensors(p)
    assert same(got, sample()) and meta == {"k": "v"}
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0  # the data starts 8-aligned, each tensor at a multiple of its element size
    hdr = json.loads(raw[8:8 + n])
    for name, t in hdr.items():
        if name != "__metadata__":
            assert t["data_offsets"][0] % sample()[name].element_size() == 0, name
    assert [f for f in os.listdir(tmp_path)] == ["x.safetensors"]  # no temp file left


def test_timm_hub_file_loads_with_the_arch_from_its_shapes_and_matches_the_official_outputs():
    g = golden("deit_p4_d48_h3_l2")
    model, arch = vitslim.load_checkpoint(os.path.join(DATA, "deit_p4_d48_h3_l2_timm.safetensors"))
    assert arch["family"] == "deit" and arch["stages"][0]["width"] == g["config"]["embed_dim"] == 48
    assert_golden_logits(model, g)


def test_timm_swin_written_as_safetensors_loads_too(tmp_path):
    g = golden("swin_p2_w4_d24_timm")
    write_safetensors(g["state_dict"], tmp_path / "model.safetensors", {"format": "pt"})
    model, arch = vitslim.load_checkpoint(tmp_path / "model.safetensors")
    assert arch["family"] == "swin"
    assert_golden_logits(model, g)
    # a safetensors file under another name (a download saved as .bin / .pth) is read by its content
    os.rename(tmp_path / "model.safetensors", tmp_path / "model.bin")
    model, arch = vitslim.load_checkpoint(tmp_path / "model.bin")
    assert arch["family"] == "swin"
    assert_golden_logits(model, g)


def test_a_vitslim_checkpoint_round_trips_with_its_arch_in_the_metadata(tmp_path):
    from supernet.checkpoint import save_checkpoint
    g = golden("efficientformer_tiny")
    model, arch = vitslim.load_checkpoint(_shipped(g, tmp_path))
    save_checkpoint(model, arch, tmp_path / "m.safetensors", extra={"source": "test", "step": 3})
    _, meta = read_safetensors(tmp_path / "m.safetensors")
    assert meta["format"] == "vitslim-checkpoint" and json.loads(meta["arch"]) == arch
    assert json.loads(meta["extra"]) == {"source": "test", "step": 3}
    back, arch2 = vitslim.load_checkpoint(tmp_path / "m.safetensors")
    assert arch2 == arch
    sd, sd2 = model.state_dict(), back.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert_golden_logits(back, g)


def _shipped(g, tmp_path):
    p = tmp_path / "official.pth"
    torch.save({"model": g["state_dict"]}, p)
    return p


def test_export_safetensors_checks_the_reload_and_feeds_every_command(tmp_path, capsys):
    g = golden("deit_p4_d48_h3_l2")
    ck = tmp_path / "deit.pth"
    torch.save(g["state_dict"], ck)
    out = tmp_path / "deit.safetensors"
    assert main(["export", str(ck), "--format", "safetensors", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["format"] == "safetensors" and res["max_rel_error"] == 0 and res["trained"] is True
    assert sorted(os.listdir(tmp_path)) == ["deit.pth", "deit.safetensors"]
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "deit"
    assert main(["export", str(ck), "--format", "safetensors", "--out", str(tmp_path / "x.pt")]) == 2
    assert "expected a path ending in .safetensors" in capsys.readouterr().err


def _valid(tmp_path):
    p = tmp_path / "v.safetensors"
    write_safetensors({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.int64)}, p)
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _file(tmp_path, hdr, data, name="bad.safetensors"):
    text = hdr if isinstance(hdr, bytes) else json.dumps(hdr).encode()
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return p


@pytest.mark.parametrize("edit,needle", [
    (lambda h, d: (h, d[:-4]), "outside the 28 bytes of data"),  # truncated data
    (lambda h, d: (h, d + b"\0" * 8), "the tensors end at byte 32 of 40"),
    (lambda h, d: ({**h, "a": {**h["a"], "dtype": "F128"}}, d), "dtype 'F128'"),
    (lambda h, d: ({**h, "a": {**h["a"], "shape": [5]}}, d), "16 bytes for shape [5] of F32"),
    (lambda h, d: ({**h, "a": {**h["a"], "shape": [-4]}}, d), "expected a list of sizes >= 0"),
    (lambda h, d: ({**h, "a": {**h["a"], "data_offsets": [0, 16]}, "b": {**h["b"], "data_offsets": [0, 16]}}, d),
     "a hole or an overlap"),
    (lambda h, d: ({**h, "a": {**h["a"], "extra": 1}}, d), "expected exactly dtype, shape and data_offsets"),
    (lambda h, d: ({**h, "__metadata__": {"x": 1}}, d), "__metadata__ is not a mapping of strings to strings"),
    (lambda h, d: (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, '
                   b'"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', d), "a name appears twice"),
    (lambda h, d: (b'{"a": [1, 2', d), "header is not JSON"),
    (lambda h, d: ({**h, "a": {**h["a"], "dtype": ["F32"]}}, d), "dtype ['F32']"),
    (lambda h, d: ({"a": {"dtype": "F32", "shape": [0, 2 ** 70], "data_offsets": [0, 0]}}, b""), "too large to build"),
    (lambda h, d: ({"a": {"dtype": "F32", "shape": [0, 2 ** 62, 4], "data_offsets": [0, 0]}}, b""), "too large"),
    (lambda h, d: (b'{"a":' + b"[" * 200000 + b"]" * 200000 + b"}", b""), "header is not JSON"),
])
def test_a_damaged_file_is_refused_in_one_line(tmp_path, edit, needle):
    hdr, data = _valid(tmp_path)
    p = _file(tmp_path, *edit(hdr, data))
    with pytest.raises(vitslim.CheckpointError) as e:
        vitslim.load_checkpoint(p)
    msg = str(e.value)
    assert needle in msg and "damaged safetensors file" in msg and str(p) in msg and "\n" not in msg


def test_a_header_length_past_the_end_is_not_taken_for_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10 ** 6) + b'{"a": 1}')
    assert not is_safetensors(p)
    with pytest.raises(vitslim.CheckpointError) as e:  # falls to torch.load, which names it unreadable
        vitslim.load_checkpoint(p)
    assert "\n" not in str(e.value)


def test_a_vitslim_safetensors_with_unreadable_metadata_is_refused(tmp_path):
    write_safetensors({"a": torch.ones(1)}, tmp_path / "m.safetensors", {"format": "vitslim-checkpoint",
                                                                         "version": "1", "arch": "{not json"})
    with pytest.raises(vitslim.CheckpointError, match="vitslim metadata .* unreadable"):
        vitslim.load_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize("payload", [b"", b"12345678", b"\x00" * 7, None])
def test_a_file_named_safetensors_is_read_as_one_even_when_damaged(tmp_path, payload):
    p = tmp_path / "m.safetensors"
    if payload is None:  # a torch file under the wrong name
        torch.save({"a": torch.ones(2)}, p)
    else:
        p.write_bytes(payload)
    with pytest.raises(vitslim.CheckpointError) as e:
        vitslim.load_checkpoint(p)
    assert "\n" not in str(e.value) and ("damaged safetensors file" in str(e.value) or "empty file" in str(e.value))


def test_many_names_are_checked_for_repeats_in_linear_time(tmp_path):
    n = 200_000  # quadratic checking took minutes here
    hdr = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}
    text = json.dumps(hdr)[:-1] + ', "t0": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    p = _file(tmp_path, text.encode(), b"")
    with pytest.raises(vitslim.CheckpointError, match="a name appears twice: 't0'"):
        vitslim.load_checkpoint(p)


def test_arch_metadata_that_does_not_fit_the_tensors_is_refused_before_building(tmp_path):
    from supernet.checkpoint import save_checkpoint
    g = golden("deit_p4_d48_h3_l2")
    model, arch = vitslim.load_checkpoint(os.path.join(DATA, "deit_p4_d48_h3_l2_timm.safetensors"))
    save_checkpoint(model, arch, tmp_path / "m.safetensors")
    tensors, meta = read_safetensors(tmp_path / "m.safetensors")
    a = json.loads(meta["arch"])
    a["stages"][0]["blocks"][0]["ffn_hidden"] = 2 ** 31 - 1  # 2**31 x 48 floats: would need 400 GB
    write_safetensors(tensors, tmp_path / "big.safetensors", {**meta, "arch": json.dumps(a)})
    with pytest.raises(vitslim.CheckpointError, match=r"does not fit the architecture: wrong shapes"):
        vitslim.load_checkpoint(tmp_path / "big.safetensors")
    a["stages"][0]["blocks"][0]["ffn_hidden"] = 2 ** 63
    write_safetensors(tensors, tmp_path / "huge.safetensors", {**meta, "arch": json.dumps(a)})
    with pytest.raises(vitslim.CheckpointError, match=r"ffn_hidden: got 9223372036854775808, expected an integer <="):
        vitslim.load_checkpoint(tmp_path / "huge.safetensors")
    a = {**json.loads(meta["arch"]), "family": ["deit"]}
    write_safetensors(tensors, tmp_path / "fam.safetensors", {**meta, "arch": json.dumps(a)})
    with pytest.raises(vitslim.CheckpointError, match=r"family: got \['deit'\], expected a family name"):
        vitslim.load_checkpoint(tmp_path / "fam.safetensors")
    assert g is not None
