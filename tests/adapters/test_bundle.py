"""Task bundles: exact round trips, one distinct error per wrong case, versions, atomic saves."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.nn import functional as F

from aat_serve.adapters.bundle import FORMAT, TaskBundle, expected_tensor_shapes
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import (
    AATError,
    BackboneMismatchError,
    BundleError,
    BundleFieldError,
    ConfigError,
)
from aat_serve.adapters.methods import BUNDLE_METHODS, METHODS
from aat_serve.adapters.model import AudioClassifier
from tests.helpers import tiny_backbone

LABELS = ["dog", "rain", "siren, wailing", "clock_tick"]
FEATURES = FeatureConfig(num_mel_bins=32, target_length=64, mean=-5.0, std=4.0)


def features(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 64, 32, generator=torch.Generator().manual_seed(seed))


def trained(method: str, steps: int = 2, depth: int = 2) -> AudioClassifier:
    """A model on the seed-0 tiny backbone after a few real AdamW steps."""
    model = AudioClassifier(tiny_backbone(seed=0, depth=depth), method, len(LABELS))
    x = features(batch=4, seed=5)
    y = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def joint_bytes() -> bytes:
    return TaskBundle.from_model(trained("joint"), "esc50", LABELS, FEATURES).to_bytes()


def split(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest dict, tensors) of a bundle, read with plain safetensors + json."""
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return json.loads(meta["manifest"]), dict(st_load(data))


def join(manifest: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save(tensors, metadata={"format": FORMAT, "manifest": json.dumps(manifest)})


# -- round trips ----------------------------------------------------------------------------

@pytest.mark.parametrize("method", BUNDLE_METHODS)
def test_round_trip_reproduces_trained_logits_exactly(method, tmp_path):
    model = trained(method)
    x = features()
    with torch.no_grad():
        want = model(x)
        untrained = AudioClassifier(tiny_backbone(seed=0), method, len(LABELS))(x)
    assert not torch.equal(want, untrained)
    bundle = TaskBundle.from_model(model, "esc50", LABELS, FEATURES, multi_label=True,
                                   recipe={"epochs": 2}, metrics={"acc": 0.5})
    assert set(bundle.tensors) == set(model.task_state_dict())
    path = bundle.save(tmp_path / "esc50.safetensors")
    for loaded in (TaskBundle.from_bytes(bundle.to_bytes()), TaskBundle.load(path)):
        m = loaded.manifest
        assert m.to_dict() == json.loads(json.dumps(bundle.manifest.to_dict()))
        assert (m.task, m.method, m.labels, m.multi_label) == ("esc50", method, LABELS, True)
        assert m.feature_config == FEATURES
        assert m.recipe == {"epochs": 2} and m.metrics == {"acc": 0.5}
        fresh = tiny_backbone(seed=0)  # a new copy of the same frozen weights
        assert fresh.fingerprint() == m.backbone_fingerprint
        built = loaded.build_model(fresh)
        with torch.no_grad():
            assert torch.equal(built(x), want)
        for name, t in model.task_state_dict().items():
            assert torch.equal(loaded.tensors[name], t)


def test_trained_bundle_carries_trained_adapters():
    bundle = TaskBundle.from_model(trained("aat_ms"), "esc50", LABELS, FEATURES)
    # fc2 starts at zero; after training it does not, so the round trip above is not trivial.
    assert bundle.tensors["blocks.0.mlp_adapter.fc2.weight"].abs().sum() > 0
    assert bundle.tensors["blocks.1.spatial_adapter.fc2.bias"].abs().sum() > 0


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("depth", [2, 3])
def test_expected_tensor_shapes_match_the_model(method, depth):
    model = AudioClassifier(tiny_backbone(depth=depth), method, 7)
    shapes = expected_tensor_shapes(method, model.adapter_cfg, model.backbone.cfg, 7)
    assert shapes == {k: tuple(v.shape) for k, v in model.task_state_dict().items()}


@pytest.mark.parametrize("method", ["full", "partial"])
def test_backbone_training_methods_refuse_to_export(method):
    with pytest.raises(BundleError, match=rf"method '{method}' trains the backbone; save a "
                                          "whole-model checkpoint instead of a bundle"):
        TaskBundle.from_model(trained(method, steps=1), "esc50", LABELS, FEATURES)


def test_from_model_checks_labels_and_task_name():
    model = AudioClassifier(tiny_backbone(), "head", len(LABELS))
    with pytest.raises(BundleError, match="3 labels given for a head with 4 classes"):
        TaskBundle.from_model(model, "esc50", LABELS[:3], FEATURES)
    with pytest.raises(ConfigError, match="invalid task name 'ESC'"):
        TaskBundle.from_model(model, "ESC", LABELS, FEATURES)


@pytest.mark.parametrize("changes, message", [
    ({"target_length": 10_000_000}, "bundle field features.target_length is 10000000; allowed: "
     "16..271 (one 16-frame patch up to 4x the 4 time patches of the backbone's positional "
     "grid, at most 4096 patches)"),
    ({"num_mel_bins": 128}, "bundle field features.num_mel_bins is 128; allowed: 32 (the "
     "bundle's backbone's mel bins)"),
    ({"frame_shift_ms": 0.0}, "bundle field features.frame_shift_ms is 0.0; allowed: 1..100 ms"),
    ({"mean": float("nan")}, "bundle field features.mean is nan; allowed: -100..100 (log-mel "
     "units)"),
])
def test_from_model_cannot_export_what_an_upload_refuses(changes, message):
    """The trainer's export (``from_model``) runs the upload's validation."""
    model = trained("aat_m", steps=1)
    good = TaskBundle.from_model(model, "esc50", LABELS, FEATURES)  # a normal export passes
    assert TaskBundle.from_bytes(good.to_bytes()).manifest == good.manifest
    absurd = dataclasses.replace(FEATURES, **changes)
    with pytest.raises(BundleFieldError) as e:
        TaskBundle.from_model(model, "esc50", LABELS, absurd)
    assert str(e.value) == message
    with pytest.raises(BundleFieldError, match=r"^bundle tensor 'head.fc.bias' holds a value of "
                                               r"magnitude 1e\+30; allowed: \|value\| <= 10000$"):
        with torch.no_grad():
            model.head.fc.bias[0] = 1e30
        TaskBundle.from_model(model, "esc50", LABELS, FEATURES)


# -- one distinct error per wrong case --------------------------------------------------------

def _edit_manifest(**changes):
    def edit(data: bytes) -> bytes:
        manifest, tensors = split(data)
        for k, v in changes.items():
            if v is _DROP:
                manifest.pop(k)
            else:
                manifest[k] = v
        return join(manifest, tensors)
    return edit


def _edit_tensors(fn):
    def edit(data: bytes) -> bytes:
        manifest, tensors = split(data)
        fn(tensors)
        return join(manifest, tensors)
    return edit


def _set(name, value):
    return _edit_tensors(lambda t: t.__setitem__(name, value))


def _nested(section, **changes):
    def edit(data: bytes) -> bytes:
        manifest, tensors = split(data)
        manifest[section] = {**manifest[section], **changes}
        return join(manifest, tensors)
    return edit


def _poison(value):
    def fn(t):
        w = t["head.fc.weight"].clone()
        w[1, 2] = value
        t["head.fc.weight"] = w
    return _edit_tensors(fn)


_DROP = object()
_RANDOM = bytes(torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(0)).tolist())

BAD_CASES = {
    "empty": (lambda d: b"", "not a safetensors file: fewer than 8 bytes"),
    "random bytes": (lambda d: _RANDOM, "not a safetensors file: bad header length"),
    "header not json": (lambda d: struct.pack("<Q", 4) + b"abcd",
                        "not a safetensors file: header is not JSON"),
    "plain safetensors": (lambda d: st_save(split(d)[1]),
                          "not an aat bundle: metadata 'format' is None, expected "
                          "'aat-bundle/1'"),
    "other format": (lambda d: st_save(split(d)[1], metadata={"format": "gguf"}),
                     "not an aat bundle: metadata 'format' is 'gguf'"),
    "missing manifest": (lambda d: st_save(split(d)[1], metadata={"format": FORMAT}),
                         "bundle has no 'manifest' in its metadata"),
    "malformed manifest": (lambda d: st_save(split(d)[1], metadata={
        "format": FORMAT, "manifest": '{"task": "esc50",'}), "bundle manifest is not valid JSON"),
    "manifest not an object": (lambda d: st_save(split(d)[1], metadata={
        "format": FORMAT, "manifest": "[1, 2]"}),
        "bundle manifest must be a JSON object, got list"),
    "missing task": (_edit_manifest(task=_DROP), "bundle manifest is missing field 'task'"),
    "missing labels": (_edit_manifest(labels=_DROP), "bundle manifest is missing field 'labels'"),
    "missing fingerprint": (_edit_manifest(backbone_fingerprint=_DROP),
                            "bundle manifest is missing field 'backbone_fingerprint'"),
    "missing features": (_edit_manifest(features=_DROP),
                         "bundle manifest is missing field 'features'"),
    "labels wrong type": (_edit_manifest(labels="dog"),
                          "bundle manifest field 'labels' must be list, got str"),
    "empty labels": (_edit_manifest(labels=[]),
                     "bundle manifest field 'labels' must be a non-empty list of strings"),
    "unknown method": (_edit_manifest(method="lora"),
                       "bundle manifest names unknown method 'lora'; expected one of full, "
                       "head, partial, prompt, aat_m, aat_ms, joint"),
    "backbone method": (_edit_manifest(method="partial"),
                        "method 'partial' trains the backbone and has no bundle"),
    "future format": (_edit_manifest(format="aat-bundle/2"),
                      "unsupported bundle format 'aat-bundle/2'; expected 'aat-bundle/1'"),
    "task with path": (_edit_manifest(task="../x"),
                       "bundle manifest: invalid task name '../x': expected 1-64 characters"),
    "task upper case": (_edit_manifest(task="A"), "bundle manifest: invalid task name 'A'"),
    "task too long": (_edit_manifest(task="a" * 65),
                      f"bundle manifest: invalid task name '{'a' * 65}'"),
    "backbone field out of range": (_nested("backbone", embed_dim=-1),
                                    "bundle field backbone.embed_dim is -1; allowed: 1..65536"),
    "invalid backbone config": (_nested("backbone", embed_dim=33),
                                "bundle manifest has an invalid config: BackboneConfig.embed_dim "
                                "(33) must be divisible by num_heads (2)"),
    "invalid feature config": (_nested("features", std=0),
                               "bundle field features.std is 0; allowed: 0.01..100 (log-mel "
                               "units)"),
    "no prompts": (_nested("adapter", num_prompts=0),
                   "bundle field adapter.num_prompts is 0; allowed: 1..256 (method 'joint' has "
                   "prompts)"),
    "tensor missing": (_edit_tensors(lambda t: t.pop("blocks.1.mlp_adapter.fc2.bias")),
                       "bundle for method 'joint' is missing tensor "
                       "'blocks.1.mlp_adapter.fc2.bias'"),
    "tensor misshapen": (_set("head.fc.weight", torch.zeros(4, 31)),
                         "bundle tensor 'head.fc.weight' has shape (4, 31), expected (4, 32)"),
    "head rows not labels": (_set("head.fc.weight", torch.zeros(5, 32)),
                             "bundle field labels has 4 labels; allowed: 5 (one per row of "
                             "tensor 'head.fc.weight')"),
    "prompts misshapen": (_set("prompts", torch.zeros(2, 11, 32)),
                          "bundle tensor 'prompts' has shape (2, 11, 32), expected (2, 12, 32)"),
    "extra tensor": (_set("blocks.0.lora.weight", torch.zeros(3)),
                     "bundle for method 'joint' has unexpected tensor 'blocks.0.lora.weight'"),
    "int dtype": (_set("head.fc.bias", torch.arange(4)),
                  "bundle tensor 'head.fc.bias' has dtype 'I64'; expected one of F32, F16, BF16"),
    "bool dtype": (_set("head.fc.bias", torch.ones(4, dtype=torch.bool)),
                   "bundle tensor 'head.fc.bias' has dtype 'BOOL'"),
    "nan": (_poison(float("nan")), "bundle tensor 'head.fc.weight' has non-finite values"),
    "inf": (_poison(float("inf")), "bundle tensor 'head.fc.weight' has non-finite values"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_wrong_bundle_is_a_clear_bundle_error(case, joint_bytes, tmp_path):
    make, message = BAD_CASES[case]
    data = make(joint_bytes)
    with pytest.raises(BundleError) as e:
        TaskBundle.from_bytes(data)
    assert message in str(e.value)
    assert not isinstance(e.value, BackboneMismatchError)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(BundleError) as from_file:
        TaskBundle.load(path)
    assert str(from_file.value) == str(e.value)


def test_wrong_case_messages_are_distinct(joint_bytes):
    messages = {}
    for case, (make, _) in BAD_CASES.items():
        try:
            TaskBundle.from_bytes(make(joint_bytes))
        except BundleError as e:
            messages[case] = str(e)
    same_message = {"nan", "inf"}  # both non-finite, the same error on purpose
    distinct = {m for c, m in messages.items() if c not in same_message}
    assert len(distinct) == len(BAD_CASES) - len(same_message)
    assert messages["nan"] == messages["inf"]


def test_good_bytes_still_load(joint_bytes):
    # The untouched bundle loads, so every failure above is caused by its one edit.
    bundle = TaskBundle.from_bytes(joint_bytes)
    assert TaskBundle.from_bytes(join(*split(joint_bytes))).manifest == bundle.manifest


def test_missing_file_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError, match=r"cannot read bundle .*nope\.safetensors"):
        TaskBundle.load(tmp_path / "nope.safetensors")


def test_backbone_fingerprint_mismatch(joint_bytes):
    bundle = TaskBundle.from_bytes(joint_bytes)
    other = tiny_backbone(seed=1)
    with pytest.raises(BackboneMismatchError) as e:
        bundle.build_model(other)
    assert str(e.value) == (f"bundle 'esc50' was trained on backbone "
                            f"{bundle.manifest.backbone_fingerprint}, but this backbone is "
                            f"{other.fingerprint()}")
    # One frozen weight nudged is enough to be another backbone.
    nudged = tiny_backbone(seed=0)
    with torch.no_grad():
        nudged.blocks[1].mlp.fc2.bias[0] += 1e-6
    with pytest.raises(BackboneMismatchError):
        bundle.check_backbone(nudged)
    bundle.check_backbone(tiny_backbone(seed=0))  # the same weights pass


def test_bundle_whose_shapes_do_not_fit_the_backbone():
    target = tiny_backbone(seed=0)
    fp = target.fingerprint()
    # A bundle claiming this backbone's fingerprint but made for a deeper one.
    deeper = TaskBundle.from_model(trained("aat_m", steps=1, depth=3), "esc50", LABELS, FEATURES)
    manifest, tensors = split(deeper.to_bytes())
    manifest["backbone_fingerprint"] = fp
    forged = TaskBundle.from_bytes(join(manifest, tensors))  # consistent with itself
    with pytest.raises(BackboneMismatchError,
                       match=r"bundle tensors do not fit this backbone \(2 blocks\): missing "
                             r"\[\], unexpected \['blocks.2.mlp_adapter.fc1.bias'"):
        forged.build_model(target)
    # ... and one made for a wider backbone.
    wide = AudioClassifier(tiny_backbone(seed=0, embed_dim=48, num_heads=3), "head", 4)
    manifest, tensors = split(TaskBundle.from_model(wide, "esc50", LABELS, FEATURES).to_bytes())
    manifest["backbone_fingerprint"] = fp
    with pytest.raises(BackboneMismatchError,
                       match=r"bundle tensor 'head.norm.weight' has shape \(48,\), this backbone "
                             r"needs \(32,\)"):
        TaskBundle.from_bytes(join(manifest, tensors)).build_model(target)


def test_errors_are_aat_errors():
    assert issubclass(BackboneMismatchError, BundleError) and issubclass(BundleError, AATError)


# -- versions ----------------------------------------------------------------------------------

def test_version_is_a_content_hash():
    model = trained("aat_m", steps=1)
    a = TaskBundle.from_model(model, "esc50", LABELS, FEATURES)
    b = TaskBundle.from_model(model, "esc50", LABELS, FEATURES)
    assert a.manifest.version and a.manifest.version == b.manifest.version
    assert TaskBundle.from_bytes(a.to_bytes()).manifest.version == a.manifest.version
    with torch.no_grad():
        model.backbone.blocks[1].mlp_adapter.fc2.weight[3, 4] += 1e-4
    c = TaskBundle.from_model(model, "esc50", LABELS, FEATURES)
    assert c.manifest.version != a.manifest.version
    with torch.no_grad():
        model.backbone.blocks[1].mlp_adapter.fc2.weight[3, 4] -= 1e-4
    d = TaskBundle.from_model(model, "esc50", LABELS, FEATURES)
    assert torch.equal(d.tensors["blocks.1.mlp_adapter.fc2.weight"],
                       a.tensors["blocks.1.mlp_adapter.fc2.weight"])
    assert d.manifest.version == a.manifest.version


def test_same_content_gives_the_same_bytes(tmp_path):
    bundle = TaskBundle.from_model(trained("joint", steps=1), "esc50", LABELS, FEATURES)
    # safetensors 0.x writes its metadata map in hash order (random per call); ours is sorted.
    assert len({bundle.to_bytes() for _ in range(8)}) == 1
    changed = TaskBundle(bundle.manifest, {**bundle.tensors, "prompts": bundle.tensors["prompts"]
                                           + 1e-3})
    assert changed.to_bytes() != bundle.to_bytes()
    path = bundle.save(tmp_path / "b.safetensors")
    with safe_open(path, "pt") as f:  # still a valid file for safetensors itself
        assert f.metadata()["format"] == FORMAT
        assert set(f.keys()) == set(bundle.tensors)
        assert torch.equal(f.get_tensor("prompts"), bundle.tensors["prompts"])


# -- atomic saving -----------------------------------------------------------------------------

def assert_same_file_content(path, bundle: TaskBundle) -> None:
    assert path.read_bytes() == bundle.to_bytes()
    loaded = TaskBundle.load(path)
    assert loaded.manifest == TaskBundle.from_bytes(bundle.to_bytes()).manifest
    assert loaded.tensors.keys() == bundle.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], t) for k, t in bundle.tensors.items())


def test_save_writes_exactly_the_bundle_and_leaves_no_temp_files(tmp_path):
    bundle = TaskBundle.from_model(trained("head", steps=1), "esc50", LABELS, FEATURES)
    path = tmp_path / "sub" / "esc50.safetensors"
    assert bundle.save(path) == path
    assert_same_file_content(path, bundle)
    assert [p.name for p in path.parent.iterdir()] == ["esc50.safetensors"]


def test_save_replaces_an_existing_file_whole(tmp_path):
    bundle = TaskBundle.from_model(trained("head", steps=1), "esc50", LABELS, FEATURES)
    path = tmp_path / "esc50.safetensors"
    path.write_bytes(b"x" * (len(bundle.to_bytes()) + 4096))  # longer than the new content
    inode = path.stat().st_ino
    with open(path, "rb") as reader:  # a reader of the old file keeps seeing the old file
        bundle.save(path)
        assert reader.read(4) == b"xxxx"
    assert_same_file_content(path, bundle)
    assert path.stat().st_ino != inode  # renamed into place, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["esc50.safetensors"]


def test_failed_save_keeps_the_old_file_and_cleans_up(tmp_path, monkeypatch):
    bundle = TaskBundle.from_model(trained("head", steps=1), "esc50", LABELS, FEATURES)
    path = tmp_path / "esc50.safetensors"
    path.write_bytes(b"old bundle")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aat_serve.adapters.bundle.os.replace", fail)
    with pytest.raises(OSError, match="No space left"):
        bundle.save(path)
    assert path.read_bytes() == b"old bundle"
    assert [p.name for p in tmp_path.iterdir()] == ["esc50.safetensors"]
