"""Run the shared backbone in ONNX Runtime with per-clip adapter weights bound as inputs.

One graph per clip length (and prompt count): the frozen backbone is baked in, while each
clip's adapters arrive as inputs, so uploading or replacing a task never re-exports anything.

Inputs of the graph, for a batch of B clips drawing on U distinct tasks::

    features   (B, T, F)        normalised log-mel
    row_task   (B,)   int64     index of each clip's task in 0..U-1
    md_w (L, U, D, r)  md_b (L, U, r)  mu_w (L, U, r, D)  mu_b (L, U, D)   MLP adapters
    sd_w, sd_b, su_w, su_b      the same shapes                             spatial adapters
    prompts (L, U, P, D)        only in the prompt variant

Output: ``pooled (B, D)``; heads (whose class counts differ) are applied by the caller. A task
without a kind of adapter passes zeros for it (a zero adapter is the identity).

``aat_serve.adapters.runners.onnx.OnnxRunner`` runs a ``MultiTaskModel``'s groups here instead
of in torch (``AAT_RUNTIME=onnxruntime``; ``MultiTaskModel(..., backend="onnxruntime")``).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from aat_serve.adapters.backbone import AST, drop_prompts, insert_prompts
from aat_serve.adapters.config import DEFAULT_BOTTLENECK
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.onnx_export import FixedLengthEmbed

log = logging.getLogger(__name__)

POOL_NAMES = ("md_w", "md_b", "mu_w", "mu_b", "sd_w", "sd_b", "su_w", "su_b")


def _adapter(z: torch.Tensor, dw, db, uw, ub) -> torch.Tensor:
    """Per-clip adapter: z (B, N, D); dw (B, D, r); db (B, r); uw (B, r, D); ub (B, D)."""
    return torch.matmul(F.gelu(torch.matmul(z, dw) + db.unsqueeze(1)), uw) + ub.unsqueeze(1)


class _PooledBody(nn.Module):
    """The backbone with per-clip adapters as inputs; returns the pooled embedding."""

    def __init__(self, backbone: AST, num_frames: int, with_prompts: bool) -> None:
        super().__init__()
        bb = copy.deepcopy(backbone).float().eval()
        for block in bb.blocks:
            block.mlp_adapter = block.spatial_adapter = None
        self.bb = bb
        self.with_prompts = with_prompts
        self.embed = FixedLengthEmbed(bb, num_frames)

    def forward(self, features, row_task, md_w, md_b, mu_w, mu_b, sd_w, sd_b, su_w, su_b,
                prompts=None):
        n = self.embed.num_prefix_tokens
        h = self.embed(features)
        for i, blk in enumerate(self.bb.blocks):
            k = 0
            if prompts is not None:
                p = prompts[i].index_select(0, row_task)
                k = p.shape[1]
                h = insert_prompts(h, p, n)
            a = blk.attn(blk.norm1(h))
            a = a + _adapter(
                a, sd_w[i].index_select(0, row_task), sd_b[i].index_select(0, row_task),
                su_w[i].index_select(0, row_task), su_b[i].index_select(0, row_task))
            h = h + a
            z = blk.norm2(h)
            h = h + blk.mlp(z) + _adapter(
                z, md_w[i].index_select(0, row_task), md_b[i].index_select(0, row_task),
                mu_w[i].index_select(0, row_task), mu_b[i].index_select(0, row_task))
            if prompts is not None:
                h = drop_prompts(h, k, n)
        return self.bb.pool(h)


@dataclass
class TaskArrays:
    """One task's adapter weights in the graph's layout (``(L, D, r)`` etc.), float32."""

    pools: dict[str, np.ndarray]
    prompts: np.ndarray | None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], depth: int, dim: int,
                     bottleneck: int) -> TaskArrays:
        """From bundle tensor names; absent kinds become zeros."""
        def kind(prefix: str) -> tuple[np.ndarray, ...]:
            key = f"blocks.0.{prefix}.fc1.weight"
            if key not in tensors:
                return (np.zeros((depth, dim, bottleneck), np.float32),
                        np.zeros((depth, bottleneck), np.float32),
                        np.zeros((depth, bottleneck, dim), np.float32),
                        np.zeros((depth, dim), np.float32))
            get = lambda i, name: tensors[f"blocks.{i}.{prefix}.{name}"].float()  # noqa: E731
            return (torch.stack([get(i, "fc1.weight").t() for i in range(depth)]).numpy(),
                    torch.stack([get(i, "fc1.bias") for i in range(depth)]).numpy(),
                    torch.stack([get(i, "fc2.weight").t() for i in range(depth)]).numpy(),
                    torch.stack([get(i, "fc2.bias") for i in range(depth)]).numpy())

        arrays = (*kind("mlp_adapter"), *kind("spatial_adapter"))
        pools = {n: np.ascontiguousarray(a) for n, a in zip(POOL_NAMES, arrays, strict=True)}
        prompts = tensors.get("prompts")
        return cls(pools, None if prompts is None else prompts.float().numpy())


class OrtBackbone:
    """Exports (lazily, once per clip length and prompt count) and runs the pooled body."""

    def __init__(self, backbone: AST, bottleneck: int = DEFAULT_BOTTLENECK,
                 providers: list[str] | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ConfigError("AAT_RUNTIME=onnxruntime needs the onnxruntime package "
                              "(pip install 'aat-serve[onnx]')") from e
        self._ort = ort
        self.backbone = backbone
        self.bottleneck = bottleneck
        available = ort.get_available_providers()
        wanted = providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        self.threads = threads
        self._sessions: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()
        log.info("onnxruntime %s, providers %s", ort.__version__, self.providers)

    @property
    def provider(self) -> str:
        return self.providers[0]

    def _session(self, num_frames: int, num_prompts: int):
        key = (num_frames, num_prompts)
        with self._lock:
            sess = self._sessions.get(key)
            if sess is None:
                sess = self._build(num_frames, num_prompts)
                self._sessions[key] = sess
            return sess

    def _build(self, num_frames: int, num_prompts: int):
        cfg = self.backbone.cfg
        body = _PooledBody(self.backbone, num_frames, with_prompts=num_prompts > 0)
        L, D, r = cfg.depth, cfg.embed_dim, self.bottleneck
        u = 1
        example = [torch.zeros(1, num_frames, cfg.num_mel_bins), torch.zeros(1, dtype=torch.long),
                   torch.zeros(L, u, D, r), torch.zeros(L, u, r), torch.zeros(L, u, r, D),
                   torch.zeros(L, u, D), torch.zeros(L, u, D, r), torch.zeros(L, u, r),
                   torch.zeros(L, u, r, D), torch.zeros(L, u, D)]
        names = ["features", "row_task", *POOL_NAMES]
        dyn = {"features": {0: "batch"}, "row_task": {0: "batch"}, "pooled": {0: "batch"}}
        dyn.update({n: {1: "tasks"} for n in POOL_NAMES})
        if num_prompts:
            example.append(torch.zeros(L, u, num_prompts, D))
            names.append("prompts")
            dyn["prompts"] = {1: "tasks"}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "body.onnx"
            with torch.no_grad():
                torch.onnx.export(body, tuple(example), str(path), dynamo=False,
                                  opset_version=17, input_names=names,
                                  output_names=["pooled"], dynamic_axes=dyn)
            opts = self._ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = self._ort.InferenceSession(os.fspath(path), opts, providers=self.providers)
        log.info("onnxruntime graph for %d frames, %d prompts ready", num_frames, num_prompts)
        return sess

    def pooled(self, features: torch.Tensor, tasks: list[TaskArrays],
               row_task: list[int]) -> torch.Tensor:
        """Pooled embeddings ``(B, D)`` for clips whose adapters are ``tasks[row_task[i]]``."""
        num_prompts = {0 if t.prompts is None else t.prompts.shape[1] for t in tasks}
        if len(num_prompts) != 1:
            raise ConfigError("clips with and without prompts (or with different prompt counts) "
                              "must run in separate groups")
        p = num_prompts.pop()
        sess = self._session(features.shape[1], p)
        feeds = {"features": features.detach().float().cpu().numpy(),
                 "row_task": np.asarray(row_task, dtype=np.int64)}
        for name in POOL_NAMES:
            feeds[name] = (tasks[0].pools[name][:, None] if len(tasks) == 1 else
                           np.stack([t.pools[name] for t in tasks], axis=1))
        if p:
            feeds["prompts"] = np.stack([t.prompts for t in tasks], axis=1)
        # IOBinding: inputs are bound per batch (copied to the device by the CUDA provider),
        # so new or replaced tasks only change what is bound, never the session.
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("pooled")
        sess.run_with_iobinding(binding)
        return torch.from_numpy(binding.copy_outputs_to_cpu()[0])
