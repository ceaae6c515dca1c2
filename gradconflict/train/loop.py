"""Diffusion training loop with Min-SNR-style loss weighting, per-bin loss logging and bit-exact resume.

Loss of one sample (x0, t ~ U{0..T-1}, eps ~ N(0, I)), with ``x_t = alpha_t x0 + sigma_t eps``:

    err_i  = mean over pixels of (f(x_t, t) - target)^2        (target = eps, x0 or v; the model's own space)
    loss_i = w(SNR_t) * err_i                                   (w = strategy.weight(snr, target=prediction))
    loss   = mean_i loss_i

A user model spec (``file.py:function``, ``diffusers:PATH``) is called ``model(x_t, t[, y=labels],
**conditioning)``: the data's per-sample conditioning (e.g. ``encoder_hidden_states`` (N, L, D)), the rows of
exactly the batch's images, by name (``train.conditioning``; ``null_conditioning``: the same embedding for all),
in the loss, in an online weighting's Gram batch and in every step; built-in models take class labels only.

``config.weighting`` is any ``gradconflict.adaptive.by_name`` spec: for a fixed one the loss is exactly the
above; ``strategy.step(model, x0, step=...)`` runs before each step's forward (online Pareto / UGD weights,
which leave the model's grads, mode and the global RNG as found) and ``loss = strategy.loss(err, t, ...)``
(``learned_uncertainty``: ``mean(err / exp(u) + u)``, its parameters in a second AdamW group without weight
decay). The strategy's state is checkpointed (``weighting``), so resume stays bit-exact.

The per-bin log (``losses.csv``) holds the *unweighted* loss in x0 units, ``err_i / c(SNR_t)`` with
``c = 1`` (x0), ``SNR`` (eps), ``SNR + 1`` (v), averaged over the samples of each timestep bin in each
logging window. All randomness (data order, timesteps, noise) comes from one CPU ``torch.Generator``
whose state is checkpointed, so on the CPU a resumed run is bit-identical to an uninterrupted one.

Outputs in ``out_dir``: ``config.json`` (the config and, under ``"used"``, the schedule, prediction, data and
conditioning names the run used, also printed on stderr), ``checkpoint.pt``, ``model.safetensors``, ``log.csv`` (one row per
step: step, loss, loss_x0, lr, grad_norm, seconds), ``losses.csv`` (tidy: step, bin, label, t_low,
t_high, loss, count; ``bin = -1``/``label = "total"`` is all timesteps together) and, with ``keep_checkpoints``,
``checkpoints/step{N}.safetensors`` for every ``checkpoint_every`` step N (written after ``model.safetensors``).

Crash safety: ``checkpoint.pt`` is the commit point of a save and also holds the log history, so a run
interrupted anywhere (even between the files of one save) resumes with complete, duplicate-free logs.
A save writes ``checkpoint.pt``, then ``log.csv``, ``losses.csv`` and last ``model.safetensors``, so a
``model.safetensors`` whose step matches the checkpoint means the logs of that step were written as well.
A kept ``checkpoints/step{N}.safetensors`` missing for the checkpoint's step (interrupted save) is written on resume.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..bins import TimestepBins
from ..adapters.conditioning import LABELS_ARG
from ..data import load_dataset
from ..models import build_model, model_spec
from ..schedule import NoiseSchedule
from ..engine.loss import per_sample_losses
from ..targets import loss_factor
from ..weighting import WeightingStrategy
from ..adaptive import AdaptiveWeighting, by_name as weighting_by_name
from .._io import fingerprint, write_csv, write_json
from .checkpoint import load_checkpoint, make_schedule, save_checkpoint, save_weights, weights_metadata
from .config import USED_KEY, TrainConfig, is_builtin
from .user_model import build_user_model, run_model_spec
from .ema import EMA
from .conditioning import batch_kwargs, conditioning_on, fingerprint_tensors, print_used, run_conditioning, used_record

__all__ = ["diffusion_loss", "prediction_error", "train", "EpochSampler", "KEPT_DIR", "kept_weights_path"]

KEPT_DIR = "checkpoints"  # keep_checkpoints: the weights of every checkpoint_every step, checkpoints/step{N}.safetensors


def kept_weights_path(out: str | Path, step: int) -> Path:
    """``out/checkpoints/step{step}.safetensors``: the kept weights of one step of a run (``keep_checkpoints``)."""
    return Path(out) / KEPT_DIR / f"step{int(step)}.safetensors"


def prediction_error(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction: str,
                     noise: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                     model_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """Per-sample mean squared error ``(n,)`` of the model output against its target, in the model's own
    prediction space: ``engine.per_sample_losses`` with ``loss_space = prediction``; the model is called
    ``model(x_t, t, y=y, **model_kwargs)`` (``model_kwargs``: per-sample conditioning by name, rows of x0's)."""
    kwargs = {**({} if y is None else {LABELS_ARG: y}), **(model_kwargs or {})}
    return per_sample_losses(model, x0, t, noise, schedule, prediction=prediction, loss_space=prediction,
                             model_kwargs=kwargs)


def diffusion_loss(model: nn.Module, x0: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule, prediction: str,
                   strategy: WeightingStrategy, noise: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                   model_kwargs: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, per_sample)``: per_sample_i = ``strategy.weight(SNR_t_i, target=prediction) * err_i`` with
    ``err_i`` from ``prediction_error``; loss = mean of per_sample."""
    err = prediction_error(model, x0, t, schedule, prediction, noise, y, model_kwargs=model_kwargs)
    weight = strategy.weight(schedule.snr(t), target=prediction).to(device=err.device, dtype=err.dtype)
    per_sample = weight * err
    return per_sample.mean(), per_sample


class EpochSampler:
    """Batches of indices drawn without replacement, epoch after epoch (a fresh ``randperm`` per epoch from
    the given generator); a batch may span two epochs. State: ``perm`` and ``pos``."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self, batch: int) -> torch.Tensor:
        parts, need = [], batch
        while need > 0:
            if self.pos >= self.perm.numel():
                self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
            take = self.perm[self.pos : self.pos + need]
            parts.append(take)
            self.pos += take.numel()
            need -= take.numel()
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm, self.pos = state["perm"].detach().cpu().clone().long(), int(state["pos"])


def _lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then constant."""
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def _check_run_dir(out: Path, config: TrainConfig, state: Optional[dict[str, Any]]) -> None:
    """Refuse a directory that holds a run with a different config, a run already past ``config.steps``, or
    the outputs of a run without the ``checkpoint.pt`` to resume it from (``state``: that checkpoint)."""
    previous: Optional[dict[str, Any]] = None
    if (out / "config.json").is_file():
        previous = json.loads((out / "config.json").read_text())
    elif state is not None:
        previous = state["config"]
    if previous is not None:
        mine = config.identity()
        theirs = TrainConfig.from_dict(previous).identity()
        diff = {k: (theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)}
        if diff:
            text = ", ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(
                f"{out} holds a run with a different config ({text}); use another output directory or the same "
                "settings (only steps, log_every, checkpoint_every, keep_checkpoints, device and threads may change to "
                "resume)"
            )
    if state is None:
        leftovers = [name for name in _RUN_FILES if (out / name).is_file()]
        if leftovers:
            raise ValueError(
                f"{out} holds {', '.join(leftovers)} of a finished or partial run but no checkpoint.pt to resume it "
                f"from; use another output directory, or delete {out} to train from scratch"
            )
    elif int(state["step"]) > config.steps:
        done = int(state["step"])
        raise ValueError(
            f"{out} is already trained to step {done} (checkpoint.pt), past steps={config.steps}; use another "
            f"output directory for a shorter run, or steps >= {done} to keep this one (a larger value resumes it)"
        )


# files that show a directory holds (part of) a run; config.json alone is written before the first step
_RUN_FILES: tuple[str, ...] = ("model.safetensors", "log.csv", "losses.csv")


def _read_log(path: Path, upto: int) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    frame = pd.read_csv(path)
    return frame[frame["step"] <= upto].reset_index(drop=True) if "step" in frame else pd.DataFrame()


def _frame_to_state(frame: pd.DataFrame) -> dict[str, Any]:
    """A log frame as checkpoint content loadable with ``weights_only=True``: numeric columns as tensors
    (dtype kept, so the CSV written from it is byte-identical), other columns as lists of strings."""
    return {
        str(c): torch.from_numpy(frame[c].to_numpy().copy()) if pd.api.types.is_numeric_dtype(frame[c])
        else [str(v) for v in frame[c]]
        for c in frame.columns
    }


def _frame_from_state(state: dict[str, Any]) -> pd.DataFrame:
    """Inverse of ``_frame_to_state``."""
    return pd.DataFrame({c: v.numpy() if isinstance(v, torch.Tensor) else list(v) for c, v in state.items()})


def _weights_step(path: Path) -> Optional[int]:
    """The step recorded in ``model.safetensors``' metadata, or None if the file is missing or has none."""
    if not path.is_file():
        return None
    try:
        return int(json.loads(weights_metadata(path)["step"]))
    except Exception:  # noqa: BLE001 - unreadable or foreign file: treat as stale, it is rewritten
        return None


def _build(config: TrainConfig, device: torch.device) -> tuple[Any, nn.Module]:
    dataset = load_dataset(config.data, image_size=config.image_size, limit=config.data_limit, scale=config.scale)
    if config.conditional and dataset.num_classes == 0:
        raise ValueError(f"conditional=True but dataset {dataset.name!r} has no labels")
    if not is_builtin(config.model):
        return dataset, build_user_model(config, device)
    run_conditioning(config, None, dataset)  # a built-in refuses conditioning arrays (class labels only)
    overrides = {
        **config.model_overrides,
        "image_size": config.image_size,
        "in_channels": dataset.channels,
        "prediction": config.prediction,
        "num_classes": dataset.num_classes if config.conditional else 0,
    }
    torch.manual_seed(config.seed)
    model = build_model(config.model, **overrides).to(device)
    return dataset, model


def _strategy(config: TrainConfig, bins: TimestepBins, schedule: NoiseSchedule, device: torch.device) -> AdaptiveWeighting:
    """The run's weighting (``adaptive.by_name``): online ones draw from their own generator seeded by the run's
    seed, compute their Gram with the run's prediction type and, under bf16, the same autocast."""
    use_bf16 = config.bf16 and device.type == "cuda"
    options = {"prediction": config.prediction, "autocast_dtype": torch.bfloat16 if use_bf16 else None}
    name = config.weighting.strip().lower().replace("-", "_")
    online = name.startswith(("pareto_online", "ugd_online"))
    return weighting_by_name(config.weighting, bins=bins, schedule=schedule, seed=config.seed,
                             **(options if online else {})).to(device)


def _optimizer(config: TrainConfig, model: nn.Module, strategy: AdaptiveWeighting) -> torch.optim.Optimizer:
    """AdamW over the model; a learned weighting's parameters form a second group without weight decay."""
    kw = dict(lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    extra = strategy.parameters()
    if not extra:
        return torch.optim.AdamW(model.parameters(), **kw)
    return torch.optim.AdamW([{"params": list(model.parameters())}, {"params": extra, "weight_decay": 0.0}], **kw)


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available; use --device cpu")
    return device


def train(config: TrainConfig, out_dir: str | Path, *, progress: bool = True) -> pd.DataFrame:
    """Train (or resume) a run in ``out_dir`` up to ``config.steps`` optimiser steps; returns the per-step log.

    A directory holding a checkpoint of the same run (same config except steps / log / checkpoint cadence /
    device / cpu_threads) is resumed from it. ``ValueError``, with the directory left untouched (not even
    created), for a different run, a run whose checkpoint is already past ``config.steps``, or run outputs
    (model.safetensors, log.csv, losses.csv) without the ``checkpoint.pt`` to resume them from. One line on
    stderr says the schedule, prediction, data and conditioning used (with ``progress``, or for a user model).
    """
    threads = torch.get_num_threads()
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    try:
        return _train(config, out_dir, progress)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, out_dir: str | Path, progress: bool) -> pd.DataFrame:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output directory {out} is a file; give a directory path (new or holding this run)")
    device = _device(config.device)
    state = load_checkpoint(out / "checkpoint.pt", map_location=device) if (out / "checkpoint.pt").is_file() else None
    _check_run_dir(out, config, state)  # everything is checked before the directory is created or written to
    dataset, model = _build(config, device)
    conditioning = run_conditioning(config, model, dataset)  # {name: (N, ...)} passed by name, rows with images
    data_id = fingerprint([dataset.images, dataset.labels, *fingerprint_tensors(conditioning)])
    if state is not None and state.get("data", data_id) != data_id:  # older checkpoints did not record it
        raise ValueError(f"{out} holds a run trained on other data than {config.data!r} holds now (content "
                         f"fingerprint {state['data']} on disk vs {data_id}); use another output directory, or the "
                         "data the run started with")
    schedule = make_schedule(config.schedule, config.T)
    bins = TimestepBins.uniform(config.T, config.bins)
    strategy = _strategy(config, bins, schedule, device)
    optimizer = _optimizer(config, model, strategy)
    ema = EMA(model, config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    sampler = EpochSampler(len(dataset), generator)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["rng"]["generator"].cpu())
        torch.set_rng_state(state["rng"]["torch_cpu"].cpu())
        sampler.load_state_dict(state["data_order"])
        strategy.load_state_dict(state.get("weighting", {}))
        step = int(state["step"])
    if state is not None and "history" in state:  # the logs as of the checkpoint, whatever the CSVs hold
        step_log = _frame_from_state(state["history"]["log"])
        bin_log = _frame_from_state(state["history"]["losses"])
    else:  # a checkpoint written before the history was kept in it
        step_log = _read_log(out / "log.csv", step)
        bin_log = _read_log(out / "losses.csv", step)
    del state
    out.mkdir(parents=True, exist_ok=True)
    used = used_record(config, dataset, conditioning)
    if progress or not is_builtin(config.model):  # a user model's schedule / prediction / conditioning: always said
        print_used(used)
    write_json(out / "config.json", {**config.to_dict(), USED_KEY: used})
    meta = {"config": config.to_dict(), "model_spec": run_model_spec(config, model), "dataset": dataset.name}

    images, labels = dataset.images.to(device), dataset.labels.to(device)
    conditioning = conditioning_on(conditioning, device, images.dtype)
    use_bf16 = config.bf16 and device.type == "cuda"
    factor = torch.as_tensor(np.asarray(loss_factor(schedule.snr(np.arange(config.T)), config.prediction)), device=device)
    task_of = torch.as_tensor(np.asarray(bins.task_of(np.arange(config.T))), device=device)
    sums = torch.zeros(bins.K, dtype=torch.float64, device=device)
    counts = torch.zeros(bins.K, dtype=torch.float64, device=device)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float, torch.Tensor, float]] = []
    rows: list[pd.DataFrame] = [step_log] if len(step_log) else []
    bin_rows: list[pd.DataFrame] = [bin_log] if len(bin_log) else []
    elapsed0 = float(step_log["seconds"].iloc[-1]) if len(step_log) else 0.0
    start = time.perf_counter()

    def flush(at: int) -> None:
        if pending:
            rows.append(pd.DataFrame(
                [(s, float(l), float(lx), lr, float(g), sec) for s, l, lx, lr, g, sec in pending],
                columns=["step", "loss", "loss_x0", "lr", "grad_norm", "seconds"],
            ))
            pending.clear()
        if counts.sum() > 0:
            c = counts.cpu().numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = sums.cpu().numpy() / c
            total = float(sums.sum().cpu()) / float(c.sum())
            bin_rows.append(pd.DataFrame({
                "step": at, "bin": list(range(bins.K)) + [-1], "label": bins.labels + ["total"],
                "t_low": list(bins.lows) + [0], "t_high": list(bins.highs - 1) + [config.T - 1],
                "loss": list(mean) + [total], "count": list(c.astype(np.int64)) + [int(c.sum())],
            }))
            sums.zero_()
            counts.zero_()

    def save(at: int, checkpoint: bool = True) -> pd.DataFrame:
        """Write the checkpoint of step ``at`` (the commit point, with the log history), then the logs and
        last the weights (see the module docstring); ``checkpoint=False`` rewrites only the latter."""
        flush(at)
        frame = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["step", "loss", "loss_x0", "lr", "grad_norm", "seconds"])
        bin_frame = pd.concat(bin_rows, ignore_index=True) if bin_rows else None
        if checkpoint:
            save_checkpoint(out / "checkpoint.pt", {
                "step": at, "config": config.to_dict(), "model_spec": run_model_spec(config, model),
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()},
                "data_order": sampler.state_dict(), "data": data_id, "weighting": strategy.state_dict(),
                "history": {"log": _frame_to_state(frame), "losses": _frame_to_state(bin_frame if bin_frame is not None else pd.DataFrame())},
            })
        write_csv(frame, out / "log.csv")
        if bin_frame is not None:
            write_csv(bin_frame, out / "losses.csv")
        save_weights(out / "model.safetensors", model, ema.shadow, {**meta, "step": at})
        keep(at)
        return frame

    def keep(at: int) -> None:
        """Write ``checkpoints/step{at}.safetensors`` (keep_checkpoints) for a ``checkpoint_every`` step ``at``."""
        if config.keep_checkpoints and at > 0 and at % config.checkpoint_every == 0:
            (out / KEPT_DIR).mkdir(exist_ok=True)
            save_weights(kept_weights_path(out, at), model, ema.shadow, {**meta, "step": at})

    if step > 0 and not kept_weights_path(out, step).is_file():  # a save interrupted before its kept copy
        keep(step)
    if step >= config.steps:  # == (a larger step was refused): finished; finish a save interrupted after the checkpoint
        if _weights_step(out / "model.safetensors") != step:
            return save(step, checkpoint=False)
        return step_log
    model.train()
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc=f"train {config.model.rpartition('/')[2]}", dynamic_ncols=True)
    try:
        for step in range(step, config.steps):
            idx = sampler.next(config.batch_size)
            t = torch.randint(0, config.T, (config.batch_size,), generator=generator)
            noise = torch.randn((config.batch_size, *images.shape[1:]), generator=generator)
            x0, t, noise = images[idx.to(device)], t.to(device), noise.to(device)
            y = labels[idx.to(device)] if config.conditional else None
            kwargs = batch_kwargs(conditioning, idx.to(device), y)  # y and the conditioning rows of these images
            strategy.step(model, x0, step=step, model_kwargs=kwargs or None)  # online weights
            lr = _lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext():
                err = prediction_error(model, x0, t, schedule, config.prediction, noise, model_kwargs=kwargs)
            loss = strategy.loss(err, t, schedule=schedule, prediction=config.prediction)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = config.grad_clip if config.grad_clip else float("inf")  # 0 / None: no clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            ema.update(model)
            with torch.no_grad():
                x0_err = err.detach().double() / factor[t]
                sums.index_add_(0, task_of[t], x0_err)
                counts.index_add_(0, task_of[t], torch.ones_like(x0_err))
            done = step + 1
            pending.append((done, loss.detach(), x0_err.mean(), lr, grad_norm.detach(), elapsed0 + time.perf_counter() - start))
            if done % config.log_every == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                flush(done)
            if done % config.checkpoint_every == 0 and done < config.steps:
                save(done)
            bar.update(1)
    finally:
        bar.close()
    return save(config.steps)
