"""Issue 22 item 7, the CLI in a shell pipeline: ``--version``, ``-`` and ``/dev/stdin`` read
audio from standard input, a folder stands for its audio files (sorted), ``--json`` errors are
the API's error body on stdout with a non-zero exit, ``--device auto`` is every default, and
``predict --json`` says ``predictions`` as the API does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aat_serve.adapters.demo_assets import TASKS_DIR, available
from aat_serve.cli.main import build_parser, main
from tests.training import synth

pytestmark = pytest.mark.skipif(not available(), reason="demo assets not built")
DIGITS = str(TASKS_DIR / "digits.safetensors")
AAT = [sys.executable, "-m", "aat_serve.cli.main"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("clips")
    for name, cls in (("b.wav", 1), ("a.wav", 0), ("sub/c.flac", 2)):
        synth.write_audio(d / name, cls, fmt="FLAC" if name.endswith(".flac") else "WAV")
    (d / "notes.txt").write_text("not audio")
    return d


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == "aat 0.1.0"


@pytest.mark.parametrize("name", ["-", "/dev/stdin"])
def test_stdin_is_an_audio_input(clips, name):
    wav = clips / "a.wav"
    with wav.open("rb") as f:
        proc = subprocess.run([*AAT, "predict", name, "--checkpoint", "demo", "--bundle", DIGITS,
                               "--json"], stdin=f, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    direct = subprocess.run([*AAT, "predict", str(wav), "--checkpoint", "demo", "--bundle",
                             DIGITS, "--json"], capture_output=True, text=True, timeout=300)
    assert row["file"] == name
    assert row["predictions"] == json.loads(direct.stdout)["predictions"]


def test_a_folder_expands_to_its_audio_files_sorted(capsys, clips):
    assert main(["predict", str(clips), "--checkpoint", "demo", "--bundle", DIGITS,
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == [str(clips / n) for n in ("a.wav", "b.wav",
                                                                  "sub/c.flac")]
    empty = clips / "sub" / "empty"
    empty.mkdir(exist_ok=True)
    assert main(["predict", str(empty), "--checkpoint", "demo", "--json"]) == 1
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["type"] == "invalid_request" and "holds no audio files" in err["message"]


def test_json_errors_are_the_api_body_on_stdout(capsys, clips, tmp_path):
    missing = str(tmp_path / "none.pth")
    assert main(["predict", str(clips / "a.wav"), "--checkpoint", missing, "--json"]) == 1
    out = capsys.readouterr()
    body = json.loads(out.out)
    assert body == {"error": {"type": "invalid_checkpoint",
                              "message": f"checkpoint {missing!r} does not exist"}}
    # Without --json the same failure stays one line on stderr.
    assert main(["predict", str(clips / "a.wav"), "--checkpoint", missing]) == 1
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"error: checkpoint {missing!r} does not exist\n"
    assert main(["bundle", "inspect", str(tmp_path / "x.safetensors"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["type"] in ("invalid_bundle",
                                                                   "invalid_checkpoint")


def test_every_device_default_is_auto():
    parser = build_parser()
    for argv in (["predict", "x.wav", "--checkpoint", "demo"],
                 ["train", "--dataset", "folder", "--root", "r", "--checkpoint", "demo",
                  "--method", "head"],
                 ["eval", "--dataset", "folder", "--root", "r", "--bundle", "b"]):
        assert parser.parse_args(argv).device == "auto", argv
    assert parser.parse_args(["predict", "x.wav", "--checkpoint", "demo", "--device",
                              "cpu"]).device == "cpu"


def test_a_closed_pipe_ends_quietly_with_the_sigpipe_status(tmp_path):
    """`aat bundle inspect FILE | head` when head has gone: no traceback, exit 141 (128 + 13)."""
    import subprocess
    import sys

    from aat_serve.adapters.demo_assets import TASKS_DIR

    bundle = next(TASKS_DIR.glob("*.safetensors"))
    child = subprocess.Popen([sys.executable, "-m", "aat_serve.cli.main", "bundle", "inspect",
                              str(bundle)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader is gone before the first line is written
    _, err = child.communicate(timeout=120)
    assert child.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


def test_http_client_request_lines_are_quiet_unless_verbose(monkeypatch):
    """``aat`` logs at INFO, but httpx's one line per request (benchmarks, the client) only
    with --verbose."""
    import logging

    from aat_serve.cli.main import main

    for name in ("httpx", "httpcore"):
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    main(["methods"])
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("httpcore").getEffectiveLevel() == logging.WARNING
    logging.getLogger("httpx").setLevel(logging.NOTSET)
    main(["--verbose", "methods"])
    assert logging.getLogger("httpx").level == logging.NOTSET
