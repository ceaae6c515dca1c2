"""The regularizer's effect: optimal Pareto weights from lam = 0 (sparse) to large lam (uniform)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..bins import TimestepBins
from ..pareto import solve
from .analyze import absolute_lam

__all__ = ["lambda_sweep"]


def lambda_sweep(G: np.ndarray, bins: TimestepBins, lams: Sequence[float] = tuple(np.logspace(-4, 2, 13))) -> pd.DataFrame:
    """For each relative ``lam`` (``lam_abs = lam * trace(G)/K``; 0 allowed): the exact optimum's weight per
    bin, its objective, the number of bins with weight > 1e-9 (support) and the weights' entropy (nats;
    log K = uniform). Tidy: one row per (lam, bin)."""
    G = np.asarray(G, dtype=np.float64)
    rows = []
    for lam in lams:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        res = solve(G, absolute_lam(G, lam), method="auto")
        w = np.asarray(res.weights)
        nz = w[w > 0]
        entropy = float(-(nz * np.log(nz)).sum())
        support = int((w > 1e-9).sum())
        for k, (label, value) in enumerate(zip(bins.labels, w)):
            rows.append(dict(lam=float(lam), lam_abs=absolute_lam(G, lam), bin=k, label=label, weight=float(value),
                             objective=float(res.objective), support=support, entropy=entropy))
    return pd.DataFrame(rows)
