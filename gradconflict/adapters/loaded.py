"""``LoadedModel``: a model with the noise schedule and prediction type it was trained with, and which weights.

A leaf module (it imports only torch and ``gradconflict.schedule``): every adapter returns one, and
``gradconflict.spec.load_model`` resolves a model spec into one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..schedule import NoiseSchedule

__all__ = ["LoadedModel", "WEIGHT_KINDS"]

WEIGHT_KINDS = ("ema", "raw", "as saved", "init")  # the values of LoadedModel.weights


@dataclass
class LoadedModel:
    """A model with the noise schedule and prediction type it was trained with."""

    model: nn.Module
    schedule: NoiseSchedule
    prediction: str
    source: str
    weights: str = "init"  # "ema", "raw", "as saved" (a file without an EMA copy) or "init" (no weights loaded)
