"""Refuse models whose samples interact (per-task gradients need each sample's loss to depend on that sample only),
and shorten a torch error to the line worth quoting in our own message."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["check_samples_independent", "first_line"]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_samples_independent(model: nn.Module) -> None:
    """Raise ``ValueError`` for layers that mix samples of a batch (BatchNorm in training mode, SyncBatchNorm)."""
    bad = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]
    if bad:
        raise ValueError(
            f"{', '.join(bad[:5])}: BatchNorm normalises with statistics of the whole batch, so each sample's "
            "loss depends on the other samples and per-task gradients would mix tasks. Put the model in eval "
            "mode (model.eval(), running statistics) or replace BatchNorm by GroupNorm/LayerNorm."
        )
