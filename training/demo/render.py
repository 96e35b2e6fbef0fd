"""Render one planned demo clip with espeak-ng and sox, and the tool checks that go with it.

Speech: espeak-ng speaks the word (synthetic variants from a private data directory,
``espeak_data``), sox trims it, fits it into the window and adds reverb. Sounds: sox plays a
recipe from ``sounds``. Both then land at a random offset in a ``CLIP_SECONDS`` window, get
noise (``noise_beds``) at a random SNR and a random peak level.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.demo.plan import ClipPlan
from aat_serve.training.demo.sounds import SOUND_RECIPES, note_hz
from aat_serve.training.demo.speakers import SYNTHETIC_PREFIX, Speakers

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0


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
