"""Over-training Pareto analysis: Gram -> Pareto weights (every solver) and strategy scores, checkpoint by checkpoint."""

from .analyze import absolute_lam, analyze_gram
from .config import TrackConfig
from .run import TrackResult, changed_sources, file_source, load_track, make_bins, stale_tracking, track_identity, track_models, track_training
from .sweep import lambda_sweep

__all__ = [
    "TrackConfig",
    "TrackResult",
    "absolute_lam",
    "analyze_gram",
    "changed_sources",
    "file_source",
    "lambda_sweep",
    "load_track",
    "make_bins",
    "stale_tracking",
    "track_identity",
    "track_models",
    "track_training",
]
