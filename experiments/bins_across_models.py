"""Do independently trained models agree on the clustered timestep intervals? (issue #20's stability, with the
model as the replication unit beside the per-batch stability that `gradconflict bins` reports.)

    python experiments/bins_across_models.py BINS_DIR [BINS_DIR ...] --out figures/bins/edges_by_model.csv

Each BINS_DIR is the output of `gradconflict bins` on one trained model (its bins.csv and bins_config.json), all
with the same --fine and --bins. Writes a tidy CSV, one row per (model, boundary): the boundary's timestep in that
model and the across-model mean, s.d. and range of that boundary, and prints the summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from gradconflict.clustering import read_bins_csv
from gradconflict.plots import write_csv


def edges_by_model(folders: Sequence[Path]) -> pd.DataFrame:
    """One row per (model: its folder, interior boundary k = 1..K-1): ``t_boundary`` (timesteps) and, per boundary,
    its mean, s.d. (ddof 1) and range over the models. Refuses folders clustered into different K, T or --fine."""
    edges, models, fine = [], [], []
    for folder in folders:
        e, T = read_bins_csv(Path(folder) / "bins.csv")
        config = json.loads((Path(folder) / "bins_config.json").read_text())
        edges.append((e, T))
        models.append(str(folder))  # the folder: one spec clustered at two checkpoints is two rows
        fine.append(config.get("fine"))
    if len({(len(e), T) for e, T in edges}) != 1 or len(set(fine)) != 1:
        raise ValueError(f"the bins folders differ in K, T or --fine: {[(len(e) - 1, T, f) for (e, T), f in zip(edges, fine)]}; "
                         "cluster every model with the same --bins, --fine and schedule")
    interior = np.array([e[1:-1] for e, _ in edges], dtype=np.float64)  # (models, K-1)
    rows = []
    for m, model in enumerate(models):
        for k in range(interior.shape[1]):
            column = interior[:, k]
            rows.append({"model": model, "boundary": k + 1, "t_boundary": int(column[m]),
                         "mean": column.mean(), "sd": column.std(ddof=1) if len(column) > 1 else float("nan"),
                         "min": column.min(), "max": column.max()})
    return pd.DataFrame(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path, help="`gradconflict bins` output folders, one per model")
    p.add_argument("--out", required=True, type=Path, help="the CSV to write")
    args = p.parse_args(argv)
    try:
        frame = edges_by_model(args.folders)
    except (ValueError, FileNotFoundError) as err:  # a user mistake: one line, exit 2
        p.exit(2, f"{p.prog}: error: {err}\n")
    write_csv(frame, args.out)
    per = frame.drop_duplicates("boundary")
    print(f"{frame['model'].nunique()} models; boundary sd over models (timesteps): "
          + ", ".join(f"{int(b)}: {s:.0f}" for b, s in zip(per["boundary"], per["sd"])))
    print(f"mean sd {per['sd'].mean():.1f} timesteps; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
