"""Seeded batches for per-task gradients: n samples per timestep bin, the same on every device."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..bins import TimestepBins
from ..adapters.conditioning import LABELS_ARG

__all__ = ["TaskBatch", "sample_task_batch"]


@dataclass
class TaskBatch:
    """``x0`` (N, ...), integer timesteps ``t`` (N,), task ids ``task`` (N,), ``noise`` (N, ...), per-sample
    ``model_kwargs`` (e.g. class labels ``y``)."""

    x0: torch.Tensor
    t: torch.Tensor
    task: torch.Tensor
    noise: torch.Tensor
    model_kwargs: dict = field(default_factory=dict)

    def shard(self, index: torch.Tensor) -> "TaskBatch":
        """The samples at ``index`` (e.g. ``distributed.shard(N)``: this rank's share)."""
        return TaskBatch(self.x0[index], self.t[index], self.task[index], self.noise[index],
                         {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in self.model_kwargs.items()})

    def to(self, device: Any, dtype: Optional[torch.dtype] = None) -> "TaskBatch":
        """Move to ``device``; with ``dtype``, cast x0, noise and floating conditioning (e.g. text embeddings) to it
        (e.g. the model's parameter dtype); integer and bool tensors (labels, masks) keep theirs."""
        def move(v: Any) -> Any:
            if not isinstance(v, torch.Tensor):
                return v
            return v.to(device, dtype) if dtype is not None and v.is_floating_point() else v.to(device)

        return TaskBatch(self.x0.to(device, dtype), self.t.to(device), self.task.to(device), self.noise.to(device, dtype),
                         {k: move(v) for k, v in self.model_kwargs.items()})


def sample_task_batch(
    images: torch.Tensor,
    bins: TimestepBins,
    per_task: int,
    seed: int,
    *,
    labels: Optional[torch.Tensor] = None,
    conditional: bool = False,
    conditioning: Optional[dict[str, torch.Tensor]] = None,
) -> TaskBatch:
    """Draw ``per_task`` samples for each bin: images uniformly from ``images`` (N, C, H, W), timesteps
    uniformly inside the bin, Gaussian noise; all from one CPU generator seeded with ``seed``.
    With ``conditional`` the labels are passed to the model as ``y``. ``conditioning`` (per-sample tensors
    ``{name: (N, ...)}``, e.g. ``ImageDataset.conditioning``): the rows of the drawn images go to the model as
    keyword arguments of those names (the draw itself does not depend on it)."""
    if per_task < 1:
        raise ValueError(f"per_task must be >= 1 sample per task, got {per_task}")
    if images.shape[0] == 0:
        raise ValueError("the dataset is empty")
    if not images.is_floating_point():  # .to(float32) would keep uint8 pixels in [0, 255]
        raise ValueError(f"images have dtype {images.dtype}; scale them to floats in [-1, 1] first, e.g. "
                         "images = images.float() / 127.5 - 1 for uint8 pixels (gradconflict.data does this)")
    g = torch.Generator().manual_seed(int(seed))
    t, task = bins.sample(per_task, g)
    pick = torch.randint(0, images.shape[0], (t.numel(),), generator=g)
    x0 = images[pick].to(torch.float32)
    noise = torch.randn(x0.shape, generator=g)
    kwargs: dict = {}
    if conditional:
        if labels is None or bool((labels[pick] < 0).any()):
            raise ValueError("the model is class-conditional but the dataset has no labels")
        kwargs[LABELS_ARG] = labels[pick].long()
    for key, value in (conditioning or {}).items():
        if value.shape[0] != images.shape[0]:
            raise ValueError(f"conditioning {key!r} has {value.shape[0]} rows but there are {images.shape[0]} images; "
                             "give one row per image")
        kwargs[key] = value[pick]
    return TaskBatch(x0, t, task, noise, kwargs)
