"""The regularized Pareto objective and its Frank-Wolfe duality gap.

    f(w)   = w^T G w + lam * ||w||^2 = w^T (G + lam I) w
    grad   = 2 (G + lam I) w
    gap(w) = grad^T w - min_i grad_i  (>= 0 on the simplex, 0 iff w optimal)

By convexity ``f(w) - f* <= gap(w)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validate import as_gram, check_lam, check_simplex


def _broadcast(G: Any, w: Any, lam: Any, atol: float) -> tuple[np.ndarray, np.ndarray, float, bool]:
    Gs, g_batched = as_gram(G, check_psd=False, check_symmetry=False)
    K = Gs.shape[-1]
    W = check_simplex(w, K=K, atol=atol)
    lam_f = check_lam(lam)
    batched = g_batched or W.ndim == 2
    W2 = np.atleast_2d(W)
    if g_batched and W.ndim == 2 and W2.shape[0] != Gs.shape[0]:
        raise ValueError(
            f"G holds {Gs.shape[0]} matrices but w holds {W2.shape[0]} weight vectors; "
            "pass one weight vector per matrix or a single (K,) vector"
        )
    n = max(Gs.shape[0], W2.shape[0])
    return np.broadcast_to(Gs, (n, K, K)), np.broadcast_to(W2, (n, K)), lam_f, batched


def _quad(Gs: np.ndarray, W: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(f, g)`` with ``g = (G + lam I) w`` and ``f = w^T g`` (stacked)."""
    g = np.einsum("nij,nj->ni", Gs, W) + lam * W
    return np.einsum("ni,ni->n", W, g), g


def objective(G: Any, w: Any, lam: float = 0.0, *, atol: float = 1e-8) -> float | np.ndarray:
    """Regularized Pareto objective ``f(w) = w^T G w + lam * ||w||^2``.

    Args:
        G: (K, K) Gram matrix or (n, K, K) stack (numpy, torch or pandas).
        w: (K,) weights or (n, K) stack, each on the probability simplex
            (``w_i >= -atol``, ``|sum w - 1| <= atol``), else ``ValueError``.
        lam: ridge coefficient ``lam >= 0``.

    Returns:
        A float, or an (n,) array when ``G`` or ``w`` is stacked (a single
        ``G`` or ``w`` is broadcast against the other's stack).
    """
    Gs, W, lam_f, batched = _broadcast(G, w, lam, atol)
    f, _ = _quad(Gs, W, lam_f)
    return f if batched else float(f[0])


def duality_gap(G: Any, w: Any, lam: float = 0.0, *, atol: float = 1e-8) -> float | np.ndarray:
    """Frank-Wolfe duality gap ``grad^T w - min_i grad_i``, ``grad = 2 (G + lam I) w``.

    Same broadcasting rules as :func:`objective`.  Bounds the suboptimality:
    ``f(w) - min f <= gap``.
    """
    Gs, W, lam_f, batched = _broadcast(G, w, lam, atol)
    f, g = _quad(Gs, W, lam_f)
    gap = np.maximum(2.0 * (f - g.min(axis=1)), 0.0)
    return gap if batched else float(gap[0])
