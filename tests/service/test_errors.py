"""The error table: every type keeps its status, statuses come from classes (never from message
text), and every type is documented in the OpenAPI description."""

from __future__ import annotations

import pytest

from aat_serve.adapters.errors import (
    AATError,
    AudioError,
    AudioTooLongError,
    BackboneMismatchError,
    BundleError,
    CheckpointError,
    ConfigError,
    SlotsFullError,
    UnknownTaskError,
)
from aat_serve.adapters.features import load_audio
from aat_serve.service.errors import (
    ErrorType,
    ServiceError,
    error_response,
    from_aat_error,
    http_error_response,
)
from tests.service.helpers import wav_bytes

# The statuses clients rely on: changing one is an API change, not a refactor.
PINNED = {
    "invalid_request": 400, "invalid_audio": 400, "invalid_task_name": 400,
    "unauthorized": 401, "management_disabled": 403, "forbidden": 403,
    "unknown_task": 404, "not_found": 404, "method_not_allowed": 405, "request_timeout": 408,
    "backbone_mismatch": 409, "payload_too_large": 413, "audio_too_long": 413,
    "unsupported_media_type": 415, "invalid_bundle": 422, "headers_too_large": 431,
    "internal_error": 500, "task_failed": 500,
    "overloaded": 503, "not_ready": 503, "task_changed": 503, "timeout": 504,
    "slots_full": 507, "http_error": None,
}


def test_every_error_type_keeps_its_status():
    assert {k.value: k.status for k in ErrorType} == PINNED
    assert ErrorType("audio_too_long") is ErrorType.AUDIO_TOO_LONG
    assert ErrorType.AUDIO_TOO_LONG.status != ErrorType.INVALID_AUDIO.status


def test_audio_too_long_status_comes_from_the_class_not_the_message():
    reworded = from_aat_error(AudioTooLongError("the clip exceeds what we accept"))
    assert (reworded.status, reworded.type) == (413, "audio_too_long")
    assert reworded.message == "the clip exceeds what we accept"
    # differs: a plain AudioError is 400 whatever its message says
    for text in ("x.wav is too long: 12 s", "longer than the limit"):
        plain = from_aat_error(AudioError(text))
        assert (plain.status, plain.type, plain.message) == (400, "invalid_audio", text)


def test_decoding_raises_audio_too_long_by_class():
    with pytest.raises(AudioTooLongError):
        load_audio(wav_bytes(0.3, sr=8000), sample_rate=8000, max_duration_s=0.25)
    w = load_audio(wav_bytes(0.2, sr=8000), sample_rate=8000, max_duration_s=0.25)
    assert w.numel() == 1600


@pytest.mark.parametrize(("error", "expected"), [
    (UnknownTaskError("unknown task 'x'"), (404, "unknown_task")),
    (BackboneMismatchError("other backbone"), (409, "backbone_mismatch")),
    (BundleError("bad shape"), (422, "invalid_bundle")),
    (SlotsFullError("no slot"), (507, "slots_full")),
    (ConfigError("bad value"), (400, "invalid_request")),
])
def test_model_errors_map_by_class(error, expected):
    err = from_aat_error(error)
    assert (err.status, err.type, err.message) == (*expected, str(error))


@pytest.mark.parametrize("error", [CheckpointError("secret path"), AATError("secret")])
def test_unmapped_model_errors_are_internal_and_hide_their_message(error):
    err = from_aat_error(error)
    assert (err.status, err.type, err.message) == (500, "internal_error", "internal error")


def test_responses_take_their_status_from_the_table():
    r = error_response(ErrorType.TASK_CHANGED, "retry", {"Retry-After": "0"})
    assert r.status_code == 503 and r.headers["retry-after"] == "0"
    assert r.body == b'{"error":{"type":"task_changed","message":"retry"}}'
    err = ServiceError(ErrorType.SLOTS_FULL, "full")
    assert (err.status, err.type) == (507, "slots_full")
    framework = http_error_response(418, "teapot")
    assert framework.status_code == 418
    assert framework.body == b'{"error":{"type":"http_error","message":"teapot"}}'
    with pytest.raises(ValueError, match="http_error"):
        ServiceError(ErrorType.HTTP_ERROR, "no status of its own")


def test_every_error_type_is_documented_in_openapi(make_app):
    spec = make_app().openapi()
    description = spec["info"]["description"]
    for k in ErrorType:
        status = str(k.status) if k.status is not None else "the framework's"
        assert f"| `{k.value}` | {status} |" in description, k
    # each documented route status names every type answered with that status, and no other
    documented = 0
    for ops in spec["paths"].values():
        for op in ops.values():
            for code, resp in op["responses"].items():
                if code in ("200", "201"):
                    continue
                documented += 1
                for k in ErrorType:
                    assert (f"`{k.value}`" in resp["description"]) == (str(k.status) == code)
    assert documented > 20
