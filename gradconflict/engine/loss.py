"""The per-sample diffusion loss that defines each task: ``l_i = mean_elements (y_i - y_hat_i)^2`` in loss-space units."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..schedule import NoiseSchedule
from ..targets import convert, expand_like, normalize_prediction, target
from .checks import first_line

__all__ = ["per_sample_losses", "model_output"]


def model_output(model: Callable[..., Any], x_t: torch.Tensor, t: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
    """Call ``model(x_t, t, **model_kwargs)`` and unwrap common output types: a diffusers output's ``.sample`` (or
    a dict's ``"sample"``), and a tuple or list whose first item is the prediction (diffusers' ``return_dict=False``
    form; the other items are ignored)."""
    try:
        out = model(x_t, t, **model_kwargs)
    except RuntimeError as exc:
        _explain_mismatch(model, x_t, exc)
        raise
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        out = out.sample
    elif isinstance(out, dict) and isinstance(out.get("sample"), torch.Tensor):
        out = out["sample"]
    elif isinstance(out, (tuple, list)) and out:
        if not isinstance(out[0], torch.Tensor):
            raise ValueError(f"the model returned a {type(out).__name__} whose first item is a {type(out[0]).__name__}; "
                             "it must return a tensor shaped like x_t (or a tuple with that tensor first)")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        keys = f" with keys {sorted(map(str, out))[:5]}" if isinstance(out, dict) else ""
        raise ValueError(f"the model returned a {type(out).__name__}{keys}; it must return a tensor shaped like x_t "
                         "(wrap it, e.g. lambda x, t: model(x, t)['pred'])")
    if out.shape != x_t.shape:
        raise ValueError(f"the model output has shape {tuple(out.shape)} but x_t has {tuple(x_t.shape)}; they must match")
    return out


def _explain_mismatch(model: Any, x_t: torch.Tensor, exc: RuntimeError) -> None:
    """Re-raise a failed forward as a ValueError when the input's dtype or device differs from the parameters'."""
    p = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    if "channels" in str(exc) and f"input[{', '.join(map(str, x_t.shape))}]" in str(exc):  # the data's, not a layer's
        raise ValueError(
            f"the model's forward failed on x_t with {x_t.shape[1]} channels ({first_line(exc)}); give it data with "
            "the channels the model was built for (a grayscale set for a 1-channel model, RGB for 3)") from exc
    if p is None or not p.is_floating_point() or (p.dtype == x_t.dtype and p.device == x_t.device):
        return
    if torch.is_autocast_enabled(x_t.device.type) and p.device == x_t.device:
        return  # autocast handles dtypes: the failure is something else
    raise ValueError(
        f"the model's forward failed on x_t of dtype {x_t.dtype} on {x_t.device}, while its parameters are "
        f"{p.dtype} on {p.device} ({first_line(exc)}); pass x0, noise and model_kwargs with the model's dtype and device, "
        "e.g. x0.to(next(model.parameters()))"
    ) from exc


def per_sample_losses(
    model: nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    prediction: str = "eps",
    loss_space: str = "x0",
    model_kwargs: Optional[dict] = None,
) -> torch.Tensor:
    """Per-sample loss ``(N,)``: ``x_t = alpha_t x0 + sigma_t noise``; the model's output, read as a
    ``prediction`` (eps, x0 or v), is converted to ``loss_space`` and compared with the true value there:
    ``l_i = mean over elements of (y_i - y_hat_i)^2`` (x0 units by default, i.e. data units squared)."""
    space = normalize_prediction(loss_space, "loss_space")
    alpha = schedule.alpha(t).to(x0.dtype)
    sigma = schedule.sigma(t).to(x0.dtype)
    x_t = expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise
    out = model_output(model, x_t, t, model_kwargs or {})
    y_hat = convert(out, x_t, alpha.to(out.dtype), sigma.to(out.dtype), source=prediction, to=space)
    y = target(x0, noise, alpha, sigma, space)
    err = (y_hat.float() if y_hat.dtype in (torch.float16, torch.bfloat16) else y_hat) - y.to(
        torch.float32 if y_hat.dtype in (torch.float16, torch.bfloat16) else y_hat.dtype
    )
    return err.pow(2).reshape(err.shape[0], -1).mean(1)
