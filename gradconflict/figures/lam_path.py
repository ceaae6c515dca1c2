"""C3's primary figure: each strategy's ratio to the Pareto optimum along the lam path, over models; and the
Min-SNR gamma sweep beside P2 and soft-Min-SNR."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plots import save_figure, suptitle, write_csv
from .pareto_objective import _plain_log_ticks, series_colors

__all__ = ["lam_path_figure", "gamma_sweep_figure", "lam_path_table"]


def lam_path_table(controls: pd.DataFrame) -> pd.DataFrame:
    """Per (lam, strategy) over models: ``ratio_mean``, ``ratio_se`` (sd / sqrt(n_models)), ``ratio_min`` /
    ``ratio_max`` (the band), ``diag_ratio_mean``, ``rank`` (of the mean ratio at that lam, 1 = lowest),
    ``diag_rank``, ``reg_share_mean``, ``diag_min`` / ``diag_max`` and ``n_models``."""
    g = controls.groupby(["lam", "strategy"], sort=True)
    table = g.agg(ratio_mean=("ratio", "mean"), ratio_sd=("ratio", "std"), ratio_min=("ratio", "min"),
                  ratio_max=("ratio", "max"), diag_ratio_mean=("diag_ratio", "mean"),
                  reg_share_mean=("reg_share", "mean"), diag_min=("diag_min", "min"), diag_max=("diag_max", "max"),
                  n_models=("model", "nunique")).reset_index()
    table["ratio_se"] = table.pop("ratio_sd") / np.sqrt(table["n_models"])
    table["rank"] = table.groupby("lam")["ratio_mean"].rank(method="min").astype(int)
    table["diag_rank"] = table.groupby("lam")["diag_ratio_mean"].rank(method="min").astype(int)
    return table


def lam_path_figure(controls: pd.DataFrame, out: str | Path, subtitle: str = "", *,
                    lam_rule: Optional[float] = None) -> pd.DataFrame:
    """Three panels against the relative lam (log x): the ratio to the optimum of every strategy (mean over models,
    band min-max over models, the diagonal-only null dashed), each strategy's rank at each lam, and the
    regularizer's share of the optimum's objective. ``lam_rule``: the lam the verdict uses (vertical line).
    ``controls``: :func:`gradconflict.reproduce.c3.c3_controls`. Writes ``out.png`` and ``out.csv``
    (:func:`lam_path_table`)."""
    out = Path(out)
    if controls.empty:
        raise ValueError("no controls rows to draw; run c3_controls first")
    table = lam_path_table(controls)
    write_csv(table, out.with_suffix(".csv"))
    shown = table[table["lam"] > 0]
    names = list(dict.fromkeys(controls["strategy"]))
    colors = series_colors(names)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained",
                                        gridspec_kw={"width_ratios": [1.5, 1, 0.8]})
    for name in names:
        s = shown[shown["strategy"] == name]
        ax1.plot(s["lam"], s["ratio_mean"], color=colors[name], marker="o", ms=3, label=name)
        ax1.fill_between(s["lam"], s["ratio_min"], s["ratio_max"], color=colors[name], alpha=0.15)
        ax1.plot(s["lam"], s["diag_ratio_mean"], color=colors[name], ls="--", lw=1)
        ax2.step(s["lam"], s["rank"], where="mid", color=colors[name], lw=1.6)
    ax1.plot([], [], color="gray", ls="--", lw=1, label="diagonal-only null (G -> diag G)")
    per_lam = shown.drop_duplicates("lam")
    ax3.plot(per_lam["lam"], per_lam["reg_share_mean"], color="black", marker="o", ms=3)
    ax1.axhline(1.0, color="black", lw=0.8)
    ax1.set_yscale("log")
    _plain_log_ticks(ax1)
    ax1.set_ylabel("ratio to the optimum f(w) / f* (1 = optimal)")
    ax1.set_title(f"ratio to the optimum (mean over {int(table['n_models'].max())} models, band min-max)")
    ax2.invert_yaxis()
    ax2.set_yticks(range(1, len(names) + 1))
    ax2.set_ylabel("rank of the mean ratio (1 = closest to the optimum)")
    ax2.set_title("rank at each lam")
    ax3.set_ylim(0, 1)
    ax3.set_ylabel("lam_abs |w*|^2 / f* (share, 1)")
    ax3.set_title("regularizer's share of the optimum")
    for ax, label in ((ax1, "relative regularizer lam (lam_abs = lam trace(G) / K)"), (ax2, "relative lam"),
                      (ax3, "relative lam")):
        ax.set_xscale("log")
        ax.set_xlabel(label)
        if lam_rule is not None and np.isfinite(lam_rule):
            ax.axvline(lam_rule, color="red", ls=":", lw=1.2)
    if lam_rule is not None and np.isfinite(lam_rule):
        ax1.plot([], [], color="red", ls=":", label=f"lam rule ({lam_rule:.3g}): every bin keeps weight")
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="weights")
    dmin, dmax = float(table["diag_min"].min()), float(table["diag_max"].max())
    suptitle(fig, "C3 - each fixed strategy against the regularized Pareto optimum along the lam path "
                  f"(diag(G) spans {dmin:.2g} .. {dmax:.2g}){subtitle}")
    save_figure(fig, out.with_suffix(".png"))
    return table


def gamma_sweep_figure(table: pd.DataFrame, out: str | Path, subtitle: str = "") -> pd.DataFrame:
    """Ratio to the optimum of Min-SNR-gamma and soft-Min-SNR-gamma against gamma (log x; mean over models, band
    min-max), with the reference strategies (P2, ...) as horizontal lines. ``table``:
    :func:`gradconflict.reproduce.c3.gamma_sweep`. Writes ``out.png`` and ``out.csv``."""
    out = Path(out)
    if table.empty:
        raise ValueError("empty gamma sweep; run gamma_sweep first")
    stats = (table.groupby(["family", "strategy", "gamma"], dropna=False)
             .agg(ratio_mean=("ratio", "mean"), ratio_min=("ratio", "min"), ratio_max=("ratio", "max"),
                  diag_ratio_mean=("diag_ratio", "mean"), n_models=("model", "nunique"), lam=("lam", "first"))
             .reset_index().sort_values(["family", "gamma"]))
    write_csv(stats, out.with_suffix(".csv"))
    fig, ax = plt.subplots(figsize=(8, 4.8), layout="constrained")
    families = [f for f in ("min_snr", "soft_min_snr") if f in set(stats["family"])]
    colors = dict(zip(families, ("tab:purple", "tab:brown")))
    for fam in families:
        s = stats[stats["family"] == fam]
        ax.plot(s["gamma"], s["ratio_mean"], marker="o", color=colors[fam], label=f"{fam} (gamma)")
        ax.fill_between(s["gamma"], s["ratio_min"], s["ratio_max"], color=colors[fam], alpha=0.15)
    refs = stats[stats["family"] == "reference"]
    for k, row in enumerate(refs.itertuples()):
        ax.axhline(row.ratio_mean, color=f"C{k}", ls="--", lw=1.2, label=f"{row.strategy} (reference)")
    ax.axvline(5.0, color="gray", ls=":", lw=1, label="gamma = 5 (the paper's choice)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("gamma (SNR cap of Min-SNR-gamma, x0 weight min(SNR, gamma))")
    ax.set_ylabel("ratio to the optimum f(w) / f* (1 = optimal)")
    ax.legend(fontsize=8)
    lam = float(stats["lam"].iloc[0])
    suptitle(fig, f"Min-SNR-gamma against the Pareto optimum at lam = {lam:.3g} x trace(G)/K "
                  f"(mean over {int(stats['n_models'].max())} models, band min-max){subtitle}")
    save_figure(fig, out.with_suffix(".png"))
    return stats
