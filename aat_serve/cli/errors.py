"""How the CLI reports a failure: one ``error: ...`` line on stderr, or with ``--json`` the
API's error body ``{"error": {"type", "message"}}`` on stdout; either way a non-zero exit.

The ``type`` names are the service's (``docs/service.md``), chosen by the error's class, never
by its message text, so a script reads the same body from the CLI and the API.
"""

from __future__ import annotations

import json
import sys

from aat_serve.adapters.errors import (
    AATError,
    AudioError,
    AudioTooLongError,
    BackboneMismatchError,
    BundleError,
    CheckpointError,
    SlotsFullError,
    UnknownTaskError,
)

ERROR_TYPES: tuple[tuple[type[BaseException], str], ...] = (
    (AudioTooLongError, "audio_too_long"),
    (AudioError, "invalid_audio"),
    (UnknownTaskError, "unknown_task"),
    (BackboneMismatchError, "backbone_mismatch"),
    (BundleError, "invalid_bundle"),
    (CheckpointError, "invalid_checkpoint"),
    (SlotsFullError, "slots_full"),
    (AATError, "invalid_request"),
    (OSError, "io_error"),
)
"""First match wins: subclasses before their bases."""


def error_type(e: BaseException) -> str:
    return next((name for cls, name in ERROR_TYPES if isinstance(e, cls)), "internal_error")


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
