"""Every command BENCHMARKS.md shows can be run as written: each `python benchmarks/X.py ...` names a script that
exists and whose argument parser accepts the flags and values given (its own parser, captured at its
`parse_args` call, so nothing is benchmarked), and each `vitslim ...` line of a ```bash block parses with the CLI's
parser. A flag renamed in a script, or a script renamed, fails here instead of leaving the doc behind."""
import argparse
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOC = os.path.join(ROOT, "BENCHMARKS.md")


def shell_words(line: str) -> list:
    """The words of one shell command: placeholders such as `<table>` kept as a word, stopping at a redirect."""
    lex = shlex.shlex(re.sub(r"<[\w ]+>", "PLACEHOLDER", line), posix=True, punctuation_chars=";>|&")
    lex.whitespace_split = True
    words = []
    for w in lex:
        if w in (">", ">>", "|"):
            break
        words.append(w)
    return words


def doc_commands() -> list:
    """(where, words) of every command shown: each command of a ```bash block (continuations joined, `;` split,
    comments dropped), and every inline `python benchmarks/...` code span (which may wrap across lines)."""
    text = open(DOC, encoding="utf-8").read()
    out = []
    for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
        line_no = text.count("\n", 0, m.start()) + 2
        for i, line in enumerate(m.group(1).replace("\\\n", " ").splitlines()):
            words, cmd = shell_words(line), []
            for w in words + [";"]:
                if w == ";":
                    if cmd:
                        out.append((f"BENCHMARKS.md:{line_no + i} ```bash", cmd))
                    cmd = []
                else:
                    cmd.append(w)
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", re.sub(r"```.*?```", lambda f: "\n" * f.group(0).count("\n"),
                                                           text, flags=re.S)):
        span = " ".join(m.group(1).split())
        if span.startswith("python benchmarks/"):
            out.append((f"BENCHMARKS.md:{text.count(chr(10), 0, m.start()) + 1} inline", shell_words(span)))
    return out


class _Parser(Exception):
    def __init__(self, parser):
        self.parser = parser


def script_parser(path: str) -> argparse.ArgumentParser:
    """The script's own parser, stopped at its parse_args (module level or in main) before any work."""
    def stop(self, args=None, namespace=None):
        raise _Parser(self)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", stop)
        mp.setattr(sys, "path", [os.path.dirname(path)] + sys.path)  # as `python script.py` does (and they add more)
        mp.setattr(sys, "argv", [path])
        try:
            runpy.run_path(path, run_name="__main__")
        except _Parser as got:
            return got.parser
    raise AssertionError(f"{path} did not parse its arguments")


def rejects(parser: argparse.ArgumentParser, argv: list, capsys):
    """argparse's error for argv, or None when it parses."""
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        err = capsys.readouterr().err.strip()
        return err.splitlines()[-1] if err else f"exit {e.code}"  # the error line, not the usage above it
    return None


COMMANDS = doc_commands()


def test_the_doc_shows_commands_of_both_kinds():
    kinds = {words[0] for _, words in COMMANDS}
    assert {"python", "vitslim"} <= kinds
    assert sum(words[:1] == ["python"] for _, words in COMMANDS) >= 30


@pytest.mark.parametrize("where,words", [c for c in COMMANDS if c[1][:2] != ["git", "worktree"]],
                         ids=[f"{w}:{' '.join(c[:3])}" for w, c in COMMANDS if c[:2] != ["git", "worktree"]])
def test_every_command_in_benchmarks_md_parses(where, words, capsys):
    if words[0] == "vitslim":
        from vitslim.cli import build_parser
        parser, argv = build_parser(), words[1:]
    else:
        assert words[0] == "python" and len(words) > 1, f"{where}: not a command a reader can run: {words}"
        path = os.path.join(ROOT, words[1])
        assert os.path.isfile(path), f"{where}: no script {words[1]}"
        parser, argv = script_parser(path), words[2:]
    err = rejects(parser, argv, capsys)
    assert err is None, f"{where}: `{' '.join(words)}` is refused: {err}"
