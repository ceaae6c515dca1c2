"""Reusable scratch memory for the rules' large temporaries (CPU).

On the CPU a fresh large tensor is a fresh ``mmap``: every page of it is faulted in (and zeroed by the kernel)
on first touch, which for the per-layer copies of the fused engine costs more than the copy itself. The fused
engine therefore lends the rules a few buffers that live for one backward pass, so each layer reuses the
pages the previous layer faulted in. CUDA's caching allocator already reuses memory, so there no workspace
is used and ``scratch`` is a plain ``torch.empty``.

A scratch tensor is only valid until the next request for the same slot: rules must not return it (or a
view of it) as a result.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Optional

import torch

__all__ = ["Workspace", "scratch", "use_workspace", "swap_workspace"]

# below this many bytes a fresh tensor comes from the heap (no page faults): plain torch.empty is cheaper
_MIN_BYTES = 1 << 18


class Workspace:
    """Named flat buffers, grown to the largest request seen and reused across layers."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        key = (slot, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[key] = buf
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._bufs.clear()


_local = threading.local()


def swap_workspace(ws: Optional[Workspace]) -> Optional[Workspace]:
    """Make ``ws`` this thread's active workspace (None: plain allocations); returns the previous one."""
    old = getattr(_local, "ws", None)
    _local.ws = ws
    return old


@contextlib.contextmanager
def use_workspace(ws: Optional[Workspace]) -> Iterator[None]:
    """Make ``ws`` the workspace that ``scratch`` draws from in this thread, for the ``with`` block."""
    old = swap_workspace(ws)
    try:
        yield
    finally:
        swap_workspace(old)


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor: from the active workspace (reused memory) if any, else ``torch.empty``."""
    ws: Optional[Workspace] = getattr(_local, "ws", None)
    if ws is None or math.prod(shape) * dtype.itemsize < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return ws.take(slot, tuple(shape), dtype, device)
