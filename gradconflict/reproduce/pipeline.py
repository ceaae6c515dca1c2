"""The main job: train, track the Pareto problem, measure cross-bin transfer, draw every figure, write REPORT.md.

Stages are cached in ``out/runs/reproduce-<preset>/``: each finished stage leaves ``<stage>.done.json`` with
the inputs it ran on; a rerun skips a stage whose inputs did not change, and the tracking and training
stages resume from their last checkpoint when interrupted. A changed training config removes the cached
training run, its snapshots and the tracking results; a changed tracking config only the tracking results.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .. import conflict
from .._io import write_text
from ..distributed import barrier, is_main
from ..bins import TimestepBins
from ..data import load_dataset
from ..figures import conflict_vs_distance, fig3_ugd_weights, fig4_pareto_objective, lambda_sweep_figure
from ..plots import matrix_heatmap, write_csv
from ..track import lambda_sweep, load_track, make_bins, stale_tracking, track_training
from ..train import load_trained, make_schedule, sample_grid_png
from ..transfer import TransferConfig, run_transfer
from ..transfer.matrix import result_from_frame
from ..transfer.plot import plot_transfer
from .claims import c3_lambda_sensitivity, claim_c1, claim_c2, claim_c3
from .config import ReproduceConfig
from .report import write_report

__all__ = ["FIGURE_NAMES", "reproduce"]


def _stage(cache: Path, name: str, identity: dict[str, Any], run: Callable[[], None], log: Callable[[str], None]) -> None:
    stamp = cache / f"{name}.done.json"
    text = json.dumps(identity, sort_keys=True, default=str)
    if stamp.is_file() and stamp.read_text() == text:
        log(f"[{name}] cached: inputs unchanged")
        return
    t0 = time.perf_counter()
    run()  # under torchrun every rank takes part; only rank 0 writes
    if is_main():
        write_text(stamp, text)
    barrier()
    log(f"[{name}] done in {time.perf_counter() - t0:.0f} s")


FIGURE_NAMES = ("fig2_transfer", "fig3_ugd_weights", "fig4_pareto_objective", "lambda_sweep", "conflict_vs_distance",
                "cosine_final", "samples")


def reproduce(config: ReproduceConfig, out: str | Path = ".", *, progress: bool = True,
              log: Callable[[str], None] = print, only: Sequence[str] | None = None) -> pd.DataFrame | None:
    """Run every stage of ``config``, draw the figures (``only`` a subset of ``FIGURE_NAMES``: then only the
    stages they need run, and no report) and return the claims table. Figures go to ``out/figures``."""
    wanted = set(FIGURE_NAMES if only is None else only)
    unknown = wanted - set(FIGURE_NAMES)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; choose from {list(FIGURE_NAMES)}")
    need_transfer = only is None or "fig2_transfer" in wanted
    if config.cpu_threads and config.train.device == "cpu":
        torch.set_num_threads(config.cpu_threads)
    out = Path(out)
    cache = out / "runs" / f"reproduce-{config.name}"
    figures = out / "figures"
    cache.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    tc = config.train
    schedule = make_schedule(tc.schedule, tc.T)
    track_dir = cache / "track"

    stale = stale_tracking(track_dir, tc, config.track, every=config.every) if is_main() else None
    if stale is not None:  # a changed config reruns what depends on it: the cached results of the old one go
        removed = track_dir if stale == "training" else track_dir / "track"
        log(f"[track] the {stale} config changed: removing {removed} (results of the previous config)")
        shutil.rmtree(removed)
    barrier()
    _stage(cache, "track", config.identity("track"),
           lambda: track_training(tc, config.track, track_dir, every=config.every, progress=progress), log)
    run_dir = track_dir / "run"
    transfer_csv = cache / "transfer.csv"

    def transfer_stage() -> None:
        model, _, prediction = load_trained(run_dir, ema=False, device=tc.device)  # a point of the trajectory, not the EMA
        data = load_dataset(tc.data, image_size=tc.image_size, limit=tc.data_limit)
        bins = TimestepBins.uniform(schedule.T, config.transfer_bins)
        cfg = TransferConfig(**{"progress": progress, **config.transfer})
        # finished seeds survive an interruption; the folder is named by the stage's inputs, so a changed
        # config starts a fresh one (and the stale ones are removed once this stage is done)
        key = hashlib.sha256(json.dumps(config.identity("transfer"), sort_keys=True, default=str).encode()).hexdigest()
        partial = cache / f"transfer-seeds-{key[:12]}"
        result = run_transfer(model, data, bins, cfg, schedule=schedule, prediction=prediction, resume_dir=partial)
        if is_main():
            write_csv(result.frame, transfer_csv)
            for stale in cache.glob("transfer-seeds-*"):
                if stale != partial:
                    shutil.rmtree(stale)

    if need_transfer:
        _stage(cache, "transfer", config.identity("transfer"), transfer_stage, log)

    # ---------------------------------------------------------------- figures (cheap: always redrawn, by rank 0)
    if not is_main():
        return None
    track = load_track(track_dir / "track")
    bins = make_bins(schedule, config.track)
    model_line = f"\n{tc.model} on {tc.data} {tc.image_size}x{tc.image_size}, {tc.prediction}-prediction, " \
                 f"trained with {tc.weighting} weighting\nK = {bins.K} bins, {config.track.per_task} samples/bin"
    setup = (f"{model_line}, {config.track.resamples} batches/checkpoint, lam = {config.track.lam} x trace(G)/K, "
             f"UGD {config.track.ugd_steps} Adam steps")
    if "fig3_ugd_weights" in wanted:
        fig3_ugd_weights(track.weights, figures / "fig3_ugd_weights", subtitle=setup)
    if "fig4_pareto_objective" in wanted:
        fig4_pareto_objective(track.objectives, figures / "fig4_pareto_objective", subtitle=setup)
    last = max(s for s, _ in track.grams)
    G_last = track.grams[(last, 0)]
    if "lambda_sweep" in wanted:
        lambda_sweep_figure(lambda_sweep(G_last, bins, lams=[0.0, *np.logspace(-4, 2, 13)]), figures / "lambda_sweep",
                            used_lam=config.track.lam, subtitle=f" (step {last}, batch 0)" + model_line)
    if "conflict_vs_distance" in wanted:
        pairs = pd.concat([conflict.pairwise_frame(G, bins, schedule).assign(step=s, resample=r)
                           for (s, r), G in sorted(track.grams.items())], ignore_index=True)
        conflict_vs_distance(pairs, figures / "conflict_vs_distance",
                             subtitle=f"\npooled over {pairs['step'].nunique()} checkpoints x {config.track.resamples} "
                                      f"batches" + model_line)
    if "cosine_final" in wanted:
        cos = pd.DataFrame(conflict.cosine(np.mean([track.grams[(last, r)] for r in range(config.track.resamples)], 0)),
                           index=pd.Index(bins.labels, name="bin"), columns=bins.labels)
        write_csv(cos, figures / "cosine_final.csv", index=True)
        matrix_heatmap(cos, figures / "cosine_final.png", title=f"Cosine of per-bin task gradients at step {last} (Gram "
                       f"averaged over {config.track.resamples} batches)" + model_line,
                       xlabel="timestep bin (t range)", ylabel="timestep bin (t range)", colorbar="cosine similarity (1)",
                       vmin=-1, vmax=1)
    if "samples" in wanted:
        model, _, prediction = load_trained(run_dir, ema=True, device=tc.device)
        sample_grid_png(model, schedule, prediction, figures / "samples.png", n=16, steps=config.sample_steps, seed=0,
                        title=f"DDIM samples ({config.sample_steps} steps, seed 0) of {tc.model} after {tc.steps} training "
                              f"steps on {tc.data} {tc.image_size}x{tc.image_size} (EMA weights, {prediction}-prediction)")
    if only is not None and not need_transfer:
        return None
    transfer = result_from_frame(pd.read_csv(transfer_csv), TimestepBins.uniform(schedule.T, config.transfer_bins),
                                 TransferConfig(**config.transfer))
    if "fig2_transfer" in wanted:
        plot_transfer(transfer, figures / "fig2_transfer.png",
                      title="Fig. 2 - fine-tune on one timestep bin, relative loss change of every bin",
                      setup=f"{tc.model} ({tc.prediction}-prediction) on {tc.data} {tc.image_size}x{tc.image_size}, "
                            f"{config.transfer.get('steps')} AdamW steps at lr {config.transfer.get('lr')}, "
                            f"{transfer.frame['seed'].nunique()} seeds")
    if only is not None:
        return None

    # ---------------------------------------------------------------- claims and report
    claims = pd.DataFrame([claim_c1(transfer.matrix, transfer.stderr), claim_c2(track.weights, objectives=track.objectives),
                           claim_c3(track.objectives)])
    write_csv(_with_compare_rows(claims, figures / "claims.csv"), figures / "claims.csv")
    sensitivity = c3_lambda_sensitivity(track.weights, track.grams)
    write_csv(sensitivity, figures / "c3_lambda_sensitivity.csv")
    write_report(figures / "REPORT.md", config, claims, track, transfer, sensitivity)
    for _, c in claims.iterrows():
        log(f"{c['claim']}: {'holds' if c['holds'] else 'does not hold'} - {c['measured']}")
    return claims


def _with_compare_rows(claims: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``claims`` and the C4-C6 rows that ``gradconflict compare`` wrote into ``path`` earlier (kept)."""
    if not path.is_file():
        return claims
    old = pd.read_csv(path)
    kept = old[old["claim"].astype(str).str.match(r"C[456]\b")]
    return pd.concat([claims, kept], ignore_index=True) if len(kept) else claims
