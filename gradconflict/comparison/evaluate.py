"""One evaluation of one run at one step, on held-out data: per-bin losses, FD-MNIST, the Pareto score.

Everything is seeded by the evaluation step alone (not by the run), so two weightings are evaluated on the same
held-out images, timesteps and noise, and a resumed comparison equals an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..bins import TimestepBins
from ..engine import sample_task_batch, task_gram
from ..pareto import score
from ..schedule import NoiseSchedule
from ..track.analyze import absolute_lam
from ..train.sampler import sample
from ..weighting import by_name
from .config import CompareConfig

__all__ = ["HeldOut", "evaluate", "fixed_strategy", "EVAL_COLUMNS"]

EVAL_COLUMNS = ("step", "loss_x0", "loss_model", "fd_mnist", "fd_stderr", "pareto_ratio", "diag_ratio",
                "reg_share", "diag_min", "diag_max")


@dataclass
class HeldOut:
    """The held-out images shared by every run, and the FD-MNIST feature extractor (None: FD not measured)."""

    images: torch.Tensor
    extractor: Any = None


def fixed_strategy(weighting: str) -> Optional[Any]:
    """The ``weighting.by_name`` strategy of a fixed spec, or None for an adaptive one (no fixed SNR curve)."""
    try:
        return by_name(weighting)
    except ValueError:
        return None


def _pareto(model: nn.Module, images: torch.Tensor, schedule: NoiseSchedule, prediction: str, bins: TimestepBins,
            config: CompareConfig, weighting: str, seed: int) -> tuple[dict[str, float], np.ndarray]:
    """The run's own weighting scored against the exact optimum on one held-out Gram (x0 units), beside the
    diagonal-only null (G replaced by diag(G): the ratio without any conflict between tasks)."""
    batch = sample_task_batch(images, bins, config.gram_per_task, seed)
    res = task_gram(model, batch.x0, batch.t, batch.task, schedule=schedule, prediction=prediction, noise=batch.noise,
                    K=bins.K, loss_space="x0", check="once")
    G = res.gram.numpy() if isinstance(res.gram, torch.Tensor) else np.asarray(res.gram)
    lam = absolute_lam(G, config.lam)
    diag = np.diag(np.diag(G))
    out = {"pareto_ratio": float("nan"), "diag_ratio": float("nan"), "diag_min": float(np.diag(G).min()),
           "diag_max": float(np.diag(G).max())}
    strategy = fixed_strategy(weighting)
    if strategy is None:
        full = score(G, lam, ["constant"], bins=bins, schedule=schedule)
    else:
        full = score(G, lam, {weighting: strategy}, bins=bins, schedule=schedule)
        null = score(diag, lam, {weighting: strategy}, bins=bins, schedule=schedule)
        out["pareto_ratio"] = float(full["ratio"].iloc[0])
        out["diag_ratio"] = float(null["ratio"].iloc[0])
    optimum = full.iloc[-1]
    w = np.asarray(optimum["weights"])
    out["reg_share"] = float(lam * (w @ w) / optimum["objective"]) if optimum["objective"] > 0 else float("nan")
    return out, w


@torch.no_grad()
def _samples(model: nn.Module, schedule: NoiseSchedule, prediction: str, config: CompareConfig, seed: int) -> torch.Tensor:
    chunks, done, part = [], 0, 0
    while done < config.fd_samples:
        n = min(250, config.fd_samples - done)
        chunks.append(sample(model, schedule, prediction, n, steps=config.sample_steps, seed=seed * 1000 + part))
        done += n
        part += 1
    return torch.cat(chunks)


def evaluate(model: nn.Module, schedule: NoiseSchedule, prediction: str, held_out: HeldOut, config: CompareConfig,
             weighting: str, step: int) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame]:
    """``(row, per_bin, optimum)``: the evaluation of ``model`` (eval mode) after ``step`` steps.

    ``row``: total held-out losses (mean over bins, x0 units and the model's units), FD-MNIST and its standard
    error, the run's Pareto ratio and its diagonal-only null, the regularizer's share of the optimum and the range
    of diag(G). ``per_bin``: ``metrics.held_out_losses``' table with a ``step`` column. ``optimum``: the exact
    Pareto weights per bin of the held-out Gram (columns step, name = "auto", bin, label, weight; x0 units), what
    ``pareto_fit`` is fitted to.
    """
    from ..metrics import fd_mnist, held_out_losses

    model.eval()
    bins = TimestepBins.uniform(schedule.T, config.bins)
    generator = torch.Generator().manual_seed(10_000 + step)
    per_bin = held_out_losses(model, held_out.images, schedule=schedule, prediction=prediction, bins=bins,
                              per_bin=config.eval_per_bin, generator=generator)
    per_bin.insert(0, "step", step)
    row: dict[str, float] = {"step": step, "loss_x0": float(per_bin["loss_x0"].mean()),
                             "loss_model": float(per_bin["loss_model"].mean())}
    if held_out.extractor is not None:
        images = _samples(model, schedule, prediction, config, seed=step)
        fd = fd_mnist(images, held_out.images, extractor=held_out.extractor, draws=config.fd_draws,
                      generator=torch.Generator().manual_seed(20_000 + step))
        row.update(fd_mnist=fd.value, fd_stderr=fd.stderr)
    else:
        row.update(fd_mnist=float("nan"), fd_stderr=float("nan"))
    scores, weights = _pareto(model, held_out.images, schedule, prediction, bins, config, weighting, seed=30_000 + step)
    row.update(scores)
    optimum = pd.DataFrame({"step": step, "name": "auto", "bin": np.arange(bins.K), "label": bins.labels, "weight": weights})
    return row, per_bin, optimum
