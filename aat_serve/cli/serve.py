"""``aat serve``: run the HTTP service (settings from ``AAT_*``; flags override them)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from aat_serve.service.app import create_app
    from aat_serve.service.http_protocol import resolve_parser
    from aat_serve.service.logs import configure_logging
    from aat_serve.service.process import server_options
    from aat_serve.service.runtime import (
        freeze_heap,
        load_backbone,
        tune_process,
        with_embedded_defaults,
    )
    from aat_serve.service.settings import load_settings

    settings = load_settings(host=args.host, port=args.port, checkpoint=args.checkpoint,
                             bundle_dir=args.bundle_dir, log_level=args.log_level,
                             demo=args.demo, front_ends=args.front_ends)
    configure_logging(settings.log_level)
    settings = with_embedded_defaults(settings)
    parser = resolve_parser(settings.http_parser)  # a forced parser not installed stops here
    malloc_tuned = tune_process(settings)
    # Load the backbone before binding the port: a bad checkpoint stops start-up right here.
    checkpoint = load_backbone(settings)
    if settings.front_ends:
        from aat_serve.service.frontend.supervisor import serve_split

        log.info("serving with front ends", extra={
            "host": settings.host, "port": settings.port, "front_ends": settings.front_ends,
            "checkpoint": str(settings.checkpoint), "http_parser": parser})
        return serve_split(settings, checkpoint)
    app = create_app(settings, checkpoint=checkpoint)
    freeze_heap()  # full garbage collections no longer walk the start-up heap (p99 pauses)
    log.info("serving", extra={"host": settings.host, "port": settings.port,
                               "checkpoint": str(settings.checkpoint),
                               "bundle_dir": str(settings.bundle_dir),
                               "management": settings.management_enabled,
                               "http_parser": parser,
                               "keep_freed_memory": malloc_tuned,
                               "api_token": settings.api_token is not None})
    # uvloop and httptools (dependencies but on Windows) make the event loop's share of each
    # request cheaper; the guards and JSON answers are the same with h11 (AAT_HTTP_PARSER).
    uvicorn.run(app, host=settings.host, port=settings.port, **server_options(settings, parser))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="run the HTTP classification service",
        description="Serve /classify/{task} for every task bundle in the store. Every setting "
                    "comes from an AAT_* environment variable (AAT_CHECKPOINT, AAT_BUNDLE_DIR, "
                    "AAT_ADMIN_TOKEN, AAT_API_TOKEN, AAT_DEVICE, AAT_DTYPE, AAT_MAX_BATCH, "
                    "AAT_MAX_WAIT_MS, AAT_MAX_QUEUE, AAT_REQUEST_TIMEOUT_S, AAT_MAX_AUDIO_MB, "
                    "AAT_MAX_AUDIO_SECONDS, AAT_MAX_BUNDLE_MB, AAT_HEADER_TIMEOUT_S, "
                    "AAT_HTTP_PARSER, AAT_BODY_TIMEOUT_S, AAT_BODY_TOTAL_TIMEOUT_S, "
                    "AAT_MAX_TASKS, AAT_DEVICE_TASK_MB, AAT_HOST_CACHE_MB, AAT_PINNED_TASKS, "
                    "AAT_PRELOAD, AAT_REFRESH_S, AAT_INFERENCE_THREADS, AAT_SWITCH_INTERVAL_MS, "
                    "AAT_KEEP_FREED_MEMORY, AAT_FRONT_ENDS, AAT_LOG_LEVEL, ...); these flags "
                    "override them.")
    p.add_argument("--host", help="address to bind (AAT_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (AAT_PORT, default 8000)")
    p.add_argument("--checkpoint", type=Path,
                   help="backbone: AST/SSAST .pth or Hugging Face directory (AAT_CHECKPOINT; "
                        "default: the embedded demo backbone, when built)")
    p.add_argument("--bundle-dir", type=Path,
                   help="bundle store directory, shared by replicas (AAT_BUNDLE_DIR)")
    p.add_argument("--demo", action=argparse.BooleanOptionalAction, default=None,
                   help="serve the demo tasks (digits, ...) read-only beside the store's own; "
                        "a store task of the same name wins (AAT_DEMO; default: on with the "
                        "demo backbone, off with another)")
    p.add_argument("--front-ends", type=int, metavar="N",
                   help="HTTP front-end processes beside one model process (AAT_FRONT_ENDS, "
                        "default 0: one process does all; several on a many-core GPU host)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   help="log level (AAT_LOG_LEVEL, default info)")
    p.set_defaults(func=run)
