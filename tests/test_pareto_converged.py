"""One ``converged`` rule for every Pareto method (issue #15).

``solve`` must report ``converged`` by the same rule for every method, checked after the method returns:
``gap <= tol * f`` (down to the rounding level of G), whatever a backend's own status says.  References are
independent of the code under test: the gap and objective recomputed here with plain numpy from G, a known
null vector of A^T (f* = 0), and CVXPY called directly on a well-scaled form of the problem.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest

from gradconflict.pareto import solve, solver

EPS = np.finfo(np.float64).eps
TOL = {"auto": 1e-9, "frank_wolfe": 1e-8, "ugd": 1e-8, "cvxpy": 1e-8}  # each method's documented default tol


def numpy_gap(G: np.ndarray, lam: float, w: np.ndarray) -> tuple[float, float]:
    """``(f, gap)``: ``f = w^T (G + lam I) w``, ``gap = grad^T w - min_i grad_i``, ``grad = 2 (G + lam I) w``."""
    grad = 2.0 * (G @ w + lam * w)
    return float(w @ G @ w + lam * w @ w), float(w @ grad - grad.min())


def wide_gram(K: int = 30, seed: int = 0) -> np.ndarray:
    """A model-like Gram: gradient norms over 5 decades, so the diagonal spans 10."""
    A = np.random.default_rng(seed).standard_normal((K, 200)) * np.logspace(0, 5, K)[:, None]
    return A @ A.T


def scaled_reference(G: np.ndarray, lam: float) -> float:
    """Optimal objective from CVXPY on ``(G + lam I) / lam``: an objective of order 1, so Clarabel's absolute
    tolerances are relative ones here (on ``/ max diag`` the optimum is ~1e-9 and they are not)."""
    K = G.shape[0]
    Q = (G + lam * np.eye(K)) / lam
    w = cp.Variable(K)
    prob = cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap((Q + Q.T) / 2))), [w >= 0, cp.sum(w) == 1])
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14)
    x = np.clip(w.value, 0, None)
    return numpy_gap(G, lam, x / x.sum())[0]


# ------------------------------------------------ the cvxpy backend's "optimal" is not a certificate
def test_cvxpy_is_not_converged_when_its_gap_breaks_tol_on_a_wide_spectrum_gram():
    """Issue #15: K = 30 model Gram, lam = 1e-6 trace / K: method='cvxpy' reported converged=True at
    gap / objective ~1e-4 (Clarabel's tolerances are absolute on the objective / max diag ~ 1e-9)."""
    G = wide_gram()
    K = G.shape[0]
    assert np.log10(np.diag(G).max() / np.diag(G).min()) > 9.5
    lam = 1e-6 * np.trace(G) / K
    f_ref = scaled_reference(G, lam)
    res = solve(G, lam, "cvxpy")
    f, gap = numpy_gap(G, lam, res.weights)
    assert gap == pytest.approx(res.gap, rel=1e-6) and f == pytest.approx(res.objective, rel=1e-12)
    assert gap > 1e-6 * f  # far beyond tol = 1e-8: the backend's answer is loose
    assert (f - f_ref) / f_ref > 1e-6  # and truly worse than the optimum
    assert not res.converged
    assert "tol_gap_abs" in res.hint
    loose = solve(G, lam, "cvxpy", tol=1e-3)  # the same answer under a tol it meets: converged
    assert loose.converged and loose.hint == ""
    np.testing.assert_allclose(loose.weights, res.weights, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "frank_wolfe", "ugd", "cvxpy"])
def test_every_method_reports_converged_by_the_gap_rule_on_a_wide_spectrum_gram(method):
    """Here the rounding floor is below 1e-7 f, so converged is ``gap <= tol * f`` up to it, for every
    method alike (ugd stops far off; the exact methods certify; cvxpy's "optimal" does not)."""
    G = wide_gram()
    lam = 1e-6 * np.trace(G) / G.shape[0]
    res = solve(G, lam, method)
    f, gap = numpy_gap(G, lam, res.weights)
    if res.converged:
        assert gap <= 1e-7 * f
        assert (f - scaled_reference(G, lam)) / f <= 1e-7
    else:
        assert gap > TOL[method] * f and res.hint
    assert res.converged == (method in ("auto", "frank_wolfe"))


@pytest.mark.parametrize("backend_says", [True, False])
def test_the_backend_status_is_not_used(monkeypatch, backend_says):
    """Whatever the method returns as its own verdict, solve() decides converged from the gap of the weights."""
    G = np.array([[2.0, 0.0], [0.0, 1.0]])  # optimum (1/3, 2/3), f* = 2/3
    uniform = np.array([[0.5, 0.5]])
    optimum = np.array([[1 / 3, 2 / 3]])
    W = optimum if not backend_says else uniform  # the verdict is always the wrong one
    monkeypatch.setitem(solver.SOLVERS, "cvxpy",
                        lambda Q, **kw: (W.copy(), np.array([1]), np.array([backend_says])))
    res = solve(G, 0.0, "cvxpy")
    f, gap = numpy_gap(G, 0.0, res.weights)
    assert res.converged == (gap <= 1e-8 * f) == (not backend_says)
    assert res.objective == pytest.approx(f, rel=1e-15) and res.gap == pytest.approx(gap, rel=1e-12, abs=1e-16)


# ------------------------------------------- an optimum at the rounding level of G is certified
def zero_optimum_gram(K: int, rank: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``G = A A^T`` (rank <= ``rank``, row norms over ``spread`` decades, trace 4e7) with a simplex vector
    ``u`` in the null space of ``A^T``: ``f(u) = 0 = f*`` at lam = 0."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((K - 1, rank))
    c = rng.random(K - 1)
    s = np.logspace(0, spread, K)[rng.permutation(K)]
    A = s[:, None] * np.vstack([B, -c @ B])  # A^T u = 0 for u = (c, 1) / s
    G = A @ A.T
    G *= 4e7 / np.trace(G)
    u = np.append(c, 1.0) / s
    return G, u / u.sum()


@pytest.mark.parametrize("K, rank, spread, seed", [(2, 1, 2, 8), (7, 1, 1, 4), (40, 13, 2, 1), (150, 50, 2, 1)])
def test_a_zero_optimum_at_rounding_level_is_converged(K, rank, spread, seed):
    """Issue #15: lam = 0, rank-deficient G with f* = 0: solve() returned the right weights (objective ~1e-14
    against a trace of 4e7) but converged=False (these four cases did so before the fix)."""
    G, u = zero_optimum_gram(K, rank, spread, seed)
    trace = np.trace(G)
    f_u = numpy_gap(G, 0.0, u)[0]
    assert abs(f_u) <= 1e-13 * trace  # f* = 0 up to rounding
    res = solve(G, 0.0)
    f, gap = numpy_gap(G, 0.0, res.weights)
    assert abs(f) <= 1e-13 * trace  # the objective is at the rounding level ...
    assert gap <= 4 * EPS * trace  # ... and so is the gap: a few units of eps x trace
    x = cp.Variable(K)  # the CVXPY optimum as a reference objective
    cp.Problem(cp.Minimize(cp.quad_form(x, cp.psd_wrap(G / trace))), [x >= 0, cp.sum(x) == 1]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14)
    f_cvx = numpy_gap(G, 0.0, np.clip(x.value, 0, None) / np.clip(x.value, 0, None).sum())[0]
    assert f <= f_cvx + 1e-12 * trace
    assert res.converged and res.hint == ""
    assert res.gap == pytest.approx(gap, rel=1e-6, abs=1e-3 * EPS * trace)  # the same gap, from G in float64


def test_the_floor_is_rounding_level_not_a_free_pass(monkeypatch):
    """On the same kind of Gram, the exact null vector u (f* = 0) is converged, and a point 1e-6 off it is not
    (its gap is ~1e5 eps x trace), whichever answer a method hands back with whatever verdict."""
    G, u = zero_optimum_gram(40, 13, 2, 1)
    w_off = u.copy()
    w_off[np.argmax(np.diag(G))] += 1e-6
    w_off /= w_off.sum()
    for w, expect in ((u, True), (w_off, False)):
        monkeypatch.setitem(solver.SOLVERS, "cvxpy",
                            lambda Q, w=w, expect=expect, **kw: (w[None].copy(), np.array([0]), np.array([not expect])))
        res = solve(G, 0.0, "cvxpy")
        gap = numpy_gap(G, 0.0, res.weights)[1]
        assert (gap <= 4 * EPS * np.trace(G)) == expect == res.converged
        assert expect or gap > 1e3 * EPS * np.trace(G)


# ---------------------------------------------------------------------------- the hint
def test_hint_names_what_to_change_with_the_values_used():
    A = np.random.default_rng(0).standard_normal((40, 40))
    G = A @ A.T
    ugd = solve(G, 0.01, "ugd", steps=5)
    assert not ugd.converged
    assert "steps (now 5)" in ugd.hint and "lr (now 0.05)" in ugd.hint
    sgd = solve(G, 0.01, "ugd", optimizer="sgd", steps=5)
    assert "lr (now 10)" in sgd.hint  # the optimizer's default learning rate
    fw = solve(G, 0.01, "frank_wolfe", max_iter=3, variant="vanilla")
    assert not fw.converged and "max_iter (now 3)" in fw.hint and "variant='away'" in fw.hint
    auto = solve(G, 0.01, "auto", max_iter=1)
    assert not auto.converged and "max_iter (now 1)" in auto.hint
    batch = solve(np.stack([G, G]), 0.01, "ugd", steps=3)
    assert "2 of 2 problems" in batch.hint
    done = solve(G, 0.01)
    assert done.converged and done.hint == ""
