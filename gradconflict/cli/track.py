"""``gradconflict track``: the Pareto analysis over a list of existing checkpoints of any model, no training."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .._io import write_json
from ..track.config import TrackConfig
from ._data_flags import add_conditioning_flags, add_scale_flag
from ._records import model_record, report_record
from ._weights import add_weights_flag, record_legacy_weights, report_weights, weights_for_folder
from ._threads import add_threads_flag

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "track",
        help="Pareto weights and strategy scores over a list of checkpoints of your model",
        description="For every checkpoint: draw R batches of N samples per timestep bin, compute the exact "
        "Gram of the per-bin task gradients, solve the regularized Pareto problem with every solver and score "
        "the fixed weighting strategies against it. Writes tidy CSVs, the Grams and Figs. 3 and 4 into --out; "
        "an interrupted run resumes (checkpoints already done are skipped).",
    )
    p.add_argument("--model", required=True, help="built-in name, training run folder, or path/file.py:function")
    p.add_argument("--checkpoints", nargs="+", default=None,
                   help="state dicts (.pt / .safetensors, or training run folders: their weights), in training order "
                        "(default with --model RUN: every RUN/checkpoints/step*.safetensors that train "
                        "--keep-checkpoints wrote, and RUN/model.safetensors, at the steps they record)")
    add_weights_flag(p)
    p.add_argument("--steps", nargs="+", type=int, default=None, help="training step of each checkpoint (default 0, 1, 2, ...)")
    p.add_argument("--data", default="mnist", help="dataset name or path")
    p.add_argument("--image-size", type=int, default=None, help="resize images (default: the model's)")
    add_scale_flag(p)
    add_conditioning_flags(p)
    p.add_argument("--bins", type=int, default=10, help="timestep bins K")
    p.add_argument("--bins-file", default=None,
                   help="bins from a CSV (t_low, t_high per row, as `gradconflict bins` writes DIR/bins.csv) instead "
                        "of --bins; they must cover the model's 0..T-1")
    p.add_argument("--per-task", type=int, default=8, help="samples per bin per batch")
    p.add_argument("--resamples", type=int, default=3, help="independent batches per checkpoint")
    p.add_argument("--lam", type=float, default=0.1, help="regularizer relative to trace(G)/K (default 0.1)")
    p.add_argument("--strategies", nargs="+", default=list(TrackConfig.strategies),
                   help="weighting specs to score; replaces the default list (%(default)s), e.g. --strategies "
                        "constant snr min_snr:5 p2:1,1 (your own function of SNR: the Python API, track_models("
                        "..., extra_strategies=[f]))")
    p.add_argument("--ugd-steps", type=int, default=TrackConfig.ugd_steps,
                   help="Adam steps of UGD per Gram (default %(default)s: its accuracy; fewer leave it visibly "
                        "off the exact optimum)")
    p.add_argument("--ugd-lr", type=float, default=TrackConfig.ugd_lr, help="UGD's Adam learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="compute the Grams with the model under torch.autocast in this dtype (e.g. bf16 on a GPU)")
    p.add_argument("--out", required=True, help="output folder")
    add_threads_flag(p)
    p.set_defaults(handler=run)


def _upgrade_recorded_inputs(out: Path, legacy: dict, inputs: dict) -> None:
    """A folder tracked by an older gradconflict recorded its inputs as given (model spec and data path, not the
    data's content); when those match this run's exactly, record them the current way, so that the folder resumes
    as it did before (and is checked by content from now on)."""
    path = out / "track_config.json"
    if not path.is_file() or all(legacy[k] == inputs[k] for k in legacy):
        return
    recorded = json.loads(path.read_text())
    held = recorded.get("inputs")
    if isinstance(held, dict) and {k: held.get(k) for k in legacy} == legacy and set(held) - set(legacy) <= {"weights", "_names"}:
        write_json(path, {**recorded, "inputs": {**held, **{k: inputs[k] for k in legacy}}})
        print(f"note: {out} recorded its data by name (an older gradconflict); it is now recorded by content",
              file=sys.stderr)


def _run_image_size(run: Path):
    """The ``image_size`` a ``gradconflict train`` run of a user model spec trained at (None for a built-in model,
    whose config tells its size, or a folder that is no run)."""
    from ..train.config import is_builtin

    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or is_builtin(str(config.get("model", ""))) or "image_size" not in config:
        return None
    return int(config["image_size"])


def run(args: argparse.Namespace) -> int:
    from ..adapters.conditioning import model_conditioning
    from ..distributed import is_main, local_device
    from ..figures import fig3_ugd_weights, fig4_pareto_objective
    from ..spec import conditional, forward_hint, load_model, model_data, resolve_checkpoint, spec_identity
    from ..track import file_source, track_models
    from .._io import fingerprint

    if args.checkpoints is None:
        if not Path(args.model).is_dir():
            raise ValueError(f"--checkpoints is missing: pass the weights files to track, or a training run folder as "
                             f"--model (its kept checkpoints are then tracked); {args.model!r} is not one")
        from ..train.checkpoint import run_checkpoints

        if args.steps is not None:
            raise ValueError("--steps without --checkpoints: a run's checkpoints carry their steps; drop --steps")
        found = run_checkpoints(args.model)
        args.steps, args.checkpoints = [s for s, _ in found], [str(p) for _, p in found]
        if is_main():
            print(f"track: {len(found)} checkpoint(s) of {args.model} at steps {args.steps}", file=sys.stderr)
    steps = args.steps if args.steps is not None else list(range(len(args.checkpoints)))
    if len(steps) != len(args.checkpoints):
        raise ValueError(f"got {len(steps)} --steps for {len(args.checkpoints)} --checkpoints; give one step each")
    device = local_device(args.device)
    out = Path(args.out)
    stamp = out / "track_config.json"
    # a folder tracked before --weights existed used the raw weights of training checkpoints: it resumes with them
    weights = weights_for_folder(stamp, ("inputs",), args.weights, "raw")
    first = load_model(args.model, args.checkpoints[0], device=device, verbose=is_main(), weights=weights,
                       seed=args.seed)  # notes the run's config once
    if is_main():
        report_weights("track", first.weights, "each checkpoint")
    if args.image_size is None and (Path(args.model) / "config.json").is_file() and Path(args.model).is_dir():
        args.image_size = _run_image_size(Path(args.model))  # a run of your own model: the size it trained at
    data, size = model_data(first.model, args.data, args.image_size, scale=args.scale)
    weights = first.weights if first.weights in ("ema", "raw") else weights  # the same for every checkpoint
    record = model_record(first, args.weights, data, args.data)
    if is_main():
        report_record("track", record)

    def loader(path: str):
        return lambda: load_model(args.model, path, device=device, verbose=False, weights=weights, seed=args.seed).model

    edges = None
    if args.bins_file is not None:
        from ..bins import TimestepBins

        edges = tuple(TimestepBins.from_csv(args.bins_file, first.schedule.T).edges.tolist())
        if args.bins not in (10, len(edges) - 1):
            raise ValueError(f"--bins {args.bins} but --bins-file {args.bins_file} holds {len(edges) - 1} bins; drop --bins")
        args.bins = len(edges) - 1
    cfg = TrackConfig(bins=args.bins, edges=edges, per_task=args.per_task, resamples=args.resamples, lam=args.lam,
                      strategies=tuple(args.strategies), seed=args.seed, autocast=args.autocast,
                      ugd_steps=args.ugd_steps, ugd_lr=args.ugd_lr)
    # a rerun into --out skips steps it holds: record what they were computed from, so other inputs are refused
    # the data by content (a file rewritten in place, or another one of the same name, is other data) and a file
    # spec by its absolute path (the same file given relative or absolute is the same model)
    conditioning = model_conditioning(first.model, data, args.null_conditioning, args.null_length)
    content = [data.images, data.labels] + [conditioning[k].contiguous() for k in sorted(conditioning)]
    # _names: shown in a refusal, never compared (so a folder recorded without the schedule or dataset resumes);
    # the prediction and T are recorded at the top level, the weights in inputs.weights
    inputs = {"model": spec_identity(args.model), "data": fingerprint(content), "image_size": size,
              "weights": first.weights, "_names": {"data": record["data"], "schedule": record["schedule"],
                                                   "dataset": record["dataset"]}}
    if is_main():
        record_legacy_weights(stamp, ("inputs",), first.weights, "raw")
        _upgrade_recorded_inputs(out, {"model": str(args.model), "data": str(args.data), "image_size": size}, inputs)
    sources = {int(s): file_source(resolve_checkpoint(c)) for s, c in zip(steps, args.checkpoints)}
    with forward_hint(first.model, size, args.image_size):
        result = track_models([(s, loader(c)) for s, c in zip(steps, args.checkpoints)], data.images, first.schedule,
                              first.prediction, cfg, labels=data.labels,
                              conditional=conditional(first.model, data.labels, verbose=is_main()), out_dir=out,
                              device=device, inputs=inputs, sources=sources, conditioning=conditioning)
    if not is_main():
        return 0
    setup = (f"\n{first.source} on {data.name}; K = {args.bins}, {args.per_task} samples/bin, lam = {args.lam} x "
             f"trace(G)/K, UGD {args.ugd_steps} Adam steps")
    fig3_ugd_weights(result.weights, out / "fig3_ugd_weights", subtitle=setup)
    fig4_pareto_objective(result.objectives, out / "fig4_pareto_objective", subtitle=setup)
    summary = (result.objectives[result.objectives["kind"] == "strategy"].groupby("name")["ratio"].mean().sort_values())
    print("mean ratio to the Pareto optimum (1 = optimal):")
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {out}/track_objectives.csv, track_weights.csv, track_grams.npz, fig3_ugd_weights.png, fig4_pareto_objective.png")
    return 0
