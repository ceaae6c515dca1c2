"""Track the Pareto problem over training: at every checkpoint, R fresh batches -> Grams -> solvers and strategies.

Results land in ``out_dir`` as tidy CSVs, rewritten atomically after each checkpoint, so an interrupted run
resumes where it stopped (checkpoints already in the CSVs are skipped; a different config is refused):

* ``track_objectives.csv``: step, resample, name, kind (solver | strategy), objective, ratio, excess, gap, ...
* ``track_weights.csv``: step, resample, name, kind, bin, label, weight
* ``track_grams.npz``: the Gram matrices ``grams`` (N, K, K) with ``steps``, ``resamples`` (N,) and the bins'
  ``labels``, ``t_low``, ``t_high`` (K,) as arrays (``gradconflict.gram_archive``; also under the older keys
  ``step{S}_r{R}``)
"""

from __future__ import annotations

import hashlib
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
from .._io import atomic_write, identity_changes, record_identity, write_csv, write_json
from ..bins import TimestepBins
from ..engine import sample_task_batch, task_gram
from ..gram_archive import read_gram_archive, write_gram_archive
from ..schedule import NoiseSchedule
from ..weighting import WeightingStrategy, as_strategy, check_unique_names
from .analyze import analyze_gram
from .config import TrackConfig

__all__ = ["TrackResult", "track_models", "track_training", "make_bins", "load_track", "track_identity", "file_source",
           "stale_tracking", "changed_sources"]

ModelAt = Union[nn.Module, Callable[[], nn.Module]]


@dataclass
class TrackResult:
    """Tidy tables of a tracking run; ``grams[(step, r)]`` holds each K x K Gram."""

    objectives: pd.DataFrame
    weights: pd.DataFrame
    grams: dict[tuple[int, int], np.ndarray]
    labels: list[str]


def make_bins(schedule: NoiseSchedule, config: TrackConfig) -> TimestepBins:
    """The tracking run's K bins: ``config.edges`` when given, else uniform in t or in log-SNR (``config.binning``)."""
    if config.edges is not None:
        return TimestepBins.from_edges(config.edges, schedule.T)
    if config.binning == "uniform":
        return TimestepBins.uniform(schedule.T, config.bins)
    return TimestepBins.log_snr_uniform(schedule, config.bins)


def _strategies(config: TrackConfig, extra: Sequence[Any]) -> list[WeightingStrategy]:
    """The config's named strategies and the extra ones (strategy objects or functions snr -> x0-unit weight);
    names must be unique (results are keyed by name: two "snr" or two "<lambda>" would be averaged into one)."""
    strategies = [as_strategy(s) for s in (*config.strategies, *extra)]
    check_unique_names([s.name for s in strategies])
    return strategies


_SNR_PROBE = np.concatenate([[0.0], np.logspace(-10, 10, 81), [np.inf]])  # where a strategy's identity is read


def _strategy_identity(strategy: Any) -> str:
    """A strategy's name and a hash of its x0-unit weights on a fixed SNR grid: a changed function under the same
    name is another strategy (a rerun would otherwise reuse the old one's results)."""
    strategy = as_strategy(strategy)
    weights = np.asarray(strategy.weight(_SNR_PROBE, "x0"), dtype=np.float64)
    return f"{strategy.name}@{hashlib.sha256(weights.tobytes()).hexdigest()[:12]}"


def load_track(out_dir: Union[str, Path]) -> Optional[TrackResult]:
    """The results already in ``out_dir`` (None when there are none)."""
    out = Path(out_dir)
    if not (out / "track_objectives.csv").is_file():
        return None
    objectives = pd.read_csv(out / "track_objectives.csv")
    done = set(objectives["step"].unique())  # the commit point (_save): a step is done once its objectives are saved
    grams: dict[tuple[int, int], np.ndarray] = {}
    if (out / "track_grams.npz").is_file():  # new archives and older ones that hold only the step{S}_r{R} keys
        grams = {key: G for key, G in read_gram_archive(out / "track_grams.npz").as_dict().items() if key[0] in done}
    weights = pd.read_csv(out / "track_weights.csv")
    weights = weights[weights["step"].isin(done)].reset_index(drop=True)
    labels = list(weights.drop_duplicates("bin").sort_values("bin")["label"])
    return TrackResult(objectives, weights, grams, labels)


def _save(out: Path, result: TrackResult, bins: Optional[TimestepBins] = None) -> None:
    """Weights and Grams first, the objectives last: a step counts as done (:func:`load_track`) only once all three
    hold it, so a run killed between the writes recomputes that step instead of losing part of it."""
    write_csv(result.weights, out / "track_weights.csv")
    write_gram_archive(out / "track_grams.npz", result.grams, bins, resamples=True)
    write_csv(result.objectives, out / "track_objectives.csv")


def _check_config(out: Path, identity: dict[str, Any], name: str = "track_config.json",
                  what: str = "tracking results of another config") -> None:
    """Record ``identity`` in ``out/name``, or refuse when the one recorded there differs (naming the keys)."""
    path = out / name
    if path.is_file() and "extra_strategies" in identity:  # older versions recorded extra strategies by name only
        recorded = json.loads(path.read_text())
        names = [s.split("@", 1)[0] for s in identity["extra_strategies"]]
        if recorded.get("extra_strategies") == names and names:
            write_json(path, {**recorded, "extra_strategies": identity["extra_strategies"]})  # now by their weights
    record_identity(path, identity, what, f"use another --out (or the options it was made with), or remove {out}")


def track_identity(config: TrackConfig, prediction: str, T: int, extra_strategies: Sequence[WeightingStrategy] = (),
                   inputs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a tracking folder's results depend on, besides the models at each step (see ``sources``)."""
    identity = {**config.to_dict(), "prediction": prediction, "T": T,
                "extra_strategies": [_strategy_identity(s) for s in extra_strategies]}
    return identity | {"inputs": dict(inputs)} if inputs else identity


def _read_sources(out: Path) -> dict[int, str]:
    path = out / "track_sources.json"
    return {int(k): v for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def _key(source: str) -> str:
    """What makes two sources the same model: a checkpoint's content hash (:func:`file_source`), else the string."""
    return source.split(" ", 1)[0] if source.startswith(_DIGEST) else source


def changed_sources(out: Union[str, Path], sources: dict[int, str]) -> list[int]:
    """The steps whose results in the tracking folder ``out`` came from another model than ``sources`` gives now
    (by content: :func:`file_source`); empty when nothing is recorded."""
    old = _read_sources(Path(out))
    return sorted(s for s in sources if s in old and _key(old[s]) != _key(sources[s]))


def _check_sources(out: Path, sources: dict[int, str], held: set[int]) -> None:
    """``track_sources.json`` maps each tracked step to where its model came from; a step whose results are in
    ``out`` (``held``) but came from another source is refused (its results would silently stand for the other
    model). Steps not tracked yet may come from anywhere."""
    old = _upgrade_legacy_sources(out, _read_sources(out))
    clash = sorted(s for s in sources if s in held and s in old and _key(old[s]) != _key(sources[s]))
    if clash:
        s = clash[0]
        raise ValueError(f"{out} holds step {s} tracked from {old[s]!r}, not {sources[s]!r}; use another --out, "
                         f"or remove {out}")
    steps_of: dict[str, set[int]] = {}
    for step, src in old.items():
        if step in held:
            steps_of.setdefault(_key(src), set()).add(step)
    given_at = {step for step in sources if step in held and _key(sources[step]) == _key(old.get(step, ""))}
    moved = sorted(s for s in sources if s not in held and _key(sources[s]) in steps_of
                   and not steps_of[_key(sources[s])] & given_at)  # (given at its recorded step too: deliberate)
    if moved:  # e.g. a rerun that forgot --steps: the same model would stand for two training steps
        s = moved[0]
        raise ValueError(f"{out} holds step {min(steps_of[_key(sources[s])])} tracked from {sources[s]!r}, now given "
                         f"as step {s}; pass the same --steps as before (one per checkpoint), or use another --out")


def _upgrade_legacy_sources(out: Path, old: dict[int, str]) -> dict[int, str]:
    """Folders of older versions recorded a checkpoint by path, size and mtime: every recorded file that is still
    that file is recorded by content now (so the folder resumes, a copy or a move is the same checkpoint from now
    on, and a rerun that forgot --steps is still caught for the steps already held)."""
    upgraded = dict(old)
    for step, src in old.items():
        path = src.rsplit(" (", 1)[0] if not src.startswith(_DIGEST) and src.endswith(")") else None
        if path is not None and _legacy(path) == src:
            upgraded[step] = file_source(path)
    if upgraded != old:
        write_json(out / "track_sources.json", {str(k): v for k, v in sorted(upgraded.items())})
    return upgraded


def _record_source(out: Path, step: int, source: str) -> None:
    """Note where the step just saved came from (after its results are written)."""
    recorded = _read_sources(out)
    if recorded.get(step) != source:
        recorded[step] = source
        write_json(out / "track_sources.json", {str(k): v for k, v in sorted(recorded.items())})


_DIGEST = "sha256:"


def file_source(path: Union[str, Path]) -> str:
    """A checkpoint file's identity for ``sources``: the SHA-256 of its bytes (the first 16 hex digits) and, for
    the messages, its absolute path. A copy, a move or a touched file is the same checkpoint; another file written
    under the same name is not. (About 1 s per GB.)"""
    p = Path(path).resolve()
    digest = hashlib.sha256()
    with open(p, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return f"{_DIGEST}{digest.hexdigest()[:16]} {p}"


def _legacy(path: Union[str, Path]) -> Optional[str]:
    """How versions before content hashing recorded a checkpoint (path, size, mtime); None for a missing file."""
    p = Path(path)
    if not p.is_file():
        return None
    st = p.stat()
    return f"{p} ({st.st_size} bytes, mtime {st.st_mtime_ns})"


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
    inputs: Optional[dict[str, Any]] = None,
    sources: Optional[dict[int, str]] = None,
    conditioning: Optional[dict[str, torch.Tensor]] = None,
) -> TrackResult:
    """Track a sequence of ``(step, model)`` (a model, or a zero-argument function that loads it, so nothing
    is loaded for steps already in ``out_dir``). The batch of resample r at step s is seeded with
    ``(config.seed, s, r)``, so reruns and devices agree.

    A rerun into the same ``out_dir`` skips the steps it holds, so it must be the same experiment: ``inputs``
    (e.g. model spec and dataset) is recorded with the config and must match; ``sources`` maps steps to where
    their models come from (e.g. :func:`file_source` of a checkpoint), and a step tracked before from another
    source is refused. ``conditioning``: per-sample tensors ``{name: (N, ...)}`` passed to the models by name with
    their images (``ImageDataset.conditioning``, e.g. text embeddings)."""
    items = list(models)
    steps_given = [int(s) for s, _ in items]
    if len(set(steps_given)) != len(steps_given):
        dup = sorted({s for s in steps_given if steps_given.count(s) > 1})
        raise ValueError(f"step(s) {dup} given more than once; give each checkpoint its own step")
    bins = make_bins(schedule, config)
    strategies = _strategies(config, extra_strategies)
    out = Path(out_dir) if out_dir is not None else None
    previous = None
    if out is not None and dist.is_main():
        _check_config(out, track_identity(config, prediction, schedule.T, extra_strategies, inputs))
        previous = load_track(out)  # rank 0's folder decides (other ranks may not see the same disk)
    held = set(previous.objectives["step"].unique()) if previous is not None else set()
    if out is not None and dist.is_main() and sources:
        _check_sources(out, sources, held)
    obj_rows = [previous.objectives] if previous is not None else []
    w_rows = [previous.weights] if previous is not None else []
    grams = dict(previous.grams) if previous is not None else {}
    if not steps_given:
        raise ValueError("nothing to track: give at least one (step, model)")
    done = dist.agreed(steps_given, held)  # the same on every rank
    for step, model_at in tqdm(items, desc="track", disable=not progress or not dist.is_main(), dynamic_ncols=True):
        if step in done:
            continue
        model = model_at() if not isinstance(model_at, nn.Module) else model_at
        model.to(device)
        new_o, new_w = [], []
        for r in range(config.resamples):
            seed = (config.seed * 1_000_003 + int(step)) * 101 + r
            batch = sample_task_batch(images, bins, config.per_task, seed, labels=labels, conditional=conditional,
                                      conditioning=conditioning)
            batch = batch.shard(dist.shard(batch.t.numel())).to(torch.device(device), _float_dtype(model))  # this rank's share
            res = task_gram(model, batch.x0, batch.t, bins, schedule=schedule, prediction=prediction,
                            loss_space=config.loss_space, noise=batch.noise, model_kwargs=batch.model_kwargs,
                            autocast_dtype=config.autocast_dtype)
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
            if sources and int(step) in sources:  # before the results: a saved step always has its source on record
                _record_source(out, int(step), sources[int(step)])
            _save(out, result, bins)
    if not obj_rows:
        raise ValueError("nothing to track: give at least one (step, model)")
    return TrackResult(pd.concat(obj_rows, ignore_index=True), pd.concat(w_rows, ignore_index=True), grams, bins.labels)


def _trained_step(path: Path) -> int:
    from ..train.checkpoint import weights_metadata

    return int(json.loads(weights_metadata(path).get("step", "-1")))


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
    if dist.is_main():  # the snapshots stand for this training config: a changed one must not reuse them
        _check_config(out, train_config.identity(), "train_config.json", "a training run of another config")
    run_dir = out / "run"
    data = load_dataset(train_config.data, image_size=train_config.image_size, limit=train_config.data_limit,
                        scale=train_config.scale)
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
            dist.wait_for_all()  # rank 0 may train for longer than the collective timeout
            return load_trained(snap, ema=False)[0]

        return load

    return track_models(((s, at(s)) for s in steps), data.images, schedule, train_config.prediction, config,
                        labels=data.labels, conditional=train_config.conditional,
                        extra_strategies=extra_strategies, out_dir=out / "track", device=train_config.device,
                        progress=progress)


def stale_tracking(out_dir: Union[str, Path], train_config: Any, config: TrackConfig,
                   extra_strategies: Sequence[WeightingStrategy] = (), every: Optional[int] = None) -> Optional[str]:
    """What of a ``track_training`` folder no longer matches the configs: ``"training"`` (the run, its snapshots
    and the tracking results), ``"tracking"`` (the tracking results only) or None (all current, or nothing there).

    Training is stale when its config differs, when the run is already past ``train_config.steps`` (its final
    model would not be the one asked for), or, with ``every``, when a checkpoint to track lies before the
    trained step and has no snapshot. Tracking is stale when its config differs or it holds steps that
    ``every`` no longer asks for."""
    out = Path(out_dir)
    if identity_changes(out / "train_config.json", train_config.identity()):
        return "training"
    weights = out / "run" / "model.safetensors"
    trained = _trained_step(weights) if weights.is_file() else 0
    wanted = list(range(every, train_config.steps + 1, every)) if every else []
    if trained > train_config.steps or any(
            s < trained and not (out / "snapshots" / f"step{s}.safetensors").is_file() for s in wanted):
        return "training"
    want = track_identity(config, train_config.prediction, train_config.T, extra_strategies)
    if identity_changes(out / "track" / "track_config.json", want):
        return "tracking"
    previous = load_track(out / "track") if every else None
    if previous is not None and set(previous.objectives["step"].unique()) - set(wanted):
        return "tracking"
    return None
