"""The ASGI application of a front-end process: HTTP in, calls to the model process out.

A front end answers ``POST /classify/{task}`` (with a plain query, ``service.fast_path``) itself
up to the model: the name and token checks, the media type, the body (limits and timeouts), the
decode to PCM at the task's rate, then one ``classify`` call carrying the clip; the model
process answers with the response body (``service.engine_server``). ``GET /healthz`` is answered
here (200 while the model process is connected). Every other request (management, listings,
readiness, metrics, docs, a classify query only FastAPI reads) is forwarded whole and runs
through the model process's own application, so it is answered exactly as in one process.

The request outcomes counted here travel to the model process as ``observe`` notices every
``FLUSH_S`` (or sooner when many gather), so ``/metrics`` counts every front end's requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import Response

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AATError
from aat_serve.service.api import TASK_LOAD_HEADER, TASK_LOAD_MS_HEADER, valid_task
from aat_serve.service.auth import require_api_token
from aat_serve.service.bodies import check_media_type, read_payload
from aat_serve.service.body_timeout import BodyTimeoutMiddleware
from aat_serve.service.classify import Options
from aat_serve.service.decoding import Decoder
from aat_serve.service.engine_server import options_header
from aat_serve.service.errors import (
    ErrorType,
    ServiceError,
    client_error,
    from_aat_error,
    not_ready,
    overloaded,
)
from aat_serve.service.fast_path import PREFIX, classify_options
from aat_serve.service.frontend.forward import call_engine, forward
from aat_serve.service.logs import RequestContextMiddleware
from aat_serve.service.settings import Settings
from aat_serve.service.wire import Caller

log = logging.getLogger(__name__)

FLUSH_S = 0.05
"""Longest a counted outcome waits before it is sent to the model process."""
FLUSH_AT = 256
"""Outcomes sent at once when this many gather before ``FLUSH_S``."""
KEEP_AT_MOST = 16 * FLUSH_AT
"""Outcomes kept while the model process is not connected."""
CONNECT_RETRY_S = 0.1


class FrontEnd:
    """One front end: ``settings`` as the model process's, the model process at ``engine``
    (a Unix socket path). ``on_lost`` runs once when a connection to it ends (the process
    then exits: the model process is gone or stopping)."""

    def __init__(self, settings: Settings, engine: str,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.on_lost = on_lost
        self.state = State()
        self.state.settings = settings
        self.caller: Caller | None = None
        self.decoder: Decoder | None = None
        self.decode_params: dict[str, list[Any]] = {}
        """Each task's decode settings as the model process last gave them."""
        self._records: list[list[Any]] = []
        self._admitted = 0
        self._tasks: list[asyncio.Task] = []
        self._parent = os.getppid()
        self._app = RequestContextMiddleware(BodyTimeoutMiddleware(
            self._endpoint, idle_s=settings.body_timeout_s,
            total_s=settings.body_total_timeout_s))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        scope["app"] = self
        await self._app(scope, receive, send)

    # -- lifecycle -------------------------------------------------------------------------------
    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def start(self) -> None:
        s = self.settings
        self.decoder = Decoder(s.decode_workers, s.request_timeout_s)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._connect(), name="aat-connect"),
                       loop.create_task(self._flush_forever(), name="aat-observe")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._flush()
        if self.caller is not None:
            await self.caller.close()
        if self.decoder is not None:
            self.decoder.shutdown()

    async def _connect(self) -> None:
        """Connect to the model process (retrying while it starts), then wait for the end."""
        while self.caller is None:
            try:
                reader, writer = await asyncio.open_unix_connection(self.engine)
            except OSError:
                if os.getppid() != self._parent:  # the model process is gone for good
                    self._lost()
                    return
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            self.caller = Caller(reader, writer)
        log.info("connected to the model process", extra={"path": self.engine})
        await self.caller.closed.wait()
        self._lost()

    def _lost(self) -> None:
        log.warning("the model process closed the connection")
        if self.on_lost is not None:
            self.on_lost()

    @property
    def connected(self) -> bool:
        return self.caller is not None and not self.caller.closed.is_set()

    def _caller(self) -> Caller:
        if not self.connected:
            raise not_ready("the model process is not reachable (starting or stopping)")
        return self.caller

    # -- requests --------------------------------------------------------------------------------
    async def _endpoint(self, scope: dict, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        try:
            response = await self._route(scope, request)
        except Exception as e:
            err = client_error(e)
            if err is None:
                raise  # the middleware logs it with the request id and answers 500
            self._record(None, None, None, err.type)
            response = err.response()
        await response(scope, receive, send)

    async def _route(self, scope: dict, request: Request) -> Response:
        path, method = scope["path"], scope["method"]
        if method == "POST" and path.startswith(PREFIX) and not scope.get("root_path"):
            opts = classify_options(scope.get("query_string", b""))
            if opts is not None:
                await require_api_token(request)  # before the name, as the route's guard
                return await self.classify(path[len(PREFIX):], request, opts)
        if path == "/healthz" and method == "GET" and self.connected:
            return Response(b'{"status":"ok"}', media_type="application/json")
        return await forward(self._caller(), request, self.settings)

    async def classify(self, task: str, request: Request, opts: Options) -> Response:
        """Answer a classify request, counting it by task and outcome as one process does."""
        started = time.monotonic()
        try:
            body, headers = await self._classify(task, request, opts)
        except (ServiceError, AATError) as e:
            kind = e if isinstance(e, ServiceError) else from_aat_error(e)
            self._record(task, kind.type, None, None)
            raise
        self._record(request.state.log["task"], "ok", time.monotonic() - started, None)
        return Response(body, media_type="application/json", headers=headers)

    async def _classify(self, task: str, request: Request, opts: Options
                        ) -> tuple[bytes, dict[str, str] | None]:
        fields = request.state.log
        task = valid_task(task)
        fields["task"] = task
        caller = self._caller()
        kind = check_media_type(request, audio=True)
        call = {"op": "classify", "task": task, "options": options_header(opts),
                "request_id": request.state.request_id}
        loaded = None
        params = self.decode_params.get(task)
        s = self.settings
        if params is None:  # the task's decode settings first (a cold task loads here)
            reply, _ = await call_engine(caller, call, deadline=time.monotonic()
                                         + s.request_timeout_s, timeout_s=s.request_timeout_s)
            params, loaded = self._learn(task, reply, loaded)
            call["again"] = True
        audio = await read_payload(request, kind, s.max_audio_bytes, "audio", "AAT_MAX_AUDIO_MB")
        deadline = time.monotonic() + s.request_timeout_s
        with self._admission():
            for _ in range(3):
                cfg = FeatureConfig(sample_rate=params[0], max_duration_s=params[1])
                wave = (await self.decoder.decode(audio, cfg, deadline)).contiguous()
                call.update(decode=params, timeout_s=max(0.0, deadline - time.monotonic()))
                reply, body = await call_engine(caller, call,
                                                memoryview(wave.numpy()).cast("B"),
                                                deadline=deadline,
                                                timeout_s=s.request_timeout_s)
                if "decode" not in reply:
                    break
                params, loaded = self._learn(task, reply, loaded)
                call["again"] = True
            else:
                raise ServiceError(ErrorType.TASK_CHANGED, f"task {task!r} kept changing its "
                                   "feature settings while this request waited; retry",
                                   {"Retry-After": "0"})
        loaded = reply.get("loaded") or loaded
        fields.update(reply.get("log", {}))
        if loaded is None:
            return body, None
        fields.update(task_load=loaded[0], task_load_ms=round(loaded[1] * 1000, 3))
        return body, {TASK_LOAD_HEADER: loaded[0], TASK_LOAD_MS_HEADER: f"{loaded[1] * 1000:.3f}"}

    def _learn(self, task: str, reply: dict[str, Any], loaded: list[Any] | None
               ) -> tuple[list[Any], list[Any] | None]:
        self.decode_params[task] = reply["decode"]
        return reply["decode"], reply.get("loaded") or loaded

    @contextlib.contextmanager
    def _admission(self):
        """At most ``AAT_MAX_QUEUE`` requests decoding or waiting in this front end."""
        if self._admitted >= self.settings.max_queue:
            raise overloaded(f"the queue is full ({self.settings.max_queue} requests, "
                             "AAT_MAX_QUEUE); retry later")
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    # -- counting --------------------------------------------------------------------------------
    def _record(self, task: str | None, outcome: str | None, seconds: float | None,
                rejection: str | None) -> None:
        self._records.append([task, outcome, seconds, rejection])
        if len(self._records) >= FLUSH_AT:
            self._flush()
            if len(self._records) >= KEEP_AT_MOST:  # not connected: the oldest are dropped
                del self._records[:FLUSH_AT]

    def _flush(self) -> None:
        if self._records and self.connected:
            self.caller.notify({"op": "observe", "records": self._records})
            self._records = []

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self._flush()
