"""`aat predict` end to end: a tiny Hugging Face checkpoint written by transformers, WAV files
written with soundfile, the JSON output checked against the model run directly and against
transformers' own ``ASTForAudioClassification``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from aat_serve.adapters.backbone import AST
from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint, read_label_csv, to_original_state_dict
from aat_serve.adapters.config import BackboneConfig, FeatureConfig
from aat_serve.adapters.features import features_from_audio
from aat_serve.adapters.model import AudioClassifier
from aat_serve.cli.main import main

DATA = Path(__file__).parent / "data"  # copies of AST's label CSVs (../shared/data)
SC_CSV = DATA / "speechcommands_class_labels_indices.csv"
ESC_CSV = DATA / "esc50_class_labels_indices.csv"
NUM_CLASSES = 35  # the Speech Commands v2 head size, so its label CSV fits
MEAN, STD = -6.845978, 5.5654526  # SC-v2 statistics: not the AudioSet defaults
CKPT_FEATURES = FeatureConfig(num_mel_bins=128, target_length=64, mean=MEAN, std=STD)


def _hf_model(problem_type: str | None, seed: int = 0):
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, patch_size=16, frequency_stride=16, time_stride=16,
                       max_length=64, num_mel_bins=128, num_labels=NUM_CLASSES,
                       id2label={i: f"word{i}" for i in range(NUM_CLASSES)},
                       label2id={f"word{i}": i for i in range(NUM_CLASSES)},
                       problem_type=problem_type)
    torch.manual_seed(seed)
    model = ASTForAudioClassification(config).eval()
    with torch.no_grad():  # O(1) activations and well-spread logits, not HF's tiny init
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()))
            elif "layernorm" in name and name.endswith("weight"):
                p.normal_(1, 0.1)
            else:
                p.normal_(0, 0.1)
    return model


def _write_hf(directory: Path, problem_type: str | None) -> Path:
    from transformers import ASTFeatureExtractor

    model = _hf_model(problem_type)
    model.save_pretrained(directory)
    ASTFeatureExtractor(max_length=64, mean=MEAN, std=STD).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"single": _write_hf(root / "single", "single_label_classification"),
            "multi": _write_hf(root / "multi", "multi_label_classification")}


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    out = {}
    for name, freq, sr, channels, subtype in (("tone", 440.0, 16000, 1, "PCM_16"),
                                              ("chirp", 2500.0, 16000, 1, "FLOAT"),
                                              ("stereo", 1000.0, 44100, 2, "PCM_24")):
        t = np.arange(int(0.6 * sr)) / sr  # one window of the checkpoint's 64 frames
        wave = 0.3 * np.sin(2 * np.pi * freq * t * (1 + t)) + 0.02 * rng.standard_normal(t.size)
        data = np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave
        path = root / f"{name}.wav"
        sf.write(path, data.astype(np.float32), sr, subtype=subtype)
        out[name] = str(path)
    bad = root / "corrupt.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk" + bytes(range(64)))
    out["corrupt"] = str(bad)
    return out


def predict_json(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = main(["predict", *argv, "--json"])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_json_logits_equal_the_model_and_transformers(capsys, ckpt_dirs, wavs, kind):
    from transformers import ASTForAudioClassification

    files = [wavs["tone"], wavs["chirp"], wavs["stereo"]]
    code, results, err = predict_json(capsys, *files, "--checkpoint", str(ckpt_dirs[kind]),
                                      "--top-k", "4")
    assert code == 0, err
    assert [r["file"] for r in results] == files

    ckpt = load_checkpoint(ckpt_dirs[kind])
    model = AudioClassifier(ckpt.backbone, "head", NUM_CLASSES).eval()
    model.load_task_state_dict({f"head.{k}": v for k, v in ckpt.head.items()})
    hf = ASTForAudioClassification.from_pretrained(ckpt_dirs[kind]).eval()
    seen = []
    for r, f in zip(results, files, strict=True):
        feats = features_from_audio(f, CKPT_FEATURES)  # mean/std from preprocessor_config
        with torch.no_grad():
            direct = model(feats[None])[0]
            own_head = ckpt.logits(feats[None])[0]
            ref = hf(input_values=feats[None]).logits[0]
            default_stats = model(features_from_audio(
                f, FeatureConfig(num_mel_bins=128, target_length=64))[None])[0]
        got = torch.tensor(r["logits"], dtype=torch.float32)
        assert got.shape == (NUM_CLASSES,)
        assert torch.equal(got, direct)
        torch.testing.assert_close(got, own_head, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
        assert (got - default_stats).abs().max() > 1e-3  # the checkpoint's stats were used

        all_scores = torch.sigmoid(got) if kind == "multi" else torch.softmax(got, dim=0)
        other = torch.softmax(got, dim=0) if kind == "multi" else torch.sigmoid(got)
        scores = [x["score"] for x in r["predictions"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        top = torch.topk(all_scores, 4)
        assert [x["label"] for x in r["predictions"]] == [f"word{i}" for i in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor(scores), top.values, rtol=0, atol=1e-7)
        assert not torch.allclose(torch.tensor(scores), torch.topk(other, 4).values, atol=1e-3)
        if kind == "single":
            assert math.isclose(float(all_scores.sum()), 1.0, abs_tol=1e-5)
            assert sum(scores) <= 1.0 + 1e-6
        assert all(0.0 < s < 1.0 for s in scores)
        seen.append(got)
    assert not torch.equal(seen[0], seen[1])


def test_text_output_and_top_k_bounds(capsys, ckpt_dirs, wavs):
    ckpt = str(ckpt_dirs["single"])
    assert main(["predict", wavs["tone"], "--checkpoint", ckpt, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == wavs["tone"] and len(lines) == 3
    score, label = lines[1].split()
    assert label.startswith("word") and 0 < float(score) < 1

    code, results, _ = predict_json(capsys, wavs["tone"], "--checkpoint", ckpt, "--top-k", "99")
    assert code == 0 and len(results[0]["predictions"]) == NUM_CLASSES
    assert main(["predict", wavs["tone"], "--checkpoint", ckpt, "--top-k", "0"]) == 1
    assert "--top-k must be at least 1, got 0" in capsys.readouterr().err


def test_labels_csv_renames_the_classes(capsys, ckpt_dirs, wavs):
    ckpt = str(ckpt_dirs["single"])
    _, plain, _ = predict_json(capsys, wavs["tone"], "--checkpoint", ckpt, "--top-k", "3")
    code, named, err = predict_json(capsys, wavs["tone"], "--checkpoint", ckpt, "--top-k", "3",
                                    "--labels", str(SC_CSV))
    assert code == 0, err
    words = read_label_csv(SC_CSV)
    assert len(words) == NUM_CLASSES and words[0] == "backward"
    idx = [int(x["label"].removeprefix("word")) for x in plain[0]["predictions"]]
    assert [x["label"] for x in named[0]["predictions"]] == [words[i] for i in idx]
    assert named[0]["logits"] == plain[0]["logits"]

    assert main(["predict", wavs["tone"], "--checkpoint", ckpt, "--labels", str(ESC_CSV)]) == 1
    assert f"label file {str(ESC_CSV)!r} has 50 classes, but the task has 35" in \
        capsys.readouterr().err


def test_bundle_with_another_class_count_and_its_own_features(capsys, ckpt_dirs, wavs,
                                                              tmp_path):
    ckpt = load_checkpoint(ckpt_dirs["single"])
    labels = read_label_csv(ESC_CSV)
    model = AudioClassifier(ckpt.backbone, "aat_ms", len(labels))
    torch.manual_seed(1)
    with torch.no_grad():  # stands in for training: non-zero adapters and head
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    bundle_features = FeatureConfig(num_mel_bins=128, target_length=48, mean=-6.6268077,
                                    std=5.358466)
    path = TaskBundle.from_model(model, "esc50", labels, bundle_features).save(
        tmp_path / "esc50.safetensors")

    files = [wavs["tone"], wavs["stereo"]]
    # the bundle's 48 frames make 0.495-s windows: score the first, as the features cut
    code, results, err = predict_json(capsys, *files, "--checkpoint", str(ckpt_dirs["single"]),
                                      "--bundle", str(path), "--top-k", "5", "--aggregate",
                                      "first")
    assert code == 0, err
    fresh = TaskBundle.load(path).build_model(load_checkpoint(ckpt_dirs["single"]).backbone)
    for r, f in zip(results, files, strict=True):
        with torch.no_grad():
            want = fresh(features_from_audio(f, bundle_features)[None])[0]
            with_ckpt_features = fresh(features_from_audio(f, CKPT_FEATURES)[None])[0]
        got = torch.tensor(r["logits"], dtype=torch.float32)
        assert got.shape == (50,) and torch.equal(got, want)
        assert (got - with_ckpt_features).abs().max() > 1e-3
        top = torch.topk(torch.softmax(want, 0), 5)
        assert [x["label"] for x in r["predictions"]] == [labels[i] for i in top.indices.tolist()]

    # A bundle trained on another backbone is refused with the fingerprint error.
    other = AudioClassifier(AST(ckpt.backbone.cfg), "head", 3)
    wrong = TaskBundle.from_model(other, "other", ["a", "b", "c"], bundle_features).save(
        tmp_path / "other.safetensors")
    assert main(["predict", wavs["tone"], "--checkpoint", str(ckpt_dirs["single"]),
                 "--bundle", str(wrong)]) == 1
    assert "error: bundle 'other' was trained on backbone sha256:" in capsys.readouterr().err


def test_multi_label_bundle_uses_sigmoid(capsys, ckpt_dirs, wavs, tmp_path):
    ckpt = load_checkpoint(ckpt_dirs["single"])
    model = AudioClassifier(ckpt.backbone, "head", 6)
    path = TaskBundle.from_model(model, "tags", [f"t{i}" for i in range(6)], CKPT_FEATURES,
                                 multi_label=True).save(tmp_path / "tags.safetensors")
    code, results, err = predict_json(capsys, wavs["chirp"], "--checkpoint",
                                      str(ckpt_dirs["single"]), "--bundle", str(path),
                                      "--top-k", "6")
    assert code == 0, err
    logits = torch.tensor(results[0]["logits"])
    scores = sorted((x["score"] for x in results[0]["predictions"]), reverse=True)
    torch.testing.assert_close(torch.tensor(scores),
                               torch.sigmoid(logits).sort(descending=True).values)
    assert abs(sum(scores) - 1.0) > 1e-3  # not a softmax


def test_corrupt_file_is_reported_and_the_others_still_run(capsys, ckpt_dirs, wavs):
    missing = str(Path(wavs["tone"]).with_name("missing.wav"))
    files = [wavs["tone"], wavs["corrupt"], missing, wavs["chirp"]]
    code, results, err = predict_json(capsys, *files, "--checkpoint", str(ckpt_dirs["single"]))
    assert code == 1
    assert [r["file"] for r in results] == files
    assert "logits" in results[0] and "logits" in results[3]
    assert results[1]["error"].startswith(f"cannot decode {wavs['corrupt']}")
    assert results[2]["error"] == f"audio file not found: {missing}"
    assert f"error: cannot decode {wavs['corrupt']}" in err
    assert f"error: audio file not found: {missing}" in err

    # Text mode reports the same way.
    assert main(["predict", wavs["corrupt"], wavs["tone"], "--checkpoint",
                 str(ckpt_dirs["single"])]) == 1
    captured = capsys.readouterr()
    assert f"error: cannot decode {wavs['corrupt']}" in captured.err
    assert captured.out.splitlines()[0] == wavs["tone"]


def test_checkpoint_without_head_needs_a_bundle(capsys, tmp_path, wavs):
    cfg = BackboneConfig(embed_dim=64, depth=1, num_heads=1, mlp_hidden=128, target_length=128)
    torch.manual_seed(0)
    backbone = AST(cfg)
    path = tmp_path / "headless.pth"
    torch.save(to_original_state_dict(backbone.state_dict(), deit_head_classes=10), path)
    assert main(["predict", wavs["tone"], "--checkpoint", str(path)]) == 1
    assert (f"error: checkpoint {str(path)!r} has no classification head of its own; pass "
            "--bundle FILE") in capsys.readouterr().err

    ckpt = load_checkpoint(path)
    assert ckpt.head is None
    feats = FeatureConfig(target_length=128)
    model = AudioClassifier(ckpt.backbone, "prompt", 35)
    bundle = TaskBundle.from_model(model, "sc", [str(i) for i in range(35)], feats).save(
        tmp_path / "sc.safetensors")
    code, results, err = predict_json(capsys, wavs["tone"], "--checkpoint", str(path),
                                      "--bundle", str(bundle), "--labels", str(SC_CSV))
    assert code == 0, err
    with torch.no_grad():
        want = model(features_from_audio(wavs["tone"], feats)[None])[0]
    assert torch.equal(torch.tensor(results[0]["logits"]), want)
    assert results[0]["predictions"][0]["label"] in read_label_csv(SC_CSV)


def test_bad_checkpoint_and_bundle_paths_are_clear_errors(capsys, ckpt_dirs, wavs, tmp_path):
    assert main(["predict", wavs["tone"], "--checkpoint", str(tmp_path / "none.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 3)
    assert main(["predict", wavs["tone"], "--checkpoint", str(ckpt_dirs["single"]),
                 "--bundle", str(junk)]) == 1
    assert "error: not a safetensors file: fewer than 8 bytes" in capsys.readouterr().err
