"""Every field of a task bundle checked against sane bounds and against the backbone.

A bundle is untrusted input: an upload, a file in the store or a file on the command line may
hold a manifest whose values parse but cannot be served (a clip of ten million frames, mel
bins the backbone does not have, a frame shift of zero, a normalisation that divides by
1e-38, labels of a hundred thousand characters) or weights that overflow. The checks come in
two groups, and both run before a bundle is accepted anywhere:

* ``check_manifest`` and ``check_tensors`` need nothing but the bundle. ``Manifest.from_dict``
  (so also the header-only ``read_manifest`` of the store scan) and ``TaskBundle.validate``
  (every ``from_bytes``, ``load`` and ``from_model``) run them.
* ``check_against_backbone`` needs the backbone the bundle will run on (mel bins, the longest
  clip its positional grid supports, the geometry the manifest claims). ``TaskBundle.
  check_backbone`` runs it after the fingerprint and shape checks, so uploads, the store scan,
  ``aat bundle verify``, model building and ``TaskBundle.from_model`` all do.

Each refusal is a ``BundleFieldError`` naming the field, its value and the allowed range; the
service answers it with 422 ``invalid_bundle``. The bounds are deliberately wide: far outside
anything a real task needs, tight enough that nothing inside them can exhaust memory or turn
scores into NaN.
"""

from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from datetime import datetime
from typing import TYPE_CHECKING, Any

import torch

from aat_serve.adapters.config import AdapterConfig, BackboneConfig, FeatureConfig
from aat_serve.adapters.errors import BundleError, BundleFieldError
from aat_serve.adapters.methods import METHODS

if TYPE_CHECKING:
    from aat_serve.adapters.bundle import Manifest

FORMAT = "aat-bundle/1"
TASK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_RE = TASK_NAME_RE
"""A version is stored as a file name (``<task>/<version>.safetensors``): the same safe set."""
FINGERPRINT_RE = re.compile(r"^sha256:[0-9a-f]{32}$")

SAMPLE_RATE_HZ = (8_000, 96_000)
"""Telephone speech to high-resolution studio audio; AST and its recipes use 16 kHz."""
FRAME_SHIFT_MS = (1.0, 100.0)
FRAME_LENGTH_MS = (5.0, 200.0)
"""Kaldi's fbank uses 10 ms / 25 ms; the window must also be at least the shift."""
MAX_DURATION_S = (1.0, 3_600.0)
"""The shortest clips of the supported data sets (Speech Commands) last 1 s; an hour bounds
decoding memory. The service further caps it with ``AAT_MAX_AUDIO_SECONDS``."""
MAX_CLIP_FRAMES = 360_000
"""Feature frames of one longest clip (``max_duration_s / frame_shift``): an hour at the
usual 10 ms shift. The whole clip is featurised before it is cut to ``target_length``."""
MEAN_RANGE = (-100.0, 100.0)
STD_RANGE = (0.01, 100.0)
"""Kaldi log-mel values lie between log(float32 eps) = -15.9 and about +30 for full-scale
audio, so a data set's mean lies well inside +-100 and its std between about 0.1 and 30. Below
0.01 the normalisation ``(x - mean) / (2 std)`` pushes features towards fp16 overflow."""
MAX_POS_STRETCH = 4
"""A clip may have at most this many times the time patches of the backbone's stored
positional grid (interpolated, as AST does). The longest recipe, GTZAN (3000 frames on
AudioSet's 1024-frame grid), stretches it 2.97 times."""
MAX_PATCHES = 4_096
"""Compute budget of one clip: patch tokens per transformer layer (AudioSet's 1024 frames are
1212; GTZAN's 3000 are 3588). Attention cost grows with its square."""
MAX_LABELS = 16_384
MAX_LABEL_CHARS = 256
MAX_PROMPTS = 256
"""VPT uses up to 200 prompt tokens; the paper's methods use 12."""
MAX_BOTTLENECK = 4_096
MAX_DEPTH = 256
MAX_GEOMETRY = 65_536
"""Bound of every other integer of the manifest's backbone geometry (it must also equal the
real backbone's, checked against it)."""
MAX_ABS_WEIGHT = 1e4
"""Largest magnitude of any bundle tensor value. Training moves a weight by about the learning
rate per step (AdamW, <= 5e-4 in every recipe), so a run of 30 epochs ends with weights of
order one: the demo bundles peak at 1.25, public checkpoints' heads and LayerNorms within
+-20. 1e4 is hundreds of times above that, while a head of 1e30 (or 1e5 times a 768-wide
LayerNorm output) overflows even fp32 logits into NaN scores."""
MAX_JSON_BYTES = 256 * 1024
"""Size of the free-form ``recipe`` and ``metrics`` objects, each, as JSON (they are shown by
``GET /tasks/{task}``)."""
MAX_CREATED_AT_CHARS = 64

_FEATURE_TYPES = {"sample_rate": int, "num_mel_bins": int, "target_length": int, "mean": float,
                  "std": float, "frame_length_ms": float, "frame_shift_ms": float,
                  "max_duration_s": float, "window": str}
_ADAPTER_TYPES = {"bottleneck": int, "mlp": bool, "spatial": bool, "num_prompts": int}
_BACKBONE_TYPES = {"embed_dim": int, "depth": int, "num_heads": int, "mlp_hidden": int,
                   "patch_freq": int, "patch_time": int, "freq_stride": int, "time_stride": int,
                   "num_mel_bins": int, "target_length": int, "pos_grid": list,
                   "num_prefix_tokens": int, "norm_eps": float, "head_norm_eps": float,
                   "qkv_bias": bool}
_GEOMETRY = ("embed_dim", "depth", "num_heads", "mlp_hidden", "patch_freq", "patch_time",
             "freq_stride", "time_stride", "num_mel_bins", "num_prefix_tokens")
"""The backbone fields a bundle depends on (those its fingerprint covers, with the grid)."""
_WINDOWS = ("hanning",)
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list or null"}


# -- small helpers -----------------------------------------------------------------------------

def _has_type(value: Any, typ: type) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if typ is float:
        return isinstance(value, int | float)
    if typ is list:
        return value is None or isinstance(value, list | tuple)
    return isinstance(value, typ)


def _check_section(section: str, values: dict[str, Any], types: dict[str, type]) -> None:
    """Every key of a manifest section is known and of its type."""
    for key, value in values.items():
        if key not in types:
            raise BundleFieldError(f"{section}.{key}", value,
                                   f"only the fields {', '.join(types)}",
                                   message=f"bundle field {section}.{key} is not a known field; "
                                           f"allowed: {', '.join(types)}")
        if not _has_type(value, types[key]):
            raise BundleFieldError(f"{section}.{key}", value, _TYPE_NAMES[types[key]])


def _check_range(field: str, value: float, lo: float, hi: float, note: str = "") -> None:
    """``lo <= value <= hi`` (NaN and infinities are outside every range)."""
    if not (isinstance(value, int | float) and lo <= value <= hi):
        span = f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"
        raise BundleFieldError(field, value, f"{span}{note}")


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


# -- features ----------------------------------------------------------------------------------

def target_length_range(backbone: BackboneConfig) -> tuple[int, int, str]:
    """(fewest, most frames, why) a clip may have on ``backbone``.

    At least one patch; at most ``MAX_POS_STRETCH`` times the time patches of the stored
    positional grid, and at most ``MAX_PATCHES`` patch tokens (the compute budget).
    """
    stride, patch = backbone.time_stride, backbone.patch_time
    stored_t = backbone.stored_grid[1]
    freq_patches = (backbone.num_mel_bins - backbone.patch_freq) // backbone.freq_stride + 1
    most_t = min(MAX_POS_STRETCH * stored_t, MAX_PATCHES // max(freq_patches, 1))
    # frames -> (frames - patch) // stride + 1 time patches; the last frame count giving most_t
    most = most_t * stride + patch - 1
    why = (f"one {patch}-frame patch up to {MAX_POS_STRETCH}x the {stored_t} time patches of "
           f"the backbone's positional grid, at most {MAX_PATCHES} patches")
    return patch, most, why


def check_features(features: dict[str, Any], backbone: BackboneConfig,
                   whose: str = "this backbone") -> None:
    """A bundle's feature settings: types, sane ranges, and the fit to ``backbone``.

    ``features`` is the manifest's dict (missing keys take ``FeatureConfig``'s defaults).
    ``whose`` names the backbone in messages ("this backbone" or "the bundle's backbone").
    """
    _check_section("features", features, _FEATURE_TYPES)
    f = {**_defaults(FeatureConfig), **features}
    _check_range("features.sample_rate", f["sample_rate"], *SAMPLE_RATE_HZ, " Hz")
    if f["window"] not in _WINDOWS:
        raise BundleFieldError("features.window", f["window"], " or ".join(map(repr, _WINDOWS)))
    _check_range("features.frame_shift_ms", f["frame_shift_ms"], *FRAME_SHIFT_MS, " ms")
    _check_range("features.frame_length_ms", f["frame_length_ms"],
                 max(FRAME_LENGTH_MS[0], f["frame_shift_ms"]), FRAME_LENGTH_MS[1],
                 " ms, and at least frame_shift_ms")
    longest = min(MAX_DURATION_S[1], MAX_CLIP_FRAMES * f["frame_shift_ms"] / 1000)
    _check_range("features.max_duration_s", f["max_duration_s"], MAX_DURATION_S[0], longest,
                 f" s (at most {MAX_CLIP_FRAMES} frames of {f['frame_shift_ms']:g} ms)")
    _check_range("features.mean", f["mean"], *MEAN_RANGE, " (log-mel units)")
    _check_range("features.std", f["std"], *STD_RANGE, " (log-mel units)")
    if f["num_mel_bins"] != backbone.num_mel_bins:
        raise BundleFieldError("features.num_mel_bins", f["num_mel_bins"],
                               f"{backbone.num_mel_bins} ({whose}'s mel bins)")
    lo, hi, why = target_length_range(backbone)
    _check_range("features.target_length", f["target_length"], lo, hi, f" ({why})")


# -- labels, adapter, backbone, other fields ------------------------------------------------------

def check_labels(labels: Any) -> None:
    """1..``MAX_LABELS`` distinct labels of 1..``MAX_LABEL_CHARS`` characters, no controls."""
    if not isinstance(labels, list):
        raise BundleFieldError("labels", labels, "a list of strings")
    if not 1 <= len(labels) <= MAX_LABELS:
        raise BundleFieldError("labels", len(labels), f"1..{MAX_LABELS} labels",
                               message=f"bundle field labels has {len(labels)} labels; "
                                       f"allowed: 1..{MAX_LABELS}")
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        field = f"labels[{i}]"
        if not isinstance(label, str):
            raise BundleFieldError(field, label, "a string")
        if not 1 <= len(label) <= MAX_LABEL_CHARS:
            raise BundleFieldError(field, label, f"1..{MAX_LABEL_CHARS} characters")
        if any(unicodedata.category(ch) == "Cc" for ch in label):
            raise BundleFieldError(field, label, "printable text (no control characters)")
        if label in seen:
            raise BundleFieldError(field, label, f"a label not used before (it is labels"
                                                 f"[{seen[label]}])")
        seen[label] = i


def check_labels_fit_head(labels: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """One label per row of the head's weight."""
    w = tensors.get("head.fc.weight")
    if w is not None and w.dim() == 2 and w.shape[0] != len(labels):
        raise BundleFieldError("labels", len(labels), f"{w.shape[0]} labels",
                               message=f"bundle field labels has {len(labels)} labels; "
                                       f"allowed: {w.shape[0]} (one per row of tensor "
                                       "'head.fc.weight')")


def check_adapter(adapter: dict[str, Any], method: str) -> None:
    """The adapter modules are the method's own, with sane sizes."""
    _check_section("adapter", adapter, _ADAPTER_TYPES)
    a = {**_defaults(AdapterConfig), **adapter}
    spec = METHODS[method].adapters
    for key in ("mlp", "spatial"):
        if a[key] != getattr(spec, key):
            raise BundleFieldError(f"adapter.{key}", a[key],
                                   f"{getattr(spec, key)} (what method {method!r} adds)")
    if spec.num_prompts:
        _check_range("adapter.num_prompts", a["num_prompts"], 1, MAX_PROMPTS,
                     f" (method {method!r} has prompts)")
    else:
        _check_range("adapter.num_prompts", a["num_prompts"], 0, 0,
                     f" (method {method!r} has no prompts)")
    _check_range("adapter.bottleneck", a["bottleneck"], 1, MAX_BOTTLENECK)


def manifest_backbone(backbone: dict[str, Any]) -> BackboneConfig:
    """The manifest's backbone geometry, bounded, as a ``BackboneConfig``."""
    _check_section("backbone", backbone, _BACKBONE_TYPES)
    for key, typ in _BACKBONE_TYPES.items():
        if key in backbone and typ is int:
            _check_range(f"backbone.{key}", backbone[key], 1,
                         MAX_DEPTH if key == "depth" else MAX_GEOMETRY)
    for key in ("norm_eps", "head_norm_eps"):
        if key in backbone:
            _check_range(f"backbone.{key}", backbone[key], 1e-15, 0.1)
    grid = backbone.get("pos_grid")
    if grid is not None and (len(grid) != 2 or not all(
            _has_type(v, int) and 1 <= v <= MAX_GEOMETRY for v in grid)):
        raise BundleFieldError("backbone.pos_grid", grid,
                               f"null or [freq, time] patches, each 1..{MAX_GEOMETRY}")
    try:
        return BackboneConfig.from_dict(backbone)
    except (TypeError, ValueError) as e:  # ConfigError is a ValueError
        raise BundleError(f"bundle manifest has an invalid config: {e}") from None


def _check_json_object(field: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise BundleFieldError(field, value, "a JSON object")
    try:
        size = len(json.dumps(value).encode("utf-8"))
    except (TypeError, ValueError):
        raise BundleFieldError(field, value, "a JSON object of numbers, strings, lists "
                                             "and objects") from None
    if size > MAX_JSON_BYTES:
        raise BundleFieldError(field, size, f"at most {MAX_JSON_BYTES} bytes of JSON",
                               message=f"bundle field {field} has {size} bytes of JSON; "
                                       f"allowed: at most {MAX_JSON_BYTES}")


def _check_identity(m: Manifest) -> None:
    """Format, task, method, version, fingerprint, multi_label and created_at."""
    if m.format != FORMAT:
        raise BundleFieldError("format", m.format, repr(FORMAT))
    if not isinstance(m.task, str) or not TASK_NAME_RE.fullmatch(m.task):
        raise BundleFieldError("task", m.task, "1-64 characters of a-z, 0-9, '_' or '-', "
                                               "starting with a letter or digit")
    bundle_methods = [k for k, v in METHODS.items() if v.exports_bundle]
    if m.method not in bundle_methods:
        raise BundleFieldError("method", m.method, ", ".join(bundle_methods))
    if not isinstance(m.version, str) or not VERSION_RE.fullmatch(m.version):
        raise BundleFieldError("version", m.version, "1-64 characters of a-z, 0-9, '_' or "
                                                     "'-' (the content hash)")
    if not isinstance(m.backbone_fingerprint, str) or not FINGERPRINT_RE.fullmatch(
            m.backbone_fingerprint):
        raise BundleFieldError("backbone_fingerprint", m.backbone_fingerprint,
                               "'sha256:' and 32 hex digits")
    if not isinstance(m.multi_label, bool):
        raise BundleFieldError("multi_label", m.multi_label, "true or false")
    if m.created_at:
        try:
            ok = len(m.created_at) <= MAX_CREATED_AT_CHARS and bool(
                datetime.fromisoformat(m.created_at))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise BundleFieldError("created_at", m.created_at,
                                   "empty or an ISO 8601 time, e.g. 2025-01-31T12:00:00+00:00")


# -- entry points --------------------------------------------------------------------------------

def check_manifest(m: Manifest) -> BackboneConfig:
    """Every manifest field against sane bounds and the manifest's own backbone geometry.

    Returns the manifest's backbone config. Needs no backbone: the same checks against the
    real one follow in ``check_against_backbone``.
    """
    _check_identity(m)
    check_labels(m.labels)
    for name in ("backbone", "features", "adapter"):
        if not isinstance(getattr(m, name), dict):
            raise BundleFieldError(name, getattr(m, name), "a JSON object")
    backbone = manifest_backbone(m.backbone)
    check_adapter(m.adapter, m.method)
    check_features(m.features, backbone, whose="the bundle's backbone")
    _check_json_object("recipe", m.recipe)
    _check_json_object("metrics", m.metrics)
    return backbone


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor finite and within ``MAX_ABS_WEIGHT`` in magnitude."""
    for name in sorted(tensors):
        t = tensors[name].detach()
        if not torch.isfinite(t).all():
            raise BundleFieldError(f"tensors.{name}", "non-finite values", "finite values",
                                   message=f"bundle tensor {name!r} has non-finite values")
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > MAX_ABS_WEIGHT:
            raise BundleFieldError(
                f"tensors.{name}", peak, f"|value| <= {MAX_ABS_WEIGHT:g}",
                message=f"bundle tensor {name!r} holds a value of magnitude {peak:.3g}; "
                        f"allowed: |value| <= {MAX_ABS_WEIGHT:g}")


def check_against_backbone(m: Manifest, backbone: BackboneConfig) -> None:
    """The manifest fits the real backbone: its claimed geometry, mel bins and clip length."""
    claimed = manifest_backbone(m.backbone)
    for key in _GEOMETRY:
        if getattr(claimed, key) != getattr(backbone, key):
            raise BundleFieldError(f"backbone.{key}", getattr(claimed, key),
                                   f"{getattr(backbone, key)} (this backbone's)")
    if claimed.stored_grid != backbone.stored_grid:
        raise BundleFieldError("backbone.pos_grid", list(claimed.stored_grid),
                               f"{list(backbone.stored_grid)} (this backbone's positional grid)")
    check_features(m.features, backbone)
