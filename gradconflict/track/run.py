"""Track the Pareto problem over training: at every checkpoint, R fresh batches -> Grams -> solvers and strategies.

Results land in ``out_dir`` as tidy CSVs, rewritten atomically after each checkpoint, so an interrupted run
resumes where it stopped (checkpoints already in the CSVs are skipped; a different config is refused):

* ``track_objectives.csv``: step, resample, name, kind (solver | strategy), objective, ratio, excess, gap, ...
* ``track_weights.csv``: step, resample, name, kind, bin, label, weight
* ``track_grams.npz``: the Gram matrices, key ``step{S}_r{R}``
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed as dist
from .._io import atomic_write, write_csv, write_json
from ..bins import TimestepBins
from ..engine import sample_task_batch, task_gram
from ..schedule import NoiseSchedule
from ..weighting import WeightingStrategy, by_name
from .analyze import analyze_gram
from .config import TrackConfig

__all__ = ["TrackResult", "track_models", "track_training", "make_bins", "load_track"]

ModelAt = Union[nn.Module, Callable[[], nn.Module]]


@dataclass
class TrackResult:
    """Tidy tables of a tracking run; ``grams[(step, r)]`` holds each K x K Gram."""

    objectives: pd.DataFrame
    weights: pd.DataFrame
    grams: dict[tuple[int, int], np.ndarray]
    labels: list[str]


def make_bins(schedule: NoiseSchedule, config: TrackConfig) -> TimestepBins:
    if config.binning == "uniform":
        return TimestepBins.uniform(schedule.T, config.bins)
    return TimestepBins.log_snr_uniform(schedule, config.bins)


def _strategies(config: TrackConfig, extra: Sequence[WeightingStrategy]) -> list[WeightingStrategy]:
    return [by_name(s) for s in config.strategies] + list(extra)


def load_track(out_dir: Union[str, Path]) -> Optional[TrackResult]:
    """The results already in ``out_dir`` (None when there are none)."""
    out = Path(out_dir)
    if not (out / "track_objectives.csv").is_file():
        return None
    grams: dict[tuple[int, int], np.ndarray] = {}
    if (out / "track_grams.npz").is_file():
        with np.load(out / "track_grams.npz") as z:
            for key in z.files:
                s, r = key[4:].split("_r")
                grams[(int(s), int(r))] = z[key]
    weights = pd.read_csv(out / "track_weights.csv")
    labels = list(weights.drop_duplicates("bin").sort_values("bin")["label"])
    return TrackResult(pd.read_csv(out / "track_objectives.csv"), weights, grams, labels)


def _save(out: Path, result: TrackResult) -> None:
    write_csv(result.objectives, out / "track_objectives.csv")
    write_csv(result.weights, out / "track_weights.csv")
    atomic_write(out / "track_grams.npz", lambda p: np.savez(p, **{f"step{s}_r{r}": g for (s, r), g in result.grams.items()}))


def _check_config(out: Path, identity: dict[str, Any]) -> None:
    path = out / "track_config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise ValueError(f"{out} holds tracking results of another config (differs in {diff}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(path, identity)


def _float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None and p.dtype in (torch.float64, torch.float32) else None


def track_models(
    models: Iterable[tuple[int, ModelAt]],
    images: torch.Tensor,
    schedule: NoiseSchedule,
    prediction: str,
    config: TrackConfig,
    *,
    labels: Optional[torch.Tensor] = None,
    conditional: bool = False,
    extra_strategies: Sequence[WeightingStrategy] = (),
    out_dir: Optional[Union[str, Path]] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
) -> TrackResult:
    """Track a sequence of ``(step, model)`` (a model, or a zero-argument function that loads it, so nothing
    is loaded for steps already in ``out_dir``). The batch of resample r at step s is seeded with
    ``(config.seed, s, r)``, so reruns and devices agree."""
    bins = make_bins(schedule, config)
    strategies = _strategies(config, extra_strategies)
    out = Path(out_dir) if out_dir is not None else None
    previous = None
    if out is not None and dist.is_main():
        _check_config(out, {**config.to_dict(), "prediction": prediction, "T": schedule.T,
                            "extra_strategies": [s.name for s in extra_strategies]})
    if out is not None:
        previous = load_track(out)
    obj_rows = [previous.objectives] if previous is not None else []
    w_rows = [previous.weights] if previous is not None else []
    grams = dict(previous.grams) if previous is not None else {}
    done = set(previous.objectives["step"].unique()) if previous is not None else set()
    items = list(models)
    for step, model_at in tqdm(items, desc="track", disable=not progress, dynamic_ncols=True):
        if step in done:
            continue
        model = model_at() if not isinstance(model_at, nn.Module) else model_at
        model.to(device)
        new_o, new_w = [], []
        for r in range(config.resamples):
            seed = (config.seed * 1_000_003 + int(step)) * 101 + r
            batch = sample_task_batch(images, bins, config.per_task, seed, labels=labels, conditional=conditional)
            batch = batch.shard(dist.shard(batch.t.numel())).to(torch.device(device), _float_dtype(model))  # this rank's share
            res = task_gram(model, batch.x0, batch.t, bins, schedule=schedule, prediction=prediction,
                            loss_space=config.loss_space, noise=batch.noise, model_kwargs=batch.model_kwargs)
            G = res.gram.numpy()
            grams[(int(step), r)] = G
            w, o = analyze_gram(G, bins, schedule, config, strategies)
            meta = dict(step=int(step), resample=r)
            new_w += [{**meta, **row} for row in w]
            new_o += [{**meta, **row, "mean_loss": float(res.losses.mean())} for row in o]
        obj_rows.append(pd.DataFrame(new_o))
        w_rows.append(pd.DataFrame(new_w))
        result = TrackResult(pd.concat(obj_rows, ignore_index=True), pd.concat(w_rows, ignore_index=True), grams, bins.labels)
        if out is not None and dist.is_main():
            _save(out, result)
    if not obj_rows:
        raise ValueError("nothing to track: give at least one (step, model)")
    return TrackResult(pd.concat(obj_rows, ignore_index=True), pd.concat(w_rows, ignore_index=True), grams, bins.labels)


def _trained_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(json.loads((handle.metadata() or {}).get("step", "-1")))


def track_training(
    train_config: Any,
    config: TrackConfig,
    out_dir: Union[str, Path],
    *,
    every: int,
    extra_strategies: Sequence[WeightingStrategy] = (),
    progress: bool = True,
) -> TrackResult:
    """Train ``train_config`` (a ``gradconflict.train.TrainConfig``) in ``out_dir/run`` and track it every
    ``every`` steps. Training resumes bit-exactly between tracked steps, so the trajectory is the one an
    uninterrupted run takes; tracking uses the raw (not EMA) weights, i.e. the model being trained."""
    from dataclasses import replace

    from ..data import load_dataset
    from ..train import load_trained, make_schedule, train

    if every < 1:
        raise ValueError(f"every must be >= 1 step, got {every}")
    out = Path(out_dir)
    run_dir = out / "run"
    data = load_dataset(train_config.data, image_size=train_config.image_size, limit=train_config.data_limit)
    schedule = make_schedule(train_config.schedule, train_config.T)
    steps = list(range(every, train_config.steps + 1, every))

    snapshots = out / "snapshots"

    def at(step: int) -> Callable[[], nn.Module]:
        def load() -> nn.Module:
            snap = snapshots / f"step{step}.safetensors"
            if dist.is_main() and not snap.is_file():  # under torchrun rank 0 trains, the others wait for it
                train(replace(train_config, steps=step), run_dir, progress=progress)
                trained_to = _trained_step(run_dir / "model.safetensors")
                if trained_to != step:
                    raise ValueError(f"{run_dir} is already trained to step {trained_to} > {step} and has no snapshot "
                                     f"of step {step}; remove {out} to start the tracking run again")
                snapshots.mkdir(parents=True, exist_ok=True)
                atomic_write(snap, lambda p: shutil.copyfile(run_dir / "model.safetensors", p))
            dist.barrier()
            return load_trained(snap, ema=False)[0]

        return load

    return track_models(((s, at(s)) for s in steps), data.images, schedule, train_config.prediction, config,
                        labels=data.labels, conditional=train_config.conditional,
                        extra_strategies=extra_strategies, out_dir=out / "track", device=train_config.device,
                        progress=progress)
