"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), written from the paper.

Shapes: input ``x_t`` is ``(n, C, H, W)`` with ``H = W = image_size``; it is cut into ``p x p`` patches
(a strided conv, ``N = (H / p)^2`` tokens of width ``D = hidden_size``), given a fixed 2-D sincos position
embedding, passed through ``depth`` adaLN-Zero blocks and mapped back to ``(n, C, H, W)``.

adaLN-Zero block, with conditioning ``c = emb(t) + emb(y)`` and ``(s1, b1, g1, s2, b2, g2) = Linear(SiLU(c))``
(that Linear is zero-initialised, so every block starts as the identity):

    x = x + g1 * Attn(LN(x) * (1 + s1) + b1)
    x = x + g2 * MLP(LN(x) * (1 + s2) + b2)

LayerNorms have no affine parameters. Attention calls ``F.scaled_dot_product_attention`` through the module
name ``F`` so that it can be patched; every operation acts on each sample separately (no BatchNorm, no
in-place updates of activations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import normalize_prediction
from .embedding import LabelEmbedder, TimestepEmbedder, as_timesteps, sincos_2d

__all__ = ["DiTConfig", "DiT"]


@dataclass
class DiTConfig:
    """Hyperparameters of a DiT. ``image_size`` in pixels (square), ``patch_size`` in pixels,
    ``hidden_size`` = token width D, ``mlp_ratio`` = MLP hidden width / D, ``num_classes`` = 0 for an
    unconditional model, ``prediction`` = what the output means ("eps", "x0" or "v")."""

    image_size: int = 16
    in_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 0
    prediction: str = "eps"

    def __post_init__(self) -> None:
        self.prediction = normalize_prediction(self.prediction)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D position embedding), got {self.hidden_size}")
        if self.depth < 1 or self.in_channels < 1 or self.num_classes < 0:
            raise ValueError("depth and in_channels must be >= 1 and num_classes >= 0")


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with per-sample ``(n, D)`` modulation broadcast over the tokens."""
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv Linear; ``(n, N, D) -> (n, N, D)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, N, D = x.shape
        qkv = self.qkv(x).reshape(n, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, N, D))


class DiTBlock(nn.Module):
    """One adaLN-Zero transformer block (see the module docstring)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, b1, g1, s2, b2, g2 = self.modulation(c).chunk(6, dim=-1)
        x = x + g1[:, None, :] * self.attn(_modulate(self.norm1(x), b1, s1))
        x = x + g2[:, None, :] * self.mlp(_modulate(self.norm2(x), b2, s2))
        return x


class FinalLayer(nn.Module):
    """adaLN + Linear from tokens ``(n, N, D)`` to patch pixels ``(n, N, p * p * C)``; zero-initialised."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for layer in (self.linear, self.modulation[1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer: ``model(x_t, t, y=None) -> output`` shaped like ``x_t`` (meaning: ``config.prediction``)."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        D, p, C = config.hidden_size, config.patch_size, config.in_channels
        self.grid = config.image_size // p
        self.patch_embed = nn.Conv2d(C, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(D, self.grid)[None], persistent=False)
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = LabelEmbedder(config.num_classes, D) if config.num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final = FinalLayer(D, p, C)
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier-uniform Linear layers and patch conv, zero biases, N(0, 0.02) timestep/label MLPs; the
        adaLN modulations and the output layer stay zero (adaLN-Zero)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and "modulation" not in name and not name.startswith("final.linear"):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.table.weight, std=0.02)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(n, N, p * p * C)`` -> ``(n, C, H, W)``."""
        n, p, C, g = tokens.shape[0], self.config.patch_size, self.config.in_channels, self.grid
        x = tokens.reshape(n, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, C, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embed(as_timesteps(t, n, x.device))
        if self.y_embed is not None:
            c = c + self.y_embed(y, n, x.device)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final(tokens, c))
