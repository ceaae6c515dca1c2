"""When the fused engine's self-check is due: every call, never, or once per model and call signature.

The self-check (``1^T G 1 = ||sum_k g_k||^2`` against autograd's own parameter gradient) catches a
parameter used outside the module that owns it (``F.linear(x, other.weight)``), which the per-layer
hooks cannot see. Whether that happens is a property of the model's code, not of the numbers in a
batch, so ``check="once"`` runs it on the first call for each (model, signature) and trusts the
verdict afterwards. The signature holds what can change which code path runs: the set of modules and
trainable parameters (by identity), training mode, input shape and dtype, the names and shapes of
``model_kwargs`` and the autocast dtype. A model whose forward takes data-dependent branches that use
parameters differently needs ``check=True`` (every call).
"""

from __future__ import annotations

import weakref
from typing import Any, Hashable, Optional, Union

import torch
import torch.nn as nn

__all__ = ["CHECK_MODES", "check_due", "mark_checked", "normalize_check"]

CHECK_MODES = (True, False, "once")
_PASSED: "weakref.WeakKeyDictionary[nn.Module, set[Hashable]]" = weakref.WeakKeyDictionary()


def normalize_check(check: Union[bool, str]) -> Union[bool, str]:
    """``True``, ``False`` or ``"once"``; anything else is a ``ValueError``."""
    if isinstance(check, str):
        if check != "once":
            raise ValueError(f"check must be True, False or 'once', got {check!r}")
        return check
    if isinstance(check, (bool, int)) and not isinstance(check, float):
        return bool(check)
    raise ValueError(f"check must be True, False or 'once', got {check!r}")


def _signature(model: nn.Module, x0: torch.Tensor, model_kwargs: dict[str, Any],
               autocast_dtype: Optional[torch.dtype]) -> Hashable:
    kwargs = tuple(sorted(
        (k, tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, type(v).__name__)
        for k, v in model_kwargs.items()
    ))
    return (
        tuple(id(m) for m in model.modules()),
        tuple((n, id(p)) for n, p in model.named_parameters() if p.requires_grad),
        model.training,
        tuple(x0.shape[1:]), str(x0.dtype), x0.device.type,
        kwargs,
        str(autocast_dtype),
    )


def check_due(check: Union[bool, str], model: nn.Module, x0: torch.Tensor, model_kwargs: dict[str, Any],
              autocast_dtype: Optional[torch.dtype]) -> tuple[bool, Optional[Hashable]]:
    """``(run the check now, signature to record once it passed)``."""
    if check != "once":
        return bool(check), None
    sig = _signature(model, x0, model_kwargs, autocast_dtype)
    return sig not in _PASSED.get(model, ()), sig


def mark_checked(model: nn.Module, signature: Optional[Hashable]) -> None:
    """Remember that ``model`` passed the self-check for ``signature`` (no-op for None)."""
    if signature is not None:
        _PASSED.setdefault(model, set()).add(signature)
