"""Grouping of a batch's samples by task, so per-task sums become batched matrix products."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["TaskIndex"]


@dataclass
class TaskIndex:
    """Which samples of a batch of N belong to which of K tasks.

    ``group(x)`` turns a per-sample tensor ``(N, ...)`` into ``(K, m, ...)`` with m the largest task size;
    the slots of smaller tasks are filled with zeros, so sums over the second axis are per-task sums.
    """

    task: torch.Tensor  # (N,) long, values in [0, K)
    K: int
    global_counts: Optional[torch.Tensor] = None  # under torch.distributed: samples per task over all ranks

    def __post_init__(self) -> None:
        task = self.task
        if task.ndim != 1:
            raise ValueError(f"task must be a 1-D tensor of task ids, got shape {tuple(task.shape)}")
        if task.is_floating_point():
            raise ValueError("task must hold integer task ids; use task.long()")
        self.task = task.long()
        self.N = int(task.numel())
        if self.N == 0:
            if self.global_counts is not None and int(self.global_counts.sum()) > 0:  # torch.distributed
                raise ValueError(f"this rank got none of the {int(self.global_counts.sum())} samples: there are more "
                                 "ranks than samples; give more samples (gram/track: --per-task; transfer: "
                                 "--batch-size, --eval-samples), or run fewer processes")
            raise ValueError("the batch is empty: give at least one sample per task")
        if int(task.min()) < 0 or int(task.max()) >= self.K:
            raise ValueError(f"task ids must lie in [0, {self.K - 1}], got {int(task.min())}..{int(task.max())}")
        self.local_counts = torch.bincount(self.task.cpu(), minlength=self.K)
        self.counts = self.local_counts if self.global_counts is None else self.global_counts.cpu().long()
        empty = torch.nonzero(self.counts == 0).flatten().tolist()
        if empty:
            raise ValueError(
                f"task(s) {empty[:10]} have no samples; every task needs at least one sample "
                "(draw timesteps with TimestepBins.sample, or use fewer bins)"
            )
        self.m = int(self.local_counts.max())
        order = torch.argsort(self.task.cpu(), stable=True)
        sorted_task = self.task.cpu()[order]
        self.contiguous_equal = bool(
            torch.equal(order, torch.arange(self.N)) and torch.all(self.local_counts == self.m)
        )
        # padded index (K, m): position j of task k holds a sample index, or N (a zero row) when k is short
        starts = torch.cumsum(self.local_counts, 0) - self.local_counts
        slot = torch.arange(self.N) - starts[sorted_task]
        index = torch.full((self.K, self.m), self.N, dtype=torch.long)
        index[sorted_task, slot] = order
        self._index = index
        self._cache: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache[device] = self._index.to(device)
        return self._cache[device]

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, ...)`` -> ``(K, m, ...)`` (a view when tasks are contiguous and equal-sized, else a padded copy)."""
        if x.shape[0] != self.N:
            raise ValueError(f"expected a leading batch dimension of {self.N}, got shape {tuple(x.shape)}: a layer's dim 0 "
                             "is not the batch (e.g. nn.MultiheadAttention with batch_first=False, or tokens flattened "
                             "to (N * L, E)); use batch_first=True, keep the batch in dim 0, or method='loop'")
        if self.contiguous_equal:
            return x.reshape(self.K, self.m, *x.shape[1:])
        padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))], 0)
        return padded[self.index(x.device)]
