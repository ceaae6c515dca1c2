"""A seeded CountSketch of every task gradient, built layer by layer.

Each parameter coordinate j is hashed to a bucket ``h(j)`` in ``[0, d)`` with a random sign ``s(j)``;
``S[k, b] = sum_{j: h(j) = b} s(j) g_k[j]``. Then ``E[S S^T] = G`` (unbiased), and each entry's standard
deviation is ``sqrt((G_kk G_ll + G_kl^2 - 2 sum_j g_kj^2 g_lj^2) / d) <= sqrt((G_kk G_ll + G_kl^2) / d)``.
The hashes of parameter number i come from a generator seeded with ``(seed, i)``, so the sketch is the same
on every device and in every process. Memory: K x d plus one layer's hashes at a time.
"""

from __future__ import annotations

import torch

__all__ = ["CountSketch"]


class CountSketch:
    """Accumulates ``S`` (K x d, float64) from per-layer per-task gradients ``J`` (K x n_layer)."""

    def __init__(self, K: int, dim: int, seed: int = 0, param_order: dict[str, int] | None = None) -> None:
        if dim < 1:
            raise ValueError(f"sketch dimension must be >= 1, got {dim}")
        self.K, self.dim, self.seed = K, dim, seed
        self.param_order = param_order or {}
        self.S = torch.zeros(K, dim, dtype=torch.float64)
        self._acc: torch.Tensor | None = None  # the part accumulated on a device (see ``add``)

    def hashes(self, name: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        number = self.param_order.get(name, abs(hash(name)) % (2**31))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + number)
        buckets = torch.randint(0, self.dim, (n,), generator=g)
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.int8).to(torch.float64) * 2 - 1
        return buckets, signs

    def add(self, name: str, J: torch.Tensor) -> None:
        """Add one layer's ``J`` (K x n), on its own device: the CPU-drawn hashes travel there (pinned, without
        blocking), so on a GPU the backward pass is not synchronised with the host per layer."""
        buckets, signs = self.hashes(name, J.shape[1])
        if J.device.type != "cpu":
            if self._acc is None:
                self._acc = torch.zeros(self.K, self.dim, dtype=torch.float64, device=J.device)
            if J.device.type == "cuda":
                buckets, signs = buckets.pin_memory(), signs.pin_memory()
            buckets = buckets.to(J.device, non_blocking=True)
            signs = signs.to(J.device, non_blocking=True)
            self._acc.index_add_(1, buckets, J.detach().to(torch.float64) * signs)
            return
        self.S.index_add_(1, buckets, J.detach().to(torch.float64) * signs)

    def finish(self) -> torch.Tensor:
        """``S`` on the CPU, with what was accumulated on a device added (call once the backward pass is over)."""
        if self._acc is not None:
            self.S += self._acc.cpu()
            self._acc = None
        return self.S

    def gram(self) -> torch.Tensor:
        """The sketched Gram ``S S^T`` (an unbiased estimate of G)."""
        S = self.finish()
        return S @ S.T
