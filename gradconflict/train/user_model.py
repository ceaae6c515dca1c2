"""User model specs in training runs: building one for ``train`` (``TrainConfig.model`` = ``file.py:function``,
``module:function`` or ``diffusers:PATH``), what a run records to rebuild it, and rebuilding it on load."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..models import model_from_spec, model_spec
from .checkpoint import make_schedule
from .config import TrainConfig, is_builtin

__all__ = ["build_user_model", "run_model_spec", "rebuild_model"]


def build_user_model(config: TrainConfig, device: torch.device) -> nn.Module:
    """A user model spec's model (``spec.load_model``, built with torch seeded by ``config.seed``); a note on
    stderr when its build function declares another schedule or prediction than the run trains with."""
    from ..spec import load_model

    torch.manual_seed(config.seed)  # as for a built-in: the global RNG (dropout, ...) starts from the seed
    loaded = load_model(config.model, device=device, verbose=False, seed=config.seed)
    mine = make_schedule(config.schedule, config.T)
    theirs = loaded.schedule
    same = theirs.T == mine.T and np.allclose(np.asarray(theirs.alphas_cumprod), np.asarray(mine.alphas_cumprod))
    if loaded.prediction != config.prediction or not same:
        print(f"note: train: {config.model} gives (or assumes) {loaded.prediction} prediction and its own schedule "
              f"(T = {theirs.T}); this run trains it with {config.prediction} prediction and the {config.schedule} "
              f"schedule (T = {config.T}), as recorded in the run (--prediction, --schedule, --T to change)",
              file=sys.stderr)
    return loaded.model


def run_model_spec(config: TrainConfig, model: nn.Module) -> dict[str, Any]:
    """What a run records to rebuild its model: ``model_spec(model)`` for a built-in one, ``{"spec": ...,
    "seed": ...}`` (the user model spec and its build seed) otherwise (see ``checkpoint.load_trained``)."""
    if is_builtin(config.model):
        return model_spec(model)
    return {"spec": config.model, "seed": config.seed}


def rebuild_model(spec: dict[str, Any], path: Path) -> nn.Module:
    """A freshly built model of a run's ``model_spec``: a built-in one (``model_from_spec``) or, for a run of a
    user model spec (``{"spec": ..., "seed": ...}``), that spec built again through ``spec.load_model``."""
    if "spec" not in spec:
        return model_from_spec(spec)
    from ..spec import load_model

    text = str(spec["spec"])
    target = text[len("diffusers:"):] if text.startswith("diffusers:") else text.rpartition(":")[0]
    if (text.startswith("diffusers:") or target.endswith(".py")) and not Path(target).exists():
        raise FileNotFoundError(f"{path} was trained with the model spec {text}, but {target} does not exist any "
                                "more: put it back at that path, or pass the model spec where it is now with this "
                                f"file as the checkpoint (--model NEW_SPEC --checkpoint {path})")
    return load_model(text, verbose=False, seed=spec.get("seed")).model
