"""C3 over independently trained models, with its controls: the lam path, the diagonal-only null, the
regularizer's share, the conditioning, a gamma sweep and binning variants.

For a Gram G (K x K, (x0 loss units)^2 / param^2) and a relative regularizer ``lam`` (``lam_abs = lam trace(G) / K``,
``gradconflict.track.analyze.absolute_lam``), a strategy with bin weights ``w`` (``TimestepBins.strategy_weights``)
scores

    ratio      = f(w) / f*,        f(w) = w^T G w + lam_abs ||w||^2,  f* = min over the simplex (method "auto")
    diag_ratio = the same with G replaced by D = diag(G) and its own optimum, which is closed-form:
                 w*_k = (1 / (D_kk + lam_abs)) / sum_l 1 / (D_ll + lam_abs),  f*_D = 1 / sum_l 1 / (D_ll + lam_abs)
                 (what the ranking would be without any conflict between tasks)
    reg_share  = lam_abs ||w*||^2 / f*      (the regularizer's share of the optimum's objective, 0..1)

Ratios do not change when G is scaled, so each Gram is scaled to trace K (then ``lam_abs = lam``) and all Grams of
a model are solved as one stack. Each model's ratio is the mean over its Grams (checkpoints x batches, nested);
the model is the replication unit.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..pareto import solve
from ..pareto._validate import check_simplex
from ..weighting import as_strategy, check_unique_names
from .c1 import MIN_MODELS, UNIT, over_models

__all__ = ["c3_controls", "lam_rule", "lam_rule_models", "c3_path_verdicts", "claim_c3_models", "gamma_sweep",
           "binning_variants", "c3_binning_table", "DEFAULT_LAMS", "LAM_RULE", "PAPER_STRATEGIES", "GAMMAS"]

PAPER_STRATEGIES = ("constant", "snr", "max_snr_1", "min_snr_5")
DEFAULT_LAMS = tuple(float(x) for x in np.logspace(-6, 3, 37))  # quarter decades, relative to trace(G) / K
GAMMAS = (0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 5.0, 10.0, 20.0)
LAM_RULE = ("lam_rule = the smallest lam (x trace(G)/K) of the grid from which on every bin keeps weight > "
            "1e-3/K in the exact optimum of every Gram of every model: sampling visits every timestep, so a weighting "
            "that drops a bin leaves those timesteps untrained and is no candidate for training")


def _as_models(grams: Any) -> list[list[np.ndarray]]:
    """A list per model of (K, K) Grams; a single (K, K) array or a flat list of arrays is one model."""
    if isinstance(grams, np.ndarray) and grams.ndim == 2:
        return [[grams]]
    items = list(grams)
    if not items:
        raise ValueError("no Grams given; pass a list per model of (K, K) Gram matrices")
    if all(isinstance(g, np.ndarray) and g.ndim == 2 for g in items):
        return [items]
    models = [[np.asarray(g, dtype=np.float64) for g in (m if not isinstance(m, np.ndarray) or m.ndim == 3 else [m])]
              for m in items]
    if any(len(m) == 0 for m in models):
        raise ValueError("a model has no Grams; pass at least one (K, K) Gram per model")
    return models


def _stack(grams: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Grams scaled to trace K, and their diagonals before scaling (conditioning in the Gram's own units)."""
    Gs = np.stack([np.asarray(g, dtype=np.float64) for g in grams])
    if Gs.ndim != 3 or Gs.shape[1] != Gs.shape[2]:
        raise ValueError(f"Grams must be (K, K) matrices of one K, got a stack of shape {Gs.shape}")
    K = Gs.shape[-1]
    diag = np.einsum("nii->ni", Gs).copy()
    trace = diag.sum(1)
    if not np.all(np.isfinite(Gs)) or np.any(trace <= 0):
        raise ValueError("every Gram must be finite with a positive trace (a zero Gram has no Pareto problem)")
    return Gs * (K / trace)[:, None, None], diag


def _ratio(f: np.ndarray, f_star: np.ndarray) -> np.ndarray:
    """``f / f*``, with 1 where both are 0 and inf where only f* is (the convention of ``pareto.score``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(f_star > 0, f / np.where(f_star > 0, f_star, 1.0), np.where(f <= 0, 1.0, np.inf))
    return np.maximum(r, 1.0)  # rounding below the optimum is no improvement on it


def _strategy_table(strategies: Any, bins: Any, schedule: Any) -> dict[str, np.ndarray]:
    if isinstance(strategies, Mapping):  # a value may be a strategy, a spec, or the (K,) bin weights themselves
        table = {str(k): check_simplex(s, name=f"weights of strategy {k!r}")
                 if isinstance(s, (np.ndarray, list, tuple)) else
                 np.asarray(bins.strategy_weights(as_strategy(s), schedule)) for k, s in strategies.items()}
    else:
        objs = [as_strategy(s) for s in ([strategies] if isinstance(strategies, str) else strategies)]
        table = {str(s.name): np.asarray(bins.strategy_weights(s, schedule)) for s in objs}
    check_unique_names(list(table))
    return table


def _scores(Q: np.ndarray, diag: np.ndarray, lam: float, W: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-Gram ratios of every strategy on Q (trace K) and on diag(Q), with the optimum's properties."""
    K = Q.shape[-1]
    best = solve(Q, lam, method="auto", check_psd=False)
    w_star = np.atleast_2d(best.weights)
    f_star = np.atleast_1d(np.asarray(best.objective, dtype=np.float64))
    dq = np.einsum("nii->ni", Q) + lam
    f_diag_star = np.where(np.all(dq > 0, axis=1), 1.0 / np.sum(1.0 / np.where(dq > 0, dq, 1.0), axis=1), 0.0)
    out = {"reg_share": np.where(f_star > 0, lam * np.sum(w_star ** 2, 1) / np.where(f_star > 0, f_star, 1.0), 0.0),
           "min_weight": w_star.min(1), "diag_min": diag.min(1), "diag_max": diag.max(1), "ratio": {}, "diag_ratio": {}}
    for name, w in W.items():
        if w.shape != (K,):
            raise ValueError(f"strategy {name!r} has {w.shape[0]} bin weights but the Grams have K = {K}")
        f = np.einsum("i,nij,j->n", w, Q, w) + lam * (w @ w)
        out["ratio"][name] = _ratio(f, f_star)
        out["diag_ratio"][name] = _ratio(dq @ (w * w), f_diag_star)
    return out


def c3_controls(grams_per_model: Any, bins: Any, schedule: Any, strategies: Any = PAPER_STRATEGIES,
                lams: Sequence[float] = DEFAULT_LAMS, *, progress: bool = False) -> pd.DataFrame:
    """Every strategy's score on every model's Grams at every relative ``lam``, with its controls.

    ``grams_per_model``: a list per independently trained model of (K, K) Grams (checkpoints x batches; a flat list
    is one model). ``strategies``: names/specs (``"min_snr:5"``), strategy objects or a dict name -> strategy (or
    name -> (K,) bin weights on the simplex; ``bins`` and ``schedule`` are then not used for it).

    Tidy rows, one per (model, lam, strategy): ``ratio`` (mean over the model's Grams of f(w)/f*), ``ratio_se``
    (its se over those Grams: nested noise, not a replicate), ``diag_ratio`` (the same on diag(G) with its own
    optimum), ``reg_share`` (lam_abs ||w*||^2 / f*, mean over Grams), ``min_weight`` (smallest optimal bin weight
    over the model's Grams), ``diag_min`` / ``diag_max`` (range of diag(G) over its Grams, in the Grams' own units),
    ``rank`` / ``diag_rank`` (1 = lowest ratio among the strategies at that model and lam), ``n_grams``.
    """
    models = _as_models(grams_per_model)
    W = _strategy_table(strategies, bins, schedule)
    lams = [float(x) for x in lams]
    if not lams or any(not np.isfinite(x) or x < 0 for x in lams):
        raise ValueError(f"lams must be finite relative regularizers >= 0, got {lams}")
    rows = []
    for m, grams in enumerate(tqdm(models, desc="C3 controls (models)", disable=not progress)):
        Q, diag = _stack(grams)
        for lam in lams:
            s = _scores(Q, diag, lam, W)
            means = {name: float(np.mean(r)) for name, r in s["ratio"].items()}
            diag_means = {name: float(np.mean(r)) for name, r in s["diag_ratio"].items()}
            rank = pd.Series(means).rank(method="min").astype(int)
            diag_rank = pd.Series(diag_means).rank(method="min").astype(int)
            n = Q.shape[0]
            for name in W:
                r = s["ratio"][name]
                rows.append(dict(model=m, lam=lam, strategy=name, ratio=means[name],
                                 ratio_se=float(np.std(r, ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                                 diag_ratio=diag_means[name], reg_share=float(np.mean(s["reg_share"])),
                                 min_weight=float(np.min(s["min_weight"])), diag_min=float(np.min(s["diag_min"])),
                                 diag_max=float(np.max(s["diag_max"])), rank=int(rank[name]),
                                 diag_rank=int(diag_rank[name]), n_grams=n))
    return pd.DataFrame(rows)


def lam_rule(grams: Any, grid: Sequence[float] = DEFAULT_LAMS, threshold: Optional[float] = None) -> float:
    """The smallest relative lam of ``grid`` from which on (it and every larger grid value) every bin keeps weight
    ``w*_k > threshold`` (default ``1e-3 / K``) in the exact optimum of every Gram of ``grams`` (one model's list).

    Why: sampling visits every timestep, so a weighting that gives a bin no weight leaves those timesteps
    untrained; only a lam whose optimum keeps every bin describes a weighting one could train with. 1e-3/K is a
    thousandth of the uniform weight, far above the solver's rounding (the active-set solver's zeros are exact).
    Returns NaN when no grid value qualifies (extend the grid upward).
    """
    models = _as_models(grams)
    if len(models) != 1:
        raise ValueError(f"lam_rule takes one model's Grams, got {len(models)} models; use lam_rule_models")
    Q, _ = _stack(models[0])
    K = Q.shape[-1]
    tau = 1e-3 / K if threshold is None else float(threshold)
    grid = sorted(float(x) for x in grid)
    ok = [bool(np.min(np.atleast_2d(solve(Q, lam, method="auto", check_psd=False).weights)) > tau) for lam in grid]
    for k in range(len(grid)):
        if all(ok[k:]):
            return grid[k]
    return float("nan")


def lam_rule_models(grams_per_model: Any, grid: Sequence[float] = DEFAULT_LAMS,
                    threshold: Optional[float] = None) -> tuple[float, list[float]]:
    """``(value, per_model)``: :func:`lam_rule` of each model and their largest (the lam at which every model
    keeps every bin)."""
    per = [lam_rule(g, grid, threshold) for g in _as_models(grams_per_model)]
    return (float(np.max(per)) if np.all(np.isfinite(per)) else float("nan")), per


def _pick_lam(lams: np.ndarray, value: float) -> float:
    """The grid lam equal to ``value`` (to 0.1%), else the smallest grid lam above it, else the largest."""
    lams = np.sort(lams)
    close = lams[np.isclose(lams, value, rtol=1e-3, atol=0)]
    if close.size:
        return float(close[0])
    above = lams[lams > value]
    return float(above[0] if above.size else lams[-1])


def _at_lam(controls: pd.DataFrame, lam: float, contestants: Sequence[str], expected: str,
            column: str = "ratio") -> dict:
    """Mean ratio over models per contestant, best, runner-up and the paired difference runner - expected."""
    table = controls[np.isclose(controls["lam"], lam, rtol=1e-12)].pivot_table(index="model", columns="strategy",
                                                                                values=column)
    missing = [s for s in contestants if s not in table.columns]
    if missing:
        raise ValueError(f"the controls lack strategies {missing}; score them in c3_controls(strategies=...)")
    if expected not in contestants:
        raise ValueError(f"expected strategy {expected!r} is not among the contestants {list(contestants)}")
    table = table[list(contestants)]
    means = table.mean()
    best = str(means.idxmin())
    runner = str(means.drop(expected).idxmin())
    diff = over_models((table[runner] - table[expected]).to_numpy())
    n = len(table)
    if n < MIN_MODELS or not np.isfinite(diff["se"]):
        verdict = "undecided"
    elif best == expected and diff["lo"] > 0:
        verdict = "holds"
    elif best != expected and diff["hi"] < 0:
        verdict = "refuted"
    else:
        verdict = "undecided"
    return {"lam": lam, "best": best, "runner_up": runner, "diff": diff["mean"], "diff_se": diff["se"],
            "diff_lo": diff["lo"], "diff_hi": diff["hi"], "verdict": verdict, "n_models": n,
            "order": list(means.sort_values().index), "means": means}


def c3_path_verdicts(controls: pd.DataFrame, strategies: Sequence[str] = PAPER_STRATEGIES,
                     expected: str = "min_snr_5") -> pd.DataFrame:
    """The C3 test at every lam of ``controls``: one row per lam with ``best``, ``runner_up``, ``diff`` (paired
    runner-up - expected ratio, mean over models), ``diff_se``, its 95% t-interval, ``verdict`` and the same on
    the diagonal-only null (``diag_best``, ``diag_verdict``, ``same_order``: the contestants rank alike with and
    without conflicts)."""
    rows = []
    for lam in sorted(controls["lam"].unique()):
        a = _at_lam(controls, lam, strategies, expected)
        z = _at_lam(controls, lam, strategies, expected, column="diag_ratio")
        rows.append({k: a[k] for k in ("lam", "best", "runner_up", "diff", "diff_se", "diff_lo", "diff_hi", "verdict",
                                       "n_models")}
                    | {"diag_best": z["best"], "diag_verdict": z["verdict"], "same_order": a["order"] == z["order"]})
    return pd.DataFrame(rows)


def _ranges(lams: np.ndarray, ok: np.ndarray) -> str:
    """Contiguous runs of the sorted grid where ``ok``, as ``[a, b]`` intervals."""
    runs, start = [], None
    for k, flag in enumerate(list(ok) + [False]):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            runs.append(f"[{lams[start]:.3g}, {lams[k - 1]:.3g}]")
            start = None
    return ", ".join(runs) if runs else "no lam of the grid"


def claim_c3_models(controls: pd.DataFrame, lam_rule_value: float | Sequence[float],
                    strategies: Sequence[str] = PAPER_STRATEGIES, expected: str = "min_snr_5") -> dict:
    """The C3 row (``comparison.report.CLAIM_COLUMNS``) at the rule's lam, from :func:`c3_controls`.

    ``lam_rule_value``: the rule's relative lam (:func:`lam_rule_models`), or one value per model (their largest
    is used); the verdict is read at that grid lam (or the next larger one of the grid). Holds when ``expected``
    has the lowest mean ratio over models and the 95% t-interval over models of the paired difference
    runner-up - expected lies above 0; refuted when another strategy is lowest and the interval lies below 0;
    else undecided (also with fewer than MIN_MODELS models). ``statistic``/``stderr``: that paired difference.
    The notes give the lam range of the grid over which it holds (and over which ``expected`` is merely lowest),
    the diagonal-only null (does the order change without conflicts?), reg_share and the diag(G) range.
    """
    values = np.atleast_1d(np.asarray(lam_rule_value, dtype=np.float64))
    if controls.empty:
        raise ValueError("no controls rows; run c3_controls first")
    lams = np.sort(controls["lam"].unique())
    rule = float(np.max(values))
    if not np.isfinite(rule):
        raise ValueError("the lam rule found no lam at which every bin keeps weight; extend the lam grid upward")
    lam = _pick_lam(lams, rule)
    at = _at_lam(controls, lam, strategies, expected)
    null = _at_lam(controls, lam, strategies, expected, column="diag_ratio")
    path = c3_path_verdicts(controls, strategies, expected)
    here = controls[np.isclose(controls["lam"], lam, rtol=1e-12)]
    share = over_models(here.groupby("model")["reg_share"].first().to_numpy())
    dmin, dmax = float(here["diag_min"].min()), float(here["diag_max"].max())
    ratios = "; ".join(f"{s} {at['means'][s]:.4g}" for s in strategies)
    notes = [f"at lam = {lam:.3g} x trace(G)/K: mean ratio to the optimum over models: {ratios}; lowest {at['best']}; "
             f"paired {at['runner_up']} - {expected}: {at['diff']:+.4g} +- {at['diff_se']:.2g} "
             f"[{at['diff_lo']:+.4g}, {at['diff_hi']:+.4g}]",
             f"holds for lam in {_ranges(path['lam'].to_numpy(), (path['verdict'] == 'holds').to_numpy())}; "
             f"{expected} lowest (point estimate) for lam in "
             f"{_ranges(path['lam'].to_numpy(), (path['best'] == expected).to_numpy())} (grid {lams[0]:.3g}..{lams[-1]:.3g})",
             f"diagonal-only null (G -> diag(G)): lowest {null['best']}, order "
             f"{'unchanged' if null['order'] == at['order'] else 'changed'} ({' < '.join(at['order'])} with conflicts, "
             f"{' < '.join(null['order'])} without); conflicts "
             f"{'do not change the ranking' if null['order'] == at['order'] else 'change the ranking'}",
             f"regularizer's share of the optimum's objective {share['mean']:.2f}; diag(G) spans {dmin:.3g} .. "
             f"{dmax:.3g} ({dmax / dmin if dmin > 0 else np.inf:.2g}x)"]
    if len(values) > 1:
        notes.append("per-model lam rule " + ", ".join(f"{v:.3g}" for v in values) + " (the largest is used)")
    if at["n_models"] < MIN_MODELS:
        notes.append(f"only {at['n_models']} model(s): a verdict needs >= {MIN_MODELS} independently trained models")
    return {"claim": "C3", "verdict": at["verdict"], "statistic": at["diff"], "stderr": at["diff_se"],
            "n_models": at["n_models"], "unit": UNIT,
            "lam_rule": f"lam = {lam:.3g} x trace(G)/K: {LAM_RULE}",
            "notes": "; ".join(notes) + f"; statistic = paired ratio difference runner-up - {expected} (> 0: {expected} "
                                        "closer to the optimum)"}


def gamma_sweep(grams_per_model: Any, bins: Any, schedule: Any, gammas: Sequence[float] = GAMMAS,
                lam: float = 0.1, others: Sequence[str] = ("p2", "soft_min_snr:5")) -> pd.DataFrame:
    """Min-SNR-gamma and soft-Min-SNR-gamma for each ``gamma`` beside ``others`` (P2 and soft-Min-SNR-5) at one
    relative ``lam``: tidy rows (model, family, gamma, strategy, ratio, diag_ratio); ``gamma`` is NaN for
    ``others`` rows (family ``"reference"``)."""
    if not gammas or any(not (np.isfinite(g) and g > 0) for g in gammas):
        raise ValueError(f"gammas must be finite positive numbers, got {list(gammas)}")
    specs: dict[str, tuple[str, float]] = {}
    for g in gammas:
        specs[f"min_snr:{g:g}"] = ("min_snr", float(g))
        specs[f"soft_min_snr:{g:g}"] = ("soft_min_snr", float(g))
    for o in others:
        specs.setdefault(o, ("reference", float("nan")))
    controls = c3_controls(grams_per_model, bins, schedule, {k: k for k in specs}, lams=(lam,))
    meta = pd.DataFrame([{"strategy": k, "family": f, "gamma": g} for k, (f, g) in specs.items()])
    out = controls.merge(meta, on="strategy")
    out["strategy"] = [as_strategy(k).name for k in out["strategy"]]
    return out[["model", "lam", "family", "gamma", "strategy", "ratio", "diag_ratio"]]


def binning_variants(schedule: Any, Ks: Sequence[int] = (10, 50)) -> dict[str, Any]:
    """The binnings C3 is checked under: ``uniform_K{K}`` (equal width in t) and ``log_snr_K{K}`` (equal width in
    log-SNR) for each K. Each needs its own Grams (a Gram depends on the bins)."""
    from ..bins import TimestepBins

    out = {}
    for K in Ks:
        out[f"uniform_K{K}"] = TimestepBins.uniform(schedule.T, K)
        out[f"log_snr_K{K}"] = TimestepBins.log_snr_uniform(schedule, K)
    return out


def c3_binning_table(grams_by_binning: Mapping[str, tuple[Any, Any]], schedule: Any,
                     strategies: Sequence[str] = PAPER_STRATEGIES, lam: Optional[float] = None,
                     expected: str = "min_snr_5") -> pd.DataFrame:
    """The C3 ranking under each binning: ``grams_by_binning`` maps a name to ``(bins, grams_per_model)``; ``lam``
    None uses each binning's own lam rule. One row per (binning, strategy): K, lam, ratio (mean over models), se,
    diag_ratio, rank (of the mean, 1 = lowest), verdict (the C3 test at that lam)."""
    rows = []
    for name, (bins, grams) in grams_by_binning.items():
        the_lam = lam_rule_models(grams)[0] if lam is None else float(lam)
        controls = c3_controls(grams, bins, schedule, strategies, lams=(the_lam,))
        at = _at_lam(controls, the_lam, list(_strategy_table(strategies, bins, schedule)), expected)
        ranks = at["means"].rank(method="min").astype(int)
        for s, mean in at["means"].items():
            per = controls[controls["strategy"] == s]
            rows.append(dict(binning=name, K=bins.K, lam=the_lam, strategy=s, ratio=float(mean),
                             se=over_models(per["ratio"].to_numpy())["se"], diag_ratio=float(per["diag_ratio"].mean()),
                             rank=int(ranks[s]), verdict=at["verdict"], n_models=at["n_models"]))
    return pd.DataFrame(rows)
