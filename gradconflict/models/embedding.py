"""Conditioning embeddings shared by the built-in models.

* ``timestep_embedding(t, dim)``: the sinusoidal embedding of Vaswani et al. / ADM,
  ``[cos(t * f_0), ..., cos(t * f_{h-1}), sin(t * f_0), ..., sin(t * f_{h-1})]`` with ``h = dim // 2`` and
  frequencies ``f_k = max_period^(-k / h)`` (radians per timestep). t is the integer timestep 0..T-1.
* ``TimestepEmbedder``: sinusoid -> Linear -> SiLU -> Linear (an MLP on the fixed embedding).
* ``LabelEmbedder``: ``nn.Embedding(num_classes + 1, dim)``; index ``num_classes`` is the null class, used for
  ``y=None`` and for negative labels (unlabelled data), as classifier-free guidance needs.
* ``sincos_2d(dim, grid)``: fixed 2-D sine-cosine position embedding of a ``grid x grid`` patch grid (DiT/MAE).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["timestep_embedding", "sincos_2d", "TimestepEmbedder", "LabelEmbedder", "as_timesteps"]


def as_timesteps(t: torch.Tensor | int, batch: int, device: torch.device) -> torch.Tensor:
    """Timesteps as a float tensor of shape ``(batch,)``; a scalar is broadcast to every sample."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t.float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``(n,) -> (n, dim)``: cosines then sines of ``t * max_period^(-k/h)``, k < h = dim//2.

    An odd ``dim`` gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape ``(grid * grid, dim)``, rows in raster order.

    Half of the channels encode the row, half the column, each with ``dim / 4`` frequencies
    ``omega_k = 10000^(-k / (dim / 4))``; ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"the 2-D sincos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """Integer timesteps ``(n,)`` -> conditioning vectors ``(n, dim)`` via a 2-layer MLP on the sinusoid."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels ``(n,)`` -> vectors ``(n, dim)``; ``y=None`` or ``y < 0`` selects the null class ``num_classes``."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a label embedder needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            idx = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            y = torch.as_tensor(y, device=device).long()
            if y.shape != (batch,):
                raise ValueError(f"y must have shape ({batch},), got {tuple(y.shape)}")
            if torch.any(y > self.num_classes):
                raise ValueError(f"labels must lie in [0, {self.num_classes - 1}] (or < 0 for 'no label')")
            idx = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        return self.table(idx)
