"""One small exception hierarchy for the model package.

Every error names the offending thing and what was expected. ``ERROR_TYPES`` gives each class
its stable type name, the ``type`` of the API's error body; the service maps names to HTTP
statuses (``service/errors.py``) and the CLI prints the same names with ``--json``. Nothing
here knows about HTTP.
"""

from __future__ import annotations


class AATError(Exception):
    """Base class of every error raised on purpose by aat-serve."""


class ConfigError(AATError, ValueError):
    """A configuration value is out of range or inconsistent with another."""


class CheckpointError(AATError, ValueError):
    """A backbone checkpoint cannot be read or does not match the expected layout."""


class AudioError(AATError, ValueError):
    """Audio could not be decoded, or decoded to something unusable (empty, NaN, too long)."""


class AudioTooLongError(AudioError):
    """Audio is longer than the allowed duration (declared by its header or found decoding).

    Its own class so that callers (the service answers 413) tell it apart from other unusable
    audio by type, never by the wording of the message.
    """


class BundleError(AATError, ValueError):
    """A task bundle is malformed: wrong format, manifest, tensor names, shapes or values."""


def show_value(value: object, limit: int = 60) -> str:
    """``value`` for an error message: ``repr``, with long text cut and its length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:limit]}...{size}"


class BundleFieldError(BundleError):
    """One field of a bundle (a manifest value, or a tensor's values) is out of its range.

    ``field`` is the field's dotted path (``features.target_length``, ``labels[3]``,
    ``tensors.head.fc.weight``), ``value`` what the bundle holds there and ``allowed`` what
    would be accepted; the message names all three. A subclass of ``BundleError``, so the
    service answers it as any invalid bundle (422 ``invalid_bundle``).
    """

    def __init__(self, field: str, value: object, allowed: str, message: str | None = None,
                 ) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(message or
                         f"bundle field {field} is {show_value(value)}; allowed: {allowed}")


class BackboneMismatchError(BundleError):
    """A task bundle was trained on a different backbone than the one it is applied to."""


class SlotsFullError(AATError, RuntimeError):
    """No free adapter slot is left in a multi-task model."""


class UnknownTaskError(AATError, KeyError):
    """A task name is not known to the registry or model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown task"


ERROR_TYPES: tuple[tuple[type[AATError], str], ...] = (
    (AudioTooLongError, "audio_too_long"),
    (AudioError, "invalid_audio"),
    (UnknownTaskError, "unknown_task"),
    (BackboneMismatchError, "backbone_mismatch"),
    (BundleError, "invalid_bundle"),
    (CheckpointError, "invalid_checkpoint"),
    (SlotsFullError, "slots_full"),
    (ConfigError, "invalid_request"),
)
"""Each error class's type name, most specific first: the first match names an error."""


def error_type(e: BaseException) -> str | None:
    """The type name of ``e`` by its class (never its message); None for any other error."""
    return next((name for cls, name in ERROR_TYPES if isinstance(e, cls)), None)
