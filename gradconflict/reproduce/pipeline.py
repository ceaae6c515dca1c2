"""The main job: train, track the Pareto problem, measure cross-bin transfer, draw every figure, write REPORT.md.

Stages are cached per independently trained model in ``out/runs/reproduce-<preset>/seed<s>/`` (training seed
``train.seed + s``; see :mod:`.models` for the stages after tracking): each finished stage leaves
``<stage>.done.json`` with the inputs it ran on; a rerun skips a stage whose inputs did not change, and the tracking and training
stages resume from their last checkpoint when interrupted. A changed training config removes the cached
training run, its snapshots and the tracking results; a changed tracking config only the tracking results.

With ``config.bins_edges`` (``--bins-file``) the trained models are reused as they are and every bin-dependent
stage (the tracking Grams, recomputed from the snapshots; transfer; C2; the control Grams in the own loss space;
the held-out check) runs under those bins in ``runs/reproduce-<preset>/clustered-<key>/seed<s>/``; the figures go
to ``figures/clustered/`` and the comparison with the uniform analysis to ``figures/REPORT.md`` (:mod:`.clustered`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
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
from ..track import changed_sources, file_source, lambda_sweep, load_track, make_bins, stale_tracking, track_models, track_training
from ..train import load_trained, make_schedule, sample_grid_png
from ..transfer import TransferConfig, run_transfer
from ..transfer.matrix import result_from_frame
from ..transfer.plot import plot_transfer
from .config import ReproduceConfig
from .report import write_replicated_report

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


def _model_stages(config: ReproduceConfig, seed: int, cache: Path, *, progress: bool, log: Callable[[str], None],
                  need_transfer: bool, controls: bool, stages: Path | None = None) -> None:
    """Train and track model ``seed`` in ``cache`` (``runs/reproduce-<name>/seed<s>``), then its transfer runs and,
    with ``controls``, its C3 control Grams, its online C2 frame and its held-out check (each a cached stage).

    With ``config.bins_edges`` the training (and its uniform tracking) stays in ``cache`` and is reused as it is;
    the bin-dependent stages run under the edges in ``stages`` (``runs/reproduce-<name>/clustered-<key>/seed<s>``),
    the first of them the tracking Grams recomputed from the saved snapshots (:func:`_track_snapshots`)."""
    uniform = replace(config, bins_edges=None)
    tc = config.train_of(seed)
    schedule = make_schedule(tc.schedule, tc.T)
    track_dir = cache / "track"
    tag = f"seed{seed}/" if stages is None or stages == cache else f"{stages.parent.name}/seed{seed}/"
    say = lambda text: log(text.replace("[", "[" + f"seed{seed}/", 1))  # noqa: E731
    stale = stale_tracking(track_dir, tc, uniform.track, every=config.every) if is_main() else None
    if stale is not None:  # a changed config reruns what depends on it: the cached results of the old one go
        removed = track_dir if stale == "training" else track_dir / "track"
        say(f"[track] the {stale} config changed: removing {removed} (results of the previous config)")
        shutil.rmtree(removed)
    barrier()
    _stage(cache, "track", uniform.identity("track", seed),
           lambda: track_training(tc, uniform.track, track_dir, every=config.every, progress=progress), say)
    run_dir = track_dir / "run"
    if config.bins_edges is not None:
        assert stages is not None, "bins_edges: pass the folder of the bin-dependent stages"
        config = config.clustered()
        cache = stages
        say = lambda text: log(text.replace("[", "[" + tag, 1))  # noqa: E731
        _track_snapshots(config, seed, track_dir, cache, progress=progress, log=say)
    runs = config.transfer_runs()
    data = None

    def dataset() -> Any:
        nonlocal data
        if data is None:
            data = load_dataset(tc.data, image_size=tc.image_size, limit=tc.data_limit)
        return data

    def transfer_stage(name: str) -> None:
        model, _, prediction = load_trained(run_dir, ema=False, device=tc.device)  # a point of the trajectory, not the EMA
        bins = config.transfer_timestep_bins()
        cfg = TransferConfig(**{"progress": progress, **runs[name]})
        # finished seeds survive an interruption; the folder is named by the stage's inputs, so a changed
        # config starts a fresh one (and the stale ones are removed once this stage is done)
        key = hashlib.sha256(json.dumps(config.identity(f"transfer-{name}", seed), sort_keys=True,
                                        default=str).encode()).hexdigest()
        partial = cache / f"transfer-{name}-seeds-{key[:12]}"
        result = run_transfer(model, dataset(), bins, cfg, schedule=schedule, prediction=prediction, resume_dir=partial)
        if is_main():
            write_csv(result.frame, cache / f"transfer-{name}.csv")
            for old in cache.glob(f"transfer-{name}-seeds-*"):
                if old != partial:
                    shutil.rmtree(old)

    if need_transfer:
        for name in runs:
            _stage(cache, f"transfer-{name}", config.identity(f"transfer-{name}", seed),
                   lambda name=name: transfer_stage(name), say)
    if not controls:
        return
    from .models import control_grams, control_variants, learned_table, save_grams

    for variant, (bins, space) in control_variants(config, schedule).items():
        def grams_stage(bins: TimestepBins = bins, space: str = space, variant: str = variant) -> None:
            model, _, prediction = load_trained(run_dir, ema=False, device=tc.device)
            G = control_grams(model, dataset().images.to(tc.device), schedule, prediction, bins, space,
                              config.track.per_task, config.track.resamples, seed)
            if is_main():
                save_grams(cache / f"grams-{variant}.npy", G)
        _stage(cache, f"grams-{variant}", config.identity(f"grams-{variant}", seed), grams_stage, say)

    def c2_stage() -> None:
        from .c2 import c2_online

        steps = sorted(int(p.stem[4:]) for p in (track_dir / "snapshots").glob("step*.safetensors"))
        models = [(st, lambda st=st: load_trained(track_dir / "snapshots" / f"step{st}.safetensors", ema=False)[0])
                  for st in steps]
        prediction = load_trained(run_dir, ema=False)[2]
        frame = c2_online(models, dataset().images, schedule, prediction, config.task_timestep_bins(),
                          **{"lam": config.track.lam, "seed": seed, "progress": progress, **config.c2})
        if is_main():
            write_csv(frame, cache / "c2_online.csv")
            write_text(cache / "c2_online.attrs.json", json.dumps(frame.attrs, default=str))

    _stage(cache, "c2", config.identity("c2", seed), c2_stage, say)
    if config.held_out > 0:
        def learned_stage() -> None:
            model, _, prediction = load_trained(run_dir, ema=True, device=tc.device)
            limit = tc.data_limit
            full = load_dataset(tc.data, image_size=tc.image_size,
                                limit=None if limit is None else limit + config.held_out).images
            held = full[limit:] if limit is not None and len(full) > limit else full[-config.held_out:]
            table = learned_table(model, held.to(tc.device), schedule, prediction, config.task_timestep_bins(),
                                  seed=seed)
            table["held_out"] = bool(limit is not None and len(full) > limit)  # else: the last training images
            if is_main():
                write_csv(table, cache / "learned.csv")
        _stage(cache, "learned", config.identity("learned", seed), learned_stage, say)


def _track_snapshots(config: ReproduceConfig, seed: int, track_dir: Path, stages: Path, *, progress: bool,
                     log: Callable[[str], None]) -> None:
    """The cached stage ``track`` under ``config.track`` (e.g. a bins file's edges): the Grams, Pareto weights and
    strategy scores of model ``seed`` at every tracked step, recomputed from the snapshots its training saved in
    ``track_dir/snapshots`` (nothing is trained), into ``stages/track/track`` (the layout of ``track_training``).
    Each snapshot is recorded by its content hash, so results of another training are never mixed in."""
    tc = config.train_of(seed)
    identity = config.identity("track", seed)
    stamp, out = stages / "track.done.json", stages / "track" / "track"
    steps = range(config.every, tc.steps + 1, config.every)
    snaps = {s: track_dir / "snapshots" / f"step{s}.safetensors" for s in steps}
    if is_main() and out.exists():
        if stamp.is_file() and stamp.read_text() != json.dumps(identity, sort_keys=True, default=str):
            log(f"[track] the training or tracking config changed: removing {out} (results of the previous config)")
            shutil.rmtree(out)
        elif not stamp.is_file() and changed_sources(out, {s: file_source(p) for s, p in snaps.items() if p.is_file()}):
            # an interrupted tracking of models that were trained again since: its partial results are of others
            log(f"[track] the snapshots changed since the interrupted tracking: removing {out}")
            shutil.rmtree(out)
    barrier()

    def run() -> None:
        missing = [p for p in snaps.values() if not p.is_file()]
        if missing:
            raise ValueError(f"no snapshot {missing[0]} to recompute the tracking from; run the uniform stages first "
                             f"(the same command without the bins file)")
        data = load_dataset(tc.data, image_size=tc.image_size, limit=tc.data_limit, scale=tc.scale)
        track_models(((s, lambda p=p: load_trained(p, ema=False)[0]) for s, p in snaps.items()), data.images,
                     make_schedule(tc.schedule, tc.T), tc.prediction, config.track, labels=data.labels,
                     conditional=tc.conditional, out_dir=out, device=tc.device, progress=progress,
                     sources={s: file_source(p) for s, p in snaps.items()} if is_main() else None)

    _stage(stages, "track", identity, run, log)


def reproduce(config: ReproduceConfig, out: str | Path = ".", *, progress: bool = True,
              log: Callable[[str], None] = print, only: Sequence[str] | None = None) -> pd.DataFrame | None:
    """Run every stage of ``config`` for each of its ``seeds`` models, draw the figures (``only`` a subset of
    ``FIGURE_NAMES``: then only the stages they need run, for model 0, and no report) and return the claims table
    (``comparison.report.CLAIM_COLUMNS``; the model is the replication unit). Figures go to ``out/figures``."""
    wanted = set(FIGURE_NAMES if only is None else only)
    unknown = wanted - set(FIGURE_NAMES)
    if unknown:
        raise ValueError(f"unknown figure(s) {sorted(unknown)}; choose from {list(FIGURE_NAMES)}")
    need_transfer = only is None or "fig2_transfer" in wanted
    if config.cpu_threads and config.train.device == "cpu":
        torch.set_num_threads(config.cpu_threads)
    out = Path(out)
    cache = out / "runs" / f"reproduce-{config.name}"
    figures = config.figures_dir(out)
    stages = cache  # where the bin-dependent stages go: under bins_edges, a folder of their own
    if config.bins_edges is not None:
        stages, figures = cache / f"clustered-{config.bins_key}", figures / "clustered"
    cache.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    legacy = cache / "track"  # the single-model layout of earlier versions: it is model 0's
    if is_main() and legacy.is_dir() and not (cache / "seed0").exists():
        (cache / "seed0").mkdir()
        legacy.rename(cache / "seed0" / "track")
        log(f"[track] moved the cached run {legacy} to {cache / 'seed0' / 'track'} (model 0)")
    barrier()
    seeds = range(config.seeds) if only is None else range(1)
    for s in seeds:
        _model_stages(config, s, cache / f"seed{s}", progress=progress, log=log, need_transfer=need_transfer,
                      controls=only is None, stages=stages / f"seed{s}")
    if not is_main():
        return None
    clustered, config = config.bins_edges is not None, config.clustered()
    tc = config.train
    schedule = make_schedule(tc.schedule, tc.T)
    run_dir = cache / "seed0" / "track" / "run"
    cache = stages
    track = load_track(cache / "seed0" / "track" / "track")
    bins = make_bins(schedule, config.track)
    _draw_model0(config, wanted, figures, track, bins, schedule, run_dir)
    if only is not None and not need_transfer:
        return None
    primary = next(iter(config.transfer_runs()))
    transfer = _pooled_transfer(config, cache, primary, seeds, schedule)
    if "fig2_transfer" in wanted:
        _draw_transfer(config, transfer, figures / "fig2_transfer.png", primary)
    if only is not None:
        return None
    for name in list(config.transfer_runs())[1:]:
        _draw_transfer(config, _pooled_transfer(config, cache, name, seeds, schedule), figures / f"fig2_transfer_{name}.png",
                       name)

    # ---------------------------------------------------------------- claims over models and the report
    from .replicated import claims_over_models

    claims, extras = claims_over_models(config, cache, figures, schedule, bins, progress=progress)
    write_csv(_with_compare_rows(claims, figures / "claims.csv"), figures / "claims.csv")
    write_replicated_report(figures / "REPORT.md", config, claims, extras)
    from .clustered import write_clustered_comparison

    if clustered:
        uniform = config.figures_dir(out)
        edges = TimestepBins.from_edges(config.bins_edges, schedule.T)
        write_csv(edges.to_frame().rename(columns={"task": "bin"})[["bin", "t_low", "t_high", "width", "label"]],
                  figures / "bins.csv")  # the edges this analysis used (the comparison is rebuilt from it)
        write_clustered_comparison(uniform, config.bins_edges)
        log(f"clustered bins {list(config.bins_edges or ())}: figures in {figures}; the comparison with the uniform "
            f"bins in {uniform / 'REPORT.md'} and {uniform / 'clustered_vs_uniform.csv'}")
    elif (figures / "clustered" / "claims.csv").is_file() and (figures / "clustered" / "bins.csv").is_file():
        from ..clustering import read_bins_csv  # a new uniform analysis: the comparison is rebuilt, never kept stale

        write_clustered_comparison(figures, tuple(int(e) for e in read_bins_csv(figures / "clustered" / "bins.csv")[0]))
    for _, c in claims.iterrows():
        log(f"{c['claim']}: {c['verdict']} - statistic {c['statistic']:+.4g} +- {c['stderr']:.2g} over "
            f"{c['n_models']} model(s)")
    return claims


def _pooled_transfer(config: ReproduceConfig, cache: Path, name: str, seeds: Sequence[int], schedule: Any) -> Any:
    """The transfer run ``name`` of every model as one result: seeds renumbered ``1000 model + seed``, so the mean
    and standard error run over models x seeds."""
    frames = []
    for s in seeds:
        f = pd.read_csv(cache / f"seed{s}" / f"transfer-{name}.csv")
        frames.append(f.assign(seed=1000 * s + f["seed"]))
    return result_from_frame(pd.concat(frames, ignore_index=True), config.transfer_timestep_bins(),
                             TransferConfig(**config.transfer_runs()[name]))


def _draw_transfer(config: ReproduceConfig, transfer: Any, path: Path, name: str) -> None:
    tc, run = config.train, config.transfer_runs()[name]
    loss = ("the plain x0 loss" if run.get("loss_space", "x0") == "x0" and run.get("weighting") is None else
            f"the training loss ({run.get('weighting')} weighting, {run.get('loss_space')} units)")
    n_models = transfer.frame["seed"].floordiv(1000).nunique()
    plot_transfer(transfer, path, title="Fig. 2 - fine-tune on one timestep bin, relative loss change of every bin",
                  setup=f"{tc.model} ({tc.prediction}-prediction) on {tc.data} {tc.image_size}x{tc.image_size}, "
                        f"{run.get('steps')} {run.get('optimizer', 'adamw')} steps at lr {run.get('lr')} in {loss}; "
                        f"{n_models} models x {transfer.frame['seed'].nunique() // max(n_models, 1)} seeds")


def _draw_model0(config: ReproduceConfig, wanted: set, figures: Path, track: Any, bins: Any, schedule: Any,
                 run_dir: Path) -> None:
    """The per-model figures, from model 0 (training seed ``train.seed``)."""
    tc = config.train
    model_line = f"\n{tc.model} on {tc.data} {tc.image_size}x{tc.image_size}, {tc.prediction}-prediction, " \
                 f"trained with {tc.weighting} weighting (model 0 of {config.seeds})\nK = {bins.K} bins, " \
                 f"{config.track.per_task} samples/bin"
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


def _with_compare_rows(claims: pd.DataFrame, path: Path) -> pd.DataFrame:
    """``claims`` and the C4-C6 rows that ``gradconflict compare`` wrote into ``path`` earlier (kept)."""
    if not path.is_file():
        return claims
    old = pd.read_csv(path)
    kept = old[old["claim"].astype(str).str.match(r"C[456]\b")]
    return pd.concat([claims, kept], ignore_index=True) if len(kept) else claims
