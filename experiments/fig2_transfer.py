"""Paper Fig. 2: the cross-bin fine-tuning transfer matrix of a trained diffusion model (claim C1).

    python experiments/fig2_transfer.py [--preset quick|full|toy] [--device cuda] [--out DIR]
    python experiments/fig2_transfer.py --checkpoint runs/my_run [--data digits] [--weights ema|raw] [--preset ...] [--out DIR]

Without ``--checkpoint``: trains (or reuses) the cached reproduction run of `gradconflict reproduce` in
DIR/runs/reproduce-<preset>/ and its transfer stage, like the other figure scripts.

With ``--checkpoint`` (a training run directory, its model.safetensors / checkpoint.pt, or a model spec): the
transfer matrix of that model with the preset's transfer setup (steps, lr, seeds, K bins), fine-tuned and
evaluated on ``--data`` (default: the data the run was trained on, read from its config; mnist when it is
not known, e.g. for a model spec). Fine-tuning starts from the run's EMA weights, as everywhere in gradconflict
(``gradconflict transfer --model RUN`` too); ``--weights raw`` starts from its raw final weights instead (a point
of the optimiser's trajectory; the reproduction's own transfer stage, without ``--checkpoint``, uses those). The
weights used are printed. For each of the K uniform bins a copy is fine-tuned with
AdamW on that bin only, and every bin's loss (x0 units, fixed evaluation set) is compared with the base model:
``transfer[i, j] = (L_j(theta_0) - L_j(theta_i)) / L_j(theta_0)``.

Writes DIR/figures/fig2_transfer.png (DIR/figures/quick/ under the quick preset) (heatmap and transfer against bin distance) and
DIR/figures/fig2_transfer.csv (one row per source and target bin: mean, standard error, losses), and prints
each bin's reach and whether C1 (neighbours improve, distant bins get worse) holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from _common import fail, figure_parser, parse_figure_args
from gradconflict.bins import TimestepBins
from gradconflict.reproduce import ReproduceConfig, claim_c1, preset
from gradconflict.reproduce.pipeline import reproduce
from gradconflict.spec import load_model, model_data
from gradconflict._loading import describe_weights, load_trained_weights
from gradconflict.train import TrainConfig
from gradconflict.train.checkpoint import load_checkpoint, weights_metadata
from gradconflict.transfer import TransferConfig, TransferResult, plot_transfer, run_transfer
from gradconflict.transfer.matrix import result_from_frame
from gradconflict.transfer.plot import describe_setup

NAME = "fig2_transfer"
TITLE = "Fig. 2 - fine-tune on one timestep bin, relative loss change of every bin"


def training_config(checkpoint: str | Path) -> Optional[TrainConfig]:
    """The ``TrainConfig`` of a gradconflict training run (directory, model.safetensors or checkpoint.pt),
    or None for anything else (e.g. a model spec)."""
    path = Path(checkpoint)
    if path.is_dir():
        if (path / "config.json").is_file():
            return TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
        found = [p for p in (path / "model.safetensors", path / "checkpoint.pt") if p.is_file()]
        if not found:
            return None
        path = found[0]
    if path.suffix == ".safetensors" and path.is_file():
        meta = weights_metadata(path)
        return TrainConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
    if path.suffix == ".pt" and path.is_file():
        return TrainConfig.from_dict(load_checkpoint(path)["config"])
    return None


def base_model(checkpoint: str, device: str, weights: Optional[str] = None) -> tuple[Any, Any, str, str, Optional[TrainConfig]]:
    """``(model, schedule, prediction, description, train_config)`` of ``checkpoint``: a training run is loaded
    with its EMA weights (``weights="raw"``: its raw final weights), anything else through
    ``gradconflict.spec.load_model``; which weights is printed."""
    config = training_config(checkpoint)
    if config is not None:
        model, schedule, prediction, kind = load_trained_weights(checkpoint, weights, device=device)
        print(f"weights: {describe_weights(kind, checkpoint)}")
        return model, schedule, prediction, f"run {Path(checkpoint).name} ({kind} weights)", config
    loaded = load_model(checkpoint, device=device, weights=weights)
    print(f"weights: {describe_weights(loaded.weights, checkpoint)}")
    return loaded.model, loaded.schedule, loaded.prediction, loaded.source, None


def c1_verdict(result: TransferResult) -> str:
    """The report's C1 verdict (:func:`gradconflict.reproduce.claim_c1`): neighbours (|j - i| = 1) against
    distant bins (|j - i| >= K/2); holds when near > 0 > far."""
    c = claim_c1(result.matrix, result.stderr)
    share = float((result.matrix[np.abs(np.subtract.outer(np.arange(result.K), np.arange(result.K)))
                                 >= max(2, result.K // 2)] < 0).mean())
    return f"C1 {'holds' if c['holds'] else 'does not hold'}: {c['measured']} ({share:.0%} of distant pairs negative)"


def print_result(result: TransferResult) -> None:
    for line in result.reach_lines():
        print(line)
    if result.all_row is not None:
        print(f"all bins (control): relative loss reduction {np.array2string(result.all_row, precision=4)}")
    print(c1_verdict(result))


def from_checkpoint(checkpoint: str, data_name: Optional[str], config: ReproduceConfig, out: Path, progress: bool,
                    weights: Optional[str] = None) -> Path:
    """The transfer matrix of ``checkpoint`` with the transfer setup of ``config``; returns the PNG path."""
    device = config.train.device
    model, schedule, prediction, source, trained = base_model(checkpoint, device, weights)
    if data_name is None:
        data_name = trained.data if trained is not None else "mnist"
        print(f"data: {data_name} ({'the run was trained on it' if trained is not None else 'default; the checkpoint names no training data'})")
    limit = trained.data_limit if trained is not None and data_name == trained.data else None
    model_config = getattr(model, "config", None)
    declared = getattr(model_config, "image_size", None) or getattr(model_config, "sample_size", None)
    # the model's own input size when it declares one, else the run's (16 for a bare checkpoint); channels checked
    data, _ = model_data(model, data_name, None if declared else (trained.image_size if trained else 16), limit=limit)
    bins = TimestepBins.uniform(schedule.T, config.transfer_bins)
    tcfg = TransferConfig(**{"progress": progress, **config.transfer})
    result = run_transfer(model, data, bins, tcfg, schedule=schedule, prediction=prediction)
    setup = describe_setup(result, source, data.name) + f", {prediction}-prediction, loss in x0 units"
    png = plot_transfer(result, out / "figures" / f"{NAME}.png", setup=setup, title=TITLE)
    print(f"{setup}; {'batched' if result.batched else 'sequential'} fine-tuning, {result.seconds:.0f} s")
    print_result(result)
    return png


def from_reproduction(config: ReproduceConfig, out: Path, progress: bool) -> Path:
    """Fig. 2 of the cached reproduction run (shared with ``gradconflict reproduce``); returns the PNG path."""
    reproduce(config, out, progress=progress, only=[NAME])
    print("weights: the raw final weights of the reproduction run (its transfer stage fine-tunes from a point of "
          "the optimiser's trajectory)")
    primary, run = next(iter(config.transfer_runs().items()))
    cached = out / "runs" / f"reproduce-{config.name}" / "seed0" / f"transfer-{primary}.csv"  # model 0's transfer stage
    if cached.is_file():
        bins = TimestepBins.uniform(config.train.T, config.transfer_bins)
        print_result(result_from_frame(pd.read_csv(cached), bins, TransferConfig(**run)))
    return config.figures_dir(out) / f"{NAME}.png"


def build_parser() -> argparse.ArgumentParser:
    p = figure_parser(__doc__)
    p.add_argument("--checkpoint", default=None,
                   help="training run directory, its weights file, or a model spec (default: the reproduction run of "
                        "--preset, trained here or reused from DIR/runs/)")
    p.add_argument("--data", default=None,
                   help="data to fine-tune and evaluate on, with --checkpoint only (default: the data of the "
                        "checkpoint's training run; mnist when unknown)")
    p.add_argument("--weights", choices=["ema", "raw"], default=None,
                   help="with --checkpoint: the run's EMA weights (default) or its raw final weights")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parse_figure_args(parser, argv)
    config = preset(args.preset, device=args.device)
    if args.weights is not None and args.checkpoint is None:
        parser.error("--weights applies to --checkpoint only: the reproduction run's transfer stage fine-tunes from "
                     "its raw final weights; pass --checkpoint RUN, or drop --weights")
    if args.data is not None and args.checkpoint is None:
        parser.error(f"--data applies to --checkpoint only: without it the figure comes from the reproduction run "
                     f"of --preset {args.preset}, trained on {config.train.data}; pass --checkpoint RUN, or drop --data")
    out, progress = Path(args.out), not args.no_progress
    try:
        if args.checkpoint is not None:
            png = from_checkpoint(args.checkpoint, args.data, config, out, progress, args.weights)
        else:
            png = from_reproduction(config, out, progress)
    except (ValueError, FileNotFoundError) as err:
        fail(parser, err)
    print(f"wrote {png} and {png.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
