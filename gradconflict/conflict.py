"""Conflict metrics computed from a Gram matrix of task gradients ``G[k, l] = <g_k, g_l>``.

* cosine ``c_kl = G_kl / sqrt(G_kk G_ll)`` (dimensionless, in [-1, 1]); two tasks conflict when ``c_kl < 0``.
* gradient magnitude similarity (Yu et al. 2020, PCGrad) ``gms_kl = 2 |g_k| |g_l| / (|g_k|^2 + |g_l|^2)`` in [0, 1].
* norm ratio ``r_kl = |g_k| / |g_l|``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd

from .bins import TimestepBins
from .schedule import NoiseSchedule

__all__ = [
    "as_gram",
    "cosine",
    "conflict_share",
    "magnitude_similarity",
    "norm_ratios",
    "pairwise_frame",
    "summary",
]


def as_gram(G: Any) -> np.ndarray:
    """A float64 K x K array from a tensor, array, DataFrame or ``TaskGradients``; checks shape and finiteness."""
    if hasattr(G, "gram") and not isinstance(G, (np.ndarray, pd.DataFrame)):
        G = G.gram
    if hasattr(G, "detach"):
        G = G.detach().cpu().numpy()
    arr = np.asarray(G, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] == 0:
        raise ValueError(f"a Gram matrix must be square K x K with K >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("the Gram matrix contains NaN or Inf")
    return arr


def _norms(G: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(np.diag(G), 0.0, None))


def cosine(G: Any) -> np.ndarray:
    """Cosine similarity matrix of the task gradients; 0 where a gradient is zero."""
    G = as_gram(G)
    n = _norms(G)
    denom = np.outer(n, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(denom > 0, G / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(c, -1.0, 1.0)


def conflict_share(G: Any) -> float:
    """Share of distinct task pairs (k < l) whose gradients conflict (cosine < 0)."""
    c = cosine(G)
    K = c.shape[0]
    if K < 2:
        return 0.0
    iu = np.triu_indices(K, 1)
    return float(np.mean(c[iu] < 0))


def magnitude_similarity(G: Any) -> np.ndarray:
    """Gradient magnitude similarity ``2 |g_k||g_l| / (|g_k|^2 + |g_l|^2)`` (1 for equal norms)."""
    G = as_gram(G)
    n = _norms(G)
    sq = n**2
    denom = sq[:, None] + sq[None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * np.outer(n, n) / np.where(denom > 0, denom, 1.0), 1.0)


def norm_ratios(G: Any) -> np.ndarray:
    """``r[k, l] = |g_k| / |g_l|`` (inf where |g_l| = 0 < |g_k|, 1 where both are 0)."""
    n = _norms(as_gram(G))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = n[:, None] / n[None, :]
    return np.where(np.isnan(r), 1.0, r)


def pairwise_frame(G: Any, bins: Optional[TimestepBins] = None, schedule: Optional[NoiseSchedule] = None) -> pd.DataFrame:
    """Tidy table, one row per task pair k < l: cosine, conflict flag, magnitude similarity, norm ratio and,
    with bins, the distance between bin centres in timesteps and (with a schedule) in log-SNR (nats); a bin's
    log-SNR centre is the midpoint of the (finite) log-SNR range of its timesteps, so log-SNR-uniform bins
    are equally spaced up to whole timesteps (except where the schedule jumps, e.g. the cosine schedule's last
    step)."""
    G = as_gram(G)
    K = G.shape[0]
    if bins is not None and bins.K != K:
        raise ValueError(f"the Gram is {K} x {K} but the bins define {bins.K} tasks")
    c, m, r = cosine(G), magnitude_similarity(G), norm_ratios(G)
    k, l = np.triu_indices(K, 1)
    df = pd.DataFrame({"task_i": k, "task_j": l, "cosine": c[k, l], "conflict": c[k, l] < 0,
                       "magnitude_similarity": m[k, l], "norm_ratio": r[k, l]})
    if bins is not None:
        labels = np.asarray(bins.labels)
        centers = bins.centers
        df.insert(2, "label_i", labels[k])
        df.insert(3, "label_j", labels[l])
        df["t_distance"] = np.abs(centers[l] - centers[k])
        if schedule is not None:
            lam = np.asarray(schedule.log_snr(np.arange(bins.T)))
            ranges = [lam[lo:hi][np.isfinite(lam[lo:hi])] for lo, hi in zip(bins.lows, bins.highs)]
            mids = np.array([(r.max() + r.min()) / 2 if r.size else np.nan for r in ranges])
            df["log_snr_distance"] = np.abs(mids[l] - mids[k])
    return df


def summary(G: Any) -> dict[str, float]:
    """A few scalars: K, share of conflicting pairs, mean and min off-diagonal cosine, max/min norm ratio."""
    G = as_gram(G)
    K = G.shape[0]
    c = cosine(G)
    off = c[~np.eye(K, dtype=bool)] if K > 1 else np.array([np.nan])  # K = 1: there are no pairs
    n = _norms(G)
    return {
        "K": float(K),
        "conflict_share": conflict_share(G),
        "mean_cosine": float(off.mean()),
        "min_cosine": float(off.min()),
        "norm_ratio_max_min": float(n.max() / n.min()) if n.min() > 0 else float("inf"),
    }
