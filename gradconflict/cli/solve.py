"""``gradconflict solve``: Pareto weights for a Gram matrix stored as CSV.

    gradconflict solve GRAM.csv --lam 1e-3 --method auto

GRAM.csv is a K x K matrix, either with bin labels as header row and index
column (as written by ``DataFrame.to_csv``) or plain numbers without labels
(tasks are then named 0..K-1).  Prints one weight per task, the objective
and the Frank-Wolfe duality gap (``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd

from gradconflict.pareto import METHODS, solve


def read_gram(path: str) -> pd.DataFrame:
    """Read a K x K Gram CSV, labeled (header + index column) or headerless."""
    raw = pd.read_csv(path, header=None)
    numeric = raw.apply(pd.to_numeric, errors="coerce")
    if raw.shape[0] == raw.shape[1] and not numeric.isna().to_numpy().any():
        labels = [str(i) for i in range(raw.shape[0])]
        return pd.DataFrame(numeric.to_numpy(dtype=float), index=labels, columns=labels)
    frame = pd.read_csv(path, index_col=0)
    if frame.shape[0] != frame.shape[1]:
        raise ValueError(
            f"{path}: expected a square K x K matrix (optionally with a header row and an index "
            f"column of bin labels), got {frame.shape[0]} rows x {frame.shape[1]} columns"
        )
    values = frame.apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any() and not frame.isna().to_numpy().any():
        raise ValueError(f"{path}: the matrix has non-numeric entries; every cell must be a number")
    frame = pd.DataFrame(values.to_numpy(dtype=float), index=frame.index.astype(str), columns=frame.columns.astype(str))
    return frame


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.tol is not None:
        options["tol"] = args.tol
    if args.max_iter is not None:
        options["steps" if args.method == "ugd" else "max_iter"] = args.max_iter
    if args.variant is not None:
        options["variant"] = args.variant
    if args.solver is not None:
        options["solver"] = args.solver
    return options


def run(args: argparse.Namespace) -> int:
    """Handler of ``gradconflict solve``; returns the exit status."""
    try:
        frame = read_gram(args.gram)
        result = solve(frame.to_numpy(), lam=args.lam, method=args.method, **_options(args))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        print(f"gradconflict solve: error: {exc}", file=sys.stderr)
        return 2
    labels = list(frame.index)
    if args.json:
        payload = {
            "method": result.method,
            "lam": result.lam,
            "weights": dict(zip(labels, map(float, result.weights))),
            "objective": result.objective,
            "gap": result.gap,
            "iterations": result.iterations,
            "converged": result.converged,
            "seconds": result.seconds,
        }
        print(json.dumps(payload, indent=2))
        return 0
    width = max(len("task"), *(len(label) for label in labels))
    print(f"method: {result.method}  lam: {result.lam:g}  K: {len(labels)}")
    print(f"{'task':<{width}}  weight")
    for label, weight in zip(labels, result.weights):
        print(f"{label:<{width}}  {weight:.{args.digits}f}")
    print(f"objective: {result.objective:.10g}")
    print(f"gap: {result.gap:.3e}")
    print(f"iterations: {result.iterations}  converged: {result.converged}  seconds: {result.seconds:.4f}")
    return 0


def add_parser(subparsers: Any) -> None:
    """Register the ``solve`` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "solve",
        help="Pareto-optimal task weights for a Gram matrix CSV",
        description=(
            "Minimize w^T G w + lam ||w||^2 over the probability simplex for the K x K Gram "
            "matrix G in GRAM.csv and print the weights, the objective and the duality gap."
        ),
    )
    parser.add_argument("gram", metavar="GRAM.csv", help="K x K Gram matrix; header row + index column of bin labels, or plain numbers")
    parser.add_argument("--lam", type=float, default=0.0, help="ridge coefficient lam >= 0 (default 0)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="solver (default auto: exact active set)")
    parser.add_argument("--tol", type=float, default=None, help="duality-gap tolerance relative to max_i(G_ii + lam)")
    parser.add_argument("--max-iter", type=int, default=None, help="iteration cap (steps for ugd)")
    parser.add_argument("--variant", choices=("vanilla", "away", "pairwise"), default=None, help="Frank-Wolfe variant")
    parser.add_argument("--solver", default=None, help="CVXPY solver for --method cvxpy (default CLARABEL)")
    parser.add_argument("--digits", type=int, default=8, help="decimals printed for the weights (default 8)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.set_defaults(handler=run)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m gradconflict.cli.solve GRAM.csv ...``."""
    parser = argparse.ArgumentParser(prog="gradconflict")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["solve", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
