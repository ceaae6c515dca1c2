"""Score weighting strategies against the regularized Pareto optimum.

For each strategy with simplex weights ``w`` and the optimum ``f*`` of
``min_w w^T G w + lam ||w||^2`` (solved with ``method="auto"``):

    objective = w^T G w + lam * ||w||^2
    excess    = objective - f*                       (>= 0)
    ratio     = objective / f*                       (>= 1)

If ``f* == 0`` the ratio is ``1.0`` for a strategy whose objective is also 0
and ``inf`` otherwise.  Negative excesses of rounding size (at most
``1e-9 * max(|f*|, max_i (G_ii + lam) * 1e-6)``) are clipped to 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..weighting import as_strategy, check_unique_names
from ._validate import as_gram, check_lam, check_simplex
from .solver import solve

OPTIMUM = "pareto_optimum"


def _strategy_weights(strategies: Any, bins: Any, schedule: Any, K: int) -> list[tuple[str, np.ndarray]]:
    if bins is None:
        if not isinstance(strategies, Mapping):
            raise ValueError(
                "without bins, strategies must be a dict name -> weight vector; "
                "pass bins (with a strategy_weights method) and schedule to score strategy objects "
                "or names such as 'min_snr:5'"
            )
        items = [(str(name), w) for name, w in strategies.items()]
    else:
        if not hasattr(bins, "strategy_weights"):
            raise ValueError("bins must provide strategy_weights(strategy, schedule), e.g. a TimestepBins")
        if isinstance(strategies, str) or hasattr(strategies, "weight") or callable(strategies):
            strategies = [strategies]  # one strategy, spec or function
        if isinstance(strategies, Mapping):
            pairs: Iterable[tuple[str, Any]] = ((str(k), as_strategy(s)) for k, s in strategies.items())
        else:
            objs = [as_strategy(s) for s in strategies]
            pairs = ((str(getattr(s, "name", type(s).__name__)), s) for s in objs)
        items = [(name, bins.strategy_weights(s, schedule)) for name, s in pairs]
    check_unique_names([name for name, _ in items])
    out = []
    for name, w in items:
        arr = check_simplex(w, K=K, name=f"weights of strategy {name!r}")
        if arr.ndim != 1:
            raise ValueError(f"weights of strategy {name!r} must be a (K,) vector, got shape {arr.shape}")
        out.append((name, arr))
    return out


def score(
    G: Any,
    lam: float,
    strategies: Any,
    bins: Any = None,
    schedule: Any = None,
) -> pd.DataFrame:
    """Objective, excess and ratio of each strategy versus the Pareto optimum.

    Args:
        G: (K, K) Gram matrix or (n, K, K) stack (numpy, torch, pandas).
        lam: ridge coefficient ``lam >= 0``.
        strategies: a strategy, a list of strategies (named by ``.name``) or
            a dict name -> strategy, whose weights come from
            ``bins.strategy_weights(strategy, schedule)``; a strategy may be
            an object or a name/spec such as ``"min_snr"`` or
            ``"min_snr:5"`` (``gradconflict.weighting.by_name``) or a function
            ``f(snr) -> x0-unit weight`` (``weighting.custom``); or, with
            ``bins=None``, a dict name -> (K,) weight vector.
        bins: object with ``strategy_weights(strategy, schedule) -> (K,)``
            (e.g. ``gradconflict.bins.TimestepBins``), or None.
        schedule: the noise schedule passed to ``bins.strategy_weights``;
            there is no default: ``TimestepBins`` raises ValueError without one.

    Returns:
        One row per strategy plus a final ``"pareto_optimum"`` row, with
        columns ``strategy, objective, excess, ratio, weights`` (``weights``
        holds (K,) numpy arrays).  For a stack there is one row per
        ``(index, strategy)`` and a leading ``index`` column.
    """
    lam_f = check_lam(lam)
    Gs, batched = as_gram(G)
    n, K, _ = Gs.shape
    named = _strategy_weights(strategies, bins, schedule, K)
    best = solve(Gs, lam_f, method="auto", check_psd=False)  # validated just above
    opt_w = np.atleast_2d(best.weights)
    opt_f = np.atleast_1d(best.objective)
    scale = np.einsum("nii->ni", Gs).max(axis=1) + lam_f
    rows = []
    for i in range(n):
        entries = [(name, w, float(w @ Gs[i] @ w + lam_f * (w @ w))) for name, w in named]
        entries.append((OPTIMUM, opt_w[i].copy(), float(opt_f[i])))
        for name, w, f in entries:
            excess = f - opt_f[i]
            if -1e-9 * max(abs(opt_f[i]), 1e-6 * scale[i]) <= excess < 0:
                excess = 0.0
            if excess == 0:
                ratio = 1.0
            else:
                ratio = f / opt_f[i] if opt_f[i] > 0 else np.inf
            row = {"strategy": name, "objective": f, "excess": excess, "ratio": ratio, "weights": w.copy()}
            rows.append({"index": i, **row} if batched else row)
    return pd.DataFrame(rows)
