"""Bad checkpoint files get one clear error; vitslim's own format round-trips."""

import pytest
import torch

import vitslim


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(vitslim.CheckpointError, match="empty file"):
        vitslim.load_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(vitslim.CheckpointError, match="no such file"):
        vitslim.load_checkpoint(tmp_path / "nope.pt")


def test_truncated_file(tmp_path):
    m = vitslim.build_model(_tiny_deit())
    p = tmp_path / "full.pt"
    torch.save(m.state_dict(), p)
    data = p.read_bytes()
    q = tmp_path / "cut.pt"
    q.write_bytes(data[: len(data) // 2])
    with pytest.raises(vitslim.CheckpointError, match="truncated"):
        vitslim.load_checkpoint(q)


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_file_needing_pickle_is_refused(tmp_path, capsys):
    p = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, p)
    with pytest.raises(vitslim.CheckpointError, match="needs pickle"):
        vitslim.load_checkpoint(p)
    assert "must never run" not in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], p)
    with pytest.raises(vitslim.CheckpointError, match="expected a state dict"):
        vitslim.load_checkpoint(p)
    p2 = tmp_path / "mixed.pt"
    torch.save({"a": torch.zeros(1), "epoch": 3}, p2)
    with pytest.raises(vitslim.CheckpointError, match="'epoch'"):
        vitslim.load_checkpoint(p2)


def test_unrecognised_layout_names_supported_families(tmp_path):
    p = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}, p)
    with pytest.raises(vitslim.CheckpointError) as e:
        vitslim.load_checkpoint(p)
    msg = str(e.value)
    for fam in ("deit", "swin", "efficientformer", "efficientvit", "shvit"):
        assert fam in msg


def test_a_deit_variant_names_the_keys_deit_lacks(tmp_path):
    """DeiT III adds LayerScale (blocks.N.ls1.gamma): the error names it instead of 'unrecognised'."""
    official = dict(vitslim.build_model(_tiny_deit()).state_dict())  # DeiT modules keep the official key names
    official["blocks.0.ls1.gamma"] = torch.ones(official["cls_token"].shape[-1])
    p = tmp_path / "deit3.pth"
    torch.save({"model": official}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"looks like a deit checkpoint, but has keys deit does not have: "
                                                      r"blocks\.0\.ls1\.gamma"):
        vitslim.load_checkpoint(p)
    del official["blocks.0.ls1.gamma"]
    torch.save({"model": official}, p)
    assert vitslim.load_checkpoint(p)[1]["family"] == "deit"


def _tiny_deit():
    a = vitslim.get_preset("deit_tiny")
    a["input_size"] = 32
    a["num_classes"] = 5
    a["stem"]["patch_size"] = 8
    a["stages"][0]["blocks"] = a["stages"][0]["blocks"][:2]
    return a


def test_vitslim_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    a = _tiny_deit()
    m = vitslim.build_model(a).eval()
    p = tmp_path / "m.pt"
    vitslim.save_checkpoint(m, a, p)
    raw = torch.load(p, weights_only=True)
    assert raw["format"] == "vitslim-checkpoint" and raw["version"] == 1 and raw["arch"] == vitslim.resolve_arch(a)
    m2, a2 = vitslim.load_checkpoint(p)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert a2 == vitslim.resolve_arch(a)


def test_vitslim_checkpoint_with_wrong_shape_names_key(tmp_path):
    a = _tiny_deit()
    m = vitslim.build_model(a)
    sd = m.state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(7, 7)
    p = tmp_path / "m.pt"
    torch.save({"format": "vitslim-checkpoint", "version": 1, "arch": vitslim.resolve_arch(a), "state_dict": sd}, p)
    with pytest.raises(vitslim.CheckpointError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        vitslim.load_checkpoint(p)


def test_saving_a_model_under_an_arch_it_does_not_fit_is_refused_and_writes_nothing(tmp_path):
    m = vitslim.build_model(_tiny_deit())
    with pytest.raises(vitslim.CheckpointError, match="does not fit the architecture: missing keys stem"):
        vitslim.save_checkpoint(m, vitslim.get_preset("efficientformer_l1"), tmp_path / "mm.pt")
    assert list(tmp_path.iterdir()) == []


def test_block_numbers_with_a_gap_are_refused_at_once(tmp_path):
    sd = vitslim.build_model(_tiny_deit()).state_dict()
    sd = {k.replace("blocks.1.", "blocks.3000000."): v for k, v in sd.items()}  # an edited file
    torch.save(sd, tmp_path / "gap.pth")
    with pytest.raises(vitslim.CheckpointError, match=r"blocks numbered up to 3000000 but \d+ present \(no block 1\)"):
        vitslim.load_checkpoint(tmp_path / "gap.pth")


@pytest.mark.parametrize("drop,said", [("layers.1.downsample.reduction.weight", "(layers.1.downsample.reduction.weight "
                                                                            "missing)"),
                                       ("blocks", "(blocks numbered up to 5 but 2 present (no block 1))")])
def test_a_key_the_layout_lacks_is_said_missing_without_a_keyerrors_quotes(tmp_path, drop, said):
    if drop == "blocks":
        sd = {k.replace("blocks.1.", "blocks.5."): v for k, v in vitslim.build_model(_tiny_deit()).state_dict().items()}
    else:
        a = vitslim.get_preset("swin_tiny")
        for st in a["stages"]:
            st["blocks"] = st["blocks"][:1]
        sd = vitslim.build_model(a).state_dict()
        del sd[drop]
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(vitslim.CheckpointError) as e:
        vitslim.load_checkpoint(tmp_path / "x.pth")
    assert str(e.value).endswith("its shapes do not describe one " + said), str(e.value)


def test_a_timm_swin_with_window_12_loads_at_the_input_its_windows_need(tmp_path):
    a = {**vitslim.get_preset("swin_tiny"), "input_size": 384, "num_classes": 10}
    for st in a["stages"]:
        st["window_size"], st["blocks"] = 12, st["blocks"][:1]
    m = vitslim.build_model(a).eval()
    torch.save(m.state_dict(), tmp_path / "swin.pth")  # timm layout: no attn_mask to read the size from
    m2, a2 = vitslim.load_checkpoint(tmp_path / "swin.pth")
    assert a2["input_size"] == 384 and [s["window_size"] for s in a2["stages"]] == [12] * 4
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


def test_loading_builds_without_random_init_and_restores_it(tmp_path, monkeypatch):
    """Weights are read from the file: the network is built without drawing random weights first (seconds
    for a large one), non-persistent index buffers are still built, and torch.nn.init is left as it was."""
    import torch
    import vitslim
    for name in ("swin_tiny", "efficientvit_m0"):
        m = vitslim.build_model(name).eval()
        vitslim.save_checkpoint(m, m.arch, tmp_path / f"{name}.pt")

        def refuse(*a, **k):
            raise AssertionError("random init while loading")
        for fn in ("trunc_normal_", "normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_"):
            monkeypatch.setattr(torch.nn.init, fn, refuse)
        loaded, _ = vitslim.load_checkpoint(tmp_path / f"{name}.pt")
        assert torch.nn.init.trunc_normal_ is refuse  # restored
        monkeypatch.undo()
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))
    assert vitslim.build_model("deit_tiny").pos_embed.std() > 0.01  # an ordinary build still draws its init


def test_no_weight_init_skips_only_the_calling_threads_init(monkeypatch):
    """A network built in another thread while one thread loads a checkpoint (inside no_weight_init) draws
    its random init as usual: only the loading thread's builds skip theirs."""
    import threading
    from supernet.layers import no_weight_init
    torch.manual_seed(3)
    ref = torch.nn.Linear(6, 5).weight.detach().clone()
    calls = []
    real = torch.nn.init.kaiming_uniform_

    def spy(tensor, *a, **k):
        calls.append(threading.get_ident())
        return real(tensor, *a, **k)
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy)
    inside, release, errors = threading.Event(), threading.Event(), []

    def loader():
        try:
            with no_weight_init():
                torch.nn.Linear(6, 5)  # no init drawn in this thread
                inside.set()
                assert release.wait(60)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            inside.set()
    t = threading.Thread(target=loader)
    t.start()
    try:
        assert inside.wait(60)
        assert not calls  # the loading thread's build skipped its init
        torch.manual_seed(3)
        lin, ln = torch.nn.Linear(6, 5), torch.nn.LayerNorm(7)  # built while the other thread is inside
        assert calls == [threading.get_ident()]
        assert torch.equal(lin.weight, ref)
        assert torch.equal(ln.weight, torch.ones(7)) and torch.equal(ln.bias, torch.zeros(7))
    finally:
        release.set()
        t.join(60)
    assert not t.is_alive() and not errors, errors
    assert torch.nn.init.kaiming_uniform_ is spy  # restored once the last thread left
    with no_weight_init(), no_weight_init():  # nested in one thread: still skipped, restored at the outer end
        torch.nn.Linear(6, 5)
    assert torch.nn.init.kaiming_uniform_ is spy and calls == [threading.get_ident()]


@pytest.mark.parametrize("wrappers", [("ddp",), ("compile",), ("compile", "ddp")])
def test_a_state_dict_saved_from_a_wrapped_model_loads_without_the_wrappers_prefixes(tmp_path, wrappers):
    """DistributedDataParallel prefixes every key with `module.`, torch.compile's wrapper with `_orig_mod.` (a
    compiled model under DDP: both)."""
    torch.manual_seed(0)
    m = vitslim.build_model(_tiny_deit()).eval()
    sd = m.state_dict()
    if "compile" in wrappers:
        sd = torch.compile(m).state_dict()  # no forward: nothing is compiled
        assert all(k.startswith("_orig_mod.") for k in sd)
    if "ddp" in wrappers:
        sd = {"module." + k: v for k, v in sd.items()}
    torch.save({"model": sd} if wrappers == ("ddp",) else sd, tmp_path / "wrapped.pth")
    m2, arch = vitslim.load_checkpoint(tmp_path / "wrapped.pth")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x)) and arch["family"] == "deit"


@pytest.mark.parametrize("compile_outside", [True, False])
def test_saving_a_model_wrapped_by_ddp_and_torch_compile_writes_the_network_inside(tmp_path, compile_outside):
    """What a training script holds at the end: torch.compile(DDP(model)) or DDP(torch.compile(model))."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    a = _tiny_deit()
    m = vitslim.build_model(a).eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.compile(DDP(m)) if compile_outside else DDP(torch.compile(m))
        vitslim.save_checkpoint(wrapped, a, tmp_path / "m.pt")
    finally:
        dist.destroy_process_group()
    assert list(torch.load(tmp_path / "m.pt", weights_only=True)["state_dict"]) == list(m.state_dict())
    m2, a2 = vitslim.load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x)) and a2 == vitslim.resolve_arch(a)


def test_a_vitslim_checkpoint_holds_its_arch_and_refuses_another_one_given(tmp_path):
    a = _tiny_deit()
    vitslim.save_checkpoint(vitslim.build_model(a), a, tmp_path / "m.pt")
    assert vitslim.load_checkpoint(tmp_path / "m.pt", arch=a)[1] == vitslim.resolve_arch(a)
    other = _tiny_deit()
    other["num_classes"] = 7
    with pytest.raises(vitslim.CheckpointError, match=r"m\.pt: a vitslim checkpoint holds its own arch, which differs "
                                                      r"from the one given"):
        vitslim.load_checkpoint(tmp_path / "m.pt", arch=other)


def test_a_flipped_byte_in_a_stored_tensor_is_a_crc_error_not_a_wrong_weight(tmp_path):
    m = vitslim.build_model(_tiny_deit())
    p = tmp_path / "m.pth"
    torch.save(m.state_dict(), p)
    data = bytearray(p.read_bytes())
    at = data.find(m.state_dict()["head.weight"].numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x40
    p.write_bytes(bytes(data))
    with pytest.raises(vitslim.CheckpointError, match=r"m\.pth: corrupt \(CRC mismatch in .*\), expected an intact "
                                                      r"checkpoint"):
        vitslim.load_checkpoint(p)


def test_a_vitslim_checkpoint_of_another_version_is_refused(tmp_path):
    a = _tiny_deit()
    m = vitslim.build_model(a)
    torch.save({"format": "vitslim-checkpoint", "version": 2, "arch": vitslim.resolve_arch(a), "state_dict": m.state_dict()},
               tmp_path / "v2.pt")
    with pytest.raises(vitslim.CheckpointError, match=r"v2\.pt: vitslim checkpoint version 2, expected 1"):
        vitslim.load_checkpoint(tmp_path / "v2.pt")


def _rezip(src, dst):
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zo:
        for n in zin.namelist():
            zo.writestr(n, zin.read(n))
    return dst


def test_a_zip_bomb_is_refused_before_torch_inflates_it(tmp_path, monkeypatch):
    """torch.load inflates a deflated member into one allocation of its stated size: 1 MB of deflated zeros made a
    1 GB tensor (and 100 MB, 100 GB). Measured at 1 GiB; here at 4 MB, the floor lowered to 0."""
    from supernet import checkpoint as ck
    monkeypatch.setattr(ck, "ZIP_RATIO_FLOOR", 0, raising=False)
    torch.save({"a": torch.zeros(2 ** 20)}, tmp_path / "zeros.pt")
    bomb = _rezip(tmp_path / "zeros.pt", tmp_path / "bomb.pt")
    with pytest.raises(vitslim.CheckpointError, match=r"bomb.pt: a zip that unpacks to 4,19\d,\d+ bytes from [\d,]+ \(over 100x, "
                                                      r"a zip bomb\)"):
        ck.read_file(bomb)
    # a re-zipped checkpoint of real weights (they do not compress) still loads
    torch.manual_seed(0)
    m = vitslim.build_model(_tiny_deit())
    vitslim.save_checkpoint(m, m.arch, tmp_path / "m.pt")
    loaded, _ = vitslim.load_checkpoint(_rezip(tmp_path / "m.pt", tmp_path / "m_deflated.pt"))
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), loaded.state_dict().values()))

