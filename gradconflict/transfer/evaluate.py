"""Common-random-number evaluation: one fixed set of (x0, eps, t) per target bin, shared by every model.

For seed s the evaluation set holds ``n`` samples per bin j (images drawn uniformly from the data,
``t ~ U(bin j)``, ``eps ~ N(0, I)``, all from one CPU generator, via ``engine.sample_task_batch``). The loss
of bin j under parameters theta is the mean per-sample loss in x0 units (data units squared):

    L_j(theta) = (1/n) sum_{b in bin j} mean_pixels (x0_b - x0_hat_theta(x_t_b, t_b))^2.

theta_0 and every fine-tuned copy are evaluated on the *same* samples, so the difference
``L_j(theta_0) - L_j(theta_i)`` carries no sampling noise of its own: it is exactly 0 when theta_i = theta_0.
Every evaluation goes through the same code (``functional_call`` with a parameter dict, fixed chunks, eval
mode), so identical parameters give bit-identical losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from ..bins import TimestepBins
from ..engine import per_sample_losses, sample_task_batch
from ..schedule import NoiseSchedule

__all__ = ["EvalSet", "draw_eval_set", "evaluate_losses", "relative_reduction", "base_params"]


@dataclass
class EvalSet:
    """Fixed evaluation samples: ``x0`` (n, ...), integer ``t`` (n,), target bin ``task`` (n,), ``noise``,
    per-sample ``model_kwargs`` (class labels ``y`` for class-conditional models); ``K`` bins."""

    x0: torch.Tensor
    t: torch.Tensor
    task: torch.Tensor
    noise: torch.Tensor
    K: int
    model_kwargs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.t.numel())


def draw_eval_set(images: torch.Tensor, labels: Optional[torch.Tensor], bins: TimestepBins, per_bin: int, seed: int,
                  *, device: torch.device, dtype: torch.dtype, conditioning: Optional[dict] = None) -> EvalSet:
    """``per_bin`` samples for each of the K bins from a CPU generator seeded with ``seed`` (same on every
    device); ``labels`` given (not None) means the model is class-conditional and receives them as ``y``;
    ``conditioning`` (per-sample tensors by name) gives the drawn rows to the model by name (floats in ``dtype``)."""
    batch = sample_task_batch(images.cpu(), bins, per_bin, seed, labels=None if labels is None else labels.cpu(),
                              conditional=labels is not None,
                              conditioning={k: v.cpu() for k, v in (conditioning or {}).items()})
    kwargs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.model_kwargs.items()}
    return EvalSet(batch.x0.to(device, dtype), batch.t.to(device), batch.task.to(device), batch.noise.to(device, dtype),
                   bins.K, kwargs)


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """theta_0: the model's trainable parameters as a dict of detached clones (the form copies are evaluated in)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate_losses(model: nn.Module, eval_set: EvalSet, schedule: NoiseSchedule, prediction: str,
                    params: Optional[dict[str, torch.Tensor]] = None, *, chunk: int = 512) -> torch.Tensor:
    """Mean x0-unit loss of each bin on the evaluation set, ``(K,)`` float64 on the CPU.

    ``params`` replaces the model's trainable parameters (``functional_call``; None = the model's own,
    passed the same way). The model is run in eval mode; chunks of ``chunk`` samples keep memory bounded
    and are the same for every evaluation, so equal parameters give bit-equal losses."""
    params = base_params(model) if params is None else params
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()

    def call(x: torch.Tensor, t: torch.Tensor, **k: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x, t), k)

    sums = torch.zeros(eval_set.K, dtype=torch.float64)
    try:
        for lo in range(0, len(eval_set), chunk):
            sl = slice(lo, lo + chunk)
            kw = {k: v[sl] for k, v in eval_set.model_kwargs.items()}
            l = per_sample_losses(call, eval_set.x0[sl], eval_set.t[sl], eval_set.noise[sl], schedule,
                                  prediction=prediction, loss_space="x0", model_kwargs=kw)
            sums.index_add_(0, eval_set.task[sl].cpu(), l.detach().to("cpu", torch.float64))
    finally:
        for m, mode in was_training:
            m.training = mode
    counts = torch.bincount(eval_set.task.cpu(), minlength=eval_set.K).to(torch.float64)
    losses = sums / counts
    if not bool(torch.isfinite(losses).all()):
        bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
        raise ValueError(f"the evaluation loss is NaN or Inf for bin(s) {bad[:10]}; check the model output, the "
                         "schedule and the fine-tuning lr (a diverged copy gives NaN weights)")
    return losses


def relative_reduction(before: np.ndarray | torch.Tensor, after: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(L_j(theta_0) - L_j(theta_i)) / L_j(theta_0)`` (dimensionless; > 0: the loss of bin j went down).

    ``before`` (K,) broadcasts against ``after`` (C, K) or (K,). A zero loss before gives NaN."""
    b = np.asarray(before, dtype=np.float64)
    a = np.asarray(after, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(b > 0, (b - a) / np.where(b > 0, b, 1.0), np.nan)
