"""``by_name``: an ``AdaptiveWeighting`` from a spec string, the fixed ``weighting.by_name`` specs included.

| spec                          | strategy                                              |
|-------------------------------|-------------------------------------------------------|
| ``pareto_online[:every]``     | exact Pareto weights every ``every`` steps (10)       |
| ``ugd_online[:every]``        | warm-started UGD every ``every`` steps (1)            |
| ``learned_uncertainty[:h]``   | learned per-log-SNR weight, MLP width ``h`` (32)      |
| ``pareto_fit:PATH``           | fixed fit to the Pareto weights in a CSV/track folder |
| anything else                 | ``weighting.by_name(spec)`` (e.g. ``min_snr:5``)      |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..bins import TimestepBins
from ..schedule import NoiseSchedule
from ..weighting import by_name as fixed_by_name
from .base import AdaptiveWeighting, FixedWeighting
from .fit import pareto_fit_csv
from .learned import learned_uncertainty
from .online import pareto_online, ugd_online

__all__ = ["by_name", "check_spec", "ADAPTIVE_NAMES"]

ADAPTIVE_NAMES: tuple[str, ...] = ("pareto_online", "ugd_online", "learned_uncertainty", "pareto_fit")


def _split(spec: str) -> tuple[str, str]:
    if not isinstance(spec, str):
        raise ValueError(f"a weighting spec must be a string such as 'min_snr:5' or 'pareto_online:10', got {spec!r}")
    head, _, arg = spec.strip().partition(":")
    return head.strip().lower().replace("-", "_"), arg.strip()


def _positive_int(name: str, arg: str, default: int) -> int:
    if not arg:
        return default
    try:
        value = int(arg)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"bad weighting spec '{name}:{arg}': the argument must be a positive integer, e.g. '{name}:{default}'")
    return value


def check_spec(spec: str) -> None:
    """Validate a spec without building it (no bins or schedule needed): unknown names, bad arguments and a
    missing ``pareto_fit`` file raise ``ValueError``."""
    name, arg = _split(spec)
    if name in ("pareto_online", "ugd_online", "learned_uncertainty"):
        _positive_int(name, arg, 1)
    elif name == "pareto_fit":
        if not arg or not (Path(arg).is_file() or (Path(arg) / "track_weights.csv").is_file()):
            raise ValueError(f"bad weighting spec {spec!r}: pareto_fit needs an existing CSV of Pareto weights per bin "
                             "or a track folder, e.g. 'pareto_fit:pilot/track_weights.csv'")
    else:
        try:
            fixed_by_name(spec)
        except ValueError as err:  # name the adaptive weightings beside the fixed ones
            raise ValueError(f"{err}; or an adaptive one: pareto_online[:M], ugd_online[:M], learned_uncertainty, "
                             "pareto_fit:FILE") from None


def by_name(spec: str, *, bins: Optional[TimestepBins] = None, schedule: Optional[NoiseSchedule] = None,
            seed: int = 0, **options: Any) -> AdaptiveWeighting:
    """The ``AdaptiveWeighting`` of ``spec`` (table in the module docstring). ``bins`` and ``schedule`` are needed by
    the online strategies (the tasks and the noise) and ``pareto_fit`` (the schedule); ``seed`` seeds their draws
    and the learned network; ``options`` go to the online constructors (``per_task``, ``lam_rel``, ...)."""
    check_spec(spec)
    name, arg = _split(spec)
    if name in ("pareto_online", "ugd_online"):
        if bins is None or schedule is None:
            raise ValueError(f"weighting {spec!r} needs bins= (TimestepBins) and schedule= (NoiseSchedule)")
        make = pareto_online if name == "pareto_online" else ugd_online
        return make(bins, schedule, every=_positive_int(name, arg, 10 if name == "pareto_online" else 1), seed=seed,
                    **options)
    if name == "learned_uncertainty":
        return learned_uncertainty(hidden=_positive_int(name, arg, 32), seed=seed)
    if name == "pareto_fit":
        if schedule is None:
            raise ValueError(f"weighting {spec!r} needs schedule= (the NoiseSchedule the weights were tracked with)")
        return FixedWeighting(pareto_fit_csv(arg, schedule), spec=f"pareto_fit:{arg}")
    return FixedWeighting(fixed_by_name(spec), spec=spec)
