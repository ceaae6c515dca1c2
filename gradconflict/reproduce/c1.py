"""C1 over independently trained models: near and far transfer on each side, and the first-order Gram tie.

The transfer matrix of one model (``gradconflict.transfer``; rows i = the bin fine-tuned on, columns j = the bin
evaluated, bins ordered by increasing t) holds ``M_ij = (L_j(theta_0) - L_j(theta_i)) / L_j(theta_0)`` (1; > 0:
fine-tuning on bin i lowered bin j's loss). With ``d = |i - j|``:

* near cells: ``d = 1``; far cells: ``d >= max(2, ceil(K / 2))`` (the paper's "distant": at least half the range
  apart; K >= 3 so that both sets are non-empty);
* each set split by side: toward smaller t (``j < i``: the evaluated bin is less noisy than the tuned one) and
  toward larger t (``j > i``); each with its mean and median over cells.

The first-order prediction (TAG, Fifty et al. 2021) of the transfer after one SGD step of size ``lr`` on bin i is

    Z_ij = lr * G_ij / L_j        (1)

with ``G_ij = <g_i, g_j>`` the Gram of the task gradients ((x0 loss units)^2 / param^2), ``L_j`` bin j's loss
(x0 units) and ``lr`` in param^2 / (x0 loss unit) per step. Agreement with the measured off-diagonal cells is
reported as Pearson and Spearman correlation and as the cells whose signs differ.

The replication unit is the model (a training seed): :func:`claim_c1_models` reduces each model to its cell
means first, then tests over models with a Student-t interval (95%, n - 1 degrees of freedom). Cells and batches
are nested inside a model and never count as replicates.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["c1_statistics", "c1_table", "claim_c1_models", "first_order_prediction", "over_models", "MIN_MODELS", "UNIT"]

MIN_MODELS = 3  # fewer independently trained models give no verdict (the t-interval of 2 models is +-12.7 se)
UNIT = "independently trained model (training seed)"
SIDES = ("smaller", "larger")


def _check_matrix(matrix: np.ndarray) -> np.ndarray:
    M = np.asarray(matrix, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"the transfer matrix must be K x K (rows tuned on, columns evaluated), got shape {M.shape}")
    if M.shape[0] < 3:
        raise ValueError(f"C1 needs K >= 3 bins (far cells are |i - j| >= K/2 >= 2 apart), got K = {M.shape[0]}; "
                         "measure the transfer on more bins")
    if not np.all(np.isfinite(M)):
        raise ValueError("the transfer matrix holds NaN or inf cells; average the seeds that finished or rerun them")
    return M


def first_order_prediction(gram: np.ndarray, losses: np.ndarray, lr: float, K: int) -> np.ndarray:
    """``Z_ij = lr * G_ij / L_j`` (1): the first-order relative loss decrease of bin j after an SGD step of ``lr``
    on bin i. ``gram``: (K, K); ``losses``: (K,) positive x0-unit losses; ``lr`` > 0."""
    G = np.asarray(gram, dtype=np.float64)
    L = np.asarray(losses, dtype=np.float64)
    if G.shape != (K, K):
        raise ValueError(f"gram must be K x K = {K} x {K} like the transfer matrix, got shape {G.shape}")
    if L.shape != (K,) or not np.all(np.isfinite(L) & (L > 0)):
        raise ValueError(f"losses must be {K} finite positive per-bin losses (x0 units), got {np.round(L, 6)}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite positive SGD step size, got {lr!r}")
    return lr * G / L[None, :]


def _side_stats(M: np.ndarray, mask: np.ndarray, prefix: str) -> dict:
    i, j = np.indices(M.shape)
    out = {}
    for side, part in (("", mask), ("_smaller", mask & (j < i)), ("_larger", mask & (j > i))):
        cells = M[part]
        out[f"{prefix}{side}_mean"] = float(cells.mean()) if cells.size else float("nan")
        out[f"{prefix}{side}_median"] = float(np.median(cells)) if cells.size else float("nan")
        out[f"{prefix}{side}_cells"] = int(cells.size)
    return out


def c1_statistics(matrix: np.ndarray, gram: Optional[np.ndarray] = None, losses: Optional[np.ndarray] = None,
                  lr: Optional[float] = None, *, first_order: Optional[np.ndarray] = None) -> dict:
    """C1's numbers for ONE model's K x K transfer matrix (1, > 0 = helped).

    Returns ``K``, ``far_distance`` (``max(2, ceil(K/2))``), ``diagonal_mean`` and, for ``near`` and ``far`` and
    each side (``near_mean``, ``near_smaller_mean``, ``near_larger_median``, ...: ``smaller`` = cells with
    ``j < i``, the evaluated bin at smaller t), the mean, median and number of cells.

    With ``gram`` (K x K, (x0 loss units)^2 / param^2), ``losses`` ((K,), x0 units) and ``lr`` (the SGD step), or
    with a ready ``first_order`` matrix (e.g. ``TransferResult``'s lookahead prediction), it adds
    ``first_order`` (Z, K x K), ``pearson`` and ``spearman`` between Z and M over the K(K-1) off-diagonal cells,
    ``sign_disagree`` (how many of them differ in sign) and ``sign_disagree_cells`` (their (i, j) pairs).
    """
    M = _check_matrix(matrix)
    K = M.shape[0]
    i, j = np.indices(M.shape)
    d = np.abs(i - j)
    far_distance = max(2, math.ceil(K / 2))
    out: dict = {"K": K, "far_distance": far_distance, "diagonal_mean": float(np.mean(np.diag(M)))}
    out.update(_side_stats(M, d == 1, "near"))
    out.update(_side_stats(M, d >= far_distance, "far"))
    given = [x is not None for x in (gram, losses, lr)]
    if any(given) and not all(given):
        raise ValueError("the first-order prediction needs gram, losses and lr together; pass all three or none")
    if all(given) and first_order is not None:
        raise ValueError("pass either gram/losses/lr or first_order, not both")
    Z = first_order_prediction(gram, losses, lr, K) if all(given) else first_order
    if Z is not None:
        Z = np.asarray(Z, dtype=np.float64)
        if Z.shape != (K, K) or not np.all(np.isfinite(Z)):
            raise ValueError(f"first_order must be a finite {K} x {K} matrix, got shape {Z.shape}")
        off = d > 0
        z, m = Z[off], M[off]
        degenerate = np.ptp(z) == 0 or np.ptp(m) == 0  # a constant side has no correlation
        out["first_order"] = Z
        out["pearson"] = float("nan") if degenerate else float(stats.pearsonr(z, m).statistic)
        out["spearman"] = float("nan") if degenerate else float(stats.spearmanr(z, m).statistic)
        disagree = off & (np.sign(Z) != np.sign(M))
        out["sign_disagree"] = int(disagree.sum())
        out["sign_disagree_cells"] = [(int(a), int(b)) for a, b in zip(*np.nonzero(disagree))]
        out["offdiagonal_cells"] = int(off.sum())
    return out


def c1_table(per_model: Sequence[dict]) -> pd.DataFrame:
    """One tidy row per model (``model`` = its position) with the scalar numbers of :func:`c1_statistics`
    (matrices and cell lists left out): the CSV beside the C1 row."""
    return pd.DataFrame([{"model": m, **{k: v for k, v in s.items() if np.isscalar(v)}} for m, s in enumerate(per_model)])


def over_models(values: Sequence[float], level: float = 0.95) -> dict:
    """Mean, standard error (``sd / sqrt(n)``, ddof 1) and Student-t interval over models; NaN se for n < 2."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return {"mean": float("nan"), "median": float("nan"), "se": float("nan"), "lo": float("nan"),
                "hi": float("nan"), "n": 0}
    mean = float(v.mean())
    if n < 2:
        return {"mean": mean, "median": float(np.median(v)), "se": float("nan"), "lo": float("nan"),
                "hi": float("nan"), "n": n}
    se = float(v.std(ddof=1) / np.sqrt(n))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return {"mean": mean, "median": float(np.median(v)), "se": se, "lo": mean - half, "hi": mean + half, "n": n}


def _sign_verdict(s: dict, sign: int, n: int) -> str:
    """``holds`` when the interval lies on the claimed side of 0 (sign +1: above, -1: below), ``refuted`` when it
    lies on the other side, else ``undecided`` (also with fewer than MIN_MODELS models)."""
    if n < MIN_MODELS or not np.isfinite(s["se"]):
        return "undecided"
    lo, hi = (s["lo"], s["hi"]) if sign > 0 else (-s["hi"], -s["lo"])
    return "holds" if lo > 0 else ("refuted" if hi < 0 else "undecided")


def _combine(near: str, far: str) -> str:
    if near == "holds" and far == "holds":
        return "holds"
    if "refuted" in (near, far):
        return "refuted"
    return "undecided"


def claim_c1_models(per_model: Sequence[dict]) -> dict:
    """The C1 row (``comparison.report.CLAIM_COLUMNS``) from :func:`c1_statistics` of each trained model.

    Each model contributes its mean near and far transfer; the verdict holds when the 95% t-interval over models of
    the near mean lies above 0 and that of the far mean below 0, is refuted when either lies on the wrong side, and is
    undecided otherwise or with fewer than ``MIN_MODELS`` models. ``statistic`` / ``stderr``: the mean far transfer
    over models and its standard error (the contested half: near help is rarely in doubt). The notes give near,
    the side(s) on which distant harm holds (the same test on the far cells with j < i and with j > i), the
    medians, and the Gram agreement when the models carry it.
    """
    if not per_model:
        raise ValueError("claim_c1_models needs c1_statistics of at least one model; got none")
    Ks = {m["K"] for m in per_model}
    if len(Ks) > 1:
        raise ValueError(f"the models' transfer matrices have different K {sorted(Ks)}; use the same bins for every model")
    n = len(per_model)
    s = {key: over_models([m[key] for m in per_model])
         for key in ("near_mean", "far_mean", "near_median", "far_median", "far_smaller_mean", "far_larger_mean",
                     "near_smaller_mean", "near_larger_mean")}
    near_v = _sign_verdict(s["near_mean"], +1, n)
    far_v = _sign_verdict(s["far_mean"], -1, n)
    side_v = {side: _sign_verdict(s[f"far_{side}_mean"], -1, n) for side in SIDES}
    harmed = [f"{side} t" for side in SIDES if side_v[side] == "holds"]
    where = "both sides" if len(harmed) == 2 else (harmed[0] if harmed else "neither side")
    fmt = lambda x: f"{x['mean']:+.4f} +- {x['se']:.4f} [{x['lo']:+.4f}, {x['hi']:+.4f}]"  # noqa: E731
    notes = [f"near (|i-j| = 1) {fmt(s['near_mean'])} ({near_v}); far (|i-j| >= {per_model[0]['far_distance']}) "
             f"{fmt(s['far_mean'])} ({far_v}); mean +- se over models [95% t-interval]",
             f"distant harm holds on {where}: far toward smaller t (j < i) {fmt(s['far_smaller_mean'])} "
             f"({side_v['smaller']}), toward larger t (j > i) {fmt(s['far_larger_mean'])} ({side_v['larger']})",
             f"near toward smaller t {s['near_smaller_mean']['mean']:+.4f}, toward larger t "
             f"{s['near_larger_mean']['mean']:+.4f}",
             f"medians over cells (mean over models): near {s['near_median']['mean']:+.4f}, far "
             f"{s['far_median']['mean']:+.4f}"]
    if n < MIN_MODELS:
        notes.append(f"only {n} model(s): a verdict needs >= {MIN_MODELS} independently trained models")
    if all("pearson" in m for m in per_model):
        p = over_models([m["pearson"] for m in per_model])
        r = over_models([m["spearman"] for m in per_model])
        wrong = sum(m["sign_disagree"] for m in per_model)
        cells = sum(m["offdiagonal_cells"] for m in per_model)
        notes.append(f"first-order Gram prediction lr G_ij / L_j vs measured (off-diagonal cells): Pearson "
                     f"{p['mean']:.3f} +- {p['se']:.3f}, Spearman {r['mean']:.3f} +- {r['se']:.3f}; signs disagree in "
                     f"{wrong} of {cells} cells")
    return {"claim": "C1", "verdict": _combine(near_v, far_v), "statistic": s["far_mean"]["mean"],
            "stderr": s["far_mean"]["se"], "n_models": n, "unit": UNIT, "lam_rule": "",
            "notes": "; ".join(notes) + "; statistic = mean far transfer over models (< 0: distant bins harmed)"}
