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


def test_slot_width_sizes_the_pool_rows_and_bounds_the_bundles():
    """AAT_SLOT_WIDTH: a row is that wide (device bytes per task follow it), narrower adapters
    load and give the same scores as in a wider pool, wider ones are refused."""
    from tests.helpers import random_bundle

    base = tiny_backbone(seed=0)
    cpu = torch.device("cpu")
    fp = base.fingerprint()
    wide = build_model(load_settings(), copy.deepcopy(base), cpu, torch.float32, fp)
    narrow = build_model(load_settings(slot_width=8), copy.deepcopy(base), cpu, torch.float32,
                         fp)
    assert load_settings().slot_width == 192
    d, depth = base.cfg.embed_dim, base.cfg.depth  # MLP and spatial pools, fp32 rows of
    for m, r in ((wide, 192), (narrow, 8)):        # W_down, b_down, W_up, b_up
        assert m.slots.row_nbytes == 2 * depth * (2 * d * r + r + d) * 4
    small = random_bundle(base, "small", bottleneck=8, seed=1)
    for m in (wide, narrow):
        m.load_task(small)
    x = torch.randn(2, 64, base.cfg.num_mel_bins)
    with torch.inference_mode():
        a, b = wide.classify(x, ["small"] * 2), narrow.classify(x, ["small"] * 2)
    torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-5, atol=1e-5)
    big = random_bundle(base, "big", bottleneck=16, seed=2)
    with pytest.raises(Exception, match=r"adapters of bottleneck 16, larger than this model's "
                                         r"slot width 8"):
        narrow.load_task(big)
    wide.load_task(big)
    with torch.inference_mode():
        assert not torch.allclose(torch.stack(wide.classify(x, ["big"] * 2)), torch.stack(a))
