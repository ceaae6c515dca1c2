"""Benchmark the Pareto solvers of ``gradconflict.pareto``.

Problem family (stated in the output): ``G = A A^T`` with ``A`` of shape
``K x K//2`` (rank K/2), standard normal entries and columns scaled by
``logspace(0, -3, K//2)`` (singular values of A spread over 3 decades, so G's
nonzero spectrum spans 6), and ``lam = 1e-3 * trace(G) / K``.  A second
family, "lowrank" (``G = J J^T``, ``J ~ N(0,1)^(K x 64)``, same lam rule:
low-rank-plus-ridge, like Gram matrices of many task gradients), is timed for
"auto" and CVXPY at the largest K, and so is a Gram the toolkit itself produces (``task_gram`` of
the built-in dit-tiny with one sample in each of K bins: full rank, gradient norms spread over decades),
with the same lam rule and with lam = 0.

For each K: wall time of ``solve(...)`` per method (validation included,
best of ``--repeats`` for auto and CVXPY alike), the relative objective gap ``(f - f_cvxpy) /
f_cvxpy`` (negative = better than CVXPY), the certified duality gap
relative to f, and the speed-up of "auto" over CVXPY.  Also: Frank-Wolfe to
a duality gap of 1e-8, UGD after 100 / 1000 / 10000 steps, and a batch of
256 problems with K = 50.

    python benchmarks/bench_solvers.py           # full run (~1-3 min on 2 cores)
    python benchmarks/bench_solvers.py --quick   # small sizes, seconds

BLAS threads default to 1 (``--threads``): on a shared 2-core machine
multi-threaded OpenBLAS is erratic under load.  The limit is applied to both
solvers alike (threadpoolctl when installed, plus the environment variables);
the final summary re-times "auto" and CVXPY at K = 1000 with 1 and 2 threads
(``--summary-threads``), next to the floor of any solver that checks its input
the way "auto" does: one float64 Cholesky factorization of the K x K matrix
(the PSD certificate), timed on the same matrix in the same run.

    python benchmarks/bench_solvers.py --summary --summary-threads 1 16   # K = 1000 only, 1 and 16 threads
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (K <= 100, fewer steps)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats, best is reported (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true",
                   help="only the cvxpy-vs-auto comparison at K = 1000 (skips the per-method table)")
    p.add_argument("--summary-threads", type=int, nargs="+", default=[1, 2], metavar="N",
                   help="BLAS thread counts of the K = 1000 comparison (default: 1 2)")
    return p.parse_args()


ARGS = _args()
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the pools' size at start-up;
    os.environ[var] = str(max(ARGS.threads, *ARGS.summary_threads))  # each timing then limits it (_threads)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

try:
    from gradconflict.pareto import solve
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gradconflict.pareto import solve

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - env vars set above still apply at start-up
    threadpool_limits = None


class _threads:
    """Context manager: BLAS/OpenMP threads = n for every library (both solvers)."""

    def __init__(self, n: int) -> None:
        self.n, self.ctl = n, None

    def __enter__(self):
        if threadpool_limits is not None:
            self.ctl = threadpool_limits(limits=self.n)
        return self

    def __exit__(self, *exc):
        if self.ctl is not None:
            self.ctl.unregister()


def lowrank_problem(K: int, rng: np.random.Generator, rank: int = 64) -> tuple[np.ndarray, float]:
    J = rng.standard_normal((K, rank))
    G = J @ J.T
    return G, 1e-3 * float(np.trace(G)) / K


def engine_problem(K: int, seed: int, lam_factor: float = 1e-3) -> tuple[np.ndarray, float]:
    """A Gram the toolkit itself produces: ``task_gram`` of the built-in dit-tiny (seeded, weights perturbed by
    0.02 N(0, 1) so no layer is exactly zero at init) on K uniform bins with one synthetic sample each."""
    import torch

    from gradconflict import NoiseSchedule, TimestepBins, task_gram
    from gradconflict.models import build_model

    torch.manual_seed(seed)
    model = build_model("dit-tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = model.config
    bins = TimestepBins.uniform(1000, K)
    g = torch.Generator().manual_seed(seed)
    t, task = bins.sample(1, g)
    x0 = torch.randn(len(t), cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    G = task_gram(model, x0, t, task, schedule=NoiseSchedule.linear(), prediction=cfg.prediction, K=K,
                  noise=torch.randn(x0.shape, generator=g)).gram.numpy()
    return G, lam_factor * float(np.trace(G)) / K


def problem(K: int, rng: np.random.Generator, n: int | None = None) -> tuple[np.ndarray, float]:
    r = max(K // 2, 1)
    shape = (K, r) if n is None else (n, K, r)
    A = rng.standard_normal(shape) * np.logspace(0, -3, r)
    G = A @ np.swapaxes(A, -1, -2)
    lam = 1e-3 * float(np.trace(G, axis1=-2, axis2=-1).mean()) / K
    return G, lam


def _feasible(w: np.ndarray) -> bool:
    """On the simplex (the duality gap certifies only feasible points): w >= 0 and sum 1 to rounding."""
    return bool(np.all(w >= 0) and abs(float(np.sum(w)) - 1.0) <= 1e-12)


def timed(G, lam, method, repeats=1, **opts):
    best, res = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = solve(G, lam, method, **opts)
        best = min(best, time.perf_counter() - t0)
    return res, best


def cholesky_floor(G: np.ndarray, repeats: int) -> float:
    """Best time of one float64 Cholesky factorization of ``G + 1e-8 max_i G_ii I`` (LAPACK dpotrf, the
    PSD certificate that ``solve(..., check_psd=True)`` needs) -- the floor of any solver that checks its
    input, and so the largest cvxpy/auto ratio such a solver can reach on this machine."""
    from scipy.linalg import lapack

    shifted = G + 1e-8 * float(np.diagonal(G).max()) * np.eye(G.shape[0])
    best = np.inf
    for _ in range(repeats):
        a = shifted.copy()
        t0 = time.perf_counter()
        lapack.dpotrf(a.T, lower=1, clean=0, overwrite_a=1)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    rng = np.random.default_rng(ARGS.seed)
    sizes = (10, 100) if ARGS.quick else (10, 100, 1000)
    fw_cap = 20_000 if ARGS.quick else 50_000
    ugd_steps = (100, 1000) if ARGS.quick else (100, 1000, 10_000)
    print(f"# G = A A^T, A ~ N(0,1)^(K x K/2) * logspace(0,-3) per column; lam = 1e-3 trace(G)/K; "
          f"BLAS threads = {ARGS.threads}; best of {ARGS.repeats}")
    if not ARGS.summary:
        with _threads(ARGS.threads):
            table = _main_table(rng, sizes, fw_cap, ugd_steps)
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
            print(table.astype(object).where(table.notna(), "").to_string(index=False))
    else:
        solve(np.eye(3), 0.1, "cvxpy")  # import / warm-up
    Kmax = sizes[-1]
    print(f"\n# cvxpy vs auto at K = {Kmax}, both families, best of {ARGS.repeats}")
    summary = []
    families = [("logspaced rank K/2", problem(Kmax, np.random.default_rng(ARGS.seed + 1))),
                ("lowrank rank 64", lowrank_problem(Kmax, np.random.default_rng(ARGS.seed + 2)))]
    if not ARGS.quick:
        G_e, lam_e = engine_problem(Kmax, ARGS.seed)
        families += [("engine dit-tiny n=1", (G_e, lam_e)), ("engine dit-tiny n=1, lam=0", (G_e, 0.0))]
    for threads in ARGS.summary_threads:
        with _threads(threads):
            for fam, (G, lam) in families:
                ref, t_ref = timed(G, lam, "cvxpy", ARGS.repeats)
                t_chol = cholesky_floor(G, ARGS.repeats)
                summary.append({"family": fam, "threads": threads, "method": "floor: one float64 Cholesky",
                                "auto_s": t_chol, "cvxpy_s": t_ref, "ratio": t_ref / t_chol})
                for label, opts in (("auto", {}), ("auto check_psd=False", {"check_psd": False})):
                    res, t = timed(G, lam, "auto", ARGS.repeats, **opts)
                    summary.append({
                        "family": fam, "threads": threads, "method": label, "auto_s": t, "cvxpy_s": t_ref,
                        "ratio": t_ref / t, "rel_obj_vs_cvxpy": (res.objective - ref.objective) / ref.objective,
                        "gap/f": res.gap / res.objective, "support": int(np.sum(res.weights > 0)),
                        "iterations": int(res.iterations), "feasible": _feasible(res.weights),
                    })
    summary = pd.DataFrame(summary)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
        print(summary.to_string(index=False))
    if not ARGS.quick:
        floor = summary[summary.method.str.startswith("floor")].set_index(["family", "threads"]).ratio
        k = summary[(summary.method == "auto")]
        for _, row in k.iterrows():
            print(f"K=1000 {row.family}, {row.threads} thread(s): cvxpy/auto = {row.ratio:.1f}x (goal >= 100x; "
                  f"cvxpy / one Cholesky = {floor[(row.family, row.threads)]:.1f}x), "
                  f"rel objective vs cvxpy = {row.rel_obj_vs_cvxpy:.2e} (goal <= 1e-9)")


def _main_table(rng, sizes, fw_cap, ugd_steps) -> pd.DataFrame:
    rows = []
    solve(np.eye(3), 0.1, "cvxpy")  # import / warm-up
    for K in sizes:
        G, lam = problem(K, rng)
        ref, t_ref = timed(G, lam, "cvxpy", ARGS.repeats)
        f_ref = ref.objective

        def row(name, res, t, **extra):
            rows.append({
                "K": K, "method": name, "seconds": t, "iterations": int(res.iterations),
                "converged": bool(res.converged), "rel_obj_vs_cvxpy": (res.objective - f_ref) / f_ref,
                "gap/f": res.gap / res.objective, **extra,
            })

        row("cvxpy (Clarabel)", ref, t_ref, support=int(np.sum(ref.weights > 1e-9)))
        auto, t_auto = timed(G, lam, "auto", ARGS.repeats)
        row("auto", auto, t_auto, support=int(np.sum(auto.weights > 0)), speedup=t_ref / t_auto,
            feasible=_feasible(auto.weights))
        fast, t_fast = timed(G, lam, "auto", ARGS.repeats, check_psd=False)
        row("auto check_psd=False", fast, t_fast, speedup=t_ref / t_fast)
        for variant in ("away", "pairwise", "vanilla"):
            fw, t_fw = timed(G, lam, "frank_wolfe", 1, variant=variant, tol=1e-8, max_iter=fw_cap)
            row(f"frank_wolfe {variant} tol=1e-8", fw, t_fw)
        for steps in ugd_steps:
            ug, t_ug = timed(G, lam, "ugd", 1, steps=steps, tol=0.0)
            row(f"ugd adam {steps} steps", ug, t_ug)
    Gb, lamb = problem(50, rng, n=256)
    for method, opts in (("auto", {}), ("frank_wolfe", {"max_iter": 2000}), ("ugd", {"steps": 1000})):
        res, t = timed(Gb, lamb, method, ARGS.repeats if method == "auto" else 1, **opts)
        rows.append({
            "K": "50 x256", "method": f"{method} batched", "seconds": t,
            "iterations": int(np.max(res.iterations)), "converged": f"{int(np.sum(res.converged))}/256",
            "gap/f": float(np.max(res.gap / res.objective)),
        })
    return pd.DataFrame(rows)


if __name__ == "__main__":
    main()
