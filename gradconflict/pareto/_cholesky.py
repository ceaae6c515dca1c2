"""Solves with ``M_F = Q[F, F] + c 1 1^T`` for an index set F that evolves (``c = shift``: 1, or 0 when Q
is positive definite, which keeps ``M_F`` as well conditioned as ``Q_FF`` -- it matters for a float32 factor).

A Cholesky factor ``L L^T = M_B`` is kept for a *base* set B.  A nearby set
``F = (B \\ D) + A`` (few removals D, few additions A) is handled with a
Schur complement instead of a new factorization.  With ``U = [M[B, A], E_D]``
(``E_D``: unit columns of the removed positions), ``Y = M_B^{-1} U`` (cached
per index, two triangular solves each) and ``z = M_B^{-1} 1``:

    S = [[M_AA, 0], [0, 0]] - U^T Y          (small, m = |A| + |D|)
    [x_A; zeta] = S^{-1} ([1_A; 0] - U^T z)
    x_B = z - Y [x_A; zeta]                  (x_D = 0 by construction)

solves ``M_F x = 1``; iterative refinement against the exact float64 ``M_F``
follows and a large final residual triggers a refactorization.  A set that
differs from the base mostly at the end of the factor order is instead
*tail-refactored*: the factor's leading block up to the first removed task is
kept and only the rest is factored again.  New factors order their tasks by a
priority (the caller's current weights, largest first), so the tasks that
leave in the next pivoting rounds, those with small weights, sit at the end:
a cascade of removals costs a few small tail factorizations instead of one
full factorization per round.  The factor
and the columns ``Y`` may be kept in float32 (``dtype``): refinement then
recovers float64 accuracy as long as ``cond(M_F) * 6e-8 < 1``.  The base is
refactored on F whenever that is cheaper (``|F|^3 / 3`` flops) than the new
cached columns (``2 |B|^2`` flops each) plus forming and factoring S, or when
more than ``max(64, |B| / 8)`` tasks differ from the base.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy.linalg import lapack, lu_factor, lu_solve, solve_triangular

PIVOT = 1e-12  # squared pivot / largest squared pivot below this => treat as singular
PIVOT32 = 1e-7  # the same for a single-precision factor
REFINE64 = 3  # refinement steps with a float64 factor (each gains ~16 digits / cond)
REFINE32 = 12  # with a float32 factor (each gains ~7 digits / cond)
ACCEPT = 1e-10  # a precise solve whose relative residual stays above this is treated as singular
TIGHT = 1e-16  # relative residual of a precise solve (or until refinement stalls at rounding level)
LOOSE = 1e-8  # relative residual that is enough to decide signs while pivoting
SMALL = 128  # below this size a refactorization is cheaper than Python-level Schur bookkeeping
MAX_MODS = 64  # at most max(MAX_MODS, |B| / 8) modifications before refactoring


class SubsetSolver:
    """Affine minimizers ``v = x / 1^T x``, ``M_F x = 1``, for changing sets F.

    ``dtype=np.float32`` keeps the factor and the Schur columns in single
    precision (half the flops and memory traffic of float64) and recovers full
    float64 accuracy by iterative refinement against the exact float64 ``M_F``:
    each step multiplies the error by about ``cond(M_F) * 6e-8``.  A system
    that refinement does not bring below ``1e-10`` relative residual is
    reported as singular (None), and the caller falls back to float64.
    """

    def __init__(self, Q: np.ndarray, dtype: type = np.float64, shift: float = 1.0) -> None:
        self.Q = Q
        self.shift = float(shift)  # c in M_F = Q_FF + c 1 1^T; the affine minimizer x / 1^T x is the same for any c
        self.dtype = np.dtype(dtype)
        single = self.dtype == np.float32
        self._Qf = Q.astype(np.float32) if single else Q  # gather source in the factor's precision
        self._potrf = lapack.spotrf if single else lapack.dpotrf
        self._pivot = PIVOT32 if single else PIVOT
        self._steps = REFINE32 if single else REFINE64
        self.base = np.zeros(0, dtype=np.int64)  # tasks of the factored set, in factor order
        self._pos = np.full(Q.shape[0], -1, dtype=np.int64)  # task -> position in base (-1: not in base)
        self.L: np.ndarray | None = None
        self.F = np.zeros(Q.shape[0], dtype=bool)
        self.flops = 0.0  # work counter in flops (benchmarks / tests)
        self.refinements = 0  # refinement steps taken (tests)
        self._cache: dict[int, np.ndarray] = {}  # task -> column of Y = M_B^{-1} U
        self._state: tuple | None = None  # (F, idx, apply, x) of the last solve

    def _solve_base(self, B: np.ndarray) -> np.ndarray:
        """``M_B^{-1} B`` with the (possibly single-precision) factor, returned in float64."""
        y = solve_triangular(self.L, B.astype(self.dtype, copy=False), lower=True, check_finite=False)
        y = solve_triangular(self.L, y, lower=True, trans="T", check_finite=False)
        return y.astype(np.float64, copy=False)

    def _refactor(self, F: np.ndarray, priority: np.ndarray | None = None) -> bool:
        """Factor ``M_F`` afresh, tasks ordered by ``priority`` (descending) when given, else by index."""
        idx = _ordered(np.flatnonzero(F), priority)
        M = self._Qf + self.shift if idx.size == F.size and priority is None else self._block(idx, idx)
        L, info = self._potrf(M.T, lower=1, clean=0, overwrite_a=1)  # M symmetric
        self.flops += idx.size**3 / 3
        return self._set_base(idx, F, L if info == 0 else None)

    def _block(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``M[rows, cols] = Q[rows, cols] + shift`` in the factor's precision (a fresh array LAPACK may overwrite)."""
        M = self._Qf.take(rows, axis=0).take(cols, axis=1)
        if self.shift:
            M += self.shift  # in place: no third K x K temporary
        return M

    def _set_base(self, idx: np.ndarray, F: np.ndarray, L: np.ndarray | None) -> bool:
        self._pos[self.base] = -1
        self.base, self.F, self._cache, self._state = idx, F.copy(), {}, None
        self._pos[idx] = np.arange(idx.size)
        if L is not None:
            d = np.diagonal(L).astype(np.float64) ** 2
            L = None if d.min() <= self._pivot * d.max() else L
        self.L = L
        return L is not None

    def _tail_cost(self, added: np.ndarray, removed: np.ndarray) -> tuple[int, float]:
        """``(p, flops)`` of refactoring only the trailing part of the base factor: positions ``>= p`` (the first
        removed task) are dropped or kept, the added tasks are appended, and the factor's leading ``p x p``
        block is reused as it is."""
        n = self.base.size
        p = int(self._pos[removed].min()) if removed.size else n
        t = n - p - removed.size + added.size
        return p, float(p) * p * added.size + float(t) * t * p + t**3 / 3

    def _refactor_tail(self, F: np.ndarray, p: int, added: np.ndarray, priority: np.ndarray | None) -> bool:
        """Factor ``M_F`` reusing the leading ``p x p`` block ``L11`` of the base factor (``p``: see
        :meth:`_tail_cost`).  With T the kept tasks after position p plus the added ones: ``L_T1`` is read off
        the old factor (kept rows) or solved from ``L11 x = M[B_p, a]`` (added), and ``L_TT`` is the Cholesky
        factor of ``M_TT - L_T1 L_T1^T``."""
        head = self.base[:p]
        tail = self.base[p:]
        kept = tail[F[tail]]
        T = _ordered(np.concatenate([kept, added]), priority)
        L11 = self.L[:p, :p]
        rows = np.empty((T.size, p), dtype=self.dtype)
        is_old = self._pos[T] >= 0
        rows[is_old] = self.L[self._pos[T[is_old]], :p]
        new = T[~is_old]
        if new.size and p:
            rows[~is_old] = solve_triangular(L11, self._block(head, new), lower=True, check_finite=False).T
        S = self._block(T, T)
        if p:
            S -= rows @ rows.T
        LTT, info = self._potrf(S.T, lower=1, clean=0, overwrite_a=1)
        self.flops += float(p) * p * new.size + float(T.size) * T.size * p + T.size**3 / 3
        if info != 0:
            return self._set_base(np.concatenate([head, T]), F, None)
        m = p + T.size
        L = np.zeros((m, m), dtype=self.dtype, order="F")
        L[:p, :p] = L11
        L[p:, :p] = rows
        L[p:, p:] = LTT
        return self._set_base(np.concatenate([head, T]), F, L)

    def _mods(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        in_base = np.zeros(F.size, dtype=bool)
        in_base[self.base] = True
        return np.flatnonzero(F & ~in_base), np.flatnonzero(in_base & ~F)

    def update(self, F: np.ndarray, priority: np.ndarray | None = None) -> bool:
        """Move to the boolean set ``F``; False if ``M_F`` is (near) singular.

        ``priority`` (optional, per task; e.g. the current weights) orders a new factor: tasks likely to leave
        the set go last, so that removing them later only refactors the factor's tail.
        """
        if self.L is not None and np.array_equal(F, self.F):
            return True  # same set: keep the solution of the last call
        self._state = None
        if self.L is not None and F.sum() > SMALL:
            added, removed = self._mods(F)
            m = added.size + removed.size
            new = sum(1 for i in np.concatenate([added, removed]) if int(i) not in self._cache)
            n = self.base.size
            schur = 2.0 * n * n * new + m * m * n + m**3  # new columns, S = U^T Y, LU of S
            if m > max(MAX_MODS, n // 8):
                schur = np.inf
            p, tail = self._tail_cost(added, removed)
            full = F.sum() ** 3 / 3
            if schur < min(tail, full):
                self.F = F.copy()
                return True
            if tail < full:
                return self._refactor_tail(F, p, added, priority)
        return self._refactor(F, priority)

    def _columns(self, keys: np.ndarray) -> np.ndarray:
        """``Y = M_B^{-1} U`` for the tasks ``keys`` (cached per task).

        ``U``'s column is ``M[B, i]`` for a task outside the base (an
        addition) and the unit vector of ``i``'s position for a task in it
        (a removal).
        """
        need = [int(i) for i in keys if int(i) not in self._cache]
        if need:
            pos = self._pos[need]
            inside = pos >= 0
            U = np.zeros((self.base.size, len(need)))
            out = np.flatnonzero(~inside)
            U[pos[inside], np.flatnonzero(inside)] = 1.0
            if out.size:
                U[:, out] = self.Q[np.ix_(self.base, np.asarray(need)[out])] + self.shift
            Y = self._solve_base(U)
            self.flops += 2.0 * self.base.size**2 * len(need)
            for k, i in enumerate(need):
                self._cache[i] = Y[:, k]
        return np.column_stack([self._cache[int(i)] for i in keys])

    def _schur_operator(
        self, added: np.ndarray, removed: np.ndarray
    ) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
        """``(idx, apply)``: the indices of F and ``r -> M_F^{-1} r`` (vectors in ``idx`` order).

        ``M_F [x_B; x_A] = [r_B; r_A]`` is solved with the base factor and the
        LU-factored Schur complement ``S = [[M_AA, 0], [0, 0]] - U^T Y``,
        where ``U = [M[B, A], E_D]`` is never formed: ``U^T v`` is
        ``[M[A, B] v; v[D]]``.
        """
        Y = self._columns(np.concatenate([added, removed]))
        na = added.size
        pos_d = self._pos[removed]
        UA = self.Q[np.ix_(added, self.base)] + self.shift  # (|A|, |B|)

        def ut(v: np.ndarray) -> np.ndarray:  # U^T v for v of length |B| (or |B| x m)
            return np.concatenate([UA @ v, v[pos_d]])

        S = -ut(Y)
        S[:na, :na] += self.Q[np.ix_(added, added)] + self.shift
        with warnings.catch_warnings():  # an exactly singular S shows up in the residual check
            warnings.simplefilter("ignore")
            S = lu_factor(S, check_finite=False)
        keep = np.ones(self.base.size, dtype=bool)
        keep[pos_d] = False
        nk = int(keep.sum())
        idx = np.concatenate([self.base[keep], added])
        pad = np.zeros(removed.size)

        def apply(r: np.ndarray) -> np.ndarray:
            rb = np.zeros(self.base.size)
            rb[keep] = r[:nk]
            zb = self._solve_base(rb)
            sol = lu_solve(S, np.concatenate([r[nk:], pad]) - ut(zb), check_finite=False)
            return np.concatenate([(zb - Y @ sol)[keep], sol[:na]])

        return idx, apply

    def affine_weights(self, precise: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """``(indices, v)`` for the current set, or None if ``M_F`` is singular.

        ``precise=False`` stops refining at a relative residual of
        :data:`LOOSE` (enough to decide signs while pivoting); a later
        ``precise=True`` call on the same set resumes from that solution.
        """
        if self.L is None:
            return None
        target = TIGHT if precise else LOOSE
        if self._state is not None and self._state[0] is self.F:
            _, idx, apply, x0 = self._state
            x = self._refine(idx, apply, target, x0)
            if x is not None:
                self._state = (self.F, idx, apply, x)
                return idx, x / x.sum()
            self._state = None  # refinement failed from the cached solution: start over below
        added, removed = self._mods(self.F)
        if added.size + removed.size == 0:
            idx, apply = self.base, self._solve_base
        else:
            idx, apply = self._schur_operator(added, removed)
        x = self._refine(idx, apply, target)
        if x is None and added.size + removed.size:  # ill-conditioned update: refactor on F directly
            return self.affine_weights(precise) if self._refactor(self.F) else None
        if x is None:
            return None
        self._state = (self.F, idx, apply, x)
        return idx, x / x.sum()

    def _refine(
        self,
        idx: np.ndarray,
        apply: Callable[[np.ndarray], np.ndarray],
        target: float,
        x0: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Solve ``M_F x = 1`` with ``apply`` and iterative refinement against the float64 ``M_F``.

        Stops once ``max|1 - M_F x| <= target * (1 + ||x||_1)``; None if the
        residual stays above ``1e-10 * (1 + ||x||_1)`` after the allowed steps.
        """
        ones = np.ones(idx.size)
        residual = _residual_map(self.Q, idx)
        try:
            x = apply(ones) if x0 is None else x0
            prev = np.inf
            for step in range(self._steps + 1):
                r = ones - residual(x) - self.shift * x.sum()
                rmax = np.abs(r).max()
                stalled = rmax > 0.25 * prev  # at the rounding floor of the float64 residual
                if step == self._steps or stalled or rmax <= target * (1.0 + np.abs(x).sum()) or not np.isfinite(rmax):
                    break
                x = x + apply(r)
                prev = rmax
                self.refinements += 1
        except (np.linalg.LinAlgError, ValueError):
            return None
        accept = max(ACCEPT, target) * (1.0 + np.abs(x).sum())
        if not np.isfinite(x).all() or x.sum() <= 0 or np.abs(r).max() > accept:
            return None
        return x


def _residual_map(Q: np.ndarray, idx: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> Q[idx, idx] @ x`` in float64: through the gathered block when F is small (``|F|^2`` reads instead
    of ``K^2``), else as the rows ``idx`` of one full product (no gather)."""
    K = Q.shape[0]
    if 3 * idx.size < K:
        block = Q[np.ix_(idx, idx)]
        return lambda x: block @ x
    full = np.zeros(K)

    def rows(x: np.ndarray) -> np.ndarray:
        full[idx] = x
        return (Q @ full)[idx]

    return rows


def _ordered(idx: np.ndarray, priority: np.ndarray | None) -> np.ndarray:
    """``idx`` sorted by ``priority`` descending (stable), or as it is without priorities."""
    if priority is None or idx.size == 0:
        return idx
    return idx[np.argsort(-priority[idx], kind="stable")]


class LowRankSubsetSolver:
    """Affine minimizers for ``Q = B^T B + alpha I + E`` with ``B`` (r, K), r small.

    ``E`` is a small residual (``||E||_2 <= ||E||_F < alpha / 10``).  Solves
    ``Q_FF x = 1`` with the Woodbury identity for ``B_F^T B_F + alpha I``
    (one r x r Cholesky per set, ``O(|F| r^2)``) and iterative refinement
    against the exact ``Q`` (each step contracts the error by
    ``||E|| / alpha``).  Same interface as :class:`SubsetSolver`.
    """

    def __init__(self, Q: np.ndarray, B: np.ndarray, alpha: float) -> None:
        self.Q, self.B, self.alpha = Q, B, float(alpha)
        self.F = np.zeros(Q.shape[0], dtype=bool)
        self.flops = 0.0

    def update(self, F: np.ndarray, priority: np.ndarray | None = None) -> bool:
        self.F = F.copy()
        return True

    def affine_weights(self, precise: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        idx = np.flatnonzero(self.F)
        Bf = self.B[:, idx]
        r = Bf.shape[0]
        C = Bf @ Bf.T
        C[np.diag_indices(r)] += self.alpha
        Lc, info = lapack.dpotrf(C, lower=1, clean=0, overwrite_a=1)
        if info != 0:
            return None
        self.flops += idx.size * r * r + r**3 / 3

        def apply(y: np.ndarray) -> np.ndarray:  # (B_F^T B_F + alpha I)^{-1} y
            t = solve_triangular(Lc, Bf @ y, lower=True, check_finite=False)
            t = solve_triangular(Lc, t, lower=True, trans="T", check_finite=False)
            return (y - Bf.T @ t) / self.alpha

        ones = np.ones(idx.size)
        x = apply(ones)
        full = np.zeros(self.Q.shape[0])
        for _ in range(30):  # iterative refinement against the exact Q_FF
            full[idx] = x
            res = ones - (self.Q @ full)[idx]
            if np.abs(res).max() <= 1e-15 * (1.0 + np.abs(x).sum() * self.Q[idx, idx].max()):
                break
            x = x + apply(res)
        else:
            return None
        if not np.isfinite(x).all() or x.sum() <= 0:
            return None
        return idx, x / x.sum()
