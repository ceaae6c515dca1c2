"""Optimal Pareto weights as the regularizer grows from 0 (sparse) to large (uniform)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from ..plots import save_figure, suptitle, write_csv

__all__ = ["lambda_sweep_figure"]


def lambda_sweep_figure(sweep: pd.DataFrame, out: str | Path, *, used_lam: float | None = None, subtitle: str = "") -> None:
    """Stacked weights per bin against the relative lam (log axis), and the support size. ``sweep`` comes from
    ``track.lambda_sweep``. Writes ``out.png`` and ``out.csv``."""
    out = Path(out)
    write_csv(sweep, out.with_suffix(".csv"))
    s = sweep[sweep["lam"] > 0]
    grid = s.pivot(index="lam", columns="label", values="weight")
    grid = grid[list(s.drop_duplicates("bin").sort_values("bin")["label"])]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), layout="constrained", gridspec_kw={"width_ratios": [1.6, 1]})
    colors = sns.color_palette("viridis", n_colors=grid.shape[1])
    ax1.stackplot(grid.index, grid.T.values, labels=grid.columns, colors=colors)
    ax1.set_xscale("log")
    ax1.set_xlabel("relative regularizer lam (lam_abs = lam * trace(G) / K)")
    ax1.set_ylabel("optimal weight (stacked, sums to 1)")
    ax1.set_title("optimal weight per timestep bin")
    ax1.legend(title="bin (t)", fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    per = s.drop_duplicates("lam")
    ax2.plot(per["lam"], per["support"], marker="o", label="bins with weight > 1e-9")
    ax2.set_xscale("log")
    ax2.set_xlabel("relative regularizer lam")
    ax2.set_ylabel("support size (bins)")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_title("sparsity of the optimum")
    if used_lam is not None:
        for ax in (ax1, ax2):
            ax.axvline(used_lam, color="red", ls=":", lw=1)
        ax2.text(used_lam, ax2.get_ylim()[0], " lam used", color="red", va="bottom", fontsize=8)
    suptitle(fig, f"Regularized Pareto weights from sparse (lam -> 0) to uniform (large lam){subtitle}")
    save_figure(fig, out.with_suffix(".png"))
