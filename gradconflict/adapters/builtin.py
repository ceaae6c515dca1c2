"""Built-in model names (``gradconflict.models.MODEL_NAMES``) as model specs, and training checkpoints given with them.

A name alone is a fresh model, initialised under ``BUILTIN_INIT_SEED`` (every run gets the same weights), with the
linear schedule (T = 1000) and the prediction type of its config. A checkpoint written by ``gradconflict train``
given with the name brings its run's model config, schedule, prediction and weights (EMA by default); what differs
from the name's defaults is reported in one line on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..schedule import NoiseSchedule
from ..targets import normalize_prediction
from .loaded import LoadedModel

__all__ = ["BUILTIN_INIT_SEED", "load_builtin", "training_config", "load_training_checkpoint"]

BUILTIN_INIT_SEED = 0  # a built-in name is initialised under this seed: every run gets the same weights


def load_builtin(name: str, checkpoint: Optional[str | Path] = None, verbose: bool = True,
                 weights: Optional[str] = None) -> LoadedModel:
    """The built-in model ``name``: with the model config, schedule, prediction and weights of ``checkpoint`` when
    that is a ``gradconflict train`` file (then ``.weights`` is "ema" or "raw"), else initialised under
    ``BUILTIN_INIT_SEED`` (torch's global RNG untouched; ``.weights`` "init": the caller loads ``checkpoint``)."""
    from ..models import MODEL_NAMES, build_model

    if name not in MODEL_NAMES:
        raise ValueError(
            f"unknown model {name!r}: use a built-in name {list(MODEL_NAMES)}, a training run directory, "
            "or 'path/file.py:function'"
        )
    run_config = training_config(checkpoint) if checkpoint is not None else None
    if run_config is not None:
        return load_training_checkpoint(name, checkpoint, run_config, verbose, weights)
    with torch.random.fork_rng(devices=[]):  # the same initial weights in every run; global RNG untouched
        torch.manual_seed(BUILTIN_INIT_SEED)
        model = build_model(name)
    prediction = getattr(getattr(model, "config", None), "prediction", "eps")
    return LoadedModel(model, NoiseSchedule.linear(), normalize_prediction(prediction), name)


def training_config(path: str | Path) -> Optional[dict[str, Any]]:
    """The ``TrainConfig`` dict stored in a ``gradconflict train`` checkpoint or weights file, else None."""
    path = Path(path)
    if not path.is_file():
        return None  # load_state_dict reports the missing file
    try:
        if path.suffix == ".safetensors":
            from ..train.checkpoint import weights_metadata

            meta = weights_metadata(path)
            return json.loads(meta["config"]) if "config" in meta and "model_spec" in meta else None
        from ..train.checkpoint import CHECKPOINT_FORMAT

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: no copy of the tensors
    except Exception:  # noqa: BLE001 - not a training file; load_state_dict reads (or rejects) it as a state dict
        return None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT and isinstance(obj.get("config"), dict):
        return obj["config"]
    return None


def load_training_checkpoint(name: str, checkpoint: str | Path, config: dict[str, Any], verbose: bool,
                             weights: Optional[str] = None) -> LoadedModel:
    """Built-in ``name`` with the model config, schedule, prediction and weights (EMA by default) of a training
    checkpoint."""
    from .._loading import load_trained_weights
    from ..models import build_model, model_spec
    from ..train.config import TrainConfig

    cfg = TrainConfig.from_dict(config)
    with torch.device("meta"):  # the name's defaults, without allocating or initialising weights
        default = model_spec(build_model(name))
    model, schedule, prediction, kind = load_trained_weights(checkpoint, weights)
    stored = model_spec(model)
    if stored["arch"] != default["arch"]:
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} holds a {stored['arch']} model (trained as {cfg.model!r}), not a "
            f"{default['arch']} like {name!r}: pass --model {cfg.model} or the run folder"
        )
    prediction = normalize_prediction(prediction)
    changes = []
    if prediction != normalize_prediction(default["config"].get("prediction", "eps")):
        changes.append(f"prediction {prediction!r}")
    if (cfg.schedule, cfg.T) != ("linear", 1000):
        changes.append(f"{cfg.schedule} schedule (T = {cfg.T})")
    fields = [f"{k}={v}" for k, v in stored["config"].items() if k != "prediction" and default["config"].get(k) != v]
    if fields:
        changes.append("model config " + ", ".join(fields))
    if changes and verbose:
        print(f"gradconflict: {str(checkpoint)!r} was trained with {'; '.join(changes)}: using these instead of "
              f"the {name} defaults", file=sys.stderr)
    return LoadedModel(model, schedule, prediction, f"{name} {checkpoint}", kind)
