"""Arithmetic precision of the fused engine: how per-task gradients are built and how they are folded into G.

Two separate questions, answered separately:

* **Building the per-task gradients under autocast.** A Linear or Conv layer that autocast runs in bfloat16
  (or float16) sees its input cast to that dtype and produces a half-precision output, so the layer's output
  gradient is half precision too. The per-task weight gradient ``dW_k = sum_{i in k} B_i^T A_i`` is then built
  from the same half-precision operands autocast used (the input is cast exactly as the forward cast it),
  upcast to float32. Every operand holds at most 11 significant bits, so on a GPU the product runs on TF32
  tensor cores (10 explicit mantissa bits) with *exact* products and float32 accumulation: as accurate as
  float32 arithmetic, at tensor-core speed. Autograd's own half-precision weight gradient rounds its output to
  the half dtype; these per-task gradients do not.

* **Folding** ``G += J J^T`` (``gram_precision``). ``"fp32"`` (the default off the GPU and for float64 models):
  float32 products and sums, TF32 off, each layer's Gram summed in float64 (relative error about 1e-7 for a float32
  model). ``"tf32"``: J's entries rounded to TF32 on CUDA (no effect on the CPU, which has no TF32). ``"bf16"``: J
  rounded to bfloat16, products accumulated in float32 (CUDA: ``torch.mm(..., out_dtype=float32)`` where this torch
  has it; elsewhere the same numbers from float32 products of the rounded values). Both reduced precisions fold a
  layer in pieces of at most :data:`FOLD_COLUMNS` coordinates whose Grams are summed in float64, so rounding, not
  the length of the float32 sums, sets the error: about ``2^-9`` relative per entry of J for bf16, ``2^-11`` for
  TF32, which averages down in G: about 5e-4 (bf16) of its Frobenius norm on random J, 4e-6 to 6e-5 measured on
  model gradients on an H100. They buy speed where the fold dominates (K ~ 1000 tasks on a GPU); ``"fp32"`` is exact
  to float32, and the default ``"auto"`` (``resolve_gram_precision``) picks ``"tf32"`` on a GPU. Under bf16 autocast
  with the bf16 fold, the bf16 layers' per-task gradients come out of their product in bfloat16 directly (the
  float32 accumulator rounded once: the same numbers without a float32 J in memory). At K >= ``SYMMETRIC_MIN_K``
  the fold computes only the row blocks of ``J J^T`` on and below the diagonal (``symmetric_product``: 5/8 of the
  flops with 4 blocks) on the CPU and for the fp32 fold on CUDA; CUDA's reduced-precision folds run faster as one
  plain product.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .._env import env_choice

__all__ = ["GRAM_PRECISIONS", "HALF_DTYPES", "FOLD_COLUMNS", "check_gram_precision", "resolve_gram_precision", "tf32",
           "layer_gram", "precision_eps", "half_bmm", "full_precision_reduction", "symmetric_product"]

GRAM_PRECISIONS = ("fp32", "tf32", "bf16")
HALF_DTYPES = (torch.float16, torch.bfloat16)
FOLD_COLUMNS = 1 << 16  # reduced-precision folds: coordinates per float32 partial sum (pieces summed in float64)
_EPS = {"fp32": torch.finfo(torch.float32).eps, "tf32": 2.0**-10, "bf16": torch.finfo(torch.bfloat16).eps}
_OUT_DTYPE: dict[str, bool] = {}  # op name -> whether it takes out_dtype=float32 for half inputs on CUDA here


def check_gram_precision(precision: str, allow_auto: bool = False) -> str:
    if precision not in GRAM_PRECISIONS and not (allow_auto and precision == "auto"):
        choices = ("auto",) + GRAM_PRECISIONS if allow_auto else GRAM_PRECISIONS
        raise ValueError(f"unknown gram_precision {precision!r}; use one of {choices} "
                         "('fp32' is exact to float32, 'tf32' and 'bf16' trade 1e-5 to 1e-3 of accuracy for speed)")
    return precision


def resolve_gram_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"auto"``: ``"tf32"`` for a float32 or half-precision model on a GPU (measured on an H100 at K = 100 and
    1000: Gram error 4e-6 to 1e-5 and 4e-5 relative against the float32 fold, at 0.96x and 0.35x its time), ``"fp32"``
    elsewhere (the CPU has no TF32; float64 models keep float64 products). Other values are returned checked."""
    precision = check_gram_precision(precision, allow_auto=True)
    if precision != "auto":
        return precision
    return "tf32" if device.type == "cuda" and dtype != torch.float64 else "fp32"


def precision_eps(precision: str) -> float:
    """Machine epsilon of the fold's input rounding (float32's for ``"fp32"``)."""
    return float(_EPS[check_gram_precision(precision)])


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set CUDA's TF32 switches (matmul and cuDNN) for the duration of the block, then restore them; no effect on
    the CPU. Uses the legacy ``allow_tf32`` switches, which code inside the block may read too; where a user has
    set torch's newer ``fp32_precision`` settings (2.9+), reading the legacy ones raises, and those are used."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        old = matmul.allow_tf32, cudnn.allow_tf32
        new = enabled, enabled

        def put(values: tuple) -> None:
            matmul.allow_tf32, cudnn.allow_tf32 = values
    except RuntimeError:  # the new API is in use: mixing the two raises
        old = matmul.fp32_precision, cudnn.conv.fp32_precision
        new = ("tf32", "tf32") if enabled else ("ieee", "ieee")

        def put(values: tuple) -> None:
            matmul.fp32_precision, cudnn.conv.fp32_precision = values
    put(new)
    try:
        yield
    finally:
        put(old)


def layer_gram(J: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """``J J^T`` in float64 for a (K, n) block of per-task gradient coordinates, at the given fold precision.

    float64 blocks (float64 models) are multiplied in float64 at ``"fp32"``; otherwise ``"fp32"`` is one float32
    product with TF32 off. ``"tf32"`` and ``"bf16"`` round J and sum :data:`FOLD_COLUMNS`-column pieces in float64.
    """
    if precision == "fp32":
        Jd = J if J.dtype == torch.float64 else J.float()
        with tf32(False):
            return symmetric_product(Jd, lambda x, y: x @ y.T, "fp32").to(torch.float64)
    gram = torch.zeros(J.shape[0], J.shape[0], dtype=torch.float64, device=J.device)
    for start in range(0, J.shape[1], FOLD_COLUMNS):
        piece = J[:, start : start + FOLD_COLUMNS]
        gram += (_bf16_product(piece) if precision == "bf16" else _tf32_product(piece)).to(torch.float64)
    return gram


SYMMETRIC_BLOCKS = 4  # row blocks of J for K >= SYMMETRIC_MIN_K on the CPU: (b + 1) / (2 b) of the full product's flops
# on CUDA, per fold precision (1: the plain product). Measured on an H100 (bench_fold.py, K = 1000, 2M columns):
# fp32 4 blocks 0.66x the plain product's time; tf32 and bf16 2 blocks 1.55x and 1.62x (their 65536-column pieces
# are too short for the saved flops to pay for the extra launches and the mirrored copies)
SYMMETRIC_BLOCKS_CUDA = {"fp32": 4, "tf32": 1, "bf16": 1}
SYMMETRIC_MIN_K = 256


def symmetric_product(a: torch.Tensor, product, precision: str = "fp32") -> torch.Tensor:
    """``a a^T`` from the products of row blocks on and below the diagonal only, each block above the diagonal
    the transpose of its mirror, for K >= ``SYMMETRIC_MIN_K`` rows (the fold at K ~ 1000): 5/8 of the flops of
    one product with 4 blocks (measured 0.70x the time of the full float32 product at K = 1000 on one CPU core,
    0.66x on an H100). On CUDA the blocks depend on the fold ``precision`` (``SYMMETRIC_BLOCKS_CUDA``: the
    reduced-precision folds run the plain product there). ``product(x, y)`` returns ``x y^T``."""
    K = a.shape[0]
    if precision not in SYMMETRIC_BLOCKS_CUDA:
        raise ValueError(f"precision must be one of {', '.join(SYMMETRIC_BLOCKS_CUDA)}, got {precision!r}")
    blocks = SYMMETRIC_BLOCKS_CUDA[precision] if a.device.type == "cuda" else SYMMETRIC_BLOCKS
    if K < SYMMETRIC_MIN_K or blocks <= 1:
        return product(a, a)
    edges = [K * i // blocks for i in range(blocks + 1)]
    rows = [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]
    out = None
    for i, ri in enumerate(rows):
        for rj in rows[: i + 1]:
            block = product(a[ri], a[rj])
            if out is None:
                out = block.new_empty(K, K)
            out[ri, rj] = block
            if ri != rj:
                out[rj, ri] = block.T
    return out


def _tf32_product(piece: torch.Tensor) -> torch.Tensor:
    p = piece.float()
    with tf32(True):
        return symmetric_product(p, lambda x, y: x @ y.T, "tf32")


def _bf16_product(piece: torch.Tensor) -> torch.Tensor:
    """float32 ``b b^T`` of ``b = bf16(piece)`` with float32 accumulation."""
    b = piece.to(torch.bfloat16)
    return symmetric_product(b, lambda x, y: _half_product(torch.mm, x, y.T), "bf16")


def half_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` of half-precision batches, accumulated and returned in float32 (exact products)."""
    return _half_product(torch.bmm, a, b)


@contextlib.contextmanager
def full_precision_reduction() -> Iterator[None]:
    """Switch off cuBLAS's reduced-precision reductions for half-precision matmuls (split-K partial sums kept in
    bf16 / fp16) for the block, so every product accumulates in float32; restored afterwards."""
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction, matmul.allow_fp16_reduced_precision_reduction = old


def half_product_mode() -> str:
    """How half-precision operands are multiplied into float32 on CUDA: ``"out_dtype"`` (default) or ``"tf32"``
    (upcast, TF32 products), from the environment variable ``GRADCONFLICT_HALF_PRODUCT``; both give the same
    numbers up to summation order. On an H100 with torch 2.11 the out_dtype path ran as sm75 CUTLASS kernels at
    about 17% of the bf16 rate (``benchmarks/results/``): the switch lets ``gpu_check.py`` time both."""
    return env_choice("GRADCONFLICT_HALF_PRODUCT", "out_dtype", ("out_dtype", "tf32"))


def _half_product(op, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``op(a, b)`` for half-precision ``a, b`` in float32: on CUDA with ``out_dtype=float32`` (tensor cores, no
    reduced-precision reduction) where this torch has it, else as TF32 products of the upcast values (exact:
    half values fit TF32's 10-bit mantissa); on the CPU as float32 products (the same numbers)."""
    name = op.__name__
    if a.device.type == "cuda" and _OUT_DTYPE.get(name, True) and half_product_mode() == "out_dtype":
        try:
            with full_precision_reduction():
                return op(a, b, out_dtype=torch.float32)
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # no out_dtype for this op in this torch
            _OUT_DTYPE[name] = False
    with tf32(True):
        return op(a.float(), b.float())
