"""Convergence comparison: train one model under several loss weightings and seeds, measure them on held-out data
(per-bin losses, FD-MNIST, wall-clock), and test whether the Pareto score predicts training (claims C4-C6)."""

from .claims import claim_c4, claim_c5, claim_c6, convergence_table, speedup, steps_to
from .config import DEFAULT_WEIGHTINGS, PRESETS, CompareConfig, preset, run_name
from .report import write_report
from .run import compare, load_compare, run_one

__all__ = [
    "CompareConfig",
    "DEFAULT_WEIGHTINGS",
    "PRESETS",
    "claim_c4",
    "claim_c5",
    "claim_c6",
    "compare",
    "convergence_table",
    "load_compare",
    "preset",
    "run_name",
    "run_one",
    "speedup",
    "steps_to",
    "write_report",
]
