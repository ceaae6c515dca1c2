"""Adapters that turn models into ``model(x_t, t, y=None) -> tensor shaped like x_t`` with their schedule and prediction
(a ``LoadedModel``, ``loaded.py``); ``gradconflict.spec.load_model`` picks one by the model spec.

* ``builtin``: the built-in names, and training checkpoints given with them.
* ``user_code``: ``path/file.py:function`` and ``module:function``, errors in that code reported in one line.
* ``inputs``: what a model takes (input size, channels, class labels) and data read at that size.

* ``DiffusersModel`` / ``load_diffusers``: a diffusers UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel or
  Transformer2DModel with its scheduler, loaded from a local folder (``--model diffusers:PATH``).

* ``conditioning``: per-sample conditioning tensors (text embeddings, attention masks) carried by data files
  and passed to a model by name, and the null conditioning of ``--null-conditioning``.

Optional dependencies are imported only when an adapter is used.
"""

from .diffusers import SUPPORTED_CLASSES, DiffusersConfig, DiffusersModel, load_diffusers
from .loaded import LoadedModel

__all__ = ["SUPPORTED_CLASSES", "DiffusersConfig", "DiffusersModel", "LoadedModel", "load_diffusers"]
