"""Loss weightings for a training loop, fixed or adaptive: one protocol, ``AdaptiveWeighting``.

>>> from gradconflict.adaptive import by_name
>>> by_name("min_snr:5").spec
'min_snr:5'

* ``pareto_online`` / ``ugd_online``: Pareto weights recomputed from the fused Gram of the current batch
  (``online.py``); call ``strategy.step(model, x0, step=i)`` before each training step.
* ``learned_uncertainty``: ``mean(err / exp(u) + u)`` with u learned (``learned.py``); add
  ``strategy.parameters()`` to the optimizer.
* ``pareto_fit``: a fixed smooth weighting fitted to tracked Pareto weights (``fit.py``).
* every ``weighting.by_name`` spec, as a ``FixedWeighting``.
"""

from .base import AdaptiveWeighting, FixedWeighting, preserve_state, x0_to_prediction
from .fit import pareto_fit, pareto_fit_csv, read_pareto_weights
from .learned import LearnedUncertainty, learned_uncertainty
from .online import ParetoOnline, UGDOnline, pareto_online, relative_lam, ugd_online
from .spec import ADAPTIVE_NAMES, by_name, check_spec

__all__ = [
    "AdaptiveWeighting",
    "FixedWeighting",
    "ParetoOnline",
    "UGDOnline",
    "LearnedUncertainty",
    "pareto_online",
    "ugd_online",
    "learned_uncertainty",
    "pareto_fit",
    "pareto_fit_csv",
    "read_pareto_weights",
    "relative_lam",
    "x0_to_prediction",
    "preserve_state",
    "by_name",
    "check_spec",
    "ADAPTIVE_NAMES",
]
