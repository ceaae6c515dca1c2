"""Built-in denoisers: a DiT and an ADM-style UNet, each ``model(x_t, t, y=None) -> output like x_t``.

Named sizes come from ``build_model(name, **overrides)`` (``MODEL_NAMES``: dit-tiny, unet-tiny, dit-s, unet-s).
"""

from .dit import DiT, DiTConfig
from .embedding import timestep_embedding
from .registry import MODEL_NAMES, build_model, model_from_spec, model_spec, model_summary
from .unet import UNet, UNetConfig

__all__ = [
    "DiT",
    "DiTConfig",
    "UNet",
    "UNetConfig",
    "MODEL_NAMES",
    "build_model",
    "model_spec",
    "model_from_spec",
    "model_summary",
    "timestep_embedding",
]
