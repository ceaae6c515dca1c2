"""The exact solver's BLAS thread cap (pareto/_threads.py): lowered inside the solve, never raised, restored."""

from __future__ import annotations

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

from gradconflict import pareto  # noqa: E402
from gradconflict.pareto import _threads, solver  # noqa: E402


def _blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"]


def _spy(monkeypatch) -> list:
    seen = []
    inner = solver.SOLVERS["auto"]

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return inner(*args, **kwargs)

    monkeypatch.setitem(solver.SOLVERS, "auto", spy)
    return seen


def _problem(K: int) -> np.ndarray:
    A = np.random.default_rng(0).standard_normal((K, 8))
    return A @ A.T


@pytest.mark.parametrize("threads,cap,K,inside", [
    (2, 1, _threads.MIN_K, 1),  # lowered to the cap
    (1, 4, _threads.MIN_K, 1),  # never raised above what the user set
    (2, 1, _threads.MIN_K - 1, 2),  # small problems: untouched
])
def test_auto_caps_blas_threads_and_restores_them(monkeypatch, threads: int, cap: int, K: int, inside: int) -> None:
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    monkeypatch.setattr(_threads, "MAX_THREADS", cap)
    seen = _spy(monkeypatch)
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        before = _blas_threads()
        result = pareto.solve(_problem(K), 1.0)
        assert _blas_threads() == before  # restored
    assert result.converged
    assert seen and all(n == inside for n in seen[0])


def test_other_methods_are_not_capped(monkeypatch) -> None:
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    monkeypatch.setattr(_threads, "MAX_THREADS", 1)
    seen = []
    inner = solver.SOLVERS["frank_wolfe"]
    monkeypatch.setitem(solver.SOLVERS, "frank_wolfe",
                        lambda *a, **k: (seen.append(_blas_threads()), inner(*a, **k))[1])
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        pareto.solve(_problem(_threads.MIN_K), 1.0, method="frank_wolfe", max_iter=5)
    assert seen == [[2] * len(seen[0])]
