"""The poisoned-bundle matrix (issue 19): bundles whose manifest or weights were edited and
whose content-hash version was then recomputed, so every format check passes, are refused
at upload with 422 ``invalid_bundle`` naming the field, its value and the allowed range; the
previous version keeps answering exactly as before after each. The same files are refused by
``TaskBundle.load`` (or, where only the backbone can tell, ``check_backbone``) and by ``aat
bundle verify`` with the same message, and by the store scan. The bounds' edges are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aat_serve.adapters.bundle import FORMAT, Manifest, TaskBundle, content_version
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import BackboneMismatchError, BundleError, BundleFieldError
from aat_serve.cli.main import main
from aat_serve.service.app import create_app
from aat_serve.service.errors import ErrorType, from_aat_error
from aat_serve.service.settings import Settings
from tests.service.helpers import ADMIN, auth, error, served, wav_bytes

OCTET = {"content-type": "application/octet-stream", **auth(ADMIN)}
WAV = {"content-type": "audio/wav"}
AUDIO = wav_bytes(0.5, seed=4)
TARGET = ("16..271 (one 16-frame patch up to 4x the 4 time patches of the backbone's "
          "positional grid, at most 4096 patches)")
"""The tiny backbone's clip lengths: 16x16 patches at stride 16, a stored grid of 2x4."""
LOG_MEL = " (log-mel units)"


# -- editing a bundle and recomputing its version -------------------------------------------------

def split(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return json.loads(meta["manifest"]), dict(st_load(data))


def rehashed(manifest: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """The bundle's bytes with ``version`` set to its content hash, as a careful attacker
    would write them (unknown manifest keys are not hashed, as the loader drops them)."""
    known = {f.name for f in dataclasses.fields(Manifest)}
    m = Manifest(**{k: v for k, v in manifest.items() if k in known})
    manifest = {**manifest, "version": content_version(tensors, m)}
    return st_save(tensors, metadata={"format": FORMAT, "manifest": json.dumps(manifest)})


def _features(**changes):
    def edit(m, t):
        m["features"].update(changes)
    return edit


def _adapter(**changes):
    def edit(m, t):
        m["adapter"].update(changes)
    return edit


def _backbone(**changes):
    def edit(m, t):
        m["backbone"].update(changes)
    return edit


def _top(**changes):
    def edit(m, t):
        m.update(changes)
    return edit


def _label(i, value):
    def edit(m, t):
        m["labels"][i] = value
    return edit


def _tensor_value(name, value):
    def edit(m, t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value
    return edit


def _scale_all(factor):
    def edit(m, t):
        for k in t:
            t[k] = t[k] * factor
    return edit


def _drop_label(m, t):
    m["labels"].pop()


def _field(name, value, allowed):
    return f"bundle field {name} is {value}; allowed: {allowed}"


# (case, edit, field named, exact message, needs the backbone to tell)
CASES = [
    ("target_length 10^7", _features(target_length=10_000_000), "features.target_length",
     _field("features.target_length", 10000000, TARGET), False),
    ("target_length one above the grid", _features(target_length=272), "features.target_length",
     _field("features.target_length", 272, TARGET), False),
    ("target_length below one patch", _features(target_length=15), "features.target_length",
     _field("features.target_length", 15, TARGET), False),
    ("target_length 0", _features(target_length=0), "features.target_length",
     _field("features.target_length", 0, TARGET), False),
    ("target_length negative", _features(target_length=-64), "features.target_length",
     _field("features.target_length", -64, TARGET), False),
    ("num_mel_bins 128 on 32", _features(num_mel_bins=128), "features.num_mel_bins",
     _field("features.num_mel_bins", 128, "32 (the bundle's backbone's mel bins)"), False),
    ("mel bins 128 in features and claimed backbone", lambda m, t: (
        _features(num_mel_bins=128)(m, t), _backbone(num_mel_bins=128)(m, t)),
     "backbone.num_mel_bins", _field("backbone.num_mel_bins", 128, "32 (this backbone's)"),
     True),
    ("frame_shift_ms 0", _features(frame_shift_ms=0), "features.frame_shift_ms",
     _field("features.frame_shift_ms", 0, "1..100 ms"), False),
    ("frame_shift_ms negative", _features(frame_shift_ms=-10.0), "features.frame_shift_ms",
     _field("features.frame_shift_ms", -10.0, "1..100 ms"), False),
    ("frame_length_ms 0", _features(frame_length_ms=0.0), "features.frame_length_ms",
     _field("features.frame_length_ms", 0.0, "10..200 ms, and at least frame_shift_ms"), False),
    ("frame_length_ms under the shift", _features(frame_length_ms=8.0),
     "features.frame_length_ms",
     _field("features.frame_length_ms", 8.0, "10..200 ms, and at least frame_shift_ms"), False),
    ("frame_length_ms huge", _features(frame_length_ms=1e6), "features.frame_length_ms",
     _field("features.frame_length_ms", 1000000.0, "10..200 ms, and at least frame_shift_ms"),
     False),
    ("mean inf", _features(mean=math.inf), "features.mean",
     _field("features.mean", "inf", "-100..100" + LOG_MEL), False),
    ("mean nan", _features(mean=math.nan), "features.mean",
     _field("features.mean", "nan", "-100..100" + LOG_MEL), False),
    ("mean far off", _features(mean=1e6), "features.mean",
     _field("features.mean", 1000000.0, "-100..100" + LOG_MEL), False),
    ("std 1e-38", _features(std=1e-38), "features.std",
     _field("features.std", 1e-38, "0.01..100" + LOG_MEL), False),
    ("std just below the bound", _features(std=0.0099), "features.std",
     _field("features.std", 0.0099, "0.01..100" + LOG_MEL), False),
    ("std negative", _features(std=-4.0), "features.std",
     _field("features.std", -4.0, "0.01..100" + LOG_MEL), False),
    ("std inf", _features(std=math.inf), "features.std",
     _field("features.std", "inf", "0.01..100" + LOG_MEL), False),
    ("sample_rate 1", _features(sample_rate=1), "features.sample_rate",
     _field("features.sample_rate", 1, "8000..96000 Hz"), False),
    ("sample_rate 1e9", _features(sample_rate=1_000_000_000), "features.sample_rate",
     _field("features.sample_rate", 1000000000, "8000..96000 Hz"), False),
    ("sample_rate not an integer", _features(sample_rate=16000.5), "features.sample_rate",
     _field("features.sample_rate", 16000.5, "an integer"), False),
    ("max_duration_s 1e-9", _features(max_duration_s=1e-9), "features.max_duration_s",
     _field("features.max_duration_s", 1e-09,
            "1..3600 s (at most 360000 frames of 10 ms)"), False),
    ("max_duration_s a year", _features(max_duration_s=3.2e7), "features.max_duration_s",
     _field("features.max_duration_s", 32000000.0,
            "1..3600 s (at most 360000 frames of 10 ms)"), False),
    ("max_duration_s too long for a 1 ms shift",
     _features(frame_shift_ms=1.0, max_duration_s=360.5), "features.max_duration_s",
     _field("features.max_duration_s", 360.5, "1..360 s (at most 360000 frames of 1 ms)"),
     False),
    ("window unknown", _features(window="rectangular"), "features.window",
     _field("features.window", "'rectangular'", "'hanning'"), False),
    ("unknown feature setting", _features(dither=1.0), "features.dither",
     "bundle field features.dither is not a known field; allowed: sample_rate, num_mel_bins, "
     "target_length, mean, std, frame_length_ms, frame_shift_ms, max_duration_s, window",
     False),
    ("label of 100,000 characters", _label(2, "x" * 100_000), "labels[2]",
     _field("labels[2]", "'" + "x" * 59 + "... (100000 characters)", "1..256 characters"),
     False),
    ("label of 257 characters", _label(0, "y" * 257), "labels[0]",
     _field("labels[0]", "'" + "y" * 59 + "... (257 characters)", "1..256 characters"), False),
    ("empty label", _label(1, ""), "labels[1]", _field("labels[1]", "''", "1..256 characters"),
     False),
    ("duplicate label", _label(3, "words-1"), "labels[3]",
     _field("labels[3]", "'words-1'", "a label not used before (it is labels[1])"), False),
    ("label with a control character", _label(0, "a\nb"), "labels[0]",
     _field("labels[0]", "'a\\nb'", "printable text (no control characters)"), False),
    ("label count differs from the head", _drop_label, "labels",
     "bundle field labels has 4 labels; allowed: 5 (one per row of tensor 'head.fc.weight')",
     False),
    ("weights x 1e30", _scale_all(1e30), "blocks.0.mlp_adapter.fc1.bias", None, False),
    ("one huge finite value", _tensor_value("head.fc.bias", 1e20), "head.fc.bias",
     "bundle tensor 'head.fc.bias' holds a value of magnitude 1e+20; allowed: |value| <= 10000",
     False),
    ("a value just over the bound", _tensor_value("head.fc.weight", -2e4), "head.fc.weight",
     "bundle tensor 'head.fc.weight' holds a value of magnitude 2e+04; allowed: |value| <= "
     "10000", False),
    ("unknown method", _top(method="lora"), "method",
     "bundle manifest names unknown method 'lora'; expected one of full, head, partial, prompt, "
     "aat_m, aat_ms, joint", False),
    ("num_prompts 10^6 on a method without prompts", _adapter(num_prompts=1_000_000),
     "adapter.num_prompts",
     _field("adapter.num_prompts", 1000000, "0 (method 'aat_m' has no prompts)"), False),
    ("spatial adapters the method lacks", _adapter(spatial=True), "adapter.spatial",
     _field("adapter.spatial", True, "False (what method 'aat_m' adds)"), False),
    ("bottleneck 0", _adapter(bottleneck=0), "adapter.bottleneck",
     _field("adapter.bottleneck", 0, "1..4096"), False),
    ("multi_label not a bool", _top(multi_label="yes"), "multi_label",
     "bundle manifest field 'multi_label' must be bool, got str", False),
    ("created_at not a time", _top(created_at="yesterday"), "created_at",
     _field("created_at", "'yesterday'",
            "empty or an ISO 8601 time, e.g. 2025-01-31T12:00:00+00:00"), False),
    ("metrics of 300 kB", _top(metrics={"log": "z" * 300_000}), "metrics",
     "bundle field metrics has 300011 bytes of JSON; allowed: at most 262144", False),
    ("unknown manifest field", _top(evil="x" * 1000), "evil",
     "bundle manifest field 'evil' is not a known field; allowed: adapter, backbone, "
     "backbone_fingerprint, created_at, features, format, labels, method, metrics, "
     "multi_label, recipe, task, version", False),
    ("recipe not an object", _top(recipe=[1, 2]), "recipe",
     "bundle manifest field 'recipe' must be dict, got list", False),
    ("future format", _top(format="aat-bundle/2"), "format",
     "unsupported bundle format 'aat-bundle/2'; expected 'aat-bundle/1'", False),
    ("task name with a path", _top(task="../words"), "task",
     "bundle manifest: invalid task name '../words': expected 1-64 characters of a-z, 0-9, "
     "'_' or '-', starting with a letter or digit", False),
    ("malformed fingerprint", _top(backbone_fingerprint="md5:abc"), "backbone_fingerprint",
     _field("backbone_fingerprint", "'md5:abc'", "'sha256:' and 32 hex digits"), False),
    ("backbone depth 10^6", _backbone(depth=1_000_000), "backbone.depth",
     _field("backbone.depth", 1000000, "1..256"), False),
    ("claimed geometry differs", _backbone(mlp_hidden=128), "backbone.mlp_hidden",
     _field("backbone.mlp_hidden", 128, "64 (this backbone's)"), True),
    ("claimed positional grid stretched", _backbone(pos_grid=[2, 400]), "backbone.pos_grid",
     _field("backbone.pos_grid", [2, 400], "[2, 4] (this backbone's positional grid)"), True),
]
IDS = [c[0] for c in CASES]


def poison(good: bytes, edit) -> tuple[bytes, dict[str, torch.Tensor]]:
    manifest, tensors = split(good)
    edit(manifest, tensors)
    return rehashed(manifest, tensors), tensors


def expected_message(case, tensors) -> str:
    _, _, field, message, _ = case
    if message is None:  # the first tensor in name order, scaled
        name = field
        peak = float(tensors[name].abs().max())
        message = (f"bundle tensor {name!r} holds a value of magnitude {peak:.3g}; "
                   "allowed: |value| <= 10000")
    return message


# -- the service ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good(bundles) -> TaskBundle:
    return bundles["words"]


@pytest.fixture(scope="module")
def service(ckpt_dir, good, tmp_path_factory):
    """One app for the whole matrix, serving ``good`` as the task's active version."""
    store = tmp_path_factory.mktemp("poison-store")
    app = create_app(Settings(checkpoint=ckpt_dir, bundle_dir=store, admin_token=ADMIN,
                              max_wait_ms=2.0, refresh_s=0.2))
    with served(app) as c:
        r = c.put("/tasks/words", content=good.to_bytes(), headers=OCTET)
        assert r.status_code == 201, r.text
        before = c.post("/classify/words?top_k=5", content=AUDIO, headers=WAV).json()
        yield c, before


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_poisoned_upload_is_422_naming_the_field(service, good, case):
    c, before = service
    data, tensors = poison(good.to_bytes(), case[1])
    message = expected_message(case, tensors)
    assert case[2] in message
    r = c.put("/tasks/words", content=data, headers=OCTET)
    assert (r.status_code, r.json()) == error(422, "invalid_bundle", message)
    after = c.post("/classify/words?top_k=5", content=AUDIO, headers=WAV)
    assert after.status_code == 200
    body = after.json()
    assert body["version"] == before["version"] == good.manifest.version
    assert body["predictions"][0]["label"] == before["predictions"][0]["label"]
    assert body["predictions"] == before["predictions"]


def test_a_version_that_is_no_safe_name_is_refused_before_its_hash(service, good):
    c, before = service
    manifest, tensors = split(good.to_bytes())
    manifest["version"] = "../../etc"
    data = st_save(tensors, metadata={"format": FORMAT, "manifest": json.dumps(manifest)})
    r = c.put("/tasks/words", content=data, headers=OCTET)
    assert (r.status_code, r.json()) == error(422, "invalid_bundle", _field(
        "version", "'../../etc'", "1-64 characters of a-z, 0-9, '_' or '-' (the content hash)"))
    body = c.post("/classify/words?top_k=5", content=AUDIO, headers=WAV).json()
    assert (body["version"], body["predictions"]) == (before["version"], before["predictions"])


def test_the_matrix_covers_every_manifest_field():
    assert len(CASES) >= 20
    fields = {c[2].split("[")[0] for c in CASES}
    feature_fields = {f.name for f in dataclasses.fields(FeatureConfig)} - {"extra"}
    assert {f"features.{k}" for k in feature_fields} <= fields
    assert {"labels", "method", "multi_label", "created_at", "metrics", "recipe", "format",
            "task", "backbone_fingerprint", "adapter.num_prompts", "adapter.spatial",
            "adapter.bottleneck", "backbone.depth", "backbone.num_mel_bins",
            "backbone.pos_grid"} <= fields


def _edge(**features):
    return _features(**features)


ACCEPTED = [
    ("target_length at the grid's maximum", _edge(target_length=271)),
    ("target_length of one patch", _edge(target_length=16)),
    ("std at its floor", _edge(std=0.01)),
    ("mean at +100", _edge(mean=100.0)),
    ("mean at -100", _edge(mean=-100.0)),
    ("sample_rate 8 kHz", _edge(sample_rate=8000)),
    ("sample_rate 96 kHz", _edge(sample_rate=96000)),
    ("longest frames", _edge(frame_shift_ms=100.0, frame_length_ms=200.0)),
    ("1 ms shift at its longest clip", _edge(frame_shift_ms=1.0, max_duration_s=360.0)),
    ("max_duration_s an hour", _edge(max_duration_s=3600.0)),
    ("max_duration_s one second", _edge(max_duration_s=1.0)),
    ("a weight of exactly 1e4", _tensor_value("head.fc.bias", 1e4)),
    ("a label of 256 characters and others with commas and accents",
     lambda m, t: m.update(labels=["w" * 256, "siren, wailing", "café", "(x)", "words-4"])),
]


def test_the_bounds_edges_and_the_unedited_bundle_are_accepted(service, good):
    c, before = service
    r = c.put("/tasks/words", content=good.to_bytes(), headers=OCTET)
    assert (r.status_code, r.json()["unchanged"]) == (200, True)
    for name, edit in ACCEPTED:
        data, _ = poison(good.to_bytes(), edit)
        r = c.put("/tasks/words", content=data, headers=OCTET)
        assert r.status_code == 200, (name, r.text)
        version = r.json()["version"]
        assert version != good.manifest.version, name
        body = c.post("/classify/words?top_k=5", content=AUDIO, headers=WAV).json()
        assert body["version"] == version, name
        assert all(math.isfinite(p["score"]) for p in body["predictions"]), name
    r = c.put("/tasks/words", content=good.to_bytes(), headers=OCTET)  # back to the original
    assert r.status_code == 200
    body = c.post("/classify/words?top_k=5", content=AUDIO, headers=WAV).json()
    assert (body["version"], body["predictions"]) == (before["version"], before["predictions"])


# -- the same refusal everywhere else a bundle enters -------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_and_verify_refuse_a_poisoned_file_alike(case, good, ckpt, ckpt_dir, tmp_path,
                                                      capsys):
    data, tensors = poison(good.to_bytes(), case[1])
    message = expected_message(case, tensors)
    path = tmp_path / "poisoned.safetensors"
    path.write_bytes(data)
    needs_backbone = case[4]
    if needs_backbone:
        bundle = TaskBundle.load(path)  # consistent with itself ...
        with pytest.raises(BundleFieldError) as e:  # ... but not with this backbone
            bundle.check_backbone(ckpt.backbone)
    else:
        with pytest.raises(BundleError) as e:
            TaskBundle.load(path)
    assert str(e.value) == message
    assert not isinstance(e.value, BackboneMismatchError)
    assert main(["bundle", "verify", str(path), "--checkpoint", str(ckpt_dir)]) == 1
    what = f"does not fit checkpoint {str(ckpt_dir)!r}" if needs_backbone else "is refused"
    assert capsys.readouterr().err == f"error: bundle {str(path)!r} {what}: {message}\n"


def test_verify_accepts_the_good_file_and_an_edge(good, ckpt_dir, tmp_path, capsys):
    for name, data in (("good", good.to_bytes()),
                       ("edge", poison(good.to_bytes(), _edge(target_length=271))[0])):
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        assert main(["bundle", "verify", str(path), "--checkpoint", str(ckpt_dir)]) == 0
        assert capsys.readouterr().out.startswith("ok: bundle 'words' (aat_m, version ")


def test_the_store_scan_skips_a_poisoned_file(make_app, store, bundles):
    data, _ = poison(bundles["words"].to_bytes(), _features(target_length=10_000_000))
    (store / "words.safetensors").write_bytes(data)
    bundles["birds"].save(store / "birds.safetensors")
    with served(make_app()) as c:
        listed = {t["task"]: t for t in c.get("/tasks").json()["tasks"]}
        assert listed["birds"]["state"] == "active" and listed["words"]["state"] == "failed"
        assert "features.target_length is 10000000" in listed["words"]["reason"]
        refused = c.post("/classify/words", content=AUDIO, headers=WAV)
        assert refused.status_code == 500 and refused.json()["error"]["type"] == "task_failed"
        assert c.post("/classify/birds", content=AUDIO, headers=WAV).status_code == 200
        assert 'aat_bundle_loads_total{outcome="refused",source="store"} 1.0' in \
            c.get("/metrics").text


def test_a_field_error_is_an_invalid_bundle_with_its_parts():
    e = BundleFieldError("features.target_length", 10_000_000, "16..271")
    assert (e.field, e.value, e.allowed) == ("features.target_length", 10_000_000, "16..271")
    assert str(e) == "bundle field features.target_length is 10000000; allowed: 16..271"
    mapped = from_aat_error(e)
    assert (mapped.status, mapped.type, mapped.message) == (422, "invalid_bundle", str(e))
    assert ErrorType.INVALID_BUNDLE.status == 422
    assert from_aat_error(BackboneMismatchError("x")).status == 409  # unlike a mismatch
