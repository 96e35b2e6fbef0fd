"""One bad bundle never hurts another task: poisoned store files at start-up and on refresh,
warm-up failures, the previous version kept, orphan temporary files removed."""

from __future__ import annotations

import dataclasses
import os
import re
import time

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle, content_version
from aat_serve.adapters.multitask import MultiTaskModel
from tests.service.helpers import (
    ADMIN,
    auth,
    error,
    load_tiny,
    make_bundle,
    served,
    wait_until,
    wav_bytes,
    write_tiny_checkpoint,
)

WAV = {"content-type": "audio/wav"}


def _classify(c, task):
    return c.post(f"/classify/{task}?top_k=10", content=wav_bytes(0.5, seed=4), headers=WAV)


def _states(c) -> dict[str, tuple[str, str | None]]:
    return {t["task"]: (t["state"], t["reason"]) for t in c.get("/tasks").json()["tasks"]}


def _metric(c, line: str) -> float | None:
    m = re.search(rf"^{re.escape(line)} (\S+)$", c.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


def _with_nan(bundle: TaskBundle) -> bytes:
    """``bundle`` with one NaN weight, its version recomputed (a new, poisoned version)."""
    tensors = {k: v.clone() for k, v in bundle.tensors.items()}
    tensors["head.fc.bias"][1] = float("nan")
    m = dataclasses.replace(bundle.manifest, version="0")
    m = dataclasses.replace(m, version=content_version(tensors, m))
    assert m.version != bundle.manifest.version
    return TaskBundle(m, tensors).to_bytes()


class Poison:
    """Makes ``MultiTaskModel.classify`` raise, or return NaN, for the task ``words``."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.on = True

    def wrap(self, real):
        def classify(model, features, tasks):
            if self.on and "words" in tasks:
                if self.mode == "raise":
                    raise RuntimeError("words is poisoned")
                out = real(model, features, tasks)
                return [torch.full_like(o, float("nan")) if t == "words" else o
                        for o, t in zip(out, tasks, strict=True)]
            return real(model, features, tasks)

        return classify


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    other = load_tiny(write_tiny_checkpoint(tmp_path_factory.mktemp("other"), seed=9))
    return make_bundle(other, "words", method="aat_m", num_classes=5, seed=2)


def _poison(kind, bundles, foreign, ckpt, monkeypatch) -> tuple[bytes, str, Poison | None]:
    """(the file to write as words.safetensors, the reason GET /tasks must show, a patch)."""
    good = bundles["words"]
    if kind == "garbage":
        return b"\x00garbage" * 16, "words.safetensors: not a safetensors file: bad header "\
                                     "length", None
    if kind == "nan":
        return _with_nan(good), "bundle tensor 'head.fc.bias' has non-finite values", None
    if kind == "backbone":
        fp = ckpt.backbone.fingerprint()
        return foreign.to_bytes(), (f"bundle 'words' was trained on backbone "
                                    f"{foreign.manifest.backbone_fingerprint}, but this "
                                    f"backbone is {fp}"), None
    patch = Poison(kind)
    monkeypatch.setattr(MultiTaskModel, "classify", patch.wrap(MultiTaskModel.classify))
    reason = ("its warm-up forward failed: RuntimeError: words is poisoned" if kind == "raise"
              else "its warm-up forward gave non-finite scores (NaN or infinity) on an "
                   "all-zero input")
    return good.to_bytes(), reason, patch


@pytest.mark.parametrize("kind", ["garbage", "nan", "backbone", "raise", "nonfinite"])
def test_a_poisoned_store_file_does_not_stop_the_other_tasks(make_app, store, ckpt, bundles,
                                                             foreign, monkeypatch, kind):
    bundles["birds"].save(store / "birds.safetensors")
    bundles["tags"].save(store / "tags.safetensors")
    data, reason, patch = _poison(kind, bundles, foreign, ckpt, monkeypatch)
    (store / "words.safetensors").write_bytes(data)
    with served(make_app()) as c:  # /readyz is 200 despite the poisoned task
        assert c.get("/readyz").json()["failed_tasks"] == 1
        assert _classify(c, "birds").status_code == 200
        assert _classify(c, "tags").status_code == 200
        assert _states(c) == {"birds": ("active", None), "tags": ("active", None),
                              "words": ("failed", reason)}
        r = _classify(c, "words")
        assert (r.status_code, r.json()) == error(
            500, "task_failed", f"task 'words' cannot answer: its bundle in the store failed: "
                                f"{reason}")
        assert _metric(c, 'aat_bundles_failed{task="words"}') == 1.0
        assert _metric(c, 'aat_bundles_failed{task="birds"}') is None
        assert _metric(c, 'aat_requests_total{outcome="task_failed",task="words"}') == 1.0
        # fixed: a good file replaces the poisoned one and is picked up by the rescan
        if patch is not None:
            patch.on = False
            os.utime(store / "words.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
        else:
            bundles["words"].save(store / "words.safetensors")
        wait_until(lambda: _states(c).get("words") == ("active", None), 10)
        r = _classify(c, "words")
        assert r.status_code == 200 and r.json()["version"] == bundles["words"].manifest.version
        assert _metric(c, 'aat_bundles_failed{task="words"}') is None
        assert c.get("/readyz").json()["failed_tasks"] == 0


def test_a_failing_replacement_keeps_the_previous_version_serving(make_app, store, bundles):
    v1 = bundles["words"]
    v1.save(store / "words.safetensors")
    with served(make_app()) as c:
        before = _classify(c, "words").json()
        assert before["version"] == v1.manifest.version
        (store / "words.safetensors").write_bytes(_with_nan(v1))  # straight into the store
        reason = "bundle tensor 'head.fc.bias' has non-finite values"
        wait_until(lambda: _states(c)["words"] == ("active", reason), 10)
        after = _classify(c, "words").json()
        assert after["version"] == v1.manifest.version
        assert after["predictions"] == before["predictions"]
        assert c.get("/tasks/words").json()["version"] == v1.manifest.version
        assert _metric(c, 'aat_bundles_failed{task="words"}') == 1.0
        assert c.get("/readyz").json()["failed_tasks"] == 0  # it still serves


def test_a_version_failing_its_warm_up_is_replaced_by_the_stored_previous_one(
        make_app, store, ckpt, bundles, monkeypatch):
    v1 = bundles["words"]
    v2 = make_bundle(ckpt, "words", method="aat_m", num_classes=5, seed=22)
    v2_version = v2.manifest.version
    real = MultiTaskModel.classify

    def classify(model, features, tasks):  # v2's forward fails, v1's works
        if "words" in tasks and model.tasks["words"].version == v2_version:
            raise RuntimeError("v2 is poisoned")
        return real(model, features, tasks)

    monkeypatch.setattr(MultiTaskModel, "classify", classify)
    with served(make_app(admin_token=ADMIN)) as c:
        r = c.put("/tasks/words", content=v1.to_bytes(),
                  headers={"content-type": "application/octet-stream", **auth(ADMIN)})
        assert r.status_code == 201
        (store / "words" / f"{v2_version}.safetensors").write_bytes(v2.to_bytes())
        (store / "words" / "ACTIVE").write_text(v2_version + "\n")
        reason = "its warm-up forward failed: RuntimeError: v2 is poisoned"
        wait_until(lambda: _states(c)["words"] == ("active", reason), 10)
        r = _classify(c, "words")
        assert r.status_code == 200 and r.json()["version"] == v1.manifest.version
        assert _metric(c, 'aat_bundle_loads_total{outcome="warm_up_failed",source="store"}'
                       ) == 1.0


def test_orphan_temporary_files_are_removed_at_start_up(make_app, store, bundles):
    bundles["birds"].save(store / "birds.safetensors")
    (store / "tags").mkdir()
    old = [store / ".words.safetensors.ab12cd34.tmp", store / "tags" / ".ACTIVE.x_9yz0qq.tmp"]
    young = store / ".tags.safetensors.zz99yy88.tmp"  # maybe another replica's live upload
    lookalike = store / "notes.ab12cd34.tmp"  # not a name atomic_write makes
    hour_ago = time.time() - 3600
    for p in (*old, young, lookalike):
        p.write_bytes(b"partial")
    for p in (*old, lookalike):
        os.utime(p, (hour_ago, hour_ago))
    good = (store / "birds.safetensors").read_bytes()
    with served(make_app()) as c:
        assert [p.exists() for p in old] == [False, False]
        assert young.exists() and lookalike.exists()
        assert (store / "birds.safetensors").read_bytes() == good
        assert _classify(c, "birds").status_code == 200
