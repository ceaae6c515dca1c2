"""Paper Fig. 4: the regularized Pareto objective of constant, SNR, Max-SNR-1 and Min-SNR-5 weights over training, next to the exact optimum and UGD (claim C3).

    python experiments/fig4_pareto_objective.py [--preset quick|full|toy] [--device cuda] [--out DIR]

Trains (or reuses) the cached reproduction run of `gradconflict reproduce` and writes fig4_pareto_objective.png with its data in
fig4_pareto_objective.csv into DIR/figures/ (DIR/figures/quick/ under the quick preset).
"""

from _common import run_figure

if __name__ == "__main__":
    run_figure("fig4_pareto_objective", __doc__)
