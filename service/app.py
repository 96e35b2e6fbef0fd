"""``create_app()``: the FastAPI application with its lifespan, error handlers and middleware.

The lifespan loads the backbone (a failure stops start-up), builds the ``Service`` and starts
loading bundles and warming up in the background; ``/readyz`` turns 200 when that is done.
Every error, including unknown routes (404), wrong methods (405) and invalid parameters, is
answered as ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aat_serve.adapters.checkpoints import LoadedCheckpoint
from aat_serve.adapters.errors import AATError
from aat_serve.service.api import answer_classify, router
from aat_serve.service.auth import require_api_token
from aat_serve.service.body_timeout import BodyTimeoutMiddleware
from aat_serve.service.docs_ui import install_docs
from aat_serve.service.engine_server import EngineServer
from aat_serve.service.errors import (
    ErrorType,
    ServiceError,
    client_error,
    error_response,
    error_types_markdown,
    http_error_response,
)
from aat_serve.service.fast_path import ServiceApp, classify_endpoint
from aat_serve.service.logs import RequestContextMiddleware
from aat_serve.service.runtime import Service, load_backbone, with_embedded_defaults
from aat_serve.service.settings import Settings, load_settings

DESCRIPTION = """\
One frozen Audio Spectrogram Transformer serves many audio classification tasks; each task is a
small bundle of AAT adapters and a head. Requests of different tasks share a batch.

Every error has the body `{"error": {"type": ..., "message": ...}}`. Set `AAT_API_TOKEN` to
require `Authorization: Bearer <token>` on classification and listing; task management
(`PUT`/`DELETE /tasks/{task}`) is off (403) unless `AAT_ADMIN_TOKEN` is set.

Error types, each always answered with the same status:

""" + error_types_markdown() + "\n"


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} parameter {loc[-1]!r}" if len(loc) >= 2 else ".".join(loc)
        parts.append(f"{where}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _count(request: Request, type_: str) -> None:
    svc = getattr(request.app.state, "service", None)
    if svc is not None:
        svc.metrics.rejections.labels(type_).inc()


def client_error_response(request: Request, exc: Exception) -> Response:
    """The answer to ``exc`` raised while handling ``request``: a ``ServiceError``'s or a model
    error's own (counted as a rejection of its type); anything else, and a model error that is
    not the client's, is re-raised (logged with the request id, answered 500 by the
    middleware). The exception handlers and the classify fast path both answer with this."""
    err = client_error(exc)
    if err is None:
        raise exc
    _count(request, err.type)
    return err.response()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError):
        return client_error_response(request, exc)

    @app.exception_handler(AATError)
    async def _aat_error(request: Request, exc: AATError):
        return client_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        _count(request, ErrorType.INVALID_REQUEST.value)
        return error_response(ErrorType.INVALID_REQUEST, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            return error_response(ErrorType.NOT_FOUND,
                                  f"no route {request.method} {request.url.path}", headers)
        if exc.status_code == 405:
            return error_response(ErrorType.METHOD_NOT_ALLOWED,
                                  f"method {request.method} is not allowed on "
                                  f"{request.url.path}", headers)
        return http_error_response(exc.status_code, str(exc.detail), headers)


def _openapi_without_default_422(app: FastAPI) -> None:
    """Drop FastAPI's automatic 422 entries: invalid parameters are answered 400 here."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = original()
        for ops in spec.get("paths", {}).values():
            for op in ops.values():
                r422 = op.get("responses", {}).get("422", {})
                ref = str(r422.get("content", {}).get("application/json", {}).get("schema"))
                if "HTTPValidationError" in ref:
                    del op["responses"]["422"]
        schemas = spec.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi


def create_app(settings: Settings | None = None, *,
               checkpoint: LoadedCheckpoint | None = None, engine_socket: Path | None = None,
               front_ends: Any = None) -> FastAPI:
    """The application; ``checkpoint`` skips loading the backbone from ``settings``.

    With ``engine_socket``, the application also serves front-end processes on that Unix socket
    (``service.engine_server``); ``front_ends`` (``service.frontend.supervisor.FrontEnds``) is
    started once it listens, and stopped (their requests finished) before it closes."""
    settings = with_embedded_defaults(settings if settings is not None else load_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ckpt = checkpoint if checkpoint is not None else await asyncio.to_thread(
            load_backbone, settings)
        svc = await asyncio.to_thread(Service, settings, ckpt)
        svc.start()
        app.state.service = svc
        server = None if engine_socket is None else EngineServer(app, svc, engine_socket)
        app.state.engine_server = server
        try:
            if server is not None:
                await server.start()
            if front_ends is not None:
                await front_ends.start()
            yield
        finally:
            if front_ends is not None:
                await front_ends.stop()
            if server is not None:
                await server.stop()
            await svc.stop()

    app = ServiceApp(title="aat-serve", version="0.1.0", description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    install_error_handlers(app)
    app.include_router(router)
    install_docs(app)  # /docs and /redoc with their assets served here, not from a CDN
    _openapi_without_default_422(app)
    app.add_middleware(BodyTimeoutMiddleware, idle_s=settings.body_timeout_s,
                       total_s=settings.body_total_timeout_s)
    app.add_middleware(RequestContextMiddleware)
    # POST /classify/{task} with a plain query skips the framework's routing, dependency
    # solving and outer middleware (service/fast_path.py); the same two middlewares of ours
    # wrap it, in the same order as above.
    app.fast_classify = RequestContextMiddleware(BodyTimeoutMiddleware(
        classify_endpoint(answer_classify, require_api_token, client_error_response),
        idle_s=settings.body_timeout_s, total_s=settings.body_total_timeout_s))
    return app
