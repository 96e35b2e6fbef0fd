"""Compile the Triton kernels for a Hopper GPU (sm_90) on a machine without one.

Triton's wheel carries ``ptxas``, so ``triton.compile`` can lower a kernel to a cubin with no
driver. That checks what the interpreter cannot: that every candidate configuration compiles
(control flow, layouts), fits the SM's shared memory, and that its K loops are software
pipelined (asynchronous copies), with the specialisation a real launch gets (pointers and
sizes divisible by 16, as at ViT-B widths; the row and tile counts and grid size not).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

H100_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on sm_90
_I32_PTRS = {"t_start", "t_end", "t_slot", "slot_ptr"}
_NOT_DIVISIBLE = {"T", "NUM_PROGS", "M"}


@dataclass(frozen=True)
class Compiled:
    kernel: str
    shared: int
    async_copies: int  # cp.async or TMA copies: the K loop is software pipelined


def compile_sm90(fn, constants: dict, num_warps: int, num_stages: int,
                 dtype: str = "bf16") -> Compiled:
    """Compile ``fn`` (a ``@triton.jit`` function) with ``constants`` for its constexprs."""
    signature, attrs, constexprs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[(i,)] = constants[p.name]
            continue
        if p.name in _I32_PTRS:
            signature[p.name] = "*i32"
        elif p.name == "part_ptr":
            signature[p.name] = "*fp32"
        else:
            signature[p.name] = f"*{dtype}" if p.name.endswith("_ptr") else "i32"
        if p.name not in _NOT_DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ir = k.asm["ttgir"]
    return Compiled(fn.__name__, k.metadata.shared,
                    ir.count("async_copy_global_to_local") + ir.count("async_tma_copy"))


def compile_config(config) -> list[Compiled]:
    """Every kernel a candidate configuration launches at ViT-B sizes in bf16 (rank 192)."""
    from aat_serve.adapters.kernels import triton_fused, triton_sgmv, triton_spatial
    from aat_serve.adapters.kernels.triton_fused import FusedConfig
    from aat_serve.adapters.kernels.triton_sgmv import SgmvConfig

    c = config
    dots = {"CAST_F32": False, "PRECISION": "tf32"}
    w, s = c.num_warps, c.num_stages
    if isinstance(c, FusedConfig):
        tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
        tiles["USE_TMA"] = c.tma
        out = [compile_sm90(triton_fused._k1_up, {**tiles, "BLOCK_R": c.block_r, **dots}, w, s),
               compile_sm90(triton_fused._k2_down, {**tiles, "SPLIT_K": c.split_k,
                                                    "HAS_B2": True, **dots}, w, s)]
        if c.split_k > 1:
            out.append(compile_sm90(triton_fused._reduce, dict(
                BLOCK_M=64, BLOCK_N=64, SPLIT_K=c.split_k, HAS_B2=True), 4, 1))
        return out
    if isinstance(c, SgmvConfig):
        return [compile_sm90(triton_sgmv._shrink, dict(
                    BLOCK_M=c.block_m, BLOCK_R=c.block_r, BLOCK_K=c.block_k, GROUP_M=c.group_m,
                    **dots), w, s),
                compile_sm90(triton_sgmv._expand, dict(
                    BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=min(c.block_k, 64),
                    GROUP_M=c.group_m, HAS_BASE=True, **dots), w, s)]
    return [compile_sm90(triton_spatial._spatial, dict(
        BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        R_PAD=triton_spatial.rank_pad(192), **dots), w, s)]
