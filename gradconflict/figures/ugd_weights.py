"""Fig. 3: UGD's Pareto weights per timestep bin, recomputed over training, with the resampling band."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..plots import save_figure, suptitle, write_csv

__all__ = ["fig3_ugd_weights"]


def fig3_ugd_weights(weights: pd.DataFrame, out: str | Path, *, solver: str = "ugd", subtitle: str = "") -> pd.DataFrame:
    """Heatmap (bins x training step, mean over resampled batches) and lines with a min-max band over the
    resamples. Writes ``out.png`` and ``out.csv`` (step, bin, label, mean, std, min, max over resamples)."""
    out = Path(out)
    w = weights[weights["name"] == solver]
    if w.empty:
        raise ValueError(f"no weights of solver {solver!r} in the tracking results")
    stats = (w.groupby(["step", "bin", "label"])["weight"].agg(["mean", "std", "min", "max"]).reset_index())
    write_csv(stats, out.with_suffix(".csv"))
    labels = list(w.drop_duplicates("bin").sort_values("bin")["label"])
    grid = stats.pivot(index="bin", columns="step", values="mean")
    grid.index = labels
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained", gridspec_kw={"width_ratios": [1, 1.3]})
    sns.heatmap(grid, ax=ax1, cmap="viridis", vmin=0, cbar_kws={"label": "Pareto weight (share of 1)"})
    ax1.set_xlabel("training step")
    ax1.set_ylabel("timestep bin (t range)")
    ax1.set_title("mean over resampled batches")
    ax1.tick_params(axis="y", labelrotation=0)
    palette = sns.color_palette("viridis", n_colors=len(labels))
    for k, label in enumerate(labels):
        s = stats[stats["bin"] == k]
        ax2.plot(s["step"], s["mean"], color=palette[k], label=label, marker="o", ms=3)
        ax2.fill_between(s["step"], s["min"], s["max"], color=palette[k], alpha=0.18)
    ax2.set_xlabel("training step")
    ax2.set_ylabel("Pareto weight (share of 1)")
    ax2.set_title("band: min-max over resampled batches")
    ax2.legend(title="bin (t)", fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    suptitle(fig, f"Fig. 3 - {solver.upper()} Pareto weights per timestep bin over training{subtitle}")
    save_figure(fig, out.with_suffix(".png"))
    return stats
