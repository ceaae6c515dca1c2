"""The regularized Pareto objective and its Frank-Wolfe duality gap.

    f(w)   = w^T G w + lam * ||w||^2 = w^T (G + lam I) w
    grad   = 2 (G + lam I) w
    gap(w) = grad^T w - min_i grad_i  (>= 0 on the simplex, 0 iff w optimal)

By convexity ``f(w) - f* <= gap(w)``.

The solvers stop on :func:`gap_tolerance`: ``gap <= tol * f(w)``, which certifies the objective to a relative
accuracy ``(f - f*) / f <= tol`` however widely G's diagonal is spread (an x0-unit Gram's can span ten decades,
and a tolerance relative to the largest entry would then mean nothing at the optimum).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validate import as_gram, check_lam, check_simplex


ROUNDING = 4.0 * float(np.finfo(np.float64).eps)  # per task: worst-case float64 rounding of g = Q w and f = w^T g


def gap_tolerance(Q: np.ndarray, W: np.ndarray, g: np.ndarray, tol: float, *, d: np.ndarray | None = None,
                  f: np.ndarray | None = None, j: np.ndarray | None = None) -> np.ndarray:
    """Duality gap that counts as converged, for stacks ``Q`` (n, K, K), ``W`` (n, K) and ``g = Q w``:
    ``max(tol * f, 4 K eps * b)`` with ``f = w^T g``.

    ``gap <= tol * f`` certifies ``(f - f*) / f <= tol``.  The floor is the rounding level of the computed gap
    ``2 (f - min_i g_i)``: with ``d = sqrt(diag Q)``, ``|Q_ij| <= d_i d_j`` bounds the sums' terms by
    ``b = (d^T w) (d^T w + d_i*)``, ``i* = argmin_i g_i``, and a sum of K rounded terms errs by at most about
    ``K eps`` of its terms' magnitudes (a worst case: typical errors are nearer ``sqrt(K) eps``, so the answer
    is usually more accurate than certified).  The floor lets an optimum
    ``f* = 0`` (lam = 0 with zero in the tasks' convex hull) be certified.  As ``b >= f``, it matters only
    when the gradients cancel (``f << b``): the computed objective is then itself certain only to
    ``K eps b / f`` relative, and no smaller tolerance can be certified.  Where the solution is known
    only to the rounding of an ill-conditioned system (lam = 0, nearly dependent tasks), neither bound may be
    reached and the solver reports ``converged=False``.  ``tol = 0`` has no floor: run to the iteration cap
    unless the gap is exactly 0.

    Iterative callers pass what they hold already: ``d`` (:func:`sqrt_diagonal`, fixed per problem), ``f`` and
    ``j = argmin_i g_i`` (the same numbers, not recomputed every iteration).
    """
    f = np.einsum("ni,ni->n", W, g) if f is None else f
    if tol <= 0:
        return np.zeros_like(f)
    d = sqrt_diagonal(Q) if d is None else d
    j = np.argmin(g, axis=1) if j is None else j
    dw = np.einsum("ni,ni->n", d, W)
    b = dw * (dw + d[np.arange(len(f)), j])
    return np.maximum(tol * f, ROUNDING * Q.shape[-1] * b)


def sqrt_diagonal(Q: np.ndarray) -> np.ndarray:
    """``d = sqrt(max(diag Q, 0))`` per matrix of an (n, K, K) stack (the scale of :func:`gap_tolerance`'s floor)."""
    return np.sqrt(np.maximum(np.einsum("nii->ni", Q), 0.0))


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
