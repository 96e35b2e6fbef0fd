"""Every ``aat`` command in the docs is parsed by the real parser, and the cheap ones run.

The fenced shell blocks (```bash, ```sh, ```shell, ```console) of README.md and docs/*.md are
read; each ``aat ...`` command in them (also ``.venv/bin/aat``, after a pipe or ``&&``) is
parsed by ``aat_serve.cli.main.build_parser()``, so a renamed flag or subcommand fails here.
Placeholder values (PATH, ``~/data/...``) are fine: only the parse is checked for those. The
self-contained ones in ``RUN`` also run for real from the repository root, and every
subcommand the docs use has its ``--help`` run. ``PARSE_ONLY`` says why the others only parse.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from aat_serve.adapters.demo_assets import available
from aat_serve.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
SEPARATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", "2>", "2>&1"}

RUN = {
    "--version": "prints the version",
    "methods": "counts parameters of the demo backbone (seconds)",
    "bundle inspect": "reads a demo bundle's header",
    "bundle verify": "checks a demo bundle against the demo backbone (seconds)",
}
PARSE_ONLY = {
    "serve": "a long-running server; tests/service/test_demo_serve.py runs `aat serve` as the "
             "README does, and test_demo_beside_store.py the --bundle-dir/demo case",
    "train": "needs a data set on disk and minutes of training",
    "eval": "needs a data set and a trained bundle",
    "compare": "trains several methods on a data set",
    "predict": "needs a trained bundle (mine.safetensors) and a clip",
    "demo": "rebuilds the demo backbone and tasks: minutes, with espeak-ng and sox",
    "bench": "starts servers and load generators for minutes; tests/bench/ runs each benchmark "
             "briefly",
}


def shell_blocks(text: str) -> list[str]:
    """The bodies of the fenced shell blocks of a Markdown text."""
    return [m.group(2) for m in FENCE.finditer(text) if m.group(1).lower() in SHELL_LANGS]


def aat_commands(block: str) -> list[list[str]]:
    """The argument lists (after ``aat``) of every ``aat`` command in a shell block."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line.startswith("$ "):  # console transcripts: the prompt
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        command: list[str] = []
        for token in [*lex, ";"]:
            if token not in SEPARATORS:
                command.append(token)
                continue
            while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                command.pop(0)  # VAR=value prefixes
            if command and (command[0] == "aat" or command[0].endswith("/aat")):
                args, skip = [], False
                for t in command[1:]:
                    if skip or t in REDIRECTS:
                        skip = not skip and t in REDIRECTS
                        continue
                    args.append(t)
                out.append(args)
            command = []
    return out


def doc_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        for block in shell_blocks(path.read_text(encoding="utf-8")):
            found += [(path.relative_to(ROOT).as_posix(), a) for a in aat_commands(block)]
    return found


def parse(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr) of the real parser on ``argv``; 0 when it parses."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0), err.getvalue()
    return 0, ""


def kind(argv: list[str]) -> str:
    """``bundle inspect``-style key of a command for RUN / PARSE_ONLY."""
    if argv[:1] == ["bundle"] and len(argv) > 1:
        return f"bundle {argv[1]}"
    return argv[0] if argv else ""


COMMANDS = doc_commands()


def _id(item: tuple[str, list[str]]) -> str:
    return f"{item[0]}: aat {' '.join(item[1])}"[:90]


def test_the_docs_have_commands_of_every_kind():
    """The extraction itself works (so an empty list cannot pass the tests below)."""
    kinds = {kind(a) for _, a in COMMANDS}
    assert set(RUN) | set(PARSE_ONLY) == kinds, kinds ^ (set(RUN) | set(PARSE_ONLY))


@pytest.mark.parametrize("item", COMMANDS, ids=_id)
def test_every_doc_command_parses(item):
    where, argv = item
    code, err = parse(argv)
    assert code == 0, f"{where}: `aat {shlex.join(argv)}` does not parse: {err}"
    assert kind(argv) in RUN or kind(argv) in PARSE_ONLY, (
        f"{where}: decide whether `aat {kind(argv)}` runs here (RUN) or only parses "
        "(PARSE_ONLY, with the reason)")


def test_a_made_up_flag_or_subcommand_in_a_doc_fails_the_parse():
    fake = ("```bash\n.venv/bin/aat train --dataset folder --root data --checkpoint demo \\\n"
            "    --method aat_ms --made-up-flag 3\nespeak-ng -w x.wav hi && aat trian\n```\n")
    commands = [a for b in shell_blocks(fake) for a in aat_commands(b)]
    assert commands == [["train", "--dataset", "folder", "--root", "data", "--checkpoint",
                         "demo", "--method", "aat_ms", "--made-up-flag", "3"], ["trian"]]
    code, err = parse(commands[0])
    assert code == 2 and "unrecognized arguments: --made-up-flag 3" in err
    code, err = parse(commands[1])
    assert code == 2 and "invalid choice: 'trian'" in err
    assert parse(commands[0][:-2]) == (0, "")  # the same line without the made-up flag


def _aat(argv: list[str]) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "aat"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "aat_serve.cli.main"]
    return subprocess.run([*cmd, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not available(), reason="demo assets not built")
@pytest.mark.parametrize("item", [c for c in COMMANDS if kind(c[1]) in RUN], ids=_id)
def test_the_self_contained_doc_commands_run(item):
    where, argv = item
    out = _aat(argv)
    assert out.returncode == 0, f"{where}: `aat {shlex.join(argv)}`: {out.stderr[-2000:]}"
    assert out.stdout.strip(), out.stderr[-2000:]


def test_every_doc_subcommand_has_a_working_help():
    subcommands = sorted({a[0] for _, a in COMMANDS if a and not a[0].startswith("-")})
    assert len(subcommands) >= 6, subcommands
    for sub in subcommands:
        out = _aat([sub, "--help"])
        assert out.returncode == 0 and f"usage: aat {sub}" in out.stdout, (sub, out.stderr)
