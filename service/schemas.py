"""Response bodies of the HTTP API (they document themselves in OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from aat_serve.adapters.bundle import Manifest


class Prediction(BaseModel):
    label: str
    score: float = Field(description="Softmax probability, or sigmoid for multi-label tasks.")


class WindowResult(BaseModel):
    start_s: float = Field(description="Where the window starts in the audio, in seconds.")
    end_s: float = Field(description="Where it ends (clipped at the audio's end; a last "
                                     "window running past it is padded).")
    predictions: list[Prediction] = Field(description="This window's top-k labels.")


class ClassifyResponse(BaseModel):
    task: str
    version: str = Field(description="Content hash of the bundle version that computed this.")
    multi_label: bool
    predictions: list[Prediction] = Field(description="The top-k labels, best first, of the "
                                                      "windows' aggregated scores.")
    duration_s: float = Field(description="Decoded audio duration in seconds.")
    scored_s: float = Field(description="Seconds of the audio that were scored: all of it, "
                                        "or the first window's with aggregate=first.")
    windows: int = Field(description="Windows scored (1 for audio up to the task's window).")
    window_s: float = Field(description="The task's window: the audio that makes its "
                                        "target_length frames.")
    hop_s: float = Field(description="Seconds between window starts.")
    aggregate: str = Field(description="How the windows' scores were combined: mean, max or "
                                       "first.")
    window_results: list[WindowResult] | None = Field(
        None, description="Per-window top-k, with ?windows=true; else null.")
    queue_ms: float = Field(description="Time waiting for the batch (the longest over the "
                                        "windows).")
    inference_ms: float = Field(description="Forward time of the batch (the longest over the "
                                            "windows' batches).")
    batch_size: int = Field(description="Clips in the batch that computed the first window.")
    batch_tasks: int = Field(description="Distinct tasks in that batch.")


TASK_STATES = ("active", "cached", "stored", "failed")


class TaskSummary(BaseModel):
    task: str
    state: str = Field(description="active: resident on the device and serving; cached: in "
                                   "the store and in host memory (loads on its next request "
                                   "without reading its file); stored: in the store, loaded on "
                                   "its next request; failed: its store file was refused "
                                   "(validation, loading or warm-up) and no version serves.")
    reason: str | None = Field(None, description="Why the task's latest store file was "
                                                 "refused (also while a previous version is "
                                                 "still active); null otherwise.")
    version: str | None = Field(description="null only for a failed file without a readable "
                                            "manifest (as are the fields below).")
    method: str | None
    labels: list[str]
    num_classes: int | None
    multi_label: bool | None
    metrics: dict[str, Any]
    created_at: str | None
    resident: bool = Field(description="Loaded in this replica's model (else loaded on use).")

    @classmethod
    def of(cls, task: str, m: Manifest | None, state: str, reason: str | None
           ) -> TaskSummary:
        if m is None:
            return cls(task=task, state=state, reason=reason, version=None, method=None,
                       labels=[], num_classes=None, multi_label=None, metrics={},
                       created_at=None, resident=False)
        return cls(task=task, state=state, reason=reason, version=m.version, method=m.method,
                   labels=m.labels, num_classes=m.num_classes, multi_label=m.multi_label,
                   metrics=m.metrics, created_at=m.created_at, resident=state == "active")


class CacheSummary(BaseModel):
    """The task cache's tiers: budgets and what each holds (docs/service.md, Paging)."""

    resident: int = Field(description="Tasks on the device (state active).")
    cached: int = Field(description="Bundles in host memory (resident tasks' included).")
    stored: int = Field(description="Tasks in the store.")
    max_tasks: int = Field(description="AAT_MAX_TASKS: most resident tasks.")
    device_budget_bytes: int | None = Field(description="AAT_DEVICE_TASK_MB in bytes; null: "
                                                        "no byte bound.")
    device_bytes: int = Field(description="Adapter pools (every row) plus heads and prompts.")
    host_budget_bytes: int = Field(description="AAT_HOST_CACHE_MB in bytes.")
    host_bytes: int = Field(description="Tensor bytes of the bundles in host memory.")
    pinned: list[str] = Field(description="AAT_PINNED_TASKS: never evicted.")


class TaskList(BaseModel):
    tasks: list[TaskSummary]
    count: int
    cache: CacheSummary | None = None


class TaskDetail(BaseModel):
    task: str
    version: str
    resident: bool
    manifest: dict[str, Any] = Field(description="The bundle's manifest as stored.")


class PutResult(BaseModel):
    task: str
    version: str
    previous_version: str | None
    created: bool = Field(description="True when the task did not exist before (201).")
    unchanged: bool = Field(description="True when this version was already active.")


class DeleteResult(BaseModel):
    task: str
    version: str = Field(description="The version that was active.")
    deleted: bool = True


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    tasks: int
    failed_tasks: int = 0
    """Tasks whose store file failed and that serve no version (``GET /tasks``)."""
    device: str
    dtype: str
    runtime: str = "torch"
    """torch or onnxruntime (AAT_RUNTIME)."""
    provider: str = ""
    """The torch backend (segments, triton) or the ONNX Runtime execution provider in use."""
    front_ends: int = 0
    """Front-end processes connected to this model process (AAT_FRONT_ENDS); 0 when one
    process serves everything."""
