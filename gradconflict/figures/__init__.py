"""The paper's analysis figures, each written as PNG with its data beside it as CSV."""

from .conflict_distance import conflict_vs_distance
from .pareto_objective import fig4_pareto_objective
from .sweep import lambda_sweep_figure
from .ugd_weights import fig3_ugd_weights

__all__ = ["conflict_vs_distance", "fig3_ugd_weights", "fig4_pareto_objective", "lambda_sweep_figure"]
