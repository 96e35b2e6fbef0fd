"""Every candidate kernel configuration compiles for sm_90, fits its shared memory and
pipelines its K loops (``kernel_compile.py``; no GPU needed, Triton's bundled ptxas)."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the kernels were built for the interpreter"),
]


def configs():
    from aat_serve.adapters.kernels.autotune import Bucket
    from aat_serve.adapters.kernels.candidates import fused_configs, sgmv_configs, spatial_configs

    found = {}
    for rows in (2048, 65536):  # one clip, 32 clips of 1214 tokens
        b = Bucket("mlp", 768, 3072, 192, "bfloat16", "bfloat16", rows, 4)
        for c in [*fused_configs(b, tma=True), *sgmv_configs(b), *spatial_configs(b)]:
            found[c.name] = c
    return list(found.values())


def test_every_candidate_compiles_for_hopper():
    from tests.adapters.kernel_compile import H100_SHARED_BYTES, compile_config

    if not _has_ptxas():
        pytest.skip("this Triton has no bundled ptxas")
    report = {}
    for c in configs():
        for k in compile_config(c):
            report[f"{c.name}/{k.kernel}"] = k
    assert len(report) >= 20
    for name, k in report.items():
        assert k.shared <= H100_SHARED_BYTES, (name, k)
        if k.kernel != "_reduce":  # every GEMM's K loop is pipelined (cp.async stages)
            assert k.async_copies > 0, (name, k)
    kernels = {k.kernel for k in report.values()}
    assert kernels == {"_k1_up", "_k2_down", "_reduce", "_shrink", "_expand", "_spatial"}


def _has_ptxas() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return bool(get_ptxas(90).path)
    except Exception:
        return False
