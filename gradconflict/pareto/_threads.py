"""A cap on BLAS threads while the exact solver iterates.

The active-set solver's work at K ~ 1000 is many level-2 operations (triangular solves, matrix-vector products)
and factor updates on the support, and so is much of the PSD check. Spread over many cores, their
synchronisation costs more than it saves: on a 16-core CPU, K = 1000 solves took 3-9x longer with 16 BLAS
threads than with 4, and 4 beat 1 in every family measured (``benchmarks/results/README.md``,
``bench_solvers.py --summary --summary-threads 1 4 16``). :func:`blas_threads` lowers the thread count of
numpy's and scipy's BLAS to at most :data:`MAX_THREADS` for the block, never raises it, and restores it
afterwards (threadpoolctl). ``solve`` runs the validation of every method and the iterations of ``"auto"``
under it.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

__all__ = ["MAX_THREADS", "MIN_K", "blas_threads"]

MAX_THREADS = 4  # BLAS threads for the solver's iterations
MIN_K = 256  # below this a solve takes well under a millisecond per step: no cap (and no threadpoolctl call)

_CONTROLLER = None


def _controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController  # numpy and scipy are loaded by now: their BLAS is seen

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


def blas_threads(K: int) -> ContextManager:
    """Context: BLAS threads ``min(current, MAX_THREADS)`` for a K-task solve with ``K >= MIN_K``, else nothing."""
    if K < MIN_K:
        return contextlib.nullcontext()
    try:
        blas = _controller().select(user_api="blas")
    except ImportError:  # threadpoolctl missing: the solver still works, at the BLAS's own thread count
        return contextlib.nullcontext()
    if not blas.lib_controllers or max(lib.num_threads for lib in blas.lib_controllers) <= MAX_THREADS:
        return contextlib.nullcontext()
    return blas.limit(limits=MAX_THREADS)
