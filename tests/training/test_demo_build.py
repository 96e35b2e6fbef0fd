"""The demo build: backbone export, report, targets, a tiny end-to-end run through the CLI, and
the committed artifacts (they load through the same validation as any uploaded bundle)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.adapters.config import FeatureConfig
from aat_serve.adapters.demo_assets import BACKBONE_DIR, BUILD_JSON, DEMO_DIR, TASKS_DIR, available
from aat_serve.adapters.errors import BackboneMismatchError, ConfigError
from aat_serve.adapters.model import AudioClassifier
from aat_serve.cli.main import main as aat
from aat_serve.training.demo import corpus as C
from aat_serve.training.demo import plan as P
from aat_serve.training.demo import sounds as S
from aat_serve.training.demo import speakers as SP
from aat_serve.training.demo.build import export_backbone
from aat_serve.training.demo.report import render_report
from aat_serve.training.demo.tasks import TASKS, check_targets
from aat_serve.training.export import save_model_checkpoint
from tests.helpers import require_tool, tiny_backbone

REPO = DEMO_DIR.parents[1]


def _trained_full_model(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = AudioClassifier(tiny_backbone(seed, norm_eps=1e-6, head_norm_eps=1e-6), "full", 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    feats = FeatureConfig(num_mel_bins=32, target_length=64, mean=-5.5, std=3.25)
    path = save_model_checkpoint(model, tmp_path / "full.safetensors", task="up",
                                 labels=["a", "b", "c"], features=feats, multi_label=False)
    return model.eval(), path


def test_export_backbone_fp16_round_trip(tmp_path):
    model, path = _trained_full_model(tmp_path)
    out = export_backbone(path, tmp_path / "hf", fp16=True)
    ckpt = load_checkpoint(out)
    assert ckpt.labels == ["a", "b", "c"] and ckpt.source_format == "hf"
    f = ckpt.features
    assert (f.num_mel_bins, f.target_length, f.mean, f.std) == (32, 64, -5.5, 3.25)
    assert ckpt.backbone.cfg.norm_eps == 1e-6 and ckpt.backbone.cfg.head_norm_eps == 1e-6
    got = ckpt.backbone.frozen_state_dict()
    for name, t in model.backbone.frozen_state_dict().items():
        assert torch.equal(got[name], t.half().float()), name
    # fp16 rounding really happened (the weights differ from the fp32 originals) ...
    assert not all(torch.equal(got[n], t) for n, t in model.backbone.frozen_state_dict().items())
    # ... and the fp32 export is exact.
    exact = load_checkpoint(export_backbone(path, tmp_path / "hf32", fp16=False))
    assert exact.backbone.fingerprint() == model.backbone.fingerprint()
    assert ckpt.backbone.fingerprint() != model.backbone.fingerprint()


def test_exported_directory_is_a_transformers_model(tmp_path):
    """The export is a genuine ``ASTForAudioClassification`` checkpoint: same logits."""
    transformers = pytest.importorskip("transformers")
    model, path = _trained_full_model(tmp_path, seed=1)
    out = export_backbone(path, tmp_path / "hf", fp16=False)
    hf = transformers.ASTForAudioClassification.from_pretrained(out).eval()
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        ours = model(x)
        theirs = hf(input_values=x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}


def _summary(head=0.5, aat=0.95, full=0.97):
    res = {t: {m: {"test_acc": a, "valid_acc": a, "best_epoch": 3, "trainable_params": n,
                   "total_params": 1000, "seconds": 12.0, "train_clips": 800,
                   "test_clips": 400}
               for m, a, n in (("head", head, 10), ("aat_ms", aat, 100), ("full", full, 1000))}
           for t in TASKS}
    return {"command": "aat demo build --seed 7", "seed": 7, "threads": 1, "torch": "x",
            "tools": {"espeak-ng": "espeak", "sox": "sox"},
            "config": {"embed_dim": 128, "depth": 4, "num_heads": 2, "patch": 16, "stride": 16,
                       "time_stride": 8, "num_mel_bins": 64, "target_length": 100, "bottleneck": 32,
                       "epochs": 10, "lr": {"head": 1e-2, "aat_ms": 5e-3, "full": 1e-3},
                       "task_lr": {"commands": {"aat_ms": 2e-3}}},
            "speakers": {"variants": {"train": ["a"] * 73, "valid": ["b"] * 10,
                                      "test": ["c"] * 14},
                         "notes": {"train": [1], "valid": [2], "test": [3] * 8}},
            "pretrain": {"params": 1000, "classes": 48, "words": 35, "sounds": 13,
                         "train_clips": 4800, "epochs": 12,
                         "valid_acc": 0.8123},
            "times": {"total_s": 1800.0, "synthesis_s": 300.0, "pretrain_s": 600.0},
            "results": res, "backbone_fingerprint": "sha256:abc",
            "sizes": {"backbone/model.safetensors": 1_600_000, "tasks/digits.safetensors": 1}}


def test_report_shows_every_figure():
    text = render_report(_summary(head=0.4321, aat=0.9512, full=0.9876))
    assert "aat demo build --seed 7" in text and "Build time **30.0 min**" in text
    assert "| AAT^MS (adapters) | 100 / 100 / 100 | 95.1% | 95.1% | 95.1% |" in text
    assert "| head-only (linear probe) | 10 / 10 / 10 | 43.2% | 43.2% | 43.2% |" in text
    assert "| full fine-tuning | 1,000 / 1,000 / 1,000 | 98.8% | 98.8% | 98.8% |" in text
    assert "validation accuracy 81.2%" in text and "(14) sets" in text
    assert "stride 16 in frequency and 8 in time" in text and "(35 words and 13 sound" in text
    assert "| `adapters/demo_assets/backbone/model.safetensors` | 1.60 MB |" in text
    assert "above head-only on every task. All met." in text
    assert "Learning rates: `head` 0.01, `aat_ms` 0.005 (commands 0.002), `full` 0.001." in text
    plain = _summary()
    plain["config"]["task_lr"] = {}
    assert "Learning rates: `head` 0.01, `aat_ms` 0.005, `full` 0.001." in render_report(plain)
    assert "Missed: digits: aat_ms 85.0% < 90%; commands: aat_ms 85.0% < 90%." in render_report(
        _summary(aat=0.85))
    assert render_report(_summary(aat=0.9)) != text
    assert "train (73), validation (10)" in text
    made = _summary()
    made["speakers"]["synthetic"] = {f"aat-vtl{i:03d}": "x" for i in range(4)}
    made["speakers"]["variants"]["train"] += list(made["speakers"]["synthetic"])
    assert ("train (73 of espeak-ng's, plus 4 made-up variants: random vocal tract length "
            "0.8-1.5x, formants and pitch), validation (10)") in render_report(made)


def test_report_says_what_the_synthesis_time_covers():
    s = _summary()
    assert "(synthesis 5.0 min, pretraining 10.0 min)" in render_report(s)  # older records
    s["times"]["synthesis_s"] = 20.0
    assert "(synthesis 0.3 min (the clips were already on disk), " in render_report(s)
    s["synthesis"] = {"clips": 20530, "reused": 0, "seconds": 20.0}
    assert "(synthesis 0.3 min for 20,530 clips, pretraining" in render_report(s)
    s["synthesis"]["reused"] = 5170
    assert ("(synthesis 0.3 min for 15,360 new clips with 5,170 already on disk, "
            "pretraining") in render_report(s)
    s["synthesis"]["reused"] = 20530
    assert "(synthesis 0.3 min (all 20,530 clips were already on disk), " in render_report(s)


def test_report_counts_resumed_runs_at_the_time_they_had_taken():
    s = _summary()
    assert "digits: head 12, aat_ms 12, full 12;" in render_report(s)
    # A rerun in a finished work directory: pretraining and one run resume, one run trains.
    s["pretrain"].update(resumed=True, epoch_seconds=1200.0)
    s["times"] = {"total_s": 60.0, "synthesis_s": 6.0, "pretrain_s": 3.0}
    s["results"]["digits"]["aat_ms"].update(seconds=2.0, epoch_seconds=150.0)
    s["results"]["digits"]["head"]["epoch_seconds"] = 10.0
    text = render_report(s)
    assert "digits: head 12, aat_ms 150 (resumed), full 12;" in text
    assert "This run took 1.0 min: " in text and "whose 12 epochs had taken 20.0 min" in text
    assert "From scratch: about **23.4 min** plus the synthesis." in text  # 60 - 3 + 1200 + 148 s


def test_check_targets():
    assert check_targets(_summary()) == []
    misses = check_targets(_summary(head=0.5, aat=0.85))
    assert "digits: aat_ms 85.0% < 90%" in misses and "commands: aat_ms 85.0% < 90%" in misses
    assert not any(m.startswith("instruments: aat_ms 85.0% <") for m in misses)  # not spoken
    assert "instruments: aat_ms 95.0% does not beat head 96.0%" in check_targets(
        _summary(head=0.96))


def test_tiny_build_through_the_cli(tmp_path, capsys):
    require_tool("espeak-ng")
    require_tool("sox")
    assets, docs = tmp_path / "assets", tmp_path / "docs" / "demo.md"
    rc = aat(["demo", "build", "--preset", "tiny", "--workdir", str(tmp_path / "work"),
              "--assets", str(assets), "--docs", str(docs), "--tasks", "instruments",
              "--methods", "head", "aat_ms", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["command"] == ("aat demo build --seed 0 --preset tiny --tasks instruments "
                                  "--methods head aat_ms")
    assert set(summary["results"]) == {"instruments"}
    made = summary["speakers"]["synthetic"]  # the made-up training speakers were spoken
    assert len(made) == 2 and set(made) <= set(summary["speakers"]["variants"]["train"])
    heard = {P.speaker_of(p.name).split("+")[1]
             for p in (tmp_path / "work" / "corpus" / "upstream").rglob("*+*_train*.wav")}
    assert heard & set(made) and not heard - set(summary["speakers"]["variants"]["train"])
    assert set(summary["results"]["instruments"]) == {"head", "aat_ms"}
    lrs = {m: r["lr"] for m, r in summary["results"]["instruments"].items()}
    assert lrs == {"head": 1e-2, "aat_ms": 5e-3}  # each run records the rate it trained at
    assert all(0 < r["epoch_seconds"] <= r["seconds"]  # trained here, not resumed
               for r in summary["results"]["instruments"].values())
    served = load_checkpoint(assets / "backbone")
    assert served.backbone.cfg.embed_dim == 32
    assert len(served.labels) == len(C.UPSTREAM_WORDS) + len(S.UPSTREAM_SOUNDS) == 97
    bundle = TaskBundle.load(assets / "tasks" / "instruments.safetensors")
    bundle.check_backbone(served.backbone)
    assert bundle.manifest.method == "aat_ms" and bundle.manifest.labels == sorted(
        ["bell", "clarinet", "drum", "flute", "guitar", "organ", "trumpet", "violin"])
    assert bundle.manifest.features["mean"] == summary["features"]["mean"]
    assert summary["results"]["instruments"]["aat_ms"]["test_acc"] == pytest.approx(
        bundle.manifest.metrics["test"]["acc"])
    assert json.loads((assets / "build.json").read_text())["sizes"] == summary["sizes"]
    assert summary["synthesis"]["reused"] == 0 and summary["synthesis"]["clips"] == sum(
        sum(c.values()) for c in summary["corpus"].values())
    assert "| AAT^MS (adapters) |" in docs.read_text()
    assert summary["device"] == "cpu"
    from aat_serve.training.demo.build import build
    from aat_serve.training.demo.build_config import PRESETS
    with pytest.raises(ConfigError, match="unknown demo task or method"):
        build(PRESETS["tiny"], tmp_path / "work", assets, tasks=("nope",))
    # A device that cannot run fails before anything is written.
    with pytest.raises(ConfigError) as err:
        build(PRESETS["tiny"], tmp_path / "never", assets, device="tpu:x")
    assert str(err.value) == ("demo build device: unknown device 'tpu:x'; expected auto, cpu, "
                              "cuda or cuda:N")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError) as err:
            build(PRESETS["tiny"], tmp_path / "never", assets, device="cuda")
        assert str(err.value) == ("demo build device is 'cuda' but no CUDA device is "
                                  "available; use 'auto' or 'cpu'")
    assert not (tmp_path / "never").exists()


def test_task_lr_overrides_one_run_and_rejects_unknown_names():
    from aat_serve.training.demo.build_config import BuildConfig
    cfg = BuildConfig(task_lr={"commands": {"aat_ms": 2e-3}})
    assert cfg.lr_for("commands", "aat_ms") == 2e-3
    assert cfg.lr_for("digits", "aat_ms") == cfg.lr["aat_ms"] == 5e-3  # the others keep lr
    assert cfg.lr_for("commands", "head") == cfg.lr["head"] == 1e-2
    with pytest.raises(ConfigError) as err:
        BuildConfig(task_lr={"comands": {"aat_ms": 2e-3}, "digits": {"lora": 1e-3}})
    assert str(err.value) == ("demo task_lr names unknown tasks or methods ['comands', 'lora']; "
                              "tasks: digits, commands, instruments; methods: head, aat_ms, full")
    with pytest.raises(ConfigError) as err:
        BuildConfig(lr={"head": 1e-2, "aat_ms": 5e-3})
    assert str(err.value) == ("demo lr needs exactly the methods head, aat_ms, full; "
                              "got aat_ms, head")


def test_build_command_names_a_non_default_device():
    import argparse

    from aat_serve.cli.demo import _command
    args = argparse.Namespace(preset="full", threads=None, tasks=None, methods=None,
                              device="cuda:1")
    assert _command(args, 0) == "aat demo build --seed 0 --device cuda:1"
    assert _command(argparse.Namespace(**{**vars(args), "device": "cpu"}), 0) == (
        "aat demo build --seed 0")


# -- the committed artifacts -----------------------------------------------------------------

needs_assets = pytest.mark.skipif(not available(), reason="demo assets not built")


@needs_assets
def test_committed_bundles_validate_against_the_committed_backbone():
    ckpt = load_checkpoint(BACKBONE_DIR)
    summary = json.loads(BUILD_JSON.read_text())
    assert ckpt.backbone.fingerprint() == summary["backbone_fingerprint"]
    names = sorted(p.stem for p in TASKS_DIR.glob("*.safetensors"))
    assert names == sorted(TASKS)
    for name in names:
        bundle = TaskBundle.load(TASKS_DIR / f"{name}.safetensors")  # the upload validation
        bundle.check_backbone(ckpt.backbone)
        m = bundle.manifest
        assert m.task == name and m.method == "aat_ms"
        assert m.metrics["test"]["acc"] == pytest.approx(summary["results"][name]["aat_ms"]
                                                         ["test_acc"])
        assert m.features["num_mel_bins"] == ckpt.features.num_mel_bins
        assert m.features["mean"] == ckpt.features.mean
        # Another backbone is refused.
        other = copy.deepcopy(ckpt.backbone)
        with torch.no_grad():
            other.norm.weight.add_(1e-3)
        with pytest.raises(BackboneMismatchError, match="was trained on backbone"):
            bundle.check_backbone(other)


@needs_assets
def test_committed_bundles_trained_at_the_configured_learning_rates():
    from aat_serve.training.demo.build_config import BuildConfig
    summary = json.loads(BUILD_JSON.read_text())
    cfg = BuildConfig(**summary["config"])
    assert cfg == BuildConfig()  # the committed artifacts are the defaults' build
    lrs = {}
    for task in TASKS:
        lrs[task] = TaskBundle.load(TASKS_DIR / f"{task}.safetensors").manifest.recipe["lr"]
        assert lrs[task] == summary["results"][task]["aat_ms"]["lr"] == cfg.lr_for(task,
                                                                                     "aat_ms")
    assert lrs["commands"] != lrs["digits"]  # the per-task override reached the bundle


@needs_assets
def test_committed_record_reproduces_on_resynthesized_test_speakers(tmp_path):
    """Resynthesize the digits test split (held-out speakers) from the recorded seed and score
    the committed bundle: the recorded held-out accuracy comes back (up to one clip)."""
    require_tool("espeak-ng")
    require_tool("sox")
    from aat_serve.training.data.generic import load_folder
    from aat_serve.training.dataset import ClipDataset
    from aat_serve.training.demo import corpus as C
    from aat_serve.training.demo.build_config import BuildConfig

    summary = json.loads(BUILD_JSON.read_text())
    cfg = BuildConfig(**summary["config"])
    digits = next(c for c in cfg.corpora() if c.name == "digits")
    only_test = P.CorpusDef("digits", words=digits.words, per_class={"test": cfg.test})
    speakers = SP.make_speakers(cfg.seed, synthetic=cfg.synthetic_speakers)
    assert speakers.to_dict() == {"synthetic": {}, **summary["speakers"]}
    root = C.synthesize([only_test], tmp_path, seed=cfg.seed, speakers=speakers,
                        progress=False)["digits"]
    examples = [e for e in load_folder(root).examples if e.split == "test"]
    assert len(examples) == summary["results"]["digits"]["aat_ms"]["test_clips"]
    ckpt = load_checkpoint(BACKBONE_DIR)
    bundle = TaskBundle.load(TASKS_DIR / "digits.safetensors")
    model = bundle.build_model(ckpt.backbone).eval()
    data = ClipDataset(examples, 10, bundle.manifest.feature_config)  # as the trainer scored
    feats = torch.stack([data[i]["features"] for i in range(len(data))])
    with torch.no_grad():
        pred = model(feats).argmax(1)
    acc = float((pred == torch.tensor([e.labels[0] for e in examples])).float().mean())
    recorded = summary["results"]["digits"]["aat_ms"]["test_acc"]
    assert abs(acc - recorded) <= 1.0 / len(examples) + 1e-9, (acc, recorded)


@needs_assets
def test_committed_record_and_docs_match():
    summary = json.loads(BUILD_JSON.read_text())
    # The targets: aat_ms >= 90 % on the spoken tasks and above head-only everywhere.
    assert check_targets(summary) == []
    assert all(r["aat_ms"]["test_acc"] > r["head"]["test_acc"] for r in summary["results"].values())
    assert summary["command"].startswith("aat demo build --seed ")
    total = sum(summary["sizes"].values())
    assert total < 8_000_000, summary["sizes"]
    docs = REPO / "docs" / "demo.md"
    if docs.is_file():  # in the repository (not in an installed wheel)
        assert docs.read_text() == render_report(summary)
    header = json.loads((BACKBONE_DIR / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (BACKBONE_DIR / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


@needs_assets
def test_aat_predict_on_the_committed_demo(tmp_path, capsys):
    """``aat predict`` with the demo backbone and digits bundle on held-out voices: the CLI's
    ranking is the model's, and the acceptance utterance comes out right."""
    import subprocess

    from aat_serve.adapters.features import features_from_audio

    require_tool("espeak-ng")
    heldout = json.loads(BUILD_JSON.read_text())["speakers"]["variants"]["test"]
    files = []
    for voice, word in ((f"en-us+{heldout[0]}", "seven"), (f"en-gb+{heldout[-1]}", "three"),
                        (f"en-gb+{heldout[-2]}", "eight")):
        path = tmp_path / f"{word}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), word], check=True,
                       timeout=30)
        files.append(str(path))
    assert aat(["predict", *files, "--checkpoint", str(BACKBONE_DIR), "--bundle",
                str(TASKS_DIR / "digits.safetensors"), "--json", "--top-k", "10"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert results[0]["predictions"][0]["label"] == "seven"
    bundle = TaskBundle.load(TASKS_DIR / "digits.safetensors")
    model = bundle.build_model(load_checkpoint(BACKBONE_DIR).backbone).eval()
    for path, r in zip(files, results, strict=True):
        with torch.no_grad():
            probs = model(features_from_audio(path, bundle.manifest.feature_config)[None])
            probs = probs.softmax(-1)[0]
        order = [bundle.manifest.labels[i] for i in probs.argsort(descending=True).tolist()]
        assert [x["label"] for x in r["predictions"]] == order
        torch.testing.assert_close(torch.tensor([x["score"] for x in r["predictions"]]),
                                   probs.sort(descending=True).values)
