"""ADM-style UNet (Ho et al. 2020; Dhariwal & Nichol 2021), written from the papers.

Encoder: a 3x3 conv stem, then per resolution level ``num_res_blocks`` residual blocks (with self-attention
where the feature map is ``attention_resolutions`` pixels wide) and a strided-conv downsample between levels.
Middle: ResBlock, attention, ResBlock. Decoder: mirrored, each block taking the concatenation of the
feature map with one encoder skip; nearest-neighbour 2x upsample + 3x3 conv between levels. Output:
GroupNorm, SiLU, zero-initialised 3x3 conv back to ``in_channels``.

Residual block with conditioning ``c = emb(t) + emb(y)``:

    h = Conv3x3(SiLU(GN(x)));  h = h + Linear(SiLU(c))[:, :, None, None]
    out = skip(x) + Conv3x3_zero(Dropout(SiLU(GN(h))))

Attention block: ``x + Proj_zero(SDPA(qkv(GN(x))))`` over the ``H * W`` positions, with
``F.scaled_dot_product_attention`` called through the module name ``F``. GroupNorm normalises each sample
on its own, so samples in a batch never interact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import normalize_prediction
from .embedding import LabelEmbedder, TimestepEmbedder, as_timesteps

__all__ = ["UNetConfig", "UNet"]


@dataclass
class UNetConfig:
    """Hyperparameters of a UNet. ``base_channels`` = width of the first level, ``channel_mult`` = width
    multiplier per level (one level per entry, each halving the resolution), ``attention_resolutions`` =
    feature-map widths in pixels that get self-attention, ``head_channels`` = channels per attention head,
    ``groups`` = GroupNorm groups, ``num_classes`` = 0 for an unconditional model."""

    image_size: int = 16
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    head_channels: int = 32
    groups: int = 8
    dropout: float = 0.0
    num_classes: int = 0
    prediction: str = "eps"

    def __post_init__(self) -> None:
        self.prediction = normalize_prediction(self.prediction)
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        levels = len(self.channel_mult)
        if levels < 1 or self.image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} cannot be halved {levels - 1} times (channel_mult {self.channel_mult})")
        for width in (self.base_channels * m for m in self.channel_mult):
            if width % self.groups:
                raise ValueError(f"channel width {width} is not divisible by groups {self.groups}")
        if self.num_res_blocks < 1 or self.in_channels < 1 or self.num_classes < 0:
            raise ValueError("num_res_blocks and in_channels must be >= 1 and num_classes >= 0")


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with an additive conditioning projection (see the module docstring)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Conv2d(cout, cout, 3, padding=1))
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb(c)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions of ``(n, C, H, W)``, with ``C / head_channels`` heads."""

    def __init__(self, channels: int, head_channels: int, groups: int) -> None:
        super().__init__()
        self.num_heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, C, H, W = x.shape
        qkv = self.qkv(self.norm(x).reshape(n, C, H * W))  # (n, 3C, L)
        qkv = qkv.reshape(n, 3, self.num_heads, C // self.num_heads, H * W).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (n, heads, L, C/heads)
        out = out.permute(0, 1, 3, 2).reshape(n, C, H * W)
        return x + self.proj(out).reshape(n, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """A ResBlock optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: Optional[AttentionBlock]) -> None:
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = self.res(x, c)
        return self.attn(x) if self.attn is not None else x


class UNet(nn.Module):
    """ADM-style UNet: ``model(x_t, t, y=None) -> output`` shaped like ``x_t`` (meaning: ``config.prediction``)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        cfg = config
        ch = cfg.base_channels
        emb_dim = 4 * ch
        self.t_embed = TimestepEmbedder(emb_dim, frequency_dim=ch)
        self.y_embed = LabelEmbedder(cfg.num_classes, emb_dim) if cfg.num_classes > 0 else None

        def stage(cin: int, cout: int, res: int) -> _Stage:
            attn = AttentionBlock(cout, cfg.head_channels, cfg.groups) if res in cfg.attention_resolutions else None
            return _Stage(ResBlock(cin, cout, emb_dim, cfg.groups, cfg.dropout), attn)

        self.stem = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, width, res = [ch], ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(stage(width, ch * mult, res))
                width = ch * mult
                skips.append(width)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Downsample(width))
                skips.append(width)
                res //= 2
        self.mid = nn.ModuleList([stage(width, width, -1), AttentionBlock(width, cfg.head_channels, cfg.groups), stage(width, width, -1)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(stage(width + skips.pop(), ch * mult, res))
                width = ch * mult
            if level > 0:
                self.up.append(Upsample(width))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(cfg.groups, width), nn.SiLU(), _zero(nn.Conv2d(width, cfg.in_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = x.shape[0]
        c = self.t_embed(as_timesteps(t, n, x.device))
        if self.y_embed is not None:
            c = c + self.y_embed(y, n, x.device)
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, c) if isinstance(layer, _Stage) else layer(h)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, c) if isinstance(layer, _Stage) else layer(h)
        for layer in self.up:
            if isinstance(layer, _Stage):
                h = layer(torch.cat([h, skips.pop()], dim=1), c)
            else:
                h = layer(h)
        return self.out(h)
