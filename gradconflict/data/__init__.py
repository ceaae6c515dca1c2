"""Image data for training: embedded datasets (mnist, digits, synthetic) and files (.npy, .npz, image folders).

``load_dataset(name_or_path, image_size=16)`` returns an ``ImageDataset``: ``.images`` float32
``(N, C, H, W)`` in ``[-1, 1]`` (float data outside [-1, 1], e.g. latents, are kept as stored), ``.labels`` long ``(N,)`` (``-1`` = unlabelled), ``.num_classes``, ``.name``.
Provenance of the embedded data is in ``gradconflict.data.embedded``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .embedded import EMBEDDED_NAMES, MissingDependencyError, load_digits, load_mnist, load_synthetic
from .files import ImageDataset, as_dataset, images_to_tensor, load_folder, load_npy, load_npz

__all__ = [
    "DATASET_NAMES",
    "ImageDataset",
    "MissingDependencyError",
    "as_dataset",
    "images_to_tensor",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = EMBEDDED_NAMES


def load_dataset(name_or_path: str | Path, *, image_size: Optional[int] = 16, limit: Optional[int] = None, seed: int = 0,
                 scale: str = "auto") -> ImageDataset:
    """A dataset by name (``DATASET_NAMES``) or from a path (``.npy``, ``.npz`` or a folder of images).

    ``image_size``: output height = width in pixels (None keeps the native size); ``limit``: keep the first
    ``limit`` images (MNIST is interleaved by class, so any limit is balanced); ``seed``: only for "synthetic".
    ``scale`` (``.npy``/``.npz`` only): ``"auto"`` maps images to [-1, 1] (uint8: ``x / 127.5 - 1``, floats in
    [0, 1]: ``2 x - 1``, floats in [-1, 1]: unchanged) and keeps float data outside [-1, 1], such as latents,
    exactly as stored; ``"none"`` never changes values; ``"minmax"`` rescales to [-1, 1].
    """
    text = str(name_or_path)
    key = text.strip().lower()
    if key == "mnist":
        return load_mnist(image_size=image_size, limit=limit)
    if key == "digits":
        return load_digits(image_size=image_size, limit=limit)
    if key == "synthetic":
        return load_synthetic(image_size=image_size, limit=limit, seed=seed)
    path = Path(text).expanduser()
    if not path.exists():
        looks_like_path = isinstance(name_or_path, Path) or any(ch in text for ch in "/\\") or path.suffix != ""
        if looks_like_path:
            raise FileNotFoundError(
                f"no such file or folder: {text}; pass a .npy/.npz file, a folder of images or one of {list(DATASET_NAMES)}"
            )
        raise ValueError(f"unknown dataset {text!r}; use one of {list(DATASET_NAMES)} or a path to a .npy/.npz file or an image folder")
    if path.is_dir():
        return load_folder(path, image_size=image_size, limit=limit)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return load_npy(path, image_size=image_size, limit=limit, scale=scale)
    if suffix == ".npz":
        return load_npz(path, image_size=image_size, limit=limit, scale=scale)
    raise ValueError(f"cannot load {path}: unsupported file type {suffix or '(none)'!r}; use .npy, .npz or a folder of images")
