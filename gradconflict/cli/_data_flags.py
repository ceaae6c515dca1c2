"""Data flags shared by the commands that read data: ``--scale`` (value range) and ``--null-conditioning`` /
``--null-length`` (run a text-conditioned model unconditionally)."""

from __future__ import annotations

import argparse

__all__ = ["add_conditioning_flags", "add_model_data_flags", "add_scale_flag"]


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


def add_model_data_flags(p: argparse.ArgumentParser) -> None:
    """Add the model flags (``--model``, ``--checkpoint``, ``--weights``) and the data flags (``--data``,
    ``--image-size``, ``--scale``, ``--null-conditioning``, ``--null-length``) of a command that reads both."""
    from ._weights import add_weights_flag

    p.add_argument("--model", required=True,
                   help="built-in name (e.g. dit-tiny), a training run folder, or path/file.py:function")
    p.add_argument("--checkpoint", default=None,
                   help="state dict (.pt or .safetensors, or a training run folder: its weights) to load into the model")
    add_weights_flag(p)
    p.add_argument("--data", default="mnist",
                   help="dataset name (mnist, digits, synthetic) or a path (.npy, .npz, image folder)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the data's images to this square size (default: none; data of another size than the "
                        "model's is refused without it, and non-square images are never stretched)")
    add_scale_flag(p)
    add_conditioning_flags(p)
