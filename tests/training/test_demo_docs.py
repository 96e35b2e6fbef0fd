"""Issue 22 item 4: docs/demo.md's "Try it" curl command, run as written against ``aat
serve``, classifies (it answered 415 when curl sent form-urlencoded); training.md says how to
train on the demo backbone."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from aat_serve.adapters.demo_assets import available
from tests.helpers import require_tool
from tests.training import synth

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not available() or not (REPO / "docs").is_dir(),
                                reason="demo assets or docs absent")


def try_it_commands() -> list[str]:
    """The shell commands of demo.md's "Try it" block (continuation lines joined)."""
    text = (REPO / "docs" / "demo.md").read_text()
    block = re.search(r"## Try it\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_try_it_curl_command_classifies(tmp_path):
    require_tool("curl")
    curl = [c for c in try_it_commands() if c.startswith("curl ")]
    assert len(curl) == 1
    synth.write_audio(tmp_path / "seven.wav", 3, seconds=1.0)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AAT_")}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "aat_serve.cli.main", "serve", "--port",
                             str(port)], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail((tmp_path / "serve.log").read_text()[-2000:])
        command = curl[0].replace("http://127.0.0.1:8000", url) + " -w ' HTTP %{http_code}'"
        out = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                             text=True, timeout=60).stdout
        assert out.endswith(" HTTP 200") and '"predictions"' in out, out
        # The old command (no Content-Type) is refused: the header is what fixes it.
        old = command.replace("-H 'Content-Type: audio/wav' ", "")
        assert old != command
        out = subprocess.run(["bash", "-c", old], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60).stdout
        assert out.endswith(" HTTP 415"), out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_training_md_says_how_to_train_on_the_demo_backbone():
    text = (REPO / "docs" / "training.md").read_text()
    assert "--checkpoint demo" in text
    assert "preprocessor_config.json" in text and "--all-labels" in text
