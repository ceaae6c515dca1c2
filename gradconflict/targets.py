"""Prediction targets of a diffusion model: noise ``eps``, clean data ``x0`` or velocity ``v``.

With ``x_t = alpha * x0 + sigma * eps`` and ``v = alpha * eps - sigma * x0`` (alpha^2 + sigma^2 = 1):

* ``x0 = (x_t - sigma * eps) / alpha = alpha * x_t - sigma * v``
* ``eps = (x_t - alpha * x0) / sigma = sigma * x_t + alpha * v``

Per sample, squared errors in the three spaces are tied by the SNR = alpha^2 / sigma^2:
``||eps - eps_hat||^2 = SNR * ||x0 - x0_hat||^2`` and ``||v - v_hat||^2 = (SNR + 1) * ||x0 - x0_hat||^2``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._arrays import elementwise

__all__ = [
    "PREDICTIONS",
    "normalize_prediction",
    "target",
    "to_x0",
    "to_eps",
    "convert",
    "loss_factor",
    "expand_like",
]

PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v")

_ALIASES = {
    "eps": "eps",
    "epsilon": "eps",
    "noise": "eps",
    "x0": "x0",
    "sample": "x0",
    "x_0": "x0",
    "data": "x0",
    "v": "v",
    "v_prediction": "v",
    "velocity": "v",
}


def normalize_prediction(name: str, what: str = "prediction type") -> str:
    """Canonical name ("eps", "x0" or "v") of a prediction type (or of a loss space: ``what`` names it in the
    error); accepts diffusers' names ("epsilon", "sample", "v_prediction")."""
    key = str(name).lower()
    if key not in _ALIASES:
        raise ValueError(f"unknown {what} {name!r}; use one of {PREDICTIONS} (or diffusers' epsilon/sample/v_prediction)")
    return _ALIASES[key]


def expand_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample coefficients ``(n,)`` to ``(n, 1, ..., 1)`` so they broadcast against ``x``."""
    coef = torch.as_tensor(coef, device=x.device)
    if coef.ndim == 0:
        return coef.to(x.dtype)
    if coef.shape[0] != x.shape[0]:
        raise ValueError(f"got {coef.shape[0]} coefficients for a batch of {x.shape[0]} samples")
    return coef.to(x.dtype).reshape(coef.shape[0], *([1] * (x.ndim - 1)))


def target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """The regression target of a model that predicts ``prediction``: eps, x0 or ``v = alpha*eps - sigma*x0``."""
    kind = normalize_prediction(prediction)
    if kind == "eps":
        return noise
    if kind == "x0":
        return x0
    return expand_like(alpha, x0) * noise - expand_like(sigma, x0) * x0


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model's estimate of x0 from its raw output.

    For eps-prediction at alpha = 0 (zero terminal SNR) x0 is undefined; the output there is ``nan``-free but
    meaningless, so use x0 or v prediction with such schedules.
    """
    kind = normalize_prediction(prediction)
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if kind == "x0":
        return output
    if kind == "eps":
        return (x_t - s * output) / a.clamp_min(torch.finfo(a.dtype).tiny)
    return a * x_t - s * output


def to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model's estimate of the noise eps from its raw output (sigma > 0 at every timestep)."""
    kind = normalize_prediction(prediction)
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    if kind == "eps":
        return output
    if kind == "x0":
        return (x_t - a * output) / s
    return s * x_t + a * output


def convert(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, *, source: str, to: str) -> torch.Tensor:
    """Convert a model output predicting ``source`` into the equivalent prediction of ``to``."""
    src, dst = normalize_prediction(source), normalize_prediction(to)
    if src == dst:
        return output
    if dst == "x0":
        return to_x0(output, x_t, alpha, sigma, src)
    if dst == "eps":
        return to_eps(output, x_t, alpha, sigma, src)
    x0_hat = to_x0(output, x_t, alpha, sigma, src)
    eps_hat = to_eps(output, x_t, alpha, sigma, src)
    return expand_like(alpha, x_t) * eps_hat - expand_like(sigma, x_t) * x0_hat


def loss_factor(snr: Any, space: str) -> Any:
    """Factor c with ``squared error in space = c * squared error in x0 units``: 1 (x0), SNR (eps), SNR + 1 (v).

    Tensor, array or float in, same kind out (float64).
    """
    kind = normalize_prediction(space)
    if kind == "x0":
        return elementwise(np.ones_like, snr)
    if kind == "eps":
        return elementwise(lambda s: s.copy(), snr)
    return elementwise(lambda s: s + 1.0, snr)
