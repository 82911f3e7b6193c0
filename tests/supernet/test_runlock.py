"""supernet.runlock: a folder on read-only storage refused in one line, the lock file of an output that lives
beside it (prune's run folder, a latency table) and the up-front check that temporary names fit."""
import errno
import os

import pytest

import supernet.runlock as rl
from supernet.errors import VitslimError
from supernet.runlock import check_names_fit, file_lock, name_max, run_lock, temp_names


def read_only(monkeypatch, name):
    """open() of files called `name` fails as on a read-only mount (chmod does not stop root: tests may run as it)."""
    real = open

    def fake(path, *a, **k):
        if os.path.basename(os.fspath(path)) == name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(rl, "open", fake, raising=False)


def test_run_lock_in_a_folder_it_cannot_write_in_is_one_line(tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    read_only(monkeypatch, ".lock")
    with pytest.raises(VitslimError) as e:
        with run_lock(str(out)):
            pass
    assert str(e.value) == f"--out {out}: cannot write in it (Read-only file system)"


def test_file_lock_refuses_a_second_holder_and_leaves_no_file(tmp_path):
    p = tmp_path / ".x.lock"
    with file_lock(str(p), busy="busy", cannot="cannot"):
        assert p.exists()
        with pytest.raises(VitslimError, match="^busy$"):
            with file_lock(str(p), busy="busy", cannot="cannot"):
                pass
        assert p.exists()  # the refused one leaves the holder's lock alone
    assert not p.exists()
    with file_lock(str(p), busy="busy", cannot="cannot"):  # free again
        pass


def test_file_lock_retries_when_its_holder_removed_the_file_under_it(tmp_path, monkeypatch):
    """Opened just before the holder ended (and removed the file): locking that file would be locking nothing
    another process can see; the lock is taken on the file the name now points to."""
    p = tmp_path / ".x.lock"
    real, opened = open, []

    def racing(path, *a, **k):
        f = real(path, *a, **k)
        opened.append(path)
        if len(opened) == 1:
            os.remove(path)  # the holder ends between our open and our flock
        return f

    monkeypatch.setattr(rl, "open", racing, raising=False)
    with file_lock(str(p), busy="busy", cannot="cannot"):
        assert p.exists() and len(opened) == 2
        monkeypatch.setattr(rl, "open", real, raising=False)
        with pytest.raises(VitslimError, match="busy"):  # the file at the name is the one held
            with file_lock(str(p), busy="busy", cannot="cannot"):
                pass


def test_file_lock_removes_the_folders_it_made_when_the_run_fails(tmp_path):
    p = tmp_path / "a" / "b" / ".x.lock"
    with pytest.raises(RuntimeError):
        with file_lock(str(p), busy="busy", cannot="cannot"):
            assert p.exists()
            raise RuntimeError
    assert os.listdir(tmp_path) == []
    with file_lock(str(p), busy="busy", cannot="cannot"):
        pass
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []


def test_file_lock_where_it_cannot_write_is_one_line(tmp_path, monkeypatch):
    read_only(monkeypatch, ".x.lock")
    with pytest.raises(VitslimError) as e:
        with file_lock(str(tmp_path / ".x.lock"), busy="busy", cannot=f"--out x: cannot write in {tmp_path}"):
            pass
    assert str(e.value) == f"--out x: cannot write in {tmp_path} (Read-only file system)"


def test_names_that_do_not_fit_are_refused_with_the_room_left(tmp_path):
    limit = name_max(str(tmp_path))
    extra = len(temp_names("", folder=True)[1])  # .BASE.pidPID.old.RANDOM: the longest
    fits = "p" * (limit - extra)
    check_names_fit("--out", fits, str(tmp_path), temp_names(fits, folder=True))
    long = fits + "pp"
    with pytest.raises(VitslimError) as e:
        check_names_fit("--out", long, str(tmp_path), temp_names(long, folder=True))
    assert f"names in {tmp_path} take at most {limit}" in str(e.value)
    assert str(e.value).endswith("expected a name at least 2 bytes shorter")
    # bytes, not characters
    with pytest.raises(VitslimError, match="at least 1 bytes shorter"):
        wide = "p" * (limit - extra - 1) + "\u00fc"
        check_names_fit("--out", wide, str(tmp_path), temp_names(wide, folder=True))


def test_name_max_of_a_folder_still_to_make_is_its_nearest_ancestors(tmp_path):
    assert name_max(str(tmp_path / "not" / "yet")) == name_max(str(tmp_path))
