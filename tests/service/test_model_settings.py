"""AAT_RESIDUAL_DTYPE and AAT_CUDA_GRAPHS: parsed, validated, and honoured by build_model."""

from __future__ import annotations

import copy

import pytest
import torch

from aat_serve.adapters.errors import ConfigError
from aat_serve.service.runtime import build_model
from aat_serve.service.settings import load_settings
from tests.helpers import tiny_backbone


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("DTYPE", "RESIDUAL_DTYPE", "CUDA_GRAPHS", "RUNTIME", "MAX_BATCH"):
        monkeypatch.delenv(f"AAT_{name}", raising=False)


def test_defaults_and_environment(monkeypatch):
    s = load_settings()
    assert (s.residual_dtype, s.cuda_graphs) == ("float32", "auto")
    monkeypatch.setenv("AAT_DTYPE", "bfloat16")
    monkeypatch.setenv("AAT_RESIDUAL_DTYPE", "BFloat16")
    monkeypatch.setenv("AAT_CUDA_GRAPHS", "Off")
    s = load_settings()
    assert (s.residual_dtype, s.cuda_graphs) == ("bfloat16", "off")


@pytest.mark.parametrize("env,message", [
    ({"AAT_CUDA_GRAPHS": "yes"},
     "AAT_CUDA_GRAPHS: Input should be 'auto', 'on' or 'off' (got 'yes')"),
    ({"AAT_RESIDUAL_DTYPE": "float16"},
     "AAT_RESIDUAL_DTYPE: Input should be 'float32' or 'bfloat16' (got 'float16')"),
    ({"AAT_RESIDUAL_DTYPE": "bfloat16"},
     "settings: AAT_RESIDUAL_DTYPE=bfloat16 needs AAT_DTYPE=bfloat16 (the stream is kept in "
     "the GEMMs' dtype or in float32)"),
])
def test_bad_values_name_the_variable(monkeypatch, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert str(e.value) == f"invalid configuration: {message}"


def test_build_model_honours_the_settings():
    base = tiny_backbone(seed=0)
    cpu = torch.device("cpu")
    plain = build_model(load_settings(), copy.deepcopy(base), cpu, torch.float32, "fp")
    assert plain.graphs is None and plain.residual_dtype == torch.float32  # auto: CPU, none
    bf16 = build_model(load_settings(dtype="bfloat16", residual_dtype="bfloat16"),
                       copy.deepcopy(base), cpu, torch.bfloat16, "fp")
    assert bf16.residual_dtype == torch.bfloat16 and bf16.runner.residual == torch.bfloat16
    with pytest.raises(ConfigError, match=r"^CUDA graphs need a CUDA device and the triton "
                                          r"backend, got cpu and segments; use auto or off$"):
        build_model(load_settings(cuda_graphs="on"), copy.deepcopy(base), cpu, torch.float32,
                    "fp")
