"""The :class:`ParetoResult` container returned by :func:`gradconflict.pareto.solve`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


def _readonly(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        x = x.copy()
        x.flags.writeable = False
    return x


@dataclass(frozen=True)
class ParetoResult:
    """Solution of ``min_w w^T G w + lam ||w||^2`` over the probability simplex.

    For a single (K, K) problem the fields are scalars and ``weights`` has
    shape (K,); for a stack of n problems every per-problem field is an array
    of length n and ``weights`` has shape (n, K).  Arrays are read-only.

    Attributes:
        weights: optimal task weights ``w`` (float64, on the simplex).
        objective: ``f(w) = w^T G w + lam ||w||^2``.
        gap: Frank-Wolfe duality gap ``grad^T w - min_i grad_i`` with
            ``grad = 2 (G + lam I) w``; ``0 <= f(w) - f* <= gap``.
        iterations: iterations (or optimizer steps) taken per problem.
        converged: whether ``gap <= max(tol * objective, floor)`` (the method's
            ``tol``; ``floor`` the rounding level of the computed gap), checked
            in float64 from the original G after the method returned, the
            same rule for every method (:func:`..objective.certify`).
        seconds: wall time of the whole :func:`solve` call (validation
            included), shared by all problems of a batch.
        method: the method that produced the result.
        lam: the ridge coefficient.
        batched: whether the input was a stack of Gram matrices.
        hint: ``""`` when every problem converged, else one line saying how
            far it is from ``tol`` and what to change (e.g. ``"raise steps
            (now 1000) or lr (now 0.05), or use method='auto' (exact)"``);
            made for a command line to print after ``converged: False``.
    """

    weights: np.ndarray
    objective: float | np.ndarray
    gap: float | np.ndarray
    iterations: int | np.ndarray
    converged: bool | np.ndarray
    seconds: float
    method: str
    lam: float = 0.0
    batched: bool = field(default=False)
    hint: str = ""

    def __post_init__(self) -> None:
        for name in ("weights", "objective", "gap", "iterations", "converged"):
            object.__setattr__(self, name, _readonly(getattr(self, name)))

    @property
    def K(self) -> int:
        """Number of tasks."""
        return int(np.shape(self.weights)[-1])

    def to_frame(self) -> pd.DataFrame:
        """Tidy long table: one row per (problem, task).

        Columns: ``problem, task, weight, objective, gap, iterations,
        converged, method, lam, seconds``.  Pivot with
        ``df.pivot(index="problem", columns="task", values="weight")``.
        """
        W = np.atleast_2d(self.weights)
        n, K = W.shape

        def per_problem(x: Any) -> np.ndarray:
            return np.repeat(np.broadcast_to(np.asarray(x), (n,)), K)

        return pd.DataFrame(
            {
                "problem": np.repeat(np.arange(n), K),
                "task": np.tile(np.arange(K), n),
                "weight": W.ravel(),
                "objective": per_problem(self.objective).astype(float),
                "gap": per_problem(self.gap).astype(float),
                "iterations": per_problem(self.iterations).astype(int),
                "converged": per_problem(self.converged).astype(bool),
                "method": self.method,
                "lam": float(self.lam),
                "seconds": float(self.seconds),
            }
        )

    def __repr__(self) -> str:
        if self.batched:
            n = np.shape(self.weights)[0]
            obj = f"objective[{n}]"
            conv = f"converged={int(np.sum(self.converged))}/{n}"
        else:
            obj = f"objective={float(self.objective):.6g}, gap={float(self.gap):.2e}"
            conv = f"converged={bool(self.converged)}"
        return (
            f"ParetoResult(method={self.method!r}, K={self.K}, lam={self.lam:g}, {obj}, "
            f"{conv}, iterations={self.iterations if not self.batched else '...'}, "
            f"seconds={self.seconds:.3g})"
        )


def convergence_hint(method: str, run: dict[str, Any], converged: np.ndarray, gap: np.ndarray,
                     objective: np.ndarray, iterations: np.ndarray, K: int) -> str:
    """One line for :attr:`ParetoResult.hint`: ``""`` if every problem converged, else how far the worst one is
    from ``tol`` (its ``gap / objective``) and what to change, with the values it ran with (``run``: the
    method's options, defaults included)."""
    failed = ~np.asarray(converged, dtype=bool)
    if not failed.any():
        return ""
    gap, objective = np.asarray(gap, dtype=float)[failed], np.asarray(objective, dtype=float)[failed]
    with np.errstate(divide="ignore", invalid="ignore"):
        worst = int(np.argmax(np.where(objective > 0, gap / objective, np.inf)))  # the farthest from tol
    tol = float(run.get("tol", 0.0))
    n = failed.size
    head = "not converged" if n == 1 else f"{int(failed.sum())} of {n} problems not converged, the worst"
    head += f" (gap {gap[worst]:.2e} > tol x objective = {tol:g} x {objective[worst]:.3g})"
    if method == "ugd":
        todo = f"raise steps (now {run.get('steps')}) or lr (now {run.get('lr'):g})"
    elif method == "frank_wolfe":
        todo = f"raise max_iter (now {run.get('max_iter')})"
        if run.get("variant") == "vanilla":
            todo += " or use variant='away'"
    elif method == "cvxpy":
        todo = ("tighten the backend's tolerances (absolute, on f / max_i (G_ii + lam); e.g. tol_gap_abs="
                "tol_gap_rel=tol_feas=1e-15 for CLARABEL)")
    else:
        cap = run.get("max_iter") or max(100, 10 * K)
        if np.max(np.asarray(iterations)[failed], initial=0) >= cap:
            return f"{head}: raise max_iter (now {cap})"
        return f"{head}: the exact solve lost accuracy on an ill-conditioned G; try a small ridge lam > 0 or " \
               "method='frank_wolfe'"
    return f"{head}: {todo}, or use method='auto' (exact)"
