"""``aat``: one entry point; each subcommand lives in its own module under ``cli/``.

A subcommand module defines ``register(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returning an exit status).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys

from aat_serve.adapters.errors import AATError
from aat_serve.cli.errors import report_error

# Order is the order in ``aat --help``. Modules that are not present are skipped.
SUBCOMMAND_MODULES = (
    "aat_serve.cli.predict",
    "aat_serve.cli.bundle",
    "aat_serve.cli.methods",
    "aat_serve.cli.train",
    "aat_serve.cli.serve",
    "aat_serve.cli.bench",
    "aat_serve.cli.demo",
    "aat_serve.cli.export",
)


def package_version() -> str:
    """The installed aat-serve version (``unknown`` when run from an uninstalled tree)."""
    try:
        return importlib.metadata.version("aat-serve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aat",
        description="Serve many audio classification tasks from one frozen Audio Spectrogram "
                    "Transformer with AAT adapters.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"aat {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # HTTP clients log one line per request at INFO (benchmarks, client)
        for noisy in ("httpx", "httpcore"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AATError as e:
        return report_error(e, bool(getattr(args, "json", False)))
    except BrokenPipeError:
        # The reader went away (`aat bundle inspect FILE | head`): stop quietly, as Unix tools
        # do, with the shell's SIGPIPE status; stdout goes to /dev/null so that Python's own
        # flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # e.g. an unwritable output: JSON too when --json was asked for
        if not getattr(args, "json", False):
            raise
        return report_error(e, True)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
