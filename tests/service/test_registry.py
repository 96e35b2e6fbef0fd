"""Uploads, hot swap, deletion, lazy loading and replicas that share one bundle store."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.errors import BundleError
from aat_serve.service.store import ACTIVE
from tests.service.helpers import (
    ADMIN,
    auth,
    error,
    load_tiny,
    make_bundle,
    reference_scores,
    served,
    wait_until,
    wav_bytes,
    write_tiny_checkpoint,
)

OCTET = {"content-type": "application/octet-stream"}
WAV = {"content-type": "audio/wav"}
ADMIN_H = auth(ADMIN)


def _put(c, task, data, **headers):
    return c.put(f"/tasks/{task}", content=data, headers={**OCTET, **ADMIN_H, **headers})


def _classify(c, task, audio, k=10):
    return c.post(f"/classify/{task}?top_k={k}", content=audio, headers=WAV)


def _as_vector(body, labels):
    got = {p["label"]: p["score"] for p in body["predictions"]}
    return torch.tensor([got[x] for x in labels])


@pytest.fixture
def v2(ckpt):
    """A second version of ``words``: same task, new weights."""
    return make_bundle(ckpt, "words", method="aat_m", num_classes=5, seed=22)


def test_upload_then_classify_then_replace_then_delete(make_app, store, ckpt, bundles, v2):
    v1 = bundles["words"]
    audio = wav_bytes(0.5, seed=5)
    with served(make_app(admin_token=ADMIN)) as c:
        r = _classify(c, "words", audio)
        assert (r.status_code, r.json()) == error(404, "unknown_task", "unknown task 'words'")
        r = _put(c, "words", v1.to_bytes())
        assert (r.status_code, r.json()) == (201, {
            "task": "words", "version": v1.manifest.version, "previous_version": None,
            "created": True, "unchanged": False})
        assert (store / "words" / ACTIVE).read_text() == v1.manifest.version + "\n"
        first = _classify(c, "words", audio).json()
        assert first["version"] == v1.manifest.version
        ref1 = reference_scores(ckpt, v1, audio)
        torch.testing.assert_close(_as_vector(first, v1.manifest.labels), ref1,
                                   atol=1e-5, rtol=0)

        r = _put(c, "words", v1.to_bytes())  # the same version again: nothing to do
        assert (r.status_code, r.json()["unchanged"]) == (200, True)

        r = _put(c, "words", v2.to_bytes())
        assert (r.status_code, r.json()) == (200, {
            "task": "words", "version": v2.manifest.version,
            "previous_version": v1.manifest.version, "created": False, "unchanged": False})
        second = _classify(c, "words", audio).json()
        assert second["version"] == v2.manifest.version
        ref2 = reference_scores(ckpt, v2, audio)
        torch.testing.assert_close(_as_vector(second, v2.manifest.labels), ref2,
                                   atol=1e-5, rtol=0)
        assert (ref1 - ref2).abs().max() > 1e-3  # the versions really differ
        kept = sorted(p.stem for p in (store / "words").glob("*.safetensors"))
        assert kept == sorted([v1.manifest.version, v2.manifest.version])

        r = c.delete("/tasks/words", headers=ADMIN_H)
        assert (r.status_code, r.json()) == (200, {"task": "words",
                                                   "version": v2.manifest.version,
                                                   "deleted": True})
        assert list(store.iterdir()) == []
        r = _classify(c, "words", audio)
        assert (r.status_code, r.json()) == error(404, "unknown_task", "unknown task 'words'")
        r = c.delete("/tasks/words", headers=ADMIN_H)
        assert (r.status_code, r.json()) == error(404, "unknown_task", "unknown task 'words'")
        listing = c.get("/tasks").json()
        assert (listing["tasks"], listing["count"]) == ([], 0)
        assert {k: listing["cache"][k] for k in ("resident", "cached", "stored")} == {
            "resident": 0, "cached": 0, "stored": 0}
        metrics = c.get("/metrics").text
        assert 'aat_bundle_loads_total{outcome="ok",source="upload"} 2.0' in metrics
        assert "aat_tasks_resident 0.0" in metrics


def test_multipart_upload(make_app, bundles):
    with served(make_app(admin_token=ADMIN)) as c:
        b = bundles["birds"]
        r = c.put("/tasks/birds", files={"file": ("birds.safetensors", b.to_bytes())},
                  headers=ADMIN_H)
        assert r.status_code == 201 and r.json()["version"] == b.manifest.version


def _tampered(bundle: TaskBundle, **manifest_changes) -> bytes:
    m = dataclasses.replace(bundle.manifest, **manifest_changes)
    return TaskBundle(m, dict(bundle.tensors)).to_bytes()


def _with_nan(bundle: TaskBundle) -> bytes:
    tensors = {k: v.clone() for k, v in bundle.tensors.items()}
    tensors["head.fc.bias"][1] = float("nan")
    return TaskBundle(bundle.manifest, tensors).to_bytes()


def test_rejected_uploads_change_nothing(make_app, store, ckpt, bundles, tmp_path):
    v1 = bundles["words"]
    other = load_tiny(write_tiny_checkpoint(tmp_path / "other", seed=9))
    foreign = make_bundle(other, "words", method="aat_m", num_classes=5, seed=2)
    with pytest.raises(BundleError) as garbage_error:
        TaskBundle.from_bytes(b"not a bundle at all")
    audio = wav_bytes(0.5, seed=6)
    v = v1.manifest.version
    fp = ckpt.backbone.fingerprint()
    cases = [
        (b"not a bundle at all", error(422, "invalid_bundle", str(garbage_error.value))),
        (_with_nan(v1), error(422, "invalid_bundle",
                              "bundle tensor 'head.fc.bias' has non-finite values")),
        (bundles["birds"].to_bytes(), error(422, "invalid_bundle",
                                            "the bundle is for task 'birds', not 'words'")),
        (_tampered(v1, labels=["a", "b", "c", "d", "e"]), error(
            422, "invalid_bundle", f"the bundle's version {v!r} does not match its content "
            f"hash {_content(v1, labels=['a', 'b', 'c', 'd', 'e'])!r}")),
        (_tampered(v1, method="full"), error(
            422, "invalid_bundle", "method 'full' trains the backbone and has no bundle")),
        (foreign.to_bytes(), error(
            409, "backbone_mismatch", f"bundle 'words' was trained on backbone "
            f"{foreign.manifest.backbone_fingerprint}, but this backbone is {fp}")),
    ]
    v1.save(store / "words.safetensors")
    with served(make_app(admin_token=ADMIN, max_bundle_mb=0.2)) as c:
        before = _classify(c, "words", audio).json()
        for data, expected in cases:
            r = _put(c, "words", data)
            assert (r.status_code, r.json()) == expected
            assert _classify(c, "words", audio).json()["predictions"] == before["predictions"]
            assert c.get("/tasks/words").json()["version"] == v
            assert sorted(p.name for p in store.iterdir()) == ["words.safetensors"]
        limit = int(0.2 * 1024 * 1024)
        big = bytes(limit + 1)
        r = _put(c, "words", big)
        assert (r.status_code, r.json()) == error(
            413, "payload_too_large",
            f"bundle is {limit + 1} bytes, the limit is {limit} bytes "
            "(AAT_MAX_BUNDLE_MB)")
        r = _put(c, "words", v1.to_bytes(), **{"content-type": "audio/wav"})
        assert (r.status_code, r.json()) == error(
            415, "unsupported_media_type", "unsupported Content-Type 'audio/wav'; send "
            "application/octet-stream or multipart/form-data with a 'file' field")
        r = _put(c, "words", b"")
        assert (r.status_code, r.json()) == error(400, "invalid_request",
                                                  "the bundle is empty (0 bytes)")
        assert c.get("/tasks/words").json()["version"] == v
        metrics = c.get("/metrics").text
        assert 'aat_bundle_loads_total{outcome="refused",source="upload"} 6.0' in metrics
        assert 'aat_rejections_total{reason="invalid_bundle"} 5.0' in metrics
        assert 'aat_rejections_total{reason="backbone_mismatch"} 1.0' in metrics


def _content(bundle, **changes):
    from aat_serve.adapters.bundle import content_version

    return content_version(bundle.tensors, dataclasses.replace(bundle.manifest, **changes))


def _states(c) -> dict[str, str]:
    return {t["task"]: t["state"] for t in c.get("/tasks").json()["tasks"]}


def test_an_upload_beyond_max_tasks_evicts_the_idle_lru_task(make_app, bundles):
    """Was 507 slots_full (issue 24): the device is a cache, an upload takes an idle task's
    place and the evicted task comes back from host memory on its next request."""
    with served(make_app(admin_token=ADMIN, max_tasks=1)) as c:
        assert _put(c, "birds", bundles["birds"].to_bytes()).status_code == 201
        r = _put(c, "tags", bundles["tags"].to_bytes())
        assert r.status_code == 201 and r.json()["created"] is True
        assert _states(c) == {"birds": "cached", "tags": "active"}
        r = _classify(c, "birds", wav_bytes())
        assert r.status_code == 200 and r.headers["x-aat-task-load"] == "host"
        assert r.json()["version"] == bundles["birds"].manifest.version
        assert _states(c) == {"birds": "active", "tags": "cached"}
        r = _classify(c, "birds", wav_bytes())  # resident now: no load, no header
        assert r.status_code == 200 and "x-aat-task-load" not in r.headers
        assert _put(c, "birds", bundles["birds"].to_bytes()).json()["unchanged"] is True


def test_lazy_preload_loads_on_first_request(make_app, store, bundles):
    for b in bundles.values():
        b.save(store / f"{b.manifest.task}.safetensors")
    with served(make_app(preload="lazy")) as c:
        listed = {t["task"]: t["resident"] for t in c.get("/tasks").json()["tasks"]}
        assert listed == {"birds": False, "tags": False, "words": False}
        assert c.get("/readyz").json()["tasks"] == 0
        assert _classify(c, "tags", wav_bytes()).status_code == 200
        listed = {t["task"]: t["resident"] for t in c.get("/tasks").json()["tasks"]}
        assert listed == {"birds": False, "tags": True, "words": False}


def test_a_broken_store_file_is_skipped_and_the_rest_served(make_app, store, bundles, caplog):
    bundles["birds"].save(store / "birds.safetensors")
    (store / "words.safetensors").write_bytes(b"\x00" * 64)
    reason = "words.safetensors: not a safetensors file: bad header length"
    with served(make_app()) as c:
        listed = {t["task"]: (t["state"], t["reason"]) for t in c.get("/tasks").json()["tasks"]}
        assert listed == {"birds": ("active", None), "words": ("failed", reason)}
        r = _classify(c, "words", wav_bytes())
        assert (r.status_code, r.json()) == error(
            500, "task_failed", f"task 'words' cannot answer: its bundle in the store failed: "
                                f"{reason}")
        assert 'aat_bundle_loads_total{outcome="refused",source="store"} 1.0' in \
            c.get("/metrics").text
        bundles["words"].save(store / "words.safetensors")  # fixed by hand: picked up on a miss
        assert _classify(c, "words", wav_bytes()).status_code == 200
        listed = {t["task"]: (t["state"], t["reason"]) for t in c.get("/tasks").json()["tasks"]}
        assert listed == {"birds": ("active", None), "words": ("active", None)}


def test_replicas_sharing_a_store_converge(make_app, ckpt, bundles, v2):
    audio = wav_bytes(0.5, seed=8)
    v1 = bundles["words"]
    with served(make_app(admin_token=ADMIN)) as a, served(make_app(admin_token=ADMIN)) as b:
        assert _put(a, "words", v1.to_bytes()).status_code == 201
        # b has never seen the task: it resolves it from the store on the miss
        rb = _classify(b, "words", audio).json()
        ra = _classify(a, "words", audio).json()
        assert rb["version"] == ra["version"] == v1.manifest.version
        assert rb["predictions"] == ra["predictions"]
        # a new version written through a: b picks it up on its periodic rescan
        assert _put(a, "words", v2.to_bytes()).status_code == 200
        wait_until(lambda: b.get("/tasks/words").json()["version"] == v2.manifest.version, 10)
        assert _classify(b, "words", audio).json()["version"] == v2.manifest.version
        # an upload to b of a new task is visible to a, and both list the same tasks
        assert _put(b, "birds", bundles["birds"].to_bytes()).status_code == 201
        wait_until(lambda: a.get("/tasks").json()["tasks"] == b.get("/tasks").json()["tasks"],
                   10)
        # a delete through a reaches b
        assert a.delete("/tasks/words", headers=ADMIN_H).status_code == 200
        wait_until(lambda: _classify(b, "words", audio).status_code == 404, 10)
        assert [t["task"] for t in b.get("/tasks").json()["tasks"]] == ["birds"]


def test_hot_swap_under_load_never_mixes_versions(make_app, ckpt, bundles, v2):
    v1 = bundles["words"]
    clips = [wav_bytes(0.4, seed=s) for s in range(4)]
    refs = {(b.manifest.version, i): reference_scores(ckpt, b, clip)
            for b in (v1, v2) for i, clip in enumerate(clips)}
    results: list[tuple[int, dict]] = []
    stop = threading.Event()
    with served(make_app(admin_token=ADMIN, max_batch=4)) as c:
        assert _put(c, "words", v1.to_bytes()).status_code == 201

        def stream(k: int) -> None:
            i = k
            while not stop.is_set():
                r = _classify(c, "words", clips[i % 4])
                assert r.status_code == 200, r.text
                results.append((i % 4, r.json()))
                i += 1

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(results) >= 6, 20)
        assert _put(c, "words", v2.to_bytes()).status_code == 200
        n_at_swap = len(results)
        wait_until(lambda: len(results) >= n_at_swap + 6, 20)
        stop.set()
        for t in threads:
            t.join(10)
    versions = {body["version"] for _, body in results}
    assert versions == {v1.manifest.version, v2.manifest.version}
    for i, body in results:
        expected = refs[(body["version"], i)]
        torch.testing.assert_close(_as_vector(body, v1.manifest.labels), expected,
                                   atol=1e-5, rtol=0)
    assert results[-1][1]["version"] == v2.manifest.version


def test_reference_helper_is_not_the_identity(ckpt, bundles):
    """Guard for the checks above: an untrained (identity) copy must score differently."""
    audio = wav_bytes(0.4, seed=1)
    b = bundles["words"]
    blank = copy.deepcopy(b)
    blank.tensors = {k: torch.zeros_like(v) if "adapter" in k else v
                     for k, v in b.tensors.items()}
    assert (reference_scores(ckpt, b, audio) - reference_scores(ckpt, blank, audio)).abs().max() \
        > 1e-3


@pytest.mark.parametrize("preload", ["eager", "lazy"])
def test_a_stored_task_pages_in_over_a_full_device(make_app, store, bundles, preload):
    """Was 507 slots_full (issue 24): a store task is never refused for lack of slots; it is
    read from disk the first time and from host memory after its eviction."""
    bundles["birds"].save(store / "birds.safetensors")
    bundles["words"].save(store / "words.safetensors")
    with served(make_app(max_tasks=1, preload=preload)) as c:
        first = "birds" if preload == "eager" else "words"
        other = "words" if first == "birds" else "birds"
        r = _classify(c, first, wav_bytes())
        assert r.status_code == 200
        assert r.headers.get("x-aat-task-load") == (None if preload == "eager" else "disk")
        r = _classify(c, other, wav_bytes())
        assert (r.status_code, r.headers["x-aat-task-load"]) == (200, "disk")
        assert r.json()["version"] == bundles[other].manifest.version
        assert _states(c) == {first: "cached", other: "active"}
        r = _classify(c, first, wav_bytes())
        assert (r.status_code, r.headers["x-aat-task-load"]) == (200, "host")
        assert r.json()["version"] == bundles[first].manifest.version


def test_a_deleted_task_leaves_the_host_tier(make_app, store, bundles):
    """Deleting a task drops all its state, its host-memory copy included: stored again, it
    is read from its new file, never served from the stale copy."""
    bundles["birds"].save(store / "birds.safetensors")
    bundles["words"].save(store / "words.safetensors")
    with served(make_app(max_tasks=1, admin_token=ADMIN)) as c:
        assert _states(c) == {"birds": "active", "words": "stored"}
        assert _classify(c, "words", wav_bytes()).headers["x-aat-task-load"] == "disk"
        assert _states(c) == {"birds": "cached", "words": "active"}
        assert c.delete("/tasks/birds", headers=ADMIN_H).status_code == 200
        listing = c.get("/tasks").json()
        assert [t["task"] for t in listing["tasks"]] == ["words"]
        assert (listing["cache"]["cached"], listing["cache"]["stored"]) == (1, 1)
        bundles["birds"].save(store / "birds.safetensors")
        wait_until(lambda: _states(c) == {"birds": "stored", "words": "active"}, 5)
        r = _classify(c, "birds", wav_bytes())
        assert (r.status_code, r.headers["x-aat-task-load"]) == (200, "disk")
