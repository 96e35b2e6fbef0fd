"""The HTTP routes (design.md, Service). Handlers are thin: checks, then the service parts.

Paths take the rest of the URL as the task name (``{task:path}``) so that ``a/b`` or ``../x``
reach the name check and get 400 instead of slipping past it as some other route.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from aat_serve.adapters.bundle import check_task_name
from aat_serve.adapters.errors import AATError, ConfigError
from aat_serve.service.auth import require_admin_token, require_api_token
from aat_serve.service.bodies import check_media_type, read_payload
from aat_serve.service.classify import Options, classify_audio
from aat_serve.service.errors import (
    ErrorType,
    ServiceError,
    error_responses,
    from_aat_error,
    not_ready,
)
from aat_serve.service.metrics import UNKNOWN_TASK
from aat_serve.service.paging import Loaded
from aat_serve.service.runtime import Service, runtime_info
from aat_serve.service.schemas import (
    CacheSummary,
    ClassifyResponse,
    DeleteResult,
    Health,
    PutResult,
    Readiness,
    TaskDetail,
    TaskList,
    TaskSummary,
)

router = APIRouter()

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_MULTIPART = {"schema": {"type": "object", "required": ["file"],
                         "properties": {"file": {"type": "string", "format": "binary"}}}}
AUDIO_BODY = {"requestBody": {
    "required": True,
    "description": "Audio bytes (WAV, FLAC, OGG/Vorbis, MP3; any rate, any channels), raw or as "
                   "the multipart field `file`. At most AAT_MAX_AUDIO_MB and "
                   "AAT_MAX_AUDIO_SECONDS.",
    "content": {"audio/*": _BINARY, "application/octet-stream": _BINARY,
                "multipart/form-data": _MULTIPART}}}
BUNDLE_BODY = {"requestBody": {
    "required": True,
    "description": "A task bundle (`.safetensors`, format aat-bundle/1), raw or as the multipart "
                   "field `file`. At most AAT_MAX_BUNDLE_MB. Validated completely before "
                   "anything changes.",
    "content": {"application/octet-stream": _BINARY, "multipart/form-data": _MULTIPART}}}


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def valid_task(task: str) -> str:
    try:
        return check_task_name(task)
    except ConfigError as e:
        raise ServiceError(ErrorType.INVALID_TASK_NAME, str(e)) from None


def json_response(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    """A 200 JSON response serialised once with orjson: the hot path skips FastAPI's response
    validation and encoder (the route's ``response_model`` still documents the schema, and
    tests/service/test_lean_path.py checks that the bytes equal the model's own JSON)."""
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


TASK_LOAD_HEADER = "X-AAT-Task-Load"
"""On a classify response whose request waited for its task to be loaded: ``host`` (from host
memory) or ``disk`` (its file read); absent when the task was resident."""
TASK_LOAD_MS_HEADER = "X-AAT-Task-Load-Ms"
"""With ``TASK_LOAD_HEADER``: milliseconds from the load's start to the task being resident."""


# -- classification ----------------------------------------------------------------------------

@router.post(
    "/classify/{task:path}", tags=["classify"], response_model=ClassifyResponse,
    dependencies=[Depends(require_api_token)], openapi_extra=AUDIO_BODY,
    responses=error_responses(400, 401, 404, 408, 413, 415, 500, 503, 504),
    summary="Classify one audio clip with a task")
async def classify(
    task: str, request: Request, svc: ServiceDep,
    top_k: Annotated[int, Query(ge=1, le=10_000, description="How many labels to return.")] = 5,
    hop_s: Annotated[float | None, Query(
        gt=0, le=3600, description="Seconds between the starts of the windows that long audio "
        "is scored in, up to the task's window (default AAT_WINDOW_HOP_S, else one window: no "
        "overlap).")] = None,
    aggregate: Annotated[Literal["mean", "max", "first"] | None, Query(
        description="How the windows' probabilities combine: mean (default for single-label), "
        "max (default for multi-label) or first (score only the first window).")] = None,
    windows: Annotated[bool, Query(description="Add each window's top-k (window_results).")
                       ] = False,
) -> Response:
    """Decode the audio, cut it into the task's windows (audio longer than the task's clip
    length is scored in several; the answer says how many and how much audio), batch them with
    other requests (of any task) and return the top-k of the aggregated scores. More windows
    than AAT_MAX_WINDOWS: 413 audio_too_long."""
    return await answer_classify(task, request, svc, Options(
        top_k=top_k, hop_s=hop_s, aggregate=aggregate, windows=windows))


def task_label(svc: Service, task: str) -> str:
    """``task`` as a metric label: itself when the server knows it (resident, stored, or
    failed), else ``UNKNOWN_TASK``, so that label values stay bounded."""
    known = (task in svc.engine.tasks or task in svc.registry.catalogue
             or svc.registry.tasks.record(task).reason is not None)
    return task if known else UNKNOWN_TASK


async def answer_classify(task: str, request: Request, svc: Service, opts: Options
                          ) -> Response:
    """The classify route's body after its parameters are read (by FastAPI, or by the fast
    path: service/fast_path.py): the answer, with the request counted by task and outcome."""
    started = time.monotonic()
    label = task_label(svc, task)
    try:
        out, loaded = await _classify(task, request, svc, opts)
    except (ServiceError, AATError) as e:
        kind = (e if isinstance(e, ServiceError) else from_aat_error(e)).type
        svc.metrics.requests.labels(label, kind).inc()
        raise
    svc.metrics.requests.labels(out["task"], "ok").inc()
    svc.metrics.request_seconds.labels(out["task"]).observe(time.monotonic() - started)
    headers = None if loaded is None else {
        TASK_LOAD_HEADER: loaded.source, TASK_LOAD_MS_HEADER: f"{loaded.seconds * 1000:.3f}"}
    return json_response(out, headers)


async def _classify(task: str, request: Request, svc: Service, opts: Options
                    ) -> tuple[dict[str, Any], Loaded | None]:
    """The ``ClassifyResponse`` body as a dict (serialised once, by ``json_response``) and
    where its task was loaded from, if this request waited for that (``TASK_LOAD_HEADER``)."""
    fields = request.state.log
    task = valid_task(task)
    fields["task"] = task
    if not svc.ready:
        raise not_ready(svc.startup_error or not_ready().message)
    kind = check_media_type(request, audio=True)
    with svc.pager.in_flight(task):  # never evicted while this request is answered
        return await _resolved(task, request, svc, opts, kind)


async def _resolved(task: str, request: Request, svc: Service, opts: Options, kind: str
                    ) -> tuple[dict[str, Any], Loaded | None]:
    fields = request.state.log
    info, loaded = await svc.registry.resolve(task)
    if loaded is not None:
        fields.update(task_load=loaded.source, task_load_ms=round(loaded.seconds * 1000, 3))
    s = svc.settings
    audio = await read_payload(request, kind, s.max_audio_bytes, "audio", "AAT_MAX_AUDIO_MB")
    deadline = time.monotonic() + s.request_timeout_s
    admission = svc.engine.admit()
    try:
        out = await classify_audio(svc, task, info, audio, deadline, admission, opts)
    finally:
        admission.release()
    fields.update(version=out["version"], queue_ms=out["queue_ms"],
                  inference_ms=out["inference_ms"], batch_size=out["batch_size"],
                  windows=out["windows"])
    return out, loaded


# -- tasks ---------------------------------------------------------------------------------------

@router.get("/tasks", tags=["tasks"], response_model=TaskList,
            dependencies=[Depends(require_api_token)], responses=error_responses(401, 500),
            summary="List the tasks")
async def list_tasks(svc: ServiceDep) -> TaskList:
    """Every task in the store or resident: state, version, method, labels, metrics; a task
    whose store file failed shows ``state: failed`` (or stays ``active`` on its previous
    version) with the ``reason``."""
    table = svc.registry.tasks
    names = sorted(set(svc.engine.tasks) | set(svc.registry.catalogue) | table.failed_names())
    items = [TaskSummary.of(n, svc.registry.manifest(n), table.state(n),
                            table.record(n).reason) for n in names]
    return TaskList(tasks=items, count=len(items), cache=CacheSummary(**svc.cache_summary()))


@router.get("/tasks/{task:path}", tags=["tasks"], response_model=TaskDetail,
            dependencies=[Depends(require_api_token)],
            responses=error_responses(400, 401, 404, 500), summary="One task's manifest")
async def get_task(task: str, svc: ServiceDep) -> TaskDetail:
    """The task's bundle manifest (looked up in the store if this replica lacks it)."""
    task = valid_task(task)
    m = svc.registry.manifest(task)
    if m is None:
        with svc.pager.in_flight(task):
            m = (await svc.registry.resolve(task))[0].manifest
    return TaskDetail(task=task, version=m.version, resident=task in svc.engine.tasks,
                      manifest=m.to_dict())


@router.put("/tasks/{task:path}", tags=["management"], response_model=PutResult,
            dependencies=[Depends(require_admin_token)], openapi_extra=BUNDLE_BODY,
            responses={201: {"model": PutResult, "description": "Task created."},
                       **error_responses(400, 401, 403, 408, 409, 413, 415, 422, 500, 503)},
            summary="Upload a bundle: validate, store, activate")
async def put_task(task: str, request: Request, response: Response, svc: ServiceDep
                   ) -> PutResult:
    """Replace (200) or create (201) a task; a refused bundle changes nothing."""
    task = valid_task(task)
    request.state.log["task"] = task
    kind = check_media_type(request, audio=False)
    s = svc.settings
    with svc.upload_slot():
        data = await read_payload(request, kind, s.max_bundle_bytes, "bundle",
                                  "AAT_MAX_BUNDLE_MB")
        r = await svc.registry.put(task, data)
    response.status_code = 201 if r.created else 200
    request.state.log["version"] = r.version
    return PutResult(task=r.task, version=r.version, previous_version=r.previous_version,
                     created=r.created, unchanged=r.unchanged)


@router.delete("/tasks/{task:path}", tags=["management"], response_model=DeleteResult,
               dependencies=[Depends(require_admin_token)],
               responses=error_responses(400, 401, 403, 404, 500), summary="Remove a task")
async def delete_task(task: str, request: Request, svc: ServiceDep) -> DeleteResult:
    """Deactivate the task and remove every stored version of it."""
    task = valid_task(task)
    request.state.log["task"] = task
    version = await svc.registry.delete(task)
    return DeleteResult(task=task, version=version)


# -- operations --------------------------------------------------------------------------------

@router.get("/healthz", tags=["operations"], response_model=Health,
            responses=error_responses(503), summary="Liveness")
async def healthz(svc: ServiceDep) -> Health:
    """200 while the process serves and its inference worker runs."""
    if svc.engine is None or not svc.engine.alive:
        raise ServiceError(ErrorType.NOT_READY, "the inference worker is not running",
                           {"Retry-After": "1"})
    return Health(status="ok")


@router.get("/readyz", tags=["operations"], response_model=Readiness,
            responses=error_responses(503), summary="Readiness")
async def readyz(request: Request, svc: ServiceDep) -> Readiness:
    """200 once the backbone and the preloaded tasks have run a warm-up batch; tasks whose
    store file failed are skipped (``failed_tasks``), never a reason to stay unready."""
    if not svc.ready:
        raise not_ready(svc.startup_error or not_ready().message)
    runtime, provider = runtime_info(svc.model)
    table = svc.registry.tasks
    failed = sum(1 for n in table.failed_names() if table.state(n) == "failed")
    server = getattr(request.app.state, "engine_server", None)
    return Readiness(status="ready", tasks=len(svc.engine.tasks), failed_tasks=failed,
                     device=str(svc.device), dtype=svc.settings.dtype, runtime=runtime,
                     provider=provider, front_ends=0 if server is None else server.connected)


_METRICS_DOC = {200: {"content": {CONTENT_TYPE_LATEST: {}},
                     "description": "Prometheus text format."}}


@router.get("/metrics", tags=["operations"], response_class=Response, responses=_METRICS_DOC,
            summary="Prometheus metrics")
async def metrics(svc: ServiceDep) -> Response:
    """Ours (prefix ``aat_``) and the standard process and Python series (``process_*``,
    ``python_*``); bind privately, no auth."""
    if svc.pager is not None:
        svc.pager.update_gauges()
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.head("/metrics", tags=["operations"], response_class=Response, responses=_METRICS_DOC,
             summary="Prometheus metrics, headers only (for probes)")
async def metrics_head(svc: ServiceDep) -> Response:
    """What ``GET /metrics`` would answer, without the body."""
    body = svc.metrics.render()
    return Response(media_type=CONTENT_TYPE_LATEST, headers={"Content-Length": str(len(body))})
