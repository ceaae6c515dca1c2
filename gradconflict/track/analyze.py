"""Everything computed from one Gram matrix: every solver's Pareto weights and every strategy's score."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..bins import TimestepBins
from ..pareto import objective, solve
from ..schedule import NoiseSchedule
from ..weighting import WeightingStrategy
from .config import TrackConfig

__all__ = ["absolute_lam", "analyze_gram", "solver_options"]


def absolute_lam(G: np.ndarray, lam: float) -> float:
    """``lam_abs = lam * trace(G) / K``: the relative regularizer in the Gram's own units."""
    G = np.asarray(G, dtype=np.float64)
    return float(lam * np.trace(G) / G.shape[-1])


def solver_options(method: str, config: TrackConfig) -> dict[str, Any]:
    if method == "ugd":
        return {"steps": config.ugd_steps, "lr": config.ugd_lr}
    if method == "frank_wolfe":
        return {"max_iter": config.fw_max_iter}
    return {}


def analyze_gram(
    G: np.ndarray,
    bins: TimestepBins,
    schedule: NoiseSchedule,
    config: TrackConfig,
    strategies: Sequence[WeightingStrategy],
) -> tuple[list[dict], list[dict]]:
    """Rows of two tidy tables for one Gram.

    ``weights`` rows: (name, kind, bin, label, weight) for each solver and strategy.
    ``objectives`` rows: (name, kind, objective, ratio to the optimum, excess, gap, seconds, iterations,
    converged, lam_abs), where the optimum is the "auto" solution.
    """
    G = np.asarray(G, dtype=np.float64)
    lam_abs = absolute_lam(G, config.lam)
    best = solve(G, lam_abs, method="auto")
    f_star = float(best.objective)
    weights_rows: list[dict] = []
    objective_rows: list[dict] = []

    def add(name: str, kind: str, w: np.ndarray, obj: float, **extra: Any) -> None:
        ratio = obj / f_star if f_star > 0 else (1.0 if obj == 0 else np.inf)
        objective_rows.append(dict(name=name, kind=kind, objective=obj, ratio=ratio, excess=max(obj - f_star, 0.0),
                                   lam_abs=lam_abs, **extra))
        for k, (label, value) in enumerate(zip(bins.labels, w)):
            weights_rows.append(dict(name=name, kind=kind, bin=k, label=label, weight=float(value)))

    for method in config.solvers:
        res = best if method == "auto" else solve(G, lam_abs, method=method, **solver_options(method, config))
        add(method, "solver", np.asarray(res.weights), float(res.objective), gap=float(res.gap),
            seconds=float(res.seconds), iterations=int(res.iterations), converged=bool(res.converged))
    for strategy in strategies:
        w = bins.strategy_weights(strategy, schedule)
        add(strategy.name, "strategy", w, float(objective(G, w, lam_abs)))
    return weights_rows, objective_rows
