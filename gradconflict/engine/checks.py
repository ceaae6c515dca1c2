"""Refuse models whose samples interact (per-task gradients need each sample's loss to depend on that sample only),
the fused engine's self-check against autograd's own gradient, and the line of a torch error worth quoting."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .. import distributed as dist_utils
from .precision import precision_eps

__all__ = ["check_coverage", "check_samples_independent", "first_line", "task_signs"]


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
            "mode (model.eval()) with running statistics (track_running_stats=True: without them BatchNorm uses "
            "batch statistics even in eval mode), or replace BatchNorm by GroupNorm/LayerNorm."
        )


def check_coverage(fg: Any, params: list, signs: torch.Tensor, autocast_dtype: Optional[torch.dtype] = None,
                   gram_precision: str = "fp32") -> None:
    """Every parameter that received a gradient must have been folded, and ``r^T G r = ||grad||^2`` with ``grad``
    (in ``p.grad``) autograd's own gradient of the signed loss ``sum_k r_k L_k`` (:func:`task_signs`): the
    per-task gradients must add up, with these signs, to it, which tests how the full gradient is split by task.

    The tolerance is relative to ``(sum_k ||g_k||)^2`` (a worst-case rounding bound): 1e-9 for float64
    parameters, 1e-4 for float32, and at least the machine epsilon of the autocast dtype under autocast (autograd
    then forms the full gradient from low-precision products, while the per-task gradients are built in float32),
    and at least the epsilon of a reduced ``gram_precision``.  A parameter used outside its module is off by a
    whole term, far above any of these.  Samples that interact move less: under bfloat16 (eps 7.8e-3) at K ~ 64
    an interaction that changes G by tens of percent can stay within the tolerance, so vet a model's
    independence in float32 (no autocast, ``gram_precision="fp32"``), where 1e-4 catches it."""
    missing = [n for n, p in params if p.grad is not None and id(p) not in fg.folded and bool(p.grad.abs().sum() > 0)]
    if missing:
        raise ValueError(
            f"parameters {missing[:5]} are used outside the modules that own them (e.g. through F.linear on "
            "another module's weight), so the fused engine cannot split their gradient by task; use "
            "method='loop', or wrap the use in a module"
        )
    total = sum(float(dist_utils.all_reduce_sum(p.grad.double()).pow(2).sum()) for _, p in params if p.grad is not None)
    G = fg.gram
    r = signs.to(torch.float64)
    rGr = float(r @ G @ r)
    scale = float(torch.sqrt(torch.clamp(torch.diagonal(G), min=0)).sum()) ** 2
    tol = 1e-9 if params[0][1].dtype == torch.float64 else 1e-4
    if autocast_dtype is not None:
        tol = max(tol, torch.finfo(autocast_dtype).eps)
    if gram_precision != "fp32":
        tol = max(tol, precision_eps(gram_precision))
    if scale > 0 and abs(rGr - total) > tol * scale + 1e-300:
        raise ValueError(
            f"internal check failed: the per-task gradients g_k do not add up to autograd's gradient of "
            f"sum_k r_k L_k (r_k = +-1; r^T G r = {rGr:.6g} vs ||grad||^2 = {total:.6g}). Either a "
            "parameter is used in a way the fused engine does not see (use method='loop'), or the model's samples "
            "interact (a layer that mixes the batch, e.g. x - x.mean(0) or batch statistics: per-task gradients "
            "would then depend on which samples share a batch, so make each sample's output depend on that sample "
            "alone), or a layer's dim 0 is not the batch (e.g. nn.MultiheadAttention with batch_first=False: use "
            "batch_first=True, or method='loop')"
        )


def task_signs(K: int) -> torch.Tensor:
    """Fixed pseudo-random signs ``r_k = +-1`` (at least one of each for K >= 2; the same on every rank).

    The self-check compares the Gram of the (unsigned) fused pass with autograd's gradient of ``sum_k r_k L_k``:
    ``r^T G r = ||sum_k r_k g_k||^2``.  With all signs +1 it would test only the sum of the task gradients;
    gradient that a layer moves between tasks while keeping the sum (samples that interact, a sequence-first
    layer) breaks the signed identity."""
    signs = torch.randint(0, 2, (K,), generator=torch.Generator().manual_seed(0)) * 2 - 1
    if K >= 2:
        signs[-1] = -signs[0]
    return signs
