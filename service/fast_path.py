"""``POST /classify/{task}`` without the framework's per-request machinery.

Profiling the demo server under ``hey -c 32`` (docs/benchmarks.md, "Request path") showed the
event-loop thread saturated, and a third of its time in what FastAPI and Starlette do around the
endpoint: five middleware layers, routing over every route, dependency solving, query
validation through pydantic. The classify endpoint needs none of that for a well-formed
request, so ``ServiceApp`` answers it directly:

- the same endpoint body (``api.answer_classify``), the same token check, the same error
  answers (``errors.service_error_response``/``aat_error_response``, what the app's exception
  handlers return), wrapped in the same two middlewares of ours (request id and access log;
  body timeouts);
- only when the query string is one this module can read exactly as FastAPI would
  (``classify_options``): known parameters, each at most once, in a plain form, in range.
  Anything else (an unknown or repeated parameter, ``top_k=05``, ``windows=yes``, a value out
  of range) goes through FastAPI unchanged, which accepts it or answers its 400 exactly as
  before. Nothing is decided differently; the fast path only skips work.

Every other route, method and the lifespan go through FastAPI as before.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request

from aat_serve.service.classify import Options

PREFIX = "/classify/"

_TOP_K = re.compile(r"[1-9][0-9]{0,4}")
_HOP_S = re.compile(r"[0-9]{1,4}(\.[0-9]{1,9})?")
_AGGREGATES = ("mean", "max", "first")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}

ASGIApp = Callable[[dict, Any, Any], Awaitable[None]]


def classify_options(query_string: bytes) -> Options | None:
    """The request's ``Options`` when every query parameter is one FastAPI would read the same
    way (and accept); None for anything else, which FastAPI then answers itself."""
    if not query_string:
        return Options()
    try:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    except ValueError:
        return None
    values: dict[str, Any] = {}
    for key, raw in pairs:
        if key in values:
            return None
        value = _parse(key, raw)
        if value is None:
            return None
        values[key] = value
    return Options(**values)


def _parse(key: str, raw: str) -> Any:
    if key == "top_k" and _TOP_K.fullmatch(raw):
        value = int(raw)
        return value if value <= 10_000 else None
    if key == "hop_s" and _HOP_S.fullmatch(raw):
        value = float(raw)
        return value if 0 < value <= 3600 else None
    if key == "aggregate" and raw in _AGGREGATES:
        return raw
    if key == "windows":
        return _BOOLS.get(raw)
    return None


class ServiceApp(FastAPI):
    """The application: FastAPI, with ``POST /classify/{task}`` answered by ``fast_classify``
    (set by ``create_app``) when the service is up and the query is plain."""

    fast_classify: ASGIApp | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        fast = self.fast_classify
        if (fast is not None and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].startswith(PREFIX) and not scope.get("root_path")
                and getattr(self.state, "service", None) is not None):
            opts = classify_options(scope.get("query_string", b""))
            if opts is not None:
                scope["app"] = self
                scope["aat.classify_options"] = opts
                await fast(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def classify_endpoint(answer: Callable[[str, Request, Any, Options], Awaitable[Any]],
                      guard: Callable[[Request], Awaitable[None]],
                      on_error: Callable[[Request, Exception], Any]) -> ASGIApp:
    """The bare ASGI endpoint: ``guard`` (the token check), then ``answer`` (the route's own
    body); an error it raises becomes ``on_error``'s response (the app's handlers' answer)."""

    async def endpoint(scope: dict, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        svc = scope["app"].state.service
        try:
            await guard(request)
            response = await answer(scope["path"][len(PREFIX):], request, svc,
                                    scope["aat.classify_options"])
        except Exception as e:  # on_error re-raises what is not a client error
            response = on_error(request, e)
        await response(scope, receive, send)

    return endpoint
