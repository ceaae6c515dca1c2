"""Per-task gradient engine: exact Gram of task gradients from one combined backward pass."""

from .batch import TaskBatch, sample_task_batch
from .checks import check_samples_independent
from .gram import METHODS, task_gram
from .grouping import TaskIndex
from .loss import model_output, per_sample_losses
from .result import TaskGradients
from .rules import RULES, register_rule
from .sketch import CountSketch

__all__ = [
    "METHODS",
    "RULES",
    "CountSketch",
    "TaskGradients",
    "TaskBatch",
    "TaskIndex",
    "check_samples_independent",
    "model_output",
    "per_sample_losses",
    "register_rule",
    "sample_task_batch",
    "task_gram",
]
