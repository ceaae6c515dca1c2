"""A cap on BLAS threads while the exact solver iterates.

The active-set solver's work at K ~ 1000 is many level-2 operations (triangular solves, matrix-vector products)
and factor updates on the support, and so is much of the PSD check. Spread over many cores, their
synchronisation costs more than it saves: on a 16-core CPU, K = 1000 solves took 3-9x longer with 16 BLAS
threads than with 4, and 4 beat 1 in every family measured (``benchmarks/results/README.md``,
``bench_solvers.py --summary --summary-threads 1 4 16``). :func:`blas_threads` lowers the thread count of
numpy's and scipy's BLAS to at most :data:`MAX_THREADS` for the block, never raises it, and restores it
afterwards (threadpoolctl). The validation of every Gram (``_validate.as_gram_factored``: ``solve``, ``score``)
and the iterations of ``"auto"`` run under it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ["MAX_THREADS", "MIN_K", "blas_threads"]

MAX_THREADS = 4  # BLAS threads for the solver's iterations
MIN_K = 256  # below this a solve takes well under a millisecond per step: no cap (and no threadpoolctl call)

_CONTROLLER = None
_LOCK = threading.Lock()  # one reading of the counts decides both what is capped and what is restored


def _controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController  # numpy and scipy are loaded by now: their BLAS is seen

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


@contextlib.contextmanager
def blas_threads(K: int) -> Iterator[None]:
    """Context: each BLAS library of numpy and scipy at ``min(its count, MAX_THREADS)`` threads for a K-task solve
    with ``K >= MIN_K``, else nothing; the counts it lowered are restored afterwards. The counts are process-wide:
    a block entered while another holds the cap (nested, or in another Python thread) finds nothing to lower and
    restores nothing. (OpenBLAS ignores a count set from a thread other than the main one: there the cap is a
    no-op.)"""
    if K < MIN_K:
        yield
        return
    try:
        libraries = _controller().select(user_api="blas").lib_controllers
    except ImportError:  # threadpoolctl missing: the solver still works, at the BLAS's own thread count
        yield
        return
    with _LOCK:
        lowered = [(lib, lib.num_threads) for lib in libraries]
        lowered = [(lib, n) for lib, n in lowered if n > MAX_THREADS]
        for lib, _ in lowered:
            lib.set_num_threads(MAX_THREADS)
    try:
        yield
    finally:
        with _LOCK:
            for lib, n in lowered:
                lib.set_num_threads(n)
