"""Audio front end: decoding round trips, down-mixing, resampling, AST fbank parity, bad input."""

from __future__ import annotations

import io
import math
import struct
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as taf

from aat_serve.adapters import features as F
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AudioError, ConfigError

SC_MEAN, SC_STD = -6.845978, 5.5654526  # Speech Commands v2 stats, as in its preprocessor_config


def _encode(x: np.ndarray, sr: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(sr * seconds)) / sr)).astype(
        np.float32)


def _noise(frames: int, channels: int, seed: int = 0, amp: float = 0.8) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-amp, amp, (frames, channels)).astype(np.float32)


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """A 16 kHz test signal with tones, a chirp and noise, so every mel band has energy."""
    n = round(16000 * seconds)
    t = np.arange(n) / 16000
    rng = np.random.default_rng(seed)
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * (300 + 2000 * t) * t)
         + 0.05 * rng.standard_normal(n))
    return torch.from_numpy(x.astype(np.float32))


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def _mel(f: float) -> float:
    return 1127.0 * math.log(1.0 + f / 700.0)


def _expected_mel_bin(freq: float, cfg: FeatureConfig) -> int:
    """Index of the Kaldi triangular filter whose centre is nearest ``freq`` (mel scale)."""
    lo, hi = _mel(20.0), _mel(cfg.sample_rate / 2)
    delta = (hi - lo) / (cfg.num_mel_bins + 1)
    centres = [lo + (i + 1) * delta for i in range(cfg.num_mel_bins)]
    return int(np.argmin([abs(c - _mel(freq)) for c in centres]))


# --------------------------------------------------------------------------------------------
# Decoding round trips


LOSSLESS = [
    # format, subtype, rate, channels, tolerance (quantisation step of the subtype)
    ("WAV", "PCM_U8", 8000, 1, 2 / 2**7),
    ("WAV", "PCM_16", 22050, 2, 2 / 2**15),
    ("WAV", "PCM_24", 44100, 1, 2 / 2**23),
    ("WAV", "PCM_32", 48000, 2, 1e-7),
    ("WAV", "FLOAT", 16000, 1, 0.0),
    ("WAV", "DOUBLE", 44100, 3, 0.0),
    ("WAVEX", "PCM_16", 48000, 6, 2 / 2**15),
    ("FLAC", "PCM_16", 44100, 2, 2 / 2**15),
    ("FLAC", "PCM_24", 8000, 1, 2 / 2**23),
]


@pytest.mark.parametrize(("fmt", "subtype", "sr", "channels", "tol"), LOSSLESS,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}ch" for c in LOSSLESS])
def test_lossless_round_trip(tmp_path, fmt, subtype, sr, channels, tol):
    x = _noise(sr // 10, channels, seed=channels)
    path = tmp_path / f"clip.{'flac' if fmt == 'FLAC' else 'wav'}"
    sf.write(path, x, sr, format=fmt, subtype=subtype)
    from_path, rate = F.decode_audio(path)
    from_bytes, rate_b = F.decode_audio(path.read_bytes())
    with open(path, "rb") as fh:
        from_file, _ = F.decode_audio(fh)
    assert rate == rate_b == sr
    assert from_path.dtype == np.float32 and from_path.shape == (len(x), channels)
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_path, from_file)
    assert np.abs(from_path - x).max() <= tol
    # differs: a neighbouring channel is a different signal, far beyond the tolerance
    if channels > 1:
        assert np.abs(from_path[:, 0] - x[:, 1]).max() > 0.1


def test_wavex_header_is_wave_format_extensible(tmp_path):
    path = tmp_path / "six.wav"
    sf.write(path, _noise(800, 6), 48000, format="WAVEX", subtype="PCM_16")
    data = path.read_bytes()
    assert data[12:16] == b"fmt " and struct.unpack("<H", data[20:22])[0] == 0xFFFE
    assert F.audio_info(path).channels == 6 and F.audio_info(data).format == "WAVEX"


@pytest.mark.parametrize(("fmt", "subtype", "sr"), [("OGG", "VORBIS", 44100),
                                                    ("OGG", "VORBIS", 22050),
                                                    ("MP3", "MPEG_LAYER_III", 48000),
                                                    ("MP3", "MPEG_LAYER_III", 22050)])
def test_lossy_round_trip(fmt, subtype, sr):
    if fmt == "MP3" and not F.MP3_SUPPORTED:
        pytest.skip("this libsndfile cannot encode MP3")
    x = np.stack([_sine(1000, sr, 1.0), _sine(1000, sr, 1.0, amp=0.3)], axis=1)
    y, rate = F.decode_audio(_encode(x, sr, fmt, subtype))
    assert rate == sr and y.shape[1] == 2
    assert abs(len(y) - len(x)) <= 1152  # at most one MPEG frame of encoder padding
    for ch, amp in ((0, 0.5), (1, 0.3)):
        assert _peak_hz(y[:, ch], sr) == pytest.approx(1000, abs=2)
        rms = float(np.sqrt(np.mean(y[len(y) // 4: 3 * len(y) // 4, ch] ** 2)))
        assert rms == pytest.approx(amp / math.sqrt(2), rel=0.05)
    # differs: the 2 kHz content is absent
    assert _peak_hz(y[:, 0], sr) != pytest.approx(2000, abs=50)


def test_mp3_support_is_reported():
    readable = "MP3" in sf.available_formats()
    assert readable == F.MP3_SUPPORTED


def test_mp3_refused_clearly_without_libsndfile_support(monkeypatch):
    if not F.MP3_SUPPORTED:
        pytest.skip("needs an MP3-capable libsndfile to build the input")
    data = _encode(_sine(1000, 16000, 0.2), 16000, "MP3", "MPEG_LAYER_III")
    monkeypatch.setattr(F, "MP3_SUPPORTED", False)
    with pytest.raises(AudioError, match=r"looks like MP3, which this soundfile/libsndfile "
                                         r"build cannot decode .*MP3 needs >= 1\.1"):
        F.decode_audio(data)


# --------------------------------------------------------------------------------------------
# Down-mixing and resampling


def test_load_audio_downmixes_to_channel_mean():
    x = _noise(1600, 3, seed=3)
    wave = F.load_audio(_encode(x, 16000, "WAV", "FLOAT"))
    assert wave.dtype == torch.float32 and wave.shape == (1600,)
    torch.testing.assert_close(wave, torch.from_numpy(x.mean(axis=1)), rtol=0, atol=1e-7)
    assert (wave - torch.from_numpy(x[:, 0])).abs().max() > 0.1  # differs from one channel


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resampling_length_and_content(sr):
    seconds = 0.5
    wave = F.load_audio(_encode(_sine(1000, sr, seconds), sr, "WAV", "FLOAT"))
    n = round(sr * seconds)
    assert wave.shape == (math.ceil(16000 * n / sr),)
    # the interior equals the same sine sampled at 16 kHz (edges see the filter's zero padding)
    ref = _sine(1000, 16000, seconds)[: len(wave)]
    inner = slice(200, len(ref) - 200)
    err = (wave[inner] - torch.from_numpy(ref[inner])).abs().max()
    assert err < 5e-3
    # differs: a 1.1 kHz sine does not match
    assert (wave[inner] - torch.from_numpy(_sine(1100, 16000, seconds)[inner])).abs().max() > 0.2


@pytest.mark.parametrize("sr", [8000, 44100, 48000])
def test_fbank_peak_lands_in_the_right_mel_bin(sr):
    cfg = FeatureConfig(target_length=64)
    for freq in (1000.0, 3000.0):
        wave = F.load_audio(_encode(_sine(freq, sr, 0.5), sr, "WAV", "PCM_16"))
        feats = F.log_mel(wave, cfg)
        peak = int(feats[5:-5].mean(dim=0).argmax())
        assert abs(peak - _expected_mel_bin(freq, cfg)) <= 1
    assert abs(_expected_mel_bin(1000.0, cfg) - _expected_mel_bin(3000.0, cfg)) > 10


def test_odd_sample_rate_uses_nearest_well_reducing_rate():
    assert F.resample_rate(44100, 16000) == 44100
    assert F.resample_rate(44101, 16000) == 44100
    assert F.resample_rate(12345, 16000) in (12340, 12350)
    sr = 44101
    wave = F.load_audio(_encode(_sine(1000, sr, 0.5), sr, "WAV", "FLOAT"))
    assert abs(len(wave) - 8000) <= 1
    assert _peak_hz(wave.numpy(), 16000) == pytest.approx(1000, abs=3)


@pytest.mark.parametrize("sr", [500, 999, 384_001, 3_000_000])
def test_absurd_sample_rates_refused(sr):
    with pytest.raises(AudioError, match=rf"has sample rate {sr} Hz; expected 1000 to 384000 Hz"):
        F.load_audio(_encode(np.zeros(2000, np.float32), sr, "WAV"))


@pytest.mark.parametrize("sr", [1000, 384_000])
def test_extreme_but_valid_sample_rates_accepted(sr):
    wave = F.load_audio(_encode(_sine(200, sr, 0.25), sr, "WAV", "FLOAT"))
    assert wave.shape == (4000,) and torch.isfinite(wave).all()


def test_invalid_target_rate_is_a_config_error():
    with pytest.raises(ConfigError, match="target sample_rate must be 1000 to 384000 Hz, got 0"):
        F.load_audio(_encode(np.zeros(400, np.float32), 16000, "WAV"), sample_rate=0)


# --------------------------------------------------------------------------------------------
# Features: frames, padding, cutting, normalisation


def test_frame_count_follows_snip_edges_formula():
    cfg = FeatureConfig()
    for n in (400, 401, 559, 560, 16000, 80000):
        assert F.log_mel(_speechlike(n / 16000), cfg).shape == (1 + (n - 400) // 160, 128)


def test_padding_and_cutting():
    cfg = FeatureConfig(target_length=100, mean=SC_MEAN, std=SC_STD)
    short = _speechlike(0.5)  # 48 frames
    raw = F.log_mel(short, cfg)
    feats = F.fbank(short, cfg)
    assert raw.shape == (48, 128) and feats.shape == (100, 128)
    torch.testing.assert_close(feats[:48], (raw - SC_MEAN) / (2 * SC_STD), rtol=0, atol=0)
    pad_value = -SC_MEAN / (2 * SC_STD)
    assert torch.all(feats[48:] == torch.tensor(pad_value, dtype=torch.float32))
    assert not torch.any(feats[:48] == torch.tensor(pad_value, dtype=torch.float32))

    long = _speechlike(2.0)  # 198 frames
    raw_long = F.log_mel(long, cfg)
    assert raw_long.shape == (198, 128)
    torch.testing.assert_close(F.fbank(long, cfg), (raw_long[:100] - SC_MEAN) / (2 * SC_STD),
                               rtol=0, atol=0)


def test_normalisation_uses_mean_and_two_std():
    wave = _speechlike(1.0)
    raw = F.pad_or_cut(F.log_mel(wave, FeatureConfig()), 128)
    for mean, std in ((SC_MEAN, SC_STD), (-4.2677393, 4.5689974), (1.5, 0.25)):
        cfg = FeatureConfig(target_length=128, mean=mean, std=std)
        expect = (raw.double() - mean) / (2 * std)
        torch.testing.assert_close(F.fbank(wave, cfg).double(), expect, rtol=0, atol=1e-5)
    a = F.fbank(wave, FeatureConfig(target_length=128, mean=SC_MEAN, std=SC_STD))
    b = F.fbank(wave, FeatureConfig(target_length=128, mean=SC_MEAN, std=2 * SC_STD))
    assert (a - b).abs().max() > 0.1


def test_features_from_audio_equals_pipeline_by_hand():
    cfg = FeatureConfig(target_length=64)
    x = _noise(4410, 2, seed=7, amp=0.3)
    data = _encode(x, 44100, "FLAC", "PCM_24")
    mono = torch.from_numpy(sf.read(io.BytesIO(data), dtype="float32")[0].mean(axis=1))
    by_hand = F.fbank(taf.resample(mono, 44100, 16000), cfg)
    torch.testing.assert_close(F.features_from_audio(data, cfg), by_hand, rtol=0, atol=0)


def test_clip_shorter_than_one_window_is_zero_padded_to_one_frame():
    cfg = FeatureConfig(target_length=16)
    short = _speechlike(100 / 16000)
    feats = F.log_mel(short, cfg)
    assert feats.shape == (1, 128)
    padded = torch.cat([short, torch.zeros(300)])
    torch.testing.assert_close(feats, F.log_mel(padded, cfg), rtol=0, atol=0)
    out = F.fbank(short, cfg)
    pad_value = -cfg.mean / (2 * cfg.std)
    assert torch.isfinite(out).all()
    assert not torch.any(out[0] == torch.tensor(pad_value, dtype=torch.float32))
    assert torch.all(out[1:] == torch.tensor(pad_value, dtype=torch.float32))
    one = F.features_from_audio(_encode(short.numpy(), 16000, "WAV", "FLOAT"), cfg)
    torch.testing.assert_close(one, out, rtol=0, atol=0)


def test_silence_gives_the_log_floor():
    cfg = FeatureConfig(target_length=128)
    feats = F.log_mel(torch.zeros(16000), cfg)
    floor = math.log(torch.finfo(torch.float32).eps)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(feats, torch.full_like(feats, floor), rtol=0, atol=1e-6)
    out = F.features_from_audio(_encode(np.zeros(8000, np.float32), 8000, "WAV", "PCM_16"), cfg)
    assert torch.isfinite(out).all()
    assert out[0, 0] == pytest.approx((floor - cfg.mean) / (2 * cfg.std), abs=1e-5)


# --------------------------------------------------------------------------------------------
# Parity with transformers' ASTFeatureExtractor


def _hf_features(wave: torch.Tensor, max_length: int, mean: float, std: float,
                 numpy_backend: bool, monkeypatch) -> torch.Tensor:
    import transformers.models.audio_spectrogram_transformer.feature_extraction_audio_spectrogram_transformer as hf  # noqa: E501

    with monkeypatch.context() as m:
        if numpy_backend:  # transformers' own numpy fbank: an implementation independent of ours
            m.setattr(hf, "is_speech_available", lambda: False)
        with warnings.catch_warnings():  # its lowest mel filter is empty at 16 kHz: known, benign
            warnings.simplefilter("ignore", UserWarning)
            ext = hf.ASTFeatureExtractor(max_length=max_length, mean=mean, std=std)
        out = ext(wave.numpy(), sampling_rate=16000, return_tensors="np")["input_values"][0]
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


# transformers' default backend is torchaudio's kaldi.fbank in float32, as ours: measured 0.0.
# Its numpy backend is an independent float64 implementation; our float32 fbank differs from it
# by up to ~2e-4 after normalisation, all of it float32 rounding in the quietest low mel bands
# (torchaudio's fbank run in float64 agrees with it to ~2e-5).
TOLERANCE = {False: 1e-4, True: 5e-4}
PARITY = [(1.0, 128, SC_MEAN, SC_STD), (3.0, 128, SC_MEAN, SC_STD),
          (2.0, 1024, -4.2677393, 4.5689974), (11.0, 1024, -4.2677393, 4.5689974)]


@pytest.mark.parametrize("numpy_backend", [False, True], ids=["torchaudio", "numpy"])
@pytest.mark.parametrize(("seconds", "max_length", "mean", "std"), PARITY,
                         ids=[f"{p[0]}s-{p[1]}" for p in PARITY])
def test_parity_with_transformers_feature_extractor(seconds, max_length, mean, std,
                                                    numpy_backend, monkeypatch):
    wave = _speechlike(seconds, seed=int(seconds))
    cfg = FeatureConfig(target_length=max_length, mean=mean, std=std)
    ours = F.fbank(wave, cfg)
    ref = _hf_features(wave, max_length, mean, std, numpy_backend, monkeypatch)
    assert ours.shape == ref.shape == (max_length, 128)
    frames = 1 + (len(wave) - 400) // 160
    assert (frames < max_length) == (seconds * 100 < max_length)  # one shorter, one longer
    assert (ours - ref).abs().max() < TOLERANCE[numpy_backend]
    # differs: other normalisation stats, or another clip, move the features far
    other = F.fbank(wave, FeatureConfig(target_length=max_length, mean=mean + 1, std=std))
    assert (other - ref).abs().max() > 0.05
    shifted = F.fbank(_speechlike(seconds, seed=99), cfg)
    assert (shifted - ref).abs().max() > 0.05


def test_parity_through_a_resampled_file(monkeypatch):
    """A 44.1 kHz stereo file, decoded and resampled by us, then featurised both ways."""
    cfg = FeatureConfig(target_length=128, mean=SC_MEAN, std=SC_STD)
    x = np.stack([_sine(700, 44100, 1.2), _sine(2500, 44100, 1.2, amp=0.2)], axis=1)
    data = _encode(x, 44100, "FLAC", "PCM_16")
    wave = F.load_audio(data)
    ref = _hf_features(wave, 128, SC_MEAN, SC_STD, False, monkeypatch)
    assert (F.features_from_audio(data, cfg) - ref).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# Bad input: each a clear AudioError


def test_empty_bytes(tmp_path):
    with pytest.raises(AudioError, match=r"^audio is empty \(0 bytes\)$"):
        F.load_audio(b"")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(AudioError, match=r"^audio file is empty \(0 bytes\): .*empty\.wav$"):
        F.decode_audio(empty)


def test_missing_file_and_wrong_type(tmp_path):
    with pytest.raises(AudioError, match=r"^audio file not found: .*nope\.wav$"):
        F.decode_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match=r"^audio path is not a file: "):
        F.decode_audio(str(tmp_path))
    with pytest.raises(AudioError, match=r"audio source must be bytes, a path or a binary file, "
                                         r"got int"):
        F.load_audio(123)


def test_zero_length_audio():
    data = _encode(np.zeros((0, 1), np.float32), 16000, "WAV", "PCM_16")
    assert F.audio_duration_s(data) == 0.0
    with pytest.raises(AudioError, match=r"^audio data has no samples \(zero-length audio\)$"):
        F.decode_audio(data)


@pytest.mark.parametrize("data", [b"hello, this is plain text and not audio at all\n" * 20,
                                  b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8,
                                  b"\x00" * 1000],
                         ids=["text", "png", "zeros"])
def test_non_audio_bytes(data):
    with pytest.raises(AudioError, match=r"^cannot decode audio data: .*Format not recognised "
                                         r"\(expected WAV, FLAC, OGG/Vorbis or MP3\)$"):
        F.load_audio(data)


def test_truncated_wav():
    data = _encode(_sine(440, 16000, 1.0), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match=r"^audio data is truncated: its WAV header declares "
                                         r"32000 bytes of samples but only 15956 are present$"):
        F.decode_audio(data[:16000])
    with pytest.raises(AudioError, match=r"^cannot decode audio data"):
        F.decode_audio(data[:30])  # cut inside the header
    assert F.decode_audio(data)[0].shape == (16000, 1)  # the complete file decodes


@pytest.mark.parametrize("size", [0xFFFFFFFF, 0x7FFFF000, 0x7FFF0000])
def test_wav_with_unknown_data_size_is_accepted(size):
    """Streaming writers' placeholders: RF64/sox 0xFFFFFFFF, ``espeak-ng --stdout`` 0x7FFFF000."""
    data = bytearray(_encode(_sine(440, 16000, 0.1), 16000, "WAV", "PCM_16"))
    assert data[36:40] == b"data"
    data[40:44] = struct.pack("<I", size)
    assert F.decode_audio(bytes(data))[0].shape == (1600, 1)
    # Just below the placeholder range a declared size is checked (and refused) again.
    data[40:44] = struct.pack("<I", 0x7FFEFFFF)
    with pytest.raises(AudioError, match="is truncated"):
        F.decode_audio(bytes(data))


def test_truncated_flac():
    data = _encode(_noise(16000, 1, amp=0.5), 16000, "FLAC", "PCM_16")
    with pytest.raises(AudioError, match=r"^audio data is truncated"):
        F.decode_audio(data[: len(data) // 2])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    x = _noise(1600, 2, amp=0.5)
    x[700, 1] = bad
    data = _encode(x, 16000, "WAV", "FLOAT")
    with pytest.raises(AudioError, match=r"^audio data contains NaN or infinite samples "
                                         r"\(1 in frames 0 to 1599\)$"):
        F.load_audio(data)
    with pytest.raises(AudioError, match="contains NaN or infinite samples"):
        F.decode_audio(data)


def test_huge_sample_values_refused():
    with pytest.raises(AudioError, match=r"sample values are too large for features "
                                         r"\(peak \|x\| = 1e\+30; expected float audio in"):
        F.features_from_audio(_encode(np.full(1600, 1e30, np.float32), 16000, "WAV", "FLOAT"),
                              FeatureConfig(target_length=16))


def test_too_long_is_refused_from_the_header_before_decoding(monkeypatch):
    data = _encode(np.zeros(32000, np.float32), 16000, "WAV", "PCM_16")

    def no_read(*args, **kwargs):
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no_read)
    with pytest.raises(AudioError, match=r"^audio data is too long: its header declares "
                                         r"2\.000 s; the limit is 1\.5 s$"):
        F.load_audio(data, max_duration_s=1.5)
    with pytest.raises(AudioError, match="too long"):
        F.features_from_audio(data, FeatureConfig(max_duration_s=1.0))


def test_ten_hour_flac_header_is_refused_without_decoding():
    data = bytearray(_encode(np.zeros(1600, np.float32), 16000, "FLAC", "PCM_16"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO comes first
    # STREAMINFO bytes 10..17 hold rate (20 bits), channels-1 (3), bits-1 (5), samples (36).
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | (16000 * 36000)
    data[18:26] = packed.to_bytes(8, "big")
    assert F.audio_duration_s(bytes(data)) == 36000.0
    with pytest.raises(AudioError, match=r"^audio data is too long: its header declares "
                                         r"36000\.000 s; the limit is 600 s$"):
        F.load_audio(bytes(data))


def test_decoding_stops_at_the_limit_when_the_header_understates(monkeypatch):
    monkeypatch.setattr(F, "_check_declared_length", lambda *args: None)
    data = _encode(np.zeros(32000, np.float32), 16000, "WAV", "PCM_16")
    with pytest.raises(AudioError, match=r"^audio data is too long: it decodes to more than "
                                         r"1\.5 s \(the limit\)$"):
        F.decode_audio(data, max_duration_s=1.5)
    assert F.decode_audio(data, max_duration_s=2.0)[0].shape == (32000, 1)


def test_many_channels_capped_when_kept_but_downmixed_by_load_audio():
    x = np.zeros((4800, 16), np.float32)
    x[:, 5] = 0.64
    data = _encode(x, 48000, "WAV", "PCM_16")  # 0.1 s, 16 channels x 4800 frames
    with pytest.raises(AudioError, match=r"^audio data is too large to decode with all channels: "
                                         r"16 channels x 4800 frames exceeds 38400 samples; "
                                         r"load_audio down-mixes as it decodes$"):
        F.decode_audio(data, max_duration_s=0.1)  # 0.1 s x 384 kHz = 38400 samples
    assert F.decode_audio(data, max_duration_s=0.2)[0].shape == (4800, 16)
    wave = F.load_audio(data, sample_rate=48000, max_duration_s=0.1)
    torch.testing.assert_close(wave, torch.full((4800,), 0.04), rtol=0, atol=1e-4)


@pytest.mark.parametrize(("wave", "message"), [
    (torch.zeros(2, 100), r"waveform must be 1-D \(mono samples\), got shape \(2, 100\)"),
    (torch.zeros(0), r"waveform is empty \(0 samples\)"),
    (torch.tensor([0.0, float("nan"), 0.0]), "waveform contains NaN or infinite samples"),
    (torch.zeros(400, dtype=torch.int16), "waveform must be floating point"),
    (np.zeros(400, np.float32), "waveform must be a torch.Tensor, got ndarray"),
])
def test_bad_waveforms(wave, message):
    with pytest.raises(AudioError, match=message):
        F.fbank(wave, FeatureConfig(target_length=16))


def test_bad_max_duration_is_a_config_error():
    with pytest.raises(ConfigError, match="max_duration_s must be positive, got 0"):
        F.decode_audio(b"RIFF", max_duration_s=0)
