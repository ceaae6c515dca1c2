"""Seed-level resume for long transfer runs: nothing finished is lost when a run is interrupted.

Seeds are independent (each draws its own fine-tuning batches and evaluation set from the base seed), so a
run can stop after any seed and continue with the next. ``SeedLog`` keeps, in a folder:

* ``transfer_resume.json``: what the rows depend on -- the ``TransferConfig`` (without the seed list and the
  execution settings: progress, batched, eval_chunk), the bins, the schedule's T, the prediction type, and
  fingerprints of theta_0 and of the data;
* ``transfer_seeds.csv``: the tidy rows of every finished seed, rewritten atomically after each seed (rows of
  seeds a later run does not ask for are kept).

A folder holding rows of another identity is refused (naming what differs), never silently reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import pandas as pd

from .. import distributed as dist
from .._io import fingerprint, record_identity, write_csv  # fingerprint: re-exported (it lived here)

__all__ = ["SeedLog", "fingerprint"]


class SeedLog:
    """The finished seeds of a transfer run in ``folder`` (see the module docstring)."""

    def __init__(self, folder: Union[str, Path], identity: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.rows = self.folder / "transfer_seeds.csv"
        self._others = pd.DataFrame()
        stamp = self.folder / "transfer_resume.json"
        if dist.is_main():
            record_identity(stamp, identity, "transfer results of another run",
                            f"use another output folder, or remove {self.rows} and {stamp}")

    def finished(self, seeds: list[int]) -> tuple[Optional[pd.DataFrame], set[int]]:
        """``(rows, seeds)`` already computed for ``seeds`` (the same on every rank under torch.distributed)."""
        frame = None
        if dist.is_main() and self.rows.is_file():
            frame = pd.read_csv(self.rows)
            wanted = frame["seed"].isin(seeds)
            self._others = frame[~wanted].reset_index(drop=True)  # seeds this run does not ask for: kept on disk
            frame = frame[wanted].reset_index(drop=True)
        done = dist.agreed(seeds, set(frame["seed"]) if frame is not None else set())  # rank 0's view, on every rank
        return (frame if frame is not None and len(frame) else None), done

    def record(self, frame: pd.DataFrame) -> None:
        """Rewrite the rows of every finished seed (atomically; rank 0 only), keeping rows of other seeds."""
        if dist.is_main():
            write_csv(pd.concat([self._others, frame], ignore_index=True) if len(self._others) else frame, self.rows)
