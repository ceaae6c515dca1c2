"""Claims C1-C3 over the independently trained models of ``gradconflict reproduce``, with their controls and figures.

Reads each model's cached stage outputs (``runs/reproduce-<name>/seed<s>/``: the tracking Grams, the transfer
runs, the control Grams, the online C2 frame, the held-out check) and writes, into ``figures/``: ``c1_models.csv`` (C1's
numbers per model and transfer run), ``fig3_online_weights.png/.csv`` (C2, model 0), ``c3_lam_path.png/.csv`` (C3's primary figure), ``c3_gamma_sweep.png/.csv``,
``c3_binning.csv`` (C3 under each binning and loss space), ``c2_models.csv`` and ``learned.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..comparison.report import CLAIM_COLUMNS
from ..plots import write_csv
from ..track import load_track
from .c1 import MIN_MODELS, UNIT, c1_table, claim_c1_models
from .c3 import (PAPER_STRATEGIES, c3_binning_table, c3_controls, claim_c3_models, gamma_sweep, lam_rule_models)
from .config import ReproduceConfig
from .models import LEARNED_FACTOR, c1_of_model, control_variants

__all__ = ["claims_over_models"]


def _binning(config: ReproduceConfig) -> str:
    """How the analysis bins were made: "clustered" under a bins file (``bins_edges``), else ``track.binning``
    (the transfer runs use uniform bins then)."""
    return "clustered" if config.bins_edges is not None else config.track.binning


def _c1_rows(config: ReproduceConfig, cache: Path, figures: Path, grams: list[list[np.ndarray]], schedule: Any,
             last_steps: list[int], resamples: int) -> tuple[list[dict], pd.DataFrame]:
    rows, tables = [], []
    for k, (name, run) in enumerate(config.transfer_runs().items()):
        per_model = []
        for s in range(config.seeds):
            frame = pd.read_csv(cache / f"seed{s}" / f"transfer-{name}.csv")
            G = np.mean(grams[s][-resamples:], axis=0) if config.track.binning == "uniform" else None
            per_model.append(c1_of_model(frame, config.transfer_bins, run, G, schedule, config.train.prediction,
                                         bins=config.transfer_timestep_bins()))
        row = claim_c1_models(per_model)
        row["claim"] = "C1" if k == 0 else f"C1 ({name})"
        loss = ("plain x0 loss" if run.get("loss_space", "x0") == "x0" and run.get("weighting") is None else
                f"training loss ({run.get('weighting')} weighting, {run.get('loss_space')} units) restricted to bin i")
        row["notes"] = (f"{run.get('optimizer', 'adamw')}, {run.get('steps')} steps at lr {run.get('lr')} in the {loss}; "
                        f"K = {config.transfer_bins} {'clustered' if config.bins_edges else 'uniform'} bins; " + row["notes"])
        rows.append(row)
        tables.append(c1_table(per_model).assign(run=name))
    return rows, pd.concat(tables, ignore_index=True)


def _c2_row(config: ReproduceConfig, cache: Path, figures: Path) -> tuple[dict, pd.DataFrame]:
    from ..figures.ugd_online import fig3_online_weights
    from .c2 import c2_statistics, claim_c2_models

    per_model = []
    for s in range(config.seeds):
        frame = pd.read_csv(cache / f"seed{s}" / "c2_online.csv")
        attrs = cache / f"seed{s}" / "c2_online.attrs.json"
        frame.attrs.update(json.loads(attrs.read_text()) if attrs.is_file() else {})
        per_model.append(c2_statistics(frame))
        if s == 0:
            tc = config.train
            fig3_online_weights(frame, figures / "fig3_online_weights",
                                subtitle=f"\n{tc.model} on {tc.data} {tc.image_size}x{tc.image_size}, trained with "
                                         f"{tc.weighting} weighting (model 0 of {config.seeds}); lam = "
                                         f"{config.track.lam} x trace(G)/K, x0 units")
    table = pd.DataFrame([{"model": m, **{k: v for k, v in d.items() if np.isscalar(v)}} for m, d in enumerate(per_model)])
    return claim_c2_models(per_model, lam=config.track.lam), table


def claims_over_models(config: ReproduceConfig, cache: Path, figures: Path, schedule: Any, bins: Any, *,
                       progress: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The claim rows (``CLAIM_COLUMNS``) and the tables the report cites; writes the figures and CSVs."""
    from ..figures.lam_path import gamma_sweep_figure, lam_path_figure

    tracks = [load_track(cache / f"seed{s}" / "track" / "track") for s in range(config.seeds)]
    grams = [[G for _, G in sorted(t.grams.items())] for t in tracks]
    last_steps = [max(st for st, _ in t.grams) for t in tracks]
    c1_rows, c1_frame = _c1_rows(config, cache, figures, grams, schedule, last_steps, config.track.resamples)
    write_csv(c1_frame, figures / "c1_models.csv")
    c2_row, c2_frame = _c2_row(config, cache, figures)
    write_csv(c2_frame, figures / "c2_models.csv")

    controls = c3_controls(grams, bins, schedule, PAPER_STRATEGIES, progress=progress)
    rule, per_model_rule = lam_rule_models(grams)
    c3_row = claim_c3_models(controls, per_model_rule)
    model_line = (f"\n{config.train.model} on {config.train.data} {config.train.image_size}x{config.train.image_size}, "
                  f"{config.train.prediction}-prediction, trained with {config.train.weighting} weighting; K = {bins.K} "
                  f"{_binning(config)} bins, x0 units; {config.seeds} models x {len(grams[0])} Grams")
    path = lam_path_figure(controls, figures / "c3_lam_path", subtitle=model_line, lam_rule=rule)
    sweep = gamma_sweep(grams, bins, schedule, lam=rule if np.isfinite(rule) else config.track.lam)
    gamma_sweep_figure(sweep, figures / "c3_gamma_sweep", subtitle=model_line)
    variants = {f"{_binning(config)}_K{bins.K} (tracked, x0, all checkpoints)": (bins, grams)}
    for name, (vbins, space) in control_variants(config, schedule).items():
        variants[f"{name} ({space}, final model)"] = (
            vbins, [list(np.load(cache / f"seed{s}" / f"grams-{name}.npy")) for s in range(config.seeds)])
    binning = c3_binning_table(variants, schedule)
    write_csv(binning, figures / "c3_binning.csv")
    summary = binning.groupby("binning", sort=False).agg(lam=("lam", "first"), verdict=("verdict", "first"),
                                                          best=("rank", lambda r: binning.loc[r.idxmin(), "strategy"]))
    c3_row["notes"] += "; binning and loss-space controls (each at its own lam rule): " + "; ".join(
        f"{b}: lowest {r.best}, {r.verdict} at lam {r.lam:.3g}" for b, r in summary.iterrows())

    learned = []
    for s in range(config.seeds):
        f = cache / f"seed{s}" / "learned.csv"
        if f.is_file():
            learned.append(pd.read_csv(f).assign(model=s))
    learned_frame = pd.concat(learned, ignore_index=True) if learned else pd.DataFrame()
    if len(learned_frame):
        write_csv(learned_frame, figures / "learned.csv")
    rows = pd.DataFrame([*c1_rows[:1], c2_row, c3_row, *c1_rows[1:]]).reindex(columns=list(CLAIM_COLUMNS))
    extras = {"c1": c1_frame, "c2": c2_frame, "lam_path": path, "lam_rule": rule, "per_model_rule": per_model_rule,
              "gamma": sweep, "binning": binning, "learned": learned_frame, "learned_factor": LEARNED_FACTOR,
              "min_models": MIN_MODELS, "unit": UNIT, "tracks": tracks}
    return rows, extras
