"""AST's augmentations: torchaudio's masking rule, mixup, noise-and-roll, seeded replay, and the
dataset pipeline (train features equal serving features when augmentation is off)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio.functional as taf

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AudioError
from aat_serve.adapters.features import (
    features_from_audio,
    load_audio,
    log_mel,
    normalise,
    pad_or_cut,
)
from aat_serve.training.augment import (
    MIXUP_ALPHA,
    frequency_warp,
    mask_band,
    mix_waveforms,
    noise_and_roll,
    sample_mixup,
    sample_warp,
    spec_augment,
    warp_positions,
)
from aat_serve.training.data.base import Example
from aat_serve.training.dataset import Augment, ClipDataset, EpochSampler
from tests.training import synth


@pytest.mark.parametrize("dim,axis,param", [(1, 1, 8), (0, 2, 24)])
def test_mask_band_follows_torchaudios_rule(dim, axis, param):
    """Given the same two uniforms, our band is exactly torchaudio.mask_along_axis's band."""
    fbank = torch.randn(50, 20)  # (time, mel) as AST's fbank
    matched = 0
    for seed in range(60):
        torch.manual_seed(seed)
        u1, u2 = float(torch.rand(1)), float(torch.rand(1))
        torch.manual_seed(seed)
        ref = taf.mask_along_axis(fbank.T[None], param, 0.0, axis)[0].T
        ours = mask_band(fbank, dim, param, u1, u2)
        assert torch.equal(ours, ref), seed
        matched += int(not torch.equal(ours, fbank))
    assert matched > 40  # most draws mask something: the comparison is not vacuous


def test_spec_augment_widths_and_seeded_replay():
    fbank = torch.randn(64, 32) + 5.0  # no natural zeros
    widths_f, widths_t = set(), set()
    for seed in range(200):
        out = spec_augment(fbank, 8, 20, np.random.default_rng(seed))
        zero = out == 0
        f_cols = zero.all(dim=0)
        t_rows = zero.all(dim=1)
        widths_f.add(int(f_cols.sum()))
        widths_t.add(int(t_rows.sum()))
        # masked cells are exactly the union of one freq band and one time band
        assert torch.equal(zero, f_cols[None, :] | t_rows[:, None])
    assert max(widths_f) <= 7 and max(widths_t) <= 19 and len(widths_f) > 4
    a = spec_augment(fbank, 8, 20, np.random.default_rng(7))
    assert torch.equal(a, spec_augment(fbank, 8, 20, np.random.default_rng(7)))
    assert not torch.equal(a, spec_augment(fbank, 8, 20, np.random.default_rng(8)))
    assert torch.equal(spec_augment(fbank, 0, 0, np.random.default_rng(1)), fbank)


def test_mix_waveforms_is_asts_formula():
    w1 = torch.tensor([0.1, 0.5, -0.2, 0.3, 0.0], dtype=torch.float64)
    short = torch.tensor([0.4, -0.1, 0.2], dtype=torch.float64)
    lam = 0.3
    c2 = short - short.mean()
    expected = lam * (w1 - w1.mean()) + (1 - lam) * torch.cat([c2, torch.zeros(2, dtype=c2.dtype)])
    expected = expected - expected.mean()
    torch.testing.assert_close(mix_waveforms(w1, short, lam), expected, rtol=0, atol=1e-15)
    long = torch.arange(8, dtype=torch.float64)
    cut = long[:5] - long.mean()  # centred over the whole partner, then cut
    expected = lam * (w1 - w1.mean()) + (1 - lam) * cut
    torch.testing.assert_close(mix_waveforms(w1, long, lam), expected - expected.mean(),
                               rtol=0, atol=1e-12)


def test_sample_mixup_probability_and_beta_10_10():
    draws = [sample_mixup(np.random.default_rng(s), 0.6, 50) for s in range(3000)]
    used = [d for d in draws if d is not None]
    assert 0.55 < len(used) / len(draws) < 0.65
    lam = np.array([d[1] for d in used])
    a = MIXUP_ALPHA
    assert abs(lam.mean() - 0.5) < 0.01
    assert abs(lam.var() - a * a / ((2 * a) ** 2 * (2 * a + 1))) < 0.002
    assert {d[0] for d in used} == set(range(50))
    assert all(sample_mixup(np.random.default_rng(s), 0.0, 5) is None for s in range(50))
    assert sample_mixup(np.random.default_rng(3), 1.0, 5) == \
        sample_mixup(np.random.default_rng(3), 1.0, 5)


def test_noise_and_roll():
    feats = torch.randn(40, 8)
    shifts = set()
    for seed in range(300):
        out = noise_and_roll(feats, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        scale = rng.random() / 10
        noise = torch.from_numpy(rng.random((40, 8), dtype=np.float32))
        shift = int(rng.integers(-10, 10))
        shifts.add(shift)
        assert torch.equal(out, torch.roll(feats + noise * scale, shift, dims=0))
        back = torch.roll(out, -shift, dims=0) - feats
        assert float(back.min()) >= -1e-6 and float(back.max()) <= 0.1 + 1e-6
    assert min(shifts) == -10 and max(shifts) == 9


def _clips(tmp_path, n=4):
    out = []
    for i in range(n):
        p = synth.write_audio(tmp_path / f"c{i}.wav", i % 2, 44100, 0.3 + 0.05 * i, seed=i)
        out.append(Example(p, (i % 2,), key=p.name))
    return out


FEATS = FeatureConfig(num_mel_bins=32, target_length=48, mean=-6.0, std=5.0)


def test_dataset_without_augmentation_matches_the_serving_features(tmp_path):
    ds = ClipDataset(_clips(tmp_path), 2, FEATS)
    for i, ex in enumerate(ds.examples):
        item = ds[i]
        served = features_from_audio(ex.path, FEATS)
        assert item["features"].shape == (48, 32)
        # Training centres the waveform first (AST); Kaldi's per-frame DC removal makes that
        # a no-op up to rounding.
        torch.testing.assert_close(item["features"], served, rtol=0, atol=2e-4)
        assert item["target"].tolist() == [float(i % 2 == 0), float(i % 2 == 1)]
        assert item["mask"].tolist() == [1.0, 1.0]
    assert not torch.allclose(ds[0]["features"], ds[1]["features"])


def test_dataset_augmentation_is_seeded_per_epoch_and_index(tmp_path):
    aug = Augment(freqm=8, timem=16, mixup=1.0, noise=True)
    ds = ClipDataset(_clips(tmp_path), 2, FEATS, aug, seed=3)
    a = ds[1]
    assert torch.equal(a["features"], ds[1]["features"])  # same (seed, epoch, index)
    twin = ClipDataset(_clips(tmp_path), 2, FEATS, aug, seed=3)
    assert torch.equal(twin[1]["features"], a["features"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["features"], a["features"])
    # mixup: the label mixes with the same lambda as the waveform
    ds.set_epoch(0)
    j, lam = sample_mixup(ds.rng(1), 1.0, len(ds))
    y1, y2 = ds.examples[1].target(2), ds.examples[j].target(2)
    torch.testing.assert_close(a["target"], torch.from_numpy(lam * y1 + (1 - lam) * y2))
    assert 0 < float(a["target"].max()) <= 1 and abs(float(a["target"].sum()) - 1) < 1e-6


@pytest.mark.parametrize("mixup", [0.0, 0.5])
def test_cached_clips_give_the_same_items_as_decoding_every_time(tmp_path, mixup):
    """The clip cache (waveform and log-mel) changes nothing but speed, mixup included."""
    aug = Augment(freqm=8, timem=16, mixup=mixup)
    plain = ClipDataset(_clips(tmp_path), 2, FEATS, aug, seed=5)
    cached = ClipDataset(_clips(tmp_path), 2, FEATS, aug, seed=5, cache_waveforms=True)
    firsts = []
    for epoch in (0, 1, 2):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(plain)):
            a, b = plain[i], cached[i]
            assert torch.equal(a["features"], b["features"])
            assert torch.equal(a["target"], b["target"])
        firsts.append(cached[0]["features"])
    # SpecAugment still draws new masks each epoch from the cached log-mel
    assert not torch.equal(firsts[0], firsts[1]) or not torch.equal(firsts[1], firsts[2])
    if mixup == 0:
        assert len(cached._mel_cache) == len(plain)  # the log-mel was computed once per clip
        assert cached._cache is None  # and no waveform is held: nothing will mix them
    else:
        assert cached._cache  # mixup partners are decoded once too


def test_spec_augment_is_applied_before_normalisation(tmp_path):
    """A masked cell is 0 in the log-mel domain, i.e. -mean / (2 std) once normalised."""
    ds = ClipDataset(_clips(tmp_path, 1), 2, FEATS, Augment(freqm=10, timem=20), seed=1)
    out = ds[0]["features"]
    rng = ds.rng(0)
    wave = load_audio(ds.examples[0].path)
    raw = pad_or_cut(log_mel(wave - wave.mean(), FEATS), 48)
    expected = normalise(spec_augment(raw, 10, 20, rng), FEATS)
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-4)
    fill = -FEATS.mean / (2 * FEATS.std)
    masked = (out - fill).abs() < 1e-6
    assert masked.any() and not torch.allclose(out, normalise(raw, FEATS), atol=1e-3)


def test_dataset_names_the_file_that_fails_to_decode(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x30\x00\x00\x00WAVEfmt junk")
    ds = ClipDataset([Example(bad, (0,))], 2, FEATS)
    with pytest.raises(AudioError, match=r"bad\.wav"):
        ds[0]


def test_epoch_sampler_is_seeded_and_resumable():
    s = EpochSampler(10, seed=4)
    s.set_epoch(2)
    full = list(s)
    assert sorted(full) == list(range(10))
    s.set_epoch(2, start=6)
    assert list(s) == full[6:] and len(s) == 4
    s.set_epoch(3)
    assert list(s) != full
    assert list(EpochSampler(10, shuffle=False)) == list(range(10))


def _tone_mel(hz, cfg):
    t = torch.arange(16000, dtype=torch.float64) / 16000
    return log_mel((0.5 * torch.sin(2 * torch.pi * hz * t)).float(), cfg)


@pytest.mark.parametrize(("f0", "alpha"), [(300.0, 1.3), (1000.0, 1.2), (2500.0, 0.8),
                                           (700.0, 1 / 1.25)])
def test_frequency_warp_moves_a_tone_where_the_scaled_tone_is(f0, alpha):
    """Warping the log-mel of a tone at f0 puts its peak in the bin of a tone at alpha * f0."""
    cfg = FeatureConfig(num_mel_bins=64, target_length=100)
    warped = frequency_warp(_tone_mel(f0, cfg), alpha, 16000).mean(0)
    direct = _tone_mel(alpha * f0, cfg).mean(0)
    original = _tone_mel(f0, cfg).mean(0)
    assert abs(int(warped.argmax()) - int(direct.argmax())) <= 1
    assert abs(int(original.argmax()) - int(direct.argmax())) >= 2  # the tone really moved


def test_frequency_warp_positions_follow_the_mel_formula():
    """Independent check of the bin map: centre c of bin m comes from c / alpha."""
    n, sr, alpha = 32, 16000, 1.15
    mel = lambda f: 1127.0 * math.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    step = (hi - lo) / (n + 1)
    for m in (3, 10, 20, 30):
        centre = 700.0 * (math.exp((lo + (m + 1) * step) / 1127.0) - 1)
        expected = (mel(centre / alpha) - lo) / step - 1
        assert warp_positions(n, sr, alpha)[m] == pytest.approx(expected, abs=1e-9)
    assert np.allclose(warp_positions(n, sr, 1.0), np.arange(n))


def test_frequency_warp_is_identity_at_one_and_seeded_in_the_dataset(tmp_path):
    x = torch.randn(20, 32)
    assert torch.equal(frequency_warp(x, 1.0, 16000), x)
    assert not torch.allclose(frequency_warp(x, 1.1, 16000), x)
    rng = np.random.default_rng(0)
    alphas = [sample_warp(rng, 0.2) for _ in range(2000)]
    assert 1 / 1.2 <= min(alphas) < 0.85 and 1.17 < max(alphas) <= 1.2
    assert abs(float(np.mean(np.log(alphas)))) < 0.01  # log-symmetric: as often up as down
    assert sample_warp(rng, 0.0) == 1.0
    plain = ClipDataset(_clips(tmp_path), 2, FEATS, Augment(), seed=2)
    warped = ClipDataset(_clips(tmp_path), 2, FEATS, Augment(freq_warp=0.2), seed=2)
    assert Augment(freq_warp=0.2).active and not Augment().active
    a = warped[1]["features"]
    assert torch.equal(a, warped[1]["features"])  # same (seed, epoch, index), same warp
    assert not torch.allclose(a, plain[1]["features"], atol=1e-3)
    alpha = sample_warp(warped.rng(1), 0.2)
    raw = warped.log_mel(1)
    torch.testing.assert_close(a, normalise(frequency_warp(raw, alpha, 16000), FEATS))
