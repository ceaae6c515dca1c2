"""Generic per-task gradients for layers without a rule: per-sample vector-Jacobian products with torch.func.

The module is re-run one sample at a time (``vmap`` over the batch, in chunks) on the inputs it saw in the
forward pass, the output gradient of that sample is pulled back to the module's own parameters, and the
per-sample gradients are summed into their tasks. Exact for any module whose samples do not interact; it
costs one extra forward and backward of that module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .grouping import TaskIndex

__all__ = ["fallback_grads", "tensor_leaves"]


def _split_batched(tree: Any, n: int) -> tuple[Any, Any]:
    """Tensors whose first dimension is the batch are vmapped (in_dim 0); everything else is broadcast."""
    if isinstance(tree, torch.Tensor):
        return (tree.detach(), 0) if tree.ndim > 0 and tree.shape[0] == n else (tree.detach(), None)
    if isinstance(tree, (tuple, list)):
        pairs = [_split_batched(x, n) for x in tree]
        return type(tree)(p[0] for p in pairs), type(tree)(p[1] for p in pairs)
    if isinstance(tree, dict):
        pairs = {k: _split_batched(v, n) for k, v in tree.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    return tree, None


def fallback_grads(
    module: nn.Module,
    names: list[str],
    args: tuple,
    kwargs: dict,
    grad_outputs: Any,
    idx: TaskIndex,
    dtype: torch.dtype,
    chunk: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-task gradients ``(K, *shape)`` of ``module``'s parameters ``names`` (dotted, relative to module).

    ``grad_outputs`` holds one output gradient (or None) per tensor of :func:`tensor_leaves` of the output."""
    params = dict(module.named_parameters())
    trainable = {k: params[k].detach() for k in names}
    n = idx.N
    (args_d, kwargs_d), (args_dims, kwargs_dims) = zip(*[_split_batched(args, n), _split_batched(kwargs, n)])
    grad_d, grad_dims = _split_batched(grad_outputs, n)

    def one_sample(p: dict, a: tuple, kw: dict, g: Any) -> dict:
        a1 = tuple(x.unsqueeze(0) if isinstance(x, torch.Tensor) and d == 0 else x for x, d in zip(a, args_dims))
        kw1 = {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) and kwargs_dims[k] == 0 else v) for k, v in kw.items()}
        g1 = torch.utils._pytree.tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, g)

        def f(pp: dict) -> tuple:
            return tuple(tensor_leaves(functional_call(module, pp, a1, kw1)))

        out, pullback = vjp(f, p)
        g1 = tuple(gi.to(o.dtype) if isinstance(gi, torch.Tensor) else torch.zeros_like(o) for o, gi in zip(out, g1))
        return pullback(g1)[0]

    batched = vmap(one_sample, in_dims=(None, args_dims, kwargs_dims, grad_dims))
    sums = {k: torch.zeros((idx.K, *v.shape), dtype=dtype, device=v.device) for k, v in trainable.items()}
    task = idx.task
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        a_c = tuple(x[sl] if d == 0 else x for x, d in zip(args_d, args_dims))
        kw_c = {k: (v[sl] if kwargs_dims[k] == 0 else v) for k, v in kwargs_d.items()}
        g_c = _slice_tree(grad_d, grad_dims, sl)
        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no batching rule for their backward
            per_sample = batched(trainable, a_c, kw_c, g_c)
        t_c = task[sl].to(next(iter(sums.values())).device)
        for k, v in per_sample.items():
            sums[k].index_add_(0, t_c, v.to(dtype))
    return sums


def _slice_tree(tree: Any, dims: Any, sl: slice) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree[sl] if dims == 0 else tree
    if isinstance(tree, (tuple, list)):
        return type(tree)(_slice_tree(t, d, sl) for t, d in zip(tree, dims))
    return tree


def tensor_leaves(out: Any) -> list[torch.Tensor]:
    """The tensors of a module's output, in a fixed order: the output itself, or the tensors inside tuples, lists,
    dicts (diffusers' ``*Output`` classes are dicts) and dataclasses, depth first; anything else is skipped."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        items = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        items = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        return []
    return [leaf for item in items for leaf in tensor_leaves(item)]
