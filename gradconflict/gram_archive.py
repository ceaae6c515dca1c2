"""``.npz`` archives of Gram matrices (``track_grams.npz``, ``monitor_grams.npz``) with what they index as data.

An archive written here holds

* ``grams``: float64 ``(N, K, K)``, Gram ``n`` of the run (x0-unit loss gradients' inner products, loss units^2);
* one int64 ``(N,)`` array per index column: ``steps`` (training step) and, for tracking runs, ``resamples``
  (resampled batch 0..R-1), so ``grams[n]`` belongs to ``steps[n]`` (and ``resamples[n]``);
* ``labels`` (str ``(K,)``, e.g. ``"0-99"``), ``t_low`` and ``t_high`` (int64 ``(K,)``, first and last timestep
  of each bin, both inclusive);
* and, for files written before these arrays existed, the same Grams under the keys ``step{S}_r{R}`` (tracking)
  or ``step{S}`` (monitor), kept so older readers still work.

:func:`read_gram_archive` reads both these and the older archives that hold only the keyed Grams (then
``labels``/``t_low``/``t_high`` are None). Nothing is pickled: ``np.load(path)`` reads every array.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from ._io import atomic_write

__all__ = ["GramArchive", "read_gram_archive", "write_gram_archive"]

_INDEX = {"steps": "step", "resamples": "resample"}  # array name -> index column
_KEY = re.compile(r"^step(\d+)(?:_r(\d+))?$")


@dataclass
class GramArchive:
    """Grams and what they belong to: ``index`` (one row per Gram: ``step`` and, for tracking, ``resample``),
    ``grams`` (N, K, K), and the bins (``labels``, ``t_low``, ``t_high``; None in archives from before)."""

    index: pd.DataFrame
    grams: np.ndarray
    labels: Optional[list[str]]
    t_low: Optional[np.ndarray]
    t_high: Optional[np.ndarray]

    def as_dict(self) -> dict[tuple[int, ...], np.ndarray]:
        """``{(step,) or (step, resample): G}``."""
        return {tuple(int(v) for v in row): G for row, G in zip(self.index.itertuples(index=False), self.grams)}


def write_gram_archive(path: Union[str, Path], grams: dict, bins: Optional[object], *, resamples: bool) -> Path:
    """Write ``grams`` (``{step: G}``, or ``{(step, resample): G}`` with ``resamples``) sorted by key, with the
    ``TimestepBins`` ``bins`` (None: no bin arrays), atomically."""
    keys = sorted(grams)
    arrays: dict[str, np.ndarray] = {}
    for key in keys:  # the older keyed layout first: readers that parse every key name stop at the first array
        arrays[f"step{key[0]}_r{key[1]}" if resamples else f"step{key}"] = np.asarray(grams[key])
    steps = [k[0] if resamples else k for k in keys]
    arrays["steps"] = np.asarray(steps, dtype=np.int64)
    if resamples:
        arrays["resamples"] = np.asarray([k[1] for k in keys], dtype=np.int64)
    if keys:
        arrays["grams"] = np.stack([np.asarray(grams[k], dtype=np.float64) for k in keys])
    if bins is not None:
        arrays["labels"] = np.asarray(list(bins.labels), dtype=str)
        arrays["t_low"] = np.asarray(bins.lows, dtype=np.int64)
        arrays["t_high"] = np.asarray(bins.highs, dtype=np.int64) - 1
    path = Path(path)
    atomic_write(path, lambda p: np.savez(p, **arrays))
    return path


def read_gram_archive(path: Union[str, Path]) -> GramArchive:
    """The Grams of an archive written by :func:`write_gram_archive` or by an older version (keys only)."""
    with np.load(path) as z:
        files = set(z.files)
        if "steps" in files:
            columns = {_INDEX[a]: z[a].astype(np.int64) for a in ("steps", "resamples") if a in files}
            grams = z["grams"] if "grams" in files else np.zeros((0, 0, 0))
        else:
            matches = sorted((m for m in map(_KEY.match, files) if m), key=lambda m: tuple(int(g or 0) for g in m.groups()))
            columns = {"step": np.asarray([int(m.group(1)) for m in matches], dtype=np.int64)}
            if matches and matches[0].group(2) is not None:
                columns["resample"] = np.asarray([int(m.group(2)) for m in matches], dtype=np.int64)
            grams = np.stack([z[m.group(0)] for m in matches]) if matches else np.zeros((0, 0, 0))
        labels = [str(x) for x in z["labels"]] if "labels" in files else None
        t_low = z["t_low"] if "t_low" in files else None
        t_high = z["t_high"] if "t_high" in files else None
    return GramArchive(pd.DataFrame(columns), np.asarray(grams), labels, t_low, t_high)
