"""Figures: each one a PNG with labelled axes, units and a title, its data written beside it as CSV.

For one's own results (``import gradconflict as gc``; ``out`` names the PNG, the CSV goes beside it):

* :func:`cosine_heatmap` - K x K cosine of the per-bin task gradients, from a Gram or a cosine matrix;
* :func:`conflict_vs_distance` - each bin pair's cosine against the distance of the bins in log-SNR;
* :func:`pareto_weights` - the optimum weights per bin as bars, optionally beside strategies' weights;
* :func:`transfer_matrix` - a cross-bin transfer matrix (rows fine-tuned on, columns evaluated on).

Each returns the DataFrame it wrote as CSV.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ._io import atomic_write, write_csv  # noqa: E402  (write_csv is part of this module's API)

if TYPE_CHECKING:
    from .bins import TimestepBins

__all__ = ["save_figure", "write_csv", "matrix_heatmap", "suptitle", "cosine_heatmap", "conflict_vs_distance",
           "pareto_weights", "transfer_matrix"]


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


# ---------------------------------------------------------------------- helpers for one's own results
Labels = Union["TimestepBins", Sequence[str], None]


def _labels(labels: Labels, K: int, default: Optional[Sequence[str]] = None) -> list[str]:
    """Tick labels of K bins: from ``TimestepBins`` (``"lo-hi"``), a list of strings, else ``default`` / 0..K-1."""
    if labels is None:
        labels = default if default is not None else [str(k) for k in range(K)]
    elif hasattr(labels, "labels") and not isinstance(labels, (list, tuple)):
        labels = labels.labels
    labels = [str(x) for x in labels]
    if len(labels) != K:
        raise ValueError(f"{len(labels)} labels for {K} bins: pass one label per bin (or the TimestepBins)")
    if len(set(labels)) != K:
        raise ValueError(f"the bin labels repeat ({labels}): pass distinct labels")
    return labels


def _frame_labels(matrix: Any) -> Optional[list[str]]:
    return [str(x) for x in matrix.columns] if isinstance(matrix, pd.DataFrame) else None


def _paths(out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    return out.with_suffix(".png"), out.with_suffix(".csv")


def cosine_heatmap(G_or_cosine: Any, bins_or_labels: Labels = None, out: str | Path = "cosine.png", *,
                   title: str = "Cosine between per-bin task gradients") -> pd.DataFrame:
    """Heatmap of ``cos[k, l] = G[k, l] / sqrt(G[k, k] G[l, l])`` (dimensionless, in [-1, 1]; red > 0 aligned,
    blue < 0 conflicting), as ``gradconflict gram`` draws it.

    ``G_or_cosine``: a K x K Gram (array, tensor, DataFrame or ``TaskGradients``) or a cosine matrix (its unit
    diagonal makes it its own cosine). ``bins_or_labels``: ``TimestepBins``, K labels, or None (a DataFrame's
    columns, else 0..K-1). Writes ``out`` as PNG and the K x K cosine (index and columns = labels) as CSV beside
    it; returns that DataFrame.

    Example: ``gc.plots.cosine_heatmap(gc.task_gram(model, x0, t, bins, schedule=s).gram, bins, "cos.png")``
    """
    from .conflict import cosine

    c = cosine(G_or_cosine)
    labels = _labels(bins_or_labels, c.shape[0], _frame_labels(G_or_cosine))
    frame = pd.DataFrame(c, index=pd.Index(labels, name="bin"), columns=labels)
    png, csv = _paths(out)
    write_csv(frame, csv, index=True)
    matrix_heatmap(frame, png, title=title, xlabel="timestep bin (t range)", ylabel="timestep bin (t range)",
                   colorbar="cosine similarity (1)", vmin=-1.0, vmax=1.0)
    return frame


def conflict_vs_distance(G: Any, bins: "TimestepBins", schedule: Any, out: str | Path = "conflict_distance.png", *,
                         title: str = "") -> pd.DataFrame:
    """Scatter of each bin pair's cosine (1) against the distance of the bins' log-SNR centres (nats), with the
    mean per distance decile (the paper's conflict-vs-distance figure, ``gradconflict.figures``).

    ``G``: one K x K Gram, or several (a sequence or an (N, K, K) array, e.g. resampled batches: one point per
    pair and Gram, column ``gram`` numbers them). ``bins``: the Gram's ``TimestepBins``; ``schedule``: its
    :class:`~gradconflict.NoiseSchedule`. Writes PNG + CSV (``conflict.pairwise_frame`` rows); returns them.
    ``title``: appended to the figure's title."""
    from .conflict import pairwise_frame
    from .figures.conflict_distance import conflict_vs_distance as figure

    grams = [G] if np.ndim(getattr(G, "gram", G)) == 2 else list(G)
    frames = [pairwise_frame(g, bins, schedule).assign(gram=n) for n, g in enumerate(grams)]
    pairs = pd.concat(frames, ignore_index=True)
    png, _ = _paths(out)
    return figure(pairs, png, subtitle=f"\n{title}" if title else "")


def pareto_weights(weights: Any, labels: Labels = None, out: str | Path = "pareto_weights.png", *,
                   strategies: Optional[Mapping[str, Any]] = None, name: str = "pareto_optimum",
                   title: str = "Pareto-optimal weights per timestep bin") -> pd.DataFrame:
    """Bar chart of the optimum weights ``w*`` per bin (on the simplex: ``sum_k w_k = 1``, share of 1), with
    optional strategies' per-bin weights beside each bar (each rescaled to sum 1, so shares compare).

    ``weights``: K weights (array, tensor or Series, e.g. ``pareto.solve(G).weights``); ``labels``:
    ``TimestepBins``, K labels or None (a Series' index, else 0..K-1); ``strategies``: ``{name: K weights}``
    (e.g. a weighting's mean x0-unit weight per bin); ``name``: the optimum's legend entry. Writes PNG + tidy CSV
    (``bin``, ``label``, ``name``, ``weight`` as given, ``share`` = weight / sum over bins); returns it."""
    series = {name: weights, **dict(strategies or {})}
    default = [str(x) for x in weights.index] if isinstance(weights, pd.Series) else None
    rows = []
    K = None
    for key, w in series.items():
        w = np.asarray(w.detach().cpu() if hasattr(w, "detach") else w, dtype=np.float64).reshape(-1)
        K = len(w) if K is None else K
        if len(w) != K or not np.all(np.isfinite(w)) or w.sum() <= 0 or (w < 0).any():
            raise ValueError(f"weights {key!r}: need {K} finite non-negative numbers with a positive sum, got {w}")
        rows.append(pd.DataFrame({"bin": np.arange(K), "name": key, "weight": w, "share": w / w.sum()}))
    frame = pd.concat(rows, ignore_index=True)
    bin_labels = _labels(labels, K, default)
    frame.insert(1, "label", [bin_labels[k] for k in frame["bin"]])
    png, csv = _paths(out)
    write_csv(frame, csv)
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.45 * K * len(series) + 2)), 4.5))
    sns.barplot(frame, x="label", y="share", hue="name", ax=ax)
    ax.set_xlabel("timestep bin (t range)")
    ax.set_ylabel("weight (share of 1)")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=8)
    save_figure(fig, png)
    return frame


def transfer_matrix(matrix: Any, labels: Labels = None, out: str | Path = "transfer.png", *,
                    title: str = "Cross-bin transfer") -> pd.DataFrame:
    """Heatmap of a K x K transfer matrix ``transfer[i, j] = (L_j(θ0) − L_j(θ_i)) / L_j(θ0)`` (dimensionless:
    relative loss reduction of bin j after fine-tuning on bin i; rows "fine-tuned on", columns "evaluated on"),
    with the mean transfer per bin distance beside it, as ``gradconflict transfer`` draws it.

    ``matrix``: K x K (array, or DataFrame with labels); ``labels``: ``TimestepBins``, K labels or None.
    Writes PNG + CSV (the matrix; index "fine-tuned on", columns "evaluated on"); returns that DataFrame."""
    from .transfer.config import TransferConfig
    from .transfer.matrix import TransferResult
    from .transfer.plot import plot_transfer

    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"a transfer matrix must be square K x K, got shape {m.shape}")
    K = m.shape[0]
    names = _labels(labels, K, _frame_labels(matrix))
    i, j = np.repeat(np.arange(K), K), np.tile(np.arange(K), K)
    frame = pd.DataFrame({"seed": 0, "source": i, "target": j, "distance": (j - i).astype(float),
                          "transfer": m.reshape(-1), "first_order": np.nan})
    result = TransferResult(frame, names, m, np.full_like(m, np.nan), None, None, None,
                            TransferConfig(steps=1, include_all=False), 0.0, False)
    png, csv = _paths(out)
    table = result.matrix_frame()
    write_csv(table, csv, index=True)
    ranges = all(len(x.split("-")) == 2 and all(p.isdigit() for p in x.split("-")) for x in names)
    plot_transfer(result, png, title=title, profile=ranges, csv=False)
    return table
