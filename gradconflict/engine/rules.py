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

import math

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._env import env_choice
from .conv_weight import taps_weight, to_conv_layout
from .grouping import TaskIndex
from .precision import HALF_DTYPES, half_bmm
from .workspace import scratch

__all__ = ["RULES", "ROW_CHUNKED", "FORWARD_EXTRAS", "HALF_INPUT_RULES", "register_rule", "rule_for", "saved_half_input"]

Rule = Callable[[nn.Module, tuple, torch.Tensor, TaskIndex, torch.dtype], dict[str, torch.Tensor]]
RULES: dict[type, Rule] = {}


def _same_rule(a: Rule, b: Rule) -> bool:
    """The same function, or its definition run again (a user's model file is imported once per model load)."""
    key = lambda f: (getattr(f, "__module__", None), getattr(f, "__qualname__", None))  # noqa: E731
    return a is b or key(a) == key(b)


def register_rule(*types: type, replace: bool = False) -> Callable[[Rule], Rule]:
    """Register a per-task gradient rule for module types (exact type match, then subclasses). A type that already
    has another rule is refused unless ``replace=True`` (a second rule would otherwise silently win); registering
    the same rule again (same module and name, e.g. a model file imported once per checkpoint) replaces it."""

    def deco(fn: Rule) -> Rule:
        taken = [t for t in types if t in RULES and not _same_rule(RULES[t], fn)]
        if taken and not replace:
            names = ", ".join(f"{t.__name__} (by {getattr(RULES[t], '__qualname__', RULES[t])})" for t in taken)
            raise ValueError(f"register_rule: {names} already has a per-task gradient rule; pass replace=True to "
                             f"replace it with {getattr(fn, '__qualname__', fn)}")
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
    # half-precision operands (autocast; precision.py) stay half and are multiplied with float32 accumulation
    half = grad.dtype in HALF_DTYPES and a.dtype == grad.dtype and dtype == torch.float32
    b = idx.group(grad if half else grad.to(dtype)).reshape(idx.K, -1, grad.shape[-1])  # (K, m*S, out)
    if _trainable(module, "weight"):
        x = idx.group(a if half else a.to(dtype)).reshape(idx.K, -1, a.shape[-1])  # (K, m*S, in)
        out["weight"] = half_bmm(b.transpose(1, 2), x) if half else torch.bmm(b.transpose(1, 2), x)
    if module.bias is not None and _trainable(module, "bias"):
        out["bias"] = b.sum(1, dtype=dtype)
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


def _sample_major(x: torch.Tensor, idx: TaskIndex, slot: str) -> torch.Tensor:
    """``(N, C, *S)`` -> ``(m, K * C, *S)``: slot j of every task, tasks side by side along the channels.

    Copied as ``(K, m, C*prod(S)) -> (m, K, C*prod(S))`` (contiguous blocks of one sample each, several times
    faster on the CPU than the same permutation written on the 5-D shape) into workspace memory ``slot``
    (see ``workspace.py``). Short tasks get zero samples.
    """
    K, m = idx.K, idx.m
    flat = x.reshape(x.shape[0], -1)
    out = scratch(slot, (m, K, flat.shape[1]), flat.dtype, flat.device)
    if idx.contiguous_equal:
        out.copy_(flat.reshape(K, m, -1).transpose(0, 1))
    else:
        padded = torch.cat([flat, flat.new_zeros((1, flat.shape[1]))], 0)
        torch.index_select(padded, 0, idx.index(x.device).T.reshape(-1), out=out.view(m * K, -1))
    return out.view(m, K * x.shape[1], *x.shape[2:])


def _pointwise_bmm_ok(module: nn.Module, x: torch.Tensor, c_out: int, idx: TaskIndex) -> bool:
    """Use the per-sample product for a 1x1 (pointwise) conv: CPU only (there the grouped conv weight gradient of
    a pointwise conv falls back to one small convolution per group), and only while the N x c_out x c_in
    per-sample products stay small next to the K per-task gradients (or 4M elements)."""
    if x.device.type != "cpu" or module.groups != 1 or module.padding_mode != "zeros":
        return False
    if any(k != 1 for k in module.kernel_size) or any(s != 1 for s in module.stride):
        return False
    if not (module.padding == "valid" or module.padding == "same" or all(p == 0 for p in module.padding)):
        return False
    size = idx.N * c_out * x.shape[1]
    return size <= max(8 * idx.K * c_out * x.shape[1], 1 << 22)


def _pointwise_weight(x: torch.Tensor, grad: torch.Tensor, idx: TaskIndex) -> torch.Tensor:
    """``dW_k = sum_{i in k} B_i A_i^T`` for a pointwise conv (``A_i``: C x P input, ``B_i``: c_out x P output
    gradient, P positions): one batched product per sample, then the task sums."""
    n = x.shape[0]
    a = x.reshape(n, x.shape[1], -1)  # (N, C, P)
    b = grad.reshape(n, grad.shape[1], -1)  # (N, c_out, P)
    return idx.group(torch.bmm(b, a.transpose(1, 2))).sum(1)  # (K, c_out, C)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(module: nn.Module, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype,
              rows: slice | None = None) -> dict[str, torch.Tensor]:
    """Per-task conv weight gradients as one grouped convolution backward: the m samples of each task become
    the batch and the K tasks become K x groups channel groups, so the batch sum is the task sum:
    ``dW_k = sum_{i in k} conv_weight_grad(x_i, B_i)``, ``db_k = sum_{i in k} sum_p B_{i,:,p}``."""
    x = inputs[0]
    if x.ndim == module.weight.ndim - 1:  # unbatched input: not a batch of samples
        raise ValueError(f"{type(module).__name__} received an unbatched input; the batch dimension is required")
    out: dict[str, torch.Tensor] = {}
    weight_shape = module.weight.shape
    if rows is not None:  # a slice of output channels (groups == 1 only)
        grad = grad[:, rows]
        weight_shape = (grad.shape[1], *weight_shape[1:])
    K, c_out = idx.K, grad.shape[1]
    # sums of products built in two stages (per sample, then per task) accumulate in float32 when the output is
    # half precision, so the result is rounded once, as one product rounds its float32 accumulator
    acc = torch.float32 if dtype in HALF_DTYPES else dtype
    mode = conv_weight_mode()
    if _trainable(module, "weight") and module.groups == 1 and mode == "taps":
        # half-precision operands (autocast) stay half, multiplied with float32 accumulation (conv_weight.py)
        xp, padding = _explicit_padding(module, x)
        out["weight"] = taps_weight(module, xp, grad, idx, padding, dtype).reshape(K, *weight_shape)
    elif _trainable(module, "weight") and _pointwise_bmm_ok(module, x, c_out, idx):
        out["weight"] = _pointwise_weight(x.to(acc), grad.to(acc), idx).reshape(K, *weight_shape).to(dtype)
    elif _trainable(module, "weight") and x.ndim == 4 and module.groups == 1 and mode == "unfold":
        xp, padding = _explicit_padding(module, x.to(dtype))
        out["weight"] = _unfold_weight(module, xp, grad.to(dtype), idx, padding).reshape(K, *weight_shape)
    elif _trainable(module, "weight"):
        xp, padding = _explicit_padding(module, x.to(dtype))
        xg = to_conv_layout(_sample_major(xp, idx, "conv_input"))  # (m, K*C, *S)
        bg = to_conv_layout(_sample_major(grad.to(dtype), idx, "conv_grad"))  # (m, K*c_out, *S_out)
        shape = (K * c_out, *weight_shape[1:])
        dw = _CONV_WEIGHT_GRAD[x.ndim - 2](xg, shape, bg, module.stride, padding, module.dilation, K * module.groups)
        out["weight"] = dw.reshape(K, *weight_shape)
    if module.bias is not None and _trainable(module, "bias"):
        # sum(dtype=acc) casts each element first, as grad.to(dtype) would (acc is dtype, or float32 for half)
        out["bias"] = idx.group(grad.reshape(grad.shape[0], c_out, -1).sum(-1, dtype=acc)).sum(1).to(dtype)
    return out


ROW_CHUNKED.add(conv_rule)


def conv_weight_mode() -> str:
    """How a Conv2d's per-task weight gradients are built: ``"grouped"`` (default: one grouped convolution
    backward, K x groups channel groups) or ``"unfold"`` (im2col of the input, then one batched product per task,
    ``dW_k = sum_{i in k} B_i U(x_i)^T``: more memory, the input's kernel-size copy, but plain matmuls), from the
    environment variable ``GRADCONFLICT_CONV_WEIGHT``; both give the same numbers up to summation order. cuDNN's
    grouped backward with many groups may be slow on a GPU: ``benchmarks/gpu_check.py`` times them. Or ``"taps"``:
    one batched product per kernel tap over (tasks x positions), see ``conv_weight.py`` (groups = 1 convs of any
    dimension; grouped convs keep the grouped backward)."""
    return env_choice("GRADCONFLICT_CONV_WEIGHT", "grouped", ("grouped", "unfold", "taps"))


UNFOLD_MAX_ELEMENTS = 1 << 26  # im2col elements built at once (a few tasks at a time): 256 MB in float32


def _unfold_weight(module: nn.Module, xp: torch.Tensor, grad: torch.Tensor, idx: TaskIndex,
                   padding: tuple[int, ...]) -> torch.Tensor:
    """``(K, c_out, C * kh * kw)`` per-task Conv2d weight gradients from the unfolded (im2col) input ``U(x_i)``
    (``(C kh kw, P)`` per sample, P output positions) and the output gradient ``B_i`` (``(c_out, P)``). The im2col
    copy is kh * kw times the input: it is built for a few tasks at a time (at most ``UNFOLD_MAX_ELEMENTS``)."""
    n, c_out = grad.shape[0], grad.shape[1]
    P = grad[0, 0].numel()
    b = idx.group(grad.reshape(n, c_out, P))  # (K, m, c_out, P)
    x = idx.group(xp)  # (K, m, C, H, W): the padded input, not yet unfolded
    K, m = b.shape[0], b.shape[1]
    ckk = xp.shape[1] * math.prod(module.kernel_size)
    step = max(1, UNFOLD_MAX_ELEMENTS // max(1, m * ckk * P))
    pieces = []
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        cols = F.unfold(x[k0:k1].reshape(-1, *xp.shape[1:]), module.kernel_size, dilation=module.dilation,
                        padding=padding, stride=module.stride)  # ((k1 - k0) m, C kh kw, P)
        u = cols.reshape(k1 - k0, m, ckk, P).permute(0, 1, 3, 2).reshape(k1 - k0, m * P, ckk)
        bk = b[k0:k1].permute(0, 2, 1, 3).reshape(k1 - k0, c_out, m * P)
        pieces.append(torch.bmm(bk, u))  # in the rule's dtype (float32, or bfloat16 on the direct bf16 path)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


# rules of layers that autocast runs in half precision: when their output gradient is half precision, the fused
# engine casts their input as the forward did before building the per-task gradients (precision.py)
HALF_INPUT_RULES: set = {linear_rule, conv_rule}

_VIEWS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AliasBackward0")


def saved_half_input(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
    """The half-precision copy of a Conv / Linear input ``x`` that autocast made and autograd saved for the
    backward pass (``ConvolutionBackward0``'s input; ``AddmmBackward0`` / ``MmBackward0``'s first operand, under
    the views that flatten tokens), reshaped to ``x``'s shape, or None when the graph holds no such tensor (or
    no cast happened: ``x`` already has the output's dtype).

    The fused engine keeps this tensor instead of casting ``x`` again: a second cast would hold a second
    half-precision copy of every float32 layer input (a UNet's conv inputs come from float32 GroupNorm / SiLU)
    until the backward pass reaches the layer.
    """
    fn = output.grad_fn
    for _ in range(3):  # the product node, under at most two views
        if fn is None:
            return None
        name = type(fn).__name__
        if name not in _VIEWS:
            break
        nxt = fn.next_functions
        fn = nxt[0][0] if len(nxt) == 1 else None
    try:
        if name == "ConvolutionBackward0":
            saved = fn._saved_input
        elif name == "AddmmBackward0":
            saved = fn._saved_mat1
        elif name == "MmBackward0":
            saved = fn._saved_self
        else:
            return None
    except (AttributeError, RuntimeError):  # renamed, or freed
        return None
    if (not isinstance(saved, torch.Tensor) or saved.dtype != output.dtype or saved.dtype == x.dtype  # a cast
            or saved.numel() != x.numel()
            or saved.shape[-1] != x.shape[-1] or saved.device != x.device):
        return None
    return saved.detach().reshape(x.shape)


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


def group_norm_saved_stats(module: nn.Module, inputs: tuple, output: torch.Tensor) -> dict[str, Any]:
    """The per-sample group mean and 1/std that autograd saved for GroupNorm's backward, if it did.

    Saves the rule a second normalisation pass over the input. Returns ``{"stats": (mean, rstd)}`` (each
    ``(N, groups)``), or ``{}`` when the output was not made by ``native_group_norm`` with this module's settings.
    """
    fn = output.grad_fn
    if fn is None or type(fn).__name__ != "NativeGroupNormBackward0":
        return {}
    try:
        mean, rstd = fn._saved_result1, fn._saved_result2
        same = (fn._saved_group == module.num_groups and fn._saved_eps == module.eps
                and fn._saved_N == inputs[0].shape[0] and fn._saved_C == inputs[0].shape[1])
    except (AttributeError, RuntimeError):  # attribute renamed, or saved tensors already freed
        return {}
    if not same or mean.shape != (inputs[0].shape[0], module.num_groups) or rstd.shape != mean.shape:
        return {}
    return {"stats": (mean.detach(), rstd.detach())}


@register_rule(nn.GroupNorm)
def group_norm_rule(module: nn.GroupNorm, inputs: tuple, grad: torch.Tensor, idx: TaskIndex, dtype: torch.dtype,
                    stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``dw_k[c] = sum_{i in k} sum_p B_{i,c,p} xhat_{i,c,p}``, ``db_k[c] = sum_{i in k} sum_p B_{i,c,p}``.

    With the forward's group statistics ``stats = (mean, rstd)`` the weight term is formed as autograd's own
    GroupNorm backward forms it, ``sum_p B xhat = rstd_{i,g} (sum_p B_{i,c,p} x_{i,c,p} - mean_{i,g} sum_p B_{i,c,p})``,
    reading the input once instead of normalising it again.
    """
    out: dict[str, torch.Tensor] = {}
    if not module.affine:
        return out
    n, c = grad.shape[0], grad.shape[1]
    b = grad.to(dtype).reshape(n, c, -1)
    sb = b.sum(-1)  # (n, c)
    if _trainable(module, "weight"):
        if stats is not None and stats[0].dtype == dtype and stats[1].dtype == dtype:
            mean, rstd = stats
            g = module.num_groups
            sbx = torch.einsum("ncp,ncp->nc", b, inputs[0].to(dtype).reshape(n, c, -1))
            dw = (sbx.reshape(n, g, -1) - mean.reshape(n, g, 1) * sb.reshape(n, g, -1)) * rstd.reshape(n, g, 1)
            dw = dw.reshape(n, c)
        else:
            xhat = F.group_norm(inputs[0].to(dtype), module.num_groups, eps=module.eps).reshape(n, c, -1)
            dw = (b * xhat).sum(-1)
        out["weight"] = idx.group(dw).sum(1)
    if _trainable(module, "bias"):
        out["bias"] = idx.group(sb).sum(1)
    return out


# rules that take keyword arguments read off the forward pass: rule -> fn(module, inputs, output) -> kwargs
FORWARD_EXTRAS: dict[Rule, Callable[[nn.Module, tuple, torch.Tensor], dict[str, Any]]] = {
    group_norm_rule: group_norm_saved_stats,
}


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
