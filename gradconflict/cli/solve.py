"""``gradconflict solve``: Pareto weights for a Gram matrix stored as CSV.

    gradconflict solve GRAM.csv --lam 1e-3 --method auto

GRAM.csv is a K x K matrix: with bin labels as header row and index column
(as written by ``gradconflict gram`` and ``DataFrame.to_csv``), with a header
row only (``to_csv(index=False)``), or plain numbers without labels (tasks
are then named 0..K-1).  Prints one weight per task, the objective
and the Frank-Wolfe duality gap (``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import numpy as np
import pandas as pd

from gradconflict.pareto import METHODS, solve
from gradconflict.track.analyze import absolute_lam


_LAYOUTS = ("plain K x K numbers; a header row of K labels over K rows of numbers; or a header row and an index "
            "column of labels (as `gradconflict gram` and DataFrame.to_csv write)")


def _label(cell: Any) -> str:
    text = "" if pd.isna(cell) else str(cell).strip()
    return text[1:].strip() if text.startswith("#") else text  # np.savetxt(header=...) writes "# " in front


def _unique(labels: list[str]) -> list[str]:
    """Task names as given, with a repeated name numbered (``a``, ``a.1``, ...) so no weight is lost by name."""
    seen: dict[str, int] = {}
    out = []
    for name in labels:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}.{n}")
    return out


def read_gram(path: str) -> pd.DataFrame:
    """Read a K x K Gram CSV: plain numbers, a header row of labels, or a header row and an index column.

    Tasks are named by the index column, else the header, else 0..K-1. Raises ``ValueError`` naming the
    parsed shape and the accepted layouts when no layout gives a square numeric matrix.
    """
    raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=True)
    numeric = raw.apply(pd.to_numeric, errors="coerce")
    # "nan" (np.savetxt's NaN) is a number here, not a label: the matrix is read whole and its NaN refused by name
    nan_text = raw.apply(lambda column: column.str.strip().str.lower().isin(["nan", "+nan", "-nan"]))
    missing = numeric.isna() & ~nan_text  # cells that are not numbers
    rows, cols = raw.shape
    unreadable: Optional[int] = None  # K of a square layout that has non-numeric cells
    # (header row?, index column?) in order; "plain" first so a square numeric table is never read as labels
    for header, index in ((False, False), (True, False), (True, True)):
        body = numeric.iloc[int(header):, int(index):]
        if body.shape[0] != body.shape[1] or body.shape[0] == 0:
            continue
        if index:  # an index column needs an empty corner, non-numeric labels, or the header's labels
            corner, names = raw.iloc[0, 0], raw.iloc[1:, 0].map(_label).tolist()
            heads = raw.iloc[0, 1:].map(_label).tolist()
            if not (pd.isna(corner) or missing.iloc[1:, 0].any() or names == heads):
                continue
        hole = missing.iloc[int(header):, int(index):]
        if hole.to_numpy().any():
            inner = hole.iloc[int(not header):, int(not index):]  # cells that cannot be labels
            if body.shape[0] > 1 and inner.to_numpy().any():  # a later layout (with labels) is the likelier one
                unreadable = body.shape[0]
            continue
        if index:
            labels = raw.iloc[1:, 0].map(_label).tolist()
        elif header:
            labels = raw.iloc[0, :].map(_label).tolist()
        else:
            labels = [str(i) for i in range(rows)]
        labels = _unique(labels)
        return pd.DataFrame(body.to_numpy(dtype=float), index=labels, columns=labels)
    if unreadable is not None:
        raise ValueError(f"{path}: the {unreadable} x {unreadable} matrix has non-numeric or empty entries; every "
                         f"cell must be a number (accepted layouts: {_LAYOUTS})")
    first = ",".join(raw.iloc[0].map(_label)) if rows else ""
    raise ValueError(
        f"{path}: expected a square K x K matrix but parsed {rows} row(s) x {cols} comma-separated column(s) "
        f"(first row: {first[:60]!r}); accepted layouts: {_LAYOUTS}"
    )


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
        for flag, value in (("--tol", args.tol), ("--digits", args.digits)):
            if value is not None and value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}")
        frame = read_gram(args.gram)
        G = frame.to_numpy()
        lam = args.lam
        if args.lam_rel is not None:
            if args.lam:
                raise ValueError("pass --lam (absolute) or --lam-rel (a multiple of trace(G)/K), not both")
            if not np.isfinite(args.lam_rel) or args.lam_rel < 0:
                raise ValueError(f"--lam-rel must be a finite number >= 0, got {args.lam_rel}")
            lam = absolute_lam(G, args.lam_rel)
            if lam < 0:
                raise ValueError(f"--lam-rel needs trace(G) >= 0 (lam = lam_rel x trace(G)/K), but trace(G)/K = "
                                 f"{absolute_lam(G, 1.0):.3e}: G is not a Gram matrix")
        result = solve(G, lam=lam, method=args.method, **_options(args))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        print(f"gradconflict solve: error: {exc}", file=sys.stderr)
        return 2
    labels = list(frame.index)
    if args.json:
        payload = {
            "method": result.method,
            "lam": result.lam,
            "lam_rel": _lam_rel(result.lam, G),
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
    rel = _lam_rel(result.lam, G)
    rel_text = f" (= {rel:.3g} x trace(G)/K)" if rel is not None else ""
    print(f"method: {result.method}  lam: {result.lam:g}{rel_text}  K: {len(labels)}")
    print(f"{'task':<{width}}  weight")
    for label, weight in zip(labels, result.weights):
        print(f"{label:<{width}}  {weight:.{args.digits}f}")
    print(f"objective: {result.objective:.10g}")
    print(f"gap: {result.gap:.3e}")
    print(f"iterations: {result.iterations}  converged: {result.converged}  seconds: {result.seconds:.4f}")
    return 0


def _lam_rel(lam: float, G: np.ndarray) -> Optional[float]:
    """``lam`` as a multiple of ``trace(G) / K`` (the unit of ``track --lam``); None when the trace is not > 0."""
    mean_diag = absolute_lam(G, 1.0)
    return lam / mean_diag if mean_diag > 0 else None


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
    parser.add_argument("gram", metavar="GRAM.csv", help="K x K Gram matrix; header row (+ index column) of bin labels, or plain numbers")
    parser.add_argument("--lam", type=float, default=0.0, help="ridge coefficient lam >= 0, absolute (default 0)")
    parser.add_argument("--lam-rel", type=float, default=None, metavar="X",
                        help="ridge as a multiple of trace(G)/K, the unit of `track --lam` (e.g. 0.1)")
    parser.add_argument("--method", choices=METHODS, default="auto", help="solver (default auto: exact active set)")
    parser.add_argument("--tol", type=float, default=None, help="relative duality-gap tolerance: converged when gap <= tol * objective")
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
