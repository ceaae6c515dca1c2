"""The regularized Pareto objective and its Frank-Wolfe duality gap.

    f(w)   = w^T G w + lam * ||w||^2 = w^T (G + lam I) w
    grad   = 2 (G + lam I) w
    gap(w) = grad^T w - min_i grad_i  (>= 0 on the simplex, 0 iff w optimal)

By convexity ``f(w) - f* <= gap(w)``.

The solvers stop on :func:`gap_tolerance`: ``gap <= tol * f(w)``, which certifies the objective to a relative
accuracy ``(f - f*) / f <= tol`` however widely G's diagonal is spread (an x0-unit Gram's can span ten decades,
and a tolerance relative to the largest entry would then mean nothing at the optimum), down to a floor at the
rounding level of G.  :func:`certify` applies that rule from the original G to every method's answer after it
returns: one ``converged`` rule for all methods (#15).
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


def rounding_floor(W: np.ndarray, g: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Rounding level of the computed duality gap ``2 (f - min_i g_i)`` at weights ``W`` (n, K), with
    ``g = (G + lam I) w`` and ``d = sqrt(diag G + lam)`` (both (n, K))::

        floor = 4 K eps D (d^T w + d_N),   D = max_j w_j * sum_{j in S} d_j.

    A float64 solve on the support ``S = {j: w_j > 2 K eps max w}`` (smaller weights are zero at this
    level) gives weights accurate to about ``2 K eps max_j w_j`` each: normwise, not relative to each weight
    (a weight of 1e-2 next to one of 0.98 is known to ~eps, not to 1e-2 eps).  With ``|G_ij| <= d_i d_j``
    each computed ``g_i`` is then uncertain by ``r_i = 2 K eps d_i D`` and ``f = w^T g`` by
    ``2 K eps D (d^T w)``, and the smallest ``g_i`` may be that of any task in
    ``N = {i: g_i - r_i <= min_k (g_k + r_k)}``; ``d_N = max_{i in N} d_i``.  A gap below the floor is
    what an optimum has at the rounding level of G (e.g. ``f* = 0`` at lam = 0 on a rank-deficient G);
    large-norm tasks off the support and far from the minimum do not widen it, so a loose answer on a Gram
    whose diagonal spans ten decades is not covered (on the K = 30 such Gram of the tests, with lam =
    1e-6 trace / K, the floor at the optimum is ~3e-8 f, far below the gap of CVXPY's "optimal" answer there,
    ~1e-4 f; a tol below the floor is certified only to the floor).  The floor is homogeneous in the scale of G.
    """
    unit = 0.5 * ROUNDING * W.shape[-1]  # 2 K eps
    w_max = W.max(axis=1)
    D = w_max * np.where(W > unit * w_max[:, None], d, 0.0).sum(axis=1)
    r = unit * d * D[:, None]  # uncertainty of each computed g_i
    tied = g - r <= (g + r).min(axis=1, keepdims=True)  # tasks whose gradient may be the smallest
    d_tied = np.where(tied, d, 0.0).max(axis=1)
    return 2.0 * unit * D * (np.einsum("ni,ni->n", d, W) + d_tied)


def certify(Gs: np.ndarray, W: np.ndarray, lam: float, tol: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The one ``converged`` rule of :func:`gradconflict.pareto.solve`, applied to any weights after a solver.

    For a float64 stack ``Gs`` (n, K, K) of the ORIGINAL (validated) Gram matrices and weights ``W`` (n, K),
    with ``g = (G + lam I) w``::

        f         = w^T g                              (the objective)
        gap       = max(2 (f - min_i g_i), 0)          (= grad^T w - min_i grad_i, grad = 2 g)
        converged = gap <= max(tol * f, floor)         (floor = 0 when tol <= 0)

    ``gap <= tol * f`` certifies ``(f - f*) / f <= tol``.  ``floor = 4 K eps D (d^T w + d_N)``,
    ``d = sqrt(diag G + lam)`` (:func:`rounding_floor`), is the rounding level of the gap: it certifies an
    optimum at the rounding level of G (e.g. ``f* = 0`` at lam = 0), while an answer that ``tol`` rejects for
    more than rounding (a backend at loose tolerances) is not certified, whatever its own status says.  The
    methods' own stopping test (:func:`gap_tolerance`, on the scaled copy) also passes, so an answer a method
    accepts is certified.  Returns ``(f, gap, converged)``, each (n,).
    """
    g = np.matmul(Gs, W[:, :, None])[:, :, 0] + lam * W  # BLAS; einsum does not use it here
    f = np.einsum("ni,ni->n", W, g)
    gap2 = 2.0 * (f - g.min(axis=1))
    if tol <= 0:
        return f, np.maximum(gap2, 0.0), gap2 <= 0
    d = np.sqrt(np.maximum(np.einsum("nii->ni", Gs) + lam, 0.0))
    # gap_tolerance: the methods' own stopping test (a floor not above this one but for dust weights)
    ok = gap2 <= np.maximum(gap_tolerance(Gs, W, g, tol, d=d, f=f), rounding_floor(W, g, d))
    return f, np.maximum(gap2, 0.0), ok


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
