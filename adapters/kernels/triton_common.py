"""What every Triton kernel module shares: GELU, tile ordering, dot precision, operand checks.

Importing this module needs Triton. ``TRITON_INTERPRET=1`` must be set before the first
import of any kernel module to get Triton's interpreter (CPU tensors). ``CAST_F32`` upcasts
tiles before ``tl.dot`` because the interpreter multiplies bf16 bit patterns (triton#11584).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, fields

import torch
import triton
import triton.language as tl

from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.kernels.layout import AdapterPool, MlpWeights

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETED_PROGRAMS = 3  # persistent grids under the interpreter: small, so the loop runs


@triton.jit
def gelu(x):
    """Exact (erf) GELU, as the model's ``nn.GELU()``."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def grouped_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of work item ``pid``: GROUP_M row tiles share each column tile
    in turn, so a column of weights is reused from L2 across neighbouring programs."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def mma(acc, a, b, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in fp32 (tiles upcast first under ``CAST_F32``)."""
    if CAST_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def dot_tile(acc, a_ptr, rows, stride_am, m_mask, b_ptr, stride_bk, stride_bn, offs_n, n_mask,
             kk, k_end, CAST_F32: tl.constexpr, PRECISION: tl.constexpr):
    """One K block of a masked tile product: ``acc + A[rows, kk] @ B[kk, offs_n]``, where A's
    rows are ``stride_am`` apart (unit columns) and B is addressed by ``stride_bk`` and
    ``stride_bn`` (either may be 1); rows outside the tile, ``kk`` from ``k_end`` on and
    columns outside ``n_mask`` read as zero. The K loop of every kernel here without TMA."""
    a = tl.load(a_ptr + rows[:, None] * stride_am + kk[None, :],
                mask=m_mask[:, None] & (kk[None, :] < k_end), other=0.0)
    b = tl.load(b_ptr + kk[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=(kk[:, None] < k_end) & n_mask[None, :], other=0.0)
    return mma(acc, a, b, CAST_F32, PRECISION)


def is_interpreted() -> bool:
    """True when Triton kernels run under the interpreter (TRITON_INTERPRET=1 at import)."""
    return type(gelu).__name__ == "InterpretedFunction"


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (persistent grids launch this many)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, work: int, per_sm: int) -> int:
    """Programs for a persistent launch of ``work`` items: ``per_sm`` per SM, at most ``work``.
    ``per_sm = 0`` means one program per item (not persistent)."""
    if per_sm <= 0 or work == 0:
        return max(work, 1)
    if device.type != "cuda":  # the interpreter: a small grid still exercises the loop
        return max(1, min(work, INTERPRETED_PROGRAMS))
    return max(1, min(work, per_sm * sm_count(device.index or 0)))


def dot_options(dtype: torch.dtype, cast_f32: bool | None) -> dict:
    """``CAST_F32`` and ``PRECISION`` meta-parameters for operands of ``dtype``.

    fp32 operands use exact IEEE dots unless torch allows TF32 for matmuls; bf16 under the
    interpreter is upcast (its interpreted dot is wrong).
    """
    if cast_f32 is None:
        cast_f32 = is_interpreted() and dtype == torch.bfloat16
    exact = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return {"CAST_F32": bool(cast_f32), "PRECISION": "ieee" if exact else "tf32"}


def launch_options(num_warps: int, num_stages: int) -> dict:
    """``num_warps`` / ``num_stages`` for a compiled launch (the interpreter takes none)."""
    return {} if is_interpreted() else {"num_warps": num_warps, "num_stages": num_stages}


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (the kernels take a row stride but
    assume unit column stride), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


_VALIDATED: set[tuple] = set()


def _signature(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors)


def check_operands(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None,
                   pool: AdapterPool, row_slot: torch.Tensor) -> None:
    """Raise ``ConfigError`` for operands the kernels cannot take. Each distinct signature
    (shapes, dtypes, devices) is checked once; later calls cost one set lookup."""
    mlp_t = (mlp.w1, mlp.b1, mlp.w2, mlp.b2) if mlp is not None else (None,)
    key = _signature(x, h, row_slot, *pool.tensors(), *mlp_t)
    if key in _VALIDATED:
        return
    _check(x, h, mlp, pool, row_slot)
    if len(_VALIDATED) > 4096:  # a long-running process with ever-new shapes
        _VALIDATED.clear()
    _VALIDATED.add(key)


def _check(x: torch.Tensor, h: torch.Tensor, mlp: MlpWeights | None, pool: AdapterPool,
           row_slot: torch.Tensor) -> None:
    if x.dim() != 2 or h.shape != x.shape:
        raise ConfigError(f"x and h must both be (M, D); got {tuple(x.shape)} and "
                          f"{tuple(h.shape)}")
    tensors = [*pool.tensors()] + ([mlp.w1, mlp.b1, mlp.w2, mlp.b2] if mlp else [])
    for t in tensors:
        if t.dtype != h.dtype or t.device != h.device:
            raise ConfigError(f"all kernel operands must be {h.dtype} on {h.device}; got "
                              f"{t.dtype} on {t.device}")
    if h.dtype not in KERNEL_DTYPES:
        raise ConfigError(f"kernel dtype must be float32, float16 or bfloat16, got {h.dtype}")
    if x.dtype not in (h.dtype, torch.float32) or x.device != h.device:
        raise ConfigError(f"the residual x must be {h.dtype} or float32 on {h.device}, got "
                          f"{x.dtype} on {x.device}")
    if pool.dim != x.shape[1]:
        raise ConfigError(f"adapter pool width {pool.dim} does not match rows of width "
                          f"{x.shape[1]}")
    if mlp is not None and (mlp.w1.shape[1] != x.shape[1] or mlp.w2.shape[0] != x.shape[1]):
        raise ConfigError(f"MLP weights {tuple(mlp.w1.shape)} / {tuple(mlp.w2.shape)} do not "
                          f"match rows of width {x.shape[1]}")
    if row_slot.shape != (x.shape[0],) or row_slot.dtype != torch.int32:
        raise ConfigError(f"row_slot must be int32 of shape ({x.shape[0]},), got "
                          f"{row_slot.dtype} {tuple(row_slot.shape)}")


_NAME_FIELDS = (("block_m", "m"), ("block_n", "n"), ("block_r", "r"), ("block_k", "k"),
                ("num_warps", "w"), ("num_stages", "s"))
"""The tile fields a configuration's name spells, in order, each as letter and value."""


@dataclass(frozen=True)
class TileConfig:
    """Base of each kernel's tile configuration (one candidate of the dispatcher): its name,
    e.g. ``sgmv-m64n128r64k64w4s3-persist2``, spells the tiles it has, then the launch
    variants in use (``-split``, ``-persist``, ``-tma``); ``as_dict`` for reports."""

    KERNEL = ""
    """The kernel's name, the first word of every configuration's (not a field)."""

    @property
    def name(self) -> str:
        have = {f.name for f in fields(self)}
        tiles = "".join(f"{letter}{getattr(self, f)}" for f, letter in _NAME_FIELDS if f in have)
        split = getattr(self, "split_k", 1)
        per_sm = getattr(self, "per_sm", 0)
        return (f"{self.KERNEL}-{tiles}" + (f"-split{split}" if split > 1 else "")
                + (f"-persist{per_sm}" if per_sm else "")
                + ("-tma" if getattr(self, "tma", False) else ""))

    def as_dict(self) -> dict:
        return asdict(self)
