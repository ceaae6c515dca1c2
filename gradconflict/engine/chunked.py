"""The Gram of K tasks from passes over pairs of task groups, when the whole batch does not fit in memory.

A task's gradient depends on its own samples only (samples do not interact), so the block ``G[A, B]`` of the
Gram needs the samples of task groups A and B and nothing else. With the K tasks split into m groups (balanced by
sample count), one fused
pass over the samples of groups a and b gives the blocks ``G[a, a]``, ``G[a, b]`` and ``G[b, b]`` exactly; the
m (m - 1) / 2 pairs give every block. Each pass holds the activations of two groups' samples (about 2 N / m when
no task dominates) instead of N, and the passes together process (m - 1) N samples (the diagonal blocks are computed m - 1 times; the first is kept).
The result equals the unchunked Gram up to float rounding: the same samples, noise and per-task scaling.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["task_groups", "pair_passes", "check_task_chunks"]

# one fused pass: (sample indices, their task ids renumbered 0..k-1, the k tasks' own ids, whether to run the
# self-check) -> (k x k Gram, k per-task losses)
Pass = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]]


def check_task_chunks(task_chunks: int, K: int) -> int:
    """``task_chunks`` as an int in [1, K], or a ValueError that says what to pass."""
    if isinstance(task_chunks, bool) or not isinstance(task_chunks, int) or not 1 <= task_chunks <= K:
        raise ValueError(f"task_chunks must be an integer between 1 (one pass over the whole batch) and K = {K} "
                         f"(one group per task), got {task_chunks!r}")
    return task_chunks


def task_groups(counts: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """Task ids 0..K-1 in ``chunks`` groups balanced by sample count (``counts``: samples per task): the largest
    task first, each into the group holding the fewest samples so far (ties: the lower group). Each group's ids
    are sorted. A task larger than the others' sum sets its groups' size whatever the grouping."""
    order = sorted(range(len(counts)), key=lambda k: (-int(counts[k]), k))
    members: list[list[int]] = [[] for _ in range(chunks)]
    load = [0] * chunks
    for k in order:
        g = min(range(chunks), key=lambda i: (load[i], len(members[i]), i))
        members[g].append(k)
        load[g] += int(counts[k])
    return [torch.tensor(sorted(m), dtype=torch.long) for m in members]


def pair_passes(task: torch.Tensor, K: int, chunks: int, run: Pass, check_every_pass: bool,
                first_check: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gram (K, K) float64, losses (K,) float64)`` from one ``run`` per pair of task groups (``chunks`` >= 2).

    ``task``: (N,) task id of each sample (CPU); ``first_check``: run the self-check on the first pass (and on every
    pass when ``check_every_pass``)."""
    groups = task_groups(torch.bincount(task, minlength=K), chunks)
    gram = torch.zeros(K, K, dtype=torch.float64)
    losses = torch.zeros(K, dtype=torch.float64)
    done = torch.zeros(K, dtype=torch.bool)  # tasks whose diagonal block and loss are already kept
    check = first_check
    for a in range(chunks):
        for b in range(a + 1, chunks):
            tasks = torch.cat([groups[a], groups[b]])
            local = torch.full((K,), -1, dtype=torch.long)
            local[tasks] = torch.arange(len(tasks))
            sel = torch.nonzero(local[task] >= 0).flatten()
            g, l = run(sel, local[task[sel]], tasks, check)
            check = check_every_pass
            new = ~done[tasks]  # keep the first computation of each diagonal block and loss
            rows, cols = tasks[:, None], tasks[None, :]
            in_a = torch.isin(tasks, groups[a])
            keep = new[:, None] | new[None, :] | (in_a[:, None] != in_a[None, :])  # cross blocks: computed once
            gram[rows, cols] = torch.where(keep, g, gram[rows, cols])
            losses[tasks] = torch.where(new, l, losses[tasks])
            done[tasks] = True
    return gram, losses
