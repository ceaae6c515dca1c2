"""Data flags shared by the commands that read data: ``--scale`` (value range) and ``--null-conditioning`` /
``--null-length`` (run a text-conditioned model unconditionally)."""

from __future__ import annotations

import argparse

__all__ = ["add_conditioning_flags", "add_scale_flag"]


def add_scale_flag(p: argparse.ArgumentParser) -> None:
    """Add ``--scale {auto,none,minmax}``: how ``.npy`` / ``.npz`` values are mapped (``gradconflict.data``)."""
    p.add_argument("--scale", choices=["auto", "none", "minmax"], default="auto",
                   help="value range of .npy/.npz data: auto (default) maps images (uint8, [0, 1]) to [-1, 1] and keeps "
                        "other floats such as latents exactly as stored; none never changes values; minmax rescales "
                        "the whole array to [-1, 1]")


def add_conditioning_flags(p: argparse.ArgumentParser) -> None:
    """Add ``--null-conditioning [zeros|FILE.npy]`` and ``--null-length L`` to a command's parser."""
    from ..adapters.conditioning import NULL_LENGTH

    p.add_argument("--null-conditioning", nargs="?", const="zeros", default=None, metavar="zeros|FILE.npy",
                   help="run a text-conditioned model (cross-attention) unconditionally: encoder_hidden_states of "
                        "zeros (N, L, D) with D the model's cross_attention_dim, or the embedding (L, D) in FILE.npy "
                        "(e.g. of the empty prompt) for every sample; per-sample embeddings come from the data file "
                        "instead (an .npz array named encoder_hidden_states)")
    p.add_argument("--null-length", type=int, default=NULL_LENGTH,
                   help=f"token count L of the --null-conditioning zeros (default {NULL_LENGTH})")
