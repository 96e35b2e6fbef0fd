"""The fused runner: attention in torch, "MLP + per-row adapter" through the fused kernels.

Each block's MLP and the MLP adapters of every clip run as one op of
``aat_serve.adapters.kernels`` (``mlp_adapter`` with a per-token pool row); the spatial adapter
and the attention residual, ``x + a + A_s(a)``, are the op ``spatial_adapter`` (one kernel per
layer on CUDA). The row tile plans are built once per forward pass and shared by every layer.
``backend`` picks the kernels' implementation: ``triton`` (compiled, CUDA), ``interpret``
(Triton's interpreter on CPU, for tests; needs ``TRITON_INTERPRET=1`` before Python starts) or
``torch`` (the torch reference).

``encode`` is a pure function of tensors (features, prompts, per-clip pool rows, pools) with
no host synchronisation on the Triton path (the tile plans are bounded by the number of clips,
since a task owns whole clips), which is what ``graphs.GraphCache`` captures into a CUDA graph
per batch bucket.
"""

from __future__ import annotations

import torch

from aat_serve.adapters.backbone import AST, Block
from aat_serve.adapters.kernels.dispatch import Backend, mlp_adapter, spatial_adapter
from aat_serve.adapters.kernels.plan import Plans
from aat_serve.adapters.runners.batch import Group, Segment, clip_rows, encode
from aat_serve.adapters.runners.torch_segments import mlp_weights
from aat_serve.adapters.slots import SlotPools

FUSED_BACKENDS = ("triton", "interpret", "torch")


class FusedRunner:
    """The fused kernels over all rows of a group, each row with its task's pool row."""

    runtime = "torch"

    def __init__(self, backbone: AST, dtype: torch.dtype, device: torch.device,
                 backend: str, residual: torch.dtype = torch.float32) -> None:
        self.backbone = backbone
        self.dtype = dtype
        self.residual = residual
        self.device = device
        self.backend = backend
        self._kernel_backend: Backend = "auto" if backend == "triton" else \
            "interpret" if backend == "interpret" else "torch"
        self._mlp = mlp_weights(backbone)

    def extra_bytes(self) -> int:
        return 0

    def pooled(self, x: torch.Tensor, group: Group, pools: SlotPools) -> torch.Tensor:
        def rows(segs: list[Segment]) -> torch.Tensor:
            return clip_rows(segs, torch.empty(len(group.clips), dtype=torch.int32)
                             ).to(self.device)

        spatial = rows(group.spatial_segs) if group.spatial_segs else None
        return self.encode(x, group.prompts(), spatial, rows(group.mlp_segs), pools)

    def encode(self, x: torch.Tensor, prompts: torch.Tensor | None,
               spatial_rows: torch.Tensor | None, mlp_rows: torch.Tensor,
               pools: SlotPools) -> torch.Tensor:
        """Pooled embeddings ``(B, D)`` of ``x (B, T, F)``; each clip ``b`` runs with pool row
        ``mlp_rows[b]`` / ``spatial_rows[b]`` (int32 on the device, -1: no adapter; no spatial
        adapter at all when ``spatial_rows`` is None) and its ``prompts[b]`` (``(B, L, P, D)``
        or None)."""
        blocks = self.backbone.blocks
        plans: list[tuple[Plans | None, Plans]] = []

        def per_token(rows: torch.Tensor, n: int) -> Plans:
            # A task owns whole clips: at most one segment per clip, a bound known without
            # looking at the rows (no device sync, so the plans can be captured in a graph).
            return Plans(rows[:, None].expand(rows.shape[0], n).reshape(-1), rows.shape[0])

        def block(i: int, h: torch.Tensor) -> torch.Tensor:
            if not plans:  # the sequence length (prompts included) is known once embedded
                n = h.shape[1]
                plans.append((None if spatial_rows is None else per_token(spatial_rows, n),
                              per_token(mlp_rows, n)))
            return self._block(i, blocks[i], h, pools, *plans[0])

        return encode(self.backbone, x, prompts, block, self.residual)

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
