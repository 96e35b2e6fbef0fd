"""Acceptance: ``aat serve`` exactly as the README runs it (no configuration) classifies new
audio right with the committed demo backbone and bundles.

A new utterance is spoken by espeak-ng with a voice variant held out from training (read from
the build record), and a new instrument clip is played by sox at a held-out note; both go to
the running server over HTTP on 127.0.0.1. Polling is bounded; the server is always stopped.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from aat_serve.adapters.demo_assets import BUILD_JSON, TASKS_DIR, available
from aat_serve.training.demo import corpus as C
from aat_serve.training.demo import sounds as S
from tests.helpers import require_tool
from tests.server_process import Server

pytestmark = pytest.mark.skipif(not available(), reason="demo assets not built")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo-serve")
    s = Server(tmp, "serve", cwd=tmp)  # no configuration, as the README runs it
    try:
        s.wait_ready(120)
        yield s.url
    finally:
        s.stop()


@pytest.fixture(scope="module")
def heldout():
    return json.loads(BUILD_JSON.read_text())["speakers"]


def _classify(url: str, task: str, audio: bytes) -> list[dict]:
    r = httpx.post(f"{url}/classify/{task}?top_k=3", content=audio,
                   headers={"content-type": "audio/wav"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == task
    return body["predictions"]


def test_serves_the_demo_tasks_with_no_configuration(server):
    tasks = httpx.get(server + "/tasks", timeout=10).json()
    names = {t["task"] for t in (tasks["tasks"] if isinstance(tasks, dict) else tasks)}
    assert {p.stem for p in TASKS_DIR.glob("*.safetensors")} <= names
    assert {"digits", "commands", "instruments"} <= names


def test_held_out_voice_says_a_digit(server, heldout, tmp_path):
    require_tool("espeak-ng")
    variant = heldout["variants"]["test"][0]
    assert variant not in heldout["variants"]["train"]
    path = tmp_path / "seven.wav"  # -w, as the README: --stdout declares no real length
    subprocess.run(["espeak-ng", "-v", f"en-us+{variant}", "-w", str(path), "seven"],
                   check=True, timeout=30)
    wav = path.read_bytes()
    preds = _classify(server, "digits", wav)
    assert preds[0]["label"] == "seven", preds
    # The other task sees the same audio with its own labels (not a digit).
    assert _classify(server, "commands", wav)[0]["label"] in C.COMMANDS


def test_held_out_note_plays_an_instrument(server, heldout, tmp_path):
    require_tool("sox")
    note = heldout["notes"]["test"][0]
    assert note not in heldout["notes"]["train"]
    import random

    args = S.INSTRUMENTS["guitar"](0.6, S.note_hz(note), random.Random(0))
    out = tmp_path / "guitar.wav"
    subprocess.run(["sox", "-R", "-n", "-r", "16000", "-b", "16", str(out), *args],
                   check=True, timeout=30)
    preds = _classify(server, "instruments", out.read_bytes())
    assert preds[0]["label"] == "guitar", preds


def test_the_readme_python_client_example(server, tmp_path):
    """The README's Python block, run as written (against this server's port, in a folder
    holding the seven.wav its comment makes)."""
    require_tool("espeak-ng")
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert "Client(\"http://127.0.0.1:8000\")" in block
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(tmp_path / "seven.wav"), "seven"],
                   check=True, timeout=30)
    run = subprocess.run([sys.executable, "-c", block.replace("http://127.0.0.1:8000", server)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    label, score = run.stdout.split()
    assert label == "seven" and 0.5 < float(score) <= 1.0
