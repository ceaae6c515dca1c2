"""Held-out metrics for diffusion training runs: tensors in, numbers and DataFrames out.

* ``frechet_distance`` / ``gaussian_stats``: the Fréchet distance between two Gaussians (float64, no scipy).
* ``fd_mnist`` / ``fd_mnist_features``: FD-MNIST, the Fréchet distance in the features of a small MNIST
  classifier trained once and cached (not Inception FID; see docs/metrics.md), with a bootstrap standard error.
* ``held_out_losses``: unweighted loss per timestep bin in x0 units and in the model's own units.

The only I/O is the cached classifier of ``fd_mnist_features``.
"""

from .classifier import ClassifierConfig, mnist_split
from .fd_mnist import FDResult, FeatureExtractor, default_cache_dir, fd_mnist, fd_mnist_features
from .frechet import frechet_distance, gaussian_stats
from .losses import LOSS_COLUMNS, held_out_losses

__all__ = [
    "ClassifierConfig",
    "FDResult",
    "FeatureExtractor",
    "LOSS_COLUMNS",
    "default_cache_dir",
    "fd_mnist",
    "fd_mnist_features",
    "frechet_distance",
    "gaussian_stats",
    "held_out_losses",
    "mnist_split",
]
