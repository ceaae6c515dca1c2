"""Reference solver: the simplex QP handed to CVXPY (Clarabel by default).

    minimize    quad_form(w, psd_wrap(Q))      Q = (G + lam I) / s
    subject to  w >= 0,  sum(w) == 1

``s = max_i (G_ii + lam)`` (see :func:`gradconflict.pareto.solve`); the
normalization only helps the interior-point solver with badly scaled inputs
and does not change the minimizer.  ``psd_wrap`` skips CVXPY's own PSD check
(the input was validated already).  A stack of problems is solved one by one.

With Clarabel the tolerances default to ``tol_gap_abs = tol_gap_rel =
tol_feas = 1e-12`` (:data:`CLARABEL_TIGHT`; override by keyword): with
Clarabel's own defaults (1e-8 on the normalized objective) the reference is
off by up to ~1e-4 relative on ill-conditioned problems.

The returned weights are clipped at 0 and renormalized (interior-point
solutions carry ~1e-10 negative entries) and ``iterations`` is the solver's
iteration count.  ``converged`` is ``status == "optimal"`` here, but
:func:`gradconflict.pareto.solve` does not report it: it applies the one rule
of every method, ``gap <= max(tol * f, floor)`` (option ``tol``, default
1e-8; :func:`..objective.certify`).  The backend's tolerances are absolute on
the normalized objective ``f / s``: on a Gram whose diagonal spans many
decades ``f / s`` can be ~1e-9, and an "optimal" status then leaves
``gap / f ~ 1e-4`` (#15).  CVXPY is
imported lazily so that the rest of the package works without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CLARABEL_TIGHT = {"tol_gap_abs": 1e-12, "tol_gap_rel": 1e-12, "tol_feas": 1e-12}


def cvxpy_solve(
    Q: np.ndarray,
    *,
    solver: str = "CLARABEL",
    verbose: bool = False,
    tol: float = 1e-8,
    **solver_options: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve each normalized problem in the (n, K, K) stack ``Q`` with CVXPY.

    Args:
        Q: normalized PSD matrices.
        solver: any CVXPY QP-capable solver name (``"CLARABEL"``, ``"OSQP"``,
            ``"SCS"``, ...).
        verbose: forwarded to ``Problem.solve``.
        tol: relative duality gap for ``converged`` in :func:`gradconflict.pareto.solve` (not passed to
            the backend; unused here).
        **solver_options: forwarded to ``Problem.solve`` (e.g. tolerances).

    Returns:
        ``(W, iterations, converged)`` with shapes (n, K), (n,), (n,).
    """
    try:
        import cvxpy as cp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ValueError("method='cvxpy' needs the cvxpy package; install it with pip install cvxpy") from exc
    solver = str(solver).upper()
    if solver not in cp.installed_solvers():
        raise ValueError(f"CVXPY solver {solver!r} is not installed; installed solvers: {', '.join(cp.installed_solvers())}")
    if solver == "CLARABEL":  # tight defaults: Clarabel's own (1e-8) leave ~1e-4 relative error here
        for key, value in CLARABEL_TIGHT.items():
            solver_options.setdefault(key, value)
    n, K, _ = Q.shape
    W = np.zeros((n, K))
    iters = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    for i in range(n):
        w = cp.Variable(K)
        problem = cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(Q[i]))), [w >= 0, cp.sum(w) == 1])
        try:
            problem.solve(solver=solver, verbose=verbose, **solver_options)
        except cp.error.SolverError:
            W[i] = 1.0 / K
            continue
        value = w.value
        if value is None or not np.isfinite(value).all():
            W[i] = 1.0 / K
            continue
        value = np.maximum(np.asarray(value, dtype=np.float64).ravel(), 0.0)
        W[i] = value / value.sum() if value.sum() > 0 else 1.0 / K
        num_iters = getattr(problem.solver_stats, "num_iters", None)
        iters[i] = int(num_iters) if num_iters is not None else 0
        ok[i] = problem.status == cp.OPTIMAL
    return W, iters, ok
