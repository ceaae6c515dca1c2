"""Variance-preserving noise schedules: ``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t^2 + sigma_t^2 = 1``.

Timesteps are integers ``0..T-1`` as in diffusers; ``alphas_cumprod[t] = alpha_t^2`` (written alphabar_t).
All values are kept in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._arrays import as_float64_numpy, as_index_numpy, like_input

__all__ = ["NoiseSchedule", "prediction_type_of", "rescale_zero_terminal_snr"]


def rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Rescale ``alphabar`` so that the last timestep has SNR = 0 (Lin et al. 2024, "Common diffusion noise
    schedules and sample steps are flawed", Alg. 1).

    ``sqrt(alphabar)`` is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    root = np.sqrt(np.asarray(alphas_cumprod, dtype=np.float64))
    first, last = root[0], root[-1]
    if first <= last:
        raise ValueError("cannot rescale to zero terminal SNR: alphas_cumprod is constant")
    root = (root - last) * first / (first - last)
    return root**2


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete variance-preserving noise schedule given by ``alphas_cumprod`` (alphabar_t), t = 0..T-1.

    ``alpha(t) = sqrt(alphabar_t)``, ``sigma(t) = sqrt(1 - alphabar_t)``, ``snr(t) = alphabar_t / (1 - alphabar_t)``
    (dimensionless), ``log_snr(t) = log(snr(t))`` (natural log; ``-inf`` where SNR = 0).
    """

    alphas_cumprod: np.ndarray
    name: str = "custom"

    def __post_init__(self) -> None:
        a = np.array(self.alphas_cumprod, dtype=np.float64).reshape(-1)
        if a.size == 0:
            raise ValueError("alphas_cumprod is empty: a schedule needs at least one timestep")
        if not np.all(np.isfinite(a)):
            raise ValueError("alphas_cumprod contains NaN or Inf")
        if np.any(a > 1.0) or np.any(a < 0.0):
            raise ValueError(f"alphas_cumprod must lie in [0, 1], got min {a.min():.3g} and max {a.max():.3g}")
        if np.any(a >= 1.0):
            raise ValueError("alphas_cumprod must be < 1 at every timestep (sigma_t = 0 means no noise)")
        if np.any(a[:-1] == 0.0):
            raise ValueError("only the last timestep may have alphas_cumprod = 0 (zero terminal SNR)")
        if np.any(np.diff(a) > 0):
            raise ValueError("alphas_cumprod must be non-increasing in t (noise must grow with t)")
        a.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", a)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Any, *, zero_terminal_snr: bool = False, name: str = "custom") -> "NoiseSchedule":
        """Schedule from ``alphabar_t`` directly (tensor, array or list)."""
        a = as_float64_numpy(alphas_cumprod).reshape(-1)
        if zero_terminal_snr:
            a = rescale_zero_terminal_snr(a)
            name = f"{name}+zsnr"
        return cls(a, name=name)

    @classmethod
    def from_betas(cls, betas: Any, *, zero_terminal_snr: bool = False, name: str = "custom") -> "NoiseSchedule":
        """Schedule from per-step variances: ``alphabar_t = prod_{s <= t} (1 - beta_s)``; betas in (0, 1]."""
        b = as_float64_numpy(betas).reshape(-1)
        if b.size == 0 or not np.all(np.isfinite(b)):
            raise ValueError("betas must be a non-empty finite sequence")
        if np.any(b <= 0) or np.any(b > 1):
            raise ValueError(f"betas must lie in (0, 1], got min {b.min():.3g} and max {b.max():.3g}")
        return cls.from_alphas_cumprod(np.cumprod(1.0 - b), zero_terminal_snr=zero_terminal_snr, name=name)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """DDPM's linear schedule: betas evenly spaced from ``beta_start`` to ``beta_end`` over T steps."""
        _check_T(T)
        return cls.from_betas(np.linspace(beta_start, beta_end, T), zero_terminal_snr=zero_terminal_snr, name="linear")

    @classmethod
    def scaled_linear(cls, T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Stable Diffusion's schedule: ``sqrt(beta)`` evenly spaced, ``betas = linspace(sqrt(b0), sqrt(b1), T)^2``."""
        _check_T(T)
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T) ** 2
        return cls.from_betas(betas, zero_terminal_snr=zero_terminal_snr, name="scaled_linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule, ``f(u) = cos^2((u + s) / (1 + s) * pi / 2)``, as diffusers'
        ``squaredcos_cap_v2``: ``beta_t = min(1 - f((t+1)/T) / f(t/T), max_beta)``."""
        _check_T(T)
        u = np.arange(T + 1, dtype=np.float64) / T
        f = np.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
        return cls.from_betas(betas, zero_terminal_snr=zero_terminal_snr, name="cosine")

    @classmethod
    def from_diffusers(cls, scheduler: Any, *, zero_terminal_snr: bool = False) -> "NoiseSchedule":
        """Schedule of a diffusers scheduler (anything with an ``alphas_cumprod`` attribute; duck-typed, so
        diffusers is not imported). Its prediction type is ``prediction_type_of(scheduler)``."""
        a = getattr(scheduler, "alphas_cumprod", None)
        if a is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no alphas_cumprod; pass a DDPM/DDIM-style scheduler or use "
                "NoiseSchedule.from_alphas_cumprod"
            )
        return cls.from_alphas_cumprod(a, zero_terminal_snr=zero_terminal_snr, name=type(scheduler).__name__)

    def rescaled_zero_terminal_snr(self) -> "NoiseSchedule":
        """This schedule rescaled so that ``snr(T-1) = 0``."""
        return NoiseSchedule(rescale_zero_terminal_snr(self.alphas_cumprod), name=f"{self.name}+zsnr")

    # ------------------------------------------------------------------ quantities
    @property
    def T(self) -> int:
        """Number of timesteps."""
        return int(self.alphas_cumprod.size)

    @property
    def betas(self) -> np.ndarray:
        """Per-step variances ``beta_t = 1 - alphabar_t / alphabar_{t-1}``."""
        a = self.alphas_cumprod
        prev = np.concatenate([[1.0], a[:-1]])
        return 1.0 - a / prev

    def _at(self, t: Any, values: np.ndarray) -> Any:
        if isinstance(t, torch.Tensor):  # pure torch path: works inside torch.func transforms and on any device
            if t.is_floating_point() or t.is_complex():
                raise ValueError(f"t must hold integer timesteps, got a {t.dtype} tensor; use t.long()")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.T):
                raise ValueError(
                    f"t out of range: timesteps must lie in [0, {self.T - 1}], got min {int(t.min())} and max {int(t.max())}"
                )
            table = torch.from_numpy(values)
            return table.to(t.device)[t.long()]
        idx = as_index_numpy(t, self.T)
        return like_input(values[idx], t)

    def alpha(self, t: Any) -> Any:
        """Signal scale ``alpha_t = sqrt(alphabar_t)`` at integer timesteps t (same kind as t, float64)."""
        return self._at(t, np.sqrt(self.alphas_cumprod))

    def sigma(self, t: Any) -> Any:
        """Noise scale ``sigma_t = sqrt(1 - alphabar_t)`` at integer timesteps t."""
        return self._at(t, np.sqrt(1.0 - self.alphas_cumprod))

    def snr(self, t: Any) -> Any:
        """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2`` (dimensionless) at integer timesteps t."""
        a = self.alphas_cumprod
        return self._at(t, a / (1.0 - a))

    def log_snr(self, t: Any) -> Any:
        """Natural log of the SNR at integer timesteps t; ``-inf`` where SNR = 0 (zero terminal SNR)."""
        a = self.alphas_cumprod
        with np.errstate(divide="ignore"):
            values = np.log(a) - np.log1p(-a)
        return self._at(t, values)

    def __repr__(self) -> str:
        return f"NoiseSchedule(name={self.name!r}, T={self.T})"


def prediction_type_of(scheduler: Any) -> str:
    """The prediction type ("eps", "x0" or "v") declared by a diffusers-style scheduler's config."""
    config = getattr(scheduler, "config", None)
    raw = getattr(config, "prediction_type", None) if config is not None else None
    if raw is None and isinstance(config, dict):
        raw = config.get("prediction_type")
    if raw is None:
        raw = getattr(scheduler, "prediction_type", "epsilon")
    from .targets import normalize_prediction

    return normalize_prediction(str(raw))


def _check_T(T: int) -> None:
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer number of timesteps, got {T!r}")
