"""Process-wide choices of a serving process (the one-process service, the model process, each
front end): its event loop, and its start-up heap kept out of the garbage collector's walks.
Choices of any process that serves HTTP, not of the model's runtime (``service.runtime``)."""

from __future__ import annotations

import gc


def event_loop() -> str:
    """uvicorn's ``loop``: uvloop when installed (a dependency except on Windows), else asyncio."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


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
