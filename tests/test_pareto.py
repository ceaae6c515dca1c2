"""Tests for gradconflict.pareto.

References are independent of the code under test: KKT conditions checked
with plain numpy, CVXPY called directly here, closed forms for K = 1, 2 and
lam -> infinity, and hand-computed objectives.
"""

from __future__ import annotations

import dataclasses

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
import torch

from gradconflict.pareto import METHODS, ParetoResult, objective, score, solve

EXACT = ("auto", "cvxpy")


# ----------------------------------------------------------------- helpers
def gram(K: int, rank: int, seed: int, scale: float = 1.0) -> np.ndarray:
    A = np.random.default_rng(seed).standard_normal((K, rank))
    G = scale * (A @ A.T)
    return (G + G.T) / 2


def reference(G: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """Direct CVXPY solve (independent of gradconflict.pareto.cvxpy_ref)."""
    K = G.shape[0]
    Q = (G + G.T) / 2 + lam * np.eye(K)
    s = max(float(np.max(np.diag(Q))), 1e-300)
    w = cp.Variable(K)
    prob = cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(Q / s))), [w >= 0, cp.sum(w) == 1])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    x = np.clip(w.value, 0, None)
    x /= x.sum()
    return x, float(x @ G @ x + lam * x @ x)


def assert_kkt(G: np.ndarray, lam: float, w: np.ndarray, tol: float, wtol: float = 1e-9) -> None:
    """Simplex QP optimality: grad_i = mu on the support, grad_i >= mu elsewhere."""
    K = G.shape[0]
    Q = G + lam * np.eye(K)
    s = float(np.max(np.diag(Q)))
    assert w.shape == (K,)
    assert w.min() >= -1e-12 and abs(w.sum() - 1) <= 1e-10
    grad = 2 * Q @ w
    mu = float(w @ grad)
    support = w > wtol
    assert np.all(np.abs(grad[support] - mu) <= tol * s), np.abs(grad[support] - mu).max() / s
    assert np.all(grad >= mu - tol * s), (mu - grad.min()) / s


def solve_fw(G, lam, variant="away", **kw):
    return solve(G, lam, "frank_wolfe", variant=variant, **kw)


# --------------------------------------------------------------- objective
def test_objective_hand_example():
    G = np.array([[2.0, 1.0], [1.0, 3.0]])
    w = np.array([0.25, 0.75])
    # 2 * 1/16 + 2 * 1 * 3/16 + 3 * 9/16 = 35/16 ; 0.5 * (1/16 + 9/16) = 5/16
    assert objective(G, w, 0.5) == pytest.approx(40 / 16, rel=1e-15)
    assert objective(G, w, 0.0) == pytest.approx(35 / 16, rel=1e-15)


def test_objective_stacked():
    Gs = np.stack([gram(3, 2, 0), gram(3, 3, 1)])
    W = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    out = objective(Gs, W, 0.1)
    expect = [w @ g @ w + 0.1 * w @ w for g, w in zip(Gs, W)]
    np.testing.assert_allclose(out, expect, rtol=1e-14)
    np.testing.assert_allclose(objective(Gs[0], W, 0.1), [w @ Gs[0] @ w + 0.1 * w @ w for w in W], rtol=1e-14)


@pytest.mark.parametrize(
    "w, match",
    [
        ([0.5, 0.6, -0.1], "negative"),
        ([0.2, 0.2, 0.2], "sum to"),
        ([0.5, 0.5], "K = 3"),
        ([np.nan, 0.5, 0.5], "NaN"),
    ],
)
def test_objective_rejects_off_simplex(w, match):
    with pytest.raises(ValueError, match=match):
        objective(gram(3, 3, 0), np.array(w), 0.0)


# ------------------------------------------------------- solvers vs CVXPY
CASES = [  # (K, rank, lam, seed)
    (6, 1, 0.1, 0),  # rank 1
    (8, 3, 0.05, 1),  # rank r < K
    (10, 10, 0.01, 2),  # full rank
    (12, 4, 0.0, 3),  # lam = 0, rank deficient (non-unique optimum)
    (7, 7, 0.0, 4),  # lam = 0, full rank
    (30, 10, 1e-3, 5),
]


@pytest.mark.parametrize("K, rank, lam, seed", CASES)
def test_auto_kkt_and_matches_cvxpy(K, rank, lam, seed):
    G = gram(K, rank, seed)
    lam = lam * np.trace(G) / K
    res = solve(G, lam)
    assert res.converged and res.method == "auto"
    assert_kkt(G, lam, res.weights, tol=1e-10)
    w_ref, f_ref = reference(G, lam)
    s = np.max(np.diag(G)) + lam
    assert res.objective <= f_ref + 1e-12 * s
    assert res.objective >= f_ref - 1e-8 * s
    assert res.objective == pytest.approx(res.weights @ G @ res.weights + lam * res.weights @ res.weights, rel=1e-12, abs=1e-15 * s)
    if lam > 0:
        np.testing.assert_allclose(res.weights, w_ref, atol=1e-5)


@pytest.mark.parametrize("variant", ("away", "pairwise"))
@pytest.mark.parametrize("K, rank, lam, seed", CASES[:3] + CASES[4:5])
def test_frank_wolfe_matches_cvxpy(variant, K, rank, lam, seed):
    G = gram(K, rank, seed)
    lam = lam * np.trace(G) / K
    s = np.max(np.diag(G)) + lam
    res = solve_fw(G, lam, variant, tol=1e-9, max_iter=50_000)
    assert res.converged and res.gap <= 1e-9 * s
    _, f_ref = reference(G, lam)
    assert -1e-10 * s <= res.objective - f_ref <= res.gap
    assert_kkt(G, lam, res.weights, tol=1e-3, wtol=1e-3)


@pytest.mark.parametrize("K, rank, lam, seed", CASES[:3])
def test_vanilla_frank_wolfe_converges_sublinearly(K, rank, lam, seed):
    G = gram(K, rank, seed)
    lam = lam * np.trace(G) / K
    s = np.max(np.diag(G)) + lam
    _, f_ref = reference(G, lam)
    prev = np.inf
    for n in (10, 100, 1000, 10_000):  # O(1/t): no tight tolerance for plain FW
        res = solve_fw(G, lam, "vanilla", tol=0.0, max_iter=n)
        assert res.iterations == n and not res.converged
        assert -1e-10 * s <= res.objective - f_ref <= res.gap  # the gap certifies suboptimality
        assert res.objective <= prev
        prev = res.objective
    assert res.objective - f_ref <= 2e-3 * s
    easy = solve_fw(G, 10 * np.trace(G), "vanilla", tol=1e-8)  # interior optimum: converges
    assert easy.converged


@pytest.mark.parametrize("K, rank, lam, seed", CASES)
def test_cvxpy_method_matches_direct_cvxpy(K, rank, lam, seed):
    G = gram(K, rank, seed)
    lam = lam * np.trace(G) / K
    res = solve(G, lam, "cvxpy")
    _, f_ref = reference(G, lam)
    s = np.max(np.diag(G)) + lam
    # f* = 0 (lam = 0, rank deficient): only the rounding floor can certify, and Clarabel at 1e-12 stops ~3x above
    # it (#15: converged is the gap rule, not the backend's status)
    assert (res.converged or f_ref <= 1e-12 * s) and abs(res.objective - f_ref) <= 1e-7 * s
    assert_kkt(G, lam, res.weights, tol=1e-5, wtol=1e-5)


def test_ugd_close_after_enough_steps_and_gap_decreases():
    G = gram(8, 8, 7)
    lam = 0.05 * np.trace(G) / 8
    _, f_ref = reference(G, lam)
    gaps = [solve(G, lam, "ugd", steps=n, tol=0.0).gap for n in (10, 100, 1000)]
    assert gaps[0] > gaps[1] > gaps[2]
    res = solve(G, lam, "ugd", steps=5000)
    assert abs(res.objective - f_ref) <= 1e-4 * f_ref  # loose: softmax never hits exact zeros
    sgd = solve(G, lam, "ugd", optimizer="sgd", steps=5000)
    assert abs(sgd.objective - f_ref) <= 1e-3 * f_ref
    assert sgd.gap < solve(G, lam, "ugd", optimizer="sgd", steps=50, tol=0.0).gap


def test_ugd_warm_start():
    G = gram(6, 6, 8)
    w_ref, f_ref = reference(G, 0.1)
    cold = solve(G, 0.1, "ugd", steps=20, tol=0.0)
    warm = solve(G, 0.1, "ugd", steps=20, tol=0.0, w0=np.clip(w_ref, 1e-6, None) / np.clip(w_ref, 1e-6, None).sum())
    assert warm.objective - f_ref < cold.objective - f_ref
    beta = solve(G, 0.1, "ugd", steps=0, beta0=np.log(np.clip(w_ref, 1e-6, None)))
    assert beta.iterations == 0 and beta.objective - f_ref < cold.objective - f_ref


# ------------------------------------------------------ special structure
@pytest.mark.parametrize("method", METHODS)
def test_single_task(method):
    res = solve(np.array([[3.0]]), 0.5, method)
    np.testing.assert_array_equal(res.weights, [1.0])
    assert res.objective == pytest.approx(3.5) and res.gap == 0


@pytest.mark.parametrize("method", ("auto", "frank_wolfe", "cvxpy"))
@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("seed", range(4))
def test_two_tasks_closed_form(method, lam, seed):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((2, 2)) * [[1.0], [rng.uniform(0.1, 3)]]
    G = A @ A.T
    w1 = np.clip((G[1, 1] - G[0, 1] + lam) / (G[0, 0] + G[1, 1] - 2 * G[0, 1] + 2 * lam), 0, 1)
    res = solve(G, lam, method)
    np.testing.assert_allclose(res.weights, [w1, 1 - w1], atol=1e-6 if method == "cvxpy" else 1e-9)


def test_exact_line_search_one_step_on_two_tasks():
    G = np.array([[2.0, 0.5], [0.5, 1.0]])  # interior optimum w1 = 0.5 / 2 = 0.25
    for variant in ("vanilla", "away", "pairwise"):
        for w0 in (None, np.array([1.0, 0.0])):  # default start: best vertex e_1 (step 0.75 from e_0)
            res = solve_fw(G, 0.0, variant, w0=w0)
            assert res.iterations == 1 and res.converged
            np.testing.assert_allclose(res.weights, [0.25, 0.75], atol=1e-15)


def test_two_tasks_one_dominates():
    G = np.array([[1.0, 2.0], [2.0, 5.0]])  # w1 = clip(3 / 2) = 1
    for method in ("auto", "frank_wolfe"):
        np.testing.assert_allclose(solve(G, 0.0, method).weights, [1.0, 0.0], atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_duplicated_tasks(lam):
    base = gram(5, 3, 9)
    idx = [0, 1, 1, 2, 3, 3, 3, 4]  # tasks 1 and 3 duplicated
    G = base[np.ix_(idx, idx)]
    _, f_ref = reference(G, lam)
    for method in ("auto", "frank_wolfe"):
        res = solve(G, lam, method, tol=1e-10)
        assert res.objective == pytest.approx(f_ref, rel=1e-6, abs=1e-9)
        if method == "auto":
            assert_kkt(G, lam, res.weights, tol=1e-10)
    if lam > 0:  # strictly convex: identical tasks share weight equally
        w = solve(G, lam).weights
        assert w[1] == pytest.approx(w[2], abs=1e-10)
        assert w[4] == pytest.approx(w[5], abs=1e-10) and w[5] == pytest.approx(w[6], abs=1e-10)


@pytest.mark.parametrize("scale", [1e-8, 1e8])
@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_extreme_scales(scale, lam):
    G1 = gram(10, 6, 10)
    base = solve(G1, lam)
    G = G1 * scale
    for method in ("auto", "frank_wolfe", "cvxpy"):
        res = solve(G, lam * scale, method)
        assert res.objective == pytest.approx(base.objective * scale, rel=1e-6, abs=1e-9 * scale)
        if lam > 0:
            np.testing.assert_allclose(res.weights, base.weights, atol=1e-5)
    assert_kkt(G, lam * scale, solve(G, lam * scale).weights, tol=1e-10)


@pytest.mark.parametrize("method", ("auto", "frank_wolfe", "ugd", "cvxpy"))
def test_huge_lam_gives_uniform(method):
    K = 9
    G = gram(K, 4, 11)
    lam = 1e6 * np.trace(G)
    res = solve(G, lam, method)
    # w* = uniform + O(||G|| / lam) (first-order perturbation of the KKT system)
    np.testing.assert_allclose(res.weights, np.full(K, 1 / K), atol=1e-5)


@pytest.mark.parametrize("method", ("auto", "frank_wolfe", "cvxpy"))
def test_permutation_invariance(method):
    G = gram(9, 5, 12)
    lam = 0.02 * np.trace(G) / 9
    perm = np.random.default_rng(0).permutation(9)
    w = solve(G, lam, method, tol=1e-10).weights if method != "cvxpy" else solve(G, lam, method).weights
    wp = solve(G[np.ix_(perm, perm)], lam, method, **({} if method == "cvxpy" else {"tol": 1e-10})).weights
    np.testing.assert_allclose(wp, w[perm], atol=1e-6 if method != "auto" else 1e-10)


def test_all_zero_gram():
    res = solve(np.zeros((4, 4)), 0.0)
    assert res.objective == 0 and res.converged
    assert res.weights.sum() == pytest.approx(1)


# -------------------------------------------------------- batching & caps
@pytest.mark.parametrize(
    "method, opts",
    [("auto", {}), ("frank_wolfe", {"variant": "away"}), ("frank_wolfe", {"variant": "vanilla"}), ("ugd", {"steps": 200}), ("cvxpy", {})],
)
def test_batched_equals_per_item(method, opts):
    Gs = np.stack([gram(7, r, 20 + r) for r in (1, 3, 7, 5)])
    res = solve(Gs, 0.05, method, **opts)
    assert res.batched and res.weights.shape == (4, 7) and res.objective.shape == (4,)
    for i, G in enumerate(Gs):
        one = solve(G, 0.05, method, **opts)
        np.testing.assert_allclose(res.weights[i], one.weights, atol=1e-9)
        assert res.objective[i] == pytest.approx(one.objective, rel=1e-9)
        assert res.converged[i] == one.converged
        if method != "cvxpy":
            assert res.iterations[i] == one.iterations


def test_batched_torch_input():
    Gs = torch.tensor(np.stack([gram(5, 2, 30), gram(5, 5, 31)]))
    res = solve(Gs, 0.1)
    for i in range(2):
        assert_kkt(Gs[i].numpy(), 0.1, res.weights[i], tol=1e-10)


@pytest.mark.parametrize(
    "method, capped, enough",
    [
        ("frank_wolfe", {"max_iter": 3}, {"max_iter": 100_000}),
        ("ugd", {"steps": 3}, {"steps": 3000, "tol": 1e-3}),
        ("auto", {"max_iter": 1}, {}),
    ],
)
def test_iteration_cap(method, capped, enough):
    G = gram(40, 40, 40)  # needs many FW / UGD steps and several pivots
    G[np.arange(40), np.arange(40)] += np.linspace(0, 50, 40)
    res = solve(G, 0.01, method, **capped)
    assert not res.converged
    assert res.iterations == next(iter(capped.values()))
    assert solve(G, 0.01, method, **enough).converged


# -------------------------------------------------------------- inputs
def test_accepts_torch_and_pandas():
    G = gram(6, 4, 50)
    ref = solve(G, 0.1).weights
    np.testing.assert_allclose(solve(torch.tensor(G), 0.1).weights, ref, atol=1e-14)
    np.testing.assert_allclose(solve(torch.tensor(G, dtype=torch.float32, requires_grad=True), torch.tensor(0.1)).weights, ref, atol=1e-5)
    np.testing.assert_allclose(solve(pd.DataFrame(G, index=list("abcdef"), columns=list("abcdef")), 0.1).weights, ref, atol=1e-14)


def test_symmetrizes_small_asymmetry():
    G = gram(5, 5, 51)
    noise = 1e-12 * np.triu(np.ones((5, 5)), 1)
    np.testing.assert_allclose(solve(G + noise, 0.1).weights, solve(G + noise.T, 0.1).weights, atol=1e-10)


@pytest.mark.parametrize(
    "G, lam, method, match",
    [
        (np.ones((2, 3)), 0.0, "auto", "square"),
        (np.ones(3), 0.0, "auto", "2-D"),
        (np.ones((2, 2, 2, 2)), 0.0, "auto", "shape"),
        (np.zeros((0, 0)), 0.0, "auto", "K = 0"),
        (np.array([[1.0, 0.5], [0.0, 1.0]]), 0.0, "auto", r"not symmetric.*max \|G - G\^T\| = 5\.000e-01"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), 0.0, "auto", r"NaN at \[0, 1\]"),
        (np.array([[1.0, 0.0], [0.0, np.inf]]), 0.0, "auto", r"inf at \[1, 1\]"),
        (np.array([[1.0, 2.0], [2.0, 1.0]]), 0.0, "auto", r"not positive semidefinite.*-1\.000e\+00"),
        (np.eye(2), -0.1, "auto", "lam must be >= 0"),
        (np.eye(2), np.nan, "auto", "lam must be finite"),
        (np.eye(2), np.inf, "auto", "lam must be finite"),
        (np.eye(2), 0.0, "newton", "unknown method 'newton'; valid methods are auto, frank_wolfe, ugd, cvxpy"),
    ],
)
def test_bad_inputs(G, lam, method, match):
    with pytest.raises(ValueError, match=match):
        solve(G, lam, method)


def test_bad_options_and_stack_messages():
    with pytest.raises(ValueError, match="unknown option 'foo'.*valid options"):
        solve(np.eye(3), 0.0, "auto", foo=1)
    with pytest.raises(ValueError, match="variant"):
        solve(np.eye(3), 0.0, "frank_wolfe", variant="fast")
    with pytest.raises(ValueError, match="optimizer"):
        solve(np.eye(3), 0.0, "ugd", optimizer="rmsprop")
    bad = np.stack([np.eye(2), np.array([[0.0, 1.0], [1.0, 0.0]])])
    with pytest.raises(ValueError, match=r"matrix 1.*most negative eigenvalue -1"):
        solve(bad, 0.0)


def test_psd_tolerance_is_relative():
    G = gram(5, 2, 60) * 1e8
    G -= 1e-9 * 1e8 * np.eye(5) * np.linalg.eigvalsh(G)[-1] / 1e8  # tiny negative eigenvalues, within 1e-8
    solve(G, 0.0)
    with pytest.raises(ValueError, match="positive semidefinite"):
        solve(G - 1e-6 * np.linalg.eigvalsh(G)[-1] * np.eye(5), 0.0)


# -------------------------------------------------------------- result
def test_result_is_frozen_and_tidy():
    res = solve(np.stack([gram(3, 3, 70), gram(3, 1, 71)]), 0.1)
    assert isinstance(res, ParetoResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.method = "x"  # type: ignore[misc]
    with pytest.raises(ValueError):
        res.weights[0, 0] = 1.0
    df = res.to_frame()
    assert len(df) == 6 and {"problem", "task", "weight", "objective", "gap", "converged", "method"} <= set(df.columns)
    np.testing.assert_allclose(df.pivot(index="problem", columns="task", values="weight").to_numpy(), res.weights)
    single = solve(gram(3, 3, 70), 0.1)
    assert isinstance(single.objective, float) and isinstance(single.converged, bool)
    assert len(single.to_frame()) == 3


# --------------------------------------------------------------- score
class FakeStrategy:
    def __init__(self, name, raw):
        self.name = name
        self.raw = np.asarray(raw, dtype=float)


class FakeBins:
    """Duck-typed stand-in for gradconflict.bins.TimestepBins."""

    def __init__(self):
        self.calls = []

    def strategy_weights(self, strategy, schedule):
        self.calls.append((strategy.name, schedule))
        return strategy.raw / strategy.raw.sum()


def test_score_with_fake_bins():
    G = gram(4, 3, 80)
    lam = 0.05
    strategies = [FakeStrategy("uniform", [1, 1, 1, 1]), FakeStrategy("early", [4, 3, 2, 1]), FakeStrategy("late", [0, 0, 1, 3])]
    bins = FakeBins()
    df = score(G, lam, strategies, bins, schedule="cosine")
    assert list(df["strategy"]) == ["uniform", "early", "late", "pareto_optimum"]
    assert bins.calls == [("uniform", "cosine"), ("early", "cosine"), ("late", "cosine")]
    assert (df["excess"] >= 0).all() and (df["ratio"] >= 1).all()
    for s in strategies:
        w = s.raw / s.raw.sum()
        row = df[df["strategy"] == s.name].iloc[0]
        assert row["objective"] == pytest.approx(w @ G @ w + lam * w @ w, rel=1e-12)
        np.testing.assert_allclose(row["weights"], w)
    _, f_ref = reference(G, lam)
    opt = df[df["strategy"] == "pareto_optimum"].iloc[0]
    assert opt["objective"] == pytest.approx(f_ref, rel=1e-7)
    assert opt["excess"] == 0 and opt["ratio"] == 1
    uni = df.iloc[0]
    assert uni["excess"] == pytest.approx(uni["objective"] - opt["objective"])
    assert uni["ratio"] == pytest.approx(uni["objective"] / opt["objective"])


def test_score_dict_inputs_and_batch():
    G = gram(3, 3, 81)
    d = score(G, 0.0, {"a": np.array([1.0, 0, 0]), "b": np.full(3, 1 / 3)})
    assert list(d["strategy"]) == ["a", "b", "pareto_optimum"]
    assert d.loc[0, "objective"] == pytest.approx(G[0, 0])
    by_name = score(G, 0.0, {"u": FakeStrategy("ignored", [1, 1, 1])}, FakeBins())
    assert by_name["strategy"].iloc[0] == "u"
    Gs = np.stack([G, gram(3, 1, 82)])
    batch = score(Gs, 0.1, {"u": np.full(3, 1 / 3)})
    assert list(batch["index"]) == [0, 0, 1, 1] and (batch["ratio"] >= 1).all()
    for i in range(2):
        u, opt = batch[batch["index"] == i].iloc[0], batch[batch["index"] == i].iloc[1]
        w = np.full(3, 1 / 3)
        assert u["objective"] == pytest.approx(w @ Gs[i] @ w + 0.1 * w @ w, rel=1e-12)
        assert opt["objective"] == pytest.approx(reference(Gs[i], 0.1)[1], rel=1e-7)
        assert u["ratio"] == pytest.approx(u["objective"] / opt["objective"], rel=1e-12)
    with pytest.raises(ValueError, match="dict name -> weight vector"):
        score(G, 0.0, [FakeStrategy("x", [1, 1, 1])])
    with pytest.raises(ValueError, match="simplex"):
        score(G, 0.0, {"bad": np.array([1.0, 1.0, 1.0])})


def test_score_zero_optimum_ratio():
    G = np.array([[1.0, -1.0], [-1.0, 1.0]])  # optimum 0 at w = (1/2, 1/2)
    df = score(G, 0.0, {"half": np.array([0.5, 0.5]), "first": np.array([1.0, 0.0])})
    assert df.loc[0, "ratio"] == 1.0 and np.isinf(df.loc[1, "ratio"])


# ------------------------------------------- exact solver internals (K > 128)
def test_auto_large_uses_updates_and_matches_cvxpy():
    K = 200  # above the size where the Schur-complement updates kick in
    A = np.random.default_rng(90).standard_normal((K, K // 2)) * np.logspace(0, -2, K // 2)
    G = A @ A.T
    lam = 1e-3 * np.trace(G) / K
    res = solve(G, lam)
    assert res.converged
    assert_kkt(G, lam, res.weights, tol=1e-12)
    _, f_ref = reference(G, lam)
    assert f_ref - 1e-6 * f_ref <= res.objective <= f_ref + 1e-12 * np.max(np.diag(G))


def test_auto_rank_deficient_lam0_large():
    G = gram(150, 20, 91)  # singular KKT systems: exercises the min-norm-point phase
    res = solve(G, 0.0)
    assert res.converged
    assert_kkt(G, 0.0, res.weights, tol=1e-10)
    assert np.sum(res.weights > 0) <= 21  # Caratheodory: an affinely independent support
    _, f_ref = reference(G, 0.0)
    assert res.objective <= f_ref + 1e-10 * np.max(np.diag(G))


def test_subset_solver_against_direct_solve():
    from gradconflict.pareto._cholesky import SubsetSolver

    rng = np.random.default_rng(92)
    K = 300
    A = rng.standard_normal((K, K))
    Q = A @ A.T / K + 0.1 * np.eye(K)
    sub = SubsetSolver(Q)
    F = rng.random(K) < 0.9
    refactor_cost = 0.0
    for step in range(6):  # a few removals / additions per step, as in pivoting
        flip = rng.choice(K, size=3 + 2 * step, replace=False)
        F[flip] = ~F[flip]
        assert sub.update(F)
        refactor_cost += F.sum() ** 3 / 3
        idx, v = sub.affine_weights()
        np.testing.assert_array_equal(np.sort(idx), np.flatnonzero(F))
        order = np.argsort(idx)
        QF = Q[np.ix_(F, F)]
        x = np.linalg.solve(QF, np.ones(F.sum()))
        np.testing.assert_allclose(v[order], x / x.sum(), rtol=1e-9, atol=1e-13)
    assert sub.flops < 0.5 * refactor_cost  # much cheaper than refactoring at every step


@pytest.mark.parametrize("dtype, shift", [(np.float64, 1.0), (np.float32, 0.0)])
def test_subset_solver_removal_cascade_refactors_only_the_tail(dtype, shift):
    """Ordered by priority, tasks that leave later sit at the end of the factor: each removal round reuses the
    leading block (a tail refactor), and the solves still equal a direct float64 solve."""
    from gradconflict.pareto import _cholesky
    from gradconflict.pareto._cholesky import SubsetSolver

    rng = np.random.default_rng(94)
    K = 400
    A = rng.standard_normal((K, K))
    Q = A @ A.T / K + 0.1 * np.eye(K)
    priority = rng.random(K)
    sub = SubsetSolver(Q, dtype, shift)
    F = np.ones(K, dtype=bool)
    assert sub.update(F, priority)
    tails = []
    real_tail = _cholesky.SubsetSolver._refactor_tail

    def spy(self, *args):
        tails.append(args[1])
        return real_tail(self, *args)

    _cholesky.SubsetSolver._refactor_tail = spy
    try:
        full = 0.0
        by_priority = np.argsort(priority)  # lowest priority first: these leave first
        for step in range(5):
            F[by_priority[60 * step : 60 * (step + 1)]] = False  # 60 of the remaining lowest-priority tasks
            if step == 3:
                F[by_priority[-1]] = False  # once, a task from the head of the factor
            if step % 2:
                F[by_priority[60 * step]] = True  # one addition back
            assert sub.update(F, priority)
            full += F.sum() ** 3 / 3
            idx, v = sub.affine_weights()
            order = np.argsort(idx)
            np.testing.assert_array_equal(idx[order], np.flatnonzero(F))
            M = Q[np.ix_(F, F)] + shift
            x = np.linalg.solve(M, np.ones(F.sum()))
            np.testing.assert_allclose(v[order], x / x.sum(), rtol=1e-9, atol=1e-13)
    finally:
        _cholesky.SubsetSolver._refactor_tail = real_tail
    assert tails  # the tail path ran
    assert sub.flops - K**3 / 3 < 0.5 * full  # far cheaper than refactoring every round


def test_wolfe_phase_alone_is_exact():
    from gradconflict.pareto.active_set import _wolfe

    G = gram(25, 25, 93)
    s = np.max(np.diag(G)) + 0.01
    Q = (G + 0.01 * np.eye(25)) / s
    w, _ = _wolfe(Q, None, 10_000)
    assert_kkt(G, 0.01, w, tol=1e-10)


# ------------------------------------- low-rank PSD certificate (K >= 256)
def test_lowrank_psd_certificate_feeds_the_solver():
    from gradconflict.pareto._validate import as_gram_factored

    K = 300
    J = np.random.default_rng(94).standard_normal((K, 12))
    G = J @ J.T
    lam = 1e-3 * np.trace(G) / K
    _, _, factors = as_gram_factored(G)
    L, resid = factors[0]
    assert L.shape == (12, K) and resid <= 1e-8 * np.max(np.diag(G))
    res = solve(G, lam)  # Woodbury path
    assert res.converged
    assert_kkt(G, lam, res.weights, tol=1e-12)
    from gradconflict.pareto.active_set import _bpp
    from gradconflict.pareto.solver import normalize

    Q, scale = normalize(((G + G.T) / 2)[None].copy(), lam)
    w_dense, _, _ = _bpp(Q[0], np.ones(K, dtype=bool), 100)  # dense float64 phase 1, no factor
    f_dense = float(w_dense @ G @ w_dense + lam * w_dense @ w_dense)
    assert abs(res.objective - f_dense) <= 1e-12 * f_dense
    res0 = solve(G, 0.0)  # lam = 0: no ridge for Woodbury, dense fallback
    _, f_ref0 = reference(G, 0.0)
    assert res0.converged and res0.objective <= f_ref0 + 1e-10 * np.max(np.diag(G))


def test_unchecked_lowrank_factor_is_only_a_preconditioner():
    """check_psd=False still finds the low-rank factor; on a non-PSD G it must not give a wrong answer."""
    from gradconflict.pareto._validate import as_gram_factored

    K = 300
    J = np.random.default_rng(97).standard_normal((K, 10))
    G = J @ J.T
    lam = 1e-3 * np.trace(G) / K
    _, _, factors = as_gram_factored(G, check_psd=False)
    L, resid = factors[0]
    assert L.shape == (10, K) and resid <= 1e-8 * np.trace(G)  # trace of the residual
    res = solve(G, lam, check_psd=False)
    assert res.converged
    assert_kkt(G, lam, res.weights, tol=1e-12)
    _, f_ref = reference(G, lam)
    assert res.objective <= f_ref * (1 + 1e-9)
    # a residual the pivots cannot see (zero diagonal): the factor is a bad preconditioner, and
    # the answer must still satisfy the KKT conditions of the matrix actually passed
    G2 = G.copy()
    G2[0, 1] += 0.05 * np.max(np.diag(G))
    G2[1, 0] = G2[0, 1]
    lam2 = lam - np.linalg.eigvalsh(G2)[0]  # G2 is not PSD, G2 + lam2 I is: still a convex problem
    res2 = solve(G2, lam2, check_psd=False)
    assert res2.converged
    assert_kkt(G2, lam2, res2.weights, tol=1e-10)
    _, f_ref2 = reference(G2, lam2)
    assert res2.objective <= f_ref2 * (1 + 1e-9)


@pytest.mark.parametrize("lam_rel", [1e-3, 1e-1, 10.0])
def test_single_precision_factor_reaches_float64_optimum(lam_rel):
    """K >= 256 starts with a float32 Cholesky factor; refinement must give float64 accuracy."""
    K = 300
    rng = np.random.default_rng(98)
    A = rng.standard_normal((K, K // 2)) * np.logspace(0, -3, K // 2)
    G = A @ A.T
    lam = lam_rel * np.trace(G) / K
    _assert_float32_factor_suffices(G, lam)


def _assert_float32_factor_suffices(G, lam):
    """``solve`` factors only in float32 (no float64 fallback) and still reaches the exact optimum."""
    from gradconflict.pareto import _cholesky

    calls = []
    real_init = _cholesky.SubsetSolver.__init__

    def spy(self, Q, dtype=np.float64, shift=1.0):
        calls.append(np.dtype(dtype))
        real_init(self, Q, dtype, shift)

    _cholesky.SubsetSolver.__init__ = spy
    try:
        res = solve(G, lam, check_psd=False)
    finally:
        _cholesky.SubsetSolver.__init__ = real_init
    assert calls[0] == np.float32 and np.float64 not in calls  # no float64 fallback was needed
    assert res.converged
    assert_kkt(G, lam, res.weights, tol=1e-11)
    _, f_ref = reference(G, lam)
    assert res.objective <= f_ref * (1 + 1e-9)


def test_single_precision_subset_solver_against_direct_solve():
    from gradconflict.pareto._cholesky import SubsetSolver

    rng = np.random.default_rng(99)
    K = 300
    A = rng.standard_normal((K, K))
    Q = A @ A.T / K + 1e-3 * np.eye(K)  # condition number ~ 4e6 (x float32 eps = 0.25)
    Q /= np.max(np.diag(Q))
    sub = SubsetSolver(Q, np.float32)
    F = np.ones(K, dtype=bool)
    for step in range(4):
        flip = rng.choice(K, size=2 + 3 * step, replace=False)
        F[flip] = ~F[flip]
        assert sub.update(F)
        for precise in (False, True):
            idx, v = sub.affine_weights(precise)
            order = np.argsort(idx)
            x = np.linalg.solve(Q[np.ix_(F, F)], np.ones(F.sum()))
            rtol = 1e-12 if precise else 1e-6
            np.testing.assert_allclose(v[order], x / x.sum(), rtol=rtol, atol=rtol * np.abs(x / x.sum()).max())


def test_lowrank_not_psd_reports_most_negative_eigenvalue():
    K = 300
    J = np.random.default_rng(95).standard_normal((K, 8))
    G = J @ J.T
    G[0, 1] += 1.0  # zero-diagonal residual pattern the pivoted factor cannot see
    G[1, 0] += 1.0
    lo = np.linalg.eigvalsh(G)[0]
    assert lo < -0.1
    with pytest.raises(ValueError, match=rf"not positive semidefinite.*most negative eigenvalue {lo:.3e}"):
        solve(G, 0.1)


def test_failed_cholesky_reports_most_negative_eigenvalue():
    K = 300
    A = np.random.default_rng(96).standard_normal((K, K))
    G = A @ A.T / K - 0.05 * np.eye(K) * np.linalg.eigvalsh(A @ A.T / K)[-1]
    lo = np.linalg.eigvalsh(G)[0]
    with pytest.raises(ValueError, match=rf"most negative eigenvalue {lo:.3e}"):
        solve(G, 1.0)


@pytest.mark.parametrize("K", [5, 128, 300])
def test_tiled_symmetrize_matches_numpy(K):
    from gradconflict.pareto._validate import symmetrize

    rng = np.random.default_rng(K)
    G = rng.standard_normal((2, K, K))
    G = G + np.swapaxes(G, -1, -2)
    out, asym, size = symmetrize(G)  # exactly symmetric: fast path
    np.testing.assert_array_equal(out, G)
    assert out is not G and not np.shares_memory(out, G)
    np.testing.assert_array_equal(asym, 0.0)
    np.testing.assert_array_equal(size, np.abs(G).max(axis=(1, 2)))
    G[1, K - 1, 0] += 1e-3  # one entry off, in the last tile row (crosses tiles for K > 128)
    out, asym, size = symmetrize(G)
    np.testing.assert_allclose(out, (G + np.swapaxes(G, -1, -2)) / 2, rtol=0, atol=1e-15)
    np.testing.assert_allclose(asym, np.abs(G - np.swapaxes(G, -1, -2)).max(axis=(1, 2)), rtol=1e-12)
    np.testing.assert_array_equal(size, np.abs(G).max(axis=(1, 2)))


def test_iteration_cap_reached_on_the_last_pivot_keeps_the_answer():
    res = solve(np.eye(4), 0.0, max_iter=1)  # one pivot suffices: its precise re-solve is not a new pivot
    assert res.converged and res.iterations == 1
    np.testing.assert_allclose(res.weights, 0.25)
    G = gram(40, 40, 41)
    G[np.arange(40), np.arange(40)] += np.linspace(0, 50, 40)
    capped = solve(G, 0.01, max_iter=1)  # budget spent in phase 1: still a feasible point, never NaN
    assert not capped.converged
    assert np.isfinite(capped.weights).all() and capped.weights.min() >= 0
    assert abs(capped.weights.sum() - 1) <= 1e-12


def test_degenerate_optimum_does_not_make_the_float32_path_cycle():
    """A zero task makes w = e_i optimal with objective 0: float32 noise in the other weights must not pivot."""
    K = 300
    A = np.random.default_rng(100).standard_normal((K, K + 20))
    A[7] = 0.0
    G = A @ A.T
    for lam in (0.0, 1e-3 * np.trace(G) / K):
        res = solve(G, lam)
        assert res.converged
        assert_kkt(G, lam, res.weights, tol=1e-10)
        assert res.iterations <= 10  # a few pivots, not the 100-pivot cap of a cycling phase 1
    res = solve(G, 0.0)
    assert res.weights[7] > 1 - 1e-9
    from gradconflict.pareto._cholesky import SubsetSolver
    from gradconflict.pareto.active_set import _bpp
    from gradconflict.pareto.solver import normalize

    Q = normalize(G[None].copy(), 0.0)[0][0]  # solve() skips float32 at lam = 0; force it here
    w, pivots, _ = _bpp(Q, np.ones(K, dtype=bool), 100, SubsetSolver(Q, np.float32))
    assert w is not None and pivots <= 3 and w[7] > 1 - 1e-9


# --------------------------------------------------------------- score with real bins, names and low precision
def _tiny_bins_and_schedule():
    from gradconflict.bins import TimestepBins
    from gradconflict.schedule import NoiseSchedule

    # SNR = a / (1 - a) = 9, 4, 1, 0.25; bins {0, 1} and {2, 3}
    return TimestepBins.from_edges([0, 2, 4], 4), NoiseSchedule.from_alphas_cumprod([0.9, 0.8, 0.5, 0.2])


def test_score_accepts_strategy_names_and_specs():
    bins, sch = _tiny_bins_and_schedule()
    G = np.diag([1.0, 2.0])
    # min_snr(5): x0 weights min(SNR, 5) = 5, 4, 1, 0.25 -> bins 9 and 1.25 of 10.25 -> w = (36, 5) / 41
    # objective (lam = 0) = (36^2 * 1 + 5^2 * 2) / 41^2 = 1346 / 1681
    for spec in ("min_snr:5", "min_snr"):  # gamma = 5 is the default
        df = score(G, 0.0, [spec], bins=bins, schedule=sch)
        assert list(df["strategy"]) == ["min_snr_5", "pareto_optimum"]
        np.testing.assert_allclose(df.loc[0, "weights"], [36 / 41, 5 / 41], rtol=1e-12)
        assert df.loc[0, "objective"] == pytest.approx(1346 / 1681, rel=1e-12)
    with pytest.raises(ValueError, match=r"strategy name\(s\) \['min_snr_5'\] appear more than once"):
        score(G, 0.0, ["min_snr:5", "min_snr"], bins=bins, schedule=sch)  # one name, two rows: ambiguous
    one = score(G, 0.0, "min_snr:5", bins=bins, schedule=sch)  # a single spec, not split into characters
    assert list(one["strategy"]) == ["min_snr_5", "pareto_optimum"]
    named = score(G, 0.0, {"ours": "min_snr:5"}, bins=bins, schedule=sch)
    assert named.loc[0, "strategy"] == "ours" and named.loc[0, "objective"] == pytest.approx(1346 / 1681, rel=1e-12)
    with pytest.raises(ValueError, match="min_snr:5"):
        score(G, 0.0, ["no_such_weighting"], bins=bins, schedule=sch)
    with pytest.raises(ValueError, match="min_snr"):
        score(G, 0.0, [3.0], bins=bins, schedule=sch)


def test_score_takes_plain_functions_of_snr():
    """A user's own f(snr) -> x0-unit weight, without weighting.custom: the same hand-computed weights as min_snr(5)."""
    bins, sch = _tiny_bins_and_schedule()
    G = np.diag([1.0, 2.0])

    def clipped(snr):
        return np.minimum(snr, 5.0)

    for strategies in ([clipped], clipped, {"mine": clipped}, [lambda snr: np.minimum(snr, 5.0)]):
        df = score(G, 0.0, strategies, bins=bins, schedule=sch)
        np.testing.assert_allclose(df.loc[0, "weights"], [36 / 41, 5 / 41], rtol=1e-12)
        assert df.loc[0, "objective"] == pytest.approx(1346 / 1681, rel=1e-12)
    assert list(score(G, 0.0, [clipped], bins=bins, schedule=sch)["strategy"]) == ["clipped", "pareto_optimum"]
    np.testing.assert_allclose(bins.strategy_weights(clipped, sch), [36 / 41, 5 / 41], rtol=1e-12)


def test_score_with_bins_needs_schedule():
    bins, _ = _tiny_bins_and_schedule()
    with pytest.raises(ValueError, match="schedule="):
        score(np.eye(2), 0.1, ["min_snr:5"], bins=bins)


@pytest.mark.parametrize("dtype, rtol", [(torch.bfloat16, 0.1), (torch.float16, 100 * 2.0**-10)])  # capped at 0.1
def test_solve_low_precision_tensors(dtype, rtol):
    from gradconflict.pareto._validate import to_numpy

    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=dtype)  # exact in both formats
    arr, tol = to_numpy(G)
    assert arr.dtype == np.float64 and np.array_equal(arr, [[2.0, 0.5], [0.5, 1.0]])
    assert tol == pytest.approx(rtol, rel=1e-12)  # the tolerance of the original precision, not float32's
    # K = 2 closed form with Q = G + lam I: w_1 = (Q22 - Q12) / (Q11 + Q22 - 2 Q12) = 0.6 / 2.2 = 3 / 11
    res = solve(G, 0.1)
    np.testing.assert_allclose(res.weights, [3 / 11, 8 / 11], atol=1e-8)
    bad = torch.tensor([[1.0, 1.5], [1.5, 1.0]], dtype=dtype)  # eigenvalue -0.5: still refused in low precision
    with pytest.raises(ValueError, match="not positive semidefinite"):
        solve(bad, 0.1)


def test_solve_accepts_a_task_gradients_result() -> None:
    import torch

    from gradconflict.engine import TaskGradients

    G = np.array([[2.0, -1.0], [-1.0, 3.0]])
    res = TaskGradients(gram=torch.tensor(G), losses=torch.zeros(2), counts=torch.ones(2, dtype=torch.long),
                        method="loop", seconds=0.0)
    got = solve(res, 0.0).weights
    np.testing.assert_allclose(got, [4 / 7, 3 / 7], rtol=1e-10)  # closed form (G22 - G12, G11 - G12) / sum


def test_badly_scaled_gram_keeps_the_single_precision_factor():
    """Task gradient norms over 5 decades (as in real Grams with one sample per bin): with a ridge the solver
    factors Q_FF itself, not Q_FF + 1 1^T, so the float32 factor still converges and float64 is never needed."""
    K = 300
    rng = np.random.default_rng(5)
    A = rng.standard_normal((K, K // 2)) * np.logspace(0, -3, K // 2)
    A *= np.logspace(0, -5, K)[rng.permutation(K), None]  # row norms spread over 5 decades
    G = A @ A.T
    _assert_float32_factor_suffices(G, 1e-3 * np.trace(G) / K)


def test_ugd_warm_started_at_a_vertex_still_reaches_the_optimum():
    """softmax(log w0) cannot move a zero weight: the warm start mixes in a little of the uniform point."""
    G = gram(8, 8, 7)
    lam = 0.1 * np.trace(G) / 8
    _, f_ref = reference(G, lam)
    w0 = np.zeros(8)
    w0[int(np.argmax(np.diag(G)))] = 1.0  # the worst vertex
    res = solve(G, lam, "ugd", w0=w0, steps=20000, tol=0.0)
    assert res.objective <= f_ref * (1 + 1e-5)  # log(w0) alone stays at the vertex: about 10x the optimum


def test_ill_conditioned_pivoting_does_not_cycle():
    """Gradient norms over 3.5 decades and a tiny ridge (cond(Q_FF) ~ 1e7): a loosely refined float32 solve can
    get a small weight's sign wrong and send the pivoting back to a set it saw; it then decides on precise solves
    instead of cycling to the pivot cap (was: 111 solves, against 12 now)."""
    rng = np.random.default_rng(5)
    K = 1000
    X = rng.standard_normal((250, K)) * np.exp(rng.uniform(-4, 4, K))
    G = X.T @ X
    lam = 1e-6 * np.trace(G) / K
    res = solve(G, lam, check_psd=False)
    assert res.converged and res.iterations <= 30
    assert_kkt(G, lam, res.weights, tol=1e-10)


# ------------------------------------- phase 1 that oscillates hands over to phase 2 (Gram of rank about K / 2)
@pytest.mark.parametrize("K, rank, seed", [(100, 50, 2), (100, 64, 3), (200, 100, 1)])
def test_oscillating_pivoting_hands_its_best_iterate_to_phase_two(K, rank, seed):
    """Rank about K/2 and a small ridge: full exchanges oscillate (nearly singular Q_FF on the larger sets).  These
    seeds took 180-254 solves with Murty's one-task rule and a phase 2 that restarted from a vertex; phase 1 now
    stops after 3 rounds without fewer violations and phase 2 starts from its best iterate."""
    from gradconflict.pareto._cholesky import SubsetSolver
    from gradconflict.pareto.active_set import _bpp
    from gradconflict.pareto.solver import normalize

    G = gram(K, rank, seed)
    lam = 1e-3 * np.trace(G) / K
    Q = normalize(G[None].copy(), lam)[0][0]
    w, pivots, start = _bpp(Q, np.ones(K, dtype=bool), 100, SubsetSolver(Q, np.float64, 0.0))  # as solve() does
    assert w is None and start is not None and pivots <= 12  # this case does oscillate, and stops early
    assert start.min() >= 0 and start.sum() == pytest.approx(1.0, abs=1e-12)
    res = solve(G, lam)
    assert res.converged and res.iterations <= 40
    assert_kkt(G, lam, res.weights, tol=1e-10)
    _, f_ref = reference(G, lam)
    assert res.objective <= f_ref + 1e-12 * np.max(np.diag(G))


@pytest.mark.parametrize("start", ("vertex", "uniform", "random"))
@pytest.mark.parametrize("lam", (0.0, 0.05))
def test_wolfe_phase_is_exact_from_any_start(start, lam):
    """Phase 2 alone, with its block additions and long steps, from any point of the simplex: the optimum (KKT,
    cvxpy's objective), also at lam = 0 with rank-deficient G and duplicated tasks (affinely dependent sets)."""
    from gradconflict.pareto.active_set import _wolfe
    from gradconflict.pareto.solver import normalize

    rng = np.random.default_rng(11)
    J = rng.standard_normal((30, 5))
    J = np.vstack([J, J[:10]])  # tasks 30..39 duplicate tasks 0..9
    G = J @ J.T + 0.3 * np.outer(np.ones(40), np.ones(40))  # optimum objective > 0 at lam = 0
    lam = lam * np.trace(G) / 40
    Q, s = normalize(G[None].copy(), lam)
    w0 = {"vertex": None, "uniform": np.full(40, 1 / 40), "random": rng.dirichlet(np.ones(40))}[start]
    _, f_ref = reference(G, lam)
    for blocks in (True, False):  # solve_one uses blocks with a ridge and Wolfe's one task at a time without
        w, cycles = _wolfe(Q[0], w0, 10_000, 0.0 if lam > 0 else 1.0, blocks=blocks)
        assert cycles < 200
        assert_kkt(G, lam, w, tol=1e-10)
        f = float(w @ G @ w + lam * w @ w)
        assert f <= f_ref + 1e-10 * s[0]


@pytest.mark.parametrize("lam", (1e-22, 1e-14, 1e-12))
def test_tiny_ridge_on_a_singular_gram_is_solved_like_lam_zero(lam):
    """lam / s far below float64's resolution of Q: Q_FF is singular to working precision, so the solver must
    keep the 1 1^T shift of the lam = 0 path (a ridge this small once made it stop at a vertex: f = 1, gap 4)."""
    G = np.array([[1.0, -1.0], [-1.0, 1.0]])
    res = solve(G, lam)
    assert res.converged
    np.testing.assert_allclose(res.weights, [0.5, 0.5], atol=1e-9)
    G = gram(300, 75, 0)
    res = solve(G, lam * np.trace(G) / 300)
    assert res.converged
    assert_kkt(G, lam * np.trace(G) / 300, res.weights, tol=1e-10)


@pytest.mark.parametrize("method, opts", [("frank_wolfe", {}), ("frank_wolfe", {"variant": "vanilla"}),
                                          ("ugd", {}), ("auto", {})])
def test_converged_means_relative_accuracy_of_the_objective_on_a_widely_spread_diagonal(method, opts):
    """An x0-unit Gram: gradient norms over 5.5 decades (diagonal over 11).  A tolerance relative to the largest
    diagonal entry let Frank-Wolfe report converged at iteration 0, 2% above the optimum; converged must now
    certify (f - f*) / f <= tol, against cvxpy."""
    rng = np.random.default_rng(4)
    norms = np.logspace(-1.4, 4.2, 6)
    U = rng.standard_normal((6, 40))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    G = (norms[:, None] * U) @ (norms[:, None] * U).T
    lam = 0.01
    _, f_ref = reference(G, lam)
    assert f_ref < 1e-9 * np.max(np.diag(G))  # the optimum is tiny on the scale of the largest entry
    res = solve(G, lam, method, **opts)
    if res.converged:
        assert res.gap <= (1e-9 if method == "auto" else 1e-8) * res.objective * (1 + 1e-12)
        assert (res.objective - f_ref) / f_ref <= 1e-8
    assert method != "auto" or res.converged
    if method != "auto":  # the start (FW's best vertex, UGD's uniform point) is far from optimal: not converged
        start = solve(G, lam, method, **opts, **({"steps": 0} if method == "ugd" else {"max_iter": 0}))
        assert start.objective > 1.01 * f_ref and not start.converged



def test_lam_zero_polish_reaches_the_exact_support_solution():
    """lam = 0, task norms over 4 decades: phase 1's shift 1 swamps Q_FF when the objective is small; the polish
    (shift = f) must reach the relative gap the exact answer has (45 of 200 such 3 x 3 problems reported
    converged=False at gap/f ~ 7e-8 without it)."""
    for seed in range(40):
        r = np.random.default_rng(seed)
        A = r.standard_normal((3, 3)) * np.logspace(-2, 2, 3)[:, None]
        G = A @ A.T
        res = solve(G, 0.0)
        assert res.converged, seed
        assert res.gap <= 1e-9 * res.objective + 1e-15 * np.max(np.diag(G))
        assert_kkt(G, 0.0, res.weights, tol=1e-12)


def test_tol_zero_runs_without_warnings():
    import warnings

    G = gram(8, 4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve(G, 0.0, tol=0.0)
    assert_kkt(G, 0.0, res.weights, tol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lam_zero_on_a_rank_deficient_gram_starts_phase_two_from_a_small_ridge(seed):
    """lam = 0, rank K/2: the full set is singular, and phase 2 from a vertex built the support one task at a time
    (126-203 solves at K = 200); it now starts from the optimum with a 1e-8 ridge, restricted to an affinely
    independent subset of its support."""
    G = gram(200, 100, seed)
    res = solve(G, 0.0)
    assert res.converged and res.iterations <= 60
    assert_kkt(G, 0.0, res.weights, tol=1e-10)
    _, f_ref = reference(G, 0.0)
    assert res.objective <= f_ref + 1e-10 * np.max(np.diag(G))


@pytest.mark.parametrize("K, rank, seed", [(100, 50, 0), (300, 150, 5)])
def test_a_zero_task_at_lam_zero_gets_all_the_weight_exactly(K, rank, seed):
    """A task with a zero gradient makes its vertex optimal (f = 0). The ridge warm start spread weights of ~6e-11
    over 150 other tasks here and ended unconverged after 88 solves; the vertex is now taken at once."""
    A = np.random.default_rng(seed).standard_normal((K, rank))
    A[7] = 0.0  # task 7 has a zero gradient: f* = 0 at w = e_7
    res = solve(A @ A.T, 0.0)
    assert res.converged and res.weights[7] == 1.0 and res.objective == 0.0
