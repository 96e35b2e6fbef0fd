"""Bearer-token checks: an optional API token for classification and listing, an admin token
for management (off unless configured). Tokens are compared as SHA-256 digests in constant time.

Management without ``AAT_ADMIN_TOKEN`` answers 403 ``management_disabled`` rather than 404: the
routes exist and are documented, and the message tells the operator what to configure, while a
404 would read like "unknown task".
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from aat_serve.service.errors import ErrorType, ServiceError


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison (digests have equal length whatever the input)."""
    return hmac.compare_digest(_digest(given), _digest(expected))


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise ServiceError(ErrorType.UNAUTHORIZED,
                           "missing bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ServiceError(ErrorType.UNAUTHORIZED,
                           "malformed Authorization header: expected 'Bearer <token>'",
                           {"WWW-Authenticate": 'Bearer error="invalid_request"'})
    return token.strip()


def _invalid() -> ServiceError:
    return ServiceError(ErrorType.UNAUTHORIZED, "invalid bearer token",
                        {"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def require_api_token(request: Request) -> None:
    """Guard classification and listing when AAT_API_TOKEN is set (the admin token works too).
    A coroutine, so FastAPI runs it on the event loop instead of handing every request to a
    worker thread and back."""
    settings = request.app.state.settings
    if settings.api_token is None:
        return
    token = _bearer(request)
    ok = token_matches(token, settings.api_token)
    if settings.admin_token is not None:
        ok = token_matches(token, settings.admin_token) or ok
    if not ok:
        raise _invalid()


async def require_admin_token(request: Request) -> None:
    """Guard PUT/DELETE /tasks/{task}: 403 when management is off, 401/403 on bad tokens."""
    settings = request.app.state.settings
    if settings.admin_token is None:
        raise ServiceError(ErrorType.MANAGEMENT_DISABLED,
                           "task management is disabled: set AAT_ADMIN_TOKEN to enable "
                           "PUT and DELETE /tasks/{task}")
    token = _bearer(request)
    if token_matches(token, settings.admin_token):
        return
    if settings.api_token is not None and token_matches(token, settings.api_token):
        raise ServiceError(ErrorType.FORBIDDEN, "this token may classify but not manage tasks",
                           {"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
    raise _invalid()
