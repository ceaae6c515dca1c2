"""Unweighted diffusion losses per timestep bin on held-out images, in x0 units and in the model's own units.

For each bin k, ``per_bin`` timesteps are drawn uniformly inside the bin (``TimestepBins.sample``) and paired
with held-out images and fresh noise; with ``x_t = alpha_t x0 + sigma_t eps`` and the model's output ``f``:

    loss_model = mean_i mean_pixels (f(x_t, t) - y)^2          (y = eps, x0 or v: the model's prediction type)
    loss_x0    = mean_i mean_pixels (x0_hat(f) - x0)^2         (x0_hat from ``targets.to_x0``)

Per sample the two are tied by ``loss_model = c(SNR_t) loss_x0`` with ``c = 1`` (x0), ``SNR`` (eps),
``SNR + 1`` (v) (``targets.loss_factor``). No loss weighting is applied (paper Fig. 6 shape). An eps-prediction
model at a timestep with SNR = 0 (zero terminal SNR) has no x0 estimate: its ``loss_x0`` there is meaningless.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..bins import TimestepBins
from ..engine.loss import model_output
from ..schedule import NoiseSchedule
from ..targets import expand_like, normalize_prediction, target, to_x0

__all__ = ["held_out_losses", "LOSS_COLUMNS"]

LOSS_COLUMNS: tuple[str, ...] = ("bin", "label", "t_lo", "t_hi", "log_snr_mid", "loss_x0", "loss_model",
                                 "loss_x0_se", "loss_model_se", "n")


def _check_inputs(x0: Any, schedule: NoiseSchedule, bins: TimestepBins, per_bin: int, batch_size: int) -> torch.Tensor:
    if not isinstance(x0, torch.Tensor):
        raise ValueError(f"x0 must be a tensor of held-out images (N, C, H, W), got {type(x0).__name__}")
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must hold at least one held-out image with a batch axis first, got shape {tuple(x0.shape)}")
    if not x0.is_floating_point() or not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 must hold finite floating-point images (no NaN/Inf, not integers); convert with x.float()")
    if bins.T != schedule.T:
        raise ValueError(f"the bins cover T = {bins.T} timesteps but the schedule has T = {schedule.T}; build them "
                         f"for the same T, e.g. TimestepBins.uniform({schedule.T}, K)")
    for name, value in (("per_bin", per_bin), ("batch_size", batch_size)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return x0


def _per_image_kwargs(model_kwargs: dict, n: int, idx: torch.Tensor) -> dict:
    """``model_kwargs`` for the images ``idx``: a tensor whose first axis has the N held-out images' length is
    indexed like them (e.g. class labels ``y``); any other value is passed unchanged."""
    return {k: v[idx.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n else v
            for k, v in model_kwargs.items()}


def _errors(model: Any, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, schedule: NoiseSchedule, prediction: str,
            model_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample squared errors ``(model units, x0 units)`` from one forward pass, in float64."""
    alpha = schedule.alpha(t).to(x0.dtype)
    sigma = schedule.sigma(t).to(x0.dtype)
    x_t = expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise
    out = model_output(model, x_t, t, model_kwargs).double()
    a, s, xd = alpha.double(), sigma.double(), x_t.double()
    y = target(x0.double(), noise.double(), a, s, prediction)
    err_model = (out - y).pow(2).flatten(1).mean(1)
    err_x0 = (to_x0(out, xd, a, s, prediction) - x0.double()).pow(2).flatten(1).mean(1)
    return err_model, err_x0


def _eval_mode(model: Any) -> dict:
    """Put an ``nn.Module`` in eval mode; returns its modules' training flags to restore."""
    if not isinstance(model, nn.Module):
        return {}
    flags = {m: m.training for m in model.modules()}
    model.eval()
    return flags


def held_out_losses(model: Any, x0: torch.Tensor, *, schedule: NoiseSchedule, prediction: str, bins: TimestepBins,
                    per_bin: int, generator: torch.Generator, model_kwargs: Optional[dict] = None,
                    batch_size: int = 256) -> pd.DataFrame:
    """Unweighted held-out loss per timestep bin: one row per bin with columns ``LOSS_COLUMNS``.

    ``model(x_t, t, **model_kwargs)`` predicts ``prediction`` (eps, x0 or v); ``x0``: held-out images
    ``(N, C, H, W)`` on the model's device and dtype; ``per_bin`` timesteps per bin (stratified: uniform inside
    each bin). Every bin uses the same images: a random permutation of the N images, cycled when
    ``per_bin > N``, so that differences between bins are not differences between images. Tensors in
    ``model_kwargs`` whose first axis has length N (class labels) follow their images.

    Columns: ``bin``, ``label``, ``t_lo`` / ``t_hi`` (inclusive), ``log_snr_mid`` (log-SNR at the bin's middle
    timestep), ``loss_x0`` (data units squared), ``loss_model`` (the model's own units), their standard errors
    over the bin's samples ``loss_x0_se`` / ``loss_model_se``, and ``n`` (= per_bin). Eval mode, no gradients
    (the model's training flags are restored); deterministic given ``generator`` (a CPU generator: timesteps,
    the image permutation and the noise are drawn from it in that order, whatever ``batch_size``).
    """
    kind = normalize_prediction(prediction)
    x0 = _check_inputs(x0, schedule, bins, per_bin, batch_size)
    n_images, per_bin = x0.shape[0], int(per_bin)
    t_all, _ = bins.sample(per_bin, generator)  # grouped by bin, per_bin each
    perm = torch.randperm(n_images, generator=generator)
    image_of = perm[torch.arange(per_bin) % n_images].repeat(bins.K)
    noise_all = torch.randn((t_all.numel(), *x0.shape[1:]), generator=generator, dtype=torch.float32)
    kwargs = dict(model_kwargs or {})
    err_model = torch.empty(t_all.numel(), dtype=torch.float64)
    err_x0 = torch.empty(t_all.numel(), dtype=torch.float64)
    flags = _eval_mode(model)
    try:
        with torch.no_grad():
            for i in range(0, t_all.numel(), int(batch_size)):
                sl = slice(i, i + int(batch_size))
                idx = image_of[sl]
                images = x0[idx.to(x0.device)]
                noise = noise_all[sl].to(device=x0.device, dtype=x0.dtype)
                e_model, e_x0 = _errors(model, images, t_all[sl].to(x0.device), noise, schedule, kind,
                                        _per_image_kwargs(kwargs, n_images, idx))
                err_model[sl], err_x0[sl] = e_model.cpu(), e_x0.cpu()
    finally:
        for module, flag in flags.items():
            module.train(flag)
    lam = np.asarray(schedule.log_snr(np.arange(schedule.T)), dtype=np.float64)
    mid = (bins.lows + bins.highs - 1) // 2
    groups_model = err_model.reshape(bins.K, per_bin).numpy()
    groups_x0 = err_x0.reshape(bins.K, per_bin).numpy()

    def se(groups: np.ndarray) -> np.ndarray:
        return groups.std(axis=1, ddof=1) / np.sqrt(per_bin) if per_bin > 1 else np.full(bins.K, np.nan)

    return pd.DataFrame({
        "bin": np.arange(bins.K), "label": bins.labels, "t_lo": bins.lows, "t_hi": bins.highs - 1,
        "log_snr_mid": lam[mid], "loss_x0": groups_x0.mean(axis=1), "loss_model": groups_model.mean(axis=1),
        "loss_x0_se": se(groups_x0), "loss_model_se": se(groups_model), "n": np.full(bins.K, per_bin, dtype=np.int64),
    }, columns=list(LOSS_COLUMNS))
