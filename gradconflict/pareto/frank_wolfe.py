"""Frank-Wolfe for ``min_w w^T Q w`` over the probability simplex, batched.

``Q = (G + lam I) / s`` is the normalized matrix built by
:func:`gradconflict.pareto.solve` (``s = max_i (G_ii + lam)``, so the
largest value of the objective on the simplex is 1).  Internally
``g = Q w`` is carried along and updated in O(K) per step.

Step (exact line search for a quadratic): along ``d`` the objective is
``f(w + t d) = f + 2 t g^T d + t^2 d^T Q d``, minimized at
``t* = -g^T d / d^T Q d``, clipped to ``[0, t_max]``.

Variants (``variant=``):

* ``"vanilla"``: classic Frank-Wolfe, ``d = e_j - w`` with
  ``j = argmin_i grad_i``, ``t_max = 1``.  Sublinear O(1/t) convergence.
* ``"away"`` (default): away-step Frank-Wolfe (Guelat & Marcotte; Lacoste-
  Julien & Jaggi 2015).  Takes the better of the FW direction and the away
  direction ``d = w - e_a``, ``a = argmax_{i: w_i > 0} grad_i``,
  ``t_max = w_a / (1 - w_a)``.  Linear convergence when ``lam > 0``.
* ``"pairwise"``: ``d = e_j - e_a``, ``t_max = w_a``.

Stopping rule: the duality gap ``2 (w^T g - min_i g_i) <= tol * f(w)``
(:func:`..objective.gap_tolerance`), which certifies the objective to a
relative accuracy ``(f - f*) / f <= tol``.  Default ``tol = 1e-8``,
``max_iter = 10_000``; a problem that hits ``max_iter`` returns
``converged = False`` (the ``converged`` that :func:`..solve` reports is its
one rule for every method, :func:`.objective.certify`).
"""

from __future__ import annotations

import numpy as np

from .objective import gap_tolerance, sqrt_diagonal

VARIANTS = ("vanilla", "away", "pairwise")


def frank_wolfe(
    Q: np.ndarray,
    *,
    tol: float = 1e-8,
    max_iter: int = 10_000,
    variant: str = "away",
    w0: np.ndarray | None = None,
    refresh: int = 500,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run Frank-Wolfe on a normalized stack ``Q`` of shape (n, K, K).

    Args:
        Q: normalized PSD matrices ``(G + lam I) / s``.
        tol: relative duality-gap tolerance (``gap <= tol * f(w)``).
        max_iter: hard cap on the number of iterations per problem.
        variant: ``"vanilla"``, ``"away"`` or ``"pairwise"``.
        w0: optional (K,) or (n, K) start on the simplex; default is the best
            vertex ``e_j`` with ``j = argmin_i Q_ii``.
        refresh: recompute ``g = Q w`` from scratch every ``refresh`` steps
            to stop rounding drift.

    Returns:
        ``(W, iterations, converged)`` with shapes (n, K), (n,), (n,).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown Frank-Wolfe variant {variant!r}; valid variants are {', '.join(VARIANTS)}")
    max_iter = int(max_iter)
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    n, K, _ = Q.shape
    rows = np.arange(n)
    diag = np.einsum("nii->ni", Q)
    root_diag = sqrt_diagonal(Q)  # fixed per problem: the convergence floor's scale
    if w0 is None:
        W = np.zeros((n, K))
        W[rows, np.argmin(diag, axis=1)] = 1.0
    else:
        W = np.array(np.broadcast_to(w0, (n, K)), dtype=np.float64)
    g = np.einsum("nij,nj->ni", Q, W)
    iters = np.zeros(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for t in range(max_iter + 1):
        if t and t % refresh == 0:
            g = np.einsum("nij,nj->ni", Q, W)
        f = np.einsum("ni,ni->n", W, g)
        j = np.argmin(g, axis=1)
        gj = g[rows, j]
        active &= 2.0 * (f - gj) > gap_tolerance(Q, W, g, tol, d=root_diag, f=f, j=j)
        if t == max_iter or not active.any():
            break
        iters += active
        if variant == "vanilla":
            num, den, idx, sign, tmax = f - gj, diag[rows, j] - 2.0 * gj + f, j, 1.0, 1.0
        else:
            ga_all = np.where(W > 0, g, -np.inf)
            a = np.argmax(ga_all, axis=1)
            ga = g[rows, a]
            wa = W[rows, a]
            if variant == "pairwise":
                qja = Q[rows, j, a]
                num = ga - gj
                den = diag[rows, j] + diag[rows, a] - 2.0 * qja
                step = np.where(active, _line_search(num, den, wa), 0.0)
                W[rows, j] += step
                W[rows, a] -= step
                W[rows[step == wa], a[step == wa]] = 0.0
                g += step[:, None] * (Q[rows, :, j] - Q[rows, :, a])
                continue
            use_fw = (f - gj) >= (ga - f)
            idx = np.where(use_fw, j, a)
            sign = np.where(use_fw, 1.0, -1.0)
            num = np.where(use_fw, f - gj, ga - f)
            gi = g[rows, idx]
            den = diag[rows, idx] - 2.0 * gi + f
            with np.errstate(divide="ignore", invalid="ignore"):
                tmax = np.where(use_fw, 1.0, np.where(wa < 1.0, wa / (1.0 - wa), 0.0))
        step = np.where(active, _line_search(num, den, tmax), 0.0)
        coef = step * sign
        W *= (1.0 - coef)[:, None]
        W[rows, idx] += coef
        g += coef[:, None] * (Q[rows, :, idx] - g)
        if variant == "away":
            drop = active & (sign < 0) & (step >= tmax)
            W[rows[drop], idx[drop]] = 0.0
        np.maximum(W, 0.0, out=W)
    W /= W.sum(axis=1, keepdims=True)
    g = np.einsum("nij,nj->ni", Q, W)
    f = np.einsum("ni,ni->n", W, g)
    return W, iters, 2.0 * (f - g.min(axis=1)) <= gap_tolerance(Q, W, g, tol, d=root_diag, f=f)


def _line_search(num: np.ndarray, den: np.ndarray, tmax: np.ndarray | float) -> np.ndarray:
    """``clip(num / den, 0, tmax)``; a zero curvature ``den`` gives ``tmax``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(den > 0, num / den, np.where(num > 0, np.inf, 0.0))
    return np.clip(t, 0.0, tmax)
