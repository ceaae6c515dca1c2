"""``gradconflict solve``: Pareto weights for a Gram matrix stored as CSV.

    gradconflict solve GRAM.csv --lam 1e-3 --method auto

GRAM.csv is a K x K matrix: with bin labels as header row and index column
(as written by ``gradconflict gram`` and ``DataFrame.to_csv``), with a header
row only (``to_csv(index=False)``), or plain numbers without labels (tasks
are then named 0..K-1); anything else is refused (the contract:
:mod:`gradconflict.cli.gram_csv`).  Prints one weight per task, the objective
and the Frank-Wolfe duality gap (``--json`` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from gradconflict.cli.gram_csv import read_gram
from gradconflict.pareto import METHODS, solve
from gradconflict.pareto._validate import check_finite
from gradconflict.track.analyze import absolute_lam
from ._threads import add_threads_flag, command_threads

RECORD_KEYS = ("schedule", "prediction", "weights", "data")  # of gram_config.json (gradconflict.cli._records)

__all__ = ["read_gram", "run", "add_parser", "main"]


# flags that only one method takes: (flag, attribute, method)
_METHOD_FLAGS = (("--variant", "variant", "frank_wolfe"), ("--solver", "solver", "cvxpy"), ("--lr", "lr", "ugd"))


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values that no method can use, naming the flag (the solver would name its own option)."""
    for flag, value in (("--tol", args.tol), ("--digits", args.digits)):
        if value is not None and value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if args.tol is not None and not np.isfinite(args.tol):
        raise ValueError(f"--tol must be a finite number >= 0 (a relative accuracy such as 1e-8), got {args.tol}")
    if args.max_iter is not None and args.max_iter < 1:
        raise ValueError(f"--max-iter must be >= 1, got {args.max_iter}")
    for flag, name, method in _METHOD_FLAGS:
        if getattr(args, name, None) is not None and args.method != method:
            raise ValueError(f"{flag} applies to --method {method} only (got --method {args.method}); "
                             f"drop {flag} or pass --method {method}")
    if getattr(args, "lr", None) is not None and not (np.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {args.lr}")


def _hint(args: argparse.Namespace, result: Any) -> str:
    """What to change when a method stopped before ``gap <= tol * objective`` (one line)."""
    cap = args.max_iter if args.max_iter is not None else ("1000, the default" if args.method == "ugd" else "the default")
    text = (f"gradconflict solve: hint: {args.method} stopped after {result.iterations} iterations without "
            f"converging (gap {result.gap:.3e} > tol x objective); raise --max-iter (now {cap})")
    if args.method == "ugd":
        lr = args.lr if args.lr is not None else "0.05, the default"
        return text + f" or change --lr (now {lr}: lower it if the objective oscillates, raise it if it creeps)"
    if args.method == "frank_wolfe":
        return text + ", try --variant away or pairwise, or use --method auto (exact)"
    return text + " or loosen --tol"


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if getattr(args, "lr", None) is not None:
        options["lr"] = args.lr
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
        _check_flags(args)
        frame = read_gram(args.gram)
        G = frame.to_numpy()
        try:  # before --lam-rel turns a NaN or Inf of G into "lam must be finite"
            check_finite(G, "G")
        except ValueError as exc:
            raise ValueError(f"{args.gram}: {exc} (row, column from 0, not counting labels)") from None
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
    except (OSError, ValueError) as exc:
        print(f"gradconflict solve: error: {exc}", file=sys.stderr)
        return 2
    _print_result(args, list(frame.index), result, G)
    if not result.converged:  # on stderr, after the result: --json keeps stdout a JSON object
        sys.stdout.flush()
        print(_hint(args, result), file=sys.stderr)
    return 0


def gram_source(path: str) -> Optional[dict[str, Any]]:
    """``schedule``, ``prediction``, ``weights`` and ``data`` of the ``gradconflict gram`` run that wrote the CSV
    ``path``, read from the ``gram_config.json`` beside it; None when there is none (or it cannot be read)."""
    config = Path(path).parent / "gram_config.json"
    try:
        held = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    return {k: held.get(k) for k in RECORD_KEYS} if isinstance(held, dict) else None


def gram_line(path: str, K: int) -> str:
    """The first line of the table: the file read and its K. A Gram CSV carries no schedule, prediction, weights or
    data of its own: those of the ``gram`` run that wrote it are named when its gram_config.json is beside it."""
    source = gram_source(path)
    held = ("computed with schedule {schedule}, {prediction} prediction, {weights} weights, data {data} (its "
            "gram_config.json)".format(**source) if source else "no schedule, model or data recorded with it")
    return f"gram: {path} (K = {K}; {held})"


def _print_result(args: argparse.Namespace, labels: list, result: Any, G: np.ndarray) -> None:
    """The weights table (or the JSON object with --json) on stdout."""
    if args.json:
        payload = {
            "gram": str(args.gram),
            "K": len(labels),
            "gram_source": gram_source(args.gram),
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
        return
    width = max(len("task"), *(len(label) for label in labels))
    rel = _lam_rel(result.lam, G)
    rel_text = f" (= {rel:.3g} x trace(G)/K)" if rel is not None else ""
    print(gram_line(args.gram, len(labels)))
    print(f"method: {result.method}  lam: {result.lam:g}{rel_text}  K: {len(labels)}")
    print(f"{'task':<{width}}  weight")
    for label, weight in zip(labels, result.weights):
        print(f"{label:<{width}}  {weight:.{args.digits}f}")
    print(f"objective: {result.objective:.10g}")
    print(f"gap: {result.gap:.3e}")
    print(f"iterations: {result.iterations}  converged: {result.converged}  seconds: {result.seconds:.4f}")


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
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of --method ugd (default 0.05, Adam on the normalized problem)")
    parser.add_argument("--variant", choices=("vanilla", "away", "pairwise"), default=None, help="Frank-Wolfe variant")
    parser.add_argument("--solver", default=None, help="CVXPY solver for --method cvxpy (default CLARABEL)")
    parser.add_argument("--digits", type=int, default=8, help="decimals printed for the weights (default 8)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    add_threads_flag(parser)
    parser.set_defaults(handler=run)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m gradconflict.cli.solve GRAM.csv ...``."""
    parser = argparse.ArgumentParser(prog="gradconflict")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["solve", *(sys.argv[1:] if argv is None else argv)])
    with command_threads(args):
        return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
