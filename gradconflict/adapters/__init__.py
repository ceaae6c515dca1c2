"""Adapters that turn third-party diffusion models into ``model(x_t, t, y=None) -> tensor shaped like x_t``.

* ``DiffusersModel`` / ``load_diffusers``: a diffusers UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel or
  Transformer2DModel with its scheduler, loaded from a local folder (``--model diffusers:PATH``).

* ``conditioning``: per-sample conditioning tensors (text embeddings, attention masks) carried by data files
  and passed to a model by name, and the null conditioning of ``--null-conditioning``.

Optional dependencies are imported only when an adapter is used.
"""

from .diffusers import SUPPORTED_CLASSES, DiffusersConfig, DiffusersModel, load_diffusers

__all__ = ["SUPPORTED_CLASSES", "DiffusersConfig", "DiffusersModel", "load_diffusers"]
