"""Alternative ways to build a convolution's K per-task weight gradients (the levers of issue #19).

The conv rule (``rules.py``) builds ``dW_k = sum_{i in k} conv_weight_grad(x_i, B_i)`` by default as one grouped
convolution backward with K x groups channel groups; on an H100 cuDNN runs that as thousands of small launches plus
NCHW -> NHWC transposes (``benchmarks/results/``). Two switches, read from the environment so a benchmark can time
each on the same code:

* ``GRADCONFLICT_CONV_WEIGHT=taps``: one batched matrix product per kernel tap. For a tap ``o`` (an offset
  ``(dy, dx)`` of the kernel window) the weight gradient is a plain product over the output positions,
  ``dW_k[:, :, o] = sum_{i in k} sum_p B_{i,:,p} x_{i,:,s p + d o}^T`` (stride s, dilation d, x padded), so the
  K tasks are the batch of one ``bmm`` of ``(K, c_out, m P) x (K, m P, C)``: kh * kw large GEMMs over (tasks x
  positions) per layer instead of K x groups small ones, and one input-sized channels-last copy at a time
  (no kh * kw-fold im2col). Built for a few tasks at a time (``TAPS_MAX_ELEMENTS``).
* ``GRADCONFLICT_CONV_LAYOUT=channels_last``: the default grouped backward with its inputs in channels-last memory
  format, so cuDNN may skip its own layout transposes.

Every choice gives the same numbers up to summation order (``tests/test_engine_sd_shapes.py`` checks each against
a float64 per-task autograd loop).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from .._env import env_choice
from .grouping import TaskIndex
from .precision import HALF_DTYPES, half_bmm

__all__ = ["conv_layout", "to_conv_layout", "taps_weight", "TAPS_MAX_ELEMENTS"]

TAPS_MAX_ELEMENTS = 1 << 26  # elements of the per-chunk copies (input and output gradient of a few tasks)


def conv_layout() -> str:
    """Memory format of the grouped weight-gradient convolution's inputs: ``"contiguous"`` (default) or
    ``"channels_last"``, from the environment variable ``GRADCONFLICT_CONV_LAYOUT``."""
    return env_choice("GRADCONFLICT_CONV_LAYOUT", "contiguous", ("contiguous", "channels_last"))


def to_conv_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the memory format ``conv_layout()`` names (4-D: channels_last, 5-D: channels_last_3d; a 3-D
    tensor has no channels-last format and is returned as it is)."""
    if conv_layout() != "channels_last" or x.ndim not in (4, 5):
        return x
    return x.contiguous(memory_format=torch.channels_last if x.ndim == 4 else torch.channels_last_3d)


def taps_weight(module: nn.Module, xp: torch.Tensor, grad: torch.Tensor, idx: TaskIndex, padding: tuple[int, ...],
                dtype: torch.dtype) -> torch.Tensor:
    """``(K, c_out, C, *kernel)`` per-task weight gradients of a ``groups = 1`` convolution, one ``bmm`` per tap.

    ``xp``: the input ``(N, C, *S)`` padded as the layer pads it except for the zero ``padding`` still to apply;
    ``grad``: the output gradient ``(N, c_out, *S_out)`` (possibly a slice of output channels). Half-precision
    operands of a float32 result are multiplied with float32 accumulation (``half_bmm``); otherwise both are cast
    to ``dtype``.
    """
    nd = grad.ndim - 2
    half = grad.dtype in HALF_DTYPES and xp.dtype == grad.dtype and dtype == torch.float32
    if not half:
        xp, grad = xp.to(dtype), grad.to(dtype)
    if any(padding):
        pads = [p for q in reversed(padding) for p in (q, q)]
        xp = torch.nn.functional.pad(xp, pads)
    n, c_out, c_in = grad.shape[0], grad.shape[1], xp.shape[1]
    out_size = grad.shape[2:]
    P = math.prod(out_size)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    b = idx.group(grad)  # (K, m, c_out, *S_out)
    x = idx.group(xp)  # (K, m, C, *S)
    K, m = b.shape[0], b.shape[1]
    step = max(1, TAPS_MAX_ELEMENTS // max(1, m * P * max(c_in, c_out)))
    channels_last = (0, 1, *range(3, 3 + nd), 2)
    taps = list(itertools.product(*(range(k) for k in kernel)))
    out = torch.empty(len(taps), K, c_out, c_in, dtype=torch.float32 if half else dtype, device=grad.device)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        bk = b[k0:k1].transpose(1, 2).reshape(k1 - k0, c_out, m * P)  # (k, c_out, m P)
        xk = x[k0:k1].permute(*channels_last)  # (k, m, *S, C): a view; each tap's window is copied below
        for j, tap in enumerate(taps):
            window = tuple(slice(o * d, o * d + s * (size - 1) + 1, s)
                           for o, d, s, size in zip(tap, dilation, stride, out_size))
            xs = xk[(slice(None), slice(None), *window)].reshape(k1 - k0, m * P, c_in)  # (k, m P, C)
            out[j, k0:k1] = half_bmm(bk, xs) if half else torch.bmm(bk, xs)
    return out.permute(1, 2, 3, 0).reshape(K, c_out, c_in, *kernel)
