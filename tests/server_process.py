"""``aat serve`` as a real process on 127.0.0.1 for tests: started on a free port with no
``AAT_*`` from the machine running the tests, polled with a bounded loop, always stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aat_serve.bench.hey import free_port


def aat_command() -> list[str]:
    """The installed ``aat`` script next to this Python (the README's ``.venv/bin/aat``)."""
    exe = Path(sys.executable).parent / "aat"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "aat_serve.cli.main"]


class Server:
    """One ``aat serve``; without ``checkpoint`` and ``store`` it serves the embedded demo, as
    the README runs it. Its output goes to ``<tmp>/<name>.log``."""

    def __init__(self, tmp: Path, name: str, checkpoint: Path | None = None,
                 store: Path | None = None, env: dict | None = None, cwd: Path | None = None,
                 ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("AAT_")}
        clean.update(env or {})
        cmd = [*aat_command(), "serve", "--port", str(self.port)]
        if checkpoint is not None:
            cmd += ["--checkpoint", str(checkpoint)]
        if store is not None:
            cmd += ["--bundle-dir", str(store)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=clean, cwd=cwd, stdout=log,
                                         stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 90.0, path: str = "/readyz") -> None:
        """Until ``path`` answers 200 (``/healthz``: up; ``/readyz``: warmed up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}): "
                                     f"{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{path} not 200 in {timeout_s} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
