"""The result of a per-task gradient computation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pandas as pd
import torch

__all__ = ["TaskGradients"]


@dataclass(frozen=True)
class TaskGradients:
    """Per-task gradients of a diffusion model, summarised by their Gram matrix.

    ``gram[k, l] = <g_k, g_l>`` with ``g_k = grad_theta L_k`` and ``L_k`` the mean per-sample loss of task k
    (loss-space units squared per parameter unit; float64, K x K, on the CPU). ``losses[k] = L_k``,
    ``counts[k]`` its number of samples, ``norms[k] = ||g_k||``.
    """

    gram: torch.Tensor
    losses: torch.Tensor
    counts: torch.Tensor
    method: str
    seconds: float
    labels: Optional[list[str]] = None
    gradients: Optional[torch.Tensor] = None  # K x P, only when asked
    sketch: Optional[torch.Tensor] = None  # K x d, only with a sketch
    info: dict = field(default_factory=dict)

    @property
    def K(self) -> int:
        return int(self.gram.shape[0])

    @property
    def norms(self) -> torch.Tensor:
        """Gradient norms ``||g_k|| = sqrt(G_kk)``."""
        return torch.sqrt(torch.clamp(torch.diagonal(self.gram), min=0.0))

    def cosine(self) -> torch.Tensor:
        """Cosine similarity ``G_kl / (||g_k|| ||g_l||)``; 0 where a gradient is exactly zero
        (``gradconflict.conflict.cosine``)."""
        from ..conflict import cosine

        return torch.from_numpy(cosine(self.gram.numpy()))

    def task_labels(self) -> list[str]:
        """The task names: the bins' t ranges (e.g. "0-99") when a TimestepBins was given, else 0..K-1."""
        return self.labels if self.labels is not None else [str(k) for k in range(self.K)]

    def gram_frame(self) -> pd.DataFrame:
        """The Gram as a labelled K x K DataFrame."""
        lab = self.task_labels()
        return pd.DataFrame(self.gram.numpy(), index=pd.Index(lab, name="bin"), columns=lab)

    def cosine_frame(self) -> pd.DataFrame:
        """The cosine matrix as a labelled K x K DataFrame (dimensionless, in [-1, 1])."""
        lab = self.task_labels()
        return pd.DataFrame(self.cosine().numpy(), index=pd.Index(lab, name="bin"), columns=lab)

    def losses_frame(self) -> pd.DataFrame:
        """Tidy per-task table: task, label, loss, count, grad_norm."""
        return pd.DataFrame(
            {
                "task": np.arange(self.K),
                "label": self.task_labels(),
                "loss": self.losses.numpy(),
                "count": self.counts.numpy(),
                "grad_norm": self.norms.numpy(),
            }
        )
