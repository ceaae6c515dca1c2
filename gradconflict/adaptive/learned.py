"""``learned_uncertainty``: a per-log-SNR loss weight learned jointly with the model.

With ``u(t) = MLP(phi(log SNR_t))`` a small network of Fourier features of the log-SNR, the loss is

    loss = mean_i( base_i * err_i * exp(-u_i) + u_i ),     base = the eps-loss weight 1,

i.e. ``base = w_snr / c(SNR)``: 1 for an eps model, ``SNR`` for x0, ``SNR / (SNR + 1)`` for v, so that
``base * err`` is the squared error in eps units whatever the model predicts (``weighting.snr``). For fixed
errors the minimiser over u is ``u = log(base * err)`` (``d/du (e exp(-u) + u) = 1 - e exp(-u) = 0``), so
``exp(-u)`` learns the inverse of the expected eps-unit error at each noise level: the adaptive weighting of
recent diffusion training recipes (uncertainty weighting of timestep tasks). The reported loss includes the
``+u`` term. ``loss_weights(t)`` is the effective weight ``base * exp(-u)`` (detached).

The network starts at ``u = 0`` (the last layer is zero), so training starts as the plain eps loss; its
initialization uses its own seeded generator and leaves the global RNG untouched.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..schedule import NoiseSchedule
from ..weighting import snr as snr_strategy
from .base import AdaptiveWeighting

__all__ = ["LearnedUncertainty", "learned_uncertainty", "LOG_SNR_RANGE"]

LOG_SNR_RANGE = 20.0  # log-SNR is clamped into [-20, 20] and scaled by 1/20 before the Fourier features


class _UNet(nn.Module):
    def __init__(self, hidden: int, frequencies: int) -> None:
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies, dtype=torch.float32) / 2.0)
        self.net = nn.Sequential(nn.Linear(2 * frequencies + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, log_snr: torch.Tensor) -> torch.Tensor:
        x = (log_snr.clamp(-LOG_SNR_RANGE, LOG_SNR_RANGE) / LOG_SNR_RANGE)[:, None].float()
        phase = x * self.freqs
        return self.net(torch.cat([x, torch.sin(phase), torch.cos(phase)], dim=1))[:, 0]


class LearnedUncertainty(AdaptiveWeighting):
    """Loss ``mean(base * err * exp(-u) + u)`` with ``u`` an MLP of log-SNR (module docstring)."""

    def __init__(self, hidden: int = 32, frequencies: int = 4, seed: int = 0) -> None:
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.u = _UNet(hidden, frequencies)
        nn.init.zeros_(self.u.net[-1].weight)
        nn.init.zeros_(self.u.net[-1].bias)
        self.name = "learned_uncertainty"
        self.spec = "learned_uncertainty" if hidden == 32 else f"learned_uncertainty:{hidden}"

    def log_variance(self, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """``u(t)``, shape (n,), float32, on the network's device (differentiable)."""
        device = next(self.u.parameters()).device
        return self.u(schedule.log_snr(t.detach().to(device)))

    def _base(self, t: torch.Tensor, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
        return snr_strategy().weight(schedule.snr(t), target=prediction)

    def loss_weights(self, t: torch.Tensor, *, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
        """Effective weight ``base * exp(-u(t))`` on the squared error in ``prediction`` units (float64, detached)."""
        with torch.no_grad():
            u = self.log_variance(t, schedule).double().to(t.device)
        return self._base(t, schedule, prediction) * torch.exp(-u)

    def loss(self, err: torch.Tensor, t: torch.Tensor, *, schedule: NoiseSchedule, prediction: str) -> torch.Tensor:
        """``mean_i(base_i * err_i * exp(-u_i) + u_i)``; gradients flow to the model and to ``u``."""
        u = self.log_variance(t, schedule).to(device=err.device, dtype=err.dtype)
        base = self._base(t, schedule, prediction).to(device=err.device, dtype=err.dtype)
        return (base * err * torch.exp(-u) + u).mean()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.u.parameters())

    def to(self, device: Any) -> "LearnedUncertainty":
        self.u.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.u.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.u.load_state_dict(state)


def learned_uncertainty(hidden: int = 32, frequencies: int = 4, seed: int = 0) -> LearnedUncertainty:
    """A learned per-log-SNR weighting, ``loss = mean(base * err / exp(u) + u)`` (see the module docstring);
    add ``strategy.parameters()`` to the optimizer."""
    return LearnedUncertainty(hidden, frequencies, seed)
