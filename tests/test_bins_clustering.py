"""Timestep bins clustered from a fine Gram (``TimestepBins.from_gram``, ``gradconflict.clustering``).

References: brute force over every contiguous partition (the association computed with plain Python loops),
the k-means scatter of explicit vectors, and block-diagonal affinities whose blocks are known."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradconflict as gc
from gradconflict.clustering import affinity_matrix, cluster_intervals


def _association(A: np.ndarray, cuts) -> float:
    """sum over intervals of (1/size) * sum of A over the interval's pairs, diagonal included (Python loops)."""
    total = 0.0
    for a, b in zip(cuts[:-1], cuts[1:]):
        total += sum(float(A[i][j]) for i in range(a, b) for j in range(a, b)) / (b - a)
    return total


def _brute_force(A: np.ndarray, K: int, min_width: int) -> float:
    M = len(A)
    best = -np.inf
    for inner in itertools.combinations(range(1, M), K - 1):
        cuts = (0, *inner, M)
        if min(b - a for a, b in zip(cuts[:-1], cuts[1:])) >= min_width:
            best = max(best, _association(A, cuts))
    return best


def test_dp_equals_brute_force_over_all_contiguous_partitions() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for M in range(1, 10):
        for K in range(1, min(4, M) + 1):
            for min_width in (1, 2):
                if K * min_width > M:
                    continue
                for _ in range(2):
                    X = rng.normal(size=(M, M))
                    A = (X + X.T) / 2  # any symmetric affinity, not only a PSD one
                    cuts, value = cluster_intervals(A, K, min_width)
                    assert cuts[0] == 0 and cuts[-1] == M and len(cuts) == K + 1
                    assert np.all(np.diff(cuts) >= min_width)
                    best = _brute_force(A, K, min_width)
                    assert value == pytest.approx(best, rel=1e-12, abs=1e-12)
                    assert _association(A, cuts) == pytest.approx(best, rel=1e-12, abs=1e-12)  # the cuts attain it
                    checked += 1
    assert checked == 100  # every (M, K, min_width) with K * min_width <= M, twice


def test_association_is_contiguous_kmeans_of_the_unit_gradients() -> None:
    """sum_i A_ii - F equals the k-means scatter of the unit gradients around each interval's mean."""
    rng = np.random.default_rng(1)
    g = rng.normal(size=(8, 5)) * rng.uniform(0.1, 10, size=(8, 1))
    G = g @ g.T
    cuts, F = cluster_intervals(affinity_matrix(G, "cosine"), 3)
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    scatter = sum(((u[a:b] - u[a:b].mean(0)) ** 2).sum() for a, b in zip(cuts[:-1], cuts[1:]))
    assert 8 - F == pytest.approx(scatter, rel=1e-10)
    # and it is the smallest scatter over all contiguous 3-partitions (raw gradients for affinity="gram")
    cuts_g, F_g = cluster_intervals(affinity_matrix(G, "gram"), 3)
    scatters = [sum(((g[a:b] - g[a:b].mean(0)) ** 2).sum() for a, b in zip(c[:-1], c[1:]))
                for c in ((0, i, j, 8) for i, j in itertools.combinations(range(1, 8), 2))]
    assert np.trace(G) - F_g == pytest.approx(min(scatters), rel=1e-10)


@pytest.mark.parametrize("widths", [[3, 7, 2, 8, 5], [1, 12, 4], [10, 10], [2, 2, 2, 2, 2, 2, 3]])
def test_block_diagonal_affinity_is_recovered_exactly(widths) -> None:
    rng = np.random.default_rng(sum(widths))
    M = sum(widths)
    block = np.repeat(np.arange(len(widths)), widths)
    A = (block[:, None] == block[None, :]).astype(float)
    noise = rng.normal(scale=0.1, size=(M, M))
    A = A + (noise + noise.T) / 2
    cuts, _ = cluster_intervals(A, len(widths))
    np.testing.assert_array_equal(cuts, np.concatenate([[0], np.cumsum(widths)]))


def test_from_gram_recovers_gradient_blocks_as_timestep_bins() -> None:
    """Gradients sharing a direction within blocks (with very different norms) -> the blocks, on the fine grid."""
    rng = np.random.default_rng(2)
    widths = [4, 9, 3, 14]
    directions = rng.normal(size=(len(widths), 64))
    g = np.concatenate([np.tile(d, (w, 1)) for d, w in zip(directions, widths)])
    g = (g + 0.15 * rng.normal(size=g.shape)) * np.exp(rng.uniform(-3, 3, size=(len(g), 1)))
    fine = gc.TimestepBins.uniform(1000, 30)
    bins = gc.TimestepBins.from_gram(torch.from_numpy(g @ g.T), fine, 4)
    assert isinstance(bins, gc.TimestepBins) and bins.T == 1000 and bins.K == 4
    assert bins.edges[0] == 0 and bins.edges[-1] == 1000
    np.testing.assert_array_equal(bins.edges, fine.edges[[0, 4, 13, 16, 30]])
    assert set(bins.edges.tolist()) <= set(fine.edges.tolist())  # every edge on the fine grid
    # a DataFrame Gram (as gram.csv reads) gives the same bins
    frame = pd.DataFrame(g @ g.T)
    np.testing.assert_array_equal(gc.TimestepBins.from_gram(frame, fine, 4).edges, bins.edges)


def test_min_width_is_honoured() -> None:
    # a lone dissenting fine bin: without min_width it is an interval of its own, with min_width = 3 it is not
    M = 12
    A = np.ones((M, M))
    A[5, :] = A[:, 5] = -1.0
    A[5, 5] = 1.0
    cuts, _ = cluster_intervals(A, 3)
    assert 1 in np.diff(cuts)
    cuts3, F3 = cluster_intervals(A, 3, min_width=3)
    assert np.all(np.diff(cuts3) >= 3)
    assert F3 == pytest.approx(_brute_force(A, 3, 3))
    fine = gc.TimestepBins.uniform(120, M)
    assert np.all(np.diff(gc.TimestepBins.from_gram(A, fine, 3, min_width=3).edges) >= 30)


@pytest.mark.parametrize("G, K, kw, match", [
    (np.eye(3), 4, {}, "K = 4 intervals; use K <= M"),
    (np.eye(3), 0, {}, "K must be a positive whole number"),
    (np.ones((3, 4)), 1, {}, "square M x M"),
    (np.array([[1.0, np.nan], [np.nan, 1.0]]), 1, {}, "NaN/Inf"),
    (np.eye(5), 3, {"min_width": 2}, "need 6 fine bins but there are M = 5"),
    (np.eye(5), 2, {"min_width": 0}, "min_width must be a positive"),
])
def test_bad_input_is_refused_with_a_clear_error(G, K, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        cluster_intervals(G, K, **kw)


def test_from_gram_refusals() -> None:
    fine = gc.TimestepBins.uniform(100, 4)
    with pytest.raises(ValueError, match="fine bin 2 has squared gradient norm"):
        gc.TimestepBins.from_gram(np.diag([1.0, 1.0, 0.0, 1.0]), fine, 2)
    with pytest.raises(ValueError, match="fine_bins has M = 4"):
        gc.TimestepBins.from_gram(np.eye(5), fine, 2)
    with pytest.raises(ValueError, match="unknown affinity"):
        gc.TimestepBins.from_gram(np.eye(4), fine, 2, affinity="corr")


def test_bins_csv_round_trip_and_refusals(tmp_path: Path) -> None:
    bins = gc.TimestepBins.from_edges([0, 30, 70, 200, 1000], 1000)
    frame = bins.to_frame().rename(columns={"task": "bin"})
    frame.to_csv(tmp_path / "bins.csv", index=False)
    back = gc.TimestepBins.from_csv(tmp_path / "bins.csv", T=1000)
    np.testing.assert_array_equal(back.edges, bins.edges)
    assert gc.TimestepBins.from_csv(tmp_path / "bins.csv").T == 1000
    cases = {
        "gap": ([0, 30, 70], [29, 68, 999], "bin 2 starts at t = 70 but bin 1 ends at t = 68: it leaves a gap"),
        "overlap": ([0, 30, 70], [29, 75, 999], "overlaps the previous one"),
        "start": ([5, 30], [29, 999], "starts at t = 5, not 0"),
        "short": ([0, 30], [29, 499], "end at t = 499 but the model's schedule has T = 1000"),
    }
    for name, (lo, hi, match) in cases.items():
        path = tmp_path / f"{name}.csv"
        pd.DataFrame({"bin": range(len(lo)), "t_low": lo, "t_high": hi}).to_csv(path, index=False)
        with pytest.raises(ValueError, match=match):
            gc.TimestepBins.from_csv(path, T=1000)
    pd.DataFrame({"lo": [0], "hi": [999]}).to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(ValueError, match="missing t_low, t_high"):
        gc.TimestepBins.from_csv(tmp_path / "cols.csv")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gc.TimestepBins.from_csv(tmp_path / "none.csv")
    with pytest.raises(ValueError, match=r"is a folder \(it holds bins.csv: pass .*bins.csv\)"):
        gc.TimestepBins.from_csv(tmp_path)  # the folder `gradconflict bins --out` wrote, not its bins.csv
