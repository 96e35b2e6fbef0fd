"""The demo's synthetic sounds: sox ``synth`` recipes for the upstream sound classes and the
eight downstream instruments.

A recipe maps (duration in s, fundamental in Hz, a seeded ``random.Random``) to the sox
arguments that follow the null input (``sox -n ... <args>``); the rendering adds reverb and
noise (``render``).
"""

from __future__ import annotations

import random
from collections.abc import Callable


def note_hz(midi: float) -> float:
    """The frequency in Hz of a MIDI note (69 is A4, 440 Hz); fractions detune it."""
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


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
