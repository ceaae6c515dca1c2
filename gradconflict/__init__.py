"""gradconflict: gradient conflicts between the timesteps of diffusion models, studied as multi-task learning.

See README.md for the quickstart. The public API is listed in ``__all__``.
"""

from . import conflict, engine, pareto, targets, weighting
from .bins import TimestepBins
from .engine import TaskGradients, task_gram
from .schedule import NoiseSchedule, prediction_type_of
from .targets import PREDICTIONS

__version__ = "0.1.0"

__all__ = [
    "NoiseSchedule",
    "TaskGradients",
    "PREDICTIONS",
    "TimestepBins",
    "conflict",
    "engine",
    "pareto",
    "prediction_type_of",
    "task_gram",
    "targets",
    "weighting",
    "__version__",
]
