"""Demo corpus synthesis: speaker-disjoint splits, determinism under a seed, folder layout."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
import soundfile as sf

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.data.generic import load_folder
from aat_serve.training.demo import corpus as C
from aat_serve.training.demo import plan as P
from aat_serve.training.demo import render as R
from aat_serve.training.demo import sounds as S
from aat_serve.training.demo import speakers as SP
from tests.helpers import require_tool

TINY = [
    P.CorpusDef("words", words=("yes", "no"), per_class={"train": 2, "valid": 1, "test": 1}),
    P.CorpusDef("sounds", sounds=("guitar", "bell"), per_class={"train": 2, "test": 1}),
]


def test_speakers_partition_the_variants_and_notes():
    sp = SP.make_speakers(0)
    parts = [set(sp.variants[s]) for s in P.SPLITS]
    assert sum(map(len, parts)) == len(SP.VARIANTS) and set().union(*parts) == set(SP.VARIANTS)
    assert len(sp.variants["test"]) == 14 and len(sp.variants["valid"]) == 10
    notes = [set(sp.notes[s]) for s in P.SPLITS]
    assert sum(map(len, notes)) == len(SP.NOTES) and set().union(*notes) == set(SP.NOTES)
    assert SP.make_speakers(0) == sp
    assert SP.make_speakers(1).variants["test"] != sp.variants["test"]
    with pytest.raises(ConfigError, match="nothing to train on"):
        SP.make_speakers(0, valid_variants=50, test_variants=50)


def test_label_sets_are_disjoint():
    upstream = set(C.UPSTREAM_WORDS) | set(S.UPSTREAM_SOUNDS)
    for labels in (C.DIGITS, C.COMMANDS, tuple(S.INSTRUMENTS)):
        assert not upstream & set(labels)
    assert len(set(SP.VARIANTS)) == len(SP.VARIANTS)


def test_plans_are_deterministic_and_use_only_their_split_speakers():
    sp = SP.make_speakers(3)
    plans = P.plan_corpus(TINY[0], sp, seed=3)
    assert plans == P.plan_corpus(TINY[0], sp, seed=3)
    assert [p.params for p in plans] != [p.params for p in P.plan_corpus(TINY[0], sp, seed=4)]
    assert len(plans) == 2 * (2 + 1 + 1)
    for p in plans:
        assert p.kind == "speech" and p.params["variant"] in sp.variants[p.split]
        assert P.speaker_of(p.rel) == f"{p.params['voice']}+{p.params['variant']}"
    for p in P.plan_corpus(TINY[1], sp, seed=3):
        assert p.kind == "sound" and p.params["note"] in sp.notes[p.split]
        assert P.speaker_of(p.rel) == f"note{p.params['note']}"
    # A larger corpus only adds clips: the first ones keep their parameters.
    bigger = P.CorpusDef("words", words=("yes", "no"), per_class={"train": 5, "valid": 1,
                                                                    "test": 1})
    big = {p.rel: p.params for p in P.plan_corpus(bigger, sp, seed=3)}
    assert all(big[p.rel] == p.params for p in plans)


def test_sound_recipes_build_valid_sox_arguments():
    rng = random.Random(0)
    for name, recipe in S.SOUND_RECIPES.items():
        args = recipe(0.5, 440.0, rng)
        assert args[0] == "synth", name
        assert all(isinstance(a, str) and a for a in args), name


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.wav")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synthesize_tiny_corpus(tmp_path):
    require_tool("espeak-ng")
    require_tool("sox")
    sp = SP.make_speakers(0)
    assert C.clips_on_disk(TINY, tmp_path / "a", seed=0, speakers=sp) == (14, 0)
    folders = C.synthesize(TINY, tmp_path / "a", seed=0, speakers=sp, workers=2, progress=False)
    assert C.clips_on_disk(TINY, tmp_path / "a", seed=0, speakers=sp) == (14, 14)
    assert C.clips_on_disk(TINY, tmp_path / "a", seed=1, speakers=sp)[1] < 14  # other clips
    words = load_folder(folders["words"])
    assert words.labels == ["no", "yes"]
    assert words.counts() == {"train": 4, "valid": 2, "test": 2}
    sounds = load_folder(folders["sounds"])
    assert sounds.labels == ["bell", "guitar"] and sounds.counts() == {"train": 4, "valid": 0,
                                                                        "test": 2}
    by_split = {s: {P.speaker_of(e.key) for e in words.examples if e.split == s}
                for s in P.SPLITS}
    assert not by_split["train"] & (by_split["valid"] | by_split["test"])
    for speaker in by_split["test"]:
        assert speaker.split("+")[1] in sp.variants["test"]
    for e in words.examples + sounds.examples:
        w, sr = sf.read(e.path, dtype="float32")
        assert sr == 16000 and w.shape == (16000,)
        assert 0.05 < np.abs(w).max() <= 0.9  # peak level drawn in [-20, -1] dBFS
        assert np.sqrt(np.mean(w ** 2)) > 1e-3
    meta = json.loads((folders["words"] / "corpus.json").read_text())
    assert meta["seed"] == 0 and meta["counts"] == {"train": 4, "valid": 2, "test": 2}
    assert meta["speakers"]["variants"]["test"] == list(sp.variants["test"])

    # Same seed: the same bytes, whatever the worker count; another seed: other clips.
    again = C.synthesize(TINY, tmp_path / "b", seed=0, speakers=sp, workers=1, progress=False)
    assert _digest(again["words"]) == _digest(folders["words"])
    assert _digest(again["sounds"]) == _digest(folders["sounds"])
    other = C.synthesize(TINY[:1], tmp_path / "c", seed=1, speakers=sp, workers=2,
                         progress=False)
    assert _digest(other["words"]) != _digest(folders["words"])


def test_speech_is_placed_inside_the_clip():
    """The word is in the 1-s clip (not trimmed away, not clipped)."""
    require_tool("espeak-ng")
    require_tool("sox")
    sp = SP.make_speakers(0)
    plan = P.plan_corpus(TINY[0], sp, seed=0)[0]
    quiet = {**plan.params, "noise": None, "reverb": None, "onset": 0.0, "peak_db": -6.0}
    w = R.render(P.ClipPlan(plan.corpus, plan.label, plan.split, plan.rel, plan.kind, quiet),
                 R.noise_beds(1.0))
    active = np.flatnonzero(np.abs(w) > 0.01)
    assert active.size > 1600  # at least 0.1 s of speech
    assert active[0] < 800 and active[-1] < 16000  # starts at the onset
    assert np.isclose(np.abs(w).max(), 10 ** (-6 / 20), rtol=1e-4)


def test_missing_tool_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(R.shutil, "which", lambda name: None if name == "sox" else "/bin/x")
    with pytest.raises(ConfigError, match=r"sox is not installed; the demo corpus is "
                                          r"synthesized with espeak-ng and sox"):
        R.require_tools()


def test_synthetic_speakers_join_the_training_split_only():
    plain, sp = SP.make_speakers(0), SP.make_speakers(0, synthetic=5)
    assert sp.variants["test"] == plain.variants["test"]
    assert sp.variants["valid"] == plain.variants["valid"]
    made = [f"{SP.SYNTHETIC_PREFIX}{i:03d}" for i in range(5)]
    assert sp.variants["train"] == plain.variants["train"] + tuple(made)
    assert list(sp.synthetic) == made and plain.synthetic == {}
    assert not set(made) & set(SP.VARIANTS)
    assert SP.make_speakers(0, synthetic=5) == sp
    assert SP.make_speakers(1, synthetic=5).synthetic != sp.synthetic
    assert sp.to_dict()["synthetic"] == sp.synthetic
    with pytest.raises(ConfigError, match="synthetic speakers must be >= 0, got -1"):
        SP.make_speakers(0, synthetic=-1)


def test_synthetic_variant_scales_formants_by_a_vocal_tract_factor():
    scales = []
    for i in range(200):
        name, text = SP.synthetic_variant(0, i)
        assert name == f"aat-vtl{i:03d}" and text.startswith("language variant\n")
        formants = {int(line.split()[1]): [int(v) for v in line.split()[2:]]
                    for line in text.splitlines() if line.startswith("formant ")}
        assert sorted(formants) == list(range(9))
        f012 = [formants[k][0] / 100 for k in range(3)]
        # One factor times +-7 % jitter: the three lowest formants agree within 15 %.
        assert max(f012) / min(f012) < 1.07 / 0.93 + 0.01
        assert min(f012) >= 0.8 * 0.93 - 0.01 and max(f012) <= 1.5 * 1.07 + 0.01
        scales.append(sum(f012) / 3)
        base, top = (int(v) for v in next(line for line in text.splitlines()
                                          if line.startswith("pitch ")).split()[1:])
        assert 30 <= base < top <= 540
    # The population spans the range (children-like and large voices both drawn).
    assert min(scales) < 0.85 and max(scales) > 1.4
    assert SP.synthetic_variant(0, 3) == SP.synthetic_variant(0, 3) != SP.synthetic_variant(1, 3)


def test_synthetic_variant_is_rendered_from_its_own_file(tmp_path):
    require_tool("espeak-ng")
    require_tool("sox")
    sp = SP.make_speakers(0, synthetic=2)
    data = R.espeak_data(sp, tmp_path / "esp")
    assert R.espeak_data(SP.make_speakers(0), tmp_path / "none") is None
    plan = P.plan_corpus(TINY[0], sp, seed=0)[0]
    beds = R.noise_beds(1.0)

    def clip(variant, path):
        params = {**plan.params, "variant": variant, "noise": None, "reverb": None}
        return R.render(P.ClipPlan(plan.corpus, plan.label, "train", plan.rel, "speech",
                                   params), beds, path)

    made = list(sp.synthetic)
    a, b, default = clip(made[0], data), clip(made[1], data), clip("nonexistent", None)
    # espeak-ng falls back to its default voice for an unknown variant: a synthetic variant
    # that sounds different from that (and from another one) was read from its file.
    assert not np.array_equal(a, default) and not np.array_equal(a, b)
    # The installed variants sound the same through the private data directory.
    np.testing.assert_array_equal(clip("zac", data), clip("zac", None))
    with pytest.raises(ConfigError, match=f"variant {made[0]} is synthetic; render it with the "
                                          "espeak-ng data directory"):
        clip(made[0], None)


def test_espeak_data_has_room_for_many_synthetic_speakers(tmp_path):
    # espeak-ng's voice list is short: with every installed language and MBROLA voice linked,
    # 128 made-up variants did not fit and espeak-ng answered "voice does not exist".
    require_tool("espeak-ng")
    require_tool("sox")
    most = SP.make_speakers(0, synthetic=200)
    data = R.espeak_data(most, tmp_path / "esp")
    plan = P.plan_corpus(TINY[0], most, seed=0)[0]
    beds = R.noise_beds(1.0)
    last = list(most.synthetic)[-1]
    params = {**plan.params, "variant": last, "noise": None, "reverb": None}
    clip = R.render(P.ClipPlan(plan.corpus, plan.label, "train", plan.rel, "speech", params),
                    beds, data)
    default = R.render(P.ClipPlan(plan.corpus, plan.label, "train", plan.rel, "speech",
                                  {**params, "variant": "nonexistent"}), beds, None)
    assert clip.size > 0 and not np.array_equal(clip, default)
    listed = sum(len(f) for top in ("lang", "voices")
                 for _, _, f in os.walk(data / "espeak-ng-data" / top, followlinks=True))
    made = R.ESPEAK_MAX_VOICES - (listed - 200) + 1
    with pytest.raises(ConfigError) as err:
        R.espeak_data(SP.make_speakers(0, synthetic=made), tmp_path / "esp2")
    assert str(err.value) == (
        f"{made} synthetic speakers are too many: with the {listed - 200} installed voice files "
        f"the demo needs that makes {R.ESPEAK_MAX_VOICES + 1}, and espeak-ng takes at most "
        f"{R.ESPEAK_MAX_VOICES}; use at most {made - 1} synthetic speakers")
    assert not (tmp_path / "esp2").exists()
    # The limit is espeak-ng's own: at the most allowed, the last variant still renders.
    fullest = SP.make_speakers(0, synthetic=made - 1)
    data = R.espeak_data(fullest, tmp_path / "esp3")
    params["variant"] = list(fullest.synthetic)[-1]
    clip = R.render(P.ClipPlan(plan.corpus, plan.label, "train", plan.rel, "speech", params),
                    beds, data)
    assert clip.size > 0 and not np.array_equal(clip, default)
