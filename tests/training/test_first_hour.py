"""Issue 22, the training side of a user's first hour: feature settings that follow the
backbone (item 1), a data set's subset keeps the labels it holds (2), ``--checkpoint demo``
(3), a ``full`` result loads as a backbone with its own labels and features (5), ``aat
compare`` per-method rates with progress (6), and the corrupt-folder / warning fixes (8)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.adapters.demo_assets import BACKBONE_DIR, TASKS_DIR, available
from aat_serve.cli.main import main
from aat_serve.training.compare import parse_rates
from aat_serve.training.data import SC2_WORDS, load_source
from aat_serve.training.feature_defaults import resolve_features
from aat_serve.training.recipes import default_recipe, get_recipe
from tests.training import synth
from tests.training.synth import run_json

pytestmark = pytest.mark.skipif(not available(), reason="demo assets not built")

PRE = json.loads((BACKBONE_DIR / "preprocessor_config.json").read_text())
FAST = ["--epochs", "1", "--batch-size", "4", "--cache-audio", "--json"]


def test_defaults_follow_the_backbone_and_every_run_records_the_source(capsys, tmp_path, pets):
    out = tmp_path / "pets.safetensors"
    s = run_json(capsys, ["train", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                          "demo", "--method", "aat_ms", "--out", str(out), *FAST])
    src = s["feature_sources"]
    assert src["target_length"] == {"value": 100, "source": "backbone"}
    assert src["mean"] == {"value": PRE["mean"], "source": "backbone"}
    assert src["std"] == {"value": PRE["std"], "source": "backbone"}
    assert src["num_mel_bins"] == {"value": 64, "source": "backbone"}
    assert src["sample_rate"] == {"value": 16000, "source": "backbone"}
    f = TaskBundle.load(out).manifest.features
    assert (f["target_length"], f["mean"], f["std"]) == (100, PRE["mean"], PRE["std"])
    config = json.loads((tmp_path / "pets.run" / "config.json").read_text())
    assert config["feature_sources"] == src
    # ... and eval takes --checkpoint demo too.
    ev = run_json(capsys, ["eval", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                           "demo", "--bundle", str(out), "--json"])
    assert ev["clips"] == 2

    # A flag wins over the backbone, and says so.
    s2 = run_json(capsys, ["train", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                           "demo", "--method", "head", "--out", str(tmp_path / "h.safetensors"),
                           "--target-length", "64", *FAST])
    assert s2["feature_sources"]["target_length"] == {"value": 64, "source": "--target-length"}
    assert s2["feature_sources"]["mean"]["source"] == "backbone"


def test_a_paper_recipe_keeps_its_values_and_warns_once(caplog):
    ckpt = load_checkpoint("demo")
    sc2 = get_recipe("sc2")
    with caplog.at_level(logging.WARNING, logger="aat_serve.training"):
        rec, features, src = resolve_features(sc2, set(), ckpt, 64)
    assert (rec.target_length, features.target_length, features.mean) == (128, 128, sc2.mean)
    assert src["target_length"] == {"value": 128, "source": "recipe sc2"}
    warned = [r.getMessage() for r in caplog.records if "differs from the backbone" in r.message]
    assert len(warned) == 1
    assert "target_length 128 (backbone: 100)" in warned[0] and "mean" in warned[0]
    # The generic recipe follows the backbone instead, without a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aat_serve.training"):
        rec, features, src = resolve_features(get_recipe("generic"), set(), ckpt, 64)
    assert (features.target_length, features.mean) == (100, PRE["mean"])
    assert not caplog.records


def test_speech_commands_subset_keeps_the_labels_it_holds(tmp_path, caplog):
    root = synth.make_speech_commands(tmp_path, words=("yes", "no", "backward"))
    with caplog.at_level(logging.WARNING):
        src = load_source("sc2", root)
    assert src.labels == ["backward", "no", "yes"]  # AST's class order, restricted
    assert sorted({i for e in src.examples for i in e.labels}) == [0, 1, 2]
    assert [src.labels[e.labels[0]] for e in src.examples] == [e.key.split("/")[0]
                                                              for e in src.examples]
    msg = next(r.getMessage() for r in caplog.records if "have no clips" in r.message)
    assert "32 of 35 classes have no clips and are left out" in msg
    assert "follow" in msg and "--all-labels" in msg and "yes" not in msg.split(": ", 1)[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        every = load_source("sc2", root, all_labels=True)
    assert every.labels == SC2_WORDS
    assert any("kept by --all-labels" in r.getMessage() for r in caplog.records)


def test_checkpoint_demo_works_for_predict_verify_and_methods(capsys, tmp_path, monkeypatch):
    wav = tmp_path / "tone.wav"
    synth.write_audio(wav, 1)
    digits = str(TASKS_DIR / "digits.safetensors")
    assert main(["predict", str(wav), "--checkpoint", "demo", "--bundle", digits, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert len(row["predictions"]) == 5 and "labels" not in row
    assert main(["bundle", "verify", digits, "--checkpoint", "demo"]) == 0
    assert "ok: bundle 'digits'" in capsys.readouterr().out
    m = run_json(capsys, ["methods", "--checkpoint", "demo", "--classes", "10", "--json"])
    assert m["frames"] == 100 and m["methods"][0]["total"] < 3_000_000  # not ViT-B's 86 M
    vit = run_json(capsys, ["methods", "--classes", "10", "--json"])
    assert vit["methods"][0]["total"] > 80_000_000
    # A file called "demo" is that file, not the shipped backbone.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_bytes(b"junk")
    assert main(["bundle", "verify", digits, "--checkpoint", "demo"]) == 1
    assert "demo" in capsys.readouterr().err


def test_a_full_result_loads_as_a_backbone_with_its_labels_and_features(capsys, tmp_path,
                                                                          pets):
    out = tmp_path / "full.safetensors"
    run_json(capsys, ["train", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                      "demo", "--method", "full", "--out", str(out), *FAST])
    ckpt = load_checkpoint(out)
    assert ckpt.labels == ["cat", "dog"] and ckpt.source_format == "aat-model"
    assert ckpt.backbone.cfg.num_mel_bins == 64  # not the 128 of an original AST file
    assert (ckpt.features.num_mel_bins, ckpt.features.target_length) == (64, 100)
    assert ckpt.features.mean == PRE["mean"] and ckpt.features_recorded
    wav = pets / "dog" / "clip0.wav"
    assert main(["predict", str(wav), "--checkpoint", str(out), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert sorted(p["label"] for p in row["predictions"]) == ["cat", "dog"]
    info = run_json(capsys, ["bundle", "inspect", str(out), "--json"])
    assert info["format"] == "aat-model/1" and info["manifest"]["labels"] == ["cat", "dog"]
    assert main(["bundle", "inspect", str(out)]) == 0
    assert "method full" in capsys.readouterr().out
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\0" * 4)
    assert main(["bundle", "inspect", str(junk)]) == 1


def test_compare_uses_each_methods_rate_and_shows_progress(capfd, tmp_path, pets):
    assert parse_rates([], ["head", "full"]) == {}
    assert parse_rates(["full=1e-5", "1e-3"], ["head", "full"]) == {"head": 1e-3, "full": 1e-5}
    with pytest.raises(ValueError, match="'aat_m' is not among the compared methods"):
        parse_rates(["aat_m=1e-3"], ["head", "full"])
    rc = main(["compare", "--dataset", "folder", "--root", str(pets), "--checkpoint", "demo",
               "--methods", "head,full", "--lr", "full=0.001", "--out-dir", str(tmp_path / "c"),
               "--epochs", "1", "--batch-size", "4"])
    _out, err = capfd.readouterr()
    assert rc == 0, err
    assert "training head (1/2, the recipe's lr)" in err and "training full (2/2, lr 0.001)" in err
    assert "epoch 1/1" in err  # the child's progress bar
    lr = {m: json.loads((tmp_path / "c" / f"{m}.run" / "config.json").read_text())["recipe"]["lr"]
          for m in ("head", "full")}
    assert lr == {"head": default_recipe("folder", "head").lr, "full": 0.001}
    assert lr["head"] == 1e-2 != get_recipe("generic").lr  # the generic recipe's head rate


def test_corrupt_folder_names_every_bad_file_and_the_cli_flag(capsys, tmp_path):
    root = synth.make_folder(tmp_path, per_label=3)
    bad = sorted(str(root / "cat" / f"bad{i:02d}.wav") for i in range(23))
    for p in bad:
        Path(p).write_bytes(b"RIFF\0\0")
    rc = main(["train", "--dataset", "folder", "--root", str(root), "--checkpoint", "demo",
               "--method", "head", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "23 file(s) are not readable audio" in err
    assert all(p in err for p in bad[:20]) and bad[20] not in err and "and 3 more" in err
    assert "--skip-bad-audio" in err and "on_bad_audio" not in err
    # From Python the hint names the argument.
    with pytest.raises(ValueError, match="on_bad_audio='skip'"):
        load_source("folder", root)


def test_training_with_progress_bars_raises_no_autograd_warning(tmp_path, pets):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                     "demo", "--method", "head", "--out", str(tmp_path / "h.safetensors"),
                     "--progress", *FAST]) == 0
    assert not [w for w in caught if "requires_grad" in str(w.message)]


def test_an_empty_valid_or_test_split_is_said_before_training(caplog):
    import logging

    from aat_serve.training.api import warn_empty_splits

    with caplog.at_level(logging.WARNING):
        assert warn_empty_splits("folder", {"train": [1, 2, 3], "valid": [4], "test": []}) \
            == ["test"]
    assert "folder: the test split is empty (3 training clips): no test figures" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the differs check: nothing to say
        assert warn_empty_splits("folder", {"train": [1], "valid": [2], "test": [3]}) == []
    assert caplog.text == ""
