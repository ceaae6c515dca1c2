"""Regularized Pareto weights over timestep tasks.

Solve ``min_w w^T G w + lam ||w||^2`` over the probability simplex, where
``G`` is the Gram matrix of per-task (per-timestep-bin) gradients:

>>> import numpy as np
>>> from gradconflict.pareto import solve
>>> res = solve(np.array([[2.0, 0.0], [0.0, 1.0]]), lam=0.0)
>>> np.round(res.weights, 6).tolist()
[0.333333, 0.666667]

Methods (:data:`METHODS`): ``"auto"`` (exact active-set, default),
``"frank_wolfe"``, ``"ugd"`` (softmax gradient descent) and ``"cvxpy"``
(reference QP).  :func:`score` compares weighting strategies with the
optimum.
"""

from ._validate import METHODS
from .objective import objective
from .result import ParetoResult
from .score import score
from .solver import solve

__all__ = ["METHODS", "ParetoResult", "objective", "score", "solve"]
