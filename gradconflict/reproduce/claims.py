"""Verdicts on the paper's claims C1-C3 (docs/claims.md; Hang et al., ICCV 2023), each with the numbers behind it and their uncertainty.

* C1 (transfer): fine-tuning bin i lowers the loss of neighbouring bins (abs(i - j) = 1) and raises it for
  distant bins (abs(i - j) >= K/2). Holds when the mean transfer of neighbours is > 0 and of distant bins < 0.
* C2 (UGD instability): UGD's weights recomputed on resampled batches (and at successive checkpoints) vary by
  much more than the solver's own tolerance. Holds when the mean L1 distance between UGD weights of two
  resampled batches at the same checkpoint exceeds 10x UGD's own error (L1 distance to the exact optimum of
  the same Gram).
* C3 (strategies): among constant, SNR, Max-SNR-1 and Min-SNR-5, Min-SNR-5's weights give the lowest Pareto
  objective. Holds when Min-SNR-5 has the lowest mean ratio to the optimum over checkpoints and batches.

Each verdict says whether the difference it rests on exceeds two standard errors ("significant").
"""

from __future__ import annotations

from itertools import combinations
from typing import Optional

import numpy as np
import pandas as pd

__all__ = ["claim_c1", "claim_c2", "claim_c3", "c3_lambda_sensitivity", "PAPER_STRATEGIES"]

PAPER_STRATEGIES = ("constant", "snr", "max_snr_1", "min_snr_5")


def _mean_se(values: np.ndarray, se: Optional[np.ndarray] = None) -> tuple[float, float]:
    """Mean and its standard error: from per-entry standard errors when given, else from the spread."""
    values = np.asarray(values, dtype=np.float64)
    if se is not None and np.all(np.isfinite(se)):
        return float(values.mean()), float(np.sqrt(np.sum(np.asarray(se) ** 2)) / values.size)
    if values.size < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def claim_c1(matrix: np.ndarray, stderr: Optional[np.ndarray] = None) -> dict:
    """C1 from a K x K transfer matrix (rows fine-tuned on, columns evaluated on) and its standard errors."""
    M = np.asarray(matrix, dtype=np.float64)
    K = M.shape[0]
    i, j = np.indices(M.shape)
    d = np.abs(i - j)
    near_mask, far_mask = d == 1, d >= max(2, K // 2)
    se = None if stderr is None else np.asarray(stderr, dtype=np.float64)
    # two uncertainties: the seeds' (noise of each cell) and the cells' spread (how uniform the effect is); the
    # verdict's significance uses the larger
    near, near_seed = _mean_se(M[near_mask], None if se is None else se[near_mask])
    far, far_seed = _mean_se(M[far_mask], None if se is None else se[far_mask])
    near_se = float(np.nanmax([near_seed, _mean_se(M[near_mask])[1]]))
    far_se = float(np.nanmax([far_seed, _mean_se(M[far_mask])[1]]))
    below, above = far_mask & (j < i), far_mask & (j > i)  # distant bins at smaller / larger t than the tuned one
    far_below = float(M[below].mean()) if below.any() else float("nan")
    far_above = float(M[above].mean()) if above.any() else float("nan")
    holds = near > 0 and far < 0
    significant = bool(near > 2 * near_se and -far > 2 * far_se) if np.isfinite(near_se) and np.isfinite(far_se) else False
    return dict(claim="C1", holds=bool(holds), significant=significant,
                statement="fine-tuning bin i helps bins near i and hurts bins far from i",
                measured=f"mean transfer to neighbours (abs(i-j) = 1) {near:+.4f} +- {near_se:.4f}; "
                         f"to distant bins (abs(i-j) >= {max(2, K // 2)}) {far:+.4f} +- {far_se:.4f} "
                         f"(+- over cells and seeds, the larger); distant bins at smaller t {far_below:+.4f}, "
                         f"at larger t {far_above:+.4f}",
                near=near, near_se=near_se, far=far, far_se=far_se, far_smaller_t=far_below,
                far_larger_t=far_above, diagonal=float(np.mean(np.diag(M))))


def claim_c2(weights: pd.DataFrame, solver: str = "ugd", reference: str = "auto",
             objectives: Optional[pd.DataFrame] = None) -> dict:
    """C2 from tracking weights (columns step, resample, name, bin, weight); ``objectives`` (the tracking
    objectives, with ``converged``, ``gap`` and ``objective`` per solver) adds how many UGD solves converged."""
    w = weights.pivot_table(index=["name", "step", "resample"], columns="bin", values="weight")
    ugd, ref = w.loc[solver], w.loc[reference]
    exact_d = [np.abs(a - b).sum() for s in sorted(ref.index.get_level_values("step").unique())
               for a, b in combinations(ref.loc[s].to_numpy(), 2)]
    exact = float(np.mean(exact_d)) if exact_d else float("nan")
    tolerance = np.abs(ugd.to_numpy() - ref.loc[ugd.index].to_numpy()).sum(1)  # UGD's own error per Gram
    resample_d, drift_d = [], []
    steps = sorted(ugd.index.get_level_values("step").unique())
    for s in steps:
        block = ugd.loc[s].to_numpy()
        resample_d += [np.abs(a - b).sum() for a, b in combinations(block, 2)]
    for a, b in zip(steps[:-1], steps[1:]):
        drift_d.append(np.abs(ugd.loc[a].mean().to_numpy() - ugd.loc[b].mean().to_numpy()).sum())
    tol, tol_se = _mean_se(tolerance)
    res, res_se = _mean_se(np.array(resample_d)) if resample_d else (float("nan"), float("nan"))
    drift = float(np.mean(drift_d)) if drift_d else float("nan")
    ratio = res / tol if tol > 0 else float("inf")
    solver_note = ""
    if objectives is not None and {"converged", "gap", "objective"} <= set(objectives.columns):
        rows = objectives[objectives["name"] == solver]
        if len(rows):
            rel_gap = (rows["gap"] / rows["objective"]).max()
            solver_note = (f"; {solver} converged on {int(rows['converged'].sum())} of {len(rows)} Grams "
                           f"(largest gap / objective {rel_gap:.1e})")
    holds = bool(np.isfinite(res) and ratio > 10)
    significant = bool(np.isfinite(res_se) and res - 2 * res_se > 10 * (tol + 2 * (tol_se if np.isfinite(tol_se) else 0)))
    return dict(claim="C2", holds=holds, significant=significant,
                statement="UGD weights recomputed on resampled batches vary far more than the solver's own tolerance",
                measured=f"L1 distance between UGD weights of resampled batches {res:.4f} +- {res_se:.4f}; "
                         f"UGD's own error (L1 to the exact optimum of the same Gram) {tol:.2e} +- {tol_se:.1e}; "
                         f"ratio {ratio:.1f}; drift between successive checkpoints {drift:.4f}; the exact optimum "
                         f"moves by {exact:.4f} between resampled batches{solver_note}",
                resample_l1=res, resample_l1_se=res_se, tolerance_l1=tol, ratio=ratio, drift_l1=drift,
                exact_resample_l1=exact)


def claim_c3(objectives: pd.DataFrame, strategies: tuple[str, ...] = PAPER_STRATEGIES, expected: str = "min_snr_5") -> dict:
    """C3 from tracking objectives (columns step, resample, name, kind, ratio)."""
    o = objectives[objectives["name"].isin(strategies)]
    per = o.pivot_table(index=["step", "resample"], columns="name", values="ratio")
    missing = [s for s in strategies if s not in per.columns]
    if missing:
        raise ValueError(f"tracking results lack strategies {missing}")
    stats = {s: _mean_se(per[s].to_numpy()) for s in strategies}
    best = min(stats, key=lambda s: stats[s][0])
    wins = float((per.idxmin(axis=1) == expected).mean())
    others = [s for s in strategies if s != expected]
    runner = min(others, key=lambda s: stats[s][0])
    diff = per[runner].to_numpy() - per[expected].to_numpy()
    d_mean, d_se = _mean_se(diff)
    holds = best == expected
    significant = bool(np.isfinite(d_se) and abs(d_mean) > 2 * d_se)
    table = "; ".join(f"{s} {stats[s][0]:.3f} +- {stats[s][1]:.3f}" for s in strategies)
    return dict(claim="C3", holds=bool(holds), significant=significant,
                statement="Min-SNR-5's weights give the lowest Pareto objective among the four fixed strategies",
                measured=f"mean ratio to the optimum: {table}; lowest: {best}; {expected} lowest in {wins:.0%} of "
                         f"(checkpoint, batch) pairs; paired difference {runner} - {expected}: {d_mean:+.3f} +- {d_se:.3f}",
                best=best, win_share=wins, **{f"ratio_{s}": stats[s][0] for s in strategies})


def c3_lambda_sensitivity(weights: pd.DataFrame, grams: dict, lams: tuple[float, ...] = (0.0, 0.01, 0.1, 0.3, 1.0),
                          strategies: tuple[str, ...] = PAPER_STRATEGIES) -> pd.DataFrame:
    """C3 at other regularizers: for each relative ``lam`` (``lam_abs = lam trace(G) / K``), each Gram's optimum
    (method "auto") and each strategy's ratio to it, from the strategies' bin weights (which do not depend on
    lam).  Tidy rows (lam, strategy, mean_ratio, se, wins): ``wins`` is the share of Grams where the strategy
    has the lowest ratio."""
    from ..pareto import objective, solve
    from ..track.analyze import absolute_lam

    w = weights[weights["name"].isin(strategies)].pivot_table(index=["step", "resample", "name"], columns="bin",
                                                               values="weight")
    rows = []
    for lam in lams:
        ratios = {s: [] for s in strategies}
        for (step, r), G in sorted(grams.items()):
            lam_abs = absolute_lam(G, lam)
            f_star = float(solve(G, lam_abs).objective)
            for s in strategies:
                f = float(objective(G, w.loc[(step, r, s)].to_numpy(), lam_abs))
                ratios[s].append(f / f_star if f_star > 0 else np.inf)
        table = pd.DataFrame(ratios)
        best = table.idxmin(axis=1)
        for s in strategies:
            mean, se = _mean_se(table[s].to_numpy())
            rows.append(dict(lam=lam, strategy=s, mean_ratio=mean, se=se, wins=float((best == s).mean())))
    return pd.DataFrame(rows)
