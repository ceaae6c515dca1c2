"""The ``AdaptiveWeighting`` protocol: a loss weighting usable in any training loop, fixed or updated online.

A training step with a strategy ``s`` reads::

    s.step(model, x0, step=i, model_kwargs=kw)        # online update (no-op for fixed weightings)
    err = per-sample squared error in the model's prediction units, shape (n,)
    loss = s.loss(err, t, schedule=schedule, prediction=prediction)
    loss.backward(); optimizer.step()                 # the optimizer also holds s.parameters()

Units: a weighting is defined in x0 units, ``w_x0(t)``, and applied to the squared error in the model's
prediction units with the rule of :mod:`gradconflict.weighting`: ``w_pred = w_x0 / c(SNR_t)`` with
``c = 1`` (x0), ``SNR`` (eps), ``SNR + 1`` (v).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..schedule import NoiseSchedule
from ..targets import loss_factor, normalize_prediction
from ..weighting import SNR_MAX, SNR_MIN, WeightingStrategy

__all__ = ["AdaptiveWeighting", "FixedWeighting", "x0_to_prediction", "preserve_state"]


def x0_to_prediction(w_x0: torch.Tensor, snr: Any, prediction: str) -> torch.Tensor:
    """Weight on the squared error in ``prediction`` units from an x0-unit weight:
    ``w_x0 / c(SNR)`` with ``c = 1, SNR, SNR + 1`` for x0, eps, v; SNR clamped into
    ``[SNR_MIN, SNR_MAX]`` as in :mod:`gradconflict.weighting` (so the weight stays finite)."""
    s = np.clip(np.asarray(snr.detach().cpu() if isinstance(snr, torch.Tensor) else snr, dtype=np.float64),
                SNR_MIN, SNR_MAX)
    c = torch.as_tensor(np.asarray(loss_factor(s, normalize_prediction(prediction))), dtype=torch.float64)
    return w_x0.to(torch.float64).cpu() / c


@contextlib.contextmanager
def preserve_state(model: nn.Module) -> Iterator[None]:
    """Leave ``model``'s training mode, its parameters' ``.grad`` and the global torch RNG (CPU and the
    model's CUDA device) exactly as found, whatever runs inside."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode
            for p, g in grads:
                p.grad = g


class AdaptiveWeighting:
    """Base class of a loss weighting for a training loop (see the module docstring for the step recipe).

    Subclasses set ``name`` and ``spec`` and implement :meth:`x0_weights` (or override
    :meth:`loss_weights`); online ones override :meth:`step`, learned ones :meth:`loss` and :meth:`parameters`.
    """

    name: str = "adaptive"
    spec: str = "adaptive"

    def x0_weights(self, t: torch.Tensor, *, schedule: NoiseSchedule) -> torch.Tensor:
        """Per-sample weight on the x0-unit squared error at timesteps ``t`` (float64, CPU)."""
        raise NotImplementedError

    def loss_weights(self, t: torch.Tensor, *, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
        """Per-sample weight on the squared error in ``prediction`` units (float64, on ``t``'s device):
        ``x0_weights(t) / c(SNR_t)`` (see :func:`x0_to_prediction`)."""
        w = x0_to_prediction(self.x0_weights(t, schedule=schedule), schedule.snr(t.detach().cpu()), prediction)
        return w.to(t.device)

    def loss(self, err: torch.Tensor, t: torch.Tensor, *, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
        """Training loss from the per-sample squared errors ``err`` (n,) in ``prediction`` units:
        ``mean_i(loss_weights(t)_i * err_i)``, the weights cast to ``err``'s dtype and device."""
        weight = self.loss_weights(t, schedule=schedule, prediction=prediction).to(device=err.device, dtype=err.dtype)
        return (weight * err).mean()

    def step(self, model: nn.Module, x0: torch.Tensor, *, step: int, model_kwargs: Optional[dict] = None) -> None:
        """Online update before the training step ``step`` (0-based) on the batch ``x0``; no-op here."""

    def parameters(self) -> list[nn.Parameter]:
        """Extra trainable parameters to add to the optimizer (none here)."""
        return []

    def to(self, device: Any) -> "AdaptiveWeighting":
        """Move any tensors or modules to ``device``; returns self."""
        return self

    def state_dict(self) -> dict[str, Any]:
        """State needed for a bit-exact resume (tensors, numbers and strings only; ``weights_only``-loadable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class FixedWeighting(AdaptiveWeighting):
    """A fixed :class:`~gradconflict.weighting.WeightingStrategy` as an ``AdaptiveWeighting``: its weight
    ``strategy.weight(SNR_t, target=prediction)`` (the exact eps/v forms, finite at SNR = 0 and inf)."""

    def __init__(self, strategy: WeightingStrategy, spec: Optional[str] = None) -> None:
        self.strategy = strategy
        self.name = strategy.name
        self.spec = spec or strategy.name

    def x0_weights(self, t: torch.Tensor, *, schedule: NoiseSchedule) -> torch.Tensor:
        return self.strategy.weight(schedule.snr(t.detach().cpu()), target="x0")

    def loss_weights(self, t: torch.Tensor, *, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
        return self.strategy.weight(schedule.snr(t), target=prediction)
