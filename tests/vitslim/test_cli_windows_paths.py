"""Windows (emulated: os.sep a backslash, ntpath's expanduser): `--out ~\\runs\\x` reaches the program with ~
unexpanded (cmd and PowerShell leave it to the program) and means the home folder, as `~/runs/x` does; it made a
folder named `~` in the current one."""
import argparse
import ntpath
import os

from vitslim import cli


def test_a_home_path_with_backslashes_is_expanded_on_windows(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sep", "\\")
    monkeypatch.setattr(os, "altsep", "/")
    monkeypatch.setattr(os.path, "expanduser", ntpath.expanduser)
    monkeypatch.setenv("USERPROFILE", "C:\\Users\\me")
    args = argparse.Namespace(out="~\\runs\\x", data=["~\\imagenet", "~name"], target="~/a.yaml")
    cli._expand_home(args)
    assert args.out == "C:\\Users\\me\\runs\\x"
    assert args.data == ["C:\\Users\\me\\imagenet", "~name"]  # a bare ~name stays a name
    assert args.target == "C:\\Users\\me/a.yaml"


def test_on_posix_a_backslash_is_a_name_character():
    args = argparse.Namespace(out="~\\x")
    cli._expand_home(args)
    assert args.out == "~\\x"
