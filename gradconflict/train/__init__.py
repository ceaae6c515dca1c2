"""Diffusion training: ``train(TrainConfig(...), out_dir)``, the loss, checkpoints, EMA and samplers."""

from .checkpoint import load_trained, make_schedule, run_checkpoints
from .config import TrainConfig
from .ema import EMA
from .loop import diffusion_loss, prediction_error, train
from .sampler import ddim_sample, ddpm_sample, sample, sample_grid_png

__all__ = [
    "TrainConfig",
    "train",
    "diffusion_loss",
    "prediction_error",
    "load_trained",
    "make_schedule",
    "run_checkpoints",
    "EMA",
    "sample",
    "ddim_sample",
    "ddpm_sample",
    "sample_grid_png",
]
