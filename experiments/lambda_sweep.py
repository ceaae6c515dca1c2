"""Beyond the paper: the exact Pareto weights from lam = 0 (sparse) to large lam (uniform) at the last checkpoint.

    python experiments/lambda_sweep.py [--preset quick|full|toy] [--device cuda] [--out DIR]

Trains (or reuses) the cached reproduction run of `gradconflict reproduce` and writes lambda_sweep.png with its data in
lambda_sweep.csv into DIR/figures/ (DIR/figures/quick/ under the quick preset).
"""

from _common import run_figure

if __name__ == "__main__":
    run_figure("lambda_sweep", __doc__)
