"""Small diffusion-shaped models that exercise every layer the fused engine knows, and some it does not."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float64) / half).to(t.device)
    ang = t.to(torch.float64)[:, None] * freqs[None] / 10
    return torch.cat([ang.sin(), ang.cos()], 1)


class DiTBlocks(nn.Module):
    """Patchify, adaLN-zero-like modulation, LayerNorm, attention via scaled_dot_product_attention."""

    def __init__(self, dim: int = 16, depth: int = 2, heads: int = 2, num_classes: int = 0, patch: int = 2) -> None:
        super().__init__()
        self.patch, self.dim, self.heads = patch, dim, heads
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleDict({
                "ada": nn.Linear(dim, 4 * dim), "ln1": nn.LayerNorm(dim, elementwise_affine=False),
                "qkv": nn.Linear(dim, 3 * dim), "proj": nn.Linear(dim, dim),
                "ln2": nn.LayerNorm(dim), "mlp1": nn.Linear(dim, 2 * dim), "mlp2": nn.Linear(2 * dim, dim)}))
        self.out = nn.Linear(dim, patch * patch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        n, _, H, W = x.shape
        h = self.embed(x).flatten(2).transpose(1, 2)  # (n, S, d)
        c = self.t_mlp(timestep_features(t, self.dim).to(x.dtype))
        if self.y_emb is not None and y is not None:
            c = c + self.y_emb(y)
        for b in self.blocks:
            shift, scale, gate1, gate2 = b["ada"](F.silu(c)).chunk(4, -1)
            z = b["ln1"](h) * (1 + scale[:, None]) + shift[:, None]
            q, k, v = b["qkv"](z).reshape(n, -1, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, self.dim)
            h = h + gate1[:, None] * b["proj"](a)
            h = h + gate2[:, None] * b["mlp2"](F.gelu(b["mlp1"](b["ln2"](h))))
        p = self.out(h)  # (n, S, p*p)
        hp, wp = H // self.patch, W // self.patch
        return p.reshape(n, hp, wp, self.patch, self.patch).permute(0, 1, 3, 2, 4).reshape(n, 1, H, W)


class UNetLike(nn.Module):
    """Conv2d + GroupNorm + SiLU residual blocks, downsampling, attention at low resolution, a skip."""

    def __init__(self, ch: int = 8, num_classes: int = 0) -> None:
        super().__init__()
        self.ch = ch
        self.inp = nn.Conv2d(1, ch, 3, padding=1)
        self.temb = nn.Linear(ch, ch)
        self.y_emb = nn.Embedding(num_classes, ch) if num_classes else None
        self.gn1, self.c1 = nn.GroupNorm(2, ch), nn.Conv2d(ch, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.gn2 = nn.GroupNorm(4, 2 * ch)
        self.qkv = nn.Conv1d(2 * ch, 6 * ch, 1)
        self.proj = nn.Conv1d(2 * ch, 2 * ch, 1)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)  # no rule: generic fallback
        self.gn3 = nn.GroupNorm(2, 2 * ch)
        self.outc = nn.Conv2d(2 * ch, 1, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        e = self.temb(timestep_features(t, self.ch).to(x.dtype))
        if self.y_emb is not None and y is not None:
            e = e + self.y_emb(y)
        h0 = self.inp(x)
        h = h0 + self.c1(F.silu(self.gn1(h0 + e[:, :, None, None])))
        d = self.down(h)
        n, c, H, W = d.shape
        s = self.gn2(d).reshape(n, c, H * W)
        q, k, v = self.qkv(s).reshape(n, 3, 2, c // 2, H * W).permute(1, 0, 2, 4, 3)
        a = F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2).reshape(n, c, H * W)
        d = d + self.proj(a).reshape(n, c, H, W)
        u = self.up(d)
        return self.outc(F.silu(self.gn3(torch.cat([u, h], 1))))


class Conv1dNet(nn.Module):
    """Sequence data (N, C, L): Conv1d with groups and dilation, LayerNorm over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 8, 3, padding=2, dilation=2)
        self.c2 = nn.Conv1d(8, 8, 3, padding="same", groups=2)
        self.ln = nn.LayerNorm(8)
        self.t = nn.Linear(4, 8)
        self.c3 = nn.Conv1d(8, 2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.c1(x) + self.t(timestep_features(t, 4).to(x.dtype))[:, :, None]
        h = self.c2(F.silu(h))
        h = self.ln(h.transpose(1, 2)).transpose(1, 2)
        return self.c3(h)


class TokenNet(nn.Module):
    """Token inputs through an Embedding whose weight is tied to the output projection, plus an MHA."""

    def __init__(self, vocab: int = 11, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(1, 6, dim) * 0.1)  # a bare parameter on the root: fallback
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.tlin = nn.Linear(4, dim)
        self.ids = nn.Parameter(torch.arange(6).remainder(vocab), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x: (N, 6, vocab) continuous "one-hot-like" data; tokens from argmax so the Embedding is exercised
        ids = x.argmax(-1)
        h = self.emb(ids) + self.pos + self.tlin(timestep_features(t, 4).to(x.dtype))[:, None]
        a, _ = self.mha(h, h, h)
        h = self.mix(h + a)
        h = self.mix(F.silu(h))  # the same module called twice
        return self.head(h) + x


def frozen(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    for n, p in model.named_parameters():
        if n.startswith(prefixes):
            p.requires_grad_(False)
    return model


def seeded_problem():
    """The problem the distributed tests solve in one process and across ranks: a float64 UNetLike,
    K = 4 uniform bins of T = 1000, 3 samples per bin; returns (model, x0, t, task, noise)."""
    import gradconflict as gc

    torch.manual_seed(0)
    model = UNetLike().double()
    g = torch.Generator().manual_seed(0)
    t, task = gc.TimestepBins.uniform(1000, 4).sample(3, g)
    x0 = torch.randn(len(t), 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return model, x0, t, task, noise
