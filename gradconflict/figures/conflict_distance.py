"""Cosine between task gradients against the distance of their bins in log-SNR."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plots import save_figure, write_csv

__all__ = ["conflict_vs_distance"]


def conflict_vs_distance(pairs: pd.DataFrame, out: str | Path, *, subtitle: str = "") -> pd.DataFrame:
    """Scatter of pairwise cosine against log-SNR distance (one point per bin pair and Gram), with the mean per
    distance decile. ``pairs`` holds ``conflict.pairwise_frame`` rows (plus any id columns). Writes PNG + CSV."""
    out = Path(out)
    write_csv(pairs, out.with_suffix(".csv"))
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter(pairs["log_snr_distance"], pairs["cosine"], s=10, alpha=0.35, label="bin pair (one Gram)")
    bins = np.unique(np.quantile(pairs["log_snr_distance"], np.linspace(0, 1, 11)))
    if len(bins) > 2:
        cut = pd.cut(pairs["log_snr_distance"], bins, include_lowest=True)
        mean = pairs.groupby(cut, observed=True).agg(d=("log_snr_distance", "mean"), c=("cosine", "mean"))
        ax.plot(mean["d"], mean["c"], color="black", marker="o", label="mean per distance decile")
    ax.axhline(0.0, color="red", lw=0.8, ls=":")
    ax.set_xlabel("distance between bins in log-SNR (nats)")
    ax.set_ylabel("cosine of task gradients (1)")
    ax.set_title(f"Cosine of per-bin task gradients against their log-SNR distance{subtitle}")
    ax.legend(fontsize=8)
    save_figure(fig, out.with_suffix(".png"))
    return pairs
