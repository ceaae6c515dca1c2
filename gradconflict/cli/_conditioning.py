"""``--null-conditioning`` / ``--null-length``: run a text-conditioned model unconditionally (shared by commands)."""

from __future__ import annotations

import argparse

__all__ = ["add_conditioning_flags"]


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
