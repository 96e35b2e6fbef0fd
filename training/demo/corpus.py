"""Synthesize the demo corpora from nothing but espeak-ng and sox, deterministically under a seed.

Speech: English words spoken by espeak-ng's English voices, each combined with a voice variant
(``en-us+klatt3``), at random speed, pitch and amplitude; sox trims, resamples and (sometimes)
adds reverb; background noise (white, pink or brown, made by sox) is mixed in at a random SNR;
the word lands at a random offset in a 1-s window and at a random level.

Sounds: sox ``synth`` recipes (tones, chords, noise colours, sweeps, rhythmic patterns,
plucks, and eight synthetic instruments) at random notes, lengths and levels, with the same
noise and reverb treatment.

Splits are speaker-disjoint: every voice variant belongs to exactly one of train, valid and
test, so no (voice, variant) speaker of the test split is heard in training (upstream corpus
included). For sounds the musical note plays that role. The training split can also hold
made-up variants (``synthetic_variant``: random vocal tract length, formants and pitch), more
speakers for training only; validation and test use espeak-ng's own variants. The layout is
the generic folder-per-label source (``aat_serve.training.data.generic.load_folder``)::

    <out>/<corpus>/<label>/<voice>+<variant>_<n>.wav    (speech)
    <out>/<corpus>/<label>/note<midi>_<n>.wav           (sounds)
    <out>/<corpus>/validation_list.txt, testing_list.txt, corpus.json

Every clip's parameters come from a generator seeded by (seed, corpus, label, split, index), so
the result does not depend on the number of workers or the order of synthesis.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from tqdm import tqdm

from aat_serve.adapters.errors import ConfigError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
SPLITS = ("train", "valid", "test")

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
          "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
"""espeak-ng's English voices (accents); every speaker is one of these plus a variant."""

VARIANTS = (
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "antonio", "aunty",
    "belinda", "benjamin", "boris", "croak", "david", "Demonic", "Denis", "Diogo", "ed",
    "edward", "edward2", "f1", "f2", "f3", "f4", "f5", "Gene", "Gene2", "grandma", "grandpa",
    "gustave", "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john",
    "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "Lee", "linda", "m1", "m2",
    "m3", "m4", "m5", "m6", "m7", "m8", "marcelo", "Marco", "Mario", "max", "Michael", "michel",
    "miguel", "Mike", "norbert", "Nguyen", "pablo", "paul", "pedro", "quincy", "RicishayMax",
    "RicishayMax2", "RicishayMax3", "rob", "robert", "robosoft", "robosoft2", "robosoft3",
    "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby",
    "steph", "steph2", "steph3", "Storm", "travis", "Tweaky", "UniRobot", "victor", "whisper",
    "whisperf", "zac", "anika", "anikaRobot", "announcer",
)
"""espeak-ng 1.51's voice variants, less those that sound exactly like another one
(``Mr`` and ``fast`` are the default voice, ``caleb`` and ``klatt6`` are ``klatt``)."""

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UPSTREAM_WORDS = (
    "apple", "backward", "bed", "bird", "bottle", "cat", "coffee", "doctor", "dog", "follow",
    "forward", "garden", "green", "happy", "house", "learn", "light", "marvin", "money",
    "music", "orange", "paper", "pencil", "rabbit", "river", "sheila", "summer", "table",
    "tree", "visual", "water", "window", "winter", "wow", "yellow",
    "answer", "baby", "basket", "butter", "camera", "candle", "chicken", "circle", "cloud",
    "dinner", "elephant", "feather", "finger", "flower", "hammer", "island", "jacket",
    "kitchen", "ladder", "lemon", "magic", "monkey", "morning", "ocean", "pillow", "pocket",
    "purple", "rocket", "shadow", "silver", "sister", "thunder", "tiger", "tomato", "village",
    "wagon", "zebra",
    "bucket", "muffin", "jumping", "lobster", "robot", "ticket", "shop", "soft", "topic",
    "hobby", "tough", "button",
)
"""Upstream (pretraining) words: none is a digit or a command, nor sounds like one (no "for",
"to", "won", "ate", "know", "write"): the backbone learns the sounds of English words in general,
never the downstream labels."""

NOTES = tuple(range(45, 85))
"""MIDI notes the sounds are played at (A2 to C6); split like voice variants."""


def note_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


# -- sound recipes: (duration s, f0 Hz, rng) -> sox arguments after the null input ------------

def _fade(d: float, attack: float, release: float) -> list[str]:
    return ["fade", "t", f"{attack:.3f}", f"{d:.3f}", f"{min(release, d - attack):.3f}"]


def _num(x: float) -> str:
    return f"{x:.2f}"


SoundRecipe = Callable[[float, float, random.Random], list[str]]


def _sine_tone(d, f, rng):
    return ["synth", _num(d), "sine", _num(f), *_fade(d, 0.02, 0.02)]


def _square_tone(d, f, rng):
    return ["synth", _num(d), "square", _num(f), "lowpass", "6000", *_fade(d, 0.02, 0.02)]


def _noise(kind: str) -> SoundRecipe:
    def recipe(d, f, rng):
        lo = int(rng.uniform(50, 400))
        return ["synth", _num(d), kind, "highpass", str(lo), *_fade(d, 0.03, 0.05)]
    return recipe


def _sweep(up: bool) -> SoundRecipe:
    def recipe(d, f, rng):
        a, b = (f, 4 * f) if up else (4 * f, f)
        return ["synth", _num(d), "sine", f"{a:.1f}:{b:.1f}", *_fade(d, 0.02, 0.03)]
    return recipe


def _click_train(d, f, rng):
    rate = rng.uniform(4, 16)
    return ["synth", _num(d), "square", _num(rate), "highpass", "2000", *_fade(d, 0.005, 0.01)]


def _beeps(d, f, rng):
    rate = rng.uniform(3, 8)
    return ["synth", _num(d), "sine", _num(f), "synth", _num(d), "square", "amod", _num(rate)]


def _chord(third: float) -> SoundRecipe:
    def recipe(d, f, rng):
        return ["synth", _num(d), "sine", _num(f), "sine", _num(f * third), "sine",
                _num(f * 1.4983), "remix", "-", *_fade(d, 0.03, 0.05)]
    return recipe


def _tremolo_tone(d, f, rng):
    return ["synth", _num(d), "triangle", _num(f), "tremolo", _num(rng.uniform(4, 10)), "80",
            *_fade(d, 0.02, 0.03)]


def _pluck_chord(d, f, rng):
    return ["synth", _num(d), "pluck", _num(f), "pluck", _num(f * 1.2599), "pluck",
            _num(f * 1.4983), "remix", "-"]


def _flute(d, f, rng):
    return ["synth", _num(d), "sine", _num(f), "sine", _num(2 * f), "remix", "1v0.9,2v0.15",
            "tremolo", _num(rng.uniform(4, 6)), "15", *_fade(d, 0.08, 0.1)]


def _clarinet(d, f, rng):
    return ["synth", _num(d), "square", _num(f), "lowpass", "1800", *_fade(d, 0.03, 0.05)]


def _violin(d, f, rng):
    return ["synth", _num(d), "sawtooth", _num(f), "lowpass", "3500", "tremolo",
            _num(rng.uniform(5, 7)), "20", *_fade(d, 0.15, 0.1)]


def _trumpet(d, f, rng):
    return ["synth", _num(d), "sawtooth", _num(f), "sawtooth", _num(2 * f), "remix", "-",
            "highpass", "300", "overdrive", "10", *_fade(d, 0.04, 0.08)]


def _guitar(d, f, rng):
    return ["synth", _num(d), "pluck", _num(f)]


def _organ(d, f, rng):
    return ["synth", _num(d), "sine", _num(f), "sine", _num(2 * f), "sine", _num(3 * f),
            "sine", _num(4 * f), "remix", "-", *_fade(d, 0.01, 0.02)]


def _bell(d, f, rng):
    return ["synth", _num(d), "sine", _num(f), "sine", _num(2.76 * f), "sine", _num(5.4 * f),
            "sine", _num(8.93 * f), "remix", "1v1,2v0.6,3v0.4,4v0.25",
            "fade", "l", "0.005", _num(d), _num(d - 0.005)]


def _drum(d, f, rng):
    d = min(d, 0.45)
    hi, lo = max(40.0, f / 2), max(30.0, f / 8)
    return ["synth", _num(d), "brownnoise", "synth", _num(d), "sine", "mix",
            f"{hi:.1f}:{lo:.1f}", "fade", "l", "0.002", _num(d), _num(d - 0.002)]


UPSTREAM_SOUNDS: dict[str, SoundRecipe] = {
    "sine-tone": _sine_tone, "square-tone": _square_tone, "white-noise": _noise("whitenoise"),
    "pink-noise": _noise("pinknoise"), "brown-noise": _noise("brownnoise"),
    "sweep-up": _sweep(True), "sweep-down": _sweep(False), "click-train": _click_train,
    "beeps": _beeps, "major-chord": _chord(1.2599), "minor-chord": _chord(1.1892),
    "tremolo-tone": _tremolo_tone, "pluck-chord": _pluck_chord,
}
"""Upstream sound classes (tones, noise colours, sweeps, rhythmic patterns, chords, plucks)."""

INSTRUMENTS: dict[str, SoundRecipe] = {
    "bell": _bell, "clarinet": _clarinet, "drum": _drum, "flute": _flute, "guitar": _guitar,
    "organ": _organ, "trumpet": _trumpet, "violin": _violin,
}
"""The downstream synthetic instruments (labels disjoint from the upstream sound classes)."""

SOUND_RECIPES = {**UPSTREAM_SOUNDS, **INSTRUMENTS}


# -- what to synthesize ------------------------------------------------------------------------

@dataclass(frozen=True)
class CorpusDef:
    """One corpus: a folder-per-label data set of spoken words and/or synthetic sounds."""

    name: str
    words: tuple[str, ...] = ()
    sounds: tuple[str, ...] = ()
    per_class: dict[str, int] = field(default_factory=dict)
    """Clips per class in each split (``train``, ``valid``, ``test``; missing means 0)."""

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(self.words + self.sounds))


SYNTHETIC_PREFIX = "aat-vtl"
"""Name prefix of the made-up training variants (no espeak-ng variant starts with it)."""


def synthetic_variant(seed: int, index: int) -> tuple[str, str]:
    """A made-up espeak-ng voice variant: its name and the text of its variant file.

    One speaker of a larger population than espeak-ng's own variants: a vocal tract length
    factor, log-uniform in [0.8, 1.5] (adult male 1.0; women about 1.15; children up to 1.5),
    scales every formant, each with its own jitter of +-7 %; sometimes a high formant (F3 or F4)
    is far off (as in several espeak-ng variants); pitch follows the vocal tract length.
    """
    rng = random.Random(f"aat-demo-vtl/{seed}/{index}")
    scale = math.exp(rng.uniform(math.log(0.8), math.log(1.5)))
    lines = ["language variant", f"name {SYNTHETIC_PREFIX}{index:03d}"]
    base = round(min(300.0, 95.0 * scale ** 2.5 * rng.uniform(0.75, 1.33)))
    lines.append(f"pitch {base} {round(base * rng.uniform(1.15, 1.8))}")
    lines.append(f"flutter {rng.randint(0, 20)}")
    for k in range(9):
        freq = scale * rng.uniform(0.93, 1.07)
        if k in (3, 4) and rng.random() < 0.2:
            freq *= math.exp(rng.uniform(math.log(0.3), math.log(2.5)))
        height = rng.randint(60, 140) if k else 100
        lines.append(f"formant {k} {round(100 * freq)} {height} {rng.randint(80, 130)}")
    return f"{SYNTHETIC_PREFIX}{index:03d}", "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Speakers:
    """The speaker-disjoint partition: voice variants and notes per split.

    ``synthetic`` maps the made-up training variants (also listed under ``variants["train"]``)
    to their variant files.
    """

    variants: dict[str, tuple[str, ...]]
    notes: dict[str, tuple[int, ...]]
    synthetic: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"variants": {k: list(v) for k, v in self.variants.items()},
                "notes": {k: list(v) for k, v in self.notes.items()},
                "synthetic": dict(self.synthetic)}


def make_speakers(seed: int, valid_variants: int = 10, test_variants: int = 14,
                  valid_notes: int = 6, test_notes: int = 8, synthetic: int = 0) -> Speakers:
    """Shuffle the variants and notes under ``seed`` and cut them into test, valid, train.

    ``synthetic`` made-up variants join the training split only (held-out speakers stay
    espeak-ng's own voices).
    """
    if valid_variants + test_variants >= len(VARIANTS) or valid_notes + test_notes >= len(NOTES):
        raise ConfigError("held-out variants or notes leave nothing to train on")
    if synthetic < 0:
        raise ConfigError(f"synthetic speakers must be >= 0, got {synthetic}")
    rng = random.Random(f"aat-demo-speakers/{seed}")
    variants = list(VARIANTS)
    rng.shuffle(variants)
    notes = list(NOTES)
    rng.shuffle(notes)

    def cut(items, n_test, n_valid):
        return {"test": tuple(sorted(items[:n_test])),
                "valid": tuple(sorted(items[n_test:n_test + n_valid])),
                "train": tuple(sorted(items[n_test + n_valid:]))}
    split = cut(variants, test_variants, valid_variants)
    made = dict(synthetic_variant(seed, i) for i in range(synthetic))
    split["train"] = split["train"] + tuple(made)
    return Speakers(split, cut(notes, test_notes, valid_notes), made)


@dataclass(frozen=True)
class ClipPlan:
    """Everything needed to render one clip, fixed before anything runs."""

    corpus: str
    label: str
    split: str
    rel: str
    """Path relative to the corpus folder: ``<label>/<file>.wav``."""
    kind: str
    """``speech`` or ``sound``."""
    params: dict[str, Any]


def _common_params(rng: random.Random) -> dict[str, Any]:
    reverb = None
    if rng.random() < 0.3:
        reverb = [rng.randint(10, 70), rng.randint(20, 80), rng.randint(20, 80)]
    noise = None
    if rng.random() < 0.75:
        noise = {"colour": rng.choice(("white", "pink", "brown")), "snr_db": rng.uniform(5, 30),
                 "offset": rng.random()}
    return {"reverb": reverb, "noise": noise, "peak_db": rng.uniform(-20.0, -1.0),
            "onset": rng.random()}


def plan_corpus(corpus: CorpusDef, speakers: Speakers, seed: int) -> list[ClipPlan]:
    """The clips of ``corpus``, each with its own deterministic parameters."""
    plans = []
    for label in corpus.labels:
        spoken = label in corpus.words
        for split in SPLITS:
            for i in range(corpus.per_class.get(split, 0)):
                rng = random.Random(f"aat-demo/{seed}/{corpus.name}/{label}/{split}/{i}")
                p = _common_params(rng)
                if spoken:
                    voice = rng.choice(VOICES)
                    variant = rng.choice(speakers.variants[split])
                    p.update(text=label, voice=voice, variant=variant,
                             speed=rng.randint(130, 210), pitch=rng.randint(15, 85),
                             amplitude=rng.randint(70, 150))
                    rel = f"{label}/{voice}+{variant}_{split}{i:04d}.wav"
                    kind = "speech"
                else:
                    note = rng.choice(speakers.notes[split])
                    p.update(recipe=label, note=note, detune=rng.uniform(-0.3, 0.3),
                             duration=rng.uniform(0.35, 0.9), rng_seed=rng.getrandbits(32))
                    rel = f"{label}/note{note}_{split}{i:04d}.wav"
                    kind = "sound"
                plans.append(ClipPlan(corpus.name, label, split, rel, kind, p))
    return plans


# -- rendering ---------------------------------------------------------------------------------

def require_tools() -> dict[str, str]:
    """Paths of espeak-ng and sox, or ``ConfigError`` saying how to install them."""
    out = {}
    for tool in ("espeak-ng", "sox"):
        path = shutil.which(tool)
        if path is None:
            raise ConfigError(f"{tool} is not installed; the demo corpus is synthesized with "
                              "espeak-ng and sox (Debian/Ubuntu: apt-get install espeak-ng sox "
                              "libsox-fmt-all)")
        out[tool] = path
    return out


def tool_versions() -> dict[str, str]:
    out = {}
    for tool in ("espeak-ng", "sox"):
        res = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        out[tool] = (res.stdout or res.stderr).strip().splitlines()[0] if res.returncode == 0 \
            else "unknown"
    return out


def installed_variants() -> set[str]:
    """Variant names espeak-ng knows (``espeak-ng --voices=variant``)."""
    res = _run(["espeak-ng", "--voices=variant"])
    names = set()
    for line in res.decode("utf-8", "replace").splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[4].startswith("!v/"):
            names.add(cols[4][3:])
    return names


def _run(cmd: list[str], data: bytes | None = None) -> bytes:
    res = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if res.returncode != 0:
        err = res.stderr.decode("utf-8", "replace").strip()[:300]
        raise ConfigError(f"{cmd[0]} failed (exit {res.returncode}): {err}; command: "
                          f"{' '.join(cmd)}")
    return res.stdout


_RAW = ["-t", "raw", "-e", "floating-point", "-b", "32", "-c", "1", "-r", str(SAMPLE_RATE)]


def _sox_raw(args: list[str], wave: np.ndarray | None = None) -> np.ndarray:
    """Run sox (repeatable mode) on a float32 mono input (or none) and read float32 back."""
    src = [*_RAW, "-"] if wave is not None else ["-n", "-r", str(SAMPLE_RATE)]
    out = _run(["sox", "-R", "-V1", *src, *_RAW, "-", *args],
               None if wave is None else wave.astype("<f4").tobytes())
    return np.frombuffer(out, dtype="<f4").astype(np.float32)


def noise_beds(seconds: float = 4.0) -> dict[str, np.ndarray]:
    """White, pink and brown noise made by sox, unit RMS."""
    beds = {}
    for colour in ("white", "pink", "brown"):
        w = _sox_raw(["synth", f"{seconds}", f"{colour}noise"])
        beds[colour] = w / max(float(np.sqrt(np.mean(w ** 2))), 1e-9)
    return beds


ESPEAK_MAX_VOICES = 347
"""The most voice files (languages plus variants) a data directory may hold: espeak-ng 1.51's
voice list has 349 places (``N_VOICES_LIST - 1``); past 347 files it warns and drops voices
(measured)."""


def espeak_data(speakers: Speakers, root: Path) -> Path | None:
    """A private espeak-ng data directory that adds the synthetic variants (None if none).

    Everything but the voice folders links to the installed data; espeak-ng reads it with
    ``--path`` (the installed variants sound exactly as without it). espeak-ng's voice list is
    short, so the directory holds only the West Germanic languages (every voice in ``VOICES``)
    and no MBROLA voices: that leaves room for about 230 made-up variants.
    """
    if not speakers.synthetic:
        return None
    res = _run(["espeak-ng", "--version"]).decode("utf-8", "replace")
    if "Data at:" not in res:
        raise ConfigError(f"cannot find espeak-ng's data directory in {res.strip()!r}")
    system = Path(res.split("Data at:", 1)[1].strip())
    data = root / "espeak-ng-data"
    shutil.rmtree(root, ignore_errors=True)
    # Real folders down to the variant folder, and the language folder; in each, links to the
    # installed entries it keeps.
    keep = {Path("."): lambda name: name not in ("voices", "lang"),
            Path("voices"): lambda name: name not in ("!v", "mb"),
            Path("voices/!v"): lambda name: True,
            Path("lang"): lambda name: name == "gmw"}
    for sub, kept in keep.items():
        (data / sub).mkdir(parents=True, exist_ok=True)
        for item in (system / sub).iterdir():
            if kept(item.name):
                (data / sub / item.name).symlink_to(item)
    for name, text in speakers.synthetic.items():
        (data / "voices" / "!v" / name).write_text(text)
    listed = sum(len(files) for top in ("lang", "voices")
                 for _, _, files in os.walk(data / top, followlinks=True))
    if listed > ESPEAK_MAX_VOICES:
        shutil.rmtree(root, ignore_errors=True)  # no half-usable directory left behind
        made = len(speakers.synthetic)
        raise ConfigError(f"{made} synthetic speakers are too many: with the {listed - made} "
                          f"installed voice files the demo needs that makes {listed}, and "
                          f"espeak-ng takes at most {ESPEAK_MAX_VOICES}; use at most "
                          f"{ESPEAK_MAX_VOICES - listed + made} synthetic speakers")
    return root


def _speech(p: dict[str, Any], max_len: int, data: Path | None = None) -> np.ndarray:
    synthetic = p["variant"].startswith(SYNTHETIC_PREFIX)
    if synthetic and data is None:
        raise ConfigError(f"variant {p['variant']} is synthetic; render it with the espeak-ng "
                          "data directory from espeak_data()")
    path = ["--path", str(data)] if synthetic else []
    wav = _run(["espeak-ng", *path, "-v", f"{p['voice']}+{p['variant']}", "-s", str(p["speed"]),
                "-p", str(p["pitch"]), "-a", str(p["amplitude"]), "--stdout", p["text"]])
    trim = ["silence", "1", "0.01", "-50d", "reverse", "silence", "1", "0.01", "-50d", "reverse"]
    w = _run(["sox", "-R", "-V1", "-t", "wav", "-", *_RAW, "-", *trim], wav)
    w = np.frombuffer(w, dtype="<f4").astype(np.float32)
    if w.size < SAMPLE_RATE // 20:  # trimmed away (a very quiet variant): keep it untrimmed
        w = np.frombuffer(_run(["sox", "-R", "-V1", "-t", "wav", "-", *_RAW, "-"], wav),
                          dtype="<f4").astype(np.float32)
    effects = []
    if w.size > max_len:  # slow speech that does not fit: speed it up, keep the pitch
        effects += ["tempo", "-s", f"{w.size / max_len:.4f}"]
    if p["reverb"]:
        effects += ["reverb", *map(str, p["reverb"])]
    return _sox_raw(effects, w) if effects else w


def _sound(p: dict[str, Any]) -> np.ndarray:
    f0 = note_hz(p["note"] + p["detune"])
    args = SOUND_RECIPES[p["recipe"]](p["duration"], f0, random.Random(p["rng_seed"]))
    if p["reverb"]:
        args += ["reverb", *map(str, p["reverb"])]
    return _sox_raw(args)


def render(plan: ClipPlan, beds: dict[str, np.ndarray], espeak_path: Path | None = None,
           ) -> np.ndarray:
    """The clip as float32 samples at 16 kHz, exactly ``CLIP_SECONDS`` long.

    ``espeak_path``: the data directory from ``espeak_data`` (needed by synthetic variants).
    """
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    p = plan.params
    w = _speech(p, int(0.95 * n), espeak_path) if plan.kind == "speech" else _sound(p)
    if w.size == 0 or not np.isfinite(w).all():
        raise ConfigError(f"synthesis of {plan.corpus}/{plan.rel} produced no usable audio")
    if w.size > n:  # a reverb tail past the window: cut with a short fade
        w = w[:n].copy()
        fade = min(320, n)
        w[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    out = np.zeros(n, dtype=np.float32)
    start = round(p["onset"] * (n - w.size))
    out[start:start + w.size] = w
    active_rms = float(np.sqrt(np.mean(w ** 2))) or 1e-6
    if p["noise"]:
        bed = beds[p["noise"]["colour"]]
        off = int(p["noise"]["offset"] * (bed.size - n))
        out += bed[off:off + n] * active_rms * 10.0 ** (-p["noise"]["snr_db"] / 20.0)
    peak = float(np.abs(out).max()) or 1.0
    return (out * (10.0 ** (p["peak_db"] / 20.0) / peak)).astype(np.float32)


def clips_on_disk(corpora: Iterable[CorpusDef], out: str | Path, *, seed: int,
                  speakers: Speakers) -> tuple[int, int]:
    """How many clips ``synthesize`` plans for ``corpora`` and how many are already on disk."""
    plans = _plan_all(corpora, speakers, seed)
    return len(plans), len(plans) - len(_missing(plans, Path(out)))


def _plan_all(corpora: Iterable[CorpusDef], speakers: Speakers, seed: int) -> list[ClipPlan]:
    return [p for c in corpora for p in plan_corpus(c, speakers, seed)]


def _missing(plans: list[ClipPlan], out: Path) -> list[ClipPlan]:
    """The plans whose clip is not on disk yet (clips on disk are kept, never re-rendered)."""
    return [p for p in plans if not (out / p.corpus / p.rel).is_file()]


def synthesize(corpora: Iterable[CorpusDef], out: str | Path, *, seed: int = 0,
               speakers: Speakers | None = None, workers: int = 2, progress: bool = True,
               ) -> dict[str, Path]:
    """Write every corpus under ``out`` (clips already on disk are kept); return their folders.

    Each corpus folder gets ``validation_list.txt``, ``testing_list.txt`` and ``corpus.json``
    (seed, speakers per split, counts, tool versions).
    """
    require_tools()
    corpora = list(corpora)
    speakers = speakers or make_speakers(seed)
    known = installed_variants()
    missing = sorted(set(VARIANTS) - known)
    if missing:
        raise ConfigError(f"espeak-ng lacks the voice variants {missing[:8]}; the demo needs "
                          "espeak-ng 1.51 or later with its standard variants")
    out = Path(out)
    beds = noise_beds()
    data = espeak_data(speakers, out / ".espeak")
    versions = tool_versions()
    plans = _plan_all(corpora, speakers, seed)
    todo = _missing(plans, out)

    def job(plan: ClipPlan) -> None:
        path = out / plan.corpus / plan.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        sf.write(tmp, render(plan, beds, data), SAMPLE_RATE, subtype="PCM_16", format="WAV")
        tmp.replace(path)

    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
            total=len(todo), unit="clip", desc="synthesize", disable=not progress,
            dynamic_ncols=True) as bar:
        for _ in pool.map(job, todo):
            bar.update(1)
    folders = {}
    for c in corpora:
        root = out / c.name
        root.mkdir(parents=True, exist_ok=True)
        mine = [p for p in plans if p.corpus == c.name]
        for split, fname in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
            rels = sorted(p.rel for p in mine if p.split == split)
            (root / fname).write_text("".join(r + "\n" for r in rels))
        counts = {s: sum(p.split == s for p in mine) for s in SPLITS}
        meta = {"corpus": c.name, "seed": seed, "labels": list(c.labels),
                "definition": asdict(c), "counts": counts, "speakers": speakers.to_dict(),
                "voices": list(VOICES), "tools": versions, "sample_rate": SAMPLE_RATE,
                "clip_seconds": CLIP_SECONDS}
        (root / "corpus.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        folders[c.name] = root
    log.info("synthesized %d clips (%d new) in %s", len(plans), len(todo), out)
    return folders


def speaker_of(rel: str) -> str:
    """The speaker (``voice+variant``) or note (``note<midi>``) a clip's file name encodes."""
    name = Path(rel).name
    return name.rsplit("_", 1)[0]

