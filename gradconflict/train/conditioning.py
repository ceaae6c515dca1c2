"""Per-sample conditioning in a training run: which tensors go to the model by name, on which device, and what
the run records about them (``config.json``'s ``"used"``).

A data file's conditioning arrays (``ImageDataset.conditioning``: ``encoder_hidden_states`` (N, L, D),
``encoder_attention_mask`` (N, L), ``added_cond_kwargs.NAME``, ...; class labels are ``y``, not conditioning)
are checked against the names the model takes exactly as ``gradconflict gram`` does
(``adapters.conditioning.model_conditioning``; ``null_conditioning`` gives every sample the same
``encoder_hidden_states``), and each training batch passes the rows of its images:
``model(x_t, t[, y=labels[idx]], **{name: conditioning[name][idx]})``. Built-in models take class labels only.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .._records import dataset_record, schedule_words
from ..adapters.conditioning import LABELS_ARG, model_conditioning, select_rows
from .config import TrainConfig, is_builtin

__all__ = ["run_conditioning", "conditioning_on", "fingerprint_tensors", "used_record", "used_line", "print_used",
           "batch_kwargs"]


def run_conditioning(config: TrainConfig, model: nn.Module, dataset: Any) -> dict[str, torch.Tensor]:
    """The per-sample tensors ``{name: (N, ...)}`` the run passes to ``model`` (CPU; empty for none).

    A built-in model refuses any conditioning array of the data (it takes class labels only, ``conditional``);
    a user model gets ``model_conditioning(model, dataset, config.null_conditioning, config.null_length)``,
    which refuses names its ``forward`` (or ``conditioning_keys``) does not take; a model with cross-attention
    (``model.config.cross_attention_dim``) needs ``encoder_hidden_states`` from the data or ``null_conditioning``."""
    if is_builtin(config.model):
        if dataset.conditioning:  # never dropped silently
            raise ValueError(
                f"dataset {dataset.name!r} carries the per-sample conditioning {sorted(dataset.conditioning)}, which "
                f"the built-in {config.model} does not take (class labels only, --conditional); to train a "
                "text-conditioned model pass a user model spec (--model path/file.py:function or diffusers:PATH) "
                "whose forward takes those names, or remove those arrays from the data file")
        return {}
    conditioning = model_conditioning(model, dataset, config.null_conditioning, config.null_length)
    dim = getattr(getattr(model, "config", None), "cross_attention_dim", None)
    if dim and "encoder_hidden_states" not in conditioning:  # refused before the run directory is written
        raise ValueError(f"{config.model} is text-conditioned (cross-attention over embeddings of width {dim}) but "
                         f"{dataset.name!r} carries no encoder_hidden_states: add an array encoder_hidden_states "
                         f"(N, L, {dim}) to the data file, or train it unconditionally with --null-conditioning")
    return conditioning


def conditioning_on(conditioning: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
    """The tensors on ``device``, floating ones cast to ``dtype`` (the images' dtype; integer and bool masks keep
    theirs). A row repeated for every sample (``null_conditioning``, an expanded view) moves as one row."""
    def move(v: torch.Tensor) -> torch.Tensor:
        kw = {"dtype": dtype} if v.is_floating_point() else {}
        if v.ndim and v.stride(0) == 0:
            return v[:1].to(device, **kw).expand(v.shape)
        return v.to(device, **kw)

    return {k: move(v) for k, v in conditioning.items()}


def fingerprint_tensors(conditioning: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """What identifies the conditioning's content (for the run's data fingerprint), sorted by name; a repeated
    row (``null_conditioning``) counts once."""
    return [v[:1] if v.ndim and v.stride(0) == 0 else v for _, v in sorted(conditioning.items())]


def batch_kwargs(conditioning: dict[str, torch.Tensor], idx: torch.Tensor, y: Any = None) -> dict[str, Any]:
    """The model's keyword arguments for the batch of images ``idx``: ``y`` (when given) and every conditioning
    tensor's rows ``idx`` (``adapters.conditioning.select_rows``: row i stays with image i)."""
    kwargs: dict[str, Any] = {} if y is None else {LABELS_ARG: y}
    kwargs.update(select_rows(conditioning, idx))
    return kwargs


def used_record(config: TrainConfig, dataset: Any, conditioning: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the run used, as ``gradconflict gram`` records it: schedule, T, prediction, the data (name, path, N,
    image shape), whether labels go to the model as ``y``, the conditioning names passed (sorted; ``[]`` for
    none) and ``null_conditioning`` ("zeros", a .npy path, or None when the embeddings come from the data)."""
    return {"schedule": schedule_words(config.schedule, config.T), "T": int(config.T), "prediction": config.prediction,
            "dataset": dataset_record(dataset, config.data),
            "labels": bool(config.conditional), "conditioning": sorted(conditioning),
            "null_conditioning": config.null_conditioning,
            "null_length": int(config.null_length) if config.null_conditioning == "zeros" else None}


def used_line(used: dict[str, Any]) -> str:
    """One line for stderr: ``train: schedule linear (T = 1000), eps prediction; data NAME: N images of CxHxW;
    conditioning encoder_hidden_states (rows of the data) | ... (null: zeros, L = 77) | none``."""
    data = used["dataset"]
    names = [n for n in used["conditioning"] if not (used["null_conditioning"] and n == "encoder_hidden_states")]
    parts = [f"{', '.join(names)} (rows of the data)"] if names else []
    if used["null_conditioning"]:
        length = f", L = {used['null_length']}" if used.get("null_length") else ""
        parts.append(f"encoder_hidden_states = null ({used['null_conditioning']}{length}) for every sample")
    if used["labels"]:
        parts.append("class labels as y")
    return (f"train: schedule {used['schedule']}, {used['prediction']} prediction; data {data['name']}: {data['N']} "
            f"images of {'x'.join(map(str, data['shape']))}; conditioning {'; '.join(parts) if parts else 'none'}")


def print_used(used: dict[str, Any]) -> None:
    """Print ``used_line(used)`` on stderr."""
    print(used_line(used), file=sys.stderr)
