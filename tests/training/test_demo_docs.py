"""Issue 22 item 4: docs/demo.md's "Try it" curl command, run as written against ``aat
serve``, classifies (it answered 415 when curl sent form-urlencoded); training.md says how to
train on the demo backbone."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from aat_serve.adapters.demo_assets import available
from tests.helpers import require_tool
from tests.server_process import Server
from tests.training import synth

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not available() or not (REPO / "docs").is_dir(),
                                reason="demo assets or docs absent")


def try_it_commands() -> list[str]:
    """The shell commands of demo.md's "Try it" block (continuation lines joined)."""
    text = (REPO / "docs" / "demo.md").read_text()
    block = re.search(r"## Try it\n\n```bash\n(.*?)```", text, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_try_it_curl_command_classifies(tmp_path):
    require_tool("curl")
    curl = [c for c in try_it_commands() if c.startswith("curl ")]
    assert len(curl) == 1
    synth.write_audio(tmp_path / "seven.wav", 3, seconds=1.0)
    server = Server(tmp_path, "serve", cwd=tmp_path)
    url = server.url
    try:
        server.wait_ready(120)
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
        server.stop()


def test_training_md_says_how_to_train_on_the_demo_backbone():
    text = (REPO / "docs" / "training.md").read_text()
    assert "--checkpoint demo" in text
    assert "preprocessor_config.json" in text and "--all-labels" in text
