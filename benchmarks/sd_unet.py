"""A Stable-Diffusion-1.5-size ``UNet2DConditionModel`` built from its config with random weights (issue #19).

    from sd_unet import build_sd_unet
    model = build_sd_unet(width_scale=1.0)     # about 860M parameters, 4 x 64 x 64 latents, 77 x 768 text
    model = build_sd_unet(width_scale=0.1)     # the same architecture at channels (32, 64, 128, 128): CPU tests

``SDUNet`` wraps it as ``model(x_t, t, encoder_hidden_states=...) -> eps`` shaped like ``x_t``, the form
``task_gram`` calls with ``model_kwargs={"encoder_hidden_states": e}`` (one row of text embeddings per sample, so
the cross-attention's key / value projections see per-sample inputs). The wrapper lives here, in the benchmarks,
not in ``gradconflict.adapters`` (the adapter's own UNet2DConditionModel support is separate work). diffusers is
imported only when a model is built. No weights are downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["SD15", "sd15_config", "SDUNet", "SDUNetConfig", "build_sd_unet", "text_embeddings"]

# the SD-1.5 UNet's config (runwayml/stable-diffusion-v1-5, unet/config.json), as keyword arguments
SD15: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, center_input_sample=False, mid_block_scale_factor=1,
)
TEXT_TOKENS = 77  # CLIP's sequence length


def _round8(c: float) -> int:
    return max(8, 8 * round(c / 8))


def sd15_config(width_scale: float = 1.0, sample_size: int = 64) -> dict[str, Any]:
    """The SD-1.5 UNet config with every channel width times ``width_scale`` (rounded to a multiple of 8, as the 8
    attention heads need), the cross-attention width ``768 * width_scale`` likewise, and ``norm_num_groups`` the
    largest count <= ``32 * width_scale`` (at least 1) that divides every width. ``width_scale = 1`` is the real
    config; 0.1 gives channels (32, 64, 128, 128), cross-attention width 80, 2 norm groups."""
    if width_scale <= 0:
        raise ValueError(f"width_scale must be > 0, got {width_scale}")
    widths = tuple(_round8(c * width_scale) for c in SD15["block_out_channels"])
    groups = max(1, min(32, int(32 * width_scale)))
    while any(w % groups for w in widths):
        groups -= 1
    return dict(SD15, block_out_channels=widths, cross_attention_dim=_round8(768 * width_scale),
                norm_num_groups=groups, sample_size=sample_size)


@dataclass(frozen=True)
class SDUNetConfig:
    """What ``task_gram`` and the benchmarks read: latent channels, latent side, prediction, text shape."""

    in_channels: int
    image_size: int
    cross_attention_dim: int
    text_tokens: int = TEXT_TOKENS
    prediction: str = "eps"


class SDUNet(nn.Module):
    """``forward(x_t, t, encoder_hidden_states)``: the UNet2DConditionModel's ``.sample`` (the eps prediction)."""

    def __init__(self, unet: nn.Module, text_tokens: int = TEXT_TOKENS) -> None:
        super().__init__()
        self.unet = unet
        c = unet.config
        self.config = SDUNetConfig(int(c.in_channels), int(c.sample_size), int(c.cross_attention_dim), text_tokens)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states).sample


def build_sd_unet(width_scale: float = 1.0, sample_size: int = 64, text_tokens: int = TEXT_TOKENS,
                  seed: int = 0) -> SDUNet:
    """The SD-1.5 UNet (``sd15_config(width_scale, sample_size)``) with random weights from ``seed``, wrapped."""
    import diffusers  # the benchmark's dependency (pip install gradconflict[diffusers]), not the package's

    torch.manual_seed(seed)
    return SDUNet(diffusers.UNet2DConditionModel(**sd15_config(width_scale, sample_size)), text_tokens)


def text_embeddings(model: SDUNet, n: int, generator: torch.Generator) -> torch.Tensor:
    """Random ``(n, text_tokens, cross_attention_dim)`` stand-ins for CLIP's text embeddings, one per sample (unit
    variance over the embedding axis, about the scale of CLIP's normalised last hidden state)."""
    cfg = model.config
    return torch.randn(n, cfg.text_tokens, cfg.cross_attention_dim, generator=generator)


def parameters_m(model: nn.Module) -> float:
    """Parameter count in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


if __name__ == "__main__":
    tiny = build_sd_unet(0.1, sample_size=8, text_tokens=7)
    print(f"width 0.1: {parameters_m(tiny):.2f}M parameters, channels {tiny.unet.config.block_out_channels}")
    with torch.device("meta"):  # the full size without allocating it
        print(f"width 1.0: {parameters_m(build_sd_unet(1.0)):.1f}M parameters")
