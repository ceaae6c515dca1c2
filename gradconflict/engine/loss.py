"""The per-sample diffusion loss that defines each task: ``l_i = mean_elements (y_i - y_hat_i)^2`` in loss-space units."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..schedule import NoiseSchedule
from ..targets import convert, expand_like, normalize_prediction, target
from .checks import first_line

__all__ = ["per_sample_losses", "model_output", "check_forward_inputs", "check_data", "check_timesteps", "forward_dtype"]


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


def check_forward_inputs(x0: Any, t: Any, noise: Any) -> None:
    """Refuse, by type and dtype alone (so it also runs inside ``torch.func`` transforms), inputs the forward process
    would silently get wrong: non-floating ``x0`` or ``noise`` (integer images give ``x_t = 0`` once the coefficients
    are cast to their dtype) and non-integer timesteps ``t`` (``t.long()`` would truncate 0.7 to 0)."""
    check_data(x0, "x0")
    check_data(noise, "noise")
    check_timesteps(t)


def check_data(x: Any, name: str) -> None:
    """``x`` (x0 or noise) must be a floating tensor; the error names the dtype and the conversion."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert it with torch.as_tensor({name})")
    if x.is_floating_point():
        return
    if name == "noise":
        raise ValueError(f"noise has dtype {x.dtype}; it must be floating Gaussian noise, e.g. noise = torch.randn_like(x0)")
    raise ValueError(f"{name} has dtype {x.dtype}; the forward process needs floating data in [-1, 1]: convert and "
                     f"scale it, e.g. {name} = {name}.float() / 127.5 - 1 for uint8 images")


def check_timesteps(t: Any) -> None:
    """``t`` must be a tensor of an integer dtype (not bool): ``t.long()`` would truncate a float 0.7 to 0."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t must be a torch.Tensor of integer timesteps, got {type(t).__name__}; use torch.as_tensor(t)")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"t has dtype {t.dtype}; timesteps must be integers 0..T-1 (.long() would truncate 0.7 to 0): "
                         "pass t.long() if its values are whole numbers")


def forward_dtype(model: Any, x0: torch.Tensor) -> torch.dtype:
    """The dtype ``x_t`` is given to the model in: ``x0``'s, promoted to the model's (its first floating parameter's)
    when that is finer, so that float16 data fed to a float64 model is noised in float64."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return torch.promote_types(x0.dtype, p.dtype)
    return x0.dtype


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
    ``l_i = mean over elements of (y_i - y_hat_i)^2`` (x0 units by default, i.e. data units squared).

    Precision: the schedule's coefficients, ``x_t``, the conversion and the error are computed in
    ``forward_dtype(model, x0)`` (at least float32), and ``x_t`` is rounded once to ``forward_dtype`` for the model;
    so the forward process never runs coarser than the model or the data. ``x0`` must be floating, ``t`` integer."""
    check_forward_inputs(x0, t, noise)
    space = normalize_prediction(loss_space, "loss_space")
    input_dtype = forward_dtype(model, x0)
    exact = torch.promote_types(input_dtype, torch.float32)  # the arithmetic of the forward process and the loss
    x0, noise = x0.to(exact), noise.to(exact)
    alpha = torch.as_tensor(schedule.alpha(t)).to(exact)
    sigma = torch.as_tensor(schedule.sigma(t)).to(exact)
    x_t = expand_like(alpha, x0) * x0 + expand_like(sigma, x0) * noise
    out = model_output(model, x_t.to(input_dtype), t, model_kwargs or {})
    out = out.to(torch.promote_types(out.dtype, exact))
    y_hat = convert(out, x_t.to(out.dtype), alpha.to(out.dtype), sigma.to(out.dtype), source=prediction, to=space)
    err = y_hat - target(x0, noise, alpha, sigma, space).to(y_hat.dtype)
    return err.pow(2).reshape(err.shape[0], -1).mean(1)
