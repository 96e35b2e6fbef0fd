"""``aat bundle inspect | verify | from-checkpoint``: output, files written and exit statuses."""

from __future__ import annotations

import json

import pytest
import torch

from aat_serve.adapters.bundle import TaskBundle
from aat_serve.adapters.checkpoints import load_checkpoint, read_label_csv
from aat_serve.adapters.config import BackboneConfig
from aat_serve.cli.main import main
from tests.adapters.ckpt_factory import (
    AUDIOSET_CSV,
    SPEECHCOMMANDS_CSV,
    random_canonical,
    write_hf_dir,
    write_original,
    write_ssast,
)

CFG = BackboneConfig(embed_dim=64, depth=1, num_heads=1, mlp_hidden=64, target_length=128)
SC = read_label_csv(SPEECHCOMMANDS_CSV)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    canon = random_canonical(CFG, 35, seed=1)
    other = random_canonical(CFG, 527, seed=2)
    pre = {"max_length": 128, "mean": -6.845978, "std": 5.5654526, "num_mel_bins": 128,
           "sampling_rate": 16000}
    return {"hf": write_hf_dir(d / "hf", canon, CFG, SC, preprocessor=pre),
            "ast": write_original(d / "sc.pth", canon),
            "other": write_original(d / "as.pth", other),
            "ssast": write_ssast(d / "ssast.pth", frame=False)[0]}


def _export(capsys, ckpts, tmp_path, *extra, checkpoint="hf", name="sc.safetensors"):
    out = tmp_path / name
    rc = main(["bundle", "from-checkpoint", "--checkpoint", str(ckpts[checkpoint]),
               "--task", "speech-commands", "--out", str(out), "--json", *extra])
    captured = capsys.readouterr()
    return rc, out, captured


def test_from_checkpoint_hf_uses_id2label_and_preprocessor(capsys, ckpts, tmp_path):
    rc, out, cap = _export(capsys, ckpts, tmp_path)
    assert rc == 0, cap.err
    info = json.loads(cap.out)
    bundle = TaskBundle.load(out)
    m = bundle.manifest
    assert info["out"] == str(out) and info["classes"] == 35 and info["version"] == m.version
    assert info["source_format"] == "hf" and info["multi_label"] is False
    assert (m.task, m.method, m.labels) == ("speech-commands", "head", SC)
    assert (m.features["mean"], m.features["std"], m.features["target_length"]) == (
        -6.845978, 5.5654526, 128)
    ckpt = load_checkpoint(ckpts["hf"])
    assert m.backbone_fingerprint == ckpt.backbone.fingerprint()
    assert torch.equal(bundle.tensors["head.fc.weight"], ckpt.head["fc.weight"])
    x = 0.5 * torch.randn(2, 128, 128)
    with torch.no_grad():
        assert torch.equal(bundle.build_model(ckpt.backbone)(x), ckpt.logits(x))


def test_from_checkpoint_labels_and_options(capsys, ckpts, tmp_path):
    # Original .pth: no id2label -> "0".."34"; --labels CSV wins; overrides reach the manifest.
    rc, out, cap = _export(capsys, ckpts, tmp_path, checkpoint="ast")
    assert rc == 0, cap.err
    assert TaskBundle.load(out).manifest.labels == [str(i) for i in range(35)]
    rc, out, cap = _export(capsys, ckpts, tmp_path, "--labels", str(SPEECHCOMMANDS_CSV),
                           "--multi-label", "--target-length", "100", "--mean", "-6.8",
                           "--std", "5.5", checkpoint="ast", name="b.safetensors")
    assert rc == 0, cap.err
    m = TaskBundle.load(out).manifest
    assert m.labels == SC and m.multi_label is True
    assert (m.features["target_length"], m.features["mean"], m.features["std"]) == (100, -6.8, 5.5)
    # Text output names the file and the class count.
    out3 = tmp_path / "c.safetensors"
    assert main(["bundle", "from-checkpoint", "--checkpoint", str(ckpts["other"]), "--task",
                 "audioset", "--out", str(out3)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out3}" in text and "527 classes (multi-label)" in text


@pytest.mark.parametrize(("args", "message"), [
    (["--labels", str(AUDIOSET_CSV)], "527 labels given for a head with 35 classes"),
    (["--std", "-1"], "FeatureConfig.std must be positive"),
])
def test_from_checkpoint_errors(capsys, ckpts, tmp_path, args, message):
    rc, out, cap = _export(capsys, ckpts, tmp_path, *args)
    # --json: the API's error body on stdout (issue 22), nothing on stderr.
    error = json.loads(cap.out)["error"]
    assert rc == 1 and message in error["message"] and not out.exists()
    assert error["type"] == "invalid_request" and cap.err == ""


def test_from_checkpoint_without_head_or_bad_inputs(capsys, ckpts, tmp_path):
    out = tmp_path / "x.safetensors"
    cases = [
        (["--checkpoint", str(ckpts["ssast"]), "--task", "t"], "has no classification head"),
        (["--checkpoint", str(tmp_path / "absent.pth"), "--task", "t"], "does not exist"),
        (["--checkpoint", str(ckpts["hf"]), "--task", "Not Valid"], "invalid task name"),
    ]
    for args, message in cases:
        assert main(["bundle", "from-checkpoint", *args, "--out", str(out)]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()
    with pytest.raises(SystemExit) as e:  # argparse: --target-length must be positive
        main(["bundle", "from-checkpoint", "--checkpoint", str(ckpts["hf"]), "--task", "t",
              "--out", str(out), "--target-length", "0"])
    assert e.value.code == 2


def test_inspect_text_and_json(capsys, ckpts, tmp_path):
    rc, out, _ = _export(capsys, ckpts, tmp_path)
    assert rc == 0
    assert main(["bundle", "inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    bundle = TaskBundle.load(out)
    assert info["manifest"] == bundle.manifest.to_dict()
    assert info["file_bytes"] == out.stat().st_size
    assert {t["name"]: (t["shape"], t["dtype"]) for t in info["tensors"]} == {
        "head.fc.bias": ([35], "float32"), "head.fc.weight": ([35, 64], "float32"),
        "head.norm.bias": ([64], "float32"), "head.norm.weight": ([64], "float32")}
    assert info["parameters"] == 35 * 64 + 35 + 2 * 64
    assert info["tensor_bytes"] == 4 * info["parameters"]
    assert main(["bundle", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "task       speech-commands" in text and "method head" in text
    assert "35 (single-label): backward; follow; five" in text
    assert "head.fc.weight" in text and "(35, 64)" in text
    assert bundle.manifest.backbone_fingerprint in text


def test_inspect_rejects_non_bundles(capsys, ckpts, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a bundle at all")
    assert main(["bundle", "inspect", str(junk)]) == 1
    assert "not a safetensors file" in capsys.readouterr().err
    assert main(["bundle", "inspect", str(tmp_path / "absent.safetensors")]) == 1
    assert "cannot read bundle" in capsys.readouterr().err


def test_verify_exit_statuses(capsys, ckpts, tmp_path):
    rc, out, _ = _export(capsys, ckpts, tmp_path)
    assert rc == 0
    # The HF directory and the original .pth of the same weights are the same backbone.
    for name in ("hf", "ast"):
        assert main(["bundle", "verify", str(out), "--checkpoint", str(ckpts[name])]) == 0
        assert capsys.readouterr().out.startswith("ok: bundle 'speech-commands' (head")
    assert main(["bundle", "verify", str(out), "--checkpoint", str(ckpts["other"])]) == 1
    err = capsys.readouterr().err
    assert "does not fit checkpoint" in err and "was trained on backbone" in err
    assert main(["bundle", "verify", str(out), "--checkpoint", str(ckpts["other"]),
                 "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert result["bundle_fingerprint"] != result["checkpoint_fingerprint"]
    assert main(["bundle", "verify", str(out), "--checkpoint", str(ckpts["hf"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True
    assert result["bundle_fingerprint"] == result["checkpoint_fingerprint"]
    # Unreadable checkpoint or bundle: exit 1 with the reason.
    assert main(["bundle", "verify", str(out), "--checkpoint", str(tmp_path / "no.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["bundle", "verify", str(tmp_path / "no.safetensors"), "--checkpoint",
                 str(ckpts["hf"])]) == 1
    assert "cannot read bundle" in capsys.readouterr().err


def test_bundle_without_action_prints_help(capsys):
    assert main(["bundle"]) == 2
    out = capsys.readouterr().out
    assert "inspect" in out and "verify" in out and "from-checkpoint" in out
