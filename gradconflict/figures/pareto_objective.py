"""Fig. 4: each fixed strategy's regularized Pareto objective over training, next to the optimum."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..plots import save_figure, suptitle, write_csv

__all__ = ["fig4_pareto_objective"]


def fig4_pareto_objective(objectives: pd.DataFrame, out: str | Path, *, subtitle: str = "") -> pd.DataFrame:
    """Left: objective ``w^T G w + lam ||w||^2`` per strategy / solver over steps (mean over resamples, log
    scale); right: ratio to the exact optimum. Writes ``out.png`` and ``out.csv``."""
    out = Path(out)
    keep = objectives[(objectives["kind"] == "strategy") | objectives["name"].isin(["auto", "ugd"])]
    stats = (keep.groupby(["step", "name", "kind"])[["objective", "ratio"]]
             .agg(["mean", "std"]).reset_index())
    stats.columns = ["step", "name", "kind", "objective_mean", "objective_std", "ratio_mean", "ratio_std"]
    write_csv(stats, out.with_suffix(".csv"))
    names = list(dict.fromkeys(list(stats.loc[stats["kind"] == "strategy", "name"]) + ["ugd", "auto"]))
    palette = dict(zip(names, sns.color_palette("tab10", n_colors=len(names))))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for name in names:
        s = stats[stats["name"] == name]
        if s.empty:
            continue
        style = dict(color=palette[name], marker="o", ms=3, lw=2 if name in ("auto", "ugd") else 1.4,
                     ls="--" if name == "ugd" else "-")
        label = {"auto": "Pareto optimum (exact)", "ugd": "UGD"}.get(name, name)
        ax1.plot(s["step"], s["objective_mean"], label=label, **style)
        if name != "auto":
            ax2.plot(s["step"], s["ratio_mean"], label=label, **style)
            ax2.fill_between(s["step"], s["ratio_mean"] - s["ratio_std"].fillna(0), s["ratio_mean"] + s["ratio_std"].fillna(0),
                             color=palette[name], alpha=0.12)
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("objective w^T G w + lam |w|^2 ((x0 loss units)^2 / param^2)")
    ax1.set_title("objective (mean over resampled batches)")
    ax1.legend(fontsize=8)
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("ratio to the optimum (1 = optimal)")
    ax2.set_title("ratio to the exact optimum (band: +-1 sd over batches)")
    ax2.legend(fontsize=8)
    if np.isfinite(stats["ratio_mean"]).any():
        ax2.set_ylim(bottom=0.9)
    suptitle(fig, f"Fig. 4 - fixed weighting strategies against the regularized Pareto optimum{subtitle}")
    save_figure(fig, out.with_suffix(".png"))
    return stats
