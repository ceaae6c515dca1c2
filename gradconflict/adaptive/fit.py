"""``pareto_fit``: a fixed weighting fitted to Pareto weights per bin (e.g. the exact optimum tracked on a pilot run).

Model: ``w(t) = exp(p(z_t))`` in x0 units, ``p`` a polynomial of degree ``degree`` in the scaled log-SNR
``z = (lam - mid) / half`` (``mid``, ``half``: centre and half-width of the schedule's finite log-SNR range;
z is clamped into [-1, 1], so the function is constant beyond the schedule). Positive by construction.
The coefficients minimise ``sum_k (log W_k(p) - log W*_k)^2`` with ``W_k(p) = sum_{t in k} w(t) / sum_t w(t)``,
the bin weights the fitted function itself would get (``TimestepBins.strategy_weights``), so a function of
this family is recovered exactly from its own bin weights. Start: least squares of ``log(W*_k / width_k)`` on
the bins' mean z; then ``scipy.optimize.least_squares``. Target weights below ``floor * max W*`` are raised
to it (an exact optimum may set weights to 0; log 0 has no fit).

Normalization: ``mean_t w(t) = 1`` over the schedule's T timesteps, the convention of ``pareto_online``
(uniform bin weights give the ``constant`` strategy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from ..bins import TimestepBins
from ..schedule import NoiseSchedule
from ..weighting import WeightingStrategy

__all__ = ["pareto_fit", "pareto_fit_csv", "read_pareto_weights"]


def _scaler(schedule: NoiseSchedule) -> tuple[float, float]:
    lam = np.asarray(schedule.log_snr(np.arange(schedule.T)), dtype=np.float64)
    finite = lam[np.isfinite(lam)]
    lo, hi = float(finite.min()), float(finite.max())
    return (lo + hi) / 2.0, max((hi - lo) / 2.0, 1e-12)


def pareto_fit(weights: Any, bins: TimestepBins, schedule: NoiseSchedule, *, degree: int = 3, floor: float = 1e-6,
               name: str = "pareto_fit") -> WeightingStrategy:
    """A fixed ``WeightingStrategy`` ``w(SNR) = exp(p(z))`` fitted to the bin weights ``weights`` (K, x0 units,
    any positive scale); see the module docstring for the model, the fit and the normalization."""
    from scipy.optimize import least_squares

    target = np.asarray(weights, dtype=np.float64).reshape(-1)
    if target.size != bins.K or not np.all(np.isfinite(target)) or np.any(target < 0) or target.sum() <= 0:
        raise ValueError(f"weights must be {bins.K} finite non-negative numbers (one per bin) with a positive sum, "
                         f"got {target.size} values")
    if schedule.T != bins.T:
        raise ValueError(f"the bins cover T = {bins.T} timesteps but the schedule has T = {schedule.T}")
    if not isinstance(degree, (int, np.integer)) or degree < 0 or degree + 1 > bins.K:
        raise ValueError(f"degree must be an integer in [0, K - 1] = [0, {bins.K - 1}] (K bins fix at most K "
                         f"coefficients), got {degree!r}; use fewer degrees or more bins")
    target = target / target.sum()
    target = np.maximum(target, floor * target.max())
    log_target = np.log(target / target.sum())
    mid, half = _scaler(schedule)
    lam = np.asarray(schedule.log_snr(np.arange(bins.T)), dtype=np.float64)
    z = np.clip(np.nan_to_num((lam - mid) / half, neginf=-1.0, posinf=1.0), -1.0, 1.0)
    V = np.vander(z, degree + 1, increasing=True)  # T x (degree + 1)
    member = np.zeros((bins.K, bins.T))
    for k, (lo, hi) in enumerate(zip(bins.lows, bins.highs)):
        member[k, lo:hi] = 1.0

    def log_bins(a: np.ndarray) -> np.ndarray:
        e = V @ a
        f = np.exp(e - e.max())
        per = member @ f
        return np.log(per) - np.log(per.sum())

    zbar = (member @ z) / bins.widths
    a0 = np.linalg.lstsq(np.vander(zbar, degree + 1, increasing=True), np.log(target / bins.widths), rcond=None)[0]
    fit = least_squares(lambda a: log_bins(a) - log_target, a0, xtol=1e-14, ftol=1e-14, gtol=1e-14)
    a = fit.x.copy()
    e = V @ a
    a[0] -= np.log(np.mean(np.exp(e - e.max()))) + e.max()  # mean_t w(t) = 1
    coef = a

    def x0_fn(s: np.ndarray) -> np.ndarray:
        zz = np.clip((np.log(s) - mid) / half, -1.0, 1.0)
        return np.exp(np.polynomial.polynomial.polyval(zz, coef))

    strategy = WeightingStrategy(name, x0_fn)
    object.__setattr__(strategy, "coefficients", coef)  # exposed for inspection (z-polynomial, increasing order)
    return strategy


def read_pareto_weights(path: Union[str, Path], T: int, solver: str = "auto") -> tuple[np.ndarray, TimestepBins]:
    """``(weights, bins)`` from a CSV of Pareto weights per bin: columns ``bin``, ``label`` ("lo-hi", both ends
    inclusive, as written by ``gradconflict track``) and ``weight``; rows of other solvers/strategies are dropped
    when a ``name`` column is present (keeps ``solver``), and several steps/resamples are averaged. A folder means
    its ``track_weights.csv``."""
    path = Path(path)
    if path.is_dir():
        path = path / "track_weights.csv"
    if not path.is_file():
        raise ValueError(f"pareto_fit: no weights file {path}; give a CSV with columns bin, label, weight "
                         "(e.g. a track folder's track_weights.csv)")
    frame = pd.read_csv(path)
    missing = {"bin", "label", "weight"} - set(frame.columns)
    if missing:
        raise ValueError(f"pareto_fit: {path} lacks column(s) {sorted(missing)}; it needs bin, label and weight")
    if "name" in frame.columns:
        frame = frame[frame["name"] == solver]
        if frame.empty:
            raise ValueError(f"pareto_fit: {path} holds no rows of solver {solver!r}; track with that solver")
    mean = frame.groupby("bin", sort=True).agg(weight=("weight", "mean"), label=("label", "first"))
    lows = [int(str(lab).split("-")[0]) for lab in mean["label"]]
    highs = [int(str(lab).split("-")[1]) + 1 for lab in mean["label"]]
    if lows[1:] != highs[:-1]:
        raise ValueError(f"pareto_fit: the bin labels of {path} are not contiguous ranges 'lo-hi'")
    return mean["weight"].to_numpy(dtype=np.float64), TimestepBins.from_edges(lows + [highs[-1]], T)


def pareto_fit_csv(path: Union[str, Path], schedule: NoiseSchedule, *, degree: int = 3, solver: str = "auto",
                   ) -> WeightingStrategy:
    """:func:`pareto_fit` of the weights in a CSV or track folder (:func:`read_pareto_weights`)."""
    weights, bins = read_pareto_weights(path, schedule.T, solver)
    return pareto_fit(weights, bins, schedule, degree=min(degree, bins.K - 1), name="pareto_fit")
