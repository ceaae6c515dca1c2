"""Paper Fig. 3: UGD's Pareto weights per timestep bin recomputed over training, with the band over resampled batches (claim C2).

    python experiments/fig3_ugd_weights.py [--preset quick|full|toy] [--device cuda] [--out DIR]

Trains (or reuses) the cached reproduction run of `gradconflict reproduce` and writes fig3_ugd_weights.png with its data in
fig3_ugd_weights.csv into DIR/figures/ (DIR/figures/quick/ under the quick preset).
"""

from _common import run_figure

if __name__ == "__main__":
    run_figure("fig3_ugd_weights", __doc__)
