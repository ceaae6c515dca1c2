"""gradconflict: gradient conflicts between the timesteps of diffusion models, studied as multi-task learning.

See README.md for the quickstart. The public API is listed in ``__all__``.
"""

from . import conflict, engine, pareto, targets, weighting
from .bins import TimestepBins
from .engine import TaskGradients, task_gram
from .schedule import NoiseSchedule, prediction_type_of
from .targets import PREDICTIONS

__version__ = "0.1.0"

_LAZY = {"compare": ("comparison", "compare"), "CompareConfig": ("comparison", "CompareConfig"),
         "Monitor": ("monitor", "Monitor"), "load_model": ("_api", "load_model"), "load_data": ("_api", "load_data"),
         "plots": ("plots", None)}  # (module, attribute); None: the module itself


def __getattr__(name: str):  # PEP 562: the training workflows load on first use, not with ``import gradconflict``
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        loaded = importlib.import_module(f".{module}", __name__)
        value = loaded if attr is None else getattr(loaded, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "CompareConfig",
    "Monitor",
    "NoiseSchedule",
    "TaskGradients",
    "PREDICTIONS",
    "TimestepBins",
    "compare",
    "conflict",
    "engine",
    "load_data",
    "load_model",
    "pareto",
    "plots",
    "prediction_type_of",
    "task_gram",
    "targets",
    "weighting",
    "__version__",
]
