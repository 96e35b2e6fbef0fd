"""Audio front end: decode (soundfile) -> mono -> resample (torchaudio) -> AST's Kaldi log-mel.

Every unusable input raises ``AudioError`` saying what is wrong. Lengths are checked against the
header before anything is decoded, and decoding stops at the limit, so a hostile header cannot
make us allocate or work for longer than ``max_duration_s`` of audio.
"""

from __future__ import annotations

import io
import math
import os
import struct
from typing import BinaryIO, NamedTuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as taf

from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.errors import AudioError, AudioTooLongError, ConfigError
from aat_serve.adapters.fbank import frame_length_samples

AudioSource = bytes | bytearray | memoryview | str | os.PathLike | BinaryIO

MIN_SAMPLE_RATE = 1_000
"""Below this a header is corrupt rather than audio the model could use."""
MAX_SAMPLE_RATE = 384_000
"""Highest rate in real recording formats (DXD 352.8 kHz, 384 kHz PCM)."""
MAX_RESAMPLE_RATIO_TERM = 1_000
"""Resampling cost grows with rate / gcd(rate, target); rates whose reduced ratio exceeds this
(e.g. 44101 Hz) are resampled as the nearest rate that reduces well (pitch error <= 0.1 %)."""
_BLOCK_SAMPLES = 1 << 22  # samples (frames x channels) decoded per read
_STREAMING_DATA_SIZE = 0x7FFF0000  # WAV data sizes from here up are streaming placeholders
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports SF_COUNT_MAX when a stream's length is unknown
_FORMATS = "WAV, FLAC, OGG/Vorbis or MP3"
MP3_SUPPORTED = "MP3" in sf.available_formats()
"""libsndfile reads MP3 from version 1.1 on; older wheels refuse MP3 with a clear AudioError."""


class AudioInfo(NamedTuple):
    """What a file's header declares, read without decoding the samples."""

    frames: int
    sample_rate: int
    channels: int
    format: str
    subtype: str

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate


# --------------------------------------------------------------------------------------------
# Decoding


def _open_source(source: AudioSource) -> tuple[BinaryIO, str, bool]:
    """A seekable binary file for ``source``, a name for messages, and whether we own it."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if not data:
            raise AudioError("audio is empty (0 bytes)")
        return io.BytesIO(data), "audio data", True
    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise AudioError(f"audio file not found: {path}")
        if not os.path.isfile(path):
            raise AudioError(f"audio path is not a file: {path}")
        if os.path.getsize(path) == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        try:
            return open(path, "rb"), str(path), True  # closed by the caller
        except OSError as e:
            raise AudioError(f"cannot read audio file {path}: {e.strerror}") from e
    if hasattr(source, "read") and hasattr(source, "seek"):
        return source, getattr(source, "name", "audio stream"), False
    raise AudioError(
        f"audio source must be bytes, a path or a binary file, got {type(source).__name__}")


def _looks_like_mp3(head: bytes) -> bool:
    return head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF
                                       and head[1] & 0xE0 == 0xE0)


def _check_riff_complete(fh: BinaryIO, name: str) -> None:
    """Refuse a WAV whose ``data`` chunk declares more bytes than the file holds.

    libsndfile silently shortens such files; a truncated upload should be an error instead.
    Sizes 0 and from 0x7FFF0000 up mean "unknown" and are accepted: streaming writers that
    cannot seek back put a placeholder there (RF64 and sox write 0xFFFFFFFF, ``espeak-ng
    --stdout`` 0x7FFFF000), and no real upload comes near 2 GiB.
    """
    fh.seek(0, io.SEEK_END)
    total = fh.tell()
    fh.seek(0)
    head = fh.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return
    pos = 12
    for _ in range(4096):  # a bounded walk over the chunk list
        fh.seek(pos)
        chunk = fh.read(8)
        if len(chunk) < 8:
            return
        cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if cid == b"data":
            available = total - (pos + 8)
            if 0 < size < _STREAMING_DATA_SIZE and size > available:
                raise AudioError(
                    f"{name} is truncated: its WAV header declares {size} bytes of samples but "
                    f"only {available} are present")
            return
        pos += 8 + size + (size & 1)


def _open_soundfile(fh: BinaryIO, name: str) -> sf.SoundFile:
    fh.seek(0)
    head = fh.read(16)
    fh.seek(0)
    if not MP3_SUPPORTED and _looks_like_mp3(head):
        raise AudioError(
            f"{name} looks like MP3, which this soundfile/libsndfile build cannot decode "
            f"(libsndfile {sf.__libsndfile_version__}; MP3 needs >= 1.1)")
    _check_riff_complete(fh, name)
    fh.seek(0)
    try:
        return sf.SoundFile(fh)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as e:
        reason = getattr(e, "error_string", None) or str(e)
        raise AudioError(f"cannot decode {name}: {reason.rstrip('.')} "
                         f"(expected {_FORMATS})") from e


def _info(f: sf.SoundFile, name: str) -> AudioInfo:
    sr = int(f.samplerate)
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name} has sample rate {sr} Hz; expected {MIN_SAMPLE_RATE} to "
                         f"{MAX_SAMPLE_RATE} Hz")
    if f.channels < 1:
        raise AudioError(f"{name} declares {f.channels} channels")
    return AudioInfo(int(f.frames), sr, int(f.channels), f.format, f.subtype)


def _check_declared_length(info: AudioInfo, name: str, max_duration_s: float) -> None:
    if info.frames < _UNKNOWN_FRAMES and info.duration_s > max_duration_s:
        raise AudioTooLongError(
            f"{name} is too long: its header declares {info.duration_s:.3f} s; the limit is "
            f"{max_duration_s:g} s")


def audio_info(source: AudioSource) -> AudioInfo:
    """Frames, rate, channels and format as declared by the header; decodes no samples."""
    fh, name, owned = _open_source(source)
    try:
        with _open_soundfile(fh, name) as f:
            return _info(f, name)
    finally:
        if owned:
            fh.close()


def audio_duration_s(source: AudioSource) -> float:
    """Duration in seconds declared by the header (cheap: no decoding)."""
    return audio_info(source).duration_s


def _decode(source: AudioSource, max_duration_s: float, mono: bool) -> tuple[np.ndarray, int]:
    """Decode to float32 ``(frames, channels)``, or ``(frames,)`` down-mixed when ``mono``."""
    if not max_duration_s > 0:
        raise ConfigError(f"max_duration_s must be positive, got {max_duration_s}")
    fh, name, owned = _open_source(source)
    try:
        with _open_soundfile(fh, name) as f:
            info = _info(f, name)
            _check_declared_length(info, name, max_duration_s)
            limit = math.floor(max_duration_s * info.sample_rate)
            budget = math.floor(max_duration_s * MAX_SAMPLE_RATE)
            if not mono and min(info.frames, limit) * info.channels > budget:
                raise AudioError(
                    f"{name} is too large to decode with all channels: {info.channels} channels "
                    f"x {info.frames} frames exceeds {budget} samples; load_audio down-mixes "
                    "as it decodes")
            block = max(1, _BLOCK_SAMPLES // info.channels)
            parts: list[np.ndarray] = []
            got = 0
            while got <= limit:
                try:
                    chunk = f.read(min(block, limit + 1 - got), dtype="float32", always_2d=True)
                except (sf.SoundFileError, RuntimeError) as e:
                    reason = getattr(e, "error_string", None) or str(e)
                    raise AudioError(f"{name} is truncated or corrupt: decoding failed after "
                                     f"{got} frames ({reason.rstrip('.')})") from e
                if len(chunk) == 0:
                    break
                if not np.isfinite(chunk).all():
                    bad = int(np.size(chunk) - np.count_nonzero(np.isfinite(chunk)))
                    raise AudioError(f"{name} contains NaN or infinite samples ({bad} in frames "
                                     f"{got} to {got + len(chunk) - 1})")
                parts.append(chunk.mean(axis=1, dtype=np.float32) if mono else chunk)
                got += len(chunk)
    finally:
        if owned:
            fh.close()
    if got > limit:
        raise AudioTooLongError(f"{name} is too long: it decodes to more than "
                                f"{max_duration_s:g} s (the limit)")
    if got == 0:
        raise AudioError(f"{name} has no samples (zero-length audio)")
    # The header's count is exact for every format but MP3, where it may be an estimate.
    if info.format != "MP3" and info.frames < _UNKNOWN_FRAMES and got < info.frames:
        raise AudioError(f"{name} is truncated: its header declares {info.frames} frames but "
                         f"only {got} could be decoded")
    wave = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return wave, info.sample_rate


def decode_audio(source: AudioSource, *, max_duration_s: float = 600.0
                 ) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG/MP3 bytes or a file to float32 ``(frames, channels)`` and its rate.

    Integer PCM is scaled to [-1, 1) as ``torchaudio.load`` (and so AST's training data) did.
    All channels are kept, so frames x channels is capped at ``max_duration_s`` of mono audio
    at ``MAX_SAMPLE_RATE``.
    """
    return _decode(source, max_duration_s, mono=False)


# --------------------------------------------------------------------------------------------
# Resampling


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def resample_rate(orig: int, new: int) -> int:
    """The rate to resample from: ``orig`` itself unless its ratio to ``new`` reduces badly.

    torchaudio builds a kernel of (new/g) x (orig/g) taps, g = gcd(orig, new); for a rate
    like 44101 Hz that is tens of thousands squared. Such rates are treated as the nearest
    rate whose reduced ratio is small, which shifts pitch by at most about 0.1 %.
    """
    lim = MAX_RESAMPLE_RATIO_TERM
    g = math.gcd(orig, new)
    if orig // g <= lim and new // g <= lim:
        return orig
    best = None
    for d in _divisors(new):
        cand = max(d, round(orig / d) * d)
        g = math.gcd(cand, new)
        if cand // g <= lim and new // g <= lim and (
                best is None or abs(cand - orig) < abs(best - orig)):
            best = cand
    if best is None:  # cannot happen for new <= lim**2; kept as a clear failure
        raise AudioError(f"cannot resample {orig} Hz to {new} Hz")
    return best


def resample(waveform: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited (sinc, Hann window) resampling from ``orig`` to ``new`` Hz."""
    if orig == new:
        return waveform
    return taf.resample(waveform, resample_rate(orig, new), new)


def load_audio(source: AudioSource, *, sample_rate: int = 16000,
               max_duration_s: float = 600.0) -> torch.Tensor:
    """Decode, down-mix (mean of channels) and resample to a 1-D float32 waveform."""
    if not MIN_SAMPLE_RATE <= int(sample_rate) <= MAX_SAMPLE_RATE:
        raise ConfigError(f"target sample_rate must be {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE} "
                          f"Hz, got {sample_rate}")
    wave, sr = _decode(source, max_duration_s, mono=True)
    return resample(torch.from_numpy(wave), sr, int(sample_rate))


# --------------------------------------------------------------------------------------------
# Features


def _check_waveform(waveform: torch.Tensor) -> torch.Tensor:
    if not isinstance(waveform, torch.Tensor):
        raise AudioError(f"waveform must be a torch.Tensor, got {type(waveform).__name__}")
    if waveform.dim() == 2 and waveform.shape[0] == 1:
        waveform = waveform[0]
    if waveform.dim() != 1:
        raise AudioError(f"waveform must be 1-D (mono samples), got shape "
                         f"{tuple(waveform.shape)}")
    if waveform.numel() == 0:
        raise AudioError("waveform is empty (0 samples)")
    if not waveform.is_floating_point():
        raise AudioError(f"waveform must be floating point in [-1, 1], got {waveform.dtype}")
    waveform = waveform.to(torch.float32)
    if not torch.isfinite(waveform).all():
        raise AudioError("waveform contains NaN or infinite samples")
    return waveform


def log_mel(waveform: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """AST's Kaldi log-mel fbank, ``(frames, num_mel_bins)``, neither padded nor normalised.

    A clip shorter than one window is zero-padded to one window so it still yields a frame.
    """
    wave = _check_waveform(waveform)
    win = frame_length_samples(cfg)
    if wave.numel() < win:
        wave = torch.nn.functional.pad(wave, (0, win - wave.numel()))
    feats = kaldi.fbank(
        wave[None], htk_compat=True, sample_frequency=cfg.sample_rate, use_energy=False,
        window_type="hanning", num_mel_bins=cfg.num_mel_bins, dither=0.0,
        frame_shift=cfg.frame_shift_ms, frame_length=cfg.frame_length_ms)
    if not torch.isfinite(feats).all():
        peak = float(wave.abs().max())
        raise AudioError(f"sample values are too large for features (peak |x| = {peak:.3g}; "
                         "expected float audio in [-1, 1])")
    return feats


def pad_or_cut(feats: torch.Tensor, target_length: int) -> torch.Tensor:
    """Zero-pad at the end, or cut, to ``target_length`` frames (AST pads in the log-mel domain)."""
    n = feats.shape[0]
    if n < target_length:
        return torch.nn.functional.pad(feats, (0, 0, 0, target_length - n))
    return feats[:target_length]


def normalise(feats: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """AST's normalisation ``(x - mean) / (2 std)``: roughly mean 0, std 0.5 on the data."""
    return (feats - cfg.mean) / (cfg.std * 2)


def fbank(waveform: torch.Tensor, cfg: FeatureConfig) -> torch.Tensor:
    """Model input ``(target_length, num_mel_bins)`` from a mono waveform at ``cfg.sample_rate``."""
    return normalise(pad_or_cut(log_mel(waveform, cfg), cfg.target_length), cfg)


def features_from_audio(source: AudioSource, cfg: FeatureConfig) -> torch.Tensor:
    """Decode, down-mix, resample and featurise: ``(target_length, num_mel_bins)``."""
    wave = load_audio(source, sample_rate=cfg.sample_rate, max_duration_s=cfg.max_duration_s)
    return fbank(wave, cfg)
