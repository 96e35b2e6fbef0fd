"""The batched Kaldi front end (``fbank.KaldiFbank``) against torchaudio's
``compliance.kaldi.fbank`` (through ``features.fbank``, the per-clip path) on recordings made
by espeak-ng and sox, stored as WAV, FLAC, Ogg/Vorbis and MP3 at 8 to 96 kHz, mono and stereo;
and the waveform-in ONNX export against ``aat predict``'s path."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from aat_serve.adapters import features as F
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.fbank import KaldiFbank, mel_filters
from aat_serve.adapters.model import AudioClassifier
from tests.helpers import perturb_task_weights, require_tool, tiny_backbone

CFG = FeatureConfig(target_length=1024, mean=-4.27, std=4.57)
# (file, sample rate, channels): every container the service decodes, 8 to 96 kHz.
FORMATS = [("wav", 8000, 1), ("flac", 22050, 2), ("ogg", 44100, 1), ("mp3", 48000, 2),
           ("wav", 96000, 2), ("flac", 16000, 1)]


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Speech (espeak-ng) and a plucked note over noise (sox), re-encoded by ffmpeg in every
    format above, each decoded, down-mixed and resampled to 16 kHz as the service does."""
    espeak, sox, ffmpeg = (require_tool(t) for t in ("espeak-ng", "sox", "ffmpeg"))
    tmp = tmp_path_factory.mktemp("recordings")
    speech, note = tmp / "speech.wav", tmp / "note.wav"
    subprocess.run([espeak, "-v", "en-us+f3", "-w", str(speech),
                    "seven bright owls sing over the quiet harbour"], check=True, timeout=60)
    subprocess.run([sox, "-n", "-r", "44100", "-c", "2", str(note), "synth", "2.3", "pluck",
                    "A3", "synth", "2.3", "brownnoise", "mix", "vol", "0.6"],
                   check=True, timeout=60)
    out: dict[str, torch.Tensor] = {}
    for source in (speech, note):
        for fmt, rate, channels in FORMATS:
            path = tmp / f"{source.stem}-{rate}-{channels}.{fmt}"
            subprocess.run([ffmpeg, "-loglevel", "error", "-y", "-i", str(source), "-ar",
                            str(rate), "-ac", str(channels), str(path)], check=True, timeout=60)
            out[path.name] = F.load_audio(path.read_bytes(), sample_rate=16000)
    return out


def test_mel_filters_equal_torchaudios():
    for bins, padded, rate in ((128, 512, 16000.0), (64, 512, 16000.0), (40, 256, 8000.0)):
        theirs, _ = kaldi.get_mel_banks(bins, padded, rate, 20.0, 0.0, 100.0, -500.0, 1.0)
        ours = mel_filters(bins, padded, rate)
        assert ours.shape == (padded // 2 + 1, bins)
        assert torch.equal(ours[:-1], theirs.T) and not ours[-1].any()


def test_each_recording_equals_torchaudio(recordings):
    fft, matmul = KaldiFbank(CFG), KaldiFbank(CFG, dft="matmul")
    for name, wave in recordings.items():
        reference = F.fbank(wave, CFG)
        assert (fft(wave[None])[0] - reference).abs().max().item() < 1e-4, name
        # The DFT as a matrix product (the ONNX form): float32 rounding in near-empty bins.
        assert (matmul(wave[None])[0] - reference).abs().max().item() < 1e-3, name


def test_a_batch_of_different_lengths_equals_each_clip_alone(recordings):
    waves = list(recordings.values())
    waves = [waves[0], waves[1][:12345], waves[2][:200], waves[3]]  # one shorter than a window
    n = max(len(w) for w in waves)
    batch = torch.stack([torch.nn.functional.pad(w, (0, n - len(w))) for w in waves])
    lengths = torch.tensor([len(w) for w in waves])
    got = KaldiFbank(CFG)(batch, lengths)
    for i, w in enumerate(waves):
        assert (got[i] - F.fbank(w, CFG)).abs().max().item() < 1e-4, i
    # The differs check: without the lengths, the padding of the short clips is read as audio.
    unmasked = KaldiFbank(CFG)(batch)
    assert (unmasked[1] - F.fbank(waves[1], CFG)).abs().max().item() > 0.1


def test_frame_counts_follow_torchaudio(recordings):
    wave = next(iter(recordings.values()))
    for n in (399, 400, 401, 560, 16000, len(wave)):
        ours = KaldiFbank(CFG).log_mel(wave[None, :n])[0]
        theirs = F.log_mel(wave[:n], CFG)
        assert ours.shape == theirs.shape, n
        assert (ours - theirs).abs().max().item() < 1e-4, n


@pytest.fixture(scope="module")
def model() -> AudioClassifier:
    return perturb_task_weights(AudioClassifier(tiny_backbone(), "aat_ms", 5), seed=7,
                                scale=0.2).eval()


def test_waveform_in_onnx_equals_the_predict_path(recordings, model, tmp_path):
    """``aat export onnx --input waveform``'s graph takes 16 kHz samples of any length and
    returns the logits ``aat predict`` computes (decode, torchaudio fbank, model)."""
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from aat_serve.adapters.onnx_export import export_onnx

    cfg = FeatureConfig(num_mel_bins=32, target_length=64, mean=-5.0, std=3.0)
    path = export_onnx(model, tmp_path / "wave.onnx", num_frames=64, waveform=cfg,
                       metadata={"aat.input": "waveform"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["waveform"]
    seen = []
    for name, wave in list(recordings.items())[::3]:
        for n in (300, 4000, 9000, len(wave)):  # shorter and longer than the task's 0.64 s
            with torch.no_grad():
                expected = model(F.fbank(wave[:n], cfg)[None])
            got = torch.from_numpy(session.run(None, {"waveform": wave[None, :n].numpy()})[0])
            assert (got - expected).abs().max().item() < 1e-3, (name, n)
            seen.append(got)
    assert (seen[0] - seen[1]).abs().max().item() > 1e-2  # other audio, other logits
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["aat.input"] == "waveform"


def test_cli_exports_waveform_input(tmp_path, capsys, model):
    from aat_serve.adapters.bundle import TaskBundle
    from aat_serve.cli.main import main
    from tests.service.helpers import write_tiny_checkpoint

    pytest.importorskip("onnxruntime")
    from aat_serve.adapters.checkpoints import load_checkpoint

    ckpt_dir = write_tiny_checkpoint(tmp_path / "ckpt")
    ckpt = load_checkpoint(ckpt_dir)
    trained = perturb_task_weights(AudioClassifier(ckpt.backbone, "aat_m", 3), seed=1)
    TaskBundle.from_model(trained, "t", ["a", "b", "c"], ckpt.features).save(tmp_path / "t.st")
    assert main(["export", "onnx", "--checkpoint", str(ckpt_dir), "--bundle",
                 str(tmp_path / "t.st"), "--input", "waveform", "--out",
                 str(tmp_path / "t.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["input_name"] == "waveform" and info["input"] == ["batch", "samples"]
