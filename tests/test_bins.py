"""Tests for gradconflict.bins.TimestepBins."""

import math

import numpy as np
import pytest
import torch

from gradconflict import weighting as W
from gradconflict.bins import TimestepBins
from gradconflict.schedule import NoiseSchedule


# ----------------------------------------------------------------------------- construction
def test_uniform_1000_10():
    b = TimestepBins.uniform(1000, 10)
    assert b.K == 10 and len(b) == 10 and b.T == 1000
    np.testing.assert_array_equal(b.edges, np.arange(0, 1001, 100))
    np.testing.assert_array_equal(b.widths, [100] * 10)
    np.testing.assert_array_equal(b.lows, np.arange(0, 1000, 100))
    np.testing.assert_array_equal(b.highs, np.arange(100, 1001, 100))
    np.testing.assert_allclose(b.centers, np.arange(49.5, 1000, 100))
    assert b.labels[0] == "0-99" and b.labels[1] == "100-199" and b.labels[-1] == "900-999"


def test_uniform_uneven():
    b = TimestepBins.uniform(10, 3)  # linspace 0, 3.33, 6.67, 10
    np.testing.assert_array_equal(b.edges, [0, 3, 7, 10])
    np.testing.assert_array_equal(b.widths, [3, 4, 3])
    assert b.labels == ["0-2", "3-6", "7-9"]
    for T, K in [(10, 4), (1000, 7), (999, 10), (37, 37), (5, 1)]:
        b = TimestepBins.uniform(T, K)
        assert b.K == K and b.edges[0] == 0 and b.edges[-1] == T
        assert b.widths.sum() == T and np.all(b.widths >= 1)
        assert b.widths.max() - b.widths.min() <= 1


@pytest.mark.parametrize("T, K", [(10, 11), (10, 0), (10, -1), (1, 2)])
def test_uniform_bad_K_raises(T, K):
    with pytest.raises(ValueError):
        TimestepBins.uniform(T, K)


def test_from_edges_ok_and_partial_cover():
    b = TimestepBins.from_edges([100, 200, 300], 1000)
    assert b.K == 2 and b.edges.dtype == np.int64
    assert b.labels == ["100-199", "200-299"]
    assert b.task_of(150) == 0 and b.task_of(299) == 1
    for t in (50, 99, 300, 999):
        with pytest.raises(ValueError):
            b.task_of(t)
    # integer-valued float edges are accepted
    np.testing.assert_array_equal(TimestepBins.from_edges([0.0, 5.0, 10.0], 10).edges, [0, 5, 10])


@pytest.mark.parametrize(
    "edges, T",
    [
        ([0, 5, 3, 10], 10),  # not increasing
        ([0, 5, 5, 10], 10),  # duplicate edge = empty bin
        ([0, 0], 10),
        ([-1, 5, 10], 10),  # outside [0, T]
        ([0, 5, 11], 10),
        ([5], 10),  # too short
        ([], 10),
        ([[0, 5], [5, 10]], 10),  # not 1-D
        ([0, 2.5, 10], 10),  # non-integer
        ([0, 1], 0),  # T < 1
    ],
)
def test_from_edges_errors(edges, T):
    with pytest.raises(ValueError):
        TimestepBins.from_edges(edges, T)


# ----------------------------------------------------------------------------- task_of
def test_task_of_kinds_and_values():
    b = TimestepBins.uniform(1000, 10)
    assert b.task_of(0) == 0 and b.task_of(99) == 0 and b.task_of(100) == 1 and b.task_of(999) == 9
    assert isinstance(b.task_of(5), int)
    assert isinstance(b.task_of(np.int64(5)), int)
    arr = b.task_of(np.array([0, 99, 100, 555, 999]))
    assert isinstance(arr, np.ndarray) and arr.dtype == np.int64
    np.testing.assert_array_equal(arr, [0, 0, 1, 5, 9])
    np.testing.assert_array_equal(b.task_of([[0, 250], [750, 998]]), [[0, 2], [7, 9]])
    ten = b.task_of(torch.tensor([0, 99, 100, 555, 999]))
    assert isinstance(ten, torch.Tensor) and ten.dtype == torch.long
    assert ten.tolist() == [0, 0, 1, 5, 9]
    # brute-force reference: the bin k with lo_k <= t < hi_k
    b2 = TimestepBins.from_edges([0, 3, 4, 9, 10], 10)
    exp = [next(k for k in range(4) if b2.edges[k] <= t < b2.edges[k + 1]) for t in range(10)]
    np.testing.assert_array_equal(b2.task_of(np.arange(10)), exp)


@pytest.mark.parametrize("bad", [-1, 1000, [0, 1000], np.array([-5]), torch.tensor([3, 1000]), 2.5, torch.tensor([1.0])])
def test_task_of_out_of_range_or_float_raises(bad):
    b = TimestepBins.uniform(1000, 10)
    with pytest.raises(ValueError):
        b.task_of(bad)


def test_task_of_zero_dim_tensor():
    # BUG (gradconflict/bins.py, TimestepBins.task_of): a 0-d tensor makes np.searchsorted return a numpy
    # scalar, and torch.from_numpy(np.int64) raises TypeError ("expected np.ndarray (got numpy.int64)").
    b = TimestepBins.uniform(1000, 10)
    out = b.task_of(torch.tensor(250))
    assert isinstance(out, torch.Tensor) and int(out) == 2


# ----------------------------------------------------------------------------- log-SNR-uniform bins
def _check_log_snr_uniform(sch, K):
    b = TimestepBins.log_snr_uniform(sch, K)
    T = sch.T
    assert b.K == K and b.T == T and b.edges[0] == 0 and b.edges[-1] == T
    assert np.all(np.diff(b.edges) >= 1)
    lam = np.asarray(sch.log_snr(np.arange(T)))
    last = T - 1 if np.isfinite(lam[-1]) else T - 2  # last finite log-SNR
    total = lam[0] - lam[last]
    step = -np.diff(lam[: last + 1])  # step[i] = lam[i] - lam[i+1] >= 0
    target = total / K
    # Let L_k = lam[0] - k * total / K be the levels and a_k = edges[k] (a_K := last for the final bin).
    # For 0 < k < K the edge a_k is the first t with lam[t] <= L_k, so L_k - step[a_k - 1] < lam[a_k] <= L_k
    # (for k = 0 and the final point, lam equals the level exactly). Hence the span lam[a_k] - lam[a_{k+1}]
    # differs from total/K by less than the log-SNR step just before a_k or just before a_{k+1}.
    ends = list(b.edges[:-1]) + [last]
    spans = []
    for k in range(K):
        a, c = ends[k], ends[k + 1]
        span = lam[a] - lam[c]
        spans.append(span)
        tol = max(step[a - 1] if a > 0 else 0.0, step[c - 1] if c > 0 else 0.0) + 1e-9 * abs(total)
        assert abs(span - target) <= tol, (k, span, target, tol)
    assert sum(spans) == pytest.approx(total, rel=1e-12)
    # the global guarantee: within one (largest) timestep step of total/K
    assert np.max(np.abs(np.array(spans) - target)) <= step.max() + 1e-9
    return b


@pytest.mark.parametrize(
    "sch, K",
    [
        (NoiseSchedule.linear(), 10),
        (NoiseSchedule.linear(), 1),
        (NoiseSchedule.linear(), 20),
        (NoiseSchedule.cosine(), 8),
        (NoiseSchedule.scaled_linear(), 16),
        (NoiseSchedule.linear(zero_terminal_snr=True), 10),
        (NoiseSchedule.cosine(zero_terminal_snr=True), 5),
        (NoiseSchedule.linear(T=100), 6),
    ],
    ids=["linear10", "linear1", "linear20", "cosine8", "scaled16", "linear_zsnr10", "cosine_zsnr5", "linear100_6"],
)
def test_log_snr_uniform(sch, K):
    _check_log_snr_uniform(sch, K)


def test_log_snr_uniform_differs_from_uniform_for_linear():
    b = TimestepBins.log_snr_uniform(NoiseSchedule.linear(), 10)
    # the linear schedule's log-SNR falls fastest at small t: the first bin is narrower than T/K
    assert b.widths[0] < 100


@pytest.mark.parametrize("K", [1001, 0])
def test_log_snr_uniform_too_many_bins_raises(K):
    # only K > T (or K < 1) is impossible; K <= T works (see test_log_snr_uniform_crowded_edges_spread)
    with pytest.raises(ValueError):
        TimestepBins.log_snr_uniform(NoiseSchedule.linear(), K)


# ----------------------------------------------------------------------------- sampling
def test_sample_counts_and_ranges():
    b = TimestepBins.from_edges([0, 3, 10, 20], 20)
    g = torch.Generator().manual_seed(0)
    t, task = b.sample(3000, generator=g)
    assert t.dtype == torch.long and task.dtype == torch.long
    assert t.shape == (9000,) and task.shape == (9000,)
    assert task.tolist() == [0] * 3000 + [1] * 3000 + [2] * 3000
    lo = torch.tensor([0, 3, 10])[task]
    hi = torch.tensor([3, 10, 20])[task]
    assert bool(((t >= lo) & (t < hi)).all())
    # uniform inside each bin: every timestep appears, counts near 3000 / width (binomial sd < 30)
    for k, (a, c) in enumerate([(0, 3), (3, 10), (10, 20)]):
        counts = torch.bincount(t[task == k] - a, minlength=c - a)
        assert counts.numel() == c - a
        expected = 3000 / (c - a)
        assert bool((counts - expected).abs().max() < 6 * math.sqrt(expected)), counts


def test_sample_per_task_counts_sequence():
    b = TimestepBins.uniform(100, 4)
    t, task = b.sample([2, 0, 5, 1], generator=torch.Generator().manual_seed(3))
    assert task.tolist() == [0, 0, 2, 2, 2, 2, 2, 3]
    assert t.shape == (8,)
    np.testing.assert_array_equal(b.task_of(t.numpy()), task.numpy())
    t0, task0 = b.sample(0)
    assert t0.numel() == 0 and task0.numel() == 0


def test_sample_seeds():
    b = TimestepBins.uniform(1000, 10)
    t1, _ = b.sample(50, generator=torch.Generator().manual_seed(42))
    t2, _ = b.sample(50, generator=torch.Generator().manual_seed(42))
    t3, _ = b.sample(50, generator=torch.Generator().manual_seed(43))
    assert torch.equal(t1, t2)
    assert not torch.equal(t1, t3)
    t4, task4 = b.sample(3, device="cpu")
    assert t4.device.type == "cpu" and t4.shape == (30,)


def test_sample_width_one_bins():
    b = TimestepBins.uniform(5, 5)
    t, task = b.sample(10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, task)  # bin k holds only timestep k


@pytest.mark.parametrize("n", [-1, [1, -1, 2], [1, 2]])
def test_sample_bad_counts_raise(n):
    b = TimestepBins.uniform(30, 3)
    with pytest.raises(ValueError):
        b.sample(n)


# ----------------------------------------------------------------------------- strategy weights
@pytest.fixture
def tiny():
    # SNR = a / (1 - a): 9, 4, 1, 0.25
    return NoiseSchedule.from_alphas_cumprod([0.9, 0.8, 0.5, 0.2])


def test_strategy_weights_hand_computed(tiny):
    b = TimestepBins.from_edges([0, 2, 4], 4)
    # min_snr(5): w = 5, 4, 1, 0.25 -> bins 9 and 1.25 of 10.25
    np.testing.assert_allclose(b.strategy_weights(W.min_snr(5.0), tiny), [36 / 41, 5 / 41], rtol=1e-12)
    # snr: 9 + 4 = 13 and 1 + 0.25 = 1.25 of 14.25
    np.testing.assert_allclose(b.strategy_weights(W.snr(), tiny), [13 / 14.25, 1.25 / 14.25], rtol=1e-12)
    # max_snr(1): 9, 4, 1, 1 -> 13 / 15, 2 / 15
    np.testing.assert_allclose(b.strategy_weights(W.max_snr(1.0), tiny), [13 / 15, 2 / 15], rtol=1e-12)
    # inv_snr: 1/9 + 1/4 = 13/36 and 1 + 4 = 5 -> (13/36) / (193/36) = 13/193
    np.testing.assert_allclose(b.strategy_weights(W.inv_snr(), tiny), [13 / 193, 180 / 193], rtol=1e-12)
    b3 = TimestepBins.from_edges([0, 1, 3, 4], 4)
    np.testing.assert_allclose(b3.strategy_weights(W.min_snr(5.0), tiny), [5 / 10.25, 5 / 10.25, 0.25 / 10.25], rtol=1e-12)


@pytest.mark.parametrize("sch", [NoiseSchedule.linear(), NoiseSchedule.cosine(zero_terminal_snr=True)], ids=["linear", "cosine_zsnr"])
def test_strategy_weights_on_simplex(sch):
    b = TimestepBins.log_snr_uniform(sch, 10)
    for strat in W.DEFAULT_STRATEGIES() + [W.soft_min_snr(), W.p2(), W.custom(np.sqrt)]:
        w = b.strategy_weights(strat, sch)
        assert w.shape == (10,)
        assert np.all(np.isfinite(w)) and np.all(w >= 0)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
    # constant strategy -> proportional to the bin widths
    np.testing.assert_allclose(b.strategy_weights(W.constant(), sch), b.widths / sch.T, rtol=1e-12)


def test_strategy_weights_snr_puts_weight_on_low_t():
    sch = NoiseSchedule.linear()
    b = TimestepBins.uniform(1000, 10)
    w = b.strategy_weights(W.snr(), sch)
    assert np.all(np.diff(w) < 0)  # SNR decreases with t
    wm = b.strategy_weights(W.min_snr(5.0), sch)
    # Min-SNR-5 is flat (= 5) where SNR >= 5, so the first bin (all SNR > 5) has weight 500 / total
    snr = np.asarray(sch.snr(np.arange(1000)))
    total = np.minimum(snr, 5.0).sum()
    assert snr[99] > 5.0
    assert wm[0] == pytest.approx(500.0 / total, rel=1e-12)


def test_strategy_weights_T_mismatch_raises(tiny):
    with pytest.raises(ValueError):
        TimestepBins.uniform(5, 2).strategy_weights(W.constant(), tiny)
    with pytest.raises(ValueError):
        TimestepBins.uniform(1000, 10).strategy_weights(W.constant(), NoiseSchedule.linear(T=999))


def test_strategy_weights_zero_total_raises(tiny):
    zero = W.custom(lambda s: np.zeros_like(s), name="zero")
    with pytest.raises(ValueError):
        TimestepBins.uniform(4, 2).strategy_weights(zero, tiny)


# ----------------------------------------------------------------------------- frame
def test_to_frame_columns_and_values(tiny):
    b = TimestepBins.from_edges([0, 1, 4], 4)
    df = b.to_frame()
    assert list(df.columns) == ["task", "label", "t_low", "t_high", "width"]
    assert df["task"].tolist() == [0, 1]
    assert df["label"].tolist() == ["0-0", "1-3"]
    assert df["t_low"].tolist() == [0, 1]
    assert df["t_high"].tolist() == [0, 3]
    assert df["width"].tolist() == [1, 3]
    df2 = b.to_frame(tiny)
    assert list(df2.columns) == ["task", "label", "t_low", "t_high", "width", "log_snr_high", "log_snr_low"]
    np.testing.assert_allclose(df2["log_snr_high"], [math.log(9), math.log(4)], rtol=1e-12)
    np.testing.assert_allclose(df2["log_snr_low"], [math.log(9), math.log(0.25)], rtol=1e-12)


def test_to_frame_zero_terminal_snr():
    sch = NoiseSchedule.linear(zero_terminal_snr=True)
    df = TimestepBins.uniform(1000, 4).to_frame(sch)
    assert len(df) == 4
    assert df["log_snr_low"].iloc[-1] == -math.inf
    assert np.all(np.isfinite(df["log_snr_high"]))
    assert np.all(df["log_snr_high"] > df["log_snr_low"])


def test_edges_read_only():
    b = TimestepBins.uniform(10, 2)
    with pytest.raises(ValueError):
        b.edges[0] = 1


# ----------------------------------------------------------------------------- log-SNR bins with crowded edges
def _first_below(lam, level):
    """First t with lam[t] <= level, by a plain scan (independent of searchsorted)."""
    for t, value in enumerate(lam):
        if value <= level:
            return t
    return len(lam)


def _ideal_edges(sch, K):
    lam = np.asarray(sch.log_snr(np.arange(sch.T)))
    fin = lam[np.isfinite(lam)]
    width = (fin[0] - fin[-1]) / K
    return [0] + [_first_below(lam, fin[0] - k * width) for k in range(1, K)] + [sch.T]


@pytest.mark.parametrize("K", [1, 3, 10, 45])
def test_log_snr_uniform_linear_edges_unchanged(K):
    # for the linear schedule the equal-width construction already gives non-empty bins: the spreading
    # passes must not move a single edge
    sch = NoiseSchedule.linear()
    np.testing.assert_array_equal(TimestepBins.log_snr_uniform(sch, K).edges, _ideal_edges(sch, K))


def _from_log_snr(lam):
    return NoiseSchedule.from_alphas_cumprod(1 / (1 + np.exp(-np.asarray(lam, dtype=np.float64))))


def test_log_snr_uniform_hand_computed():
    # log-SNR 3 .. -3, K = 3: levels 1 and -1 -> first t below them are 2 and 4
    sch = _from_log_snr([3, 2.5, 0.5, 0.2, -1.5, -3])
    np.testing.assert_array_equal(TimestepBins.log_snr_uniform(sch, 3).edges, [0, 2, 4, 6])
    # a final jump 2.6 -> -9 (width 3 per bin): the levels 0, -3, -6 all fall on t = 5; the edges are
    # spread to 3, 4, 5 so that each of the last three bins keeps one timestep
    jump = _from_log_snr([3, 2.9, 2.8, 2.7, 2.6, -9])
    np.testing.assert_array_equal(TimestepBins.log_snr_uniform(jump, 4).edges, [0, 3, 4, 5, 6])


@pytest.mark.parametrize("K", [9, 10, 50])
def test_log_snr_uniform_cosine_outlier(K):
    # the cosine schedule's log-SNR drops from -12.9 (t = 998) to -19.8 (t = 999): several equal-width
    # levels fall on t = 999 and used to leave empty bins (ValueError for K >= 9)
    sch = NoiseSchedule.cosine()
    T = sch.T
    b = TimestepBins.log_snr_uniform(sch, K)
    assert b.K == K and b.edges[0] == 0 and b.edges[-1] == T
    assert np.all(np.diff(b.edges) >= 1)  # strictly increasing, every bin non-empty
    lam = np.asarray(sch.log_snr(np.arange(T)))
    target = (lam[0] - lam[-1]) / K
    step = -np.diff(lam)
    assert step[-1] > target  # the outlier step is wider than a bin
    # bins well clear of the crowded tail keep the equal-width edges and spans
    ideal = _ideal_edges(sch, K)
    clear = [k for k in range(K) if b.edges[k + 1] <= T - K]
    assert len(clear) >= K // 2
    for k in clear:
        a, c = int(b.edges[k]), int(b.edges[k + 1])
        assert (a, c) == (ideal[k], ideal[k + 1])
        tol = max(step[a - 1] if a > 0 else 0.0, step[c - 1]) + 1e-9
        assert abs((lam[a] - lam[c]) - target) <= tol, (k, lam[a] - lam[c], target)


def test_log_snr_uniform_one_timestep_per_bin():
    sch = NoiseSchedule.linear(T=100)
    np.testing.assert_array_equal(TimestepBins.log_snr_uniform(sch, 100).edges, np.arange(101))


# ----------------------------------------------------------------------------- sample(): counts
@pytest.mark.parametrize("n, match", [([1, 2], "K = 4"), ([[1, 2, 3, 4]], "K = 4"), (2.7, "whole"),
                                      ([1, 2.5, 0, 1], "whole"), (-1, ">= 0"), ([1, -1, 0, 2], ">= 0"),
                                      ("3", "whole"), (float("nan"), "whole")])
def test_sample_bad_counts_messages(n, match):
    b = TimestepBins.uniform(1000, 4)
    with pytest.raises(ValueError, match=match):
        b.sample(n)


def test_sample_whole_float_and_numpy_counts():
    b = TimestepBins.uniform(1000, 4)
    t_int, task_int = b.sample(2, generator=torch.Generator().manual_seed(5))
    t_flt, task_flt = b.sample(2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(t_int, t_flt) and task_int.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    _, task = b.sample(np.array([0, 3, 0, 1]))
    assert task.tolist() == [1, 1, 1, 3]
