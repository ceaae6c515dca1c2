"""The one-command reproduction of the paper's analyses: ``gradconflict reproduce [--quick | --full]``."""

from .claims import claim_c1, claim_c2, claim_c3
from .config import ReproduceConfig, preset
from .pipeline import reproduce

__all__ = ["ReproduceConfig", "claim_c1", "claim_c2", "claim_c3", "preset", "reproduce"]
