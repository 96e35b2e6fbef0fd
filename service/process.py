"""Process-wide choices of a serving process (the one-process service, the model process, each
front end): its event loop and uvicorn's options, and its start-up heap kept out of the garbage
collector's walks.
Choices of any process that serves HTTP, not of the model's runtime (``service.runtime``)."""

from __future__ import annotations

import gc
from typing import Any

from aat_serve.service.http_protocol import http_protocol
from aat_serve.service.one_write import one_write_protocol
from aat_serve.service.settings import Settings

GRACEFUL_SHUTDOWN_S = 30
"""How long a stopping process may take to finish the requests it holds."""


def event_loop() -> str:
    """uvicorn's ``loop``: uvloop when installed (a dependency except on Windows), else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def server_options(settings: Settings, parser: str | None = None) -> dict[str, Any]:
    """uvicorn's options for a serving process: our JSON logs (uvicorn's logging config and
    access log off), the graceful shutdown, the event loop and, for a process that takes HTTP
    (``parser``: ``resolve_parser``'s choice), the guarded protocol: the request-head timeout
    and JSON bodies for parser errors (service/http_protocol.py), one write per response so a
    replica killed mid-response never leaves a head without its body that nginx could not
    retry (service/one_write.py)."""
    options: dict[str, Any] = dict(log_config=None, log_level=settings.log_level,
                                   access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                   loop=event_loop())
    if parser is not None:
        options["http"] = one_write_protocol(http_protocol(settings.header_timeout_s, parser))
    return options


def freeze_heap() -> None:
    """Put every object alive now (the imported modules, the backbone, the app) out of the
    cyclic garbage collector's reach, for the life of the process. A full collection walked
    that whole heap and paused every thread for 45 to 130 ms, a few times a minute under load:
    the p99 of a task mix went from ~140 to ~230 ms on the 2-core CPU (docs/benchmarks.md,
    "Request path"). After this a full collection takes ~4 ms. ``aat serve`` calls it once,
    after building the app and before serving; objects are still freed by reference
    counting, and later cycles are still collected."""
    gc.collect()
    gc.freeze()
