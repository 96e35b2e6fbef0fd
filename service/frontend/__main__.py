"""``python -m aat_serve.service.frontend --fd N --engine PATH``: one front-end process.

Started by the model process (``service.frontend.supervisor``), never by hand: it accepts on
the inherited listening socket ``N`` and calls the model process at ``PATH``; its settings come
from ``AAT_FRONT_END_SETTINGS``. It exits when its connection to the model process ends.
"""

from __future__ import annotations

import argparse
import os
import socket


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from aat_serve.service.frontend.app import FrontEnd
    from aat_serve.service.frontend.supervisor import SETTINGS_ENV
    from aat_serve.service.http_protocol import resolve_parser
    from aat_serve.service.logs import configure_logging
    from aat_serve.service.process import freeze_heap, server_options
    from aat_serve.service.settings import Settings

    p = argparse.ArgumentParser(prog="python -m aat_serve.service.frontend")
    p.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    p.add_argument("--engine", required=True, help="the model process's Unix socket")
    args = p.parse_args(argv)
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.log_level)
    listener = socket.socket(fileno=args.fd)
    servers: list[uvicorn.Server] = []
    app = FrontEnd(settings, args.engine, on_lost=lambda: _exit(servers))
    config = uvicorn.Config(app, lifespan="on",
                            **server_options(settings, resolve_parser(settings.http_parser)))
    server = uvicorn.Server(config)
    servers.append(server)
    freeze_heap()
    server.run(sockets=[listener])
    return 0


def _exit(servers: list) -> None:
    for server in servers:
        server.should_exit = True


if __name__ == "__main__":
    raise SystemExit(main())
