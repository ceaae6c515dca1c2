"""FD-MNIST: the Fréchet distance between generated and held-out MNIST images in a small classifier's features.

This is *not* Inception FID: the features are the ``D = 64`` penultimate activations of the small conv net of
``metrics.classifier``, trained once (seeded, a few seconds on a CPU) on the embedded MNIST training split at the
images' own resolution. Values are in squared feature units and comparable only with other FD-MNIST values of the
same classifier (same settings, hence the same cache key) and the same reference set, never with published FIDs.

The classifier is cached as ``fd_mnist-<key>.pt`` in ``cache_dir`` (default: ``$GRADCONFLICT_CACHE`` or
``~/.cache/gradconflict``); ``key`` hashes the classifier settings, the file format and the training images, so a
change of any of them trains a new one. The file is written atomically; a second call loads it and gives
bit-identical features.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .._io import atomic_write, fingerprint
from .classifier import ClassifierConfig, MnistClassifier, accuracy, mnist_split, train_classifier
from .frechet import frechet_distance, gaussian_stats

__all__ = ["FDResult", "FeatureExtractor", "fd_mnist", "fd_mnist_features", "default_cache_dir", "CACHE_ENV"]

CACHE_ENV = "GRADCONFLICT_CACHE"
_FORMAT = 1  # bump when the network or its training code changes: old cache files are then ignored


def default_cache_dir() -> Path:
    """``$GRADCONFLICT_CACHE`` if set, else ``~/.cache/gradconflict``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradconflict"


class FeatureExtractor:
    """Maps images ``(N, 1, S, S)`` in [-1, 1] to penultimate classifier features ``(N, D)`` (float32, CPU), in
    eval mode without gradients. Attributes: ``image_size`` (S), ``dim`` (D), ``accuracy`` (held-out accuracy of
    the classifier), ``config``, ``key`` and ``path`` (its cache file)."""

    def __init__(self, model: MnistClassifier, config: ClassifierConfig, accuracy: float, key: str, path: Optional[Path],
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.config, self.accuracy, self.key, self.path = config, float(accuracy), key, path
        self.image_size, self.dim = config.image_size, config.features

    def check_images(self, images: Any, what: str = "images") -> torch.Tensor:
        """``images`` as a float32 tensor ``(N, 1, S, S)``; a clear ValueError for a wrong shape or NaN/Inf."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        s = self.image_size
        if x.ndim == 3 and tuple(x.shape[1:]) == (s, s):
            raise ValueError(f"{what} have shape {tuple(x.shape)} without a channel axis; pass (N, 1, {s}, {s}), e.g. x[:, None]")
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"{what} must have shape (N, 1, {s}, {s}) (grayscale, in [-1, 1]), got {tuple(x.shape)}; "
                             f"resize with gradconflict.data.images_to_tensor(x, {s}) or use an extractor for that size")
        if not x.is_floating_point():
            raise ValueError(f"{what} have dtype {x.dtype}; pass floats in [-1, 1] (uint8: x / 127.5 - 1)")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise ValueError(f"{what} hold NaN or Inf values ({bad} of {x.shape[0]} images); the sampler diverged, "
                             "fix it (or drop those images) before measuring")
        return x.float()

    @torch.no_grad()
    def __call__(self, images: Any, batch_size: int = 500) -> torch.Tensor:
        x = self.check_images(images)
        parts = [self.model.features(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, x.shape[0], batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    def __repr__(self) -> str:
        return f"FeatureExtractor(image_size={self.image_size}, dim={self.dim}, accuracy={self.accuracy:.3f}, key={self.key!r})"


def _cache_key(config: ClassifierConfig, data_id: str) -> str:
    text = json.dumps({"format": _FORMAT, "config": config.to_dict(), "data": data_id}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load(path: Path, config: ClassifierConfig) -> Optional[tuple[MnistClassifier, float]]:
    """The cached classifier at ``path``, or None (with a warning) if it is unreadable or holds other settings."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("format") != _FORMAT or blob.get("config") != config.to_dict():
            raise ValueError("it holds a classifier with other settings")
        model = MnistClassifier(config.image_size, config.features)
        model.load_state_dict(blob["state_dict"])
        return model.eval(), float(blob["accuracy"])
    except Exception as exc:  # noqa: BLE001 - any unreadable cache file is replaced by a fresh one
        warnings.warn(f"ignoring the FD-MNIST cache file {path} ({exc}); training the classifier again", stacklevel=3)
        return None


def fd_mnist_features(image_size: int = 16, *, cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                      config: Optional[ClassifierConfig] = None, progress: bool = True) -> FeatureExtractor:
    """The FD-MNIST feature extractor for ``image_size`` x ``image_size`` images: loaded from ``cache_dir`` or,
    the first time, trained on the embedded MNIST training split (CPU, seeded) and saved there atomically.

    ``config``: classifier settings (default ``ClassifierConfig(image_size)``); ``device``: where features are
    computed (training is always on the CPU, so the cached weights do not depend on the device).
    """
    config = config or ClassifierConfig(image_size=int(image_size))
    if config.image_size != int(image_size):
        raise ValueError(f"config.image_size = {config.image_size} differs from image_size = {image_size}; make them equal")
    images, labels = mnist_split("train", config.image_size)
    key = _cache_key(config, fingerprint([images, labels]))
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = folder / f"fd_mnist-{key}.pt"
    loaded = _load(path, config) if path.is_file() else None
    if loaded is None:
        model = train_classifier(config, images, labels, progress=progress)
        held_images, held_labels = mnist_split("held_out", config.image_size)
        acc = accuracy(model, held_images, held_labels)
        blob = {"format": _FORMAT, "config": config.to_dict(), "accuracy": acc,
                "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        atomic_write(path, lambda p: torch.save(blob, p))
        loaded = model, acc
    model, acc = loaded
    return FeatureExtractor(model, config, acc, key, path, device)


@dataclass(frozen=True)
class FDResult:
    """FD-MNIST of a set of samples: ``value`` (full sets), ``stderr`` (bootstrap standard error over ``draws``
    resamples of the samples), ``n_samples``, ``n_reference``."""

    value: float
    stderr: float
    draws: int
    n_samples: int
    n_reference: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fd_mnist(samples: Any, reference: Any, *, extractor: Optional[FeatureExtractor] = None, draws: int = 5,
             generator: Optional[torch.Generator] = None) -> FDResult:
    """FD-MNIST between ``samples`` and ``reference`` images ``(N, 1, S, S)`` in [-1, 1].

    ``value = frechet_distance(stats(f(samples)), stats(f(reference)))`` on the full sets (f: the extractor's
    features, stats: mean and covariance). ``stderr``: the standard deviation (ddof 1) of the FD over ``draws``
    bootstrap resamples of the samples (n drawn with replacement, reference fixed). Bootstrap rather than
    disjoint subsets because it measures the spread at the actual sample size n with no ``1/n`` scaling
    assumption and needs only n >= the minimum, not ``draws`` times it; the reference stays fixed because
    comparisons along a training run all use the same reference. ``generator`` (default: seeded with 0) draws
    the resamples. Both sets need at least ``2 D`` images (D = 64 features) for a usable covariance.
    """
    if extractor is None:
        size = samples.shape[-1] if hasattr(samples, "shape") and len(samples.shape) == 4 else 16
        extractor = fd_mnist_features(int(size))
    if int(draws) != draws or draws < 2:
        raise ValueError(f"draws must be an integer >= 2 to estimate a standard error, got {draws!r}")
    minimum = 2 * extractor.dim
    f_samples = extractor(extractor.check_images(samples, "samples")).double()
    f_reference = extractor(extractor.check_images(reference, "reference")).double()
    for name, feats in (("samples", f_samples), ("reference", f_reference)):
        if feats.shape[0] < minimum:
            raise ValueError(f"FD-MNIST needs at least {minimum} {name} (2 x {extractor.dim} features) for a usable "
                             f"covariance, got {feats.shape[0]}; pass more images")
    mu_r, cov_r = gaussian_stats(f_reference)
    value = frechet_distance(*gaussian_stats(f_samples), mu_r, cov_r)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    n = f_samples.shape[0]
    boot = []
    for _ in range(int(draws)):
        idx = torch.randint(n, (n,), generator=generator)
        boot.append(frechet_distance(*gaussian_stats(f_samples[idx]), mu_r, cov_r))
    return FDResult(value=value, stderr=float(np.std(boot, ddof=1)), draws=int(draws), n_samples=n,
                    n_reference=int(f_reference.shape[0]))
