"""Figure of a transfer matrix: a diverging heatmap centred at 0 and the mean transfer against bin distance.

Left: ``transfer[i, j]`` (colour scale linear on each side of 0, each side to its own extreme) (relative loss reduction of bin j after fine-tuning on bin i; rows "fine-tuned on",
columns "evaluated on", the "all bins" control as the last row). Right: the profile
``P(d) = mean_i transfer[i, i + d]`` over source bins for each signed distance ``d = j - i`` (in bins), mean
over seeds with standard-error bars; positive near d = 0 and negative far away is claim C1.
The data is written beside the PNG as CSV (``summary_frame``: one row per source and target bin).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..plots import save_figure, write_csv  # noqa: E402
from .matrix import TransferResult  # noqa: E402

__all__ = ["distance_profile", "plot_transfer", "describe_setup"]


def distance_profile(result: TransferResult) -> pd.DataFrame:
    """Tidy profile per signed distance ``d = target - source`` (bins): ``transfer_mean`` (mean over source
    bins, then over seeds), ``transfer_stderr`` (over seeds; NaN for one seed), ``pairs`` (source bins with
    a target at distance d) and ``first_order_mean`` when the first-order prediction was computed."""
    f = result.frame[result.frame["source"] >= 0]
    per_seed = f.groupby(["seed", "distance"]).agg(transfer=("transfer", "mean"), first_order=("first_order", "mean"),
                                                   pairs=("source", "nunique")).reset_index()
    g = per_seed.groupby("distance")
    n = g["seed"].nunique()
    out = pd.DataFrame({
        "distance": g["transfer"].mean().index.astype(int),
        "transfer_mean": g["transfer"].mean().to_numpy(),
        "transfer_stderr": (g["transfer"].std(ddof=1) / np.sqrt(n)).to_numpy(),
        "first_order_mean": g["first_order"].mean().to_numpy(),
        "pairs": g["pairs"].first().to_numpy(),
        "n_seeds": n.to_numpy(),
    })
    return out if out["first_order_mean"].notna().any() else out.drop(columns="first_order_mean")


def describe_setup(result: TransferResult, model: str = "", data: str = "") -> str:
    """One line describing the run, e.g. ``dit-tiny on mnist, 20 AdamW steps, lr 1e-4, batch 16, 3 seeds``."""
    c = result.config
    step = "1 SGD lookahead step" if c.mode == "lookahead" else f"{c.steps} {c.optimizer.upper().replace('ADAMW', 'AdamW')} steps"
    head = " on ".join(x for x in (model, data) if x)
    parts = [head] if head else []
    parts += [step, f"lr {c.lr:g}", f"batch {c.batch_size}", f"{c.eval_samples} eval samples/bin",
              f"{len(c.seed_list())} seed{'s' if len(c.seed_list()) > 1 else ''}"]
    return ", ".join(parts)


def plot_transfer(result: TransferResult, path: str | Path, *, setup: str = "", title: Optional[str] = None,
                  profile: bool = True, csv: bool = True) -> Path:
    """Write the transfer heatmap (and, with ``profile``, the distance profile) as a PNG, and its data as
    CSV beside it (same name, ``.csv``). Returns the PNG path."""
    path = Path(path)
    frame = result.matrix_frame(include_all=True)
    K = result.K
    finite = frame.to_numpy()[np.isfinite(frame.to_numpy())]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1e-6
    bottom = float(finite.min()) if finite.size and finite.min() < 0 else -1e-6
    # two linear halves meeting at 0: small gains stay visible next to large losses (and vice versa)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=bottom, vmax=top)
    size = max(4.5, min(11.0, 0.55 * K + 2.5))
    ncols = 2 if profile else 1
    fig, axes = plt.subplots(1, ncols, figsize=(size + 1.4 + (size * 0.9 if profile else 0), size),
                             gridspec_kw={"width_ratios": [1.25, 1][:ncols]}, squeeze=False)
    ax = axes[0, 0]
    sns.heatmap(frame, ax=ax, cmap="RdBu_r", norm=norm, annot=K <= 12, fmt=".2f",
                annot_kws={"fontsize": 6}, square=True, cbar_kws={"label": "relative loss reduction (1)", "shrink": 0.8})
    if result.all_row is not None:
        ax.axhline(K, color="black", lw=1.5)
    ax.set_xlabel("evaluated on (t range, timesteps)")
    ax.set_ylabel("fine-tuned on (t range, timesteps)")
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    ax.set_title("(L_j(θ0) − L_j(θ_i)) / L_j(θ0), mean over seeds; > 0 (red): fine-tuning on\n"
                 "row i lowered the loss of column j (colour scale linear on each side of 0)",
                 fontsize=9)
    if profile:
        prof = distance_profile(result)
        axp = axes[0, 1]
        width = int(np.median([int(b) - int(a) + 1 for a, b in (lab.split("-") for lab in result.labels)]))
        axp.axhline(0.0, color="grey", lw=0.8)
        axp.errorbar(prof["distance"], prof["transfer_mean"], yerr=prof["transfer_stderr"].fillna(0.0), marker="o",
                     capsize=3, label="measured (mean over source bins; bars: seeds' s.e.)")
        if "first_order_mean" in prof:
            axp.plot(prof["distance"], prof["first_order_mean"], "k--", marker="x", label="first order lr<g_i, g_j>/L_j")
        axp.set_xlabel(f"bin distance j − i (bins of ~{width} timesteps; > 0: noisier target)")
        axp.xaxis.set_major_locator(MaxNLocator(integer=True))
        axp.set_ylabel("relative loss reduction (1)")
        axp.set_title("Transfer against distance between bins", fontsize=9)
        axp.legend(fontsize=8)
        axp.grid(alpha=0.3)
    head = title or "Cross-bin transfer: fine-tune on one timestep bin, relative loss change of every bin"
    fig.suptitle(f"{head}\n{setup}" if setup else head, fontsize=10)
    fig.tight_layout()
    if csv:
        write_csv(result.summary_frame(), path.with_suffix(".csv"))
    return save_figure(fig, path)
