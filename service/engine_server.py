"""The model process's side of front-end mode: answer the front ends' calls on a Unix socket.

With ``AAT_FRONT_ENDS`` > 0, ``aat serve`` runs the model (engine, registry, task cache) in one
process and the HTTP front ends in others (``service.frontend``); the front ends parse HTTP,
check tokens, read and decode bodies and write the answers, and call this server for the rest
(frames: ``service.wire``):

- ``classify``: a decoded clip (float32 PCM at the task's rate) and the request's options; the
  answer is the response body, computed by the same ``classify_wave`` as in one process (windows,
  batching with every other front end's clips, aggregation, top-k). A call whose decode settings
  (sample rate, duration limit) are not the task's current ones, or that carries no clip, is
  answered with those settings instead: the front end decodes (again) and calls once more.
- ``http``: any other request, whole, run through this process's own application (management,
  listings, readiness, metrics, the docs), so every route behaves exactly as in one process.
- ``observe`` (a notice): the front ends' request outcomes and times, counted in this process's
  metrics, so ``/metrics`` is one catalogue for all processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
import torch

from aat_serve.service.api import task_label, valid_task
from aat_serve.service.classify import Options, classify_wave
from aat_serve.service.errors import ErrorType, ServiceError, client_error, not_ready
from aat_serve.service.runtime import Service
from aat_serve.service.wire import Frame, WireError, encode, read_frame

log = logging.getLogger(__name__)

OUTCOMES = frozenset({"ok", *(k.value for k in ErrorType)})
"""Outcome labels a front end may report (bounded, as in one process)."""


def decode_settings(sample_rate: int, max_duration_s: float) -> list[Any]:
    """What a front end needs to decode a task's audio, as sent on the wire."""
    return [sample_rate, max_duration_s]


def error_reply(e: BaseException, request_id: str | None) -> dict[str, Any]:
    """An error as a reply header: the client's error, or a logged ``internal_error``."""
    err = client_error(e)
    if err is None:
        log.error("front-end call failed", exc_info=e, extra={"request_id": request_id})
        err = ServiceError(ErrorType.INTERNAL_ERROR, f"internal error (request id {request_id})")
    return {"error": {"type": err.type, "message": err.message, "headers": err.headers}}


class EngineServer:
    """Serves ``app`` (the model process's application, its ``Service`` started) to the
    front-end processes on the Unix socket ``path`` (owner-only)."""

    def __init__(self, app: Any, service: Service, path: Path) -> None:
        self.app = app
        self.svc = service
        self.path = path
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    @property
    def connected(self) -> int:
        """Front ends connected now."""
        return len(self._connections)

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)
        log.info("engine socket open", extra={"path": str(self.path)})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in self._connections.values():
                writer.close()  # its reader then ends: the connection's task returns
            await asyncio.gather(*self._connections, return_exceptions=True)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One front end's connection: each call answered by a task of its own, in any order."""
        me = asyncio.current_task()
        self._connections[me] = writer
        calls: set[asyncio.Task] = set()
        try:
            while True:
                header, payload = await read_frame(reader)
                if "id" not in header:
                    self._notice(header)
                    continue
                call = asyncio.get_running_loop().create_task(
                    self._answer(writer, header, payload))
                calls.add(call)
                call.add_done_callback(calls.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the front end went away: its requests went with it
        except WireError as e:
            log.error("a front end sent a broken frame; closing its connection: %s", e)
        finally:
            for call in calls:
                call.cancel()
            writer.close()
            self._connections.pop(me, None)

    async def _answer(self, writer: asyncio.StreamWriter, header: dict[str, Any],
                      payload: bytes) -> None:
        op = header.get("op")
        try:
            if op == "classify":
                reply, body = await self.classify(header, payload)
            elif op == "http":
                reply, body = await self.http(header, payload)
            else:
                raise ServiceError(ErrorType.INVALID_REQUEST, f"unknown call {op!r}")
        except Exception as e:  # every call gets its answer; the connection stays
            reply, body = error_reply(e, header.get("request_id")), b""
        reply["id"] = header["id"]
        if not writer.is_closing():
            writer.writelines(encode(reply, body))

    # -- classify ------------------------------------------------------------------------------
    async def classify(self, h: dict[str, Any], payload: bytes) -> Frame:
        """The body of one classify request, or the task's decode settings when the call's
        are not those (or it carries no clip); ``loaded`` says a cold task was loaded. A call
        marked ``again`` is the same request's second (its lookup was counted once)."""
        svc = self.svc
        task = valid_task(h["task"])
        if not svc.ready:
            raise not_ready(svc.startup_error or not_ready().message)
        with svc.pager.in_flight(task):
            info, loaded = await svc.registry.resolve(task, again=bool(h.get("again")))
            cfg = svc.task_feature_config(info)
            reply: dict[str, Any] = {}
            if loaded is not None:
                reply["loaded"] = [loaded.source, loaded.seconds]
            wanted = decode_settings(cfg.sample_rate, cfg.max_duration_s)
            if h.get("decode") != wanted or not payload:
                reply["decode"] = wanted
                return reply, b""
            wave = torch.frombuffer(bytearray(payload), dtype=torch.float32)
            deadline = time.monotonic() + float(h["timeout_s"])
            admission = svc.engine.admit()
            try:
                out = await classify_wave(svc, task, info, cfg, wave, deadline, admission,
                                          Options(**h["options"]))
            finally:
                admission.release()
        reply["log"] = {k: out[k] for k in ("version", "queue_ms", "inference_ms",
                                            "batch_size", "windows")}
        return reply, orjson.dumps(out)

    # -- every other route ---------------------------------------------------------------------
    async def http(self, h: dict[str, Any], body: bytes) -> Frame:
        """Run one forwarded request through the application, as if it had come in here; its
        access log line is the front end's (with the fields the route added, ``log``)."""
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": h["method"], "scheme": "http",
            "path": h["path"], "raw_path": h["raw_path"].encode("latin-1"),
            "query_string": h["query"].encode("latin-1"), "root_path": "",
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in h["headers"]],
            "client": tuple(h["client"]) if h.get("client") else None, "server": None,
            "aat.forwarded": True, "state": {},
        }
        request = [{"type": "http.request", "body": body, "more_body": False}]
        never: asyncio.Future = asyncio.get_running_loop().create_future()

        async def receive() -> dict[str, Any]:
            if request:
                return request.pop()
            return await never  # the front end owns the client connection

        start: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        try:
            await self.app(scope, receive, send)
        finally:
            never.cancel()
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in start["headers"]]
        return ({"status": start["status"], "headers": headers,
                 "log": scope["state"].get("log", {})}, b"".join(chunks))

    # -- notices ---------------------------------------------------------------------------------
    def _notice(self, header: dict[str, Any]) -> None:
        if header.get("op") == "observe":
            try:
                self.observe(header["records"])
            except (KeyError, TypeError, ValueError) as e:
                log.error("a front end sent unreadable observations: %s", e)

    def observe(self, records: list[list[Any]]) -> None:
        """Count front-end requests: ``[task, outcome, seconds, rejection]`` each, as the
        one-process service counts them (requests by task and outcome, the time of answered
        ones, rejections by reason)."""
        m = self.svc.metrics
        for task, outcome, seconds, rejection in records:
            if outcome is not None and outcome in OUTCOMES and isinstance(task, str):
                label = task_label(self.svc, task)
                m.requests.labels(label, outcome).inc()
                if outcome == "ok" and seconds is not None:
                    m.request_seconds.labels(label).observe(float(seconds))
            if rejection is not None and rejection in OUTCOMES:
                m.rejections.labels(rejection).inc()


def options_header(opts: Options) -> dict[str, Any]:
    """``Options`` as sent on the wire (read back with ``Options(**...)``)."""
    return dataclasses.asdict(opts)

