"""Timestep bins: the tasks of diffusion training seen as multi-task learning.

Bin k holds the integer timesteps ``edges[k] <= t < edges[k+1]``; the K + 1 edges are strictly increasing
inside ``[0, T]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ._arrays import as_index_numpy, like_input
from .schedule import NoiseSchedule

__all__ = ["TimestepBins"]


@dataclass(frozen=True, eq=False)
class TimestepBins:
    """K contiguous bins of the timesteps ``0..T-1``; ``edges`` has K + 1 strictly increasing entries in [0, T]."""

    edges: np.ndarray
    T: int

    def __post_init__(self) -> None:
        e = np.asarray(self.edges)
        if e.ndim != 1 or e.size < 2:
            raise ValueError(f"edges must be a 1-D sequence of K + 1 >= 2 bin boundaries, got shape {e.shape}")
        if e.dtype.kind == "f" and not np.all(e == np.round(e)):
            raise ValueError("edges must be integer timesteps")
        e = e.astype(np.int64)
        T = int(self.T)
        if T < 1:
            raise ValueError(f"T must be a positive number of timesteps, got {T}")
        if e[0] < 0 or e[-1] > T:
            raise ValueError(f"edges must lie in [0, T] = [0, {T}], got {e[0]} .. {e[-1]}")
        d = np.diff(e)
        if np.any(d < 0):
            k = int(np.argmax(d < 0))
            raise ValueError(f"edges must be increasing; edge {k + 1} ({e[k + 1]}) < edge {k} ({e[k]}): bins would overlap")
        if np.any(d == 0):
            k = int(np.argmax(d == 0))
            raise ValueError(f"bin {k} is empty (edges {e[k]} and {e[k + 1]} are equal); remove the duplicate edge or use fewer bins")
        e.setflags(write=False)
        object.__setattr__(self, "edges", e)
        object.__setattr__(self, "T", T)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, T: int, K: int) -> "TimestepBins":
        """K bins of (nearly) equal width covering 0..T-1."""
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}")
        if K > T:
            raise ValueError(f"cannot split T = {T} timesteps into K = {K} non-empty bins; use K <= T")
        edges = np.round(np.linspace(0, T, K + 1)).astype(np.int64)
        return cls(edges, T)

    @classmethod
    def from_edges(cls, edges: Sequence[int], T: int) -> "TimestepBins":
        """Bins from explicit boundaries ``edges[0] < ... < edges[K]`` in [0, T]."""
        return cls(np.asarray(edges), T)

    @classmethod
    def from_gram(cls, G_fine: Any, fine_bins: "TimestepBins", K: int, *, affinity: str = "cosine",
                  min_width: int = 1) -> "TimestepBins":
        """K contiguous bins clustered from the M x M Gram ``G_fine`` of the M bins ``fine_bins``: the merges of
        adjacent fine bins that maximise ``sum_k (1/|I_k|) sum_{i,j in I_k} A_ij`` (diagonal included), with ``A``
        the cosines ("cosine") or the Gram itself ("gram"), i.e. k-means of the (unit) task gradients restricted
        to contiguous intervals; each bin holds at least ``min_width`` fine bins. Exact DP, O(K M^2); see
        ``gradconflict.clustering``. The edges are edges of ``fine_bins``."""
        from .clustering import affinity_matrix, cluster_intervals

        A = affinity_matrix(G_fine, affinity)  # type: ignore[arg-type]
        if A.shape[0] != fine_bins.K:
            raise ValueError(f"the fine Gram is {A.shape[0]} x {A.shape[0]} but fine_bins has M = {fine_bins.K} "
                             "bins; pass the bins the Gram was computed with")
        cuts, _ = cluster_intervals(A, K, min_width)
        return cls(fine_bins.edges[cuts], fine_bins.T)

    @classmethod
    def from_csv(cls, path: Any, T: Optional[int] = None) -> "TimestepBins":
        """Bins read from a CSV with one row per bin and columns ``t_low``, ``t_high`` (inclusive), as
        ``gradconflict bins`` writes (``bins.csv``); contiguous from t = 0, ending at ``T - 1`` when T is given."""
        from .clustering import read_bins_csv

        edges, T = read_bins_csv(path, T)
        return cls(edges, T)

    @classmethod
    def log_snr_uniform(cls, schedule: NoiseSchedule, K: int) -> "TimestepBins":
        """K bins covering 0..T-1 whose log-SNR ranges are as equally wide as the discrete schedule allows.

        With ``lam_t`` the log-SNR and ``L_k = lam_0 - k (lam_0 - lam_last) / K`` (``lam_last`` the last finite
        value), the ideal edge ``k`` is the first t with ``lam_t <= L_k``. Where several ideal edges fall on one
        timestep (a step of ``lam_t`` wider than ``(lam_0 - lam_last) / K``, e.g. the cosine schedule's jump
        from -12.9 at t = 998 to -19.8 at t = 999), a forward pass ``e_k = max(e_k, e_{k-1} + 1)`` and a
        backward pass ``e_k = min(e_k, e_{k+1} - 1)`` move them apart so that every bin keeps at least one
        timestep; edges that are already strictly increasing are left unchanged. Raises only if K > T.
        """
        T = schedule.T
        if K < 1 or K > T:
            raise ValueError(f"K must lie in [1, T = {T}] (every bin needs a timestep), got {K}; use fewer bins")
        lam = np.asarray(schedule.log_snr(np.arange(T)))
        finite = lam[np.isfinite(lam)]
        levels = np.linspace(finite[0], finite[-1], K + 1)[1:-1]
        # first timestep whose log-SNR has fallen below each interior level (log-SNR decreases with t)
        inner = np.searchsorted(-lam, -levels, side="left")
        edges = np.concatenate([[0], inner, [T]]).astype(np.int64)
        for k in range(1, K):  # forward: strictly increasing
            edges[k] = max(edges[k], edges[k - 1] + 1)
        for k in range(K - 1, 0, -1):  # backward: room for the bins after k (edges[K] = T)
            edges[k] = min(edges[k], edges[k + 1] - 1)
        return cls(edges, T)

    # ------------------------------------------------------------------ properties
    @property
    def K(self) -> int:
        """Number of bins (tasks)."""
        return int(self.edges.size - 1)

    def __len__(self) -> int:
        return self.K

    @property
    def lows(self) -> np.ndarray:
        """First timestep of each bin."""
        return self.edges[:-1]

    @property
    def highs(self) -> np.ndarray:
        """One past the last timestep of each bin."""
        return self.edges[1:]

    @property
    def widths(self) -> np.ndarray:
        """Number of timesteps in each bin."""
        return np.diff(self.edges)

    @property
    def centers(self) -> np.ndarray:
        """Mid-point of each bin in timesteps (float)."""
        return (self.edges[:-1] + self.edges[1:] - 1) / 2.0

    @property
    def labels(self) -> list[str]:
        """Readable labels, ``"lo-hi"`` with both ends inclusive (e.g. ``"0-99"``)."""
        return [f"{lo}-{hi - 1}" for lo, hi in zip(self.lows, self.highs)]

    # ------------------------------------------------------------------ mapping and sampling
    def task_of(self, t: Any) -> Any:
        """Bin index of each timestep (tensor in, long tensor out; array in, int64 array out)."""
        idx = as_index_numpy(t, self.T)
        task = np.searchsorted(self.edges, idx, side="right") - 1
        outside = (idx < self.edges[0]) | (idx >= self.edges[-1])
        if np.any(outside):
            raise ValueError(f"timesteps outside the binned range [{self.edges[0]}, {self.edges[-1]}) have no task")
        if isinstance(t, torch.Tensor):
            return torch.from_numpy(np.array(task, dtype=np.int64)).reshape(np.shape(task)).to(t.device)
        return like_input(task, t) if np.ndim(t) else int(task)

    def sample(
        self,
        n_per_task: Union[int, Sequence[int]],
        generator: Optional[torch.Generator] = None,
        device: Union[str, torch.device, None] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n_per_task`` timesteps uniformly inside each bin.

        ``n_per_task``: an int (the same count for every bin) or a sequence of K non-negative ints (one per
        bin); floats must be whole numbers (``2.0``, not ``2.7``).

        Returns ``(t, task)``, two long tensors of length ``sum(n_per_task)``, grouped by task in order 0..K-1.
        The draw is made on the CPU with ``generator``, so a seed gives the same timesteps on every device.
        """
        counts = self._counts(n_per_task)
        task = torch.repeat_interleave(torch.arange(self.K), torch.from_numpy(counts.copy()))
        lo = torch.from_numpy(self.lows.copy())[task]
        width = torch.from_numpy(self.widths.copy())[task]
        u = torch.rand(task.numel(), generator=generator, dtype=torch.float64)
        t = lo + torch.minimum((u * width).long(), width - 1)
        return t.to(device), task.to(device)

    def _counts(self, n_per_task: Any) -> np.ndarray:
        """``n_per_task`` as K non-negative int64 counts (an int is used for every bin)."""
        raw = np.asarray(n_per_task.detach().cpu() if isinstance(n_per_task, torch.Tensor) else n_per_task)
        if raw.ndim > 1 or (raw.ndim == 1 and raw.shape[0] != self.K):
            raise ValueError(f"n_per_task must be an int or a sequence of K = {self.K} ints (one per bin), "
                             f"got shape {raw.shape}; pass one count per bin")
        if raw.dtype == np.bool_ or raw.dtype.kind not in "iuf" or (
            raw.dtype.kind == "f" and not np.all(np.isfinite(raw) & (raw == np.round(raw)))
        ):
            raise ValueError(f"n_per_task must hold whole numbers of samples, got {n_per_task!r}; pass ints such as 3")
        if np.any(raw < 0):
            raise ValueError(f"n_per_task must be >= 0 samples per bin, got {n_per_task!r}")
        return np.broadcast_to(raw.astype(np.int64), (self.K,)).copy()

    # ------------------------------------------------------------------ strategies
    def strategy_weights(self, strategy: Any, schedule: NoiseSchedule) -> np.ndarray:
        """Weight a strategy puts on each bin, on the simplex: ``W_k = sum_{t in bin k} w(SNR_t) / sum_t w(SNR_t)``,
        with ``w`` the strategy's x0-unit weight (``strategy.weight(snr, "x0")``).

        ``strategy``: a ``gradconflict.weighting`` strategy, a name/spec such as ``"min_snr:5"``
        (``weighting.by_name``) or a function ``f(snr) -> x0-unit weight`` (``weighting.custom``); ``schedule``: the ``NoiseSchedule`` (required)."""
        from .weighting import as_strategy

        strategy = as_strategy(strategy)  # a name/spec or a function snr -> x0-unit weight
        if not callable(getattr(strategy, "weight", None)):
            raise ValueError(
                f"cannot weight the bins with {strategy!r}: pass a strategy such as gradconflict.weighting.min_snr(5), "
                "a name/spec such as 'min_snr' or 'min_snr:5', or a function snr -> x0-unit weight "
                "(gradconflict.weighting.custom(f, name))"
            )
        if schedule is None or not hasattr(schedule, "snr"):
            raise ValueError(
                f"strategy weights need the NoiseSchedule the bins belong to, got {schedule!r}; pass schedule=, "
                "e.g. gradconflict.NoiseSchedule.linear()"
            )
        if schedule.T != self.T:
            raise ValueError(f"the bins cover T = {self.T} timesteps but the schedule has T = {schedule.T}")
        snr = np.asarray(schedule.snr(np.arange(self.T)))
        w = np.asarray(strategy.weight(snr, "x0"), dtype=np.float64)
        per_bin = np.array([w[lo:hi].sum() for lo, hi in zip(self.lows, self.highs)])
        total = per_bin.sum()
        if not np.isfinite(total) or total <= 0:
            name = getattr(strategy, "name", strategy)
            raise ValueError(f"strategy {name!r} puts no finite positive weight on these bins (total {total})")
        return per_bin / total

    def to_frame(self, schedule: Optional[NoiseSchedule] = None) -> pd.DataFrame:
        """One row per bin: task, label, t_low, t_high (inclusive), width and, with a schedule, the log-SNR range."""
        df = pd.DataFrame(
            {
                "task": np.arange(self.K),
                "label": self.labels,
                "t_low": self.lows,
                "t_high": self.highs - 1,
                "width": self.widths,
            }
        )
        if schedule is not None:
            lam = np.asarray(schedule.log_snr(np.arange(self.T)))
            df["log_snr_high"] = lam[self.lows]
            df["log_snr_low"] = lam[self.highs - 1]
        return df

    def __repr__(self) -> str:
        return f"TimestepBins(K={self.K}, T={self.T}, edges={self.edges.tolist() if self.K <= 12 else '...'})"
