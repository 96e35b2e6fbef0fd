"""Service settings from the environment (``AAT_`` prefix), validated before anything starts.

Every field is one environment variable, e.g. ``max_batch`` is ``AAT_MAX_BATCH``. ``aat serve``
flags override the environment; a bad value stops start-up with a message naming the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from aat_serve.adapters.bundle import TASK_NAME_RE
from aat_serve.adapters.config import DEFAULT_BOTTLENECK
from aat_serve.adapters.errors import ConfigError

# Values people leave in example files; a token equal to one of these is refused.
PLACEHOLDER_SECRETS = frozenset({
    "changeme", "changethis", "change-me", "change_me", "secret", "password", "token",
    "admin", "example", "default", "xxx", "test", "todo", "replace-me", "your-token",
})
MIN_TOKEN_LENGTH = 16


HttpParser = Literal["auto", "httptools", "h11"]
"""``AAT_HTTP_PARSER``'s values (``service.http_protocol`` resolves them)."""


class Settings(BaseSettings):
    """Everything the service can be told; the docstring of each field is its documentation."""

    model_config = SettingsConfigDict(env_prefix="AAT_", env_ignore_empty=True, extra="ignore",
                                      validate_default=True)

    checkpoint: Path | None = None
    """Backbone checkpoint: original AST/SSAST ``.pth`` or a Hugging Face directory."""
    bundle_dir: Path | None = None
    """The bundle store (a directory, shareable between replicas); None serves no uploads."""
    demo: bool | None = None
    """Serve the demo's tasks (``digits``, ...) read-only beside the store's own; a store task
    of the same name wins. Unset: on with the demo backbone (no checkpoint, or ``demo``), off
    with any other (the demo tasks only fit the demo backbone)."""
    admin_token: str | None = None
    """Bearer token for PUT/DELETE /tasks/{task}; unset disables management (403)."""
    api_token: str | None = None
    """Bearer token for /classify and /tasks; unset leaves them open."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    residual_dtype: Literal["float32", "bfloat16"] = "float32"
    """The residual stream between blocks: float32, or bfloat16 with ``AAT_DTYPE=bfloat16``
    (LayerNorms still normalise in fp32; agreement with float32 in docs/benchmarks.md)."""
    cuda_graphs: Literal["auto", "on", "off"] = "auto"
    """Replay the model's forward from CUDA graphs, one per batch-size bucket (1, 2, 4, ...,
    ``AAT_MAX_BATCH``) and clip length, captured on first use: auto uses them on a GPU with the
    Triton kernels, on refuses to start without them, off never."""
    runtime: Literal["torch", "onnxruntime"] = "torch"
    """Where the backbone runs: torch, or ONNX Runtime (CUDA provider on a GPU, else CPU;
    float32 only). Uploading or replacing a task never rebuilds the ONNX Runtime session."""
    max_batch: int = Field(16, ge=1, le=1024)
    """Most clips in one forward pass. 16: on the 2-core CPU of docs/benchmarks.md the demo
    served 255-279 req/s at 16 against 220 at 8 and 176 at 32 (32 connections), with lower
    p50 and p99; a GPU gains from larger batches still (``max_batch_frames`` bounds memory)."""
    max_batch_frames: int | None = Field(None, ge=1, le=100_000_000)
    """Most input frames (clips x frames per clip) in one forward pass, so no batch of long
    clips can exhaust memory; unset: ``max_batch`` clips of the backbone's length. A single
    clip longer than this still runs, alone."""
    max_wait_ms: float = Field(5.0, ge=0, le=10_000)
    """Longest a clip waits for others to fill its batch."""
    max_queue: int = Field(256, ge=1, le=1_000_000)
    """Most requests admitted (decoding or waiting for a batch); beyond it 503."""
    request_timeout_s: float = Field(30.0, gt=0, le=3600)
    """A request not answered this long after its body arrived gets 504 (and is not computed)."""
    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    """A connection whose request head (request line and headers) is not complete this long
    after it opened, or after its previous response, is closed (408 if part of a head came)."""
    http_parser: HttpParser = "auto"
    """The HTTP/1.1 parser under uvicorn: auto is httptools (C) when installed, else h11
    (Python); either one forced. Both give the same guards (head timeout and 16-KiB head
    limit, JSON 400/431 answers; service/http_protocol.py); httptools costs the event loop
    less per request, and refuses more malformed requests than h11 (docs/service.md)."""
    body_timeout_s: float = Field(15.0, gt=0, le=3600)
    """Longest wait for the next piece of a request body; then 408 and the connection closes."""
    body_total_timeout_s: float = Field(300.0, gt=0, le=86_400)
    """A request body still incomplete this long after the server began reading it gets 408."""
    max_audio_mb: float = Field(25.0, gt=0)
    max_audio_seconds: float = Field(600.0, gt=0)
    max_windows: int = Field(128, ge=1, le=100_000)
    """Most windows one request's audio is scored in (longer audio with its hop: 413)."""
    window_hop_s: float | None = Field(None, gt=0, le=3600)
    """Default hop between the windows of long audio, capped at each task's window (``?hop_s=``
    overrides); unset: one window, i.e. no overlap."""
    max_bundle_mb: float = Field(200.0, gt=0)
    max_uploads: int = Field(2, ge=1, le=64)
    """Bundle uploads processed at the same time; more get 503."""
    max_tasks: int = Field(64, ge=1, le=65_536)
    """Most tasks resident on the device at once; the store may hold any number (the resident
    ones are a cache: a cold task evicts the least recently used idle one)."""
    device_task_mb: float | None = Field(None, gt=0, le=1_048_576)
    """Device memory for resident tasks (adapter pool rows, heads, prompts); resident capacity
    is what fits, capped by ``max_tasks``. Unset: bounded by ``max_tasks`` only."""
    host_cache_mb: float = Field(512.0, ge=0, le=1_048_576)
    """Host memory for validated bundles, so an evicted task comes back without reading its
    file; 0 disables the tier."""
    slot_width: int = Field(DEFAULT_BOTTLENECK, ge=1, le=4096)
    """Width (bottleneck) of a resident task's adapter pool row: narrower adapters are
    zero-padded to it, wider ones are refused. Device bytes per task grow with it: set it to
    your bundles' widest adapters to fit more tasks in ``device_task_mb`` (the demo's are 32
    wide, 6x narrower than the default)."""
    pinned_tasks: str | None = None
    """Comma-separated tasks never evicted from the device (loaded on first use like others)."""
    preload: Literal["eager", "lazy"] = "eager"
    """eager: load the store at start-up while it fits (in name order; the rest on first use);
    lazy: every task on its first request."""
    refresh_s: float = Field(5.0, gt=0, le=3600)
    """Interval of the store rescan that makes replicas converge."""
    decode_workers: int | None = Field(None, ge=1, le=64)
    """Threads that decode audio and compute features, off the event loop; unset: one per CPU
    core this process may run on. Each runs torch single-threaded (service/threads.py)."""
    front_ends: int = Field(0, ge=0, le=64)
    """HTTP front-end processes beside one model process (docs/service.md, "Front ends"): each
    parses HTTP, checks tokens, reads and decodes bodies and writes answers, and the model
    process batches every front end's clips. 0: one process does all (the default: on a CPU
    the model is the limit). On a many-core GPU host one process's event loop caps requests
    per second below what the model computes: run several (``aat bench serve --front-ends``)."""
    inference_threads: int | None = Field(None, ge=1, le=256)
    """Torch intra-op threads of the inference thread; unset: every usable core but one, at
    least one (service/threads.py), so the event loop and the decode threads keep a core."""
    switch_interval_ms: float = Field(1.0, gt=0, le=100)
    """Python's thread switch interval (``sys.setswitchinterval``) in the server. The inference
    thread gives up the GIL inside every torch op and must get it back from the event loop
    and the decode threads; the interpreter's default of 5 ms stalls it up to that long per
    op (docs/benchmarks.md, "Serving at the model's speed")."""
    keep_freed_memory: bool = True
    """glibc keeps freed blocks for reuse: each op's output no longer costs fresh page faults
    (CPU serving, see docs/benchmarks.md); the resident set stays at its high-water mark."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("log_level", "device", "dtype", "preload", "runtime", "residual_dtype",
                     "cuda_graphs", "http_parser", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("admin_token", "api_token")
    @classmethod
    def _real_secret(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if v.strip().lower() in PLACEHOLDER_SECRETS:
            raise ValueError(f"is a placeholder ({v!r}); set a real secret")
        if len(v) < MIN_TOKEN_LENGTH:
            raise ValueError(f"is too short ({len(v)} characters); use at least "
                             f"{MIN_TOKEN_LENGTH} random characters")
        if any(c.isspace() for c in v) or not v.isprintable():
            raise ValueError("must not contain whitespace or control characters")
        return v

    @field_validator("pinned_tasks")
    @classmethod
    def _task_names(cls, v: str | None) -> str | None:
        if v is None:
            return None
        for name in (n.strip() for n in v.split(",")):
            if not TASK_NAME_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not a task name; expected a comma-separated list "
                                 "of task names (1-64 characters of a-z, 0-9, '_' or '-')")
        return v

    @model_validator(mode="after")
    def _pinned_fit(self) -> Settings:
        if len(self.pinned) >= self.max_tasks:
            raise ValueError(f"AAT_PINNED_TASKS names {len(self.pinned)} tasks but "
                             f"AAT_MAX_TASKS is {self.max_tasks}; leave at least one slot for "
                             "the others")
        return self

    @property
    def pinned(self) -> frozenset[str]:
        """``pinned_tasks`` as a set of names."""
        if self.pinned_tasks is None:
            return frozenset()
        return frozenset(n.strip() for n in self.pinned_tasks.split(","))

    @property
    def device_task_bytes(self) -> int | None:
        return None if self.device_task_mb is None else int(self.device_task_mb * 1024 * 1024)

    @property
    def host_cache_bytes(self) -> int:
        return int(self.host_cache_mb * 1024 * 1024)

    @model_validator(mode="after")
    def _runtime_dtype(self) -> Settings:
        if self.runtime == "onnxruntime" and self.dtype != "float32":
            raise ValueError("AAT_RUNTIME=onnxruntime runs in float32; unset AAT_DTYPE or set it "
                             "to float32")
        if self.residual_dtype == "bfloat16" and self.dtype != "bfloat16":
            raise ValueError("AAT_RESIDUAL_DTYPE=bfloat16 needs AAT_DTYPE=bfloat16 (the stream "
                             "is kept in the GEMMs' dtype or in float32)")
        return self

    @model_validator(mode="after")
    def _distinct_tokens(self) -> Settings:
        if self.admin_token is not None and self.admin_token == self.api_token:
            raise ValueError("AAT_ADMIN_TOKEN and AAT_API_TOKEN must differ")
        if self.admin_token is not None and self.bundle_dir is None:
            raise ValueError("AAT_ADMIN_TOKEN is set but AAT_BUNDLE_DIR is not: uploaded "
                             "bundles need a store directory")
        return self

    @property
    def management_enabled(self) -> bool:
        return self.admin_token is not None

    @property
    def max_audio_bytes(self) -> int:
        return int(self.max_audio_mb * 1024 * 1024)

    @property
    def max_bundle_bytes(self) -> int:
        return int(self.max_bundle_mb * 1024 * 1024)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with ``overrides`` (None values ignored) on top.

    Raises ``ConfigError`` naming the variable and the problem, e.g.
    ``AAT_MAX_BATCH: Input should be greater than or equal to 1 (got '0')``.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = "_".join(str(p) for p in err["loc"]).upper()
            name = f"AAT_{loc}" if loc else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            secret = not loc or "TOKEN" in loc  # never echo secrets (or the whole input)
            shown = "" if secret else f" (got {err.get('input')!r})"
            problems.append(f"{name}: {msg}{shown}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
