"""`aat methods` and the method table: trainable counts of a ViT-B/16 stride-10 AST.

The expected numbers come from the issue (ESC-50: 50 classes, 512 frames) and from the
building-block formula of reference/ast-aat-facts.md section 1.6, computed here independently.
"""

from __future__ import annotations

import json

import pytest

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.methods import BUNDLE_METHODS, METHODS, get_method
from aat_serve.cli.main import main

ESC50 = {"full": 85_757_234, "head": 39_986, "partial": 42_567_218, "prompt": 150_578,
         "aat_m": 3_590_450, "aat_ms": 7_140_914, "joint": 7_251_506}

# Building blocks of a ViT-B/16 AST (facts section 1.6).
BLOCK = 7_087_872
PATCH_EMBED = 197_376
TOKENS = 1_536
FINAL_NORM = 1_536
ADAPTER = 295_872
DEIT_HEADS = 1_538_000  # unused DeiT heads: counted in AST's logs, absent from our model


def formula(classes: int, frames: int) -> dict[str, int]:
    """Trainable counts from the facts file's building blocks (12 blocks, 768 wide)."""
    f_dim = (128 - 16) // 10 + 1
    t_dim = (frames - 16) // 10 + 1
    head = 1_536 + 769 * classes
    pos = (f_dim * t_dim + 2) * 768
    prompts = 12 * 12 * 768  # 12 VPT-deep tokens in each of 12 blocks
    return {
        "full": 12 * BLOCK + PATCH_EMBED + TOKENS + FINAL_NORM + pos + head,
        "head": head,
        "partial": 6 * BLOCK + head,
        "prompt": prompts + head,
        "aat_m": 12 * ADAPTER + head,
        "aat_ms": 24 * ADAPTER + head,
        "joint": 24 * ADAPTER + prompts + head,
    }


def run_json(capsys, *argv: str) -> dict:
    assert main(["methods", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_formula_reproduces_the_facts_table():
    # The facts table's "total (Full)" includes the unused DeiT heads (1,538,000).
    assert formula(50, 512)["full"] + DEIT_HEADS == 87_295_234
    assert formula(35, 128)["full"] + DEIT_HEADS == 86_933_491
    assert formula(20, 1024)["aat_ms"] == 7_117_844
    assert formula(10, 400)["partial"] == 42_536_458
    assert formula(50, 512) == ESC50


def test_methods_text_esc50(capsys):
    assert main(["methods", "--classes", "50", "--frames", "512"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:] if line.strip()}
    assert rows == {name: f"{n:,}" for name, n in ESC50.items()}
    assert "stride 10" in out and "512 frames" in out and "50 classes" in out


def test_methods_json_esc50(capsys):
    data = run_json(capsys, "--classes", "50", "--frames", "512")
    assert (data["classes"], data["frames"], data["stride"]) == (50, 512, 10)
    got = {r["method"]: r["trainable"] for r in data["methods"]}
    assert got == ESC50
    assert [r["method"] for r in data["methods"]] == list(METHODS)
    by_name = {r["method"]: r for r in data["methods"]}
    # The total counts every parameter of the model built for that method.
    assert by_name["full"]["total"] == ESC50["full"]
    assert by_name["aat_ms"]["total"] == ESC50["full"] + 24 * ADAPTER
    assert by_name["prompt"]["total"] == ESC50["full"] + 12 * 12 * 768
    assert {r["method"] for r in data["methods"] if r["bundle"]} == set(BUNDLE_METHODS)


@pytest.mark.parametrize("classes,frames", [(35, 128), (10, 400), (527, 1024)])
def test_methods_other_tasks_match_formula(capsys, classes, frames):
    data = run_json(capsys, "--classes", str(classes), "--frames", str(frames))
    got = {r["method"]: r["trainable"] for r in data["methods"]}
    assert got == formula(classes, frames)
    if (classes, frames) == (35, 128):  # SC-v2 row of the facts table
        assert got["aat_ms"] == 7_129_379 and got["prompt"] == 139_043
    assert got != formula(classes + 1, frames)


def test_methods_bad_arguments_are_clear_errors(capsys):
    assert main(["methods", "--classes", "0"]) == 1
    assert "num_classes must be positive, got 0" in capsys.readouterr().err
    assert main(["methods", "--frames", "8"]) == 1
    assert "clips need at least 16 frames, got 8" in capsys.readouterr().err


def test_method_registry():
    assert list(METHODS) == ["full", "head", "partial", "prompt", "aat_m", "aat_ms", "joint"]
    assert set(BUNDLE_METHODS) == {"head", "prompt", "aat_m", "aat_ms", "joint"}
    assert get_method("aat_ms").adapters.spatial and get_method("aat_ms").adapters.mlp
    assert not get_method("aat_m").adapters.spatial
    assert get_method("joint").adapters.num_prompts == 12
    with pytest.raises(ConfigError, match=r"unknown method 'lora'; expected one of full, head"):
        get_method("lora")
