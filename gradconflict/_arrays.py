"""Small helpers that let the public API take a tensor, an array or a number and return the same kind."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch


def as_float64_numpy(x: Any) -> np.ndarray:
    """Convert a tensor, array, sequence or number into a float64 NumPy array."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def as_index_numpy(t: Any, T: int, *, name: str = "t") -> np.ndarray:
    """Convert integer timesteps into an int64 array and check that they lie in ``[0, T)``."""
    if isinstance(t, torch.Tensor):
        if t.is_floating_point():
            raise ValueError(f"{name} must hold integer timesteps, got a {t.dtype} tensor; use t.long()")
        arr = t.detach().cpu().numpy()
    else:
        arr = np.asarray(t)
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError(f"{name} must hold integer timesteps 0..{T - 1}, got non-integer values")
        elif arr.dtype.kind not in "iu":
            raise ValueError(f"{name} must hold integer timesteps, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= T):
        raise ValueError(
            f"{name} out of range: timesteps must lie in [0, {T - 1}], got min {arr.min()} and max {arr.max()}"
        )
    return arr


def like_input(values: np.ndarray, reference: Any) -> Any:
    """Return ``values`` as the same kind as ``reference``: tensor (float64, same device), array or float."""
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(np.array(values, copy=True)).reshape(np.shape(values)).to(reference.device)
    if np.ndim(reference) == 0 and not isinstance(reference, np.ndarray):
        return float(values)
    return values


def elementwise(fn: Callable[[np.ndarray], np.ndarray], x: Any) -> Any:
    """Apply a float64 NumPy function to ``x`` and return the result as the kind of ``x``."""
    return like_input(fn(as_float64_numpy(x)), x)
