"""``docs/demo.md``: how the demo artifacts were made and how well they do (mini Table 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aat_serve.training.demo.tasks import check_targets

METHOD_NAMES = {"head": "head-only (linear probe)", "aat_ms": "AAT^MS (adapters)",
                "full": "full fine-tuning"}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _mins(s: float) -> str:
    return f"{s / 60:.1f} min"


def _targets(s: dict[str, Any]) -> str:
    if not all("head" in r and "aat_ms" in r for r in s["results"].values()):
        return "(Not checked: a partial build.)"
    misses = check_targets(s)
    return "All met." if not misses else "Missed: " + "; ".join(misses) + "."


def _train_speakers(speakers: dict[str, Any]) -> str:
    made = len(speakers.get("synthetic", {}))
    real = len(speakers["variants"]["train"]) - made
    if not made:
        return str(real)
    return (f"{real} of espeak-ng's, plus {made} made-up variants: random vocal tract length "
            "0.8-1.5x, formants and pitch")


def _found_clips(times: dict[str, float], synthesis: dict[str, Any] | None) -> bool:
    """Whether the build found clips on disk (records before ``synthesis`` existed: a guess)."""
    if synthesis is None:
        return times["synthesis_s"] < 60
    return synthesis["reused"] > 0


def _reused(times: dict[str, float], synthesis: dict[str, Any] | None) -> str:
    """What the synthesis time covers."""
    if synthesis is None:
        return " (the clips were already on disk)" if _found_clips(times, synthesis) else ""
    if not _found_clips(times, synthesis):
        return f" for {synthesis['clips']:,} clips"
    if synthesis["reused"] == synthesis["clips"]:
        return f" (all {synthesis['clips']:,} clips were already on disk)"
    return (f" for {synthesis['clips'] - synthesis['reused']:,} new clips with "
            f"{synthesis['reused']:,} already on disk")


def _resumed_s(run: dict[str, Any]) -> float:
    """Training time a run did not spend in this build (resumed from the work directory)."""
    return max(0.0, run.get("epoch_seconds", 0.0) - run["seconds"])


def _run_time(run: dict[str, Any]) -> str:
    """A run's time in seconds; a resumed run shows the time its epochs had taken."""
    if _resumed_s(run) > 0:
        return f"{run['epoch_seconds']:.0f} (resumed)"
    return f"{run['seconds']:.0f}"


def _timing(times: dict[str, float], pre: dict[str, Any],
            synthesis: dict[str, Any] | None = None,
            results: dict[str, dict[str, Any]] | None = None) -> str:
    syn = times["synthesis_s"]
    reused = _reused(times, synthesis)
    if not pre.get("resumed"):
        return (f"Build time **{_mins(times['total_s'])}** (synthesis {_mins(syn)}{reused}, "
                f"pretraining {_mins(times['pretrain_s'])}).")
    runs = [r for by_method in (results or {}).values() for r in by_method.values()]
    scratch = (times["total_s"] - times["pretrain_s"] + pre["epoch_seconds"]
               + sum(_resumed_s(r) for r in runs))
    return (f"This run took {_mins(times['total_s'])}: synthesis {_mins(syn)}{reused}, and it "
            f"resumed a finished pretraining run from its run directory, whose "
            f"{pre['epochs']} epochs had taken {_mins(pre['epoch_seconds'])} of training "
            f"(validation passes not counted). From scratch: about **{_mins(scratch)}**"
            + (" plus the synthesis." if _found_clips(times, synthesis) else "."))


def _learning_rates(cfg: dict[str, Any], methods: list[str]) -> str:
    """`head` 0.01, `aat_ms` 0.005 (commands 0.002), ... from ``lr`` and ``task_lr``."""
    parts = []
    for m in methods:
        over = ", ".join(f"{t} {lrs[m]:g}" for t, lrs in sorted(cfg.get("task_lr", {}).items())
                         if m in lrs)
        parts.append(f"`{m}` {cfg['lr'][m]:g}" + (f" ({over})" if over else ""))
    return ", ".join(parts)


def render_report(s: dict[str, Any]) -> str:
    """Markdown for a build summary (``build.json``): the sections in page order."""
    res = s["results"]
    tasks = list(res)
    methods = [m for m in ("head", "aat_ms", "full") if all(m in res[t] for t in tasks)]
    lines = [*_intro(), *_how_made(s, methods), *_accuracy(s, tasks, methods), *_artifacts(s),
             *_try_it(s)]
    return "\n".join(lines)


def _intro() -> list[str]:
    """Title and what the demo is."""
    return [
        "# The demo backbone and tasks",
        "",
        "`aat serve` with no configuration serves a small AST and three task bundles that our own",
        "pipeline built from nothing but Debian's `espeak-ng` and `sox` (`aat demo build`). They",
        "live in the package (`adapters/demo_assets/`), so a fresh install classifies spoken",
        "digits, commands and synthetic instruments out of the box.",
        "",
    ]


def _how_made(s: dict[str, Any], methods: list[str]) -> list[str]:
    """The command, versions and time, and the four steps of the build with their settings."""
    cfg, pre = s["config"], s["pretrain"]
    return [
        "## How they were made",
        "",
        "```bash",
        s["command"],
        "```",
        "",
        f"Seed {s['seed']}; torch {s['torch']} with {s['threads']} thread(s); "
        f"{s['tools'].get('espeak-ng', '?')}; {s['tools'].get('sox', '?')}. "
        + _timing(s["times"], pre, s.get("synthesis"), s["results"]),
        "",
        "1. **Corpus.** Spoken words: espeak-ng's eight English voices, each combined with a voice",
        "   variant (`en-us+klatt3`), random speed (130-210 wpm), pitch and amplitude; sox trims,",
        "   resamples to 16 kHz and adds reverb to 30% of clips; white, pink or brown noise (made",
        "   by sox) is mixed into 75% at 5-30 dB SNR; each word lands at a random offset and level",
        "   in a 1-s clip. Sounds: sox `synth` recipes at random notes, lengths and levels, with",
        "   the same noise and reverb.",
        "2. **Speaker-disjoint splits.** The voice variants are cut into train "
        f"({_train_speakers(s['speakers'])}), validation "
        f"({len(s['speakers']['variants']['valid'])}) and test "
        f"({len(s['speakers']['variants']['test'])}) sets; a test speaker is heard nowhere "
        "else,",
        "   not even in pretraining. Notes play that role for the sounds "
        f"({len(s['speakers']['notes']['test'])} test notes).",
        f"3. **Pretraining.** A {cfg['embed_dim']}-wide, {cfg['depth']}-block AST "
        f"({cfg['num_heads']} heads, {cfg['patch']}x{cfg['patch']} patches at stride "
        f"{cfg['stride']} in frequency and {cfg['time_stride']} in time, "
        f"{cfg['num_mel_bins']} mel bins, {cfg['target_length']} frames; "
        f"{pre['params']:,} parameters) learns {pre['classes']} upstream classes",
        f"   ({pre['words']} words and {pre['sounds']} sound classes; "
        f"{pre['train_clips']:,} clips, "
        f"{pre['epochs']} epochs, supervised, method `full`): validation accuracy "
        f"{pre['valid_acc']:.1%}.",
        "   None of the downstream labels is an upstream label.",
        "4. **Downstream.** For each task, head-only, AAT^MS (bottleneck "
        f"{cfg['bottleneck']}) and full fine-tuning, {cfg['epochs']} epochs each, the best",
        "   epoch chosen on the validation speakers; accuracy below is on the test speakers.",
        f"   Learning rates: {_learning_rates(cfg, methods)}.",
        "   The bundles are trained on the backbone as exported (fp16 weights read back as",
        "   fp32), so their fingerprint is the served backbone's.",
        "",
    ]


def _accuracy(s: dict[str, Any], tasks: list[str], methods: list[str]) -> list[str]:
    """The mini Table 2 (held-out accuracy per method and task), clip counts, run times and
    whether the targets hold."""
    res = s["results"]
    first = {t: next(iter(res[t].values())) for t in tasks}
    lines = [
        "## Held-out accuracy (mini Table 2)",
        "",
        "| method | trainable params | " + " | ".join(tasks) + " |",
        "|---|---:|" + "---:|" * len(tasks),
    ]
    for method in methods:
        params = " / ".join(f"{res[t][method]['trainable_params']:,}" for t in tasks)
        accs = " | ".join(f"{res[t][method]['test_acc']:.1%}" for t in tasks)
        lines.append(f"| {METHOD_NAMES[method]} | {params} | {accs} |")
    lines += [
        "",
        "Trainable parameters are given per task (" + ", ".join(tasks) + "); the heads differ in "
        "class count. Test clips per task: "
        + ", ".join(f"{t} {first[t]['test_clips']}" for t in tasks)
        + "; training clips: " + ", ".join(f"{t} {first[t]['train_clips']}" for t in tasks)
        + ".",
        "",
        "Training time per run (s): "
        + "; ".join(f"{t}: " + ", ".join(f"{m} {_run_time(res[t][m])}" for m in methods)
                    for t in tasks)
        + ".",
        "",
        "Targets: AAT^MS at least 90% on each spoken task, and above head-only on every "
        "task. " + _targets(s),
        "",
    ]
    return lines


def _artifacts(s: dict[str, Any]) -> list[str]:
    """The committed files with their sizes, what they are, and the backbone's fingerprint."""
    lines = [
        "## Artifacts",
        "",
        "| file | size |",
        "|---|---:|",
    ]
    lines += [f"| `adapters/demo_assets/{name}` | {_mb(n)} |" for name, n in s["sizes"].items()]
    total = sum(s["sizes"].values())
    lines += [
        f"| total | {_mb(total)} |",
        "",
        "The backbone is a Hugging Face AST directory (`config.json`, `model.safetensors` in "
        "fp16,",
        "`preprocessor_config.json` with the feature settings); the bundles are ordinary AAT^MS",
        "task bundles and load through the same validation as an uploaded one. `build.json`",
        "records every setting, the held-out speakers and every figure on this page.",
        f"Backbone fingerprint: `{s['backbone_fingerprint']}`.",
        "",
    ]
    return lines


def _try_it(s: dict[str, Any]) -> list[str]:
    """How to query the served demo, and the command that rebuilds it."""
    return [
        "## Try it",
        "",
        "```bash",
        ".venv/bin/aat serve &",
        "espeak-ng -v en-us+klatt -w seven.wav seven",
        "curl -s -H 'Content-Type: audio/wav' --data-binary @seven.wav \\",
        "     http://127.0.0.1:8000/classify/digits",
        "```",
        "",
        "Rebuild (same command and seed give the same corpus and recipes; the weights match up to",
        "floating-point differences between machines):",
        "",
        "```bash",
        s["command"],
        "```",
        "",
    ]


def write_report(summary: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(summary))
    return path
