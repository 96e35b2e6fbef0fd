"""``aat train`` / ``aat eval`` / ``aat compare`` end to end on a tiny Hugging Face checkpoint."""

from __future__ import annotations

import json

import pytest

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint
from aat_serve.cli.main import main
from aat_serve.training.compare import comparison_rows, markdown_table
from tests.training import synth
from tests.training.synth import run_json

SMALL = ["--epochs", "1", "--batch-size", "2", "--target-length", "64", "--freqm", "4",
         "--timem", "8", "--cache-audio"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return synth.write_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-ast")


def test_train_then_eval_round_trip(capsys, tmp_path, hf, pets):
    out = tmp_path / "pets.safetensors"
    argv = ["train", "--dataset", "folder", "--root", str(pets), "--checkpoint", str(hf),
            "--method", "aat_ms", "--out", str(out), *SMALL, "--lr", "0.002", "--json"]
    summary = run_json(capsys, argv)
    assert summary["out"] == str(out) and summary["epochs"] == 1
    assert summary["run_dir"] == str(tmp_path / "pets.run")
    bundle = TaskBundle.load(out)  # what PUT /tasks/<task> accepts
    m = bundle.manifest
    assert (m.task, m.method, m.labels) == ("mydata", "aat_ms", ["cat", "dog"])
    assert m.features["num_mel_bins"] == 32 and m.features["target_length"] == 64
    assert m.recipe["lr"] == 0.002 and m.recipe["name"] == "generic"
    assert m.metrics["test"]["acc"] == summary["test"]["acc"]
    bundle.check_backbone(load_checkpoint(hf).backbone)  # fits the backbone it came from
    assert m.adapter["bottleneck"] == 8  # width 32 / 4, as AAT's 768 -> 192

    ev = run_json(capsys, ["eval", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                           str(hf), "--bundle", str(out), "--json"])
    assert ev["clips"] == 2 and ev["split"] == "test"
    for k in ("acc", "mAP", "mAUC", "loss"):
        assert ev["metrics"][k] == pytest.approx(summary["test"][k], abs=1e-6), k
    assert [r["label"] for r in ev["per_class"]] == ["cat", "dog"]

    assert main(["eval", "--dataset", "folder", "--root", str(pets), "--checkpoint", str(hf),
                 "--bundle", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mydata [aat_ms] on folder test, 2 clips: acc" in text
    assert "precision" in text and text.count("\ncat ") == 1 and text.count("\ndog ") == 1

    # Running the same command again resumes the finished run: same result, no new epoch.
    again = run_json(capsys, argv)
    assert again["test"] == summary["test"] and again["best_epoch"] == summary["best_epoch"]


def test_full_method_writes_a_whole_model_that_evaluates_without_a_backbone(capsys, tmp_path,
                                                                            hf, pets):
    out = tmp_path / "full.safetensors"
    summary = run_json(capsys, ["train", "--dataset", "folder", "--root", str(pets),
                                "--checkpoint", str(hf), "--method", "full", "--out", str(out),
                                "--task", "pets-full", *SMALL, "--json"])
    assert summary["trainable_params"] == summary["total_params"]
    ev = run_json(capsys, ["eval", "--dataset", "folder", "--root", str(pets),
                           "--bundle", str(out), "--json"])
    assert ev["task"] == "pets-full" and ev["method"] == "full"
    assert ev["metrics"]["loss"] == pytest.approx(summary["test"]["loss"], abs=1e-6)


def test_errors_are_one_clear_line(capsys, tmp_path, hf, pets):
    base = ["--checkpoint", str(hf), "--method", "head", "--out", str(tmp_path / "x.st")]
    assert main(["train", "--dataset", "folder", "--root", str(tmp_path / "nope"), *base]) == 1
    assert "error: folder data set root" in capsys.readouterr().err
    esc = synth.make_esc50(tmp_path)
    assert main(["train", "--dataset", "esc50", "--root", str(esc), *base]) == 1
    assert "choose a held-out fold (--fold K) or --cv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "esc50", "--root", str(esc), *base, "--fold", "1", "--cv"])
    assert e.value.code == 2
    assert main(["train", "--dataset", "folder", "--root", str(pets), *base,
                 "--mixup", "0.5"]) == 1
    assert "use loss 'bce' with mixup > 0" in capsys.readouterr().err
    assert main(["train", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                 str(tmp_path / "missing"), "--method", "head", "--out", "x"]) == 1
    assert "error:" in capsys.readouterr().err


def test_eval_refuses_a_bundle_for_other_labels_or_another_backbone(capsys, tmp_path, hf, pets):
    out = tmp_path / "pets.safetensors"
    run_json(capsys, ["train", "--dataset", "folder", "--root", str(pets), "--checkpoint",
                      str(hf), "--method", "head", "--out", str(out), *SMALL, "--json"])
    other = synth.make_folder(tmp_path / "birds", labels=("crow", "owl"), lists="all")
    assert main(["eval", "--dataset", "folder", "--root", str(other), "--checkpoint", str(hf),
                 "--bundle", str(out)]) == 1
    assert "labels that differ from folder's 2 (first difference at index 0)" in \
        capsys.readouterr().err
    hf2 = synth.write_hf_checkpoint(tmp_path / "other-ast", seed=1)
    assert main(["eval", "--dataset", "folder", "--root", str(pets), "--checkpoint", str(hf2),
                 "--bundle", str(out)]) == 1
    assert "was trained on backbone" in capsys.readouterr().err


def test_compare_table_from_train_summaries():
    def run(metric, test, trainable):
        return {"metric": metric, "test": {metric: test}, "best_metric": 0.5,
                "trainable_params": trainable, "total_params": 1000, "epoch_time_s": 2.0,
                "peak_memory_mb": 300.0}

    rows = comparison_rows({"head": run("acc", 0.5, 10), "full": run("acc", 0.75, 1000),
                            "aat_ms": {"cv": {"mean": 0.9}, "folds": {
                                "1": run("acc", 0.8, 100), "2": run("acc", 0.7, 100)}}})
    assert [(r["method"], r["value"], r["split"], r["bundle"]) for r in rows] == [
        ("head", 0.5, "test", True), ("full", 0.75, "test", False), ("aat_ms", 0.9, "cv", True)]
    md = markdown_table(rows, "t")
    assert "| aat_ms | 100 | 10.000 | acc (cv) 0.9000 | 2.00 | 300 | bundle |" in md
    assert "| full | 1,000 | 100.000 | acc (test) 0.7500 | 2.00 | 300 | whole model |" in md


def test_compare_runs_each_method_in_its_own_process(capsys, tmp_path, hf, pets):
    rc = main(["compare", "--dataset", "folder", "--root", str(pets), "--checkpoint", str(hf),
               "--methods", "head,aat_m", "--out-dir", str(tmp_path / "cmp"), *SMALL,
               "--no-amp", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = json.loads(out.out)["rows"]
    assert [r["method"] for r in rows] == ["head", "aat_m"]
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    assert all(r["peak_memory_mb"] > 0 and r["epoch_time_s"] > 0 for r in rows)
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| head |" in table and "| aat_m |" in table
    for m in ("head", "aat_m"):
        assert TaskBundle.load(tmp_path / "cmp" / f"{m}.safetensors").manifest.method == m
