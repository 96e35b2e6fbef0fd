"""The Audio Spectrogram Transformer backbone (Gong et al., 2021) with AAT adapter hooks.

Input is a batch of normalised log-mel features ``(B, T, F)``. A 1-channel conv with separate
frequency and time strides cuts it into patches, ordered frequency-major (token ``f * t_dim +
t``); two prefix tokens (cls, dist) are prepended; pre-norm ViT blocks follow; the final-norm
outputs of the two prefix tokens are averaged into one pooled vector.

One block, with optional spatial adapter ``A_s`` and MLP adapter ``A_m``::

    a   = MHSA(LN1(x))
    x_s = x + a + A_s(a)                # spatial adapter with shortcut
    h   = LN2(x_s)
    out = x_s + MLP(h) + A_m(h)         # MLP adapter in parallel, no shortcut

The positional embedding is kept at the grid it was stored with and cut or interpolated to
the grid of each input (AST / SSAST rule, see ``resample_pos_grid``), so one backbone serves
clips of any length.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from torch.nn import functional as F

from aat_serve.adapters.config import BackboneConfig
from aat_serve.adapters.errors import ConfigError
from aat_serve.adapters.modules import Adapter


def resample_pos_grid(
    pos: torch.Tensor, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Cut or interpolate patch position embeddings ``(1, f*t, D)`` from one grid to another.

    As AST and SSAST: the time axis first (centre cut when the target is narrower, bilinear
    interpolation with ``align_corners=False`` otherwise), then the frequency axis the same
    way. Computed in fp32; the input dtype is restored.
    """
    (pf, pt), (f, t) = src_grid, dst_grid
    if (pf, pt) == (f, t):
        return pos
    dtype = pos.dtype
    d = pos.shape[-1]
    grid = pos.float().reshape(1, pf, pt, d).permute(0, 3, 1, 2)  # (1, D, pf, pt)
    if t < pt:
        start = pt // 2 - t // 2
        grid = grid[:, :, :, start:start + t]
    else:
        grid = F.interpolate(grid, size=(pf, t), mode="bilinear", align_corners=False)
    if f < pf:
        start = pf // 2 - f // 2
        grid = grid[:, :, start:start + f, :]
    elif f > pf:
        grid = F.interpolate(grid, size=(f, t), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, f * t, d).to(dtype)


def insert_prompts(h: torch.Tensor, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt tokens ``(B, P, D)`` inserted right after the ``n`` prefix tokens of ``h``."""
    return torch.cat([h[:, :n], prompts, h[:, n:]], dim=1)


def drop_prompts(h: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """``h`` without the ``k`` prompt tokens that follow its ``n`` prefix tokens."""
    return torch.cat([h[:, :n], h[:, n + k:]], dim=1)


class PatchEmbed(nn.Module):
    """Conv patch embedding of a 1-channel spectrogram with separate f/t strides."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.embed_dim, kernel_size=(cfg.patch_freq, cfg.patch_time),
                              stride=(cfg.freq_stride, cfg.time_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, F) -> (B, 1, F, T) -> (B, D, f, t) -> (B, f*t, D), frequency-major.
        x = x.unsqueeze(1).transpose(2, 3)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block with optional AAT adapters (None when the method has none)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.qkv_bias)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.embed_dim, cfg.mlp_hidden)
        self.spatial_adapter: Adapter | None = None
        self.mlp_adapter: Adapter | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm1(x))
        if self.spatial_adapter is not None:
            a = a + self.spatial_adapter(a)
        x = x + a
        h = self.norm2(x)
        y = self.mlp(h)
        if self.mlp_adapter is not None:
            y = y + self.mlp_adapter(h)
        return x + y


class AST(nn.Module):
    """The AST backbone: features ``(B, T, F)`` -> pooled embedding ``(B, D)``."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.num_prefix_tokens == 2 else None
        f, t = cfg.stored_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, f * t + cfg.num_prefix_tokens, d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        for t in (self.cls_token, self.dist_token, self.pos_embed):
            if t is not None:
                nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    def prefix_tokens(self) -> torch.Tensor:
        """The cls (and dist) tokens, ``(1, n_prefix, D)``."""
        if self.dist_token is None:
            return self.cls_token
        return torch.cat([self.cls_token, self.dist_token], dim=1)

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding (prefix tokens + patches) for a patch grid."""
        n = self.num_prefix_tokens
        patches = resample_pos_grid(self.pos_embed[:, n:], self.cfg.stored_grid, grid)
        return torch.cat([self.pos_embed[:, :n], patches], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``(B, T, F)`` -> token sequence ``(B, n_prefix + f*t, D)`` with positions."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.num_mel_bins:
            raise ConfigError(
                f"expected features of shape (batch, frames, {self.cfg.num_mel_bins}), "
                f"got {tuple(x.shape)}")
        grid = self.cfg.grid(x.shape[1])
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.prefix_tokens().expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embed_for(grid).to(tokens.dtype)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, then the mean of the prefix tokens."""
        x = self.norm(x)
        return x[:, : self.num_prefix_tokens].mean(dim=1)

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embedding; ``prompts`` ``(depth, P, D)`` are VPT-deep tokens per block."""
        h = self.embed(x)
        n = self.num_prefix_tokens
        for i, block in enumerate(self.blocks):
            if prompts is None:
                h = block(h)
            else:
                p = prompts[i].to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
                h = drop_prompts(block(insert_prompts(h, p, n)), p.shape[1], n)
        return self.pool(h)

    def frozen_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's own tensors (no adapters), under canonical names."""
        return {k: v for k, v in self.state_dict().items() if "adapter" not in k}

    def fingerprint(self) -> str:
        """A hash of the frozen weights and the geometry that uses them.

        Independent of the file format the weights came from (LayerNorm epsilon differs between
        formats and is deliberately left out), so a bundle trained on the Hugging Face copy of a
        checkpoint fits the original-format copy and vice versa.
        """
        h = hashlib.sha256()
        c = self.cfg
        geometry = (c.embed_dim, c.depth, c.num_heads, c.mlp_hidden, c.patch_freq, c.patch_time,
                    c.freq_stride, c.time_stride, c.num_mel_bins, c.num_prefix_tokens,
                    c.stored_grid)
        h.update(repr(geometry).encode())
        for name, tensor in sorted(self.frozen_state_dict().items()):
            t = tensor.detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode())
            h.update(repr(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        return "sha256:" + h.hexdigest()[:32]
