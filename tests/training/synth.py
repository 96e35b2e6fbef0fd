"""Tiny synthetic copies of each data set's official layout, written at test time.

Each clip is a short tone whose pitch depends on its class (so a model can learn it), in the
data set's documented format, including the pitfalls the reference notes list (mixed rates,
channels and bit depths, WAVE_FORMAT_EXTENSIBLE, clips under 1 s, AppleDouble junk, a broken
GTZAN jazz.00054, ``.au`` twins, background noise that must not become training data).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from aat_serve.training.data.esc50 import ESC50_LABELS
from aat_serve.training.data.us8k import US8K_LABELS


def tone(cls: int, sr: int, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A class-dependent tone plus a little noise, float in [-1, 1], shape (n,) or (n, ch)."""
    rng = np.random.default_rng(seed)
    n = max(1, round(sr * seconds))
    t = np.arange(n) / sr
    x = 0.4 * np.sin(2 * np.pi * (250.0 * (cls + 1)) * t) + 0.02 * rng.standard_normal(n)
    if channels == 1:
        return x.astype(np.float32)
    return np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def write_audio(path: Path, cls: int, sr: int = 16000, seconds: float = 0.3, channels: int = 1,
                subtype: str = "PCM_16", fmt: str = "WAV", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(cls, sr, seconds, channels, seed), sr, subtype=subtype, format=fmt)
    return path


def make_esc50(base: Path, per_fold_class: int = 1, folds=(1, 2), classes=(0, 1, 10)) -> Path:
    """ESC-50-master/ with meta/esc50.csv (exact header) and flat audio/ at 44.1 kHz mono."""
    root = base / "ESC-50-master"
    (root / "meta").mkdir(parents=True)
    rows = []
    seed = 0
    for fold in folds:
        for target in classes:
            for take in "ABC"[:per_fold_class]:
                src = 100000 + seed
                name = f"{fold}-{src}-{take}-{target}.wav"
                write_audio(root / "audio" / name, target, sr=44100, seconds=0.25, seed=seed)
                esc10 = "True" if target in (0, 1, 10, 11, 12, 20, 21, 38, 40, 41) else "False"
                rows.append([name, fold, target, ESC50_LABELS[target], esc10, src, take])
                seed += 1
    with (root / "meta" / "esc50.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        w.writerows(rows)
    return root


# (rate, channels, subtype, format, seconds): the mix UrbanSound8K really has.
US8K_FORMATS = [
    (22050, 1, "PCM_16", "WAV", 0.30),
    (48000, 2, "PCM_24", "WAV", 0.25),
    (44100, 2, "PCM_16", "WAVEX", 0.20),   # WAVE_FORMAT_EXTENSIBLE (format tag 65534)
    (96000, 1, "PCM_24", "WAVEX", 0.10),
    (8000, 1, "PCM_U8", "WAV", 0.30),
    (44100, 1, "FLOAT", "WAV", 0.15),
]


def make_us8k(base: Path, folds=(1, 2, 3), classes=(1, 3, 6)) -> Path:
    """UrbanSound8K/ with metadata/UrbanSound8K.csv and audio/foldN/ of mixed formats."""
    root = base / "UrbanSound8K"
    (root / "metadata").mkdir(parents=True)
    rows = []
    k = 0
    for fold in folds:
        for cls in classes:
            sr, ch, subtype, fmt, sec = US8K_FORMATS[k % len(US8K_FORMATS)]
            fsid = 100032 + k
            name = f"{fsid}-{cls}-0-{k}.wav"
            write_audio(root / "audio" / f"fold{fold}" / name, cls, sr, sec, ch, subtype, fmt, k)
            rows.append([name, fsid, 0.0, sec, 1 + k % 2, fold, cls, US8K_LABELS[cls]])
            k += 1
    (root / "audio" / "fold1" / ".DS_Store").write_bytes(b"\x00\x01junk")
    with (root / "metadata" / "UrbanSound8K.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID",
                    "class"])
        w.writerows(rows)
    return root


def make_speech_commands(base: Path, words=("yes", "no", "backward"), speakers=3,
                         name: str = "speech_commands_v0.02") -> Path:
    """Word folders of 16 kHz int16 clips (some < 1 s), _background_noise_, list files."""
    root = base / name
    files: list[str] = []
    for wi, word in enumerate(words):
        for s in range(speakers):
            rel = f"{word}/{s:08x}_nohash_0.wav"
            write_audio(root / rel, wi, 16000, 0.4 + 0.2 * s, seed=wi * 10 + s)
            files.append(rel)
    write_audio(root / "_background_noise_" / "white_noise.wav", 0, 16000, 2.0)
    (root / "_background_noise_" / "README.md").write_text("noise\n")
    (root / words[0] / "._00000000_nohash_0.wav").write_bytes(b"\x00\x05\x16\x07junk")
    (root / "README.md").write_text("speech commands\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    # Speaker 1 of every word validates, speaker 2 tests; written with './' noise to normalise.
    (root / "validation_list.txt").write_text(
        "".join(f"{w}/{1:08x}_nohash_0.wav\n" for w in words))
    (root / "testing_list.txt").write_text(
        "".join(f"./{w}/{2:08x}_nohash_0.wav\n" for w in words))
    return root


GTZAN_CLIPS = {
    # clip: (split in the filtered lists, extension)
    "blues.00029": ("train", ".wav"),
    "blues.00030": ("train", ".au"),
    "blues.00000": ("valid", ".wav"),
    "blues.00012": ("test", ".wav"),
    "jazz.00000": ("train", ".wav"),
    "jazz.00002": ("valid", ".au"),
    "jazz.00073": ("test", ".wav"),
    "rock.00000": ("train", ".wav"),
    "rock.00038": ("valid", ".wav"),
    "rock.00010": ("test", ".wav"),
}


def make_gtzan(base: Path) -> Path:
    """genres/<genre>/ at 22,050 Hz mono int16, with the known faults."""
    root = base / "genres"
    genres = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop",
              "reggae", "rock"]
    for g in genres:
        (root / g).mkdir(parents=True)
    for i, (clip, (_, ext)) in enumerate(sorted(GTZAN_CLIPS.items())):
        cls = genres.index(clip.split(".")[0])
        fmt = "AU" if ext == ".au" else "WAV"
        write_audio(root / clip.split(".")[0] / f"{clip}{ext}", cls, 22050, 0.3, fmt=fmt, seed=i)
    # A .au twin of a .wav clip (the .wav must win), AppleDouble junk, a clip outside the split.
    write_audio(root / "blues" / "blues.00029.au", 0, 22050, 0.3, fmt="AU")
    (root / "blues" / "._blues.00029.wav").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 207)
    write_audio(root / "country" / "country.00008.wav", 2, 22050, 0.3)
    # jazz.00054: a truncated RIFF header, as in the broken copies.
    (root / "jazz" / "jazz.00054.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    return root


OPENMIC_CLASSES = ["accordion", "banjo", "bass", "cello", "clarinet", "cymbals", "drums",
                   "flute", "guitar", "mallet_percussion", "mandolin", "organ", "piano",
                   "saxophone", "synthesizer", "trombone", "trumpet", "ukulele", "violin",
                   "voice"]


def openmic_labels(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Y_true (0.5 where unobserved) and Y_mask for n clips; every class observed both ways
    in the last half (the test split)."""
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 20)) < 0.35
    y = np.where(rng.random((n, 20)) < 0.5, rng.uniform(0.55, 1.0, (n, 20)),
                 rng.uniform(0.0, 0.45, (n, 20)))
    half = n // 2
    for c in range(20):  # test rows: one observed positive and one observed negative per class
        mask[half + c % (n - half), c] = True
        y[half + c % (n - half), c] = 0.9
        mask[half + (c + 1) % (n - half), c] = True
        y[half + (c + 1) % (n - half), c] = 0.1
    mask[0, 3] = True
    y[0, 3] = 0.5  # observed but exactly 0.5: negative under the '> 0.5' rule
    y = np.where(mask, y, 0.5)
    return y.astype(np.float32), mask


def make_openmic(base: Path, n: int = 8, pickled_keys: bool = False) -> Path:
    """openmic-2018/ with npz, class-map.json, partitions/split01_*.csv and stereo OGG clips."""
    root = base / "openmic-2018"
    (root / "partitions").mkdir(parents=True)
    keys = [f"{100 + 7 * i:06d}_{3840 * (i + 1)}" for i in range(n)]
    y_true, y_mask = openmic_labels(n)
    key_arr = np.array(keys, dtype=object) if pickled_keys else np.array(keys)
    np.savez(root / "openmic-2018.npz", X=np.zeros((n, 10, 128), np.uint8), Y_true=y_true,
             Y_mask=y_mask, sample_key=key_arr)
    (root / "class-map.json").write_text(json.dumps({c: i for i, c in enumerate(OPENMIC_CLASSES)}))
    half = n // 2
    # Partition files are a permutation of the keys, not in npz order.
    (root / "partitions" / "split01_train.csv").write_text(
        "".join(f"{k}\n" for k in reversed(keys[:half])))
    (root / "partitions" / "split01_test.csv").write_text("".join(f"{k}\n" for k in keys[half:]))
    for i, k in enumerate(keys):
        write_audio(root / "audio" / k[:3] / f"{k}.ogg", i % 4, 44100, 0.3, channels=2,
                    subtype="VORBIS", fmt="OGG", seed=i)
    return root


def make_folder(base: Path, labels=("cat", "dog"), per_label: int = 4,
                lists: bool = False, valid=(0,), test=(1,)) -> Path:
    """root/<label>/*.{wav,flac}; optional validation_list.txt / testing_list.txt naming clip
    numbers ``valid`` of the first label / ``test`` of the second (all labels when ``lists``
    is ``"all"``)."""
    root = base / "mydata"
    for li, lab in enumerate(labels):
        for j in range(per_label):
            ext, fmt = (".flac", "FLAC") if j % 2 else (".wav", "WAV")
            write_audio(root / lab / f"clip{j}{ext}", li, 16000, 0.3, fmt=fmt, seed=li * 10 + j)
    (root / "_ignored").mkdir()
    write_audio(root / "_ignored" / "x.wav", 0, 16000, 0.2)
    def name(lab: str, j: int) -> str:
        return f"{lab}/clip{j}{'.flac' if j % 2 else '.wav'}\n"

    if lists == "all":
        (root / "validation_list.txt").write_text("".join(name(lab, j) for lab in labels
                                                          for j in valid))
        (root / "testing_list.txt").write_text("".join(name(lab, j) for lab in labels
                                                       for j in test))
    elif lists:
        (root / "validation_list.txt").write_text("".join(name(labels[0], j) for j in valid))
        (root / "testing_list.txt").write_text("".join(name(labels[1], j) for j in test))
    return root


def write_hf_checkpoint(directory: Path, seed: int = 0, num_classes: int = 3) -> Path:
    """A tiny random backbone (tests.helpers.tiny_config) as a Hugging Face AST directory,
    written without importing transformers."""
    import torch
    from safetensors.torch import save_file

    from aat_serve.adapters.checkpoints import to_hf_state_dict
    from tests.helpers import tiny_backbone, tiny_config

    cfg = tiny_config()
    canonical = dict(tiny_backbone(seed).state_dict())
    g = torch.Generator().manual_seed(seed)
    d = cfg.embed_dim
    canonical.update({"head.norm.weight": torch.ones(d), "head.norm.bias": torch.zeros(d),
                      "head.fc.weight": 0.02 * torch.randn(num_classes, d, generator=g),
                      "head.fc.bias": torch.zeros(num_classes)})
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "audio-spectrogram-transformer",
              "architectures": ["ASTForAudioClassification"], "hidden_size": cfg.embed_dim,
              "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
              "intermediate_size": cfg.mlp_hidden, "hidden_act": "gelu",
              "patch_size": cfg.patch_freq, "frequency_stride": cfg.freq_stride,
              "time_stride": cfg.time_stride, "max_length": cfg.target_length,
              "num_mel_bins": cfg.num_mel_bins, "qkv_bias": True, "layer_norm_eps": 1e-12,
              "id2label": {str(i): f"class {i}" for i in range(num_classes)}}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in to_hf_state_dict(canonical).items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def make_csv(base: Path, multi: bool = False, with_split: bool = True,
             header: bool = True) -> Path:
    """labels.csv with relative paths into audio/."""
    root = base / "csvdata"
    rows = []
    specs = [("a", "train"), ("b", "train"), ("a", "valid"), ("b", "test"), ("a", "test"),
             ("b", "valid")]
    for i, (lab, split) in enumerate(specs):
        rel = f"audio/c{i}.wav"
        write_audio(root / rel, 0 if lab == "a" else 1, 16000, 0.3, seed=i)
        label = "a;b" if multi and i == 0 else lab
        rows.append([rel, label, split] if with_split else [rel, label])
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(["path", "label", "split"] if with_split else ["path", "label"])
        w.writerows(rows)
    return path


def run_json(capsys, argv: list[str]):
    """``aat ARGV`` in-process; asserts exit 0 (showing what it printed) and parses stdout."""
    from aat_serve.cli.main import main

    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err + out.out
    return json.loads(out.out)
