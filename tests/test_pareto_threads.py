"""The exact solver's BLAS thread cap (pareto/_threads.py): lowered inside the solve, never raised, restored."""

from __future__ import annotations

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")

from gradconflict import pareto  # noqa: E402
from gradconflict.pareto import _threads, solver  # noqa: E402


def _blas_threads() -> list[int]:
    """Threads of the BLAS libraries numpy and scipy use (those loaded when the cap's controller was made;
    another BLAS loaded later, say torch's, is not the solver's)."""
    ours = {lib.filepath for lib in _threads._controller().select(user_api="blas").lib_controllers}
    return [lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["filepath"] in ours]


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


@pytest.mark.parametrize("threads,cap,K,capped", [
    (2, 1, _threads.MIN_K, True),  # lowered to the cap
    (1, 4, _threads.MIN_K, True),  # never raised above what the user set
    (2, 1, _threads.MIN_K - 1, False),  # small problems: untouched
])
def test_auto_caps_blas_threads_and_restores_them(monkeypatch, threads: int, cap: int, K: int, capped: bool) -> None:
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    monkeypatch.setattr(_threads, "MAX_THREADS", cap)
    seen = _spy(monkeypatch)
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        before = _blas_threads()  # a single-threaded build stays at 1 whatever is asked
        result = pareto.solve(_problem(K), 1.0)
        assert _blas_threads() == before  # restored
    assert result.converged
    assert seen == [[min(n, cap) if capped else n for n in before]]


def test_other_methods_are_not_capped(monkeypatch) -> None:
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    monkeypatch.setattr(_threads, "MAX_THREADS", 1)
    seen = []
    inner = solver.SOLVERS["frank_wolfe"]
    monkeypatch.setitem(solver.SOLVERS, "frank_wolfe",
                        lambda *a, **k: (seen.append(_blas_threads()), inner(*a, **k))[1])
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        pareto.solve(_problem(_threads.MIN_K), 1.0, method="frank_wolfe", max_iter=5)
    assert seen == [before]


def test_the_psd_check_runs_capped_for_every_method(monkeypatch) -> None:
    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    monkeypatch.setattr(_threads, "MAX_THREADS", 1)
    seen = []
    inner = solver.as_gram_factored
    monkeypatch.setattr(solver, "as_gram_factored", lambda *a, **k: (seen.append(_blas_threads()), inner(*a, **k))[1])
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        for method in ("auto", "frank_wolfe"):
            pareto.solve(_problem(_threads.MIN_K), 1.0, method=method, max_iter=5)
    assert seen == [[1] * len(before)] * 2
