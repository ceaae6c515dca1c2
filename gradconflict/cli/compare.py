"""``gradconflict compare``: train one model under several loss weightings and seeds, and measure convergence.

    gradconflict compare --model unet-tiny --data mnist --weightings constant snr max_snr:1 min_snr:5 \\
        --seeds 3 --steps 2000 --eval-every 500 --out runs/compare

Every run is a ``gradconflict train`` folder under ``OUT/runs/``; rerunning the command resumes what is missing.
Writes ``OUT/evals.csv``, ``OUT/eval_losses.csv`` and, under ``OUT/figures/`` (or ``--figures``), Figs. 5 and 6,
the score-against-speed figure, ``claims.csv`` rows C4-C6 and a ``REPORT.md`` section.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

_FIELDS = ("model", "data", "prediction", "schedule", "image_size", "train_images", "seeds", "steps", "eval_every",
           "batch_size", "lr", "bins", "eval_per_bin", "fd_samples", "fd_draws", "sample_steps", "lam", "weights",
           "device", "jobs")


def complete_runs(evals: Any, per_bin: Any, config: Any) -> tuple[Any, Any]:
    """The rows of the weightings whose every seed reached every evaluation step (a comparison in progress holds
    some half-trained runs: their curves would bias the claims); says which weightings are left out."""
    if not len(evals):
        raise ValueError("the comparison folder holds no evaluations yet; run it without --report-only first")
    need = len(config.eval_steps)
    counts = evals.groupby(["weighting", "seed"])["step"].nunique()
    whole = counts[counts >= need].reset_index().groupby("weighting")["seed"].nunique()
    keep = [w for w in config.weightings if whole.get(w, 0) >= config.seeds]
    left = [w for w in config.weightings if w not in keep]
    if left:
        print(f"report of {len(keep)} complete weightings ({config.seeds} seeds x {need} evaluations); not yet "
              f"complete, left out: {', '.join(left)}")
    return evals[evals["weighting"].isin(keep)], per_bin[per_bin["weighting"].isin(keep)]


def run(args: argparse.Namespace) -> int:
    from ..comparison import compare, load_compare, preset, write_report
    from ..train.config import TrainConfig
    from ._records import config_record, report_record

    config = preset(args.preset, device=args.device or "cpu")
    changes: dict[str, Any] = {k: getattr(args, k) for k in _FIELDS if getattr(args, k, None) is not None}
    if args.weightings:
        changes["weightings"] = tuple(args.weightings)
    if args.threads is not None:
        changes["cpu_threads"] = args.threads
    config = dataclasses.replace(config, **changes)
    out = Path(args.out)
    if args.report_only:  # the figures and claims of what the folder holds now, training nothing
        evals, per_bin = complete_runs(*load_compare(out, config), config)
    else:
        report_record("compare", config_record(config.schedule, TrainConfig.T, config.prediction, config.weights,
                                               config.data), weights=True)  # compare_config.json records them
        print(f"compare: {len(config.weightings)} weightings x {config.seeds} seeds of {config.model} on "
              f"{config.data}, {config.steps} steps, evaluated every {config.eval_every} with the {config.weights} "
              f"weights -> {out}")
        evals = compare(config, out, progress=not args.no_progress)
        _, per_bin = load_compare(out, config)
    figures = Path(args.figures) if args.figures else out / "figures"
    result = write_report(evals, per_bin, config, figures)
    for row in result["claims"]:
        print(f"{row['claim']}: {row['verdict']}  {row.get('notes', '')}")
    written = "" if args.report_only else f"{out}/evals.csv, eval_losses.csv and "
    print(f"wrote {written}{figures}/ (fig5_convergence, fig6_loss_per_timestep, score_vs_speed, claims.csv, "
          "REPORT.md)")
    return 0


def _written_folder(args: argparse.Namespace) -> str:
    """--report-only reads --out (a comparison may still be training there) and writes only the figures folder."""
    if args.report_only:
        return args.figures or str(Path(args.out) / "figures")
    return args.out


def add_parser(subparsers: Any) -> None:
    """Register ``compare`` on an argparse subparsers object."""
    from ..comparison import PRESETS

    p = subparsers.add_parser("compare", help="train under several weightings and seeds; measure convergence (C4-C6)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    for name in PRESETS:
        group.add_argument(f"--{name}", dest="preset", action="store_const", const=name,
                           help={"toy": "seconds (tests)", "quick": "a smoke run of a few minutes (the default)",
                                 "standard": "the committed figures (12 weightings x 3 seeds, 1250 steps; resumable)",
                                 "gpu": "the standard comparison sized for one GPU"}[name])
    p.set_defaults(preset="quick")
    p.add_argument("--out", required=True, help="comparison folder (runs/, evals.csv; resumed when it exists)")
    p.add_argument("--figures", default=None, help="where figures, claims.csv and REPORT.md go (default OUT/figures)")
    p.add_argument("--model", default=None, help="built-in model name (default of the preset: unet-tiny)")
    p.add_argument("--data", default=None, help="dataset name or file (default mnist)")
    p.add_argument("--weightings", nargs="+", default=None, metavar="SPEC",
                   help="weighting specs, e.g. constant snr max_snr:1 min_snr:5 p2 pareto_online:10 learned_uncertainty")
    p.add_argument("--seeds", type=int, default=None, help="independently trained models per weighting")
    p.add_argument("--steps", type=int, default=None, help="training steps per run")
    p.add_argument("--eval-every", dest="eval_every", type=int, default=None, help="evaluate every M steps")
    p.add_argument("--train-images", dest="train_images", type=int, default=None,
                   help="the first N images train; the rest are held out (default 4000 of MNIST's 5000)")
    p.add_argument("--prediction", default=None, choices=("eps", "x0", "v"))
    p.add_argument("--schedule", default=None, choices=("linear", "cosine"))
    p.add_argument("--image-size", dest="image_size", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--bins", type=int, default=None, help="timestep bins of the per-bin losses and the Pareto score")
    p.add_argument("--eval-per-bin", dest="eval_per_bin", type=int, default=None)
    p.add_argument("--fd-samples", dest="fd_samples", type=int, default=None, help="generated samples for FD-MNIST")
    p.add_argument("--fd-draws", dest="fd_draws", type=int, default=None, help="sample subsets for FD's standard error")
    p.add_argument("--sample-steps", dest="sample_steps", type=int, default=None, help="DDIM steps of the samples")
    p.add_argument("--lam", type=float, default=None, help="Pareto ridge, x trace(G)/K (default 0.1)")
    p.add_argument("--weights", choices=("ema", "raw"), default=None, help="weights evaluated (default ema)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained in parallel processes (one thread each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default 1)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the figures, claims and report of the weightings whose runs are complete "
                        "(e.g. while a long comparison is still running elsewhere)")
    p.set_defaults(handler=run, written_folder=_written_folder)
