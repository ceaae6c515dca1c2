"""The small MNIST classifier whose penultimate layer is the feature space of FD-MNIST.

Network (images ``(N, 1, S, S)`` in [-1, 1]): conv3x3(1->16) ReLU maxpool2, conv3x3(16->32) ReLU maxpool2,
flatten, linear(->D) = the ``D`` features, ReLU, linear(D->10) = logits. Trained with AdamW on the cross
entropy of the embedded MNIST *training* split (``MNIST_TRAIN``: the first 4000 of the 5000 images, 400 per
digit); its accuracy is measured on the held-out split (``MNIST_HELD_OUT``: the last 1000, 100 per digit), which
it never sees. Training runs on the CPU with a seeded generator and leaves the global RNG untouched.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = ["ClassifierConfig", "MnistClassifier", "MNIST_TRAIN", "MNIST_HELD_OUT", "mnist_split", "train_classifier"]

MNIST_TRAIN = slice(0, 4000)
MNIST_HELD_OUT = slice(4000, 5000)


@dataclass(frozen=True)
class ClassifierConfig:
    """Settings of the FD-MNIST classifier; all of them (and the training data) key its cache file."""

    image_size: int = 16
    features: int = 64
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.image_size) < 4:
            raise ValueError(f"image_size must be >= 4 pixels (two 2x2 poolings), got {self.image_size}")
        for name in ("features", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MnistClassifier(nn.Module):
    """Two conv blocks and a ``features``-wide hidden layer; ``features(x)`` is the penultimate activation."""

    def __init__(self, image_size: int = 16, features: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        side = self.image_size // 4
        self.hidden = nn.Linear(32 * side * side, features)
        self.head = nn.Linear(features, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, D)`` of images ``(N, 1, S, S)``: the hidden layer's pre-activations (before
        its ReLU, so no feature is constantly 0 and the covariance has full rank)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.hidden(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)``."""
        return self.head(F.relu(self.features(x)))


def mnist_split(split: str, image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of the embedded MNIST ``"train"`` (first 4000) or ``"held_out"`` (last 1000) split,
    images float32 ``(N, 1, S, S)`` in [-1, 1]; both splits hold every digit equally often."""
    from ..data import load_dataset

    parts = {"train": MNIST_TRAIN, "held_out": MNIST_HELD_OUT}
    if split not in parts:
        raise ValueError(f"unknown MNIST split {split!r}; use 'train' or 'held_out'")
    data = load_dataset("mnist", image_size=image_size)
    return data.images[parts[split]], data.labels[parts[split]]


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``images`` whose arg-max logit is the label."""
    model.eval()
    hits = sum(int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
               for i in range(0, len(images), batch_size))
    return hits / len(images)


def train_classifier(config: ClassifierConfig, images: torch.Tensor, labels: torch.Tensor, *,
                     progress: bool = True) -> MnistClassifier:
    """Train a ``MnistClassifier`` on ``(images, labels)`` (CPU, float32): AdamW, ``config.epochs`` passes in a
    seeded random order; initialisation seeded too (the global RNG state is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MnistClassifier(config.image_size, config.features)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(images)
    model.train()
    with tqdm(total=config.epochs * ((n + config.batch_size - 1) // config.batch_size), desc="FD-MNIST classifier",
              disable=not progress, leave=False) as bar:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator)
            for i in range(0, n, config.batch_size):
                idx = order[i : i + config.batch_size]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update(1)
    model.eval()
    return model
