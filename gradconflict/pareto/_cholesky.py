"""Solves with ``M_F = Q[F, F] + 1 1^T`` for an index set F that evolves.

A Cholesky factor ``L L^T = M_B`` is kept for a *base* set B.  A nearby set
``F = (B \\ D) + A`` (few removals D, few additions A) is handled with a
Schur complement instead of a new factorization.  With ``U = [M[B, A], E_D]``
(``E_D``: unit columns of the removed positions), ``Y = M_B^{-1} U`` (cached
per index, two triangular solves each) and ``z = M_B^{-1} 1``:

    S = [[M_AA, 0], [0, 0]] - U^T Y          (small, m = |A| + |D|)
    [x_A; zeta] = S^{-1} ([1_A; 0] - U^T z)
    x_B = z - Y [x_A; zeta]                  (x_D = 0 by construction)

solves ``M_F x = 1``; iterative refinement against the exact ``M_F`` follows
and a large final residual triggers a refactorization.  The base is
refactored on F whenever that is cheaper (``|F|^3 / 3`` flops) than the new
cached columns (``2 |B|^2`` flops each) plus forming and factoring S, or when
more than ``max(64, |B| / 8)`` tasks differ from the base.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg import lapack, lu_factor, lu_solve, solve_triangular

PIVOT = 1e-12  # squared pivot / largest squared pivot below this => treat as singular
SMALL = 128  # below this size a refactorization is cheaper than Python-level Schur bookkeeping
MAX_MODS = 64  # at most max(MAX_MODS, |B| / 8) modifications before refactoring


class SubsetSolver:
    """Affine minimizers ``v = x / 1^T x``, ``M_F x = 1``, for changing sets F."""

    def __init__(self, Q: np.ndarray) -> None:
        self.Q = Q
        self.base = np.zeros(0, dtype=np.int64)
        self.L: np.ndarray | None = None
        self.F = np.zeros(Q.shape[0], dtype=bool)
        self.flops = 0.0  # work counter in flops (benchmarks / tests)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _solve_base(self, B: np.ndarray) -> np.ndarray:
        y = solve_triangular(self.L, B, lower=True, check_finite=False)
        return solve_triangular(self.L, y, lower=True, trans="T", check_finite=False)

    def _refactor(self, F: np.ndarray) -> bool:
        idx = np.flatnonzero(F)
        M = self.Q[F][:, F] + 1.0  # boolean masks keep sorted order and gather fastest
        L, info = lapack.dpotrf(M.T, lower=1, clean=0, overwrite_a=1)  # M symmetric
        self.flops += idx.size**3 / 3
        self.base, self.F, self._cache = idx, F.copy(), {}
        if info != 0:
            self.L = None
            return False
        d = np.diagonal(L) ** 2
        self.L = None if d.min() <= PIVOT * d.max() else L
        if self.L is not None:
            self._z = self._solve_base(np.ones(idx.size))
        return self.L is not None

    def _mods(self, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        in_base = np.zeros(F.size, dtype=bool)
        in_base[self.base] = True
        return np.flatnonzero(F & ~in_base), np.flatnonzero(in_base & ~F)

    def update(self, F: np.ndarray) -> bool:
        """Move to the boolean set ``F``; False if ``M_F`` is (near) singular."""
        if self.L is not None and F.sum() > SMALL:
            added, removed = self._mods(F)
            m = added.size + removed.size
            new = sum(1 for i in np.concatenate([added, removed]) if int(i) not in self._cache)
            n = self.base.size
            cost = 2.0 * n * n * new + m * m * n + m**3  # new columns, S = U^T Y, LU of S
            if m <= max(MAX_MODS, n // 8) and cost < F.sum() ** 3 / 3:
                self.F = F.copy()
                return True
        return self._refactor(F)

    def _columns(self, added: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.full(self.Q.shape[0], -1)
        pos[self.base] = np.arange(self.base.size)
        need = [int(i) for i in np.concatenate([added, removed]) if int(i) not in self._cache]
        if need:
            U = np.zeros((self.base.size, len(need)))
            for k, i in enumerate(need):
                if pos[i] >= 0:
                    U[pos[i], k] = 1.0
                else:
                    U[:, k] = self.Q[self.base, i] + 1.0
            Y = self._solve_base(U)
            self.flops += 2.0 * self.base.size**2 * len(need)
            for k, i in enumerate(need):
                self._cache[i] = (U[:, k], Y[:, k])
        keys = [int(i) for i in np.concatenate([added, removed])]
        U = np.column_stack([self._cache[i][0] for i in keys])
        Y = np.column_stack([self._cache[i][1] for i in keys])
        return U, Y

    def _schur_solve(
        self, rhs_b: np.ndarray, rhs_a: np.ndarray, U: np.ndarray, Y: np.ndarray, S: tuple
    ) -> tuple[np.ndarray, np.ndarray]:
        """Solve ``M_F [x_B; x_A] = [rhs_b; rhs_a]`` with the LU-factored Schur complement ``S``."""
        zb = self._solve_base(rhs_b)
        sol = lu_solve(S, np.concatenate([rhs_a, np.zeros(U.shape[1] - rhs_a.size)]) - U.T @ zb, check_finite=False)
        return zb - Y @ sol, sol[: rhs_a.size]

    def affine_weights(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(indices, v)`` for the current set, or None if ``M_F`` is singular."""
        if self.L is None:
            return None
        added, removed = self._mods(self.F)
        if added.size + removed.size == 0:
            return self.base, self._z / self._z.sum()
        out = self._schur(added, removed)
        if out is None:  # ill-conditioned update: refactor on F directly
            return self.affine_weights() if self._refactor(self.F) else None
        return out

    def _schur(self, added: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        U, Y = self._columns(added, removed)
        na = added.size
        S = -U.T @ Y
        S[:na, :na] += self.Q[np.ix_(added, added)] + 1.0
        with warnings.catch_warnings():  # an exactly singular S shows up in the residual check below
            warnings.simplefilter("ignore")
            S = lu_factor(S, check_finite=False)
        keep = np.ones(self.base.size, dtype=bool)
        keep[np.searchsorted(self.base, removed)] = False
        nk = int(keep.sum())
        idx = np.concatenate([self.base[keep], added])
        full = np.zeros(self.Q.shape[0])
        try:
            xb, xa = self._schur_solve(np.ones(self.base.size), np.ones(na), U, Y, S)
            x = np.concatenate([xb[keep], xa])
            for step in range(3):  # iterative refinement against the exact M_F
                full[idx] = x
                r = 1.0 - (self.Q @ full)[idx] - x.sum()
                if step == 2 or np.abs(r).max() <= 1e-14 * (1.0 + np.abs(x).sum()):
                    break
                rb = np.zeros(self.base.size)
                rb[keep] = r[:nk]
                db, da = self._schur_solve(rb, r[nk:], U, Y, S)
                x = x + np.concatenate([db[keep], da])
        except (np.linalg.LinAlgError, ValueError):
            return None
        if not np.isfinite(x).all() or x.sum() <= 0 or np.abs(r).max() > 1e-10 * (1.0 + np.abs(x).sum()):
            return None
        return idx, x / x.sum()


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

    def update(self, F: np.ndarray) -> bool:
        self.F = F.copy()
        return True

    def affine_weights(self) -> tuple[np.ndarray, np.ndarray] | None:
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
