"""``aat serve`` with ``AAT_FRONT_ENDS`` > 0: one model process, several HTTP front ends.

The model process binds the public address (so a port in use stops start-up at once), opens the
engine socket in a private temporary folder, and starts the front ends, which all accept on the
one inherited listening socket (the kernel hands each new connection to one of them). It serves
no HTTP itself: front ends forward what they do not answer (``service.frontend.forward``).

The front ends are watched: one that exits while the service runs is started again (after a
pause that doubles, up to ``MAX_BACKOFF_S``, while they keep failing). On shutdown they are
stopped first (SIGTERM: they finish their requests, up to the graceful timeout) and only then
the model; a front end whose model process is gone exits by itself (its connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aat_serve.adapters.errors import ConfigError
from aat_serve.service.process import GRACEFUL_SHUTDOWN_S
from aat_serve.service.settings import Settings
from aat_serve.service.threads import usable_cores

log = logging.getLogger(__name__)

SETTINGS_ENV = "AAT_FRONT_END_SETTINGS"
"""The front end's settings (the model process's, resolved), as JSON, in its environment."""
GRACE_S = float(GRACEFUL_SHUTDOWN_S)
"""How long a stopping front end may take to finish its requests (its uvicorn's graceful
shutdown, as in one process)."""
MAX_BACKOFF_S = 30.0
WATCH_S = 0.25


def bind(host: str, port: int) -> socket.socket:
    """The public listening socket, inheritable by the front ends."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def front_end_settings(settings: Settings) -> Settings:
    """A front end's settings: the model process's, with the decode threads (unset) shared out
    among the front ends, one per core in all."""
    if settings.decode_workers is not None or settings.front_ends == 0:
        return settings
    per = max(1, usable_cores() // settings.front_ends)
    return settings.model_copy(update={"decode_workers": per})


class FrontEnds:
    """``settings.front_ends`` front-end processes accepting on ``listener``, calling the model
    process at ``engine_socket``."""

    def __init__(self, settings: Settings, listener: socket.socket, engine_socket: Path) -> None:
        self.count = settings.front_ends
        self.listener = listener
        self.engine_socket = engine_socket
        self._env = {**os.environ, SETTINGS_ENV: front_end_settings(settings).model_dump_json()}
        self.processes: list[subprocess.Popen | None] = [None] * self.count
        self._backoff = [0.0] * self.count
        self._due = [0.0] * self.count
        self._watch: asyncio.Task | None = None
        self._stopping = False

    def command(self) -> list[str]:
        return [sys.executable, "-m", "aat_serve.service.frontend",
                "--fd", str(self.listener.fileno()), "--engine", str(self.engine_socket)]

    def _spawn(self, slot: int) -> None:
        fd = self.listener.fileno()
        self.processes[slot] = subprocess.Popen(self.command(), pass_fds=(fd,), env=self._env)
        log.info("front end started", extra={"slot": slot, "pid": self.processes[slot].pid})

    async def start(self) -> None:
        for slot in range(self.count):
            self._spawn(slot)
        self._watch = asyncio.get_running_loop().create_task(self._watch_forever(),
                                                             name="aat-front-ends")

    async def _watch_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_S)
            for slot, proc in enumerate(self.processes):
                self._check(slot, proc)

    def _check(self, slot: int, proc: subprocess.Popen | None) -> None:
        """Start again a front end that exited, once its pause is over."""
        now = time.monotonic()
        if proc is not None:
            code = proc.poll()
            if code is None:
                if now - self._due[slot] > MAX_BACKOFF_S:
                    self._backoff[slot] = 0.0  # it has run a while: failures start over
                return
            self._backoff[slot] = min(MAX_BACKOFF_S, max(0.5, 2 * self._backoff[slot]))
            self._due[slot] = now + self._backoff[slot]
            self.processes[slot] = None
            log.warning("front end exited; starting another",
                        extra={"slot": slot, "pid": proc.pid, "code": code,
                               "in_s": self._backoff[slot]})
            return
        if now >= self._due[slot]:
            self._spawn(slot)
            self._due[slot] = now

    async def stop(self) -> None:
        """SIGTERM every front end; wait up to ``GRACE_S`` (+5 s) for them, then kill."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        running = [p for p in self.processes if p is not None and p.poll() is None]
        for p in running:
            p.terminate()
        await asyncio.to_thread(_wait_all, running, GRACE_S + 5.0)
        self.listener.close()


def _wait_all(processes: list[subprocess.Popen], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("front end did not stop in time; killing it", extra={"pid": p.pid})
            p.kill()
            p.wait()


@contextlib.contextmanager
def engine_folder():
    """A private folder (owner-only) for the engine socket, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="aat-engine-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def serve_split(settings: Settings, checkpoint: object) -> int:
    """Run the model process with ``settings.front_ends`` front ends until SIGTERM/SIGINT."""
    import uvicorn

    from aat_serve.service.app import create_app
    from aat_serve.service.process import freeze_heap, server_options

    try:
        listener = bind(settings.host, settings.port)
    except OSError as e:
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port} (AAT_HOST, "
                          f"AAT_PORT): {e.strerror or e}") from None
    with engine_folder() as folder:
        engine_socket = folder / "engine.sock"
        front_ends = FrontEnds(settings, listener, engine_socket)
        app = create_app(settings, checkpoint=checkpoint, engine_socket=engine_socket,
                         front_ends=front_ends)
        freeze_heap()
        config = uvicorn.Config(app, lifespan="on", **server_options(settings))
        uvicorn.Server(config).run(sockets=[])  # no HTTP here: the front ends take it
    return 0
