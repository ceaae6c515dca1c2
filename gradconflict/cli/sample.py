"""``gradconflict sample``: draw a labelled grid of samples from a trained run."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``sample`` subcommand."""
    p = subparsers.add_parser(
        "sample",
        help="sample a grid PNG from a trained run",
        description="Sample images from a run directory written by `gradconflict train` and save a labelled grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--run", required=True, help="run directory (or model.safetensors / checkpoint.pt)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Load the run and write the grid."""
    from ..train import load_trained, sample_grid_png

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    model, schedule, prediction = load_trained(args.run, ema=not args.no_ema, device=args.device)
    sample_grid_png(model, schedule, prediction, args.out, n=args.n, steps=args.steps, seed=args.seed,
                    method=args.sampler, eta=args.eta)
    print(f"wrote {args.out}")
    return 0
