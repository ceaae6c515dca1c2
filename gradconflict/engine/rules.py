"""Per-layer rules: each layer's K per-task parameter gradients from its input and its output gradient.

For a layer used on a batch whose samples are grouped into tasks, the gradient of ``sum_k L_k`` with respect
to the layer's output, ``B``, holds for sample i the term of its own task only (samples do not interact), so
task k's parameter gradient is the layer's usual weight-gradient formula summed over task k's samples:

* Linear ``y = x W^T + b``: ``dW_k = sum_{i in k} B_i^T A_i`` (summed over any token axes), ``db_k = sum B_i``.
* Conv: the same with the unfolded input (im2col) as ``A``.
* LayerNorm / GroupNorm ``y = xhat * w + b``: ``dw_k = sum_{i in k} B_i * xhat_i`` (over the non-channel axes).
* Embedding: ``dE_k[j] = sum_{i in k} sum_{positions p with index j} B_{i,p}``.

Layers not listed here go to the generic torch.func fallback (``fallback.py``), as in Opacus' registry.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grouping import TaskIndex

__all__ = ["RULES", "ROW_CHUNKED", "register_rule", "rule_for"]

Rule = Callable[[nn.Module, tuple, torch.Tensor, TaskIndex, torch.dtype], dict[str, torch.Tensor]]
RULES: dict[type, Rule] = {}


def register_rule(*types: type) -> Callable[[Rule], Rule]:
    """Register a per-task gradient rule for module types (exact type match, then subclasses)."""

    def deco(fn: Rule) -> Rule:
        for t in types:
            RULES[t] = fn
        return fn

    return deco


def rule_for(module: nn.Module) -> Rule | None:
    rule = RULES.get(type(module))
    if rule is not None:
        return rule
    for t, r in RULES.items():
        if isinstance(module, t) and type(module).forward is t.forward:
            return r
    return None


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


# rules that can produce the per-task gradients of a slice of output rows (features / channels) at a time
ROW_CHUNKED: set = set()


@register_rule(nn.Linear)
def linear_rule(module: nn.Linear, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype,
                rows: slice | None = None) -> dict[str, torch.Tensor]:
    a = inputs[0]
    out: dict[str, torch.Tensor] = {}
    if rows is not None:
        grad = grad[..., rows]
    b = idx.group(grad.to(dtype)).reshape(idx.K, -1, grad.shape[-1])  # (K, m*S, out)
    if _trainable(module, "weight"):
        x = idx.group(a.to(dtype)).reshape(idx.K, -1, a.shape[-1])  # (K, m*S, in)
        out["weight"] = torch.bmm(b.transpose(1, 2), x)
    if module.bias is not None and _trainable(module, "bias"):
        out["bias"] = b.sum(1)
    return out


def _explicit_padding(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The conv input padded as the layer pads it, and the zero padding left for the convolution itself."""
    nd = x.ndim - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return x, (0,) * nd
        pads: list[int] = []  # "same": the asymmetric padding torch uses, applied explicitly
        for d, k in zip(module.dilation[::-1], module.kernel_size[::-1]):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


ROW_CHUNKED.add(linear_rule)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(module: nn.Module, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
    """Per-task conv weight gradients as one grouped convolution backward: the m samples of each task become
    the batch and the K tasks become K x groups channel groups, so the batch sum is the task sum."""
    x = inputs[0]
    if x.ndim == module.weight.ndim - 1:  # unbatched input: not a batch of samples
        raise ValueError(f"{type(module).__name__} received an unbatched input; the batch dimension is required")
    out: dict[str, torch.Tensor] = {}
    weight_shape = module.weight.shape
    if rows is not None:  # a slice of output channels (groups == 1 only)
        grad = grad[:, rows]
        weight_shape = (grad.shape[1], *weight_shape[1:])
    K, c_out = idx.K, grad.shape[1]
    if _trainable(module, "weight"):
        xp, padding = _explicit_padding(module, x.to(dtype))
        xg = idx.group(xp)  # (K, m, C, *S)
        xg = xg.transpose(0, 1).reshape(idx.m, K * xp.shape[1], *xp.shape[2:])
        bg = idx.group(grad.to(dtype)).transpose(0, 1).reshape(idx.m, K * c_out, *grad.shape[2:])
        shape = (K * c_out, *weight_shape[1:])
        dw = _CONV_WEIGHT_GRAD[x.ndim - 2](xg, shape, bg, module.stride, padding, module.dilation, K * module.groups)
        out["weight"] = dw.reshape(K, *weight_shape)
    if module.bias is not None and _trainable(module, "bias"):
        out["bias"] = idx.group(grad.to(dtype).reshape(grad.shape[0], c_out, -1).sum(-1)).sum(1)
    return out


ROW_CHUNKED.add(conv_rule)


@register_rule(nn.LayerNorm)
def layer_norm_rule(module: nn.LayerNorm, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if not module.elementwise_affine:
        return out
    shape = module.normalized_shape
    b = idx.group(grad.to(dtype)).reshape(idx.K, -1, *shape)
    if _trainable(module, "weight"):
        xhat = F.layer_norm(inputs[0].to(dtype), shape, eps=module.eps)
        out["weight"] = (b * idx.group(xhat).reshape(idx.K, -1, *shape)).sum(1)
    if getattr(module, "bias", None) is not None and _trainable(module, "bias"):
        out["bias"] = b.sum(1)
    return out


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if not module.affine:
        return out
    n, c = grad.shape[0], grad.shape[1]
    b = grad.to(dtype).reshape(n, c, -1)
    if _trainable(module, "weight"):
        xhat = F.group_norm(inputs[0].to(dtype), module.num_groups, eps=module.eps).reshape(n, c, -1)
        out["weight"] = idx.group((b * xhat).sum(-1)).sum(1)
    if _trainable(module, "bias"):
        out["bias"] = idx.group(b.sum(-1)).sum(1)
    return out


@register_rule(nn.Embedding)
def embedding_rule(module: nn.Embedding, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if not _trainable(module, "weight"):
        return {}
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError(
            "Embedding with max_norm, scale_grad_by_freq or sparse gradients is not supported by the fused "
            "engine; use method='loop'"
        )
    ids = inputs[0]
    n = ids.shape[0]
    num, dim = module.weight.shape
    flat_ids = ids.reshape(n, -1)  # (N, S)
    task = idx.task.to(ids.device)
    rows = (task[:, None] * num + flat_ids).reshape(-1)  # row in a stacked (K*num, dim) table
    src = grad.to(dtype).reshape(-1, dim)
    table = torch.zeros(idx.K * num, dim, dtype=dtype, device=grad.device)
    table.index_add_(0, rows, src)
    table = table.reshape(idx.K, num, dim)
    if module.padding_idx is not None:
        table[:, module.padding_idx] = 0
    return {"weight": table}
