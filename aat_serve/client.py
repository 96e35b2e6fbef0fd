"""A Python client for ``aat serve``: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from aat_serve.client import Client

    with Client("http://127.0.0.1:8000") as aat:
        result = aat.classify("digits", "seven.wav")
        print(result.top.label, result.top.score)

``audio`` is a path, bytes, a binary file object, or a NumPy array of samples (``(n,)`` or
``(n, channels)``) with its ``sample_rate``, sent as a float WAV. Results are typed records
(``Classification``, ``TaskSummary``, ...) that keep the whole JSON body in ``raw``.

The service's JSON errors (``{"error": {"type", "message"}}``) are raised as ``APIError``
subclasses carrying ``status``, ``type`` and ``message``. A 503 (queue full, starting up) is
retried, waiting as its ``Retry-After`` says (bounded by ``max_retry_wait_s``), up to
``retries`` times. Tokens come from the arguments or from ``AAT_API_TOKEN`` and
``AAT_ADMIN_TOKEN``. The client needs only ``httpx`` (and ``soundfile`` for arrays).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx

Audio = str | os.PathLike | bytes | bytearray | BinaryIO | Any
"""A path, the file's bytes, a binary file object, or a NumPy array (with ``sample_rate``)."""


# ---- errors -------------------------------------------------------------------------------

class APIError(Exception):
    """An error answer of the service: its HTTP ``status``, error ``type`` and ``message``."""

    def __init__(self, status: int, type_: str, message: str, request_id: str | None = None
                 ) -> None:
        super().__init__(f"{status} {type_}: {message}")
        self.status, self.type, self.message, self.request_id = status, type_, message, request_id


class BadRequest(APIError):
    """400: the audio or the request is invalid."""


class AuthError(APIError):
    """401 or 403: a token is missing or wrong, or management is off."""


class NotFound(APIError):
    """404: an unknown task."""


class Conflict(APIError):
    """409: a bundle trained on another backbone, or a task changed under the request."""


class PayloadTooLarge(APIError):
    """413: the audio or bundle is too large or too long."""


class UnsupportedMediaType(APIError):
    """415: a content type or encoding the service does not take."""


class InvalidBundle(APIError):
    """422: the bundle was refused; the message names the field and what is allowed."""


class Unavailable(APIError):
    """503: the queue is full or the service is not ready (retried before it is raised)."""


class Timeout(APIError):
    """504: the request did not finish within the service's deadline."""


class ServerError(APIError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest, 401: AuthError, 403: AuthError, 404: NotFound, 409: Conflict,
    413: PayloadTooLarge, 415: UnsupportedMediaType, 422: InvalidBundle, 503: Unavailable,
    504: Timeout}


def error_from(response: httpx.Response) -> APIError:
    """The typed error for a non-2xx answer (also when its body is not the JSON shape)."""
    try:
        err = response.json()["error"]
        type_, message = str(err["type"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        type_, message = "http_error", response.text[:500] or response.reason_phrase
    cls = _BY_STATUS.get(response.status_code,
                         ServerError if response.status_code >= 500 else APIError)
    return cls(response.status_code, type_, message, response.headers.get("x-request-id"))


# ---- results ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """One clip's answer: the top labels, the task version that computed it, timings."""

    task: str
    version: str
    multi_label: bool
    predictions: list[Prediction]
    duration_s: float
    raw: dict[str, Any] = field(repr=False)
    scored_s: float | None = None
    """Seconds of the audio that were scored (None from a service without windows)."""
    windows: int | None = None
    """Windows the audio was scored in."""

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    @classmethod
    def of(cls, body: dict[str, Any]) -> Classification:
        return cls(task=body["task"], version=body["version"], multi_label=body["multi_label"],
                   predictions=[Prediction(p["label"], p["score"]) for p in body["predictions"]],
                   duration_s=body["duration_s"], raw=body, scored_s=body.get("scored_s"),
                   windows=body.get("windows"))


@dataclass(frozen=True)
class TaskSummary:
    task: str
    version: str
    method: str
    labels: list[str]
    multi_label: bool
    resident: bool
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, body: dict[str, Any]) -> TaskSummary:
        return cls(task=body["task"], version=body["version"], method=body["method"],
                   labels=list(body["labels"]), multi_label=body["multi_label"],
                   resident=body["resident"], raw=body)


@dataclass(frozen=True)
class TaskDetail:
    task: str
    version: str
    resident: bool
    manifest: dict[str, Any]

    @classmethod
    def of(cls, body: dict[str, Any]) -> TaskDetail:
        return cls(body["task"], body["version"], body["resident"], body["manifest"])


@dataclass(frozen=True)
class Upload:
    task: str
    version: str
    previous_version: str | None
    created: bool
    unchanged: bool

    @classmethod
    def of(cls, body: dict[str, Any]) -> Upload:
        return cls(body["task"], body["version"], body.get("previous_version"),
                   body["created"], body["unchanged"])


# ---- requests, shared by both clients -----------------------------------------------------

def audio_bytes(audio: Audio, sample_rate: int | None = None) -> bytes:
    """The bytes to send for ``audio`` (a NumPy array becomes a float32 WAV)."""
    if isinstance(audio, bytes | bytearray):
        return bytes(audio)
    if isinstance(audio, str | os.PathLike):
        return Path(audio).read_bytes()
    if hasattr(audio, "read"):
        return audio.read()
    if hasattr(audio, "shape") and hasattr(audio, "dtype"):
        if sample_rate is None:
            raise ValueError("a NumPy array needs its sample_rate")
        import soundfile

        buf = io.BytesIO()
        soundfile.write(buf, audio, int(sample_rate), format="WAV", subtype="FLOAT")
        return buf.getvalue()
    raise TypeError(f"audio must be a path, bytes, a binary file or a NumPy array, not "
                    f"{type(audio).__name__}")


@dataclass(frozen=True)
class _Call:
    method: str
    path: str
    admin: bool = False
    content: bytes | None = None
    params: dict[str, Any] | None = None
    content_type: str | None = None


def _retry_wait(response: httpx.Response, cap: float) -> float:
    try:
        return min(cap, max(0.0, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return min(cap, 1.0)


class _Base:
    def __init__(self, base_url: str, api_token: str | None, admin_token: str | None,
                 retries: int, max_retry_wait_s: float) -> None:
        if retries < 0 or max_retry_wait_s < 0:
            raise ValueError("retries and max_retry_wait_s must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_token = api_token if api_token is not None else os.environ.get("AAT_API_TOKEN")
        self.admin_token = (admin_token if admin_token is not None
                            else os.environ.get("AAT_ADMIN_TOKEN"))
        self.retries, self.max_retry_wait_s = retries, max_retry_wait_s

    def _headers(self, call: _Call) -> dict[str, str]:
        token = self.admin_token if call.admin else self.api_token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if call.content_type:
            headers["Content-Type"] = call.content_type
        return headers

    @staticmethod
    def _classify_call(task: str, audio: Audio, sample_rate: int | None, top_k: int) -> _Call:
        return _Call("POST", f"/classify/{task}", content=audio_bytes(audio, sample_rate),
                     params={"top_k": top_k}, content_type="application/octet-stream")

    @staticmethod
    def _upload_call(name: str, bundle: str | os.PathLike | bytes) -> _Call:
        data = bytes(bundle) if isinstance(bundle, bytes | bytearray) else Path(bundle).read_bytes()
        return _Call("PUT", f"/tasks/{name}", admin=True, content=data,
                     content_type="application/octet-stream")


class Client(_Base):
    """Blocking client; use as a context manager or call ``close()``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_token: str | None = None,
                 admin_token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 max_retry_wait_s: float = 10.0, transport: httpx.BaseTransport | None = None
                 ) -> None:
        super().__init__(base_url, api_token, admin_token, retries, max_retry_wait_s)
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def _send(self, call: _Call) -> Any:
        for attempt in range(self.retries + 1):
            r = self._http.request(call.method, call.path, content=call.content,
                                   params=call.params, headers=self._headers(call))
            if r.status_code != 503 or attempt == self.retries:
                break
            time.sleep(_retry_wait(r, self.max_retry_wait_s))
        if r.is_success:
            return r.json()
        raise error_from(r)

    def classify(self, task: str, audio: Audio, *, sample_rate: int | None = None,
                 top_k: int = 5) -> Classification:
        return Classification.of(self._send(self._classify_call(task, audio, sample_rate, top_k)))

    def tasks(self) -> list[TaskSummary]:
        return [TaskSummary.of(t) for t in self._send(_Call("GET", "/tasks"))["tasks"]]

    def task(self, name: str) -> TaskDetail:
        return TaskDetail.of(self._send(_Call("GET", f"/tasks/{name}")))

    def upload(self, name: str, bundle: str | os.PathLike | bytes) -> Upload:
        return Upload.of(self._send(self._upload_call(name, bundle)))

    def delete(self, name: str) -> str:
        """Remove a task; returns the version that was active."""
        return self._send(_Call("DELETE", f"/tasks/{name}", admin=True))["version"]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same calls for asyncio; use ``async with`` or ``await close()``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_token: str | None = None,
                 admin_token: str | None = None, timeout: float = 60.0, retries: int = 3,
                 max_retry_wait_s: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_token, admin_token, retries, max_retry_wait_s)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout,
                                       transport=transport)

    async def _send(self, call: _Call) -> Any:
        for attempt in range(self.retries + 1):
            r = await self._http.request(call.method, call.path, content=call.content,
                                         params=call.params, headers=self._headers(call))
            if r.status_code != 503 or attempt == self.retries:
                break
            await asyncio.sleep(_retry_wait(r, self.max_retry_wait_s))
        if r.is_success:
            return r.json()
        raise error_from(r)

    async def classify(self, task: str, audio: Audio, *, sample_rate: int | None = None,
                       top_k: int = 5) -> Classification:
        call = self._classify_call(task, audio, sample_rate, top_k)
        return Classification.of(await self._send(call))

    async def tasks(self) -> list[TaskSummary]:
        return [TaskSummary.of(t) for t in (await self._send(_Call("GET", "/tasks")))["tasks"]]

    async def task(self, name: str) -> TaskDetail:
        return TaskDetail.of(await self._send(_Call("GET", f"/tasks/{name}")))

    async def upload(self, name: str, bundle: str | os.PathLike | bytes) -> Upload:
        return Upload.of(await self._send(self._upload_call(name, bundle)))

    async def delete(self, name: str) -> str:
        return (await self._send(_Call("DELETE", f"/tasks/{name}", admin=True)))["version"]

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
