"""``solve``: one entry point for every method, single or batched.

Every method works on the normalized matrix ``Q = (G + lam I) / s`` with
``s = max_i (G_ii + lam)`` (``s = 1`` when that is 0), which makes the
largest value of the objective on the simplex equal to 1.

One ``converged`` rule for every method (#15): after the method returns, the
objective, the duality gap and ``converged`` are recomputed in float64 from
the original G by :func:`.objective.certify`: ``gap <= max(tol * f, floor)``,
so ``(f - f*) / f <= tol``, where ``floor`` is the rounding level of the
computed gap (an optimum at the rounding level of G, e.g. ``f* = 0``, is
certified).  ``tol`` is the method's option (defaults: ``auto`` 1e-9, the
others 1e-8).  The method's own verdict (e.g. a CVXPY backend's status) is not
used.  A result that is not converged carries a one-line ``hint``.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable

import numpy as np

from ._threads import blas_threads
from ._validate import METHODS, as_gram_factored, check_lam, check_method, check_simplex
from .active_set import active_set
from .cvxpy_ref import cvxpy_solve
from .frank_wolfe import frank_wolfe
from .objective import certify
from .result import ParetoResult, convergence_hint
from .ugd import DEFAULT_LR, ugd

SOLVERS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]] = {
    "auto": active_set,
    "frank_wolfe": frank_wolfe,
    "ugd": ugd,
    "cvxpy": cvxpy_solve,
}

_DEFINED = dict(SOLVERS)  # the methods as defined, for their option defaults (SOLVERS may be wrapped)


def _options(method: str, options: dict[str, Any]) -> None:
    params = inspect.signature(SOLVERS[method]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [name for name in params if name != "Q" and not name.startswith("_")]
    for name in options:
        if name not in valid:
            raise ValueError(f"unknown option {name!r} for method {method!r}; valid options: {', '.join(valid)}")


def settings(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options a method runs with: its signature's defaults updated with ``options`` (ugd's ``lr=None``
    resolved to its optimizer's default)."""
    params = inspect.signature(_DEFINED[method]).parameters
    out = {name: p.default for name, p in params.items()
           if p.default is not inspect.Parameter.empty and not name.startswith("_")}
    out.update({k: v for k, v in options.items() if not k.startswith("_")})
    if method == "ugd" and out.get("lr") is None:
        out["lr"] = DEFAULT_LR.get(out.get("optimizer", "adam"))
    return out


def normalize(Gs: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """In place: ``Gs <- (Gs + lam I) / s``; returns ``(Q, s)`` with s of shape (n,)."""
    K = Gs.shape[-1]
    idx = np.arange(K)
    Gs[:, idx, idx] += lam
    scale = Gs[:, idx, idx].max(axis=1)
    scale = np.where(scale > 0, scale, 1.0)
    Gs /= scale[:, None, None]
    return Gs, scale


def solve(
    G: Any,
    lam: float = 0.0,
    method: str = "auto",
    *,
    check_psd: bool = True,
    **options: Any,
) -> ParetoResult:
    """Minimize ``f(w) = w^T G w + lam ||w||^2`` over the probability simplex.

    Args:
        G: (K, K) PSD Gram matrix or (n, K, K) stack; numpy, torch or pandas.
            It is validated (see :mod:`._validate`) and symmetrized.
        lam: ridge coefficient ``lam >= 0``.
        method: one of :data:`METHODS`:
            ``"auto"`` exact active-set solver (:mod:`.active_set`;
            options ``tol=1e-9, max_iter, w0``);
            ``"frank_wolfe"`` (:mod:`.frank_wolfe`; options ``tol=1e-8,
            max_iter=10_000, variant="away"|"vanilla"|"pairwise", w0``);
            ``"ugd"`` softmax gradient descent (:mod:`.ugd`; options
            ``optimizer="adam"|"sgd", lr, steps=1000, tol=1e-8, init,
            beta0, w0``);
            ``"cvxpy"`` reference (:mod:`.cvxpy_ref`; options ``solver=
            "CLARABEL"`` and solver keywords).
        check_psd: run the O(K^3) PSD check (default True).  Skipping it
            saves one Cholesky factorization of G.
        **options: method options; ``tol`` is a relative accuracy of the objective (``gap <= tol * f(w)``,
            for every method; for ``"cvxpy"`` it only decides ``converged``, the backend's own tolerances
            are solver keywords).

    ``converged`` follows one rule for every method, checked after it returns
    (:func:`.objective.certify`): ``gap <= max(tol * f, floor)`` from the
    original G in float64, ``floor`` the rounding level of the computed gap.

    Returns:
        :class:`ParetoResult`; scalars for a single problem, arrays of length
        n for a stack.
    """
    t0 = time.perf_counter()
    method = check_method(method)
    lam_f = check_lam(lam)
    _options(method, options)
    # a low-rank factor only serves "auto" with a ridge (lam = 0 leaves Woodbury nothing to invert)
    Gs, batched, factors = as_gram_factored(G, check_psd=check_psd, lowrank=method == "auto" and lam_f > 0)
    n, K, _ = Gs.shape
    if options.get("w0") is not None:
        w0 = check_simplex(options["w0"], K=K, name="w0")
        if w0.ndim == 2 and w0.shape[0] != n:
            raise ValueError(f"w0 holds {w0.shape[0]} vectors but G holds {n} matrices; pass (K,) or (n, K)")
        options["w0"] = w0
    G_original = Gs.copy()  # the certificate is computed from G itself, not from the scaled copy the methods see
    Q, scale = normalize(Gs, lam_f)
    if method == "auto" and any(f is not None for f in factors):
        # the PSD check found G = L^T L + S (low rank): Q = B^T B + alpha I + S / s
        options["_lowrank"] = [
            None if f is None else (f[0] / np.sqrt(scale[i]), lam_f / scale[i], f[1] / scale[i])
            for i, f in enumerate(factors)
        ]
    if method == "auto":
        options["_ridge"] = lam_f / scale
    with blas_threads(K if method == "auto" else 0):  # many small BLAS calls: few threads (_threads.py)
        W, iters, _ = SOLVERS[method](Q, **options)  # the method's own verdict is not used (one rule, below)
    run = settings(method, options)
    objective, gap, conv = certify(G_original, W, lam_f, float(run["tol"]))
    hint = convergence_hint(method, run, conv, gap, objective, iters, K)
    seconds = time.perf_counter() - t0
    if batched:
        return ParetoResult(W, objective, gap, iters, conv, seconds, method, lam_f, True, hint)
    return ParetoResult(
        W[0], float(objective[0]), float(gap[0]), int(iters[0]), bool(conv[0]), seconds, method, lam_f, False, hint
    )


__all__ = ["METHODS", "SOLVERS", "normalize", "settings", "solve"]
