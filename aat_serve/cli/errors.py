"""How the CLI reports a failure: one ``error: ...`` line on stderr, or with ``--json`` the
API's error body ``{"error": {"type", "message"}}`` on stdout; either way a non-zero exit.

The ``type`` names are the service's (``docs/service.md``), chosen by the error's class, never
by its message text, so a script reads the same body from the CLI and the API.
"""

from __future__ import annotations

import json
import sys

from aat_serve.adapters.errors import AATError
from aat_serve.adapters.errors import error_type as library_error_type


def error_type(e: BaseException) -> str:
    """The library's type name (``adapters.errors.ERROR_TYPES``), else ``invalid_request`` for
    another library error, ``io_error`` for a file system error, ``internal_error`` otherwise."""
    name = library_error_type(e)
    if name is not None:
        return name
    if isinstance(e, AATError):
        return "invalid_request"
    return "io_error" if isinstance(e, OSError) else "internal_error"


def error_body(e: BaseException) -> dict:
    """The API's error body for ``e``."""
    message = str(e) if isinstance(e, AATError) else f"{type(e).__name__}: {e}"
    return {"error": {"type": error_type(e), "message": message}}


def report_error(e: BaseException, as_json: bool) -> int:
    """Print ``e`` the way the command was asked to (text or ``--json``); return exit 1."""
    if as_json:
        print(json.dumps(error_body(e)), flush=True)
    else:
        print(f"error: {error_body(e)['error']['message']}", file=sys.stderr)
    return 1
