"""Resolve a model spec into ``(model, schedule, prediction)``: a built-in name, a training run, or user code.

A spec is one of

* a built-in model name (``gradconflict.models.MODEL_NAMES``, e.g. ``dit-tiny``): a fresh model (initialised under
  ``BUILTIN_INIT_SEED``, so every run gets the same weights) with the
  linear schedule (T = 1000) and the prediction type of its config;
* a training run directory (written by ``gradconflict train``): its EMA weights, schedule and prediction;
* ``path/to/file.py:function`` or ``package.module:function``: a function returning ``(model, schedule,
  prediction)``, or just a model (then the linear schedule and eps prediction are assumed).
* ``diffusers:PATH``: a diffusers UNet2DModel / DiTTransformer2DModel / Transformer2DModel and its scheduler
  from a local pipeline or model folder (``gradconflict.adapters.load_diffusers``; needs ``pip install
  gradconflict[diffusers]``, never downloads).

``checkpoint`` (a state dict in ``.pt`` or ``.safetensors``) is loaded into the model afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from .schedule import NoiseSchedule
from .targets import normalize_prediction

__all__ = ["LoadedModel", "load_model", "load_state_dict", "BUILTIN_INIT_SEED"]

BUILTIN_INIT_SEED = 0  # a built-in name is initialised under this seed: every run gets the same weights


@dataclass
class LoadedModel:
    """A model with the noise schedule and prediction type it was trained with."""

    model: nn.Module
    schedule: NoiseSchedule
    prediction: str
    source: str


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (a bare state dict or one under ``model``/``state_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        if any(k.startswith("ema.") for k in state):  # gradconflict runs keep EMA weights beside the model
            state = {k: v for k, v in state.items() if not k.startswith("ema.")}
        return state
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any unreadable file the same way
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {err}") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} does not hold a state dict")
    return obj


def _import_function(spec: str) -> Any:
    target, _, func = spec.rpartition(":")
    if not target or not func:
        raise ValueError(f"model spec {spec!r} must look like 'path/file.py:function' or 'module:function'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"model file {target!r} does not exist")
        name = f"gradconflict_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, func):
        raise ValueError(f"{target!r} has no function {func!r}")
    return getattr(module, func)


def load_model(spec: str, checkpoint: Optional[str | Path] = None, *, device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve a model spec (see the module docstring) and optionally load a checkpoint into it."""
    text = str(spec)
    loaded: Optional[LoadedModel] = None
    if text.startswith("diffusers:"):
        from .adapters.diffusers import load_diffusers

        loaded = load_diffusers(text[len("diffusers:"):], device=device)
    elif Path(text).is_dir():
        from .train import load_trained

        model, schedule, prediction = load_trained(text)
        loaded = LoadedModel(model, schedule, normalize_prediction(prediction), f"run {text}")
    elif ":" in text and not Path(text).exists():
        made = _import_function(text)()
        if isinstance(made, nn.Module):
            loaded = LoadedModel(made, NoiseSchedule.linear(), "eps", text)
        elif isinstance(made, (tuple, list)) and len(made) == 3:
            model, schedule, prediction = made
            if not isinstance(schedule, NoiseSchedule):
                schedule = NoiseSchedule.from_diffusers(schedule)
            loaded = LoadedModel(model, schedule, normalize_prediction(prediction), text)
        else:
            raise ValueError(f"{text!r} must return a model or (model, schedule, prediction), got {type(made).__name__}")
    else:
        from .models import MODEL_NAMES, build_model

        if text not in MODEL_NAMES:
            raise ValueError(
                f"unknown model {text!r}: use a built-in name {list(MODEL_NAMES)}, a training run directory, "
                "or 'path/file.py:function'"
            )
        with torch.random.fork_rng(devices=[]):  # the same initial weights in every run; global RNG untouched
            torch.manual_seed(BUILTIN_INIT_SEED)
            model = build_model(text)
        prediction = getattr(getattr(model, "config", None), "prediction", "eps")
        loaded = LoadedModel(model, NoiseSchedule.linear(), normalize_prediction(prediction), text)
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        missing, unexpected = loaded.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    loaded.model.to(device)
    return loaded
