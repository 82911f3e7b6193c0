"""Where vitslim's atomic writes land and how they fail: a symlinked output is written through (not replaced
by a plain file beside what it pointed at), a full disk is said plainly (torch.save hides ENOSPC behind an
"inline_container.cc" message) and names the user's file, never the temporary, and the command line turns
such an error of the machine into one line."""
import errno
import os
import shutil
from collections import namedtuple

import pytest
import torch

import vitslim
from supernet import arch as arch_mod
from supernet.arch import atomic_file, atomic_write_text, write_error


def test_a_symlinked_output_is_written_through(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    target = shared / "table.yaml"
    target.write_text("old\n")
    link = tmp_path / "table.yaml"
    os.symlink(target, link)
    atomic_write_text(link, "new\n")
    assert os.path.islink(link) and target.read_text() == "new\n"
    assert sorted(os.listdir(tmp_path)) == ["shared", "table.yaml"] and os.listdir(shared) == ["table.yaml"]


def test_a_checkpoint_through_a_symlink_loads_back(tmp_path):
    arch = vitslim.get_preset("deit_tiny")
    arch.update(input_size=32, num_classes=5)
    arch["stem"]["patch_size"] = 8
    arch["stages"][0]["blocks"] = arch["stages"][0]["blocks"][:1]
    model = vitslim.build_model(arch)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real" / "m.pt", tmp_path / "m.pt")   # dangling until written: open() would create it
    vitslim.save_checkpoint(model, model.arch, tmp_path / "m.pt")
    assert os.path.islink(tmp_path / "m.pt") and os.path.isfile(tmp_path / "real" / "m.pt")
    loaded, _ = vitslim.load_checkpoint(tmp_path / "m.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_a_full_disk_is_named_with_the_users_file(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, 10 << 20, 4096))
    path = tmp_path / "m.pt"

    def full(obj, f):   # what torch.save raises when the disk fills under it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 393920 vs 393816")

    with pytest.raises(OSError) as e:
        with atomic_file(path, "wb") as f:
            full({}, f)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert os.listdir(tmp_path) == []          # no temporary left, nothing under the real name
    # the same RuntimeError with room on the disk is not a full disk: raised as it is
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="inline_container"):
        with atomic_file(path, "wb") as f:
            full({}, f)


def test_an_os_error_without_a_file_gets_the_users_path(tmp_path):
    err = write_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x.yaml")
    assert err.errno == errno.ENOSPC and err.filename == str(tmp_path / "x.yaml")
    assert write_error(OSError(errno.ENOSPC, "No space left on device", "named"), "x") is None


def test_a_folder_or_a_file_in_the_way_is_named_not_the_temporary(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_text(tmp_path / "run", "x")
    assert e.value.filename == str(tmp_path / "run") and ".tmp." not in str(e.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        atomic_write_text(tmp_path / "afile" / "sub" / "a.yaml", "x")
    assert "afile is a file, expected a folder" in str(e.value)
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("code, resumable", [(errno.ENOSPC, True), (errno.EROFS, False)])
def test_the_command_line_says_a_storage_error_in_one_line(monkeypatch, capsys, code, resumable):
    from vitslim import cli

    def failing(args):
        raise OSError(code, os.strerror(code), "/data/run/model.pt")

    name = "supernet" if resumable else "info"
    cli.build_parser()  # registers every command first
    add_args, _, help_text, example = cli.COMMANDS[name]
    monkeypatch.setitem(cli.COMMANDS, name, (add_args, failing, help_text, example))
    argv = ["supernet", "show", "x"] if resumable else ["info", "deit_tiny"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"cannot write: {os.strerror(code)} (/data/run/model.pt)" in err
    assert ("re-run to resume" in err) == resumable


def test_other_os_errors_are_not_swallowed(monkeypatch):
    from vitslim import cli

    def failing(args):
        raise OSError(errno.ECONNRESET, "Connection reset by peer")

    cli.build_parser()
    add_args, _, help_text, example = cli.COMMANDS["info"]
    monkeypatch.setitem(cli.COMMANDS, "info", (add_args, failing, help_text, example))
    with pytest.raises(ConnectionResetError):
        cli.main(["info", "deit_tiny"])


def test_a_home_folder_in_an_option_after_equals_is_expanded(tmp_path, monkeypatch, capsys):
    from vitslim import cli
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    vitslim.save_arch(vitslim.get_preset("deit_tiny"), tmp_path / "a.yaml")
    assert cli.main(["export", "~/a.yaml", "--format", "yaml", "--out=~/out/b.yaml"]) == 0
    assert (tmp_path / "out" / "b.yaml").is_file() and not (tmp_path / "~").exists()
