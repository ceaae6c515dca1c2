"""Cosine of per-bin task gradients against the distance of the bins in log-SNR, over all tracked Grams.

    python experiments/conflict_vs_distance.py [--preset quick|full|toy] [--device cuda] [--out DIR]

Trains (or reuses) the cached reproduction run of `gradconflict reproduce` and writes conflict_vs_distance.png with its data in
conflict_vs_distance.csv into DIR/figures/ (DIR/figures/quick/ under the quick preset).
"""

from _common import run_figure

if __name__ == "__main__":
    run_figure("conflict_vs_distance", __doc__)
