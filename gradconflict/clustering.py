"""Tasks from the conflict structure: contiguous timestep intervals clustered from a fine-grained Gram.

Given the M x M Gram ``G`` of M fine timestep bins (in timestep order), an affinity ``A`` is taken from it:

* ``"cosine"`` (default): ``A_ij = G_ij / sqrt(G_ii G_jj)``, the cosine between the task gradients;
* ``"gram"``: ``A_ij = G_ij``, the raw inner products (bins with large gradients then dominate).

The M fine bins are split into exactly K contiguous intervals ``I_1, ..., I_K`` (each of at least ``min_width``
fine bins) that maximise the *association*

    F(I_1..I_K) = sum_k (1 / |I_k|) sum_{i, j in I_k} A_ij        (diagonal included).

Why this objective: a plain within-interval sum ``sum_k sum_{i,j in I_k} A_ij`` grows with the square of an
interval's size, so with positive affinities it favours one huge interval and K - 1 singletons. Dividing by the
size removes that bias: for ``A`` the Gram of vectors ``u_i`` (unit gradients ``u_i = g_i / |g_i|`` for
"cosine", the gradients themselves for "gram"), ``sum_i A_ii - F`` is exactly the k-means scatter
``sum_k sum_{i in I_k} |u_i - mean_{I_k} u|^2``, so maximising F is k-means on the task gradients restricted to
contiguous clusters. For "cosine" ``F = K + sum_k (|I_k| - 1) * c_k`` with ``c_k`` the mean off-diagonal cosine
inside interval k: the average within-interval agreement, weighted by size. On a block-diagonal affinity (1 within
blocks, 0 across) F = M exactly when every interval lies inside one block, and is smaller otherwise, so with K the
number of blocks the blocks are the unique optimum.

The optimum is found exactly by dynamic programming over the cut points in O(K M^2) time: with 2-D prefix sums
``P`` of ``A`` every interval's within-sum costs O(1), and ``best[k][j]`` (the best F of the first j fine bins in k
intervals) is ``max_i best[k-1][i] + S(i, j) / (j - i)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import pandas as pd

__all__ = ["affinity_matrix", "interval_association", "cluster_intervals", "read_bins_csv"]

Affinity = Literal["cosine", "gram"]


def _as_matrix(G: Any) -> np.ndarray:
    """A float64 copy of a square matrix (ndarray, tensor or DataFrame); refuses other shapes and NaN/Inf."""
    if hasattr(G, "detach"):
        G = G.detach().cpu().numpy()
    A = np.array(G.to_numpy() if isinstance(G, pd.DataFrame) else G, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise ValueError(f"the fine Gram must be a square M x M matrix, got shape {A.shape}; pass the Gram of the "
                         "M fine bins (e.g. task_gram(...).gram)")
    bad = ~np.isfinite(A)
    if np.any(bad):
        i, j = np.argwhere(bad)[0]
        raise ValueError(f"the fine Gram holds {int(bad.sum())} NaN/Inf entries (first at [{i}, {j}]); recompute it "
                         "(e.g. in fp32 without autocast) or drop the bins that overflow")
    return A


def affinity_matrix(G: Any, affinity: Affinity = "cosine") -> np.ndarray:
    """The M x M affinity of a Gram: cosines ``G_ij / sqrt(G_ii G_jj)`` ("cosine") or ``G`` itself ("gram"),
    symmetrised as ``(A + A^T) / 2``."""
    A = _as_matrix(G)
    if affinity == "cosine":
        d = np.diag(A)
        if np.any(d <= 0):
            i = int(np.argmax(d <= 0))
            raise ValueError(f"fine bin {i} has squared gradient norm G[{i}, {i}] = {d[i]:.3g} <= 0, so it has no "
                             "direction to take a cosine of; use more samples per bin, or affinity='gram'")
        s = np.sqrt(d)
        A = A / s[:, None] / s[None, :]
    elif affinity != "gram":
        raise ValueError(f"unknown affinity {affinity!r}; use 'cosine' or 'gram'")
    return (A + A.T) / 2.0


def interval_association(A: np.ndarray, edges: Any) -> float:
    """``F = sum_k (1 / |I_k|) sum_{i, j in I_k} A_ij`` for the intervals ``[edges[k], edges[k+1])`` of fine bins."""
    e = np.asarray(edges, dtype=np.int64)
    return float(sum(A[a:b, a:b].sum() / (b - a) for a, b in zip(e[:-1], e[1:])))


def cluster_intervals(A: Any, K: int, min_width: int = 1) -> tuple[np.ndarray, float]:
    """The K contiguous intervals of the M fine bins that maximise the association F (module docstring).

    ``A``: an M x M affinity (e.g. from ``affinity_matrix``); ``K``: number of intervals, 1 <= K <= M;
    ``min_width``: the fewest fine bins an interval may hold (K * min_width <= M).

    Returns ``(cuts, F)``: ``cuts`` the K + 1 fine-bin indices ``0 = c_0 < ... < c_K = M`` (interval k holds the
    fine bins ``c_k .. c_{k+1} - 1``) and F the attained maximum. Ties are broken towards the earliest cut.
    Exact dynamic programming, O(K M^2) time and O(K M) memory.
    """
    A = _as_matrix(A)
    M = A.shape[0]
    if isinstance(K, bool) or int(K) != K or K < 1:
        raise ValueError(f"K must be a positive whole number of intervals, got {K!r}")
    if isinstance(min_width, bool) or int(min_width) != min_width or min_width < 1:
        raise ValueError(f"min_width must be a positive whole number of fine bins, got {min_width!r}")
    K, min_width = int(K), int(min_width)
    if K > M:
        raise ValueError(f"cannot split M = {M} fine bins into K = {K} intervals; use K <= M or more fine bins")
    if K * min_width > M:
        raise ValueError(f"K = {K} intervals of at least min_width = {min_width} fine bins need {K * min_width} fine "
                         f"bins but there are M = {M}; lower K or min_width, or use more fine bins")
    A = (A + A.T) / 2.0
    P = np.zeros((M + 1, M + 1))
    P[1:, 1:] = A.cumsum(0).cumsum(1)
    idx = np.arange(M + 1)
    # S[i, j] / (j - i) for every interval [i, j) with j - i >= min_width, else -inf
    I, J = idx[:, None], idx[None, :]
    width = J - I
    with np.errstate(divide="ignore", invalid="ignore"):
        value = (P[J, J] - P[I, J] - P[J, I] + P[I, I]) / width
    value = np.where(width >= min_width, value, -np.inf)
    best = np.full((K + 1, M + 1), -np.inf)
    arg = np.zeros((K + 1, M + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for k in range(1, K + 1):
        cand = best[k - 1][:, None] + value  # cand[i, j]: first k-1 intervals end at i, interval k is [i, j)
        arg[k] = np.argmax(cand, axis=0)  # argmax: first maximum, the earliest cut
        best[k] = cand[arg[k], idx]
    cuts = np.empty(K + 1, dtype=np.int64)
    cuts[K] = M
    for k in range(K, 0, -1):
        cuts[k - 1] = arg[k, cuts[k]]
    assert cuts[0] == 0 and np.all(np.diff(cuts) >= min_width), cuts
    return cuts, float(best[K, M])


def read_bins_csv(path: Union[str, Path], T: Union[int, None] = None) -> tuple[np.ndarray, int]:
    """The edges of the bins in a bins CSV (as ``gradconflict bins`` writes): one row per bin, in timestep order,
    with columns ``t_low`` and ``t_high`` (both inclusive); other columns (bin, label, width) are ignored.

    The bins must be contiguous (``t_low`` of each row = ``t_high`` of the previous + 1) and start at 0; with
    ``T`` they must end at ``T - 1`` (cover the model's ``0..T-1``), without it T is ``t_high`` of the last row + 1.
    Returns ``(edges, T)`` with the K + 1 edges of ``TimestepBins``. Raises ``ValueError`` naming the file and the
    fix otherwise.
    """
    path = Path(path)
    if path.is_dir():
        inside = " (it holds bins.csv: pass " + str(path / "bins.csv") + ")" if (path / "bins.csv").is_file() else ""
        raise ValueError(f"bins file {path} is a folder{inside}; pass the bins.csv that `gradconflict bins --out DIR` "
                         "writes (DIR/bins.csv)")
    if not path.is_file():
        raise FileNotFoundError(f"bins file {path} does not exist; write one with `gradconflict bins --out DIR` "
                                "(DIR/bins.csv)")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a readable bins CSV ({str(err).splitlines()[0]}); write it with "
                         "`gradconflict bins` (columns bin, t_low, t_high, label)") from None
    missing = [c for c in ("t_low", "t_high") if c not in frame.columns]
    if missing or len(frame) == 0:
        raise ValueError(f"{path}: a bins CSV needs one row per bin with columns t_low and t_high (inclusive); "
                         f"{'missing ' + ', '.join(missing) if missing else 'no rows'} (columns: {list(frame.columns)})")
    lo, hi = (pd.to_numeric(frame[c], errors="coerce").to_numpy(np.float64) for c in ("t_low", "t_high"))
    bad = ~(np.isfinite(lo) & np.isfinite(hi) & (lo == np.round(lo)) & (hi == np.round(hi)))
    if np.any(bad):
        r = int(np.argmax(bad))
        raise ValueError(f"{path}: row {r} (bin {r}) has t_low = {frame['t_low'][r]!r}, t_high = {frame['t_high'][r]!r}; "
                         "both must be whole timesteps")
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    if lo[0] != 0:
        raise ValueError(f"{path}: the first bin starts at t = {lo[0]}, not 0; the bins must cover every timestep "
                         "0..T-1")
    if np.any(hi < lo):
        r = int(np.argmax(hi < lo))
        raise ValueError(f"{path}: bin {r} is empty (t_low = {lo[r]} > t_high = {hi[r]}); both ends are inclusive")
    gap = lo[1:] != hi[:-1] + 1
    if np.any(gap):
        r = int(np.argmax(gap)) + 1
        what = "overlaps the previous one" if lo[r] <= hi[r - 1] else "leaves a gap after the previous one"
        raise ValueError(f"{path}: bin {r} starts at t = {lo[r]} but bin {r - 1} ends at t = {hi[r - 1]}: it {what}; "
                         f"bins must be contiguous (t_low = previous t_high + 1) and in timestep order")
    if T is not None and hi[-1] != T - 1:
        raise ValueError(f"{path}: the bins end at t = {hi[-1]} but the model's schedule has T = {T} timesteps "
                         f"(0..{T - 1}); cluster bins for this schedule (`gradconflict bins` with this --model)")
    return np.concatenate([lo, hi[-1:] + 1]), int(hi[-1] + 1 if T is None else T)
