"""The Python counterparts of the CLI's ``--model SPEC [--checkpoint FILE]`` and ``--data NAME|PATH`` flags.

``gradconflict.load_model`` and ``gradconflict.load_data`` (loaded on first use, see ``gradconflict.__init__``) are
thin documented front doors to :func:`gradconflict.spec.load_model` and
:func:`gradconflict.data.load_dataset`: same arguments, same results, so a script gets exactly the model and
images that ``gradconflict gram --model SPEC --data NAME`` analyses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # torch and the data loaders are imported only when the functions are called
    import torch

    from .data import ImageDataset
    from .spec import LoadedModel

__all__ = ["load_model", "load_data"]


def load_model(spec: str, checkpoint: Optional[str | Path] = None, *, device: "str | torch.device" = "cpu",
               verbose: bool = True, weights: Optional[str] = None, seed: Optional[int] = None) -> "LoadedModel":
    """A model with its noise schedule and prediction type, from the same ``spec`` the CLI's ``--model`` takes.

    ``spec``: a built-in name (``gradconflict.models.MODEL_NAMES``, e.g. ``"dit-tiny"``: fixed initial weights,
    linear schedule with T = 1000), a ``gradconflict train`` run folder, ``"path/file.py:function"`` /
    ``"module:function"`` (returning ``(model, schedule, prediction)`` or a model), or ``"diffusers:PATH"``.
    ``checkpoint`` (``--checkpoint``): a ``.pt`` / ``.safetensors`` state dict or run folder loaded into it.
    ``weights`` (``--weights``): ``"ema"`` or ``"raw"`` weights of a file holding both; None (default): EMA when
    the file has them. ``seed``: torch's seed while a user's build function runs (None: 0, as the CLI).
    ``verbose``: print one-line notes (e.g. a checkpoint's config overriding a built-in's defaults) on stderr.

    Returns a :class:`gradconflict.spec.LoadedModel` with ``.model`` (``nn.Module`` on ``device``),
    ``.schedule`` (:class:`~gradconflict.NoiseSchedule`), ``.prediction`` ("eps", "x0" or "v"), ``.source``
    and ``.weights`` (which weights were used: "ema", "raw", "as saved" or "init").

    Example::

        import gradconflict as gc
        loaded = gc.load_model("dit-tiny")                       # built-in, seeded initial weights
        trained = gc.load_model("runs/dit", weights="raw")       # a `gradconflict train` run, raw weights
        mine = gc.load_model("unet-small", checkpoint="ckpt.pt")
        loaded.model, loaded.schedule.T, loaded.prediction       # (DiT, 1000, 'eps')
    """
    from .spec import load_model as _load_model

    return _load_model(spec, checkpoint, device=device, verbose=verbose, weights=weights, seed=seed)


def load_data(name_or_path: str | Path, *, image_size: Optional[int] = 16, limit: Optional[int] = None, seed: int = 0,
              scale: str = "auto") -> "ImageDataset":
    """Images (and labels / conditioning) from the same ``name_or_path`` the CLI's ``--data`` takes.

    ``name_or_path``: ``"mnist"``, ``"digits"``, ``"synthetic"``, or a ``.npy`` / ``.npz`` file or image folder.
    ``image_size``: output height = width in pixels (None keeps the native size); ``limit``: keep the first
    ``limit`` images; ``seed``: only for "synthetic"; ``scale`` (``--scale``, ``.npy``/``.npz`` only):
    ``"auto"`` maps images to [-1, 1] and keeps latents as stored, ``"none"`` never changes values, ``"minmax"``
    rescales to [-1, 1].

    Returns a :class:`gradconflict.data.ImageDataset`: ``.images`` float32 ``(N, C, H, W)``, ``.labels`` long
    ``(N,)`` (-1 = unlabelled), ``.num_classes``, ``.name`` and ``.conditioning`` (per-sample tensors, or empty).

    Example::

        import gradconflict as gc
        data = gc.load_data("digits", image_size=16, limit=256)   # sklearn's 8x8 digits, upsampled
        data.images.shape                                        # torch.Size([256, 1, 16, 16])
        latents = gc.load_data("latents.npz", image_size=None)   # kept as stored (scale="auto")
    """
    from .data import load_dataset

    return load_dataset(name_or_path, image_size=image_size, limit=limit, seed=seed, scale=scale)
