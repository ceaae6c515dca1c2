"""Exact active-set solver for the simplex QP (method ``"auto"``).

Problem (``Q = (G + lam I) / s`` normalized, see :func:`..solve`)::

    min_w  w^T Q w   s.t.  w >= 0,  1^T w = 1.

KKT conditions with ``g = Q w`` and ``mu = w^T g``: ``g_i = mu`` where
``w_i > 0`` and ``g_i >= mu`` where ``w_i = 0``.  On a support ``F`` the
weights solve the equality-constrained problem ("affine minimizer")

    Q_FF v = mu 1,  1^T v = 1   =>   v = x / (1^T x),  (Q_FF + 1 1^T) x = 1.

At ``lam = 0`` ``Q + 1 1^T`` is used instead of ``Q``: for ``w`` with
``1^T w = 1`` it only adds a constant, the solution ``v`` is the same, and it
stays positive definite whenever the tasks in ``F`` are affinely independent
-- even when ``Q_FF`` is singular (rank-deficient ``G``).  With a ridge
``Q_FF`` is positive definite and is factored as it is (``1 1^T`` would add
an eigenvalue of about ``|F|`` and multiply the condition number).

Two phases, both finite:

1. Block principal pivoting (Judice & Pires 1994; Kim & Park 2011) on the
   complementarity system, starting from ``F = {all tasks}`` (or the support
   of a warm start ``w0``): solve on ``F``, then move every task with
   ``v_i < 0`` out of ``F`` and every task with ``g_j < mu`` into it.  Usually
   a handful of solves; consecutive sets differ by few tasks, so most solves
   are cheap Schur-complement updates of one Cholesky factorization
   (:mod:`._cholesky`).  Pivoting decisions use solves refined to a relative
   residual of 1e-8; a set without violations is re-solved to float64
   rounding level before it is accepted.  From ``K >= 256`` on the factor is
   first computed in float32 (half the time of float64) and refined against
   the float64 matrix; if that fails (too ill-conditioned) phase 1 reruns in
   float64.  If the number of violations stops decreasing for 3 rounds
   (full exchanges can oscillate on ill-conditioned sets, e.g. a Gram of rank
   about K/2 with a small ridge), phase 1 stops and hands its best iterate,
   clipped to the simplex, to phase 2.  Without a ridge (``lam / s <= 1e-10``,
   where ``Q`` may be singular) it moves one task instead (Murty's rule,
   finite) and goes on.
2. Wolfe's min-norm-point algorithm (Wolfe 1976) in Gram form, from that
   point (or from the best vertex): keep a set ``S`` with ``w_S > 0``; move
   ``w`` toward the affine minimizer of ``S`` and drop tasks whose weight
   reaches 0 (minor cycles); then add tasks with ``g_j < mu`` (major cycle).
   Wolfe adds one task, ``argmin_j g_j``; with a ridge every violating task
   is added at once, those that the affine minimizer gives a weight ``<= 0``
   leave again without a step, and a step past the ratio test, clipped to the
   simplex, is taken when it decreases the objective at least as much.  If
   none of them stays, the next major cycle adds only ``argmin_j g_j``, which
   Wolfe's theorem says always decreases the objective; the objective thus
   decreases strictly from one major cycle to the next and phase 2 is finite.
   Phase 2 also runs when phase 1 meets a
   singular system or its iteration cap, and handles ``lam = 0`` with
   rank-deficient ``G`` and duplicated tasks, where the optimum need not be
   unique.  There, when the full set is singular, it starts from the optimum
   with a ridge of 1e-8 (fast: positive definite), restricted to an affinely
   independent subset of its support, instead of from a vertex.

Sign decisions use the absolute thresholds ``1e-13`` on the normalized
problem.  The result is accepted as ``converged`` when its duality gap
``2 (mu - min_i g_i) <= tol * mu`` (default ``1e-9``: the objective to a
relative accuracy of 1e-9; :func:`.objective.gap_tolerance`); the
``converged`` that :func:`..solve` reports is its one rule for every method
(:func:`.objective.certify`).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from ._cholesky import LowRankSubsetSolver, SubsetSolver
from .objective import gap_tolerance

EPS = 1e-13  # sign threshold for weights and reduced gradients (normalized units)
BPP_CAP = 100  # phase-1 pivots before handing over to phase 2
MIXED_MIN_K = 256  # from this K on, phase 1 first tries a float32 factor (refined to float64)
RIDGE_PD = 1e-10  # lam / s above this: Q is positive definite to working precision (shift 0, stall handover, blocks)
WARM_RIDGE = 1e-8  # lam / s of the warm-up solve that finds the support at lam ~ 0 on a rank-deficient G
WARM_MIN_K = 32  # below this, phase 2 from a vertex is cheap anyway
INDEPENDENT = 1e-9  # a task whose pivot in Q_FF + 1 1^T falls below this share of its diagonal is dependent
DUST = 1e-12  # weights below this share of the largest may be rounding left-overs (dropped if that helps)
AMBIGUOUS = 1e-6  # violations this small (normalized units) are re-checked on a precise solve before pivoting


def active_set(
    Q: np.ndarray,
    *,
    tol: float = 1e-9,
    max_iter: int | None = None,
    w0: np.ndarray | None = None,
    _lowrank: list | None = None,
    _ridge: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve every normalized problem in the (n, K, K) stack ``Q`` exactly.

    Args:
        Q: normalized PSD matrices.
        tol: relative duality gap accepted as converged (``gap <= tol * f(w)``).
        max_iter: cap on the total number of phase-1 pivots (at most 100
            per attempt) and phase-2 cycles (default ``max(100, 10 K)``).
        w0: optional (K,) or (n, K) warm start; its support starts phase 1.
        _lowrank: internal, per problem None or ``(B, alpha, resid)`` with
            ``Q = B^T B + alpha I + E``, ``||E||_F <= resid`` (from the PSD
            check); phase 1 then uses :class:`LowRankSubsetSolver`.
        _ridge: internal, per problem ``lam / s`` (see :func:`solve_one`).

    Returns:
        ``(W, iterations, converged)``; ``iterations`` counts the linear
        solves (phase-1 pivots plus phase-2 cycles).
    """
    n, K, _ = Q.shape
    cap = max(100, 10 * K) if max_iter is None else int(max_iter)
    if cap < 1:
        raise ValueError(f"max_iter must be >= 1, got {cap}")
    starts = None if w0 is None else np.broadcast_to(np.asarray(w0, dtype=np.float64), (n, K)) > 0
    W = np.zeros((n, K))
    iters = np.zeros(n, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    for i in range(n):
        lr = None if _lowrank is None else _lowrank[i]
        W[i], iters[i], ok[i] = solve_one(
            Q[i], tol=tol, max_iter=cap, start=None if starts is None else starts[i], lowrank=lr,
            ridge=None if _ridge is None else float(_ridge[i]),
        )
    return W, iters, ok


def solve_one(
    Q: np.ndarray,
    *,
    tol: float = 1e-9,
    max_iter: int = 1000,
    start: np.ndarray | None = None,
    lowrank: tuple[np.ndarray, float, float] | None = None,
    ridge: float | None = None,
) -> tuple[np.ndarray, int, bool]:
    """Exact solve of one normalized problem: ``(w, iterations, converged)``.

    ``lowrank = (B, alpha, resid)`` (``Q = B^T B + alpha I + E``,
    ``||E||_F <= resid``) switches phase 1 to Woodbury solves when
    ``resid <= alpha / 10``; it falls back to the dense phase 1 on failure.
    ``ridge`` (``lam / s``, when known): the float32 attempt is skipped for
    ``ridge == 0``, where rank-deficient problems make it fail.
    ``iterations`` counts every phase-1 pivot of every attempt plus the
    phase-2 cycles; ``max_iter`` caps that total.
    """
    K = Q.shape[0]
    if K == 1:
        return np.ones(1), 0, True
    definite = ridge is not None and ridge > RIDGE_PD  # Q positive definite to working precision
    if not definite:
        vertex = int(np.argmin(np.diagonal(Q)))
        if Q[vertex, vertex] <= DUST:  # a task with a zero gradient at lam ~ 0: its vertex has f = 0 = f*
            w = np.zeros(K)
            w[vertex] = 1.0
            _, ok = _gap(Q, w, tol)
            if ok:
                return w, 0, True
    F0 = np.ones(K, dtype=bool) if start is None or not start.any() else start.copy()
    cap = BPP_CAP
    attempts = []  # subset solvers to try in turn, built only when reached
    if lowrank is not None and lowrank[1] > 0 and lowrank[2] <= 0.1 * lowrank[1]:
        attempts.append(lambda: LowRankSubsetSolver(Q, lowrank[0], lowrank[1]))
    # with a ridge Q is positive definite: solve with Q_FF itself (shift 0), not Q_FF + 1 1^T, whose extra
    # eigenvalue ~|F| would multiply the condition number (and break a float32 factor on badly scaled G)
    # (a shift 1 would also swamp a support of small-norm tasks, Q_ii << 1, in rounding: keep 0 whenever lam > 0)
    shift = 0.0 if definite else 1.0
    if K >= MIXED_MIN_K and (ridge is None or definite):
        attempts.append(lambda: SubsetSolver(Q, np.float32, shift))  # single-precision factor, float64 refinement
    if ridge is not None and 0 < ridge <= RIDGE_PD:  # a tiny ridge: Q may be singular to working precision
        attempts.append(lambda: SubsetSolver(Q, np.float64, 0.0))  # then this fails and shift 1 follows
    attempts.append(lambda: SubsetSolver(Q, np.float64, shift))
    w, gap, ok, total, start = None, np.inf, False, 0, None
    F_try = F0  # the next attempt's first set
    for make in attempts:
        if total >= max_iter:
            break
        w, it, start = _bpp(Q, F_try.copy(), min(cap, max_iter - total), make(), stall=definite)
        total += it
        if w is None and start is None and F_try is not F0 and total < max_iter:
            # the set the last attempt ended on is singular in this precision: pivot again from the first set
            w, it, start = _bpp(Q, F0.copy(), min(cap, max_iter - total), make(), stall=definite)
            total += it
        gap, ok = _gap(Q, w, tol) if w is not None else (np.inf, False)
        if ok or start is not None:  # solved, or stalled (another precision would oscillate alike)
            break
        # a set without violations whose solve (float32, refined) is not precise enough: the next precision starts
        # from it (usually one factorization) instead of pivoting again from the first set (lam = 0: 53 -> 30 ms
        # on the K = 1000 engine Gram of bench_solvers.py)
        F_try = w > 0 if w is not None else F0
    if not ok and not definite and w is None and start is None and F0.all() and K >= WARM_MIN_K:
        # lam ~ 0 and the full set is singular (rank-deficient G): phase 2 from a vertex would build the support one
        # task at a time; the optimum with a small ridge is found fast and has nearly the same support
        start, it_w = _warm_start(Q, tol, max_iter - total)
        total += it_w
    if not ok:  # phase 2 on what is left of the budget (with none left it returns a feasible start)
        w2, it2 = _wolfe(Q, w if w is not None else start, max_iter - total, shift, blocks=definite)
        total += it2
        gap2, ok2 = _gap(Q, w2, tol)
        if gap2 < gap or w is None:
            w, gap, ok = w2, gap2, ok2
    if not ok and not definite and total < max_iter:  # lam ~ 0: polish with the shift scaled to the objective
        w, gap, ok, it3 = _polish(Q, w, gap, tol, min(cap, max_iter - total))
        total += it3
    if not ok:  # weights at the rounding level of the others (e.g. next to a zero task, f* = 0): drop them
        clean = np.where(w > DUST * w.max(), w, 0.0)
        clean /= clean.sum()
        gap_c, ok_c = _gap(Q, clean, tol)
        if gap_c < gap:
            w, ok = clean, ok_c
    return w, total, ok


def _warm_start(Q: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray | None, int]:
    """A start for phase 2 at lam ~ 0: the optimum of ``Q + WARM_RIDGE I`` (positive definite: the fast path),
    restricted to an affinely independent subset of its support (phase 2 needs one; a ridge spreads tiny weights
    over more tasks than rank(G) + 1), largest weights first.  Returns ``(w or None, solves)``."""
    K = Q.shape[0]
    Qr = Q.copy()
    Qr[np.diag_indices(K)] += WARM_RIDGE
    w_r, it, _ = solve_one(Qr, tol=tol, max_iter=max_iter, ridge=WARM_RIDGE)
    order = np.flatnonzero(w_r > 0)
    order = order[np.argsort(-w_r[order], kind="stable")]
    kept: list[int] = []
    L = np.zeros((order.size, order.size))
    for i in order:  # greedy incremental Cholesky of Q_FF + 1 1^T (the matrix phase 2 factors)
        k = len(kept)
        d = Q[i, i] + 1.0
        x = solve_triangular(L[:k, :k], Q[kept, i] + 1.0, lower=True, check_finite=False) if k else np.zeros(0)
        pivot = d - x @ x
        if pivot <= INDEPENDENT * d:
            continue
        L[k, :k], L[k, k] = x, np.sqrt(pivot)
        kept.append(int(i))
    if not kept:
        return None, it
    w0 = np.zeros(K)
    w0[kept] = w_r[kept]
    return w0 / w0.sum(), it


def _polish(Q: np.ndarray, w: np.ndarray, gap: float, tol: float, max_iter: int
            ) -> tuple[np.ndarray, float, bool, int]:
    """Phase 1 again from the support of ``w``, with ``c = f(w)`` in ``M_F = Q_FF + c 1 1^T``.  Without a ridge the
    sets are solved with ``c = 1``, the largest ``Q_ii``; where the objective is far smaller (a support of
    small-norm tasks, or gradients that cancel) that swamps ``Q_FF v = mu 1`` in rounding and leaves a relative
    gap of ~1e-8 where ~1e-14 is reachable.  ``c = f`` keeps both terms of ``M_F v`` at the scale of ``mu = f``.
    Returns ``(w, gap, converged, solves)``, the better answer."""
    c = _objective(Q, w)
    if not c > 0:
        return w, gap, False, 0
    w3, it3, _ = _bpp(Q, w > 0, max_iter, SubsetSolver(Q, np.float64, c), stall=False)
    if w3 is not None:
        gap3, ok3 = _gap(Q, w3, tol)
        if gap3 < gap:
            return w3, gap3, ok3, it3
    return w, gap, False, it3


def _gradient(Q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``Q w`` from the rows of w's support (``|S| K`` reads instead of ``K^2`` while the support is small)."""
    S = np.flatnonzero(w)
    if 3 * S.size >= w.size:
        return Q @ w
    return w[S] @ Q[S]  # Q symmetric: sum of the support's rows


def _objective(Q: np.ndarray, w: np.ndarray) -> float:
    return float(w @ _gradient(Q, w))


def _gap(Q: np.ndarray, w: np.ndarray, tol: float) -> tuple[float, bool]:
    """``(gap, converged)``: the duality gap ``2 (f - min_i g_i)`` and whether it is within
    :func:`.objective.gap_tolerance`."""
    g = _gradient(Q, w)
    gap = 2.0 * (float(w @ g) - float(g.min()))
    return gap, bool(gap <= gap_tolerance(Q[None], w[None], g[None], tol)[0])


def _bpp(
    Q: np.ndarray, F: np.ndarray, max_iter: int, sub=None, stall: bool = True
) -> tuple[np.ndarray | None, int, np.ndarray | None]:
    """Phase 1: block principal pivoting.  Returns ``(w or None, solves, start)``.

    ``start`` is None unless pivoting stalled (no fewer violations for 3 rounds) with ``stall=True``: then ``w``
    is None and ``start`` is the iterate with the fewest violations, clipped to the simplex, for phase 2.  With
    ``stall=False`` (a singular ``Q``, lam ~ 0) a stalled round moves one task only (Murty's least-index rule,
    largest index here) and pivoting goes on.
    """
    K = Q.shape[0]
    sub = SubsetSolver(Q) if sub is None else sub
    best, budget, best_w = K + 1, 3, None
    precise = False  # pivot on loosely refined solves; solve precisely before accepting or on close calls
    always_precise = False  # set when a loose solve led back to a set seen before (a sign decided wrongly)
    seen: set[bytes] = set()
    it = 0
    w_prev = -np.diagonal(Q)  # first factor: small-norm tasks first (large ones tend to leave)
    while True:
        if not precise:  # a precise re-solve of the same set is not a new pivot
            if it == max_iter:
                return None, it, None
            it += 1
        if not precise:
            key = np.packbits(F).tobytes()
            if key in seen:  # cycling: on an ill-conditioned set a loose solve can get a small weight's sign wrong
                always_precise = True
            seen.add(key)
        out = sub.affine_weights(precise or always_precise) if sub.update(F, priority=w_prev) else None
        if out is None:
            return None, it, None
        idx, v = out
        w = np.zeros(K)
        w[idx] = v
        w_prev = w  # orders the next factor: small weights (likely to leave) last
        g = _gradient(Q, w)
        mu = w @ g
        primal = idx[v < -EPS]
        dual = np.flatnonzero((g < mu - EPS) & ~F)
        nviol = primal.size + dual.size
        if nviol == 0 and (precise or always_precise):
            np.maximum(w, 0.0, out=w)
            return w / w.sum(), it, None
        if not precise and not always_precise:
            worst = max(-v.min(initial=0.0), mu - g[~F].min(initial=mu))
            if nviol == 0 or worst <= AMBIGUOUS:
                precise = True  # accept, or decide a close call, only on a precise solve of this set
                continue
        precise = False
        if nviol < best:
            best, budget, best_w = nviol, 3, w
        elif budget > 0:
            budget -= 1
        elif stall:  # stalled: phase 2 from the best iterate, clipped to the simplex
            start = np.maximum(best_w, 0.0)
            return None, it, start / start.sum()
        else:  # Murty's rule: move the violating task with the largest index only
            last = max(primal.max(initial=-1), dual.max(initial=-1))
            primal, dual = primal[primal == last], dual[dual == last]
        F[primal] = False
        F[dual] = True


def _wolfe(
    Q: np.ndarray, w_start: np.ndarray | None, max_iter: int, shift: float = 1.0, blocks: bool = True
) -> tuple[np.ndarray, int]:
    """Phase 2: Wolfe's min-norm-point algorithm on ``Q`` (module docstring).

    ``w_start``: any point of the simplex (its support is the first set), or None for the vertex of the
    smallest ``Q_ii``.  ``shift``: as for :class:`SubsetSolver` (0 needs a positive definite ``Q``).
    ``blocks``: add every violating task at once and try clipped long steps (for a positive definite ``Q``);
    False is Wolfe's original one task per major cycle and ratio-test steps (for a singular ``Q``, lam ~ 0,
    where larger sets are affinely dependent).  Returns ``(w, cycles)``; ``cycles`` counts the solves.
    """
    K = Q.shape[0]
    sub = SubsetSolver(Q, np.float64, shift)
    w = np.zeros(K)
    vertex = int(np.argmin(np.diagonal(Q)))
    from_start = w_start is not None and bool((w_start > 0).any())
    if from_start:
        w[:] = np.maximum(w_start, 0.0)
        w /= w.sum()
    else:
        w[vertex] = 1.0
    F = w > 0
    added = np.zeros(K, dtype=bool)  # tasks added by the last major cycle
    block = blocks  # the next major cycle adds every violating task (False: only the most violating one)
    it = 0
    while it < max_iter:
        it += 1
        out = sub.affine_weights() if sub.update(F) else None
        if out is None:
            if from_start and it == 1:  # the start's support is (numerically) affinely dependent: start at a vertex
                w[:] = 0.0
                w[vertex] = 1.0
                F = w > 0
                continue
            if block and (added & F).any() and not (w[added] > 0).any():  # the block made the set affinely
                F &= ~added  # dependent before any step: add one task instead
                block = False
                continue
            return w, it  # numerically affinely dependent: no further progress possible
        idx, v = out
        wS = w[idx]
        if (v > 0).all():  # minor cycles done: w is the affine minimizer of F
            w[:] = 0.0
            w[idx] = v
            block = blocks and (not added.any() or bool((added & F).any()))  # a block none of which stayed: one next
            g = _gradient(Q, w)
            mu = w @ g
            viol = np.flatnonzero((g < mu - EPS) & ~F)
            if viol.size == 0:
                break
            if not block:
                viol = viol[[int(np.argmin(g[viol]))]]
            added[:] = False
            added[viol] = True
            F[viol] = True
            continue
        neg = v <= 0
        fresh = neg & (wS <= 0)  # just added (weight 0) and the affine minimizer would make them negative
        if fresh.any():
            if not block:
                return w, it  # stalled on the one task just added
            F[idx[fresh]] = False
            continue
        k = np.flatnonzero(neg)
        ratios = wS[k] / (wS[k] - v[k])
        step = float(ratios.min())
        wS_ratio = wS + step * (v - wS)  # Wolfe's step: up to the first weight that reaches 0
        drop = neg & (wS_ratio <= EPS * 1e-3)
        drop[k[int(np.argmin(ratios))]] = True
        wS_ratio[drop] = 0.0
        w_ratio = np.zeros(K)
        w_ratio[idx] = wS_ratio / wS_ratio.sum()
        w_next = _longer_step(Q, idx, wS, v, step, w_ratio) if blocks else None  # past it, clipped, if as good
        w = w_next if w_next is not None else w_ratio
        F = w > 0
    return w, it


LONG_STEPS = (1.0, 0.5, 0.25, 0.125)  # steps tried beyond the ratio test in phase 2's minor cycles


def _longer_step(
    Q: np.ndarray, idx: np.ndarray, wS: np.ndarray, v: np.ndarray, ratio_step: float, w_ratio: np.ndarray
) -> np.ndarray | None:
    """The longest step ``t`` of :data:`LONG_STEPS` (``t > ratio_step``) whose point ``w + t (v - w)``, clipped to
    ``>= 0`` and renormalized, has an objective no larger than Wolfe's ratio-test point ``w_ratio``; None if
    none has.  It drops every weight that crosses 0 in one solve instead of one per solve (Wolfe's rule), and
    keeps the objective's decrease at least that of the ratio test, so phase 2 stays a descent method."""
    f_ratio = _objective(Q, w_ratio)
    cand = np.zeros(Q.shape[0])
    for t in LONG_STEPS:
        if t <= ratio_step:
            break
        cand[idx] = np.maximum(wS + t * (v - wS), 0.0)
        cand /= cand.sum()
        if _objective(Q, cand) <= f_ratio:
            return cand.copy()
    return None
