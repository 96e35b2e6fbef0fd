"""Features computed in the batch and long audio scored in windows, through the API.

References are the per-clip path: ``features.fbank`` of the window's samples and a single-task
model (``reference_scores`` / ``_window_scores``), never the service's own code.
"""

from __future__ import annotations

import copy
import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
import torch

from aat_serve.adapters.fbank import window_samples
from aat_serve.adapters.features import fbank, load_audio
from aat_serve.service.windows import window_count
from tests.service.helpers import error, reference_scores, served, wav_bytes

WAV = {"content-type": "audio/wav"}
SR = 16000
WINDOW = 63 * 160 + 400  # the tiny backbone's 64 frames: 10480 samples, 0.655 s


def _post(c, task, audio, query="top_k=10"):
    return c.post(f"/classify/{task}?{query}", content=audio, headers=WAV)


def _vector(predictions, labels):
    got = {p["label"]: p["score"] for p in predictions}
    return torch.tensor([got[x] for x in labels])


def _burst_wav(seconds: float = 30.0, at_s: float = 15.0) -> bytes:
    """Quiet noise with a loud 1 kHz tone burst of 0.3 s at ``at_s``."""
    rng = np.random.default_rng(5)
    x = 0.01 * rng.standard_normal(int(seconds * SR))
    i = int(at_s * SR)
    t = np.arange(int(0.3 * SR)) / SR
    x[i:i + t.size] += 0.8 * np.sin(2 * np.pi * 1000 * t)
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), SR, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _window_scores(ckpt, bundle, audio: bytes, starts: list[int]) -> list[torch.Tensor]:
    """Per-window probabilities through the per-clip path."""
    cfg = bundle.manifest.feature_config
    wave = load_audio(audio, sample_rate=cfg.sample_rate)
    model = bundle.build_model(copy.deepcopy(ckpt.backbone)).eval()
    out = []
    with torch.no_grad():
        for s in starts:
            logits = model(fbank(wave[s:s + WINDOW], cfg)[None])[0]
            out.append(torch.sigmoid(logits) if bundle.manifest.multi_label
                       else torch.softmax(logits, -1))
    return out


def _save(store, bundles, *names):
    for n in names:
        bundles[n].save(store / f"{n}.safetensors")


def test_the_window_is_the_samples_that_make_target_length_frames(ckpt):
    assert window_samples(ckpt.features) == WINDOW
    assert window_count(WINDOW, WINDOW, WINDOW) == 1
    assert window_count(WINDOW + 1, WINDOW, WINDOW) == 2
    assert window_count(3 * SR, WINDOW, 4000) == 1 + math.ceil((3 * SR - WINDOW) / 4000) == 11
    assert window_count(100, WINDOW, 1) == 1


def test_clips_of_several_lengths_in_one_batch_equal_the_per_clip_path(make_app, store, ckpt,
                                                                       bundles):
    _save(store, bundles, "birds", "words")
    jobs = [("birds", wav_bytes(0.02, seed=1)), ("words", wav_bytes(0.3, seed=2)),
            ("birds", wav_bytes(0.6, seed=3)), ("words", wav_bytes(0.655, seed=4))]
    with served(make_app(max_batch=4, max_wait_ms=3000)) as c, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda j: _post(c, *j), jobs))
    for (task, audio), r in zip(jobs, answers, strict=True):
        body = r.json()
        assert r.status_code == 200 and body["batch_size"] == 4 and body["windows"] == 1
        b = bundles[task]
        got = _vector(body["predictions"], b.manifest.labels)
        torch.testing.assert_close(got, reference_scores(ckpt, b, audio), atol=1e-4, rtol=0)
    # differs: another clip's reference is not within the tolerance
    other = reference_scores(ckpt, bundles["birds"], jobs[2][1])
    got = _vector(answers[0].json()["predictions"], bundles["birds"].manifest.labels)
    assert (got - other).abs().max() > 1e-3


def test_long_audio_is_scored_in_windows_and_averaged(make_app, store, ckpt, bundles):
    _save(store, bundles, "birds")
    audio = _burst_wav()
    n = 30 * SR
    count = 1 + math.ceil((n - WINDOW) / WINDOW)  # 46
    with served(make_app()) as c:
        r = _post(c, "birds", audio, "top_k=4&windows=true")
        first = _post(c, "birds", audio, "top_k=4&aggregate=first")
    body = r.json()
    assert r.status_code == 200
    assert {k: body[k] for k in ("duration_s", "scored_s", "windows", "window_s", "hop_s",
                                 "aggregate")} == {
        "duration_s": 30.0, "scored_s": 30.0, "windows": count, "window_s": 0.655,
        "hop_s": 0.655, "aggregate": "mean"}
    starts = [i * WINDOW for i in range(count)]
    assert [(w["start_s"], w["end_s"]) for w in body["window_results"]] == [
        (round(s / SR, 6), round(min(s + WINDOW, n) / SR, 6)) for s in starts]
    labels = bundles["birds"].manifest.labels
    ref = _window_scores(ckpt, bundles["birds"], audio, starts)
    for w, expected in zip(body["window_results"], ref, strict=True):
        torch.testing.assert_close(_vector(w["predictions"], labels), expected, atol=1e-4,
                                   rtol=0)
    mean = torch.stack(ref).mean(0)
    torch.testing.assert_close(_vector(body["predictions"], labels), mean, atol=1e-4, rtol=0)
    # the burst's window (15 s is in window 22) differs from a quiet one
    burst, quiet = ref[int(15 * SR) // WINDOW], ref[0]
    assert (burst - quiet).abs().max() > 1e-3
    # first: only the first window, the cut made before windows; it differs from the mean
    fb = first.json()
    assert (fb["windows"], fb["scored_s"], fb["aggregate"], fb["window_results"]) == (
        1, 0.655, "first", None)
    got = _vector(fb["predictions"], labels)
    torch.testing.assert_close(got, reference_scores(ckpt, bundles["birds"], audio),
                               atol=1e-4, rtol=0)
    assert (got - mean).abs().max() > 1e-4


def test_multi_label_takes_the_max_and_hops_overlap(make_app, store, ckpt, bundles):
    _save(store, bundles, "tags")
    audio = wav_bytes(3.0, seed=6)
    hop = 4000
    count = 1 + math.ceil((3 * SR - WINDOW) / hop)
    with served(make_app(window_hop_s=0.25)) as c:
        r = _post(c, "tags", audio, "windows=true")
        mean = _post(c, "tags", audio, "aggregate=mean&hop_s=0.655")
    body = r.json()
    assert (body["aggregate"], body["windows"], body["hop_s"], body["scored_s"]) == (
        "max", count, 0.25, 3.0)
    starts = [i * hop for i in range(count)]
    assert [w["start_s"] for w in body["window_results"]] == [s / SR for s in starts]
    labels = bundles["tags"].manifest.labels
    ref = torch.stack(_window_scores(ckpt, bundles["tags"], audio, starts))
    torch.testing.assert_close(_vector(body["predictions"], labels), ref.max(0).values,
                               atol=1e-4, rtol=0)
    mb = mean.json()
    assert (mb["aggregate"], mb["windows"], mb["hop_s"]) == ("mean", 5, 0.655)
    assert (_vector(mb["predictions"], labels) - ref.max(0).values).abs().max() > 1e-4


def test_more_windows_than_the_limit_is_413_and_a_long_hop_400(make_app, store, bundles):
    _save(store, bundles, "birds")
    audio = wav_bytes(3.0)
    with served(make_app(max_windows=4, window_hop_s=60.0)) as c:  # capped at the window
        r = _post(c, "birds", audio)
        assert (r.status_code, r.json()) == error(
            413, "audio_too_long", "audio of 3 s makes 5 windows of 0.655 s every 0.655 s; the "
            "limit is 4 windows (AAT_MAX_WINDOWS): send shorter audio, a larger hop_s, or "
            "aggregate=first")
        assert _post(c, "birds", audio, "aggregate=first").status_code == 200
        assert _post(c, "birds", wav_bytes(2.0)).json()["windows"] == 4  # within: accepted
        r = _post(c, "birds", audio, "hop_s=0.7")
        assert (r.status_code, r.json()) == error(
            400, "invalid_request", "hop_s is 0.7; allowed: above 0 up to the task's window of "
            "0.655 s (a longer hop would leave audio unscored)")
        r = _post(c, "birds", audio, "aggregate=median")
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request"


@pytest.mark.parametrize("peak", [1e30])
def test_samples_too_large_for_features_are_400_for_that_clip_only(make_app, store, bundles,
                                                                   peak):
    _save(store, bundles, "birds")
    buf = io.BytesIO()
    sf.write(buf, np.full(4000, peak, dtype=np.float32), SR, format="WAV", subtype="FLOAT")
    with served(make_app()) as c:
        r = _post(c, "birds", buf.getvalue())
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_audio"
        assert r.json()["error"]["message"].startswith("sample values are too large for "
                                                       "features (peak |x| = 1e+30")
        assert _post(c, "birds", wav_bytes()).status_code == 200
