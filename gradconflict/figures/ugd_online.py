"""Fig. 3 as the paper means it: online UGD's bin weights over training iterations, beside the exact optima."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plots import save_figure, suptitle, write_csv
from ..reproduce.c2 import c2_iterations

__all__ = ["fig3_online_weights"]

PANELS = (("ugd_online", "online UGD (warm-started, a few Adam steps per iteration)"),
          ("exact_small", "exact optimum of the same small batch"),
          ("exact_big", "exact optimum of a large batch at the checkpoint (reference)"))
REGRETS = (("ugd_online", "online UGD", "C0"), ("exact_small", "exact, small batch", "C1"),
           ("exact_big_prev", "previous checkpoint's reference", "C2"), ("uniform", "uniform 1/K", "0.5"))


def fig3_online_weights(frame: pd.DataFrame, out: str | Path, subtitle: str = "") -> pd.DataFrame:
    """Three heatmaps (bins x global iteration, one colour scale): the online UGD weights, the exact optimum of
    each iteration's small batch and the checkpoint's large-batch optimum; checkpoints are separated by white
    lines and labelled with their training step. A fourth panel gives each iteration's regret (2) on the large
    batch. ``frame``: :func:`gradconflict.reproduce.c2.c2_online` output of one model. Writes ``out.png`` and
    ``out.csv`` (step, iter, global_iter, source, bin, weight, regret) and returns the CSV's frame."""
    out = Path(out)
    table = c2_iterations(frame)
    glob = table.set_index(["step", "iter"])["global_iter"]
    data = frame.merge(glob.reset_index(), on=["step", "iter"])
    data = data[["step", "iter", "global_iter", "source", "bin", "weight", "regret"]].sort_values(
        ["source", "global_iter", "bin"], ignore_index=True)
    write_csv(data, out.with_suffix(".csv"))
    K = int(data["bin"].max()) + 1
    n = len(table)
    grids = {s: data[data["source"] == s].pivot(index="bin", columns="global_iter", values="weight")
             .reindex(index=range(K), columns=range(n)).to_numpy() for s, _ in PANELS}
    vmax = float(np.nanmax([np.nanmax(g) for g in grids.values()]))
    starts = table.groupby("step")["global_iter"].min()
    fig, axes = plt.subplots(4, 1, figsize=(max(7.0, min(16.0, 0.12 * n + 5)), 11), layout="constrained",
                             sharex=True, gridspec_kw={"height_ratios": [1, 1, 1, 0.9]})
    for ax, (source, title) in zip(axes, PANELS):
        im = ax.imshow(grids[source], aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                       extent=(-0.5, n - 0.5, -0.5, K - 0.5), interpolation="nearest")
        for x in starts.to_numpy()[1:]:
            ax.axvline(x - 0.5, color="white", lw=1.2)
        ax.set_ylabel("timestep bin (0 = smallest t)")
        ax.set_title(title, fontsize=9, pad=30 if ax is axes[0] else 6)
    fig.colorbar(im, ax=list(axes[:3]), label="Pareto weight (share of 1)", shrink=0.8)
    ax = axes[3]
    for source, label, color in REGRETS:
        col = f"regret_{source}"
        if col in table:
            ax.plot(table["global_iter"], 100 * table[col], label=label, color=color, marker="o", ms=2.5, lw=1)
    ax.set_yscale("symlog", linthresh=0.1)
    for x in starts.to_numpy()[1:]:
        ax.axvline(x - 0.5, color="0.7", lw=0.8)
    ax.set_ylabel("regret on large batch (%)")
    ax.set_xlabel("training iteration (global index; checkpoints marked on top)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ends = np.append(starts.to_numpy()[1:], n)
    top = axes[0].secondary_xaxis("top")
    top.set_xticks((starts.to_numpy() + ends - 1) / 2, [f"step {s}" for s in starts.index], fontsize=7)
    top.set_xlabel("checkpoint (training step)", fontsize=8)
    a = frame.attrs
    setting = (f" ({a['per_task']} samples per bin, {a['ugd_steps']} Adam steps of lr {a['ugd_lr']:g} per "
               f"iteration, lam = {a['lam']:g} x trace(G)/K)")
    setting = setting if {"per_task", "ugd_steps", "ugd_lr", "lam"} <= set(a) else ""
    suptitle(fig, f"Fig. 3 - online UGD weights per timestep bin over training iterations, beside the exact optima"
                  f"{subtitle}\n{setting.strip()}")
    save_figure(fig, out.with_suffix(".png"))
    return data
