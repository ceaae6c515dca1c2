"""Exponential moving average of model weights.

After every optimiser step ``ema <- d * ema + (1 - d) * theta`` with the warmed-up decay
``d = min(decay, (1 + n) / (10 + n))`` at update n = 0, 1, ... (so early averages are not dominated by the
random initialisation). Floating-point buffers are averaged too; integer buffers are copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """Float32 shadow copy of a model's ``state_dict``, updated with ``update(model)``."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    def decay_at(self, n: int) -> float:
        """Decay used for update number ``n`` (0-based)."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards the model's current weights."""
        d = self.decay_at(self.num_updates)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if s.is_floating_point():
                s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
            else:
                s.copy_(v)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to the model's dtypes)."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model (differing keys: {sorted(missing)[:5]})")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
