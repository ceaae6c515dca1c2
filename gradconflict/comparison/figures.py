"""The comparison's figures (paper Figs. 5 and 6, and the score against measured speed), each PNG with its CSV."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..figures.pareto_objective import series_colors
from ..plots import save_figure, suptitle, write_csv

__all__ = ["fig5_convergence", "fig6_loss_per_timestep", "score_vs_speed"]


def _color_key(weighting: str) -> str:
    return weighting.replace(":", "_")  # "min_snr:5" takes Fig. 4's colour of "min_snr_5"


def _palette(names: list[str]) -> dict[str, object]:
    colours = series_colors([_color_key(n) for n in names])
    return {n: colours[_color_key(n)] for n in names}


def _stats(evals: pd.DataFrame, column: str) -> pd.DataFrame:
    grouped = evals.groupby(["weighting", "step"], sort=False)
    stats = grouped[column].agg(["mean", "std", "count"]).reset_index()
    stats["stderr"] = stats["std"] / np.sqrt(stats["count"])
    stats["n_models"] = grouped["seed"].nunique().to_numpy()
    return stats.rename(columns={"mean": f"{column}_mean", "stderr": f"{column}_stderr"}).drop(columns=["std", "count"])


def fig5_convergence(evals: pd.DataFrame, out: str | Path, *, subtitle: str = "") -> pd.DataFrame:
    """FD-MNIST (left) and the total held-out loss in x0 units (right) against training steps, one line per
    weighting, mean over seeds with a band of +- one standard error over seeds. Writes ``out.png`` and ``out.csv``."""
    out = Path(out)
    fd, loss = _stats(evals, "fd_mnist"), _stats(evals, "loss_x0")
    table = loss.merge(fd, on=["weighting", "step", "n_models"])
    write_csv(table, out.with_suffix(".csv"))
    names = list(dict.fromkeys(table["weighting"]))
    palette = _palette(names)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for ax, column, label in ((axes[0], "fd_mnist", "FD-MNIST (lower is better)"),
                              (axes[1], "loss_x0", "held-out loss, x0 units (mean over bins)")):
        if not np.isfinite(table[f"{column}_mean"].to_numpy(dtype=float)).any():
            ax.text(0.5, 0.5, f"{label.split(' (')[0]} not measured\n(FD-MNIST needs MNIST data)", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        for name in names:
            s = table[table["weighting"] == name]
            mean, se = s[f"{column}_mean"], s[f"{column}_stderr"].fillna(0)
            ax.plot(s["step"], mean, marker="o", ms=3, lw=1.4, color=palette[name], label=name)
            ax.fill_between(s["step"], mean - se, mean + se, color=palette[name], alpha=0.15, lw=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="weighting")
    n = int(table["n_models"].min()) if len(table) else 0
    suptitle(fig, "Fig. 5 - convergence under each loss weighting (held-out data; mean +- s.e. over "
                  f"{n} independently trained models)" + (f"\n{subtitle}" if subtitle else ""))
    save_figure(fig, out.with_suffix(".png"))
    return table


def fig6_loss_per_timestep(per_bin: pd.DataFrame, out: str | Path, *, subtitle: str = "") -> pd.DataFrame:
    """Unweighted held-out loss per timestep bin at the last evaluation step, one line per weighting (mean over
    seeds), in x0 units (left) and in the model's own prediction units (right)."""
    out = Path(out)
    last = per_bin[per_bin["step"] == per_bin["step"].max()]
    keys = [c for c in ("bin", "t_lo", "t_hi") if c in last.columns]
    table = (last.groupby(["weighting", *keys], sort=False)[["loss_x0", "loss_model"]]
             .agg(["mean", "std", "count"]).reset_index())
    table.columns = ["_".join(c).rstrip("_") if isinstance(c, tuple) else c for c in table.columns]
    write_csv(table, out.with_suffix(".csv"))
    names = list(dict.fromkeys(table["weighting"]))
    palette = _palette(names)
    x = "t_lo" if "t_lo" in table.columns else "bin"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    for ax, column, label in ((axes[0], "loss_x0", "x0 units: ||x0 - x0_hat||^2 per pixel"),
                              (axes[1], "loss_model", "model units (its own target) per pixel")):
        for name in names:
            s = table[table["weighting"] == name]
            ax.plot(s[x], s[f"{column}_mean"], marker="o", ms=3, lw=1.4, color=palette[name], label=name)
        ax.set_xlabel("timestep bin (first t)")
        ax.set_ylabel(f"held-out loss, {label}")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="weighting")
    step = int(last["step"].max()) if len(last) else 0
    suptitle(fig, f"Fig. 6 - unweighted held-out loss per timestep after {step} steps, per training weighting "
                  "(mean over seeds)" + (f"\n{subtitle}" if subtitle else ""))
    save_figure(fig, out.with_suffix(".png"))
    return table


def score_vs_speed(table: pd.DataFrame, out: str | Path, metric: str = "fd_mnist", *, subtitle: str = "") -> pd.DataFrame:
    """Each fixed strategy's Pareto ratio (x, log) against its convergence (``auc_<metric>``, y), with the
    diagonal-only null's ratio beside it (open markers): does distance to the optimum predict training?"""
    out = Path(out)
    write_csv(table, out.with_suffix(".csv"))
    palette = _palette(list(table["weighting"]))
    fig, ax = plt.subplots(figsize=(8, 5.2), layout="constrained")
    for row in table.itertuples():
        colour = palette[row.weighting]
        ax.scatter(row.pareto_ratio, getattr(row, f"auc_{metric}"), color=colour, s=40, label=row.weighting, zorder=3)
        ax.scatter(row.diag_ratio, getattr(row, f"auc_{metric}"), facecolors="none", edgecolors=colour, s=40, zorder=3)
        ax.plot([row.pareto_ratio, row.diag_ratio], [getattr(row, f"auc_{metric}")] * 2, color=colour, lw=0.6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("Pareto ratio: objective / optimum (filled: Gram; open: diagonal-only null)")
    ax.set_ylabel(f"{metric} averaged over evaluation steps (lower = faster)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="weighting")
    suptitle(fig, "Does the distance to the Pareto optimum predict training speed?" + (f"\n{subtitle}" if subtitle else ""))
    save_figure(fig, out.with_suffix(".png"))
    return table
