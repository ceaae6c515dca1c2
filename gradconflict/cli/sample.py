"""``gradconflict sample``: draw a labelled grid of samples from a trained run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from ._records import model_record, report_record, write_record
from ._weights import add_weights_flag, report_weights
from ._threads import add_threads_flag

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
    p.add_argument("--out", required=True, help="output PNG path (.png is appended when it has no extension)")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--steps", type=int, default=50, help="sampling steps, 1 to the run's T (number of timesteps)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM stochasticity in [0, 1] (0 = deterministic, 1 = DDPM-like); ddim only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="the same as --weights raw")
    add_weights_flag(p)
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a data file (.npz, or a folder with conditioning.npz) whose per-sample conditioning "
                        "(encoder_hidden_states, attention masks, ...) sample i takes from row i (rows 0..n-1); "
                        "without it a text-conditioned model is sampled with zero embeddings")
    p.add_argument("--device", default="cpu")
    add_threads_flag(p)
    p.set_defaults(handler=run)


def output_path(out: str) -> Path:
    """The file the grid is written to: ``out``, with ``.png`` appended when it has no extension (as matplotlib
    would), so that the path printed is the path written."""
    path = Path(out)
    return path if path.suffix else path.with_name(path.name + ".png")


def record_path(out: Path) -> Path:
    """Where the grid's record (schedule, prediction, weights; ``gradconflict.cli._records``) is written: beside
    the PNG, ``NAME_config.json`` for ``NAME.png``."""
    return out.with_name(out.stem + "_config.json")


def check_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` for options no sampler can honour (before the run is loaded)."""
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0.0 <= args.eta <= 1.0:
        raise ValueError(f"--eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like noise), got {args.eta:g}")
    if args.sampler == "ddpm" and args.eta != 0.0:
        raise ValueError(f"--eta {args.eta:g} applies to --sampler ddim only (ddpm always adds the posterior noise); "
                         "drop --eta or use --sampler ddim")


class _Rows:
    """``n`` samples that carry no conditioning of their own (for ``model_conditioning``'s null embedding)."""

    def __init__(self, n: int, name: str) -> None:
        self.n, self.name, self.conditioning = n, name, {}

    def __len__(self) -> int:
        return self.n


def run_null_conditioning(run: str) -> tuple[Optional[str], int]:
    """``(null_conditioning, null_length)`` of the training run ``run`` (a run folder, or a weights file inside
    one): what its text-conditioned model was trained with instead of embeddings (None: it was not)."""
    import json

    from ..adapters.conditioning import NULL_LENGTH

    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None, NULL_LENGTH
    return config.get("null_conditioning"), int(config.get("null_length", NULL_LENGTH))


def conditioning_rows(model: Any, data: Optional[str], n: int, run: str) -> tuple[Optional[dict[str, Any]], str]:
    """The per-sample conditioning of the ``n`` samples and where it came from: rows 0..n-1 of every conditioning
    array of the data file ``data`` (checked against the names the model takes), else the null embedding the run
    was trained with (``--null-conditioning`` of ``train``), else None (the sampler's default). Refused: a file
    without conditioning (nothing to pass), fewer than ``n`` rows, names the model does not take."""
    from ..adapters.conditioning import model_conditioning

    if data is None:
        null, length = run_null_conditioning(run)
        if null is None:
            return None, ""
        rows = model_conditioning(model, _Rows(n, f"run {run}"), null, length)
        return rows, f"the null conditioning {null} the run was trained with"
    from ..data import load_dataset

    dataset = load_dataset(data, image_size=None)  # the rows only: images as stored
    if not dataset.conditioning:
        raise ValueError(f"--data {data} holds no per-sample conditioning arrays (encoder_hidden_states, masks, ...), "
                         "so there is nothing to pass to the model: drop --data")
    conditioning = model_conditioning(model, dataset)  # refuses names the model does not take, in one line
    rows = min(len(v) for v in conditioning.values())
    if rows < n:
        raise ValueError(f"--data {data} has conditioning for {rows} samples but --n {n} asks for more: "
                         f"use --n {rows} or fewer")
    return {name: value[:n] for name, value in conditioning.items()}, f"rows 0..{n - 1} of {data}"


def run(args: argparse.Namespace) -> int:
    """Load the run and write the grid."""
    from .._loading import load_trained_weights
    from ..adapters.loaded import LoadedModel
    from ..train import sample_grid_png

    check_args(args)
    if args.no_ema and args.weights == "ema":
        raise ValueError("--no-ema and --weights ema contradict each other: pass one of them")
    out = output_path(args.out)
    model, schedule, prediction, kind = load_trained_weights(args.run, "raw" if args.no_ema else args.weights,
                                                             device=args.device)
    report_weights("sample", kind, args.run)
    requested = "raw" if args.no_ema else args.weights
    record = model_record(LoadedModel(model, schedule, prediction, str(args.run), kind), requested,
                          data_arg=args.data)
    report_record("sample", record)
    if args.steps > schedule.T:
        raise ValueError(f"--steps {args.steps} exceeds the run's T = {schedule.T} timesteps; "
                         f"use --steps {schedule.T} or fewer")
    model_kwargs, source = conditioning_rows(model, args.data, args.n, args.run)
    if model_kwargs:
        record["conditioning"], record["conditioning_source"] = sorted(model_kwargs), source
        print(f"gradconflict sample: conditioning {', '.join(sorted(model_kwargs))}: {source}", file=sys.stderr)
    sample_grid_png(model, schedule, prediction, out, n=args.n, steps=args.steps, seed=args.seed,
                    method=args.sampler, eta=args.eta, model_kwargs=model_kwargs)  # atomic: never a half-written PNG
    write_record(record_path(out), vars(args), record, grid=str(out))
    print(f"wrote {out}")  # stdout: the grid's path alone (scripts read it); where its record went, on stderr
    print(f"gradconflict sample: recorded in {record_path(out)}", file=sys.stderr)
    return 0
