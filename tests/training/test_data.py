"""Loaders on tiny synthetic copies of every official layout: counts, labels, splits, errors."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.features import load_audio
from aat_serve.training.data import (
    ESC50_LABELS,
    GTZAN_LABELS,
    SC1_WORDS,
    SC2_WORDS,
    US8K_LABELS,
    DatasetError,
    hash_split,
    load_source,
    summarize,
)
from aat_serve.training.data.gtzan import filtered_split
from tests.training import synth

# -- ESC-50 ---------------------------------------------------------------------------------

def test_esc50_folds_labels_and_counts(tmp_path):
    root = synth.make_esc50(tmp_path)
    # The parent of ESC-50-master/ is accepted too.
    for given in (root, tmp_path):
        src = load_source("esc50", given, all_labels=True)
        assert src.root == root
        assert src.labels == ESC50_LABELS and src.num_classes == 50
        assert src.folds == (1, 2, 3, 4, 5)
        assert len(src.examples) == 6
    split = src.splits(fold=2)
    assert [len(split[s]) for s in ("train", "valid", "test")] == [3, 3, 3]
    assert all(e.fold == 1 for e in split["train"]) and all(e.fold == 2 for e in split["test"])
    by_name = {e.key: e for e in src.examples}
    # The label is the 'target' column; the file name encodes it as its last field.
    for name, ex in by_name.items():
        assert ex.labels == (int(name.split("-")[-1][:-4]),)
    assert src.labels[by_name["1-100002-A-10.wav"].labels[0]] == "rain"
    with pytest.raises(ConfigError, match=r"choose a held-out fold \(--fold K\) or --cv"):
        src.splits()
    with pytest.raises(ConfigError, match="has folds"):
        src.splits(fold=6)
    assert "fold1=3, fold2=3" in summarize(src)


def test_esc50_errors_name_the_file_and_expectation(tmp_path):
    with pytest.raises(DatasetError, match=r"has no meta/esc50.csv; expected the extracted "
                                           r"ESC-50-master/"):
        load_source("esc50", tmp_path)
    with pytest.raises(DatasetError, match="is not a directory"):
        load_source("esc50", tmp_path / "nope")
    root = synth.make_esc50(tmp_path)
    meta = root / "meta" / "esc50.csv"
    text = meta.read_text()
    meta.write_text(text.replace("target", "label", 1))
    with pytest.raises(DatasetError, match=r"lacks column\(s\) \['target'\]"):
        load_source("esc50", root)
    meta.write_text(text.replace(",0,dog,", ",0,cat,", 1))
    with pytest.raises(DatasetError, match=r"line 2: category 'cat' does not match target 0"):
        load_source("esc50", root)
    meta.write_text(text)
    (root / "audio" / "1-100000-A-0.wav").unlink()
    with pytest.raises(DatasetError, match=r"1-100000-A-0.wav: file does not exist"):
        load_source("esc50", root)


def test_bad_audio_is_an_error_unless_the_skip_rule_is_asked_for(tmp_path, caplog):
    root = synth.make_esc50(tmp_path)
    bad = root / "audio" / "2-100004-A-1.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(DatasetError, match=r"2-100004-A-1.wav: not decodable audio"):
        load_source("esc50", root)
    with caplog.at_level(logging.WARNING):
        src = load_source("esc50", root, on_bad_audio="skip")
    assert len(src.examples) == 5
    assert [s.path for s in src.skipped] == [bad]
    assert "skipped 1 undecodable file(s)" in caplog.text and "2-100004-A-1.wav" in caplog.text
    assert "skipped 1" in summarize(src)
    with pytest.raises(ConfigError, match="on_bad_audio must be"):
        load_source("esc50", root, on_bad_audio="ignore")


# -- UrbanSound8K ---------------------------------------------------------------------------

def test_us8k_mixed_formats_folds_and_labels(tmp_path):
    root = synth.make_us8k(tmp_path)
    src = load_source("us8k", tmp_path, all_labels=True)  # the parent of UrbanSound8K/ works too
    assert src.labels == US8K_LABELS and src.folds == tuple(range(1, 11))
    assert len(src.examples) == 9  # the .DS_Store in fold1 is not listed, hence not read
    for ex in src.examples:
        assert ex.path.parent.name == f"fold{ex.fold}"
        assert int(ex.key.split("-")[1]) == ex.labels[0]  # classID is the 2nd name field
    assert {src.labels[e.labels[0]] for e in src.examples} == {"car_horn", "dog_bark", "gun_shot"}
    s = src.splits(fold=3)
    assert (len(s["train"]), len(s["test"])) == (6, 3)
    assert src.counts(fold=7) == {"train": 9, "valid": 0, "test": 0}
    meta = root / "metadata" / "UrbanSound8K.csv"
    rows = list(csv.reader(meta.open()))
    rows[1][7] = "siren"
    with meta.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(DatasetError, match=r"line 2: class 'siren' does not match classID 1"):
        load_source("us8k", root)
    meta.unlink()
    with pytest.raises(DatasetError, match=r"has no metadata/UrbanSound8K.csv"):
        load_source("us8k", root)


# -- Speech Commands ------------------------------------------------------------------------

def test_speech_commands_v2_lists_background_and_label_order(tmp_path):
    root = synth.make_speech_commands(tmp_path)
    src = load_source("sc2", root, all_labels=True)
    assert src.labels == SC2_WORDS and len(SC2_WORDS) == 35
    assert src.labels[:3] == ["backward", "follow", "five"]  # AST's order, not alphabetical
    counts = src.counts()
    assert counts == {"train": 3, "valid": 3, "test": 3}
    splits = src.splits()
    assert all(e.key.split("/")[1].startswith("00000000") for e in splits["train"])
    assert all(e.key.split("/")[1].startswith("00000001") for e in splits["valid"])
    assert all(e.key.split("/")[1].startswith("00000002") for e in splits["test"])  # './' paths
    assert not any("_background_noise_" in str(e.path) for e in src.examples)
    assert not any(e.path.name.startswith("._") for e in src.examples)
    for e in src.examples:
        assert src.labels[e.labels[0]] == e.key.split("/")[0]
    assert src.labels[src.splits()["test"][0].labels[0]] == "backward"


def test_speech_commands_v1_rejects_v2_words_and_bad_lists(tmp_path):
    root = synth.make_speech_commands(tmp_path, words=("yes", "no"), name="v1")
    src = load_source("sc1", root, all_labels=True)
    assert src.labels == SC1_WORDS and len(SC1_WORDS) == 30 and src.labels == sorted(SC1_WORDS)
    assert src.counts() == {"train": 2, "valid": 2, "test": 2}
    root2 = synth.make_speech_commands(tmp_path / "v2")
    with pytest.raises(DatasetError, match=r"folder\(s\) \['backward'\] .* not among its 30 words "
                                           r"\(is this v0.02\? use --dataset sc2\)"):
        load_source("sc1", root2)
    (root / "testing_list.txt").write_text("yes/00000002_nohash_0.wav\nno/missing_nohash_0.wav\n")
    with pytest.raises(DatasetError, match=r"no/missing_nohash_0.wav: file does not exist"):
        load_source("sc1", root)
    (root / "testing_list.txt").write_text("_background_noise_/white_noise.wav\n")
    with pytest.raises(DatasetError, match=r"lists '_background_noise_/white_noise.wav'"):
        load_source("sc1", root)
    (root / "validation_list.txt").unlink()
    with pytest.raises(DatasetError, match=r"no validation_list\.txt"):
        load_source("sc1", root)
    with pytest.raises(DatasetError, match=r"has no testing_list\.txt"):
        load_source("sc2", tmp_path)


# -- GTZAN ----------------------------------------------------------------------------------

def test_gtzan_filtered_split_is_torchaudios_443_197_290():
    split = filtered_split()
    assert [sum(v == s for v in split.values()) for s in ("train", "valid", "test")] == \
        [443, 197, 290]
    assert split["jazz.00054"] == "train"


def test_gtzan_splits_extensions_and_the_broken_clip(tmp_path, caplog):
    root = synth.make_gtzan(tmp_path)
    with caplog.at_level(logging.WARNING):
        src = load_source("gtzan", tmp_path, all_labels=True)  # the parent of genres/ works too
    assert src.root == root and src.labels == GTZAN_LABELS
    assert src.counts() == {"train": 4, "valid": 3, "test": 3}
    got = {e.key: (e.split, e.path.suffix) for e in src.examples}
    assert got == synth.GTZAN_CLIPS  # .au accepted, the .wav twin preferred, country.00008 left out
    for e in src.examples:
        assert src.labels[e.labels[0]] == e.key.split(".")[0]
    assert [s.path.name for s in src.skipped] == ["jazz.00054.wav"]
    assert "skipping" in caplog.text and "jazz.00054" in caplog.text
    (root / "metal").rmdir()
    with pytest.raises(DatasetError, match=r"has no metal/ folder"):
        load_source("gtzan", root)


# -- OpenMIC-2018 ---------------------------------------------------------------------------

def test_openmic_masked_labels_and_partitions(tmp_path):
    root = synth.make_openmic(tmp_path, n=8)
    src = load_source("openmic", root)
    assert src.multi_label and src.masked and src.num_classes == 20
    assert src.labels == synth.OPENMIC_CLASSES
    splits = src.splits()
    assert len(splits["train"]) == 4 and len(splits["test"]) == 4
    assert splits["valid"] is splits["test"]  # no validation split: validates on test
    y_true, y_mask = synth.openmic_labels(8)
    with np.load(root / "openmic-2018.npz") as z:
        keys = list(z["sample_key"])
    for e in src.examples:
        i = keys.index(e.key)
        assert e.path == root / "audio" / e.key[:3] / f"{e.key}.ogg"
        assert e.mask == tuple(bool(m) for m in y_mask[i])
        expected = tuple(np.flatnonzero(y_mask[i] & (y_true[i] > 0.5)))
        assert e.labels == expected
        # unobserved classes are never positive
        assert all(e.mask[c] for c in e.labels)
    first = next(e for e in src.examples if e.key == keys[0])
    assert first.mask[3] and 3 not in first.labels  # observed at exactly 0.5 -> negative
    # train partition order is the file's (a permutation of the npz order)
    assert [e.key for e in splits["train"]] == list(reversed(keys[:4]))


def test_openmic_refuses_pickle_unless_allowed_and_checks_keys(tmp_path):
    root = synth.make_openmic(tmp_path, n=4, pickled_keys=True)
    with pytest.raises(DatasetError, match=r"pickled objects; pass allow_pickle=True"):
        load_source("openmic", root)
    assert len(load_source("openmic", root, allow_pickle=True).examples) == 4
    root = synth.make_openmic(tmp_path / "b", n=4)
    (root / "partitions" / "split01_test.csv").write_text("999999_0\n")
    with pytest.raises(DatasetError, match=r"lists sample key '999999_0'"):
        load_source("openmic", root)
    (root / "partitions" / "split01_test.csv").unlink()
    with pytest.raises(DatasetError, match=r"missing .*split01_test.csv"):
        load_source("openmic", root)
    (root / "class-map.json").write_text('{"a": 0, "b": 0}')
    with pytest.raises(DatasetError, match="distinct column index"):
        load_source("openmic", root)


# -- folder and CSV sources -----------------------------------------------------------------

def test_folder_source_with_and_without_lists(tmp_path):
    root = synth.make_folder(tmp_path, lists=True)
    src = load_source("folder", root)
    assert src.labels == ["cat", "dog"] and len(src.examples) == 8
    assert src.counts() == {"train": 6, "valid": 1, "test": 1}
    assert {e.key: e.split for e in src.examples}["cat/clip0.wav"] == "valid"
    root2 = synth.make_folder(tmp_path / "b", per_label=3)
    src2 = load_source("folder", root2)
    assert all(e.split == hash_split(e.key) for e in src2.examples)
    (root / "testing_list.txt").write_text("bird/x.wav\n")
    with pytest.raises(DatasetError, match=r"list files name 1 file\(s\) not found.*'bird/x.wav'"):
        load_source("folder", root)
    with pytest.raises(DatasetError, match=r"has 0 label folder\(s\)"):
        load_source("folder", tmp_path / "b" / "mydata" / "cat")


def test_hash_split_is_stable_per_speaker_and_roughly_80_10_10():
    names = [f"{i:08x}_nohash_{j}.wav" for i in range(2000) for j in range(2)]
    splits = [hash_split(n) for n in names]
    for i in range(0, len(names), 2):
        assert splits[i] == splits[i + 1]  # same speaker, same split
    frac = {s: splits.count(s) / len(splits) for s in ("train", "valid", "test")}
    assert 0.75 < frac["train"] < 0.85 and 0.07 < frac["valid"] < 0.13
    assert 0.07 < frac["test"] < 0.13


def test_csv_source_single_and_multi_label(tmp_path):
    path = synth.make_csv(tmp_path)
    src = load_source("csv", path)
    assert src.labels == ["a", "b"] and not src.multi_label
    assert src.counts() == {"train": 2, "valid": 2, "test": 2}
    multi = load_source("csv", synth.make_csv(tmp_path / "m", multi=True, header=False))
    assert multi.multi_label and multi.examples[0].labels == (0, 1)
    nosplit = load_source("csv", synth.make_csv(tmp_path / "n", with_split=False))
    assert all(e.split == hash_split(e.key) for e in nosplit.examples)
    path.write_text("audio/c0.wav,a,holdout\n")
    with pytest.raises(DatasetError, match=r"line 1: split 'holdout' is not one of"):
        load_source("csv", path)
    path.write_text("audio/c0.wav\n")
    with pytest.raises(DatasetError, match=r"line 1 has 1 fields"):
        load_source("csv", path)
    with pytest.raises(DatasetError, match="is a directory; pass the CSV file"):
        load_source("csv", tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(ConfigError, match=r"unknown data set 'audioset'; expected one of esc50"):
        load_source("audioset", ".")


def test_every_layouts_audio_decodes_to_16k_mono_of_the_right_length(tmp_path):
    """The documented formats (44.1 kHz ESC-50 incl. a full 220,500-sample clip, US8K's mixed
    rates/depths/channels/WAVEX, 22.05 kHz GTZAN .au and .wav, stereo OGG OpenMIC) all decode."""
    root = synth.make_esc50(tmp_path, folds=(1,), classes=(0,))
    synth.write_audio(root / "audio" / "1-100000-A-0.wav", 0, 44100, 5.0)  # exactly 220,500
    sources = [load_source("esc50", root), load_source("us8k", synth.make_us8k(tmp_path)),
               load_source("gtzan", synth.make_gtzan(tmp_path)),
               load_source("openmic", synth.make_openmic(tmp_path, n=2))]
    seen = set()
    for src in sources:
        for ex in src.examples:
            info = sf.info(str(ex.path))
            wave = load_audio(ex.path, sample_rate=16000)
            assert wave.dim() == 1 and wave.dtype == torch.float32
            assert abs(wave.numel() - info.duration * 16000) <= 1, ex.path
            seen.add((info.samplerate, info.channels, info.subtype, info.format))
    assert (44100, 1, "PCM_16", "WAV") in seen
    assert len(load_audio(root / "audio" / "1-100000-A-0.wav")) == 80000
    assert {(22050, 1, "PCM_16", "AU"), (44100, 2, "VORBIS", "OGG"), (48000, 2, "PCM_24", "WAV"),
            (44100, 2, "PCM_16", "WAVEX"), (8000, 1, "PCM_U8", "WAV")} <= seen
