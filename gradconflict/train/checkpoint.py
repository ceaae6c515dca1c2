"""Checkpoints, final weights and reloading a trained run.

Files in a run directory:

* ``config.json``: the ``TrainConfig`` (written at the start of every training segment);
* ``checkpoint.pt``: ``torch.save`` of a dict with ``format``, ``step``, ``config``, ``model_spec``, ``model``,
  ``ema``, ``optimizer``, ``rng`` (the data/timestep/noise ``torch.Generator`` state and the global CPU RNG)
  ``data_order`` (current permutation and position) and ``history`` (the log.csv / losses.csv columns up to
  ``step``, so that a resume never depends on the CSVs) and ``weighting`` (the ``AdaptiveWeighting``'s
  state: online Pareto weights, a learned weighting's network; empty for fixed ones); loadable with ``weights_only=True``;
* ``model.safetensors``: model weights plus EMA weights under the prefix ``ema.``; the metadata holds
  ``config`` and ``model_spec`` as JSON, so it is self-contained (for a user model spec, ``model_spec`` is
  ``{"spec": "/abs/file.py:build", "seed": N}``: the model is built again from that file, which must still exist);
* ``checkpoints/step{N}.safetensors`` (``keep_checkpoints``): ``model.safetensors`` as it was at step N;
* ``log.csv`` (per step) and ``losses.csv`` (per bin), see ``gradconflict.train.loop``.

Every file is written atomically: to a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .._io import atomic_write
from ..schedule import NoiseSchedule
from .config import TrainConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "weights_metadata",
    "save_checkpoint",
    "load_checkpoint",
    "save_weights",
    "make_schedule",
    "load_trained",
    "NoEMAWeights",
    "run_checkpoints",
]

CHECKPOINT_FORMAT = "gradconflict-train-v1"
EMA_PREFIX = "ema."


class NoEMAWeights(ValueError):
    """A weights file asked for its EMA weights holds none (``save_weights`` without ``ema_state``)."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically ``torch.save`` a checkpoint dict (``format`` is added)."""
    atomic_write(path, lambda p: torch.save({"format": CHECKPOINT_FORMAT, **state}, p))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load ``checkpoint.pt`` (tensors only, ``weights_only=True``); raises on a foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign pickle
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a gradconflict training checkpoint (format {CHECKPOINT_FORMAT!r})")
    return state


def save_weights(path: str | Path, model: nn.Module, ema_state: Optional[dict[str, torch.Tensor]], metadata: dict[str, Any]) -> None:
    """Atomically write ``model.safetensors``: model weights, EMA weights as ``ema.<name>``, JSON metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema_state is not None:
        tensors.update({EMA_PREFIX + k: v.detach().cpu().contiguous() for k, v in ema_state.items()})
    meta = {k: json.dumps(v) for k, v in metadata.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def make_schedule(name: str, T: int) -> NoiseSchedule:
    """The noise schedule of a run: "linear" (betas 1e-4..0.02) or "cosine" (Nichol & Dhariwal)."""
    if name == "linear":
        return NoiseSchedule.linear(T)
    if name == "cosine":
        return NoiseSchedule.cosine(T)
    raise ValueError(f"unknown schedule {name!r}; use 'linear' or 'cosine'")


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` file (``{}`` when it has none); ``gradconflict train`` stores
    ``config``, ``model_spec`` and ``step`` there, JSON-encoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _from_safetensors(path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    from .._loading import read_safetensors

    meta = read_safetensors(path, lambda: weights_metadata(path))
    if "config" not in meta or "model_spec" not in meta:
        raise ValueError(f"{path} has no gradconflict metadata (config, model_spec); was it written by gradconflict train?")
    tensors = read_safetensors(path, lambda: load_file(str(path)))
    if ema:
        weights = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if not weights:
            raise NoEMAWeights(f"{path} holds no EMA weights; load it with ema=False")
    else:
        weights = {k: v for k, v in tensors.items() if not k.startswith(EMA_PREFIX)}
    return weights, json.loads(meta["config"]), json.loads(meta["model_spec"])


def load_trained(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[nn.Module, NoiseSchedule, str]:
    """``(model, schedule, prediction)`` of a trained run, the model in eval mode on ``device``.

    ``path``: a run directory (uses ``model.safetensors``, else ``checkpoint.pt``), a ``.safetensors`` file
    or a ``.pt`` checkpoint. ``ema``: load the EMA weights (True) or the raw final weights.
    """
    path = Path(path)
    if path.is_dir():
        candidates = [path / "model.safetensors", path / "checkpoint.pt"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor checkpoint.pt; is it a training run directory?")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(f"no such run directory or weights file: {path}")
    if path.suffix == ".safetensors":
        weights, config, spec = _from_safetensors(path, ema)
    else:
        state = load_checkpoint(path)
        config, spec = state["config"], state["model_spec"]
        weights = state["ema"]["shadow"] if ema else state["model"]
    from .user_model import rebuild_model

    cfg = TrainConfig.from_dict(config)
    model = rebuild_model(spec, path)
    reference = model.state_dict()
    model.load_state_dict({k: v.to(reference[k].dtype) for k, v in weights.items()})
    model.to(device).eval()
    return model, make_schedule(cfg.schedule, cfg.T), cfg.prediction


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``[(step, weights file), ...]`` of a training run, sorted by step: every kept
    ``checkpoints/step*.safetensors`` and the final ``model.safetensors``, each step read from the file's
    metadata (a step held by both is taken from the kept file). ``ValueError`` for a folder without any."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"{run} is not a training run folder; pass the --out folder of gradconflict train")
    found: dict[int, Path] = {}
    for path in [run / "model.safetensors", *sorted((run / "checkpoints").glob("step*.safetensors"))]:
        if not path.is_file():
            continue
        from .._loading import read_safetensors

        meta = read_safetensors(path, lambda: weights_metadata(path))
        if "step" not in meta:
            raise ValueError(f"{path} records no training step in its metadata; was it written by gradconflict train?")
        found[int(json.loads(meta["step"]))] = path
    if not found:
        raise ValueError(f"{run} holds no model.safetensors nor checkpoints/step*.safetensors; train into it first "
                         "(gradconflict train --out RUN --keep-checkpoints), or pass --checkpoints")
    return sorted(found.items())
