"""A model application and a front end on one event loop, for tests (no processes)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from aat_serve.service.app import create_app
from aat_serve.service.frontend.app import FrontEnd
from aat_serve.service.settings import Settings


class Lifespan:
    """Drives an ASGI application's lifespan (startup, then shutdown) from the outside."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    async def _step(self, message: str) -> None:
        await self._inbox.put({"type": f"lifespan.{message}"})
        reply = await self._outbox.get()
        assert reply["type"] == f"lifespan.{message}.complete", reply

    async def startup(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._task = asyncio.get_running_loop().create_task(
            self.app(scope, self._inbox.get, self._outbox.put))
        await self._step("startup")

    async def shutdown(self) -> None:
        await self._step("shutdown")
        await self._task


class FrontEndPair:
    """ASGI: requests go to a ``FrontEnd``; its lifespan starts the model application (serving
    ``engine_socket``) and then the front end, connected to it."""

    def __init__(self, settings: Settings, checkpoint: Any = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="aat-pair-")
        socket = Path(self._dir.name) / "engine.sock"
        self.model_app = create_app(settings, checkpoint=checkpoint, engine_socket=socket)
        self.front = FrontEnd(self.model_app.state.settings, str(socket))
        self._model = Lifespan(self.model_app)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.front(scope, receive, send)
            return
        await receive()
        await self._model.startup()
        self.front.start()
        for _ in range(1000):  # bounded: 10 s
            if self.front.connected:
                break
            await asyncio.sleep(0.01)
        await send({"type": "lifespan.startup.complete"})
        await receive()
        await self.front.stop()
        await self._model.shutdown()
        self._dir.cleanup()
        await send({"type": "lifespan.shutdown.complete"})
