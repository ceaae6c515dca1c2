"""The fused engine's memory budget for one layer's K per-task gradients (``max_chunk_elements``).

A Linear or Conv layer whose K per-task gradients hold more elements than the budget is built and folded a few
output rows at a time (``fused.py``); the Gram is the same. ``"auto"`` sizes the budget from the GPU memory free
when the call starts.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import distributed as dist_utils

__all__ = ["AUTO_BUDGET_FRACTION", "check_budget", "chunk_budget"]

AUTO_BUDGET_FRACTION = 0.02  # of the free GPU memory, for one layer's per-task gradients (max_chunk_elements="auto")


def check_budget(max_chunk_elements: Union[int, str, None]) -> None:
    """Refuse a ``max_chunk_elements`` that is not None, ``"auto"`` or a positive number of elements."""
    if isinstance(max_chunk_elements, str):
        if max_chunk_elements != "auto":
            raise ValueError(f"max_chunk_elements must be a positive number of elements, 'auto' or None, got "
                             f"{max_chunk_elements!r}")
    elif isinstance(max_chunk_elements, bool) or (max_chunk_elements is not None and int(max_chunk_elements) < 1):
        raise ValueError(f"max_chunk_elements must be a positive number of elements, got {max_chunk_elements}; "
                         "pass None for no memory budget or 'auto'")


def chunk_budget(max_chunk_elements: Union[int, str, None], device: Optional[torch.device],
                 element_size: int = 4) -> Optional[int]:
    """The fused method's memory budget in elements: None, a positive int, or ``"auto"`` resolved on ``device``:
    ``AUTO_BUDGET_FRACTION`` of the GPU memory free now (torch's cached blocks included) in elements of
    ``element_size`` bytes (the per-task gradients' dtype), the smallest over torchrun ranks; None off the GPU."""
    check_budget(max_chunk_elements)
    if max_chunk_elements != "auto":
        return None if max_chunk_elements is None else int(max_chunk_elements)
    if device is None or device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cached blocks
    # under torchrun every rank must cut the same pieces: each piece is all-reduced before it is folded
    return dist_utils.all_reduce_min(max(1, int(free * AUTO_BUDGET_FRACTION) // element_size))
