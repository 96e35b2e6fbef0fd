"""Slowloris from its own process: hold N connections that trickle request-head bytes.

    python tests/service/slow_clients.py --port 8000 --connections 200 --max-seconds 60

Each connection sends a request line and then one header line every ``--interval`` seconds and
never ends its head. When the server closes one, its lifetime is recorded and a fresh one takes
its place, so N are held until stdin closes (or ``--max-seconds``, a bound). Prints ``ready`` once
the first N are open, and at the end one JSON line: lifetimes of the connections the server
closed, whether each got a 408 first, and the ages of those still open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time


async def _one(port: int, interval: float, stop: asyncio.Event, stats: dict,
               opened: asyncio.Event | None) -> bool:
    """One slow connection; True if the server closed it (False: stopped first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    stats["open"][id(writer)] = began
    if opened is not None:
        opened.set()
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        received = b""
        n = 0
        while not stop.is_set():
            try:
                data = await asyncio.wait_for(reader.read(65536), interval)
            except TimeoutError:
                n += 1
                writer.write(b"X-Slow-%d: %s\r\n" % (n, b"a" * 8))
                continue
            if not data:
                stats["closed"].append({"lifetime_s": round(time.monotonic() - began, 3),
                                        "response": received[:12].decode("latin-1")})
                return True
            received += data
        return False
    except (ConnectionError, OSError):
        stats["closed"].append({"lifetime_s": round(time.monotonic() - began, 3),
                                "response": "reset"})
        return True
    finally:
        stats["open"].pop(id(writer), None)
        writer.close()


async def _slot(port: int, interval: float, stop: asyncio.Event, stats: dict,
                opened: asyncio.Event) -> None:
    """Keeps one connection held: reopens it whenever the server closes it."""
    first: asyncio.Event | None = opened
    while not stop.is_set():
        try:
            await _one(port, interval, stop, stats, first)
        except (ConnectionError, OSError):
            stats["connect_errors"] += 1
            await asyncio.sleep(0.05)
        first = None


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    closed = loop.create_future()

    def readable() -> None:
        if not os.read(fd, 4096) and not closed.done():
            closed.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await closed
    finally:
        loop.remove_reader(fd)


async def _main(args: argparse.Namespace) -> dict:
    stop = asyncio.Event()
    stats: dict = {"closed": [], "open": {}, "connect_errors": 0}
    opened = [asyncio.Event() for _ in range(args.connections)]
    slots = [asyncio.create_task(_slot(args.port, args.interval, stop, stats, e))
             for e in opened]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 60)
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(_stdin_closed(), args.max_seconds)
    now = time.monotonic()
    ages = sorted(round(now - t, 3) for t in stats["open"].values())
    stop.set()
    await asyncio.wait(slots, timeout=args.interval + 5)
    lifetimes = [c["lifetime_s"] for c in stats["closed"]]
    return {"connections": args.connections, "closed_by_server": len(lifetimes),
            "max_lifetime_s": max(lifetimes, default=None),
            "min_lifetime_s": min(lifetimes, default=None),
            "answered_408": sum(c["response"].startswith("HTTP/1.1 408") for c in stats["closed"]),
            "open_at_stop": len(ages), "oldest_open_s": ages[-1] if ages else None,
            "connect_errors": stats["connect_errors"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--max-seconds", type=float, default=60.0)
    result = asyncio.run(_main(p.parse_args()))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
