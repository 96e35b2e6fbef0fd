"""The fused runner: attention in torch, "MLP + per-row adapter" through the fused kernels.

Each block's MLP and the MLP adapters of every clip run as one op of
``aat_serve.adapters.kernels`` (``mlp_adapter`` with a per-token pool row); the spatial adapter
and the attention residual, ``x + a + A_s(a)``, are the op ``spatial_adapter`` (one kernel per
layer on CUDA). The row tile plans are built once per forward pass and shared by every layer.
``backend`` picks the kernels' implementation: ``triton`` (compiled, CUDA), ``interpret``
(Triton's interpreter on CPU, for tests; needs ``TRITON_INTERPRET=1`` before Python starts) or
``torch`` (the torch reference).
"""

from __future__ import annotations

import torch

from aat_serve.adapters.backbone import AST, Block
from aat_serve.adapters.kernels.dispatch import Backend, mlp_adapter, spatial_adapter
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.runners.batch import Group, encode_group
from aat_serve.adapters.runners.torch_segments import mlp_weights
from aat_serve.adapters.slots import SlotPools

FUSED_BACKENDS = ("triton", "interpret", "torch")


class FusedRunner:
    """The fused kernels over all rows of a group, each row with its task's pool row."""

    runtime = "torch"

    def __init__(self, backbone: AST, dtype: torch.dtype, device: torch.device,
                 backend: str) -> None:
        self.backbone = backbone
        self.dtype = dtype
        self.device = device
        self.backend = backend
        self._kernel_backend: Backend = "auto" if backend == "triton" else \
            "interpret" if backend == "interpret" else "torch"
        self._mlp = mlp_weights(backbone)

    def extra_bytes(self) -> int:
        return 0

    def pooled(self, x: torch.Tensor, group: Group, pools: SlotPools) -> torch.Tensor:
        blocks = self.backbone.blocks
        rows: list[tuple[Plans | None, Plans]] = []

        def block(i: int, h: torch.Tensor) -> torch.Tensor:
            if not rows:  # the sequence length (prompts included) is known once embedded
                rows.append(group.row_plans(h.shape[1], self.device))
            return self._block(i, blocks[i], h, pools, *rows[0])

        return encode_group(self.backbone, x, group, block)

    def _block(self, i: int, blk: Block, x: torch.Tensor, pools: SlotPools,
               spatial: Plans | None, mlp: Plans) -> torch.Tensor:
        b, n, d = x.shape
        kb = self._kernel_backend
        kw = {} if kb == "torch" else {"plans": mlp}
        a = blk.attn(blk.norm1(x).to(self.dtype)).reshape(-1, d)
        x = x.reshape(-1, d)
        if spatial is None:
            x = x + a
        else:  # x + a + A_s(a)
            x = spatial_adapter(x, a, pools.spatial[i], spatial.row_slot, backend=kb,
                                **({} if kb == "torch" else {"plans": spatial}))
        h = blk.norm2(x).to(self.dtype)
        x = mlp_adapter(x, h, self._mlp[i], pools.mlp[i], mlp.row_slot, backend=kb, **kw)
        return x.view(b, n, d)
