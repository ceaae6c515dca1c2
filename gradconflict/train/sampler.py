"""Samplers for a trained denoiser: DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020).

Both walk down a decreasing sub-sequence of timesteps ``t_1 > t_2 > ... > t_S`` (evenly spaced from T-1 to 0)
and then to "t = -1" where ``alphabar = 1`` (clean data). With ``abar`` = alphabar, ``t`` the current and
``s`` the next timestep, and the model's estimates ``x0_hat`` (clipped to [-1, 1] when ``clip``) and
``eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``:

* DDIM:  ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sig^2) eps_hat + sig z`` with
  ``sig = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)`` (eta = 0: deterministic).
* DDPM:  ``x_s ~ N(mu, var)``, the posterior q(x_s | x_t, x0 = x0_hat):
  ``mu = sqrt(abar_s) b / (1 - abar_t) x0_hat + sqrt(a) (1 - abar_s) / (1 - abar_t) x_t``,
  ``var = b (1 - abar_s) / (1 - abar_t)`` with ``a = abar_t / abar_s`` and ``b = 1 - a``.

DDPM with all T steps is the original ancestral sampler; on any sub-sequence it equals DDIM with eta = 1.
The initial noise and every ``z`` come from a CPU ``torch.Generator`` (seeded), so results do not depend
on the device's RNG.

Conditioning: ``model_kwargs`` (per-sample tensors by name, ``n`` rows, e.g. ``encoder_hidden_states`` (n, L, D))
go to every model call. A text-conditioned model (``model.config.cross_attention_dim``, e.g. a trained
``diffusers:PATH`` UNet2DConditionModel) given no ``encoder_hidden_states`` is sampled unconditionally, with
``encoder_hidden_states`` of zeros (n, 77, D) (``adapters.conditioning.null_text_conditioning``), and a note
on stderr says so; pass the embeddings of your prompts (e.g. the first rows of the training data's) instead.
"""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._io import atomic_write
from ..schedule import NoiseSchedule
from ..targets import to_x0

__all__ = ["timestep_sequence", "ddim_sample", "ddpm_sample", "sample", "sample_grid_png"]


def timestep_sequence(T: int, steps: int) -> list[int]:
    """``steps`` distinct timesteps evenly spaced from T-1 down to 0 (fewer if steps > T)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = np.unique(np.round(np.linspace(0, T - 1, min(steps, T))).astype(np.int64))
    return [int(t) for t in ts[::-1]]


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _default_labels(model: nn.Module, n: int, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    k = int(getattr(getattr(model, "config", None), "num_classes", 0) or 0)
    if y is not None or k == 0:
        return y
    return torch.arange(n) % k


def _conditioning(model: nn.Module, n: int, model_kwargs: Optional[dict[str, Any]], device: torch.device
                  ) -> dict[str, Any]:
    """``model_kwargs`` on ``device`` (floating ones in the parameters' dtype); for a text-conditioned model given
    no ``encoder_hidden_states``, zeros (n, NULL_LENGTH, D) with a note on stderr (see the module docstring)."""
    from ..adapters.conditioning import NULL_LENGTH, null_text_conditioning

    kwargs = dict(model_kwargs or {})
    dim = getattr(getattr(model, "config", None), "cross_attention_dim", None)
    if dim and kwargs.get("encoder_hidden_states") is None:
        print(f"note: sampling the text-conditioned {type(model).__name__} unconditionally: encoder_hidden_states of "
              f"zeros ({n}, {NULL_LENGTH}, {dim}); pass model_kwargs={{'encoder_hidden_states': ...}} for prompts",
              file=sys.stderr)
        kwargs["encoder_hidden_states"] = null_text_conditioning(n, NULL_LENGTH, int(dim))
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return {k: v.to(device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
            else v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _loop(model: nn.Module, schedule: NoiseSchedule, prediction: str, shape: Sequence[int], steps: int, *,
          ddpm: bool, eta: float, y: Optional[torch.Tensor], generator: Optional[torch.Generator],
          device: Optional[torch.device], clip: bool, model_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    device = device or _device_of(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = shape[0]
    y = _default_labels(model, n, y)
    y = y.to(device) if y is not None else None
    kwargs = _conditioning(model, n, model_kwargs, device)
    abar = schedule.alphas_cumprod
    ts = timestep_sequence(schedule.T, steps)
    x = torch.randn(tuple(shape), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(ts):
            s = ts[i + 1] if i + 1 < len(ts) else -1
            a_t, a_s = float(abar[t]), (float(abar[s]) if s >= 0 else 1.0)
            alpha, sigma = torch.tensor([math.sqrt(a_t)] * n), torch.tensor([math.sqrt(1.0 - a_t)] * n)
            out = model(x, torch.full((n,), t, dtype=torch.long, device=device), y, **kwargs).float()
            x0 = to_x0(out, x, alpha.to(device), sigma.to(device), prediction)
            if clip:
                x0 = x0.clamp(-1.0, 1.0)
            if ddpm:
                a, b = a_t / a_s, 1.0 - a_t / a_s
                mean = (math.sqrt(a_s) * b / (1 - a_t)) * x0 + (math.sqrt(a) * (1 - a_s) / (1 - a_t)) * x
                var = b * (1 - a_s) / (1 - a_t)
                x = mean + math.sqrt(var) * torch.randn(x.shape, generator=generator).to(device) if s >= 0 else mean
            else:
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
                sig = eta * math.sqrt((1 - a_s) / (1 - a_t)) * math.sqrt(1 - a_t / a_s) if s >= 0 else 0.0
                x = math.sqrt(a_s) * x0 + math.sqrt(max(1 - a_s - sig**2, 0.0)) * eps
                if sig > 0:
                    x = x + sig * torch.randn(x.shape, generator=generator).to(device)
    finally:
        model.train(was_training)
    return x


@torch.no_grad()
def ddim_sample(model: nn.Module, schedule: NoiseSchedule, prediction: str, shape: Sequence[int], *, steps: int = 50,
                eta: float = 0.0, y: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None, clip: bool = True,
                model_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """DDIM samples of shape ``shape`` (n, C, H, W) in ``[-1, 1]``-ish units; ``eta`` in [0, 1]; ``model_kwargs``:
    per-sample conditioning by name (n rows; see the module docstring for text-conditioned models)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    return _loop(model, schedule, prediction, shape, steps, ddpm=False, eta=eta, y=y, generator=generator, device=device,
                 clip=clip, model_kwargs=model_kwargs)


@torch.no_grad()
def ddpm_sample(model: nn.Module, schedule: NoiseSchedule, prediction: str, shape: Sequence[int], *,
                steps: Optional[int] = None, y: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None, clip: bool = True,
                model_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """DDPM ancestral samples over ``steps`` timesteps (default: all T); ``model_kwargs`` as for ``ddim_sample``."""
    return _loop(model, schedule, prediction, shape, steps or schedule.T, ddpm=True, eta=1.0, y=y, generator=generator,
                 device=device, clip=clip, model_kwargs=model_kwargs)


def sample(model: nn.Module, schedule: NoiseSchedule, prediction: str, n: int = 16, *, method: str = "ddim", steps: int = 50,
           eta: float = 0.0, seed: int = 0, y: Optional[torch.Tensor] = None, clip: bool = True,
           model_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """``n`` samples shaped from ``model.config`` (image_size, in_channels), on the CPU, with a seeded generator;
    ``model_kwargs``: per-sample conditioning (n rows; a text-conditioned model without it: null, see above)."""
    cfg = getattr(model, "config", None)
    if not all(hasattr(cfg, k) for k in ("in_channels", "image_size")):
        raise ValueError(f"cannot tell the sample shape of a {type(model).__name__}: its .config has no in_channels "
                         "and image_size (a model of your own); give it a config with those fields, or call "
                         "ddim_sample / ddpm_sample with the shape")
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    generator = torch.Generator().manual_seed(seed)
    if method == "ddim":
        x = ddim_sample(model, schedule, prediction, shape, steps=steps, eta=eta, y=y, generator=generator, clip=clip,
                        model_kwargs=model_kwargs)
    elif method == "ddpm":
        x = ddpm_sample(model, schedule, prediction, shape, steps=steps, y=y, generator=generator, clip=clip,
                        model_kwargs=model_kwargs)
    else:
        raise ValueError(f"unknown sampler {method!r}; use 'ddim' or 'ddpm'")
    return x.cpu()


def _to_display(img: torch.Tensor) -> tuple[np.ndarray, Optional[str]]:
    """(C, H, W) in [-1, 1] -> an array for imshow and its colormap (channel 0 of non-RGB images)."""
    x = ((img.float().clamp(-1, 1) + 1) / 2).numpy()
    if x.shape[0] == 3:
        return np.moveaxis(x, 0, -1), None
    return x[0], "gray"


def sample_grid_png(model: nn.Module, schedule: NoiseSchedule, prediction: str, path: str | Path, n: int = 16,
                    steps: int = 50, seed: int = 0, *, method: str = "ddim", eta: float = 0.0,
                    y: Optional[torch.Tensor] = None, title: Optional[str] = None,
                    model_kwargs: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """Sample ``n`` images and write them as a labelled grid PNG (cells titled with class or index, a title
    naming model, prediction, sampler, steps and seed). Returns the samples ``(n, C, H, W)``. ``model_kwargs``:
    per-sample conditioning by name (n rows, e.g. the first n rows of the training data's
    ``encoder_hidden_states``); a text-conditioned model without it is sampled with null (zero) embeddings."""
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    y = _default_labels(model, n, y)
    x = sample(model, schedule, prediction, n, method=method, steps=steps, eta=eta, seed=seed, y=y,
               model_kwargs=model_kwargs)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    arch = type(model).__name__
    # the title wrapped to the grid's width (about 15 characters per inch at 9 pt): a long one was cut at both sides
    heading = textwrap.fill(title or f"{arch} ({prediction}-prediction), {method.upper()} {steps} steps, seed {seed}",
                            width=max(30, int(15 * 1.3 * cols)))
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows + 0.2 + 0.18 * (heading.count("\n") + 1)))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            image, cmap = _to_display(x[i])
            ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"y={int(y[i])}" if y is not None else f"#{i}", fontsize=8)
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100))  # never a half-written PNG
    return x
