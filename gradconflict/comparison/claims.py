"""Verdicts C4-C6 from a comparison's evaluations, with the independently trained model (the seed) as the unit.

Curves are averaged over seeds; every interval is a paired bootstrap over seeds (seed s of every weighting shares
initial weights and data order, so seeds are resampled jointly), 2000 resamples, 95% percentile interval.

* **Steps to a threshold.** For a pair (A, B) and a metric m (lower is better), the threshold is the level both
  seed-mean curves reach by the last evaluation, ``tau = max(m_A(end), m_B(end))``; ``steps_X`` is the first step
  at which X's seed-mean curve is <= tau, linearly interpolated between evaluation steps (the first evaluation step
  when it starts below). The speedup of A over B is ``steps_B / steps_A`` (> 1: A is faster). When the faster
  curve is already at the level at the first evaluation the ratio is a bound (">= 5.00x"), said in the notes.
* **C4** (the paper's headline, Hang et al. 2023): Min-SNR-5 is faster than constant, SNR and Max-SNR-1. Holds when
  every speedup's interval lies above 1, is refuted when one lies below 1, and is undecided otherwise.
* **C5** (not in the paper): a fixed strategy's Pareto ratio (its objective over the exact optimum on held-out
  Grams of its own runs, mean over evaluations and seeds) ranks the strategies as their convergence does
  (``auc``: the seed-mean metric averaged over evaluation steps; lower = faster). Spearman rho between ratio and
  auc, beside the diagonal-only null (G replaced by diag(G)). Holds when rho's interval lies above 0, the
  interval of rho - rho_null lies above 0, and an exact permutation test over the strategies gives p < 0.05 (with
  few strategies a seed bootstrap alone cannot show that a ranking is better than chance).
* With fewer than 3 models per weighting every verdict is "undecided".
* **C6** (not in the paper): ``pareto_fit`` and ``pareto_online`` against Min-SNR-5 and ``learned_uncertainty``,
  speedups in steps and in wall-clock (steps x seconds per step).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from scipy.stats import spearmanr as _spearmanr

__all__ = ["steps_to", "speedup", "claim_c4", "claim_c5", "claim_c6", "convergence_table", "BASELINES"]

BASELINES = ("constant", "snr", "max_snr:1")


def spearmanr(x: Sequence[float], y: Sequence[float]) -> Any:
    """scipy's Spearman correlation; NaN, without a warning, when one side is constant."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _spearmanr(x, y)
RESAMPLES = 2000


def steps_to(steps: np.ndarray, values: np.ndarray, tau: float) -> float:
    """First step at which the curve ``values`` (at increasing ``steps``) is <= ``tau``, linearly interpolated
    between evaluation steps; ``steps[0]`` when it starts below, ``inf`` when it never gets there."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    below = np.flatnonzero(values <= tau)
    if below.size == 0:
        return float("inf")
    i = int(below[0])
    if i == 0:
        return float(steps[0])
    v0, v1 = values[i - 1], values[i]
    return float(steps[i - 1] + (steps[i] - steps[i - 1]) * (v0 - tau) / (v0 - v1))


def _curves(evals: pd.DataFrame, metric: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """weighting -> (steps, seeds x steps array of ``metric``)."""
    out = {}
    for weighting, frame in evals.groupby("weighting", sort=False):
        table = frame.pivot_table(index="seed", columns="step", values=metric)
        out[str(weighting)] = (table.columns.to_numpy(dtype=np.float64), table.to_numpy(dtype=np.float64))
    return out


def speedup(steps_a: np.ndarray, curve_a: np.ndarray, steps_b: np.ndarray, curve_b: np.ndarray) -> float:
    """``steps_B / steps_A`` to the level both seed-mean curves reach, ``max(A(end), B(end))``."""
    mean_a, mean_b = np.nanmean(curve_a, axis=0), np.nanmean(curve_b, axis=0)
    tau = max(mean_a[-1], mean_b[-1])
    return steps_to(steps_b, mean_b, tau) / steps_to(steps_a, mean_a, tau)


def _bootstrap(statistic: Callable[[np.ndarray], float], n_seeds: int, seed: int = 0) -> tuple[float, float, float]:
    """Standard error and 95% percentile interval of ``statistic(seed_indices)`` over paired seed resamples."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_seeds, n_seeds)) for _ in range(RESAMPLES)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan"), float("nan"), float("nan")
    return float(values.std(ddof=1)), float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def _pair(curves: dict, a: str, b: str) -> dict:
    (sa, ca), (sb, cb) = curves[a], curves[b]
    n = min(len(ca), len(cb))
    ca, cb = ca[:n], cb[:n]
    value = speedup(sa, ca, sb, cb)
    se, lo, hi = _bootstrap(lambda idx: speedup(sa, ca[idx], sb, cb[idx]), n)
    # the faster curve is already at the level at its first evaluation: its steps are an upper bound, the ratio a
    # bound too (>= when A is the faster one, <= when B is)
    mean_a, mean_b = np.nanmean(ca, axis=0), np.nanmean(cb, axis=0)
    tau = max(mean_a[-1], mean_b[-1])
    bound = ">=" if mean_a[0] <= tau else "<=" if mean_b[0] <= tau else ""
    return {"a": a, "b": b, "speedup": value, "stderr": se, "ci_low": lo, "ci_high": hi, "n_models": n,
            "bound": bound}


def _x(row: Any) -> str:
    """A speedup as text, ">= 5.00x" when the first evaluation already reached the level (a bound, not a value)."""
    return f"{row.bound + ' ' if row.bound else ''}{row.speedup:.2f}x"


MIN_MODELS = 3  # fewer independently trained models: every verdict is "undecided"


def _verdict(lows: Sequence[float], highs: Sequence[float], bar: float, n_models: int = MIN_MODELS) -> str:
    if n_models < MIN_MODELS:
        return "undecided"
    if all(np.isfinite(lo) and lo > bar for lo in lows):
        return "holds"
    if any(np.isfinite(hi) and hi < bar for hi in highs):
        return "refuted"
    return "undecided"


def claim_c4(evals: pd.DataFrame, metric: str = "fd_mnist", a: str = "min_snr:5",
             baselines: Sequence[str] = BASELINES) -> tuple[dict, pd.DataFrame]:
    """``(row, pairs)``: the C4 verdict on ``metric`` and one row per baseline (speedup, stderr, interval)."""
    curves = _curves(evals, metric)
    missing = [w for w in (a, *baselines) if w not in curves]
    if missing:
        raise ValueError(f"C4 needs runs of {missing}; add them to the comparison's weightings")
    pairs = pd.DataFrame([_pair(curves, a, b) for b in baselines]).assign(metric=metric)
    worst = pairs.loc[pairs["speedup"].idxmin()]
    n = int(pairs["n_models"].min())
    row = {"claim": f"C4 ({metric})", "verdict": _verdict(pairs["ci_low"], pairs["ci_high"], 1.0, n),
           "statistic": float(worst["speedup"]), "stderr": float(worst["stderr"]), "n_models": int(pairs["n_models"].min()),
           "unit": "independently trained model (seed)",
           "notes": "; ".join(f"{a} vs {r.b}: {_x(r)} [{r.ci_low:.2f}, {r.ci_high:.2f}]" for r in pairs.itertuples())
           + f"; statistic = the smallest speedup (vs {worst['b']})" + _few(n)}
    return row, pairs


def _few(n: int) -> str:
    return f"; only {n} model(s) per weighting: undecided by rule (>= {MIN_MODELS} needed)" if n < MIN_MODELS else ""


def _auc(curve: np.ndarray) -> float:
    return float(np.nanmean(np.nanmean(curve, axis=0)))


def claim_c5(evals: pd.DataFrame, metric: str = "fd_mnist") -> tuple[dict, pd.DataFrame]:
    """``(row, table)``: Spearman between each fixed strategy's Pareto ratio and its convergence (auc of
    ``metric``), beside the diagonal-only null; one table row per strategy."""
    fixed = evals[np.isfinite(evals["pareto_ratio"].astype(float))]
    names = list(dict.fromkeys(fixed["weighting"]))
    if len(names) < 3:
        raise ValueError(f"C5 needs at least 3 fixed weightings, got {names}")
    curves = _curves(fixed, metric)
    ratio = {name: curve for name, (_, curve) in _curves(fixed, "pareto_ratio").items()}
    null = {name: curve for name, (_, curve) in _curves(fixed, "diag_ratio").items()}
    n = min(len(curves[name][1]) for name in names)

    def rhos(idx: np.ndarray) -> tuple[float, float]:
        auc = [_auc(curves[name][1][:n][idx]) for name in names]
        r = [float(np.nanmean(ratio[name][:n][idx])) for name in names]
        z = [float(np.nanmean(null[name][:n][idx])) for name in names]
        return float(spearmanr(r, auc).statistic), float(spearmanr(z, auc).statistic)

    everyone = np.arange(n)
    rho, rho_null = rhos(everyone)
    se, lo, hi = _bootstrap(lambda idx: rhos(idx)[0], n)
    _, dlo, dhi = _bootstrap(lambda idx: float(np.subtract(*rhos(idx))), n, seed=1)
    table = pd.DataFrame({"weighting": names,
                          "pareto_ratio": [float(np.nanmean(ratio[k][:n])) for k in names],
                          "diag_ratio": [float(np.nanmean(null[k][:n])) for k in names],
                          f"auc_{metric}": [_auc(curves[k][1][:n]) for k in names]})
    # the strategies are few: the chance that a random ranking correlates this well (exact permutation test)
    auc_all = [_auc(curves[k][1][:n]) for k in names]
    p_value = _permutation_p(list(table["pareto_ratio"]), auc_all)
    if n < MIN_MODELS:
        verdict = "undecided"
    elif lo > 0 and dlo > 0 and p_value < 0.05:
        verdict = "holds"
    else:
        verdict = "refuted" if hi < 0 else "undecided"
    row = {"claim": f"C5 ({metric})", "verdict": verdict, "statistic": rho, "stderr": se, "n_models": n,
           "unit": "independently trained model (seed)",
           "notes": f"Spearman(ratio, auc) = {rho:.2f} [{lo:.2f}, {hi:.2f}] over {len(names)} strategies (permutation "
                    f"p = {p_value:.3g}); diagonal-only null {rho_null:.2f}; rho - null in [{dlo:.2f}, {dhi:.2f}]"
                    + _few(n)}
    return row, table


def claim_c6(evals: pd.DataFrame, metric: str = "fd_mnist", candidates: Sequence[str] = ("pareto_fit", "pareto_online"),
             references: Sequence[str] = ("min_snr:5", "learned_uncertainty")) -> tuple[dict, pd.DataFrame]:
    """``(row, pairs)``: each candidate's speedup over each reference, in steps and in wall-clock."""
    curves = _curves(evals, metric)
    present = lambda names: [n for n in names if n in curves]  # noqa: E731
    cands = [c for c in curves if c.split(":")[0] in candidates]  # any cadence: pareto_online:10, pareto_online:1
    refs = present(references)
    if not cands or not refs:
        raise ValueError(f"C6 needs runs of one of {list(candidates)} and of {list(references)}")
    seconds = evals.groupby("weighting")["seconds_per_step"].mean()
    rows = []
    for c in cands:
        for r in refs:
            pair = _pair(curves, c, r)
            pair["wallclock_speedup"] = pair["speedup"] * float(seconds[r] / seconds[c])
            rows.append(pair)
    pairs = pd.DataFrame(rows).assign(metric=metric)
    n = int(pairs["n_models"].min())
    row = {"claim": f"C6 ({metric})", "verdict": _verdict(pairs["ci_low"], pairs["ci_high"], 1.0 - 1e-12, n),
           "statistic": float(pairs["speedup"].min()), "stderr": float(pairs.loc[pairs["speedup"].idxmin(), "stderr"]),
           "n_models": int(pairs["n_models"].min()), "unit": "independently trained model (seed)",
           "notes": "; ".join(f"{p.a} vs {p.b}: {_x(p)} in steps [{p.ci_low:.2f}, {p.ci_high:.2f}], "
                              f"{p.wallclock_speedup:.2f}x in wall-clock" for p in pairs.itertuples()) + _few(n)}
    return row, pairs


def _permutation_p(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value of Spearman(x, y) >= observed under random orderings of y (exact up to 8 items, else
    20,000 random permutations)."""
    from itertools import permutations

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    observed = spearmanr(x, y).statistic
    if len(y) <= 8:
        draws = [list(p) for p in permutations(y)]
    else:
        rng = np.random.default_rng(0)
        draws = [rng.permutation(y) for _ in range(20_000)]
    values = np.array([spearmanr(x, d).statistic for d in draws])
    return float(np.mean(values >= observed - 1e-12))


def convergence_table(evals: pd.DataFrame, metric: str = "fd_mnist") -> pd.DataFrame:
    """Per weighting: the final seed-mean metric with its standard error over seeds, the auc, seconds per step."""
    rows = []
    for weighting, frame in evals.groupby("weighting", sort=False):
        last = frame[frame["step"] == frame["step"].max()][metric].astype(float)
        steps, curve = _curves(frame, metric)[str(weighting)]
        rows.append({"weighting": weighting, "n_models": len(last), f"final_{metric}": float(last.mean()),
                     "stderr": float(last.std(ddof=1) / np.sqrt(len(last))) if len(last) > 1 else float("nan"),
                     f"auc_{metric}": _auc(curve), "seconds_per_step": float(frame["seconds_per_step"].mean())})
    return pd.DataFrame(rows)
