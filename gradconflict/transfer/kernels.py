"""Copy-batched kernels for ``finetune_stacked``: Linear and attention under ``vmap`` over stacked copies.

Under ``torch.func.vmap`` with per-copy weights, PyTorch's own batching rules run

* ``F.linear(x, W, b)`` (``W``: ``(C, out, in)``) as ``bmm`` plus a separate broadcast bias add (an extra pass
  over every activation), and
* ``F.scaled_dot_product_attention`` either with the math backend (``sdpa_kernel(MATH)``: materialised
  ``(C, n, heads, L, L)`` scores plus a masked "safe softmax") or, without that, through vmap's slow
  per-copy fallback loop, whose backward zero-fills a full-size gradient per copy.

``StackedKernels`` (a ``TorchFunctionMode``) routes these two calls, when one of their inputs is a vmap
``BatchedTensor``, to two custom ops whose vmap rules do the work on the physical, copy-stacked tensors:
``baddbmm`` for Linear (bias fused, as ``addmm`` in the unbatched model) and one ordinary SDPA call with
the copy dim folded into the batch dim for attention (the fused CPU flash kernel, forward and backward).
Autograd records the physical ops, so ``loss.backward()`` outside vmap needs no extra formula. Every copy
still sees only its own weights and inputs: the results equal C separate calls up to float32 rounding.

Used on the CPU by default (``use_stacked_kernels``); on CUDA the stacked path keeps PyTorch's rules with the
math SDPA backend unless ``GRADCONFLICT_STACKED_KERNELS=all`` (the fused SDPA call then runs on the physical
tensors, outside vmap, so its backward is an ordinary one: to be measured on a GPU).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from .._env import env_choice

__all__ = ["StackedKernels", "use_stacked_kernels", "copy_linear", "copy_attention"]

_is_batched: Callable[[torch.Tensor], bool] = torch._C._functorch.is_batchedtensor
_LINEAR = F.linear
MIN_LINEAR_ROWS = 64  # per copy; smaller Linear calls (e.g. timestep / adaLN embeddings) keep vmap's own rule
_SDPA = F.scaled_dot_product_attention
# inside the vmap rule the call is an ordinary one on physical tensors: every backend may run, even where the
# surrounding step forces the math backend for the attention calls left to vmap's own rules
_ALL_SDPA = [b for b in (getattr(SDPBackend, n, None) for n in
                         ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")) if b is not None]


def use_stacked_kernels(device: torch.device) -> bool:
    """Whether ``finetune_stacked`` runs its vmap under ``StackedKernels`` on ``device``: on the CPU (where it
    was measured, ``benchmarks/bench_transfer.py``) unless the environment variable
    ``GRADCONFLICT_STACKED_KERNELS`` is "none"; on other devices only when it is "all" (not yet measured
    there: by default CUDA keeps vmap's own rules with the math SDPA backend)."""
    mode = env_choice("GRADCONFLICT_STACKED_KERNELS", "cpu", ("cpu", "all", "none"))
    return mode == "all" or (mode == "cpu" and device.type == "cpu")


def _front(x: torch.Tensor, dim: Optional[int], size: int) -> torch.Tensor:
    """The copy dim of a physical tensor moved to the front (``dim=None``: shared, expanded to ``size``)."""
    return x.unsqueeze(0).expand(size, *x.shape) if dim is None else x.movedim(dim, 0)


@torch.library.custom_op("gradconflict_transfer::copy_linear", mutates_args=())
def copy_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` (this plain implementation only runs outside vmap; ``StackedKernels`` calls it under vmap)."""
    return _LINEAR(x, weight, bias)


@copy_linear.register_vmap
def _copy_linear_vmap(info: Any, in_dims: tuple, x: torch.Tensor, weight: torch.Tensor,
                      bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, int]:
    C = info.batch_size
    dx, dw, db = in_dims
    x = _front(x, dx, C)  # (C, *lead, in)
    if dw is None:  # shared weight: the copies are just more rows
        out = _LINEAR(x, weight, bias if db is None else None)
        if db is not None:
            out = out + bias.movedim(db, 0).reshape(C, *([1] * (out.ndim - 2)), -1)
        return out, 0
    w = weight.movedim(dw, 0)  # (C, out, in)
    x3 = x.reshape(C, -1, x.shape[-1])
    if bias is None:
        out = torch.bmm(x3, w.transpose(1, 2))
    else:
        out = torch.baddbmm(_front(bias, db, C).unsqueeze(1), x3, w.transpose(1, 2))
    return out.reshape(*x.shape[:-1], w.shape[1]), 0


@torch.library.custom_op("gradconflict_transfer::copy_attention", mutates_args=())
def copy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: Optional[float]) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` without mask or dropout (plain implementation: outside vmap)."""
    return _SDPA(q, k, v, is_causal=is_causal, scale=scale)


@copy_attention.register_vmap
def _copy_attention_vmap(info: Any, in_dims: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         is_causal: bool, scale: Optional[float]) -> tuple[torch.Tensor, int]:
    C = info.batch_size
    q, k, v = (_front(a, d, C) for a, d in zip((q, k, v), in_dims[:3]))
    with sdpa_kernel(_ALL_SDPA):
        if q.ndim == 5 and q.shape[:2] == k.shape[:2] == v.shape[:2]:  # (C, n, heads, L, E): copies into the batch
            out = _SDPA(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), is_causal=is_causal, scale=scale)
            return out.unflatten(0, (C, -1)), 0
        return _SDPA(q, k, v, is_causal=is_causal, scale=scale), 0


def _any_batched(*tensors: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and _is_batched(t) for t in tensors)


class StackedKernels(TorchFunctionMode):
    """Within this mode, ``F.linear`` calls on vmap-batched tensors with at least ``MIN_LINEAR_ROWS`` input
    rows per copy and mask-free, dropout-free ``F.scaled_dot_product_attention`` calls on vmap-batched tensors
    go to ``copy_linear`` / ``copy_attention`` (see the module docstring); every other call runs unchanged."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR:
            x, weight, bias = _linear_args(*args, **kwargs)
            if _any_batched(x, weight, bias) and x.numel() >= MIN_LINEAR_ROWS * x.shape[-1]:
                return copy_linear(x, weight, bias)
        elif func is _SDPA:
            call = _attention_args(*args, **kwargs)
            if call is not None and _any_batched(*call[:3]):
                return copy_attention(*call)
        return func(*args, **kwargs)


def _linear_args(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple:
    return input, weight, bias


def _attention_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False) -> Optional[tuple]:
    """``(q, k, v, is_causal, scale)`` when ``copy_attention`` can run the call, else None."""
    if attn_mask is not None or dropout_p != 0.0 or enable_gqa:
        return None
    return query, key, value, bool(is_causal), None if scale is None else float(scale)
