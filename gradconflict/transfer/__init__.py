"""Cross-bin transfer (paper Fig. 2): fine-tune copies of a model on single timestep bins and measure how
the loss of every bin changes, with common random numbers; a lookahead mode ties it to the Gram matrix.

``transfer_matrix(model, data, bins, steps=..., lr=..., schedule=...)`` returns a ``TransferResult``.
"""

from .config import MODES, OPTIMIZERS, TransferConfig
from .evaluate import EvalSet, draw_eval_set, evaluate_losses, relative_reduction
from .matrix import TransferResult, run_transfer, transfer_matrix
from .plot import distance_profile, plot_transfer
from .stacked import BatchStream, FineTuned, finetune_copies, finetune_sequential, finetune_stacked

__all__ = [
    "MODES",
    "OPTIMIZERS",
    "BatchStream",
    "EvalSet",
    "FineTuned",
    "TransferConfig",
    "TransferResult",
    "distance_profile",
    "draw_eval_set",
    "evaluate_losses",
    "finetune_copies",
    "finetune_sequential",
    "finetune_stacked",
    "plot_transfer",
    "relative_reduction",
    "run_transfer",
    "transfer_matrix",
]
