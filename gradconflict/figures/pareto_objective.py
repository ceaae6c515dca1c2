"""Fig. 4: each fixed strategy's regularized Pareto objective over training, next to the optimum."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns

from ..plots import save_figure, suptitle, write_csv

__all__ = ["fig4_pareto_objective", "series_colors"]

# one colour per series in every figure and run (a user's extra strategy does not recolour the paper's four)
FIXED_COLORS = {"auto": "black", "ugd": "tab:red", "constant": "tab:blue", "snr": "tab:orange",
                "max_snr_1": "tab:green", "min_snr_5": "tab:purple"}
_SPARE = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold", "navy", "teal"]


def series_colors(names: list[str]) -> dict[str, object]:
    """Colours for ``names``: the fixed ones for the paper's series, then spare colours in order."""
    spare = iter(_SPARE + list(sns.color_palette("husl", n_colors=max(0, len(names) - len(_SPARE)))))
    return {name: FIXED_COLORS[name] if name in FIXED_COLORS else next(spare) for name in names}


def _plain_log_ticks(ax: plt.Axes) -> None:
    """Log-axis ticks at 1, 2, 5, 10, ... labelled as plain numbers (not 2x10^0)."""
    ax.yaxis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())


def fig4_pareto_objective(objectives: pd.DataFrame, out: str | Path, *, subtitle: str = "") -> pd.DataFrame:
    """Left: objective ``w^T G w + lam ||w||^2`` per strategy / solver over steps (mean over resamples, log
    scale); right: ratio to the exact optimum. Writes ``out.png`` and ``out.csv``."""
    out = Path(out)
    keep = objectives[(objectives["kind"] == "strategy") | objectives["name"].isin(["auto", "ugd"])]
    stats = (keep.groupby(["step", "name", "kind"])[["objective", "ratio"]]
             .agg(["mean", "std"]).reset_index())
    stats.columns = ["step", "name", "kind", "objective_mean", "objective_std", "ratio_mean", "ratio_std"]
    write_csv(stats, out.with_suffix(".csv"))
    # the optimum first, UGD last: UGD's markers stay visible where it lies on the optimum
    names = list(dict.fromkeys(["auto"] + list(stats.loc[stats["kind"] == "strategy", "name"]) + ["ugd"]))
    palette = series_colors(names)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for z, name in enumerate(names):
        s = stats[stats["name"] == name]
        if s.empty:
            continue
        style = dict(color=palette[name], marker="o", ms=3, lw=1.4, zorder=2 + z)
        if name == "auto":
            style.update(lw=2.5, ms=0, alpha=0.6)
        elif name == "ugd":
            style.update(lw=1.2, ls="--", marker="x", ms=6)
        label = {"auto": "Pareto optimum (exact)", "ugd": "UGD"}.get(name, name)
        ax1.plot(s["step"], s["objective_mean"], label=label, **style)
        if name != "auto":
            ax2.plot(s["step"], s["ratio_mean"], **style)
            ax2.fill_between(s["step"], s["ratio_mean"] - s["ratio_std"].fillna(0), s["ratio_mean"] + s["ratio_std"].fillna(0),
                             color=palette[name], alpha=0.12)
    ax1.set_yscale("log")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("objective w^T G w + lam |w|^2 ((x0 loss units)^2 / param^2)")
    ax1.set_title("objective (mean over resampled batches)")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_yscale("log")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("ratio to the optimum (1 = optimal)")
    ax2.set_title("ratio to the exact optimum (band: +-1 sd over batches)")
    if np.isfinite(stats["ratio_mean"]).any():
        ax2.set_ylim(bottom=0.9)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    _plain_log_ticks(ax2)
    fig.legend(*ax1.get_legend_handles_labels(), loc="outside right upper", fontsize=8, title="weights")
    suptitle(fig, f"Fig. 4 - fixed weighting strategies against the regularized Pareto optimum{subtitle}")
    save_figure(fig, out.with_suffix(".png"))
    return stats
