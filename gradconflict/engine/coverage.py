"""When the fused engine's self-check is due: every call, never, or once per model and call signature.

The self-check (``1^T G 1 = ||grad||^2`` for the signed loss ``sum_k r_k L_k``, against autograd's own parameter
gradient; ``checks.py``) catches a parameter used outside the module that owns it (``F.linear(x, other.weight)``),
samples that interact and layers whose dim 0 is not the batch, which the per-layer hooks cannot see. Whether
that happens is a property of the model's code, not of the numbers in a
batch, so ``check="once"`` runs it on the first call for each (model, signature) and trusts the
verdict afterwards. The signature holds what can change which code path runs: every module's identity,
class, instance-level ``forward`` and simple attributes (flags such as ``training`` or ``use_checkpoint``),
the trainable parameters (by identity), the per-sample input shape, dtype and device, ``model_kwargs``
(tensors by per-sample shape and dtype, simple values by value) and the autocast dtype. A model whose
forward takes branches on the *values* of its inputs that use parameters differently needs
``check=True`` (every call).
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


_SIMPLE = (bool, int, float, str, type(None))


def _kwarg_key(v: Any) -> Hashable:
    """A hashable stand-in for a ``model_kwargs`` value: per-sample tensors by their shape without the batch
    size (like x0) and dtype, simple values themselves, else the type."""
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape[1:]), str(v.dtype))
    if isinstance(v, (tuple, list)) and all(isinstance(e, _SIMPLE) for e in v):
        return tuple(v)
    return ("object", type(v).__qualname__)


def _module_key(m: nn.Module) -> Hashable:
    """A module's class, any instance-level ``forward``, and its simple attributes (flags that may pick a code path)."""
    d = m.__dict__
    own_forward = d.get("forward")
    attrs = tuple((k, v if isinstance(v, _SIMPLE) else type(v)) for k, v in d.items() if k[0] != "_")
    return (id(m), type(m), None if own_forward is None else id(own_forward), attrs)


def _signature(model: nn.Module, params: list[tuple[str, torch.Tensor]], x0: torch.Tensor,
               model_kwargs: dict[str, Any], autocast_dtype: Optional[torch.dtype]) -> Hashable:
    kwargs = tuple(sorted(((k, _kwarg_key(v)) for k, v in model_kwargs.items()), key=lambda kv: kv[0]))
    return (
        tuple(_module_key(m) for m in model.modules()),
        tuple((n, id(p)) for n, p in params),
        tuple(x0.shape[1:]), str(x0.dtype), x0.device.type,
        kwargs,
        str(autocast_dtype),
    )


def check_due(check: Union[bool, str], model: nn.Module, params: list[tuple[str, torch.Tensor]], x0: torch.Tensor,
              model_kwargs: dict[str, Any], autocast_dtype: Optional[torch.dtype]) -> tuple[bool, Optional[Hashable]]:
    """``(run the check now, signature to record once it passed)``; ``params``: the trainable ``(name, p)``."""
    if check != "once":
        return bool(check), None
    sig = _signature(model, params, x0, model_kwargs, autocast_dtype)
    return sig not in _PASSED.get(model, ()), sig


def mark_checked(model: nn.Module, signature: Optional[Hashable]) -> None:
    """Remember that ``model`` passed the self-check for ``signature`` (no-op for None)."""
    if signature is not None:
        _PASSED.setdefault(model, set()).add(signature)
