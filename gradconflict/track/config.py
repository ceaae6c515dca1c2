"""Configuration of the over-training Pareto analysis (a plain dataclass)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

__all__ = ["TrackConfig", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrackConfig:
    """What is computed at every tracked checkpoint.

    * ``bins`` timestep bins (``binning`` "uniform" or "log_snr"), ``per_task`` samples per bin per batch,
      ``resamples`` independent batches per checkpoint (the sampling-noise control).
    * ``lam``: the Pareto regularizer *relative to the Gram's scale*: the problem solved is
      ``min_w w^T G w + lam_abs ||w||^2`` with ``lam_abs = lam * trace(G) / K`` (the mean squared task-gradient
      norm), so one value means the same at every checkpoint and for every model.
    * ``solvers``: any of "auto", "frank_wolfe", "ugd", "cvxpy"; ``ugd_steps``/``ugd_lr``/``fw_max_iter``
      their budgets (UGD starts from uniform weights each time, Adam on the softmax logits). UGD's default of
      10,000 steps reaches its accuracy (L1 distance about 4e-5 to the exact optimum on the quick preset's Grams);
      at 1,000 it stopped 1.5% away, which is larger than what C2 compares it with.
    * ``strategies``: ``weighting.by_name`` specs scored against the optimum.
    * ``loss_space``: units of each task's loss ("x0", as in the paper's analysis).
    * ``edges``: explicit K + 1 timestep edges (e.g. clustered bins, ``TimestepBins.from_gram`` /
      ``gradconflict bins``); when set they replace ``binning`` and ``bins`` must be K.
    * ``autocast``: "none" (default), "bf16" or "fp16": the model runs under ``torch.autocast`` in that dtype
      when its Grams are computed (``task_gram(autocast_dtype=...)``; e.g. bf16 on a GPU).
    """

    bins: int = 10
    binning: str = "uniform"
    per_task: int = 8
    resamples: int = 3
    lam: float = 0.1
    solvers: tuple[str, ...] = ("auto", "frank_wolfe", "ugd", "cvxpy")
    strategies: tuple[str, ...] = ("constant", "snr", "max_snr:1", "min_snr:5")
    ugd_steps: int = 10000
    ugd_lr: float = 0.05
    fw_max_iter: int = 2000
    loss_space: str = "x0"
    seed: int = 0
    autocast: str = "none"
    edges: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        self.solvers = tuple(self.solvers)
        self.strategies = tuple(self.strategies)
        if self.bins < 1 or self.per_task < 1 or self.resamples < 1:
            raise ValueError("bins, per_task and resamples must be >= 1")
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0 (relative to trace(G)/K), got {self.lam}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_DTYPES)}, got {self.autocast!r}")
        if self.edges is not None:
            self.edges = tuple(int(e) for e in self.edges)
            if len(self.edges) - 1 != self.bins:
                raise ValueError(f"edges hold {len(self.edges) - 1} bins but bins = {self.bins}; pass bins=len(edges) - 1")
        if self.binning not in ("uniform", "log_snr"):
            raise ValueError(f"binning must be 'uniform' or 'log_snr', got {self.binning!r}")
        from ..pareto import METHODS

        unknown = [s for s in self.solvers if s not in METHODS]
        if unknown:
            raise ValueError(f"unknown solver(s) {unknown}; use any of {list(METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["solvers"], out["strategies"] = list(self.solvers), list(self.strategies)
        if self.autocast == "none":  # added later: left out at its default, so folders recorded before still match
            del out["autocast"]
        if self.edges is None:  # likewise: explicit edges are recorded only when given
            del out["edges"]
        else:
            out["edges"] = list(self.edges)
        return out

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The ``torch.autocast`` dtype of ``autocast`` (None for "none")."""
        return AUTOCAST_DTYPES[self.autocast]
