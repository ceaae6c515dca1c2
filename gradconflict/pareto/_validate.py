"""Input validation for the regularized Pareto problem.

Every check raises :class:`ValueError` with a message that names the problem
and says how to fix it.  Accepted containers for a Gram matrix are numpy
arrays, torch tensors (any device/dtype; converted to float64 numpy) and
pandas DataFrames.

Tolerances are relative and depend on the precision of the input: with
``eps`` the machine epsilon of the input dtype (float64 for integers),
``rtol = max(1e-8, 100 * eps)``, i.e. ``1e-8`` for float64 and ``~1.2e-5``
for float32 inputs.

* symmetry:  ``max|G - G^T| <= rtol * max|G|``; G is then replaced by
  ``(G + G^T) / 2``.
* PSD:       ``lambda_min(G) >= -rtol * max_i |lambda_i(G)|`` (scale-free).
  Checked with one Cholesky factorization of ``G + rtol * max_i G_ii * I``
  (sound, because ``max_i G_ii <= lambda_max``); only if that fails are the
  eigenvalues computed to decide and to report the most negative one.
  For K >= :data:`LOWRANK_MIN_K` a pivoted partial Cholesky runs first (at
  most ``min(K / 8, 128)`` pivots): if it stops with every residual diagonal
  below ``tau = rtol * max_i G_ii`` it has found ``G = L^T L + S`` with
  rank(L) = r small, and ``||S||_F <= tau`` proves ``lambda_min(G) >= -tau``
  (a failing bound falls through to the Cholesky check).  The factor is then
  kept (:func:`as_gram_factored`) so that the solver needs no factorization
  of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import lapack

from ._threads import blas_threads

METHODS: tuple[str, ...] = ("auto", "frank_wolfe", "ugd", "cvxpy")
LOWRANK_MIN_K = 256  # below this the dense path is cheap anyway
SYM_TILE = 128  # block size of the symmetry check
LOWRANK_MAX_RANK = 128  # pivoted partial Cholesky gives up after min(K / 8, this) pivots


RTOL_MAX = 0.1  # a half-precision input still gets symmetry and PSD checks (100 eps would be 0.78 for bf16)


def _rtol(dtype: np.dtype) -> float:
    eps = np.finfo(dtype).eps if np.issubdtype(dtype, np.floating) else np.finfo(np.float64).eps
    return _rtol_eps(float(eps))


def _rtol_eps(eps: float) -> float:
    """``max(1e-8, min(100 eps, RTOL_MAX))``: the checks' relative tolerance for data of machine epsilon ``eps``."""
    return max(1e-8, min(100.0 * eps, RTOL_MAX))


def to_numpy(x: Any, name: str = "G") -> tuple[np.ndarray, float]:
    """Convert numpy / torch / pandas / nested lists to float64 numpy.

    Returns ``(array, rtol)`` where ``rtol`` is the relative tolerance that
    matches the precision of the original data: ``max(1e-8, min(100 * eps,
    0.1))`` with ``eps`` of the input dtype (bfloat16 / float16 tensors are widened
    through float32 but keep their own ``eps``, 2^-7 / 2^-10).
    """
    if hasattr(x, "gram") and hasattr(x, "cosine"):  # a TaskGradients result: its Gram matrix
        x = x.gram
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, duck-typed
        x = x.detach().cpu()
        if getattr(x, "is_complex", lambda: False)():
            raise ValueError(f"{name} is a complex tensor; pass a real-valued tensor")
        if x.is_floating_point() and x.element_size() < 4:  # bfloat16 / float16: numpy lacks bfloat16
            import torch

            rtol = _rtol_eps(float(torch.finfo(x.dtype).eps))  # the original precision's
            return np.asarray(x.float().numpy(), dtype=np.float64), rtol
        arr = x.numpy()
    elif hasattr(x, "to_numpy"):  # pandas DataFrame / Series
        arr = x.to_numpy()
    else:
        arr = np.asarray(x)
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} has non-numeric entries ({exc}); pass a numeric array") from None
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} is complex-valued; pass a real-valued array")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} has dtype {arr.dtype}; pass a real floating-point array")
    rtol = _rtol(arr.dtype)
    return np.asarray(arr, dtype=np.float64), rtol


def _where_nonfinite(arr: np.ndarray, limit: int = 5) -> str:
    bad = np.argwhere(~np.isfinite(arr))
    parts = []
    for idx in bad[:limit]:
        val = arr[tuple(idx)]
        parts.append(f"{'NaN' if np.isnan(val) else val} at {list(map(int, idx))}")
    more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
    return ", ".join(parts) + more


def check_finite(arr: np.ndarray, name: str) -> None:
    """Raise if ``arr`` contains NaN or +-Inf, reporting where."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.add.reduce(arr, axis=None)  # NaN and +-Inf propagate into the sum (no temporary array)
    if np.isfinite(total):
        return
    if not np.isfinite(arr).all():  # the sum overflowed or a non-finite value is present: look closely
        raise ValueError(
            f"{name} contains non-finite values ({_where_nonfinite(arr)}); "
            "remove or impute NaN/Inf entries before solving"
        )


def as_gram(G: Any, check_psd: bool = True, check_symmetry: bool = True) -> tuple[np.ndarray, bool]:
    """Validate a Gram matrix or a stack of them.

    Returns ``(Gs, batched)`` with ``Gs`` a symmetrized float64 array of shape
    ``(n, K, K)`` and ``batched`` telling whether the input was 3-D.
    """
    Gs, batched, _ = as_gram_factored(G, check_psd, check_symmetry, lowrank=False)
    return Gs, batched


def as_gram_factored(
    G: Any, check_psd: bool = True, check_symmetry: bool = True, lowrank: bool = True
) -> tuple[np.ndarray, bool, list[tuple[np.ndarray, float] | None]]:
    """:func:`as_gram` plus, per matrix, the low-rank factor found by the PSD check.

    The third item holds, for each matrix, ``(L, resid)`` with ``L`` of shape
    (r, K) and ``G = L^T L + S``, ``||S||_F = resid <= tau``, or None (small
    K, or not low-rank).  Without the PSD check the factor comes from
    :func:`_lowrank_unchecked` when ``lowrank`` is True (a preconditioner
    only); with ``lowrank=False`` none is looked for.
    """
    arr, rtol = to_numpy(G, "G")
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"G must be a 2-D (K, K) Gram matrix or a 3-D (n, K, K) stack, got shape {arr.shape}"
        )
    batched = arr.ndim == 3
    if arr.shape[-1] != arr.shape[-2]:
        raise ValueError(f"G must be square (K, K) in its last two axes, got shape {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError("G has K = 0 tasks; a Pareto problem needs at least one task (K >= 1)")
    if batched and arr.shape[0] == 0:
        raise ValueError("G is an empty stack (n = 0); pass at least one (K, K) matrix")
    check_finite(arr, "G")
    with blas_threads(arr.shape[-1]):  # the PSD check's many level-2 operations: few threads (_threads.py)
        return _validated(arr if batched else arr[None], batched, rtol, check_psd, check_symmetry, lowrank)


def _validated(Gs: np.ndarray, batched: bool, rtol: float, check_psd: bool, check_symmetry: bool, lowrank: bool
               ) -> tuple[np.ndarray, bool, list[tuple[np.ndarray, float] | None]]:
    """The symmetry and PSD checks of :func:`as_gram_factored` on a finite (n, K, K) stack."""
    if check_symmetry:
        Gs, asym, size = symmetrize(Gs)
        bad = np.flatnonzero(asym > rtol * size)
        if bad.size:
            i = int(bad[0])
            loc = f" (matrix {i})" if batched else ""
            raise ValueError(
                f"G is not symmetric{loc}: max |G - G^T| = {asym[i]:.3e} exceeds "
                f"{rtol:.1e} * max|G| = {rtol * size[i]:.3e}; pass a Gram matrix "
                "(e.g. A @ A.T) or symmetrize it with (G + G.T) / 2"
            )
    else:
        Gs = Gs.copy()  # never hand out (and later modify) the caller's memory
    factors: list[tuple[np.ndarray, float] | None] = [None] * Gs.shape[0]
    if check_psd:
        factors = _check_psd(Gs, rtol, batched)
    elif lowrank and Gs.shape[0] == 1:
        factors = [_lowrank_unchecked(Gs[0], rtol)]
    return Gs, batched, factors


def symmetrize(Gs: np.ndarray, tile: int = SYM_TILE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``((G + G^T) / 2, max|G - G^T|, max|G|)`` for an (n, K, K) stack, in one pass.

    Works on ``tile x tile`` blocks so that every transposed read stays in
    cache (a whole-matrix ``G - G.T`` is several times slower at K = 1000).
    Returns a fresh array; ``Gs`` is not modified.
    """
    n, K, _ = Gs.shape
    if _exactly_symmetric(Gs, tile):  # the usual case (a Gram from task_gram is): no arithmetic needed
        return Gs.copy(), np.zeros(n), np.maximum(Gs.max(axis=(-2, -1)), -Gs.min(axis=(-2, -1)))
    out = np.empty_like(Gs)
    asym = np.zeros(n)
    size = np.zeros(n)
    for i in range(0, K, tile):
        for j in range(i, K, tile):
            a = Gs[:, i : i + tile, j : j + tile]
            b = np.swapaxes(Gs[:, j : j + tile, i : i + tile], -1, -2)
            d = a - b
            np.maximum(asym, np.abs(d).max(axis=(-2, -1)), out=asym)
            np.maximum(size, np.abs(a).max(axis=(-2, -1)), out=size)
            np.maximum(size, np.abs(b).max(axis=(-2, -1)), out=size)
            d *= -0.5
            d += a  # (a + b) / 2
            out[:, i : i + tile, j : j + tile] = d
            if j != i:
                out[:, j : j + tile, i : i + tile] = np.swapaxes(d, -1, -2)
    return out, asym, size


def _exactly_symmetric(Gs: np.ndarray, tile: int) -> bool:
    """``G == G^T`` bit for bit, compared block by block (stops at the first difference)."""
    K = Gs.shape[-1]
    for i in range(0, K, tile):
        for j in range(i, K, tile):
            if not np.array_equal(Gs[:, i : i + tile, j : j + tile], np.swapaxes(Gs[:, j : j + tile, i : i + tile], -1, -2)):
                return False
    return True


def pivoted_lowrank(G: np.ndarray, tau: float, max_rank: int) -> np.ndarray | None:
    """Pivoted partial Cholesky of a symmetric ``G``: ``(r, K)`` factor or None.

    Greedy diagonal pivoting; returns ``L`` (rows = factor columns, indexed by
    task) once every residual diagonal entry is ``<= tau``, or None if that
    needs more than ``max_rank`` pivots.  ``G - L^T L`` vanishes on the pivot
    rows and columns; its other entries are *not* checked here.
    """
    K = G.shape[0]
    d = np.diagonal(G).copy()
    L = np.empty((max_rank, K))
    for k in range(max_rank + 1):
        p = int(np.argmax(d))
        dp = d[p]
        if dp <= tau:
            return L[:k]
        if k == max_rank:
            return None
        col = G[p] - L[:k, p] @ L[:k] if k else G[p].copy()
        col *= 1.0 / np.sqrt(dp)
        L[k] = col
        d -= col * col
        d[p] = -np.inf  # never pivot twice
    return None  # pragma: no cover


def _pivoted_factor(G: np.ndarray, tau: float) -> np.ndarray | None:
    """The pivoted partial Cholesky factor of ``G`` down to residual diagonals ``<= tau``, or None (small K,
    ``tau <= 0``, or more than ``min(K / 8, LOWRANK_MAX_RANK)`` pivots needed)."""
    K = G.shape[0]
    if K < LOWRANK_MIN_K or tau <= 0:
        return None
    return pivoted_lowrank(G, tau, min(K // 8, LOWRANK_MAX_RANK))


def _lowrank_certificate(G: np.ndarray, tau: float) -> tuple[np.ndarray, float] | None:
    """``(L, ||G - L^T L||_F)`` if that residual norm is ``<= tau`` (=> lambda_min(G) >= -tau)."""
    L = _pivoted_factor(G, tau)
    if L is None:
        return None
    R = L.T @ L
    R -= G  # ||R||_F bounds every eigenvalue of the residual
    resid = float(np.sqrt(np.dot(R.ravel(), R.ravel())))
    return (L, resid) if resid <= tau else None


def _lowrank_unchecked(G: np.ndarray, rtol: float) -> tuple[np.ndarray, float] | None:
    """Low-rank factor for an unchecked G: ``(L, trace(G - L^T L))`` or None.

    The residual trace bounds the residual's norm only when G is PSD, which
    nobody checked here; the solver therefore uses the factor as a
    preconditioner whose iterative refinement must converge, and falls back
    to the dense path when it does not.
    """
    L = _pivoted_factor(G, rtol * max(float(np.diagonal(G).max()), 0.0))
    if L is None:
        return None
    return L, max(float(np.trace(G)) - float(np.dot(L.ravel(), L.ravel())), 0.0)


def _check_psd(Gs: np.ndarray, rtol: float, batched: bool) -> list[tuple[np.ndarray, float] | None]:
    K = Gs.shape[-1]
    diag = np.einsum("nii->ni", Gs)
    shift = rtol * np.maximum(diag.max(axis=1), 0.0) + np.finfo(np.float64).tiny
    if Gs.shape[0] == 1:
        cert = _lowrank_certificate(Gs[0], float(shift[0]) - np.finfo(np.float64).tiny)
        if cert is not None:
            return [cert]
    shifted = Gs.copy()
    idx = np.arange(K)
    shifted[:, idx, idx] += shift[:, None]
    # success => lambda_min > -shift >= -rtol * lambda_max
    if shifted.shape[0] == 1:
        if lapack.dpotrf(shifted[0].T, lower=1, clean=0, overwrite_a=1)[1] == 0:
            return [None]
    else:
        try:
            np.linalg.cholesky(shifted)
            return [None] * Gs.shape[0]
        except np.linalg.LinAlgError:
            pass
    eig = np.linalg.eigvalsh(Gs)
    lo, hi = eig[:, 0], eig[:, -1]
    tol = rtol * np.maximum(np.abs(lo), np.abs(hi))
    bad = np.flatnonzero(lo < -tol)
    if bad.size:
        i = int(bad[0])
        loc = f" (matrix {i})" if batched else ""
        raise ValueError(
            f"G is not positive semidefinite{loc}: most negative eigenvalue {lo[i]:.3e} "
            f"is below the tolerance -{rtol:.1e} * max|lambda| = {-tol[i]:.3e} "
            f"(largest eigenvalue {hi[i]:.3e}); a Gram matrix of gradients is PSD, so recompute "
            "it as A @ A.T or clip its negative eigenvalues"
        )
    return [None] * Gs.shape[0]


def check_lam(lam: Any) -> float:
    """Return ``lam`` as a float; raise if it is negative, NaN or infinite."""
    if hasattr(lam, "item") and not isinstance(lam, (int, float)):
        lam = lam.item()
    if isinstance(lam, bool):
        raise ValueError("lam must be a real number >= 0, got a bool")
    try:
        lam_f = float(lam)
    except (TypeError, ValueError):
        raise ValueError(f"lam must be a real number >= 0, got {lam!r}") from None
    if not np.isfinite(lam_f):
        raise ValueError(f"lam must be finite, got {lam_f}; pass a finite lam >= 0")
    if lam_f < 0:
        raise ValueError(f"lam must be >= 0, got {lam_f}; the ridge term lam * ||w||^2 needs lam >= 0")
    return lam_f


def check_method(method: Any) -> str:
    """Return ``method`` if it is one of :data:`METHODS`, else raise."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(METHODS)}")
    return method


def check_simplex(w: Any, K: int | None = None, atol: float = 1e-8, name: str = "w") -> np.ndarray:
    """Validate weights on the probability simplex (last axis).

    ``w_i >= -atol`` and ``|sum_i w_i - 1| <= atol``.  Returns float64 numpy.
    """
    arr, _ = to_numpy(w, name)
    if arr.ndim not in (1, 2):
        raise ValueError(f"{name} must be a (K,) vector or an (n, K) stack, got shape {arr.shape}")
    if K is not None and arr.shape[-1] != K:
        raise ValueError(f"{name} has {arr.shape[-1]} entries but G has K = {K} tasks; pass one weight per task")
    if arr.shape[-1] == 0:
        raise ValueError(f"{name} is empty (K = 0); pass at least one weight")
    check_finite(arr, name)
    lo = arr.min()
    if lo < -atol:
        pos = list(map(int, np.unravel_index(int(np.argmin(arr)), arr.shape)))
        raise ValueError(
            f"{name} is not on the probability simplex: entry {lo:.3e} at {pos} is negative "
            f"(tolerance {atol:.0e}); clip negatives to 0 and renormalize with w / w.sum()"
        )
    sums = arr.sum(axis=-1)
    err = np.abs(sums - 1.0)
    if (err > atol).any():
        i = int(np.argmax(err))
        s = float(np.atleast_1d(sums)[i])
        raise ValueError(
            f"{name} is not on the probability simplex: weights sum to {s:.12g}, not 1 "
            f"(tolerance {atol:.0e}); renormalize with w / w.sum()"
        )
    return arr.copy()
