"""C2 as the paper means it (#16.4): online UGD against a hand-written softmax/Adam step, regrets against cvxpy,
movements of a hand-made frame, the verdict over synthetic models, a smoke run on a tiny model and Fig. 3."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
import torch

from gradconflict.comparison.report import CLAIM_COLUMNS
from gradconflict.figures.ugd_online import fig3_online_weights
from gradconflict.pareto import solve
from gradconflict.pareto.ugd import ugd
from gradconflict.reproduce.c2 import (UGDState, c2_iterations, c2_online, c2_statistics, c2_table, claim_c2_models,
                                       pareto_regret, ugd_online_step)

T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (table value)
G3 = np.array([[2.0, -0.5, 0.3], [-0.5, 1.0, 0.2], [0.3, 0.2, 0.5]])


def _hand_adam(G, lam, beta, m, v, t, steps, lr, b1=0.9, b2=0.999, eps=1e-12):
    """Reference: explicit softmax Jacobian J = diag(w) - w w^T, grad = J^T (2 A w), A = (G + lam I) / max diag."""
    A = G + lam * np.eye(len(G))
    A = A / A.diagonal().max()
    for _ in range(steps):
        w = np.exp(beta) / np.exp(beta).sum()
        J = np.diag(w) - np.outer(w, w)
        grad = J.T @ (2 * A @ w)
        # the Jacobian form against float64 autograd
        b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
        wt = torch.softmax(b, 0)
        (wt @ torch.tensor(A) @ wt).backward()
        np.testing.assert_allclose(grad, b.grad.numpy(), rtol=1e-12, atol=1e-15)
        t += 1
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad ** 2
        beta = beta - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return np.exp(beta) / np.exp(beta).sum(), beta, m, v, t


def test_online_step_matches_hand_adam_with_persistent_state() -> None:
    G2 = G3 * 0.01 + np.diag([0.0, 0.02, 0.0])  # the next iteration's Gram: another scale, another optimum
    state = UGDState.uniform(3)
    w1, state = ugd_online_step(G3, 0.1, state, steps=3, lr=0.05)
    w2, state = ugd_online_step(G2, 0.004, state, steps=4, lr=0.05)
    hw1, beta, m, v, t = _hand_adam(G3, 0.1, np.zeros(3), np.zeros(3), np.zeros(3), 0, 3, 0.05)
    hw2, beta, m, v, t = _hand_adam(G2, 0.004, beta, m, v, t, 4, 0.05)
    np.testing.assert_allclose(w1, hw1, rtol=1e-13)
    np.testing.assert_allclose(w2, hw2, rtol=1e-13)
    np.testing.assert_allclose(state.beta, beta, rtol=1e-13)
    assert state.t == t == 7
    assert not np.allclose(w1, 1 / 3)  # it moved


def test_online_step_with_reset_moments_is_a_warm_started_ugd_call() -> None:
    start = UGDState(np.array([0.3, -0.2, 0.1]), np.full(3, 0.5), np.full(3, 0.1), 40)
    w, state = ugd_online_step(G3, 0.1, start, steps=5, lr=0.05, reset_moments=True)
    hw, *_ = _hand_adam(G3, 0.1, start.beta, np.zeros(3), np.zeros(3), 0, 5, 0.05)
    np.testing.assert_allclose(w, hw, rtol=1e-13)
    A = (G3 + 0.1 * np.eye(3)) / (G3 + 0.1 * np.eye(3)).diagonal().max()
    W, iters, _ = ugd(A[None], steps=5, lr=0.05, beta0=start.beta, tol=0.0)
    np.testing.assert_allclose(w, W[0], rtol=1e-12)
    assert iters[0] == 5 and state.t == 5


def test_online_step_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="K x K"):
        ugd_online_step(G3, 0.1, UGDState.uniform(4))
    with pytest.raises(ValueError, match="lr"):
        ugd_online_step(G3, 0.1, UGDState.uniform(3), lr=0.0)


def _cvxpy_optimum(G: np.ndarray, lam: float) -> float:
    w = cp.Variable(len(G))
    A = G + lam * np.eye(len(G))
    prob = cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(A))), [w >= 0, cp.sum(w) == 1])
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return float(prob.value)


def test_regret_zero_at_the_optimum_positive_elsewhere_against_cvxpy() -> None:
    B = np.array([[1.0, -0.8, 0.3, 0.1], [0.2, 0.5, -0.9, 0.4]])
    G = B.T @ B  # rank 2: conflicting tasks, a sparse-ish optimum
    lam = 0.05
    f_star = _cvxpy_optimum(G, lam)
    w_auto = np.asarray(solve(G, lam, method="auto").weights)
    assert pareto_regret(G, lam, w_auto, f_star) == pytest.approx(0.0, abs=1e-7)
    u = np.full(4, 0.25)
    by_hand = (u @ G @ u + lam * 0.25 - f_star) / f_star
    assert pareto_regret(G, lam, u, f_star) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand > 0.01
    e = np.array([1.0, 0, 0, 0])
    assert pareto_regret(G, lam, e, f_star) == pytest.approx((G[0, 0] + lam - f_star) / f_star, rel=1e-12)


def _hand_frame() -> pd.DataFrame:
    """K = 2, checkpoints 0 and 10, three iterations each; bin 0 weight a, bin 1 weight 1 - a."""
    a = {"ugd_online": {0: [0.5, 0.6, 0.4], 10: [0.3, 0.3, 0.5]},
         "exact_small": {0: [0.5, 0.55, 0.5], 10: [0.2, 0.4, 0.4]},
         "exact_big": {0: [0.5] * 3, 10: [0.35] * 3},
         "exact_big_prev": {10: [0.5] * 3},
         "uniform": {0: [0.5] * 3, 10: [0.5] * 3}}
    regret = {"ugd_online": {0: [0.1, 0.2, 0.3], 10: [0.05, 0.05, 0.4]},
              "exact_small": {0: [0.01, 0.02, 0.03], 10: [0.0, 0.06, 0.0]},
              "exact_big": {0: [0.0] * 3, 10: [0.0] * 3},
              "exact_big_prev": {10: [0.02] * 3},
              "uniform": {0: [1.0] * 3, 10: [1.0] * 3}}
    rows = []
    for source, per in a.items():
        for step, values in per.items():
            for i, x in enumerate(values):
                r = regret[source][step][i]
                rows += [dict(step=step, iter=i, source=source, bin=0, weight=x, regret=r),
                         dict(step=step, iter=i, source=source, bin=1, weight=1 - x, regret=r)]
    frame = pd.DataFrame(rows)
    frame.attrs.update(lam=0.1, per_task=2, ugd_steps=5, ugd_lr=0.05)
    return frame


def test_c2_statistics_on_a_hand_made_frame() -> None:
    s = c2_statistics(_hand_frame())
    # UGD moves 0.2, 0.4 | 0, 0.4; exact small 0.1, 0.1 | 0.4, 0 (L1 = 2 |delta a| with K = 2)
    assert s["l1_ugd"] == pytest.approx(0.25)
    assert s["l1_exact_small"] == pytest.approx(0.15)
    assert s["l1_excess"] == pytest.approx(0.10)
    assert s["l1_ugd_to_exact_small"] == pytest.approx((0 + 0.1 + 0.2 + 0.2 + 0.2 + 0.2) / 6)
    assert s["drift_exact_big"] == pytest.approx(0.3)
    assert s["drift_ugd"] == pytest.approx(2 * (0.5 - 1.1 / 3))
    assert s["drift_exact_small"] == pytest.approx(2 * (1.55 / 3 - 1.0 / 3))
    assert s["regret_ugd_online_mean"] == pytest.approx(1.1 / 6) and s["regret_ugd_online_max"] == pytest.approx(0.4)
    assert s["regret_exact_small_mean"] == pytest.approx(0.12 / 6) and s["regret_exact_small_max"] == pytest.approx(0.06)
    assert s["regret_exact_big_prev_mean"] == pytest.approx(0.02) and s["regret_uniform_max"] == pytest.approx(1.0)
    assert s["n_checkpoints"] == 2 and s["n_iterations"] == 6 and s["lam"] == 0.1
    table = c2_iterations(_hand_frame())
    assert list(table["global_iter"]) == list(range(6))
    assert table["l1_ugd"].isna().tolist() == [True, False, False, True, False, False]


def _model(excess: float, regret_ugd: float = 0.05) -> dict:
    return dict(l1_excess=excess, l1_ugd=0.2 + excess, l1_exact_small=0.2, drift_exact_big=0.05, drift_ugd=0.04,
                l1_ugd_to_exact_small=0.1, regret_ugd_online_mean=regret_ugd, regret_ugd_online_max=3 * regret_ugd,
                regret_exact_small_mean=0.02, regret_exact_big_prev_mean=0.01, regret_uniform_mean=0.5, lam=0.1,
                per_task=2, ugd_steps=5)


@pytest.mark.parametrize("values, verdict", [([0.1, 0.12, 0.11], "holds"), ([-0.1, -0.12, -0.11], "refuted"),
                                             ([0.1, -0.05, 0.02], "undecided"), ([0.1, 0.12], "undecided")])
def test_claim_c2_verdicts_over_synthetic_models(values, verdict) -> None:
    row = claim_c2_models([_model(x) for x in values])
    assert set(row) == set(CLAIM_COLUMNS)
    assert row["verdict"] == verdict and row["n_models"] == len(values)
    assert row["statistic"] == pytest.approx(np.mean(values))
    assert row["stderr"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(len(values)))
    assert "0.1 x trace(G)/K" in row["lam_rule"] and "regret" in row["notes"]


def test_claim_c2_t_interval_edge() -> None:
    se = 1 / np.sqrt(3)  # values m - 1, m, m + 1: sd 1
    for factor, verdict in ((0.95 * T975_2, "undecided"), (1.05 * T975_2, "holds")):
        m = factor * se
        assert claim_c2_models([_model(m - 1), _model(m), _model(m + 1)])["verdict"] == verdict
    assert len(c2_table([_model(0.1), _model(0.2)])) == 2


@pytest.fixture(scope="module")
def tiny_run():
    from gradconflict.bins import TimestepBins
    from gradconflict.data import load_dataset
    from gradconflict.models import build_model
    from gradconflict.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear(1000)
    bins = TimestepBins.uniform(schedule.T, 10)
    images = load_dataset("synthetic", image_size=8).images

    def load(seed):
        def make():
            torch.manual_seed(seed)
            return build_model("dit-tiny", hidden_size=16, depth=1, num_heads=2, image_size=8)
        return make

    kwargs = dict(iters=3, burn_in=2, warmup=3, eval_per_task=8, seed=3)
    frame = c2_online([(0, load(0)), (50, load(1))], images, schedule, "eps", bins, **kwargs)
    again = c2_online(lambda: [(0, load(0)()), (50, load(1)())], images, schedule, "eps", bins, **kwargs)
    return frame, again, (images, schedule, bins)


def test_c2_online_smoke(tiny_run) -> None:
    frame, again, (images, schedule, bins) = tiny_run
    assert list(frame.columns) == ["step", "iter", "source", "bin", "weight", "regret"]
    pd.testing.assert_frame_equal(frame, again)  # seeded batches: a rerun (models given by a function) agrees
    counts = frame.groupby(["step", "source"]).size()
    assert counts[(0, "ugd_online")] == 30 and counts[(50, "exact_big_prev")] == 30
    assert set(frame["source"]) == {"ugd_online", "exact_small", "exact_big", "exact_big_prev", "uniform"}
    assert (0, "exact_big_prev") not in counts.index  # no previous checkpoint at the first
    sums = frame.groupby(["step", "iter", "source"])["weight"].sum()
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    assert (frame["weight"] >= 0).all() and (frame["regret"] >= 0).all()
    regret = frame.groupby(["step", "iter", "source"])["regret"].first().unstack()
    assert np.all(regret["exact_big"] < 1e-8)
    assert np.all(regret["uniform"] > regret["exact_big"] + 1e-6) and np.all(regret["ugd_online"] > 1e-6)
    s = c2_statistics(frame)
    assert s["n_checkpoints"] == 2 and s["n_iterations"] == 6 and np.isfinite(s["l1_excess"])
    assert s["per_task"] == 2 and s["ugd_steps"] == 5
    with pytest.raises(ValueError, match="iters >= 2"):
        c2_online([(0, torch.nn.Linear(1, 1))], images, schedule, "eps", bins, iters=1)


def test_fig3_online_weights_writes_png_and_csv(tiny_run, tmp_path) -> None:
    frame = tiny_run[0]
    data = fig3_online_weights(frame, tmp_path / "fig3_online", subtitle=" - test")
    png, csv = tmp_path / "fig3_online.png", tmp_path / "fig3_online.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = pd.read_csv(csv)
    assert len(back) == len(frame) == len(data)
    assert set(back["global_iter"]) == set(range(6))
    assert back.loc[back["step"] == 50, "global_iter"].min() == 3
