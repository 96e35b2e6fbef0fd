"""Request bodies: content types, size limits while streaming, and the multipart ``file`` field.

A body is refused with 413 from its ``Content-Length`` before it is read, or as soon as the
streamed bytes pass the limit, so an oversized upload never sits in memory. Reading is async:
a slow or stalled client holds only its own request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from aat_serve.service.errors import ErrorType, ServiceError, bad_request, too_large

RAW_AUDIO_TYPES = ("audio/*", "application/octet-stream")
MULTIPART = "multipart/form-data"


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def check_content_encoding(request: Request) -> None:
    """415 unless the body is unencoded: ``Content-Encoding`` absent or only ``identity``."""
    raw = request.headers.get("content-encoding")
    if raw is None:
        return
    codings = [c.strip().lower() for c in raw.split(",")]
    if any(c not in ("identity", "") for c in codings):
        raise ServiceError(ErrorType.UNSUPPORTED_MEDIA_TYPE,
                           f"unsupported Content-Encoding {raw.strip()!r}; send the body "
                           "unencoded (identity)", {"Accept-Encoding": "identity"})


def check_media_type(request: Request, *, audio: bool) -> str:
    """``raw`` or ``multipart``, or 415 naming what is accepted.

    Audio needs a Content-Type; a bundle without one is read as ``application/octet-stream``
    (RFC 9110 8.3 lets the recipient assume it; ``curl -T`` sends none).
    """
    check_content_encoding(request)
    mt = media_type(request)
    if mt == MULTIPART:
        return "multipart"
    if mt == "application/octet-stream" or (audio and mt.startswith("audio/")):
        return "raw"
    if not audio and "content-type" not in request.headers:
        return "raw"
    accepted = ("audio/* (e.g. audio/wav), application/octet-stream or multipart/form-data "
                "with a 'file' field") if audio else (
                "application/octet-stream or multipart/form-data with a 'file' field")
    raise ServiceError(ErrorType.UNSUPPORTED_MEDIA_TYPE,
                       f"unsupported Content-Type {mt or '(none)'!r}; send {accepted}")


async def read_limited(request: Request, limit: int, what: str, setting: str) -> bytes:
    """The whole body, or 413 once it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise bad_request(f"invalid Content-Length {declared!r}") from None
        if n > limit:
            raise too_large(what, n, limit, setting)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(what, None, limit, setting)
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request(f"the {what} is incomplete: the client disconnected after {size} "
                          "bytes") from None
    return b"".join(chunks)


async def file_from_multipart(request: Request, body: bytes) -> bytes:
    """The bytes of the ``file`` field of a multipart body (already read and size-checked)."""

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise bad_request(f"malformed multipart body: {e.message}") from None
    try:
        part = form.get("file")
        if part is None:
            raise bad_request("multipart body has no 'file' field")
        if not isinstance(part, UploadFile):
            raise bad_request("multipart field 'file' must be a file upload")
        return await part.read()
    finally:
        await form.close()


async def read_payload(request: Request, kind: str, limit: int, what: str, setting: str
                       ) -> bytes:
    """Body bytes of a raw or multipart (``file`` field) request; 400 when empty."""
    body = await read_limited(request, limit, what, setting)
    if kind == "multipart":
        body = await file_from_multipart(request, body)
    if not body:
        raise bad_request(f"the {what} is empty (0 bytes)")
    return body
