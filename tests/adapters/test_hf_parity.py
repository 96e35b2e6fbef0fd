"""Numerical parity with transformers' ``ASTForAudioClassification`` (the reference), and the
positional-grid cut / interpolation rule against an independent formula.

For random weights in several geometries, our loader on the Hugging Face directory and on the
same weights converted to the original ``module.v.*`` layout gives the logits transformers
computes from the directory (fp32, max abs diff < 1e-4). Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from aat_serve.adapters.backbone import resample_pos_grid
from aat_serve.adapters.checkpoints import load_checkpoint, read_label_csv, to_original_state_dict
from aat_serve.adapters.config import BackboneConfig
from tests.adapters.ckpt_factory import (
    AUDIOSET_CSV,
    SPEECHCOMMANDS_CSV,
    random_canonical,
    write_hf_dir,
    write_original,
    write_ssast,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-4
LABELS = {35: read_label_csv(SPEECHCOMMANDS_CSV), 527: read_label_csv(AUDIOSET_CSV)}

# (id, width, depth, stride, frames, classes): real 128 mel bins, strides and lengths.
CASES = [
    ("s10-L128-C35-w128", 128, 2, 10, 128, 35),
    ("s10-L512-C527-w64", 64, 2, 10, 512, 527),
    ("s10-L1024-C527-w64", 64, 1, 10, 1024, 527),
    ("s16-L128-C35-w64", 64, 2, 16, 128, 35),
    ("s16-L512-C35-w128", 128, 2, 16, 512, 35),
    ("s16-L1024-C527-w64", 64, 2, 16, 1024, 527),
    # Full ViT-B/16 (768 wide, 12 blocks, 12 heads) in the Speech Commands geometry.
    pytest.param("vitb-s10-L128-C35", 768, 12, 10, 128, 35, marks=pytest.mark.slow),
]


def _cfg(width: int, depth: int, stride: int, frames: int) -> BackboneConfig:
    return BackboneConfig(embed_dim=width, depth=depth, num_heads=width // 64,
                          mlp_hidden=4 * width if width == 768 else 2 * width,
                          freq_stride=stride, time_stride=stride, target_length=frames)


def _reference(directory):
    """transformers' model from the directory, refusing any missing or unused tensor."""
    model, info = transformers.ASTForAudioClassification.from_pretrained(
        directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


def _logits_with_eps(ckpt, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The checkpoint's logits with every LayerNorm epsilon set to ``eps`` (in place)."""
    model = ckpt.backbone
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps
    h = ckpt.head
    pooled = model(x)
    normed = F.layer_norm(pooled, pooled.shape[-1:], h["norm.weight"], h["norm.bias"], eps)
    return F.linear(normed, h["fc.weight"], h["fc.bias"])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize(("case", "width", "depth", "stride", "frames", "classes"), CASES)
def test_logits_match_transformers(tmp_path, case, width, depth, stride, frames, classes):
    cfg = _cfg(width, depth, stride, frames)
    canon = random_canonical(cfg, classes, seed=width + depth + stride + frames + classes)
    hf_dir = write_hf_dir(tmp_path / "hf", canon, cfg, LABELS[classes])
    pth = write_original(tmp_path / "orig.pth", canon)
    del canon
    torch.manual_seed(frames + classes)
    x = 0.5 * torch.randn(1 if width == 768 else 2, frames, 128)
    with torch.no_grad():
        ref = _reference(hf_dir)(x).logits
        hf = load_checkpoint(hf_dir)
        ours_hf = hf.logits(x)
        fp_hf = hf.backbone.fingerprint()
        del hf
        orig = load_checkpoint(pth)
        ours_orig = orig.logits(x)
        fp_orig = orig.backbone.fingerprint()
        eps_matched = _logits_with_eps(orig, x, 1e-12)
    d_hf, d_orig = _max_diff(ours_hf, ref), _max_diff(ours_orig, ref)
    print(f"\nparity {case}: max|logit| {float(ref.abs().max()):.3f}  "
          f"hf-dir {d_hf:.2e}  original-.pth {d_orig:.2e}  "
          f"original-.pth at eps 1e-12 {_max_diff(eps_matched, ref):.2e}")
    assert ref.shape == (x.shape[0], classes)
    assert float(ref.abs().max()) > 0.5  # the logits are not trivially small
    assert d_hf < TOL and d_orig < TOL
    # The original-vs-HF difference is LayerNorm epsilon (1e-6 / 1e-5 vs 1e-12); with HF's
    # epsilon only fp32 rounding (kernel paths over differently aligned buffers) remains.
    assert _max_diff(eps_matched, ours_hf) < 2e-6
    # The original file carries no strides, length or labels: all inferred or defaulted.
    c = orig.backbone.cfg
    assert (c.freq_stride, c.time_stride, c.target_length, c.num_heads) == (
        stride, stride, frames, width // 64)
    assert fp_orig == fp_hf
    assert load_checkpoint(hf_dir).labels == LABELS[classes]


def test_a_wrong_layout_is_far_outside_the_tolerance(tmp_path):
    """Negative control: q and k swapped in the original file moves logits well past 1e-4."""
    cfg = _cfg(128, 2, 10, 128)
    canon = random_canonical(cfg, 35, seed=1)
    ref_dir = write_hf_dir(tmp_path / "hf", canon, cfg)
    bad = dict(canon)
    q, k, v = canon["blocks.0.attn.qkv.weight"].chunk(3)
    bad["blocks.0.attn.qkv.weight"] = torch.cat([k, q, v])
    x = 0.5 * torch.randn(2, 128, 128)
    with torch.no_grad():
        ref = _reference(ref_dir)(x).logits
        diff = _max_diff(load_checkpoint(write_original(tmp_path / "bad.pth", bad)).logits(x), ref)
    print(f"\nnegative control (q/k swapped in block 0): max abs diff {diff:.2e}")
    assert diff > 100 * TOL


def test_directory_written_by_transformers_itself(tmp_path):
    """``save_pretrained`` output (transformers' own names and config) loads to the same logits."""
    config = transformers.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=1,
                                    intermediate_size=128, max_length=128, num_labels=10,
                                    frequency_stride=16, time_stride=16)
    torch.manual_seed(0)
    model = transformers.ASTForAudioClassification(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]) + (1.0 if p.dim() == 1 else 0))
    model.save_pretrained(tmp_path / "hf")
    x = 0.5 * torch.randn(2, 128, 128)
    with torch.no_grad():
        ref = model(x).logits
        ckpt = load_checkpoint(tmp_path / "hf")
        diff = _max_diff(ckpt.logits(x), ref)
    print(f"\nparity transformers.save_pretrained s16-L128-C10-w64: {diff:.2e}")
    assert ckpt.labels == [f"LABEL_{i}" for i in range(10)]
    assert diff < TOL and float(ref.abs().max()) > 0.5


# -- positional grid: cut and interpolation ----------------------------------------------------

def linear_resize(a: torch.Tensor, out: int, dim: int) -> torch.Tensor:
    """1-D linear resampling with half-pixel centres (bilinear, align_corners=False), fp64.

    Source coordinate ``(i + 0.5) * n / out - 0.5`` clamped at 0, weights to the two nearest
    samples. torch rounds that coordinate to fp32, which at ~1000 samples moves values by up
    to ~1e-4 of the neighbours' difference; the comparisons allow for it.
    """
    a = a.double().movedim(dim, -1)
    n = a.shape[-1]
    cols = []
    for i in range(out):
        src = max((i + 0.5) * n / out - 0.5, 0.0)
        i0 = min(math.floor(src), n - 1)
        i1 = min(i0 + 1, n - 1)
        w = src - i0
        cols.append((1 - w) * a[..., i0] + w * a[..., i1])
    return torch.stack(cols, dim=-1).movedim(-1, dim)


def ast_rule(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """AST / SSAST, written out: time axis first (centre cut if narrower, else interpolate to
    (src_f, t)), then the frequency axis the same way. ``pos`` is (1, f*t, D)."""
    (pf, pt), (f, t) = src, dst
    g = pos.reshape(pf, pt, -1)
    if t < pt:
        g = g[:, pt // 2 - t // 2:pt // 2 - t // 2 + t]
    else:
        g = linear_resize(g, t, dim=1)
    if f < pf:
        g = g[pf // 2 - f // 2:pf // 2 - f // 2 + f]
    elif f > pf:
        g = linear_resize(g, f, dim=0)
    return g.reshape(1, f * t, -1)


@pytest.fixture(scope="module")
def audioset_like(tmp_path_factory):
    """A 64-wide, 1-block original-format checkpoint with the AudioSet 12 x 101 grid."""
    d = tmp_path_factory.mktemp("as")
    cfg = _cfg(64, 1, 10, 1024)
    canon = random_canonical(cfg, 527, seed=7)
    return canon, load_checkpoint(write_original(d / "as.pth", canon)), d


@pytest.mark.parametrize(("frames", "columns"), [(512, (25, 75)), (128, (44, 56)),
                                                  (400, (31, 70)), (1000, (1, 100))])
def test_center_cut_takes_the_documented_columns(audioset_like, frames, columns):
    canon, ckpt, _ = audioset_like
    grid = ckpt.backbone.cfg.grid(frames)
    pos = ckpt.backbone.pos_embed_for(grid)
    stored = canon["pos_embed"][:, 2:].reshape(12, 101, -1)
    expected = stored[:, columns[0]:columns[1]].reshape(1, -1, 64)
    assert grid == (12, columns[1] - columns[0])
    assert torch.equal(pos[:, 2:], expected)
    assert torch.equal(pos[:, :2], canon["pos_embed"][:, :2])  # prefix tokens kept
    assert torch.equal(pos[:, 2:], ast_rule(canon["pos_embed"][:, 2:], (12, 101), grid).float())


@pytest.mark.parametrize(("src", "dst"), [((12, 101), (12, 299)),   # GTZAN, 3000 frames
                                          ((12, 12), (12, 50)),     # SC model at 512 frames
                                          ((8, 64), (12, 101)),     # SSAST patch, both axes
                                          ((1, 512), (1, 1023)),    # SSAST frame
                                          ((12, 20), (6, 20)),      # frequency cut
                                          ((7, 30), (9, 10))])      # time cut, freq interpolated
def test_resampling_matches_the_independent_formula(src, dst):
    torch.manual_seed(0)
    pos = 0.1 * torch.randn(1, src[0] * src[1], 16)  # the scale of trained position embeddings
    got = resample_pos_grid(pos, src, dst)
    diff = _max_diff(got.double(), ast_rule(pos, src, dst))
    # Another plausible rule (corner-aligned resize of both axes) must be far away.
    other = F.interpolate(
        pos.reshape(1, *src, -1).permute(0, 3, 1, 2), size=dst, mode="bilinear",
        align_corners=True).permute(0, 2, 3, 1).reshape(1, dst[0] * dst[1], -1)
    other_diff = _max_diff(got, other)
    print(f"\npos grid {src} -> {dst}: max abs diff to formula {diff:.1e} "
          f"(corner-aligned rule {other_diff:.1e})")
    assert got.shape == (1, dst[0] * dst[1], 16)
    assert diff < 3e-5  # fp32 coordinate rounding, see linear_resize
    assert other_diff > 1e-2


@pytest.mark.parametrize(("native", "frames"), [(1024, 128), (128, 512)])
def test_other_lengths_match_transformers_with_the_formula_grid(tmp_path, native, frames):
    """Our model at a non-native length equals transformers at that length whose position
    embeddings were cut / interpolated by the independent formula, and not transformers with
    another plausible rule (corner-aligned resize)."""
    cfg = _cfg(64, 1, 10, native)
    canon = random_canonical(cfg, 35, seed=native)
    ckpt = load_checkpoint(write_original(tmp_path / "o.pth", canon))
    dst = ckpt.backbone.cfg.grid(frames)
    patches = canon["pos_embed"][:, 2:]
    grid = patches.reshape(1, *cfg.grid(), -1).permute(0, 3, 1, 2)
    rules = {"formula": ast_rule(patches, cfg.grid(), dst).float(),
             "corner-aligned": F.interpolate(
                 grid, size=dst, mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
             .reshape(1, dst[0] * dst[1], -1)}
    x = 0.5 * torch.randn(2, frames, 128)
    diffs = {}
    with torch.no_grad():
        ours = ckpt.logits(x)
        for name, pos in rules.items():
            moved = canon | {"pos_embed": torch.cat([canon["pos_embed"][:, :2], pos], dim=1)}
            ref = _reference(write_hf_dir(tmp_path / name, moved, _cfg(64, 1, 10, frames)))
            diffs[name] = _max_diff(ours, ref(x).logits)
    print(f"\nparity {native} -> {frames} frames (grid {cfg.grid()} -> {dst}): "
          f"{diffs['formula']:.2e} (corner-aligned rule: {diffs['corner-aligned']:.2e})")
    assert diffs["formula"] < TOL
    assert diffs["corner-aligned"] > 100 * TOL


def test_ssast_patch_model_matches_transformers_with_the_formula_grid(tmp_path):
    """SSAST 16x16 re-strided to 10/10 at 1024 frames equals transformers' ASTModel with the
    same conv and the (8, 64) -> (12, 101) grid from the formula (LayerNorm eps 1e-6 both)."""
    path, canon = write_ssast(tmp_path / "ssast.pth", frame=False)
    ckpt = load_checkpoint(path)
    cfg = _cfg(64, 1, 10, 1024)
    moved = dict(canon)
    moved["pos_embed"] = torch.cat(
        [canon["pos_embed"][:, :2],
         ast_rule(canon["pos_embed"][:, 2:], (8, 64), (12, 101)).float()], dim=1)
    moved.update({"head.norm.weight": torch.ones(64), "head.norm.bias": torch.zeros(64),
                  "head.fc.weight": torch.zeros(2, 64), "head.fc.bias": torch.zeros(2)})
    ref = _reference(write_hf_dir(tmp_path / "hf", moved, cfg, layer_norm_eps=1e-6))
    x = 0.5 * torch.randn(2, 1024, 128)
    with torch.no_grad():
        want = ref.audio_spectrogram_transformer(x).pooler_output
        diff = _max_diff(ckpt.backbone(x), want)
    print(f"\nparity SSAST patch 16x16 -> stride 10 at 1024 frames (pooled): {diff:.2e}")
    assert diff < TOL and float(want.abs().max()) > 0.5


def test_to_original_state_dict_is_what_the_parity_cases_load():
    """Guard for the helper the parity cases rely on: the published original key set."""
    canon = random_canonical(_cfg(64, 1, 10, 128), 35)
    keys = set(to_original_state_dict(canon, deit_head_classes=1000))
    assert {"module.v.cls_token", "module.v.dist_token", "module.v.pos_embed",
            "module.v.patch_embed.proj.weight", "module.v.blocks.0.attn.qkv.weight",
            "module.v.blocks.0.mlp.fc2.bias", "module.v.norm.weight", "module.v.head.weight",
            "module.v.head_dist.bias", "module.mlp_head.0.weight", "module.mlp_head.1.bias"} <= keys
    assert len(keys) == len(canon) + 4
