"""Validation of ``task_gram``'s data arguments: the schedule, x0, integer timesteps and task ids, and K (#15)."""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np
import torch

from ..bins import TimestepBins
from ..schedule import NoiseSchedule
from .loss import check_data

__all__ = ["as_schedule", "prepare"]


def as_schedule(schedule: Any) -> NoiseSchedule:
    """A NoiseSchedule, or one made from a diffusers-style scheduler (anything with ``alphas_cumprod``)."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if hasattr(schedule, "alphas_cumprod"):
        return NoiseSchedule.from_diffusers(schedule)
    raise ValueError(f"schedule must be a gradconflict.NoiseSchedule or a diffusers scheduler, got "
                     f"{type(schedule).__name__}; e.g. NoiseSchedule.linear() or NoiseSchedule.from_diffusers(scheduler)")


def prepare(x0: torch.Tensor, t: Any, task: Any, K: Optional[int], labels: Optional[list[str]]):
    """``(x0, t, task_ids, K, labels)``: x0 a floating (N, ...) tensor, t and task_ids long ``(N,)`` tensors (t on
    x0's device), K a positive int (from the bins, or ``max(task) + 1`` when not given); ValueError otherwise."""
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"x0 must be a torch.Tensor (N, ...), got {type(x0).__name__}; convert it with "
                         "torch.as_tensor(x0) and move it to the model's device")
    if x0.ndim < 2:
        raise ValueError(f"x0 must be a batched tensor (N, ...) with at least 2 dimensions, got shape {tuple(x0.shape)}")
    check_data(x0, "x0")
    t = _integer_ids(t, "t", "timesteps")
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},), one timestep per sample, got {tuple(t.shape)}")
    if isinstance(task, TimestepBins):
        bins = task
        task_ids = bins.task_of(t.cpu())
        if K is not None and K != bins.K:
            raise ValueError(f"K = {K!r} but the bins define K = {bins.K} tasks; leave K out when task is a TimestepBins")
        K = bins.K
        labels = labels or bins.labels
    else:
        task_ids = _integer_ids(task, "task", "task ids")
        if task_ids.shape != t.shape:
            raise ValueError(f"task must have shape ({x0.shape[0]},), one task id per sample, got {tuple(task_ids.shape)}")
        if K is None:
            K = max(int(task_ids.max()) + 1, 1) if task_ids.numel() else 1  # TaskIndex refuses negative ids, empty batches
    K = _task_count(K)
    if labels is not None and len(labels) != K:
        raise ValueError(f"got {len(labels)} labels for K = {K} tasks")
    return x0, t.to(x0.device), task_ids, K, labels


def _integer_ids(values: Any, name: str, what: str) -> torch.Tensor:
    """``values`` (a tensor, array or sequence of whole numbers) as a long tensor; a floating, complex or bool tensor
    is refused (``.long()`` would truncate 1.7 to 1), and so are non-integral or non-finite floats in an array or
    list (integral ones such as ``[0.0, 3.0]`` are accepted, as ``NoiseSchedule`` accepts them)."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            flat = values.detach().reshape(-1).cpu()
            odd = flat[flat != flat.round()] if values.is_floating_point() else flat
            shown = _shown((odd if odd.numel() else flat)[:3].tolist())
            raise ValueError(f"{name} has dtype {values.dtype} (values such as {shown}); {what} must be integers "
                             f"(.long() would truncate 1.7 to 1): pass {name}.long() if its values are whole numbers")
        return values.long()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D tensor of integer {what}, got {type(values).__name__}") from exc
    if arr.dtype.kind == "f":
        if not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
            bad = _shown(arr[~(np.isfinite(arr) & (arr == np.round(arr)))].reshape(-1)[:3].tolist())
            raise ValueError(f"{name} must hold integer {what}, got non-integer values such as {bad}; round them "
                             "or pass integers")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer {what}, got {arr.dtype} values; pass integers")
    return torch.as_tensor(arr.astype(np.int64))


def _shown(values: list) -> list:
    """A few offending values for an error message (floats to 6 significant digits: 0.7, not 0.699999988)."""
    return [float(f"{v:.6g}") if isinstance(v, float) else v for v in values]


def _task_count(K: Any) -> int:
    """``K`` as a positive int (an int, NumPy integer or integer 0-dim tensor; not a bool or a float)."""
    try:
        k = operator.index(K) if not isinstance(K, bool) else None
    except TypeError:
        k = None
    if k is None or k < 1:
        raise ValueError(f"K must be a positive integer number of tasks, got {K!r}")
    return k
