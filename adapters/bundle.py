"""Task bundles: one safetensors file holding a task's trainable weights and its manifest.

Layout::

    tensors       head.norm.{weight,bias}, head.fc.{weight,bias},
                  blocks.{i}.mlp_adapter.fc{1,2}.{weight,bias},      (aat_m, aat_ms, joint)
                  blocks.{i}.spatial_adapter.fc{1,2}.{weight,bias},  (aat_ms, joint)
                  prompts  (depth, P, D)                             (prompt, joint)
    __metadata__  format = "aat-bundle/1", manifest = JSON (see ``Manifest``)

No pickle, no code, no paths: loading parses the safetensors header itself, checks the
manifest schema, every manifest field against sane bounds (``bundle_checks``), every tensor
name, shape and dtype, and that every value is finite and bounded. ``check_backbone`` adds
the checks that need the backbone the bundle runs on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aat_serve.adapters import bundle_checks
from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle_checks import FORMAT, TASK_NAME_RE
from aat_serve.adapters.config import AdapterConfig, BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import (
    AATError,
    BackboneMismatchError,
    BundleError,
    BundleFieldError,
    CheckpointError,
    ConfigError,
)
from aat_serve.adapters.fileio import atomic_write
from aat_serve.adapters.methods import METHODS, get_method
from aat_serve.adapters.model import AudioClassifier

if TYPE_CHECKING:  # only annotated: a bundle file never needs the checkpoint loader
    from aat_serve.adapters.checkpoints import LoadedCheckpoint

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 16 * 1024 * 1024
AUDIOSET_CLASSES = 527
"""A head this wide is taken to be AudioSet's, which is multi-label."""


def check_task_name(name: str) -> str:
    """Return ``name`` if it is a valid task name, else raise ``ConfigError``."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid task name {name!r}: expected 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit")
    return name


@dataclass
class Manifest:
    """What a bundle is: its task, method, labels, feature settings and the backbone it fits."""

    task: str
    method: str
    labels: list[str]
    backbone_fingerprint: str
    backbone: dict[str, Any]
    features: dict[str, Any]
    adapter: dict[str, Any] = field(default_factory=dict)
    multi_label: bool = False
    version: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def feature_config(self) -> FeatureConfig:
        return FeatureConfig.from_dict(self.features)

    @property
    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.from_dict(self.adapter)

    @property
    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig.from_dict(self.backbone)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse and validate a manifest dict, raising ``BundleError`` naming the bad field."""
        if not isinstance(data, dict):
            raise BundleError(f"bundle manifest must be a JSON object, got {type(data).__name__}")
        required = {"task": str, "method": str, "labels": list, "backbone_fingerprint": str,
                    "backbone": dict, "features": dict}
        optional = {"adapter": dict, "multi_label": bool, "version": str, "recipe": dict,
                    "metrics": dict, "created_at": str, "format": str}
        for key in required:
            if key not in data:
                raise BundleError(f"bundle manifest is missing field {key!r}")
        for key, typ in {**required, **optional}.items():
            if key in data and not isinstance(data[key], typ):
                raise BundleError(f"bundle manifest field {key!r} must be {typ.__name__}, "
                                  f"got {type(data[key]).__name__}")
        if data.get("format", FORMAT) != FORMAT:
            raise BundleError(f"unsupported bundle format {data.get('format')!r}; "
                              f"expected {FORMAT!r}")
        try:
            check_task_name(data["task"])
        except ConfigError as e:
            raise BundleError(f"bundle manifest: {e}") from None
        if data["method"] not in METHODS:
            raise BundleError(f"bundle manifest names unknown method {data['method']!r}; "
                              f"expected one of {', '.join(METHODS)}")
        if not get_method(data["method"]).exports_bundle:
            raise BundleError(f"method {data['method']!r} trains the backbone and has no bundle")
        labels = data["labels"]
        if not labels or not all(isinstance(x, str) for x in labels):
            raise BundleError("bundle manifest field 'labels' must be a non-empty list of strings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleFieldError(unknown[0], data[unknown[0]], ", ".join(sorted(known)),
                                   message=f"bundle manifest field {unknown[0]!r} is not a "
                                           f"known field; allowed: {', '.join(sorted(known))}")
        m = cls(**data)
        bundle_checks.check_manifest(m)  # every field against sane bounds
        try:  # the nested configs must parse too
            m.feature_config, m.backbone_config, m.adapter_config  # noqa: B018
        except (TypeError, ValueError) as e:  # ConfigError is a ValueError
            raise BundleError(f"bundle manifest has an invalid config: {e}") from None
        return m


def expected_tensor_shapes(method: str, adapter: AdapterConfig, backbone: BackboneConfig,
                           num_classes: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor a bundle of this method must hold."""
    spec = get_method(method)
    d, r = backbone.embed_dim, adapter.bottleneck
    shapes: dict[str, tuple[int, ...]] = {
        "head.norm.weight": (d,), "head.norm.bias": (d,),
        "head.fc.weight": (num_classes, d), "head.fc.bias": (num_classes,),
    }
    if spec.adapters.num_prompts:
        shapes["prompts"] = (backbone.depth, adapter.num_prompts, d)
    kinds = [k for k, on in (("mlp_adapter", spec.adapters.mlp),
                             ("spatial_adapter", spec.adapters.spatial)) if on]
    for i in range(backbone.depth):
        for kind in kinds:
            shapes[f"blocks.{i}.{kind}.fc1.weight"] = (r, d)
            shapes[f"blocks.{i}.{kind}.fc1.bias"] = (r,)
            shapes[f"blocks.{i}.{kind}.fc2.weight"] = (d, r)
            shapes[f"blocks.{i}.{kind}.fc2.bias"] = (d,)
    return shapes


def _read_header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise BundleError("not a safetensors file: fewer than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n <= 0 or n > _MAX_HEADER or 8 + n > len(data):
        raise BundleError("not a safetensors file: bad header length")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError("not a safetensors file: header is not JSON") from None
    if not isinstance(header, dict):
        raise BundleError("not a safetensors file: header is not an object")
    return header


def _manifest_from_header(header: dict[str, Any]) -> Manifest:
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise BundleError("not a safetensors file: '__metadata__' is not an object")
    if meta.get("format") != FORMAT:
        raise BundleError(f"not an aat bundle: metadata 'format' is {meta.get('format')!r}, "
                          f"expected {FORMAT!r}")
    if "manifest" not in meta:
        raise BundleError("bundle has no 'manifest' in its metadata")
    try:
        raw = json.loads(meta["manifest"])
    except (TypeError, json.JSONDecodeError):
        raise BundleError("bundle manifest is not valid JSON") from None
    return Manifest.from_dict(raw)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """A bundle file's manifest from its safetensors header alone (no tensor is read).

    Errors are ``BundleError`` prefixed with the file name.
    """
    name = Path(path).name
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            data = head + f.read(min(n, _MAX_HEADER + 1))
    except OSError as e:
        raise BundleError(f"cannot read bundle {name}: {e.strerror}") from None
    try:
        return _manifest_from_header(_read_header(data))
    except BundleError as e:
        raise BundleError(f"{name}: {e}") from None


def _sorted_metadata(data: bytes) -> bytes:
    """Rewrite a safetensors header with its metadata keys sorted.

    safetensors writes the metadata map in hash order, which differs between processes; the
    rewritten header has the same length (padded with spaces), so tensor offsets are unchanged.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # cannot happen for the same content; keep safetensors' own bytes
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]


def content_version(tensors: dict[str, torch.Tensor], manifest: Manifest) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    stable = {k: v for k, v in manifest.to_dict().items() if k not in ("version", "created_at")}
    h.update(json.dumps(stable, sort_keys=True).encode())
    return h.hexdigest()[:16]


@dataclass
class TaskBundle:
    """A task's manifest and trainable tensors."""

    manifest: Manifest
    tensors: dict[str, torch.Tensor]

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: AudioClassifier, task: str, labels: list[str],
                   features: FeatureConfig, multi_label: bool = False,
                   recipe: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                   ) -> TaskBundle:
        """Package a trained single-task model's task weights."""
        if not model.method.exports_bundle:
            raise BundleError(f"method {model.method.name!r} trains the backbone; "
                              "save a whole-model checkpoint instead of a bundle")
        if len(labels) != model.num_classes:
            raise BundleError(f"{len(labels)} labels given for a head with "
                              f"{model.num_classes} classes")
        manifest = Manifest(
            task=check_task_name(task), method=model.method.name, labels=list(labels),
            backbone_fingerprint=model.backbone.fingerprint(),
            backbone=model.backbone.cfg.to_dict(), features=features.to_dict(),
            adapter=model.adapter_cfg.to_dict(), multi_label=multi_label,
            recipe=dict(recipe or {}), metrics=dict(metrics or {}),
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in model.task_state_dict().items()}
        manifest.version = content_version(tensors, manifest)
        bundle = cls(manifest, tensors)
        bundle.validate()  # the trainer cannot write a bundle that an upload would refuse
        bundle_checks.check_against_backbone(manifest, model.backbone.cfg)
        return bundle

    # -- bytes and files ------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The bundle file's bytes; the same content always gives the same bytes."""
        meta = {"format": FORMAT, "manifest": json.dumps(self.manifest.to_dict(), sort_keys=True)}
        data = st_save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=meta)
        return _sorted_metadata(data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file in the same folder, fsync, rename)."""
        return atomic_write(path, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> TaskBundle:
        """Parse and validate a bundle (everything that does not need the backbone)."""
        header = _read_header(data)
        manifest = _manifest_from_header(header)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(info, dict):
                raise BundleError(f"not a safetensors file: entry {name!r} is not an object")
            if info.get("dtype") not in _DTYPES:
                raise BundleError(f"bundle tensor {name!r} has dtype {info.get('dtype')!r}; "
                                  f"expected one of {', '.join(_DTYPES)}")
        try:
            tensors = st_load(data)
        except Exception as e:  # safetensors raises its own error types
            raise BundleError(f"bundle tensors cannot be read: {e}") from None
        bundle = cls(manifest, tensors)
        bundle.validate()
        return bundle

    @classmethod
    def load(cls, path: str | os.PathLike) -> TaskBundle:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BundleError(f"cannot read bundle {str(path)!r}: {e.strerror}") from None
        return cls.from_bytes(data)

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Every manifest field (``bundle_checks``), then tensor names and shapes against the
        manifest's own backbone config, then every value finite and bounded."""
        m = self.manifest
        bundle_checks.check_manifest(m)
        bundle_checks.check_labels_fit_head(m.labels, self.tensors)
        expected = expected_tensor_shapes(m.method, m.adapter_config, m.backbone_config,
                                          m.num_classes)
        missing = sorted(set(expected) - set(self.tensors))
        if missing:
            raise BundleError(f"bundle for method {m.method!r} is missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        unexpected = sorted(set(self.tensors) - set(expected))
        if unexpected:
            raise BundleError(f"bundle for method {m.method!r} has unexpected tensor "
                              f"{unexpected[0]!r}")
        for name, shape in expected.items():
            t = self.tensors[name]
            if tuple(t.shape) != shape:
                raise BundleError(f"bundle tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"expected {shape}")
            if t.dtype not in _DTYPES.values():
                raise BundleError(f"bundle tensor {name!r} has dtype {t.dtype}")
        bundle_checks.check_tensors(self.tensors)

    def check_version(self) -> None:
        """Raise ``BundleError`` unless the manifest's version is the content hash."""
        actual = content_version(self.tensors, self.manifest)
        if self.manifest.version != actual:
            raise BundleError(f"the bundle's version {self.manifest.version!r} does not match "
                              f"its content hash {actual!r}")

    def check_backbone(self, backbone: AST, fingerprint: str | None = None) -> None:
        """Raise ``BackboneMismatchError`` unless the bundle was trained on this backbone, and
        ``BundleFieldError`` unless its manifest fits it (geometry, mel bins, clip length)."""
        fp = fingerprint if fingerprint is not None else backbone.fingerprint()
        if self.manifest.backbone_fingerprint != fp:
            raise BackboneMismatchError(
                f"bundle {self.manifest.task!r} was trained on backbone "
                f"{self.manifest.backbone_fingerprint}, but this backbone is {fp}")
        expected = expected_tensor_shapes(self.manifest.method, self.manifest.adapter_config,
                                          backbone.cfg, self.manifest.num_classes)
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing or extra:
            raise BackboneMismatchError(
                f"bundle tensors do not fit this backbone ({backbone.cfg.depth} blocks): "
                f"missing {missing[:3]}, unexpected {extra[:3]}")
        for name, shape in expected.items():
            if tuple(self.tensors[name].shape) != shape:
                raise BackboneMismatchError(
                    f"bundle tensor {name!r} has shape {tuple(self.tensors[name].shape)}, "
                    f"this backbone needs {shape}")
        bundle_checks.check_against_backbone(self.manifest, backbone.cfg)

    # -- use ------------------------------------------------------------------------------
    def build_model(self, backbone: AST, fingerprint: str | None = None) -> AudioClassifier:
        """A single-task model on ``backbone`` with this bundle applied.

        ``backbone`` itself is left as it is: the model's adapters sit on its own copy of it
        (``AudioClassifier``), so several models may be built on one backbone.
        """
        self.check_backbone(backbone, fingerprint)
        m = self.manifest
        model = AudioClassifier(backbone, m.method, m.num_classes, adapter_cfg=m.adapter_config)
        model.load_task_state_dict(self.tensors)
        return model


def head_bundle(ckpt: LoadedCheckpoint, task: str, labels: list[str] | None = None, *,
                multi_label: bool | None = None) -> TaskBundle:
    """A loaded checkpoint's own classifier as a ``head`` task bundle on its backbone.

    Labels: ``labels``, else the checkpoint's ``id2label``, else ``"0".."C-1"``. Multi-label:
    as given, else the Hugging Face ``problem_type``, else True for the 527 AudioSet classes.
    """
    if ckpt.head is None:
        raise CheckpointError(f"checkpoint {ckpt.path!r} ({ckpt.source_format}) has no "
                              "classification head to export")
    c = int(ckpt.head["fc.weight"].shape[0])
    names = list(labels) if labels is not None else ckpt.labels or [str(i) for i in range(c)]
    if len(names) != c:
        raise ConfigError(f"{len(names)} labels given for a head with {c} classes")
    if multi_label is None:
        multi_label = ckpt.multi_label if ckpt.multi_label is not None else c == AUDIOSET_CLASSES
    try:
        model = AudioClassifier(ckpt.backbone, "head", c)
        model.load_task_state_dict({f"head.{k}": v for k, v in ckpt.head.items()})
        return TaskBundle.from_model(
            model, task, names, ckpt.features, multi_label=multi_label,
            recipe={"origin": "checkpoint head", "source_format": ckpt.source_format})
    except AATError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot export the head of {ckpt.path!r}: {e}") from None
