"""Figures: each one a PNG with labelled axes, units and a title, its data written beside it as CSV."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ._io import atomic_write, write_csv  # noqa: E402  (write_csv is part of this module's API)

__all__ = ["save_figure", "write_csv", "matrix_heatmap", "suptitle"]


def suptitle(fig: plt.Figure, text: str) -> None:
    """A multi-line figure title above the panels, with the layout leaving room for it."""
    if fig.get_layout_engine() is None:
        fig.set_layout_engine("constrained")
    fig.suptitle(text, fontsize=10)


def save_figure(fig: plt.Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


MAX_TICK_LABELS = 30  # per axis of a K x K heatmap


def matrix_heatmap(
    frame: pd.DataFrame,
    path: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colorbar: str,
    center: Optional[float] = 0.0,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    cmap: str = "RdBu_r",
    annotate: Optional[bool] = None,
) -> Path:
    """A labelled K x K heatmap (diverging around ``center``) of a DataFrame whose index and columns are bins."""
    K = frame.shape[0]
    size = max(4.5, min(12.0, 0.55 * K + 2.5))
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    annot = K <= 12 if annotate is None else annotate
    # many bins: the same every-n-th label on both axes, at most MAX_TICK_LABELS (rotated labels would overlap)
    ticks = "auto" if K <= MAX_TICK_LABELS else int(np.ceil(K / MAX_TICK_LABELS))
    sns.heatmap(frame, ax=ax, cmap=cmap, center=center, vmin=vmin, vmax=vmax, annot=annot, fmt=".2f",
                square=True, cbar_kws={"label": colorbar}, annot_kws={"fontsize": 7}, xticklabels=ticks,
                yticklabels=ticks)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    return save_figure(fig, path)
