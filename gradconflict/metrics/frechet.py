"""The Fréchet (2-Wasserstein) distance between two Gaussians, from feature statistics.

For ``N(mu1, C1)`` and ``N(mu2, C2)``::

    FD = ||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})

``tr (C1 C2)^{1/2}`` equals ``tr (S C2 S)^{1/2}`` with ``S = C1^{1/2}`` (``C1 C2`` is similar to the symmetric PSD
matrix ``S C2 S``, so both have the same non-negative eigenvalues). It is computed from two symmetric eigen-
decompositions in float64, with eigenvalues clipped at 0, so it stays real and finite for singular covariances
(fewer samples than features) where ``scipy.linalg.sqrtm`` of the non-symmetric ``C1 C2`` can return complex
noise. The tests use ``scipy.linalg.sqrtm`` as an independent reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["gaussian_stats", "frechet_distance", "trace_sqrt_product"]


def _as_float64(x: Any, name: str) -> np.ndarray:
    """``x`` (tensor or array-like) as a float64 numpy array; refuses NaN/Inf."""
    arr = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or Inf values; pass finite numbers")
    return arr


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, divisor N - 1) of features ``(N, D)``, in float64.

    ``features``: a tensor or array with one row per sample; N >= 2 rows are needed for a covariance.
    """
    x = _as_float64(features, "features")
    if x.ndim != 2:
        raise ValueError(f"features must have shape (N, D) (one row per sample), got {x.shape}; flatten them first")
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}; pass more samples")
    mu = x.mean(axis=0)
    centred = x - mu
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mu, (cov + cov.T) / 2


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric matrix, negative eigenvalues (round-off) clipped at 0."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """``tr (C1 C2)^{1/2}`` for symmetric PSD ``C1``, ``C2``: the sum of the square roots of the (clipped)
    eigenvalues of the symmetric matrix ``C1^{1/2} C2 C1^{1/2}``."""
    root = _psd_sqrt(cov1)
    middle = root @ cov2 @ root
    values = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def _check_stats(mu: Any, cov: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
    if np.ndim(mu) > 1:
        raise ValueError(f"mu{which} must be a vector (D,), got shape {np.shape(mu)}")
    m = _as_float64(mu, f"mu{which}").reshape(-1)
    c = _as_float64(cov, f"cov{which}")
    if c.ndim == 0 and m.size == 1:
        c = c.reshape(1, 1)
    if c.shape != (m.size, m.size):
        raise ValueError(f"cov{which} must have shape (D, D) = ({m.size}, {m.size}) to match mu{which}, got {c.shape}")
    scale = max(float(np.abs(c).max(initial=0.0)), 1e-300)
    if not np.allclose(c, c.T, rtol=0.0, atol=1e-8 * scale):
        raise ValueError(f"cov{which} is not symmetric; pass a covariance matrix (e.g. from gaussian_stats)")
    return m, (c + c.T) / 2


def frechet_distance(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})`` in float64, in squared feature units.

    Means ``(D,)`` and symmetric PSD covariances ``(D, D)`` (tensors or arrays; a 1-D Gaussian may pass scalar
    variances). The value is >= 0 up to round-off (tiny negative values are returned as 0).
    """
    m1, c1 = _check_stats(mu1, cov1, "1")
    m2, c2 = _check_stats(mu2, cov2, "2")
    if m1.size != m2.size:
        raise ValueError(f"the two Gaussians have different dimensions ({m1.size} and {m2.size}); use the same features")
    diff = m1 - m2
    value = float(diff @ diff) + float(np.trace(c1) + np.trace(c2)) - 2.0 * trace_sqrt_product(c1, c2)
    return max(value, 0.0)
