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


def _libraries() -> list:
    return _threads._controller().select(user_api="blas").lib_controllers


def test_each_library_is_capped_on_its_own_and_none_is_raised(monkeypatch) -> None:
    libraries = _libraries()
    if len(libraries) < 2:
        pytest.skip("needs two BLAS libraries (numpy's and scipy's)")
    monkeypatch.setattr(_threads, "MAX_THREADS", 2)
    seen = _spy(monkeypatch)
    saved = [lib.num_threads for lib in libraries]
    try:
        libraries[0].set_num_threads(3)
        libraries[1].set_num_threads(1)
        before = _blas_threads()
        if 3 not in before or 1 not in before:
            pytest.skip(f"this BLAS does not take 3 threads ({before})")
        pareto.solve(_problem(_threads.MIN_K), 1.0)
        assert _blas_threads() == before
    finally:
        for lib, n in zip(libraries, saved):
            lib.set_num_threads(n)
    assert seen == [[min(n, 2) for n in before]]  # 3 -> 2, and the library at 1 stays at 1


@pytest.mark.parametrize("wrap", ["auto", "frank_wolfe", "list", "task_gradients", "score"])
def test_every_way_into_the_psd_check_is_capped(monkeypatch, wrap: str) -> None:
    """solve() of an array with either method, of a nested list or a TaskGradients result (no .shape), and
    score()'s own check."""
    from gradconflict import NoiseSchedule, TimestepBins, weighting
    from gradconflict.pareto import _validate

    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    monkeypatch.setattr(_threads, "MAX_THREADS", 1)
    seen = []
    inner = _validate._check_psd
    monkeypatch.setattr(_validate, "_check_psd", lambda *a, **k: (seen.append(_blas_threads()), inner(*a, **k))[1])
    K = _threads.MIN_K
    G = _problem(K)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if wrap in ("auto", "frank_wolfe"):
            pareto.solve(G, 1.0, method=wrap, max_iter=5)
        elif wrap == "list":
            pareto.solve(G.tolist(), 1.0)
        elif wrap == "task_gradients":
            import torch

            from gradconflict.engine.result import TaskGradients

            result = TaskGradients(gram=torch.from_numpy(G), losses=torch.zeros(K, dtype=torch.float64),
                                   counts=torch.ones(K, dtype=torch.int64), method="fused", seconds=0.0)
            pareto.solve(result, 1.0)
        else:
            pareto.score(G, 1.0, [weighting.constant()], TimestepBins.uniform(1000, K), NoiseSchedule.linear())
    assert seen and all(threads == [1] * len(before) for threads in seen)


def test_nested_and_concurrent_blocks_restore_the_counts_found_before_the_first() -> None:
    import threading

    if not _blas_threads():
        pytest.skip("threadpoolctl sees no BLAS library")
    K = _threads.MIN_K
    with threadpoolctl.threadpool_limits(limits=8, user_api="blas"):
        before = _blas_threads()
        capped = [min(n, _threads.MAX_THREADS) for n in before]
        with _threads.blas_threads(K):
            assert _blas_threads() == capped
            with _threads.blas_threads(K):  # nested: nothing left to lower, so nothing to restore
                assert _blas_threads() == capped
            assert _blas_threads() == capped
            worker = threading.Thread(target=_enter_and_leave, args=(K,))
            worker.start()
            worker.join(10)
            assert _blas_threads() == capped  # another thread's block came and went: the cap still holds
        assert _blas_threads() == before


def _enter_and_leave(K: int) -> None:
    with _threads.blas_threads(K):
        pass
