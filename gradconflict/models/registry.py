"""Named model sizes and (de)serialisation of model configs.

| name      | architecture                                           | input   | parameters |
|-----------|--------------------------------------------------------|---------|------------|
| dit-tiny  | DiT, width 64, depth 3, 4 heads, patch 2               | 16x16x1 | 254k       |
| unet-tiny | UNet, 16 ch, mult (1, 2, 2), 1 block, attention at 8/4 | 16x16x1 | 293k       |
| dit-s     | DiT-S/2: width 384, depth 12, 6 heads, patch 2         | 32x32x4 | 32.5M      |
| unet-s    | UNet, 128 ch, mult (1, 2, 2), 2 blocks, attention 16/8 | 32x32x4 | 27.2M      |

``build_model("dit-tiny", image_size=28, num_classes=10)`` overrides any config field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from .dit import DiT, DiTConfig
from .unet import UNet, UNetConfig

__all__ = ["MODEL_NAMES", "ARCHITECTURES", "build_model", "model_spec", "model_from_spec", "model_summary"]

# architecture name -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {
    "dit": (DiTConfig, DiT),
    "unet": (UNetConfig, UNet),
}

_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "dit-tiny": ("dit", dict(image_size=16, in_channels=1, patch_size=2, hidden_size=64, depth=3, num_heads=4)),
    "unet-tiny": (
        "unet",
        dict(image_size=16, in_channels=1, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
             attention_resolutions=(8, 4), head_channels=32, groups=8),
    ),
    "dit-s": ("dit", dict(image_size=32, in_channels=4, patch_size=2, hidden_size=384, depth=12, num_heads=6)),
    "unet-s": (
        "unet",
        dict(image_size=32, in_channels=4, base_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
             attention_resolutions=(16, 8), head_channels=64, groups=32),
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(_PRESETS)


def _make(arch: str, fields: dict[str, Any]) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; use one of {sorted(ARCHITECTURES)}")
    config_cls, model_cls = ARCHITECTURES[arch]
    valid = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(fields) - valid)
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no field(s) {unknown}; valid fields: {sorted(valid)}")
    return model_cls(config_cls(**fields))


def build_model(name: str, **overrides: Any) -> nn.Module:
    """A freshly initialised model of a named size (``MODEL_NAMES``), with config fields overridden.

    The model's ``.config`` is its config dataclass; ``model(x_t, t, y=None)`` returns a tensor shaped like x_t.
    """
    key = name.strip().lower()
    if key not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; use one of {list(MODEL_NAMES)}")
    arch, fields = _PRESETS[key]
    return _make(arch, {**fields, **overrides})


def model_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-ready description ``{"arch": ..., "config": {...}}`` that ``model_from_spec`` rebuilds."""
    for arch, (config_cls, model_cls) in ARCHITECTURES.items():
        if isinstance(model, model_cls):
            cfg = dataclasses.asdict(model.config)
            return {"arch": arch, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    raise ValueError(f"{type(model).__name__} is not a built-in model; use one of {sorted(ARCHITECTURES)}")


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A freshly initialised model from ``model_spec``'s output (load weights into it afterwards)."""
    if "arch" not in spec or "config" not in spec:
        raise ValueError("a model spec needs the keys 'arch' and 'config' (see model_spec)")
    return _make(spec["arch"], dict(spec["config"]))


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts: ``parameters`` (total), ``trainable``, and ``params.<child>`` per top-level submodule,
    plus ``arch``/``image_size``/``in_channels``/``prediction`` for built-in models."""
    out: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if config is not None:
        try:
            out["arch"] = model_spec(model)["arch"]
        except ValueError:
            out["arch"] = type(model).__name__
        for field in ("image_size", "in_channels", "num_classes", "prediction"):
            if hasattr(config, field):
                out[field] = getattr(config, field)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, child in model.named_children():
        out[f"params.{name}"] = sum(p.numel() for p in child.parameters())
    return out
