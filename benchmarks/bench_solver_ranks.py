"""The "auto" solver's solves and time over the rank of G, where its pivoting is hardest.

``G = J J^T`` with ``J ~ N(0, 1)^(K x r)``, ``lam = 1e-3 trace(G) / K`` (and ``lam = 0`` with ``--lam0``), six
seeds per (K, r): median and largest number of linear solves (``res.iterations``) and of wall time, and the
largest duality gap relative to the objective (to eps max_i G_ii where the optimum is 0).  Ranks near K / 2 with a small ridge make block principal
pivoting oscillate (nearly singular ``Q_FF`` on the larger sets); the solver then hands its best iterate to
phase 2 (see ``gradconflict/pareto/active_set.py``).

    python benchmarks/bench_solver_ranks.py            # K in {50, 100, 200, 400}, about 10 s
    python benchmarks/bench_solver_ranks.py --lam0     # the same at lam = 0
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

try:
    from gradconflict.pareto import solve
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gradconflict.pareto import solve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--K", type=int, nargs="+", default=[50, 100, 200, 400])
    p.add_argument("--ranks", type=float, nargs="+", default=[0.25, 0.5, 0.64, 0.8, 1.0], help="r / K")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--lam0", action="store_true", help="lam = 0 instead of 1e-3 trace(G) / K")
    args = p.parse_args()
    rows = []
    for K in args.K:
        for frac in args.ranks:
            r = max(1, int(frac * K))
            solves, seconds, gaps, converged = [], [], [], []
            for seed in range(args.seeds):
                J = np.random.default_rng(seed).standard_normal((K, r))
                G = J @ J.T
                lam = 0.0 if args.lam0 else 1e-3 * float(np.trace(G)) / K
                t0 = time.perf_counter()
                res = solve(G, lam)
                seconds.append(time.perf_counter() - t0)
                solves.append(res.iterations)
                # relative to f, or to max_i G_ii where the optimum is 0 (rank < K at lam = 0: f ~ 1e-300)
                gaps.append(res.gap / max(res.objective, np.finfo(float).eps * float(np.diagonal(G).max())))
                converged.append(res.converged)
            rows.append({"K": K, "rank": r, "solves_median": float(np.median(solves)), "solves_max": max(solves),
                         "ms_median": 1e3 * float(np.median(seconds)), "ms_max": 1e3 * max(seconds),
                         "gap/f_max": max(gaps), "converged": f"{sum(converged)}/{len(converged)}"})
    with pd.option_context("display.width", 200, "display.float_format", "{:.3g}".format):
        print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
