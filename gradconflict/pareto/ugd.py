"""Unconstrained gradient descent (UGD) through a softmax, batched (numpy).

Parametrize ``w = softmax(beta)`` and minimize ``f(w) = w^T Q w`` over
``beta`` in R^K with plain gradient descent or Adam.  With ``g = Q w`` and
``f = w^T g`` the chain rule through the softmax Jacobian
``diag(w) - w w^T`` gives

    d f / d beta = 2 * w * (g - f)          (elementwise).

``Q = (G + lam I) / s`` is normalized by ``s = max_i (G_ii + lam)`` (see
:func:`gradconflict.pareto.solve`), so learning rates are scale-free.

Defaults: ``optimizer="adam"``, ``lr=0.05`` (Adam) / ``lr=10.0`` (SGD),
``steps=1000``, Adam ``betas=(0.9, 0.999)``, ``eps=1e-12``, start
``init="uniform"`` (``beta = 0``) unless an initial beta is given (``init=``
array or ``beta0=``) or a warm start ``w0`` (mapped to
``beta = log((1 - 1e-3) w0 + 1e-3 / K)``: a sparse w0, such as an exact solver's
answer, is mixed with a little of the uniform point so that every task keeps
a gradient; a pure ``log(w0)`` would leave zero weights stuck at zero).

Stopping: a problem stops (its ``beta`` is frozen) as soon as its duality
gap ``2 (f - min_i g_i) <= tol * f`` (relative accuracy of the objective,
:func:`.objective.gap_tolerance`; default ``1e-8``);
``iterations`` is the number of optimizer steps it took and ``converged``
is that test at the end (the ``converged`` that :func:`..solve` reports is
its one rule for every method, :func:`.objective.certify`).  The softmax
never produces exact zeros, so sparse optima are only reached asymptotically.
"""

from __future__ import annotations

import numpy as np

from .objective import gap_tolerance, sqrt_diagonal

OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = {"adam": 0.05, "sgd": 10.0}
WARM_MIX = 1e-3  # share of the uniform point mixed into a warm start w0 (see the module docstring)


def softmax(beta: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``exp(beta_i) / sum_j exp(beta_j)`` (shift-stable)."""
    z = np.exp(beta - beta.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def ugd(
    Q: np.ndarray,
    *,
    optimizer: str = "adam",
    lr: float | None = None,
    steps: int = 1000,
    tol: float = 1e-8,
    init: str | np.ndarray = "uniform",
    beta0: np.ndarray | None = None,
    w0: np.ndarray | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-12,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Softmax-parametrized gradient descent on a normalized stack (n, K, K).

    Returns ``(W, iterations, converged)`` with shapes (n, K), (n,), (n,).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid optimizers are {', '.join(OPTIMIZERS)}")
    if not isinstance(init, str):  # an explicit initial beta
        init, beta0 = "uniform", init if beta0 is None else beta0
    if init != "uniform":
        raise ValueError(f"unknown init {init!r}; use init='uniform', an initial beta array, or beta0= / w0=")
    if beta0 is not None and w0 is not None:
        raise ValueError("pass at most one of beta0 and w0")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    lr = DEFAULT_LR[optimizer] if lr is None else float(lr)
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    n, K, _ = Q.shape
    root_diag = sqrt_diagonal(Q)  # fixed per problem: the convergence floor's scale
    try:
        if beta0 is not None:
            beta = np.array(np.broadcast_to(np.asarray(beta0, dtype=np.float64), (n, K)))
        elif w0 is not None:
            w = np.maximum(np.broadcast_to(np.asarray(w0, dtype=np.float64), (n, K)), 0.0)
            beta = np.log((1.0 - WARM_MIX) * w + WARM_MIX / K)  # softmax(beta) = the mixed point
        else:
            beta = np.zeros((n, K))
    except ValueError:
        raise ValueError(f"beta0 / w0 must have shape (K,) or (n, K) = ({n}, {K})") from None
    if not np.isfinite(beta).all():
        raise ValueError("beta0 / w0 must be finite")
    m = np.zeros((n, K))
    v = np.zeros((n, K))
    b1, b2 = betas
    active = np.ones(n, dtype=bool)
    iters = np.zeros(n, dtype=np.int64)
    for t in range(steps + 1):
        W = softmax(beta)
        g = np.einsum("nij,nj->ni", Q, W)
        f = np.einsum("ni,ni->n", W, g)
        active &= 2.0 * (f - g.min(axis=1)) > gap_tolerance(Q, W, g, tol, d=root_diag, f=f)
        if t == steps or not active.any():
            break
        iters += active
        grad = 2.0 * W * (g - f[:, None])
        if optimizer == "sgd":
            update = lr * grad
        else:
            m = b1 * m + (1.0 - b1) * grad
            v = b2 * v + (1.0 - b2) * grad * grad
            k = t + 1
            update = lr * (m / (1.0 - b1**k)) / (np.sqrt(v / (1.0 - b2**k)) + eps)
        beta -= np.where(active[:, None], update, 0.0)
    W = softmax(beta)
    g = np.einsum("nij,nj->ni", Q, W)
    f = np.einsum("ni,ni->n", W, g)
    return W, iters, 2.0 * (f - g.min(axis=1)) <= gap_tolerance(Q, W, g, tol, d=root_diag, f=f)
