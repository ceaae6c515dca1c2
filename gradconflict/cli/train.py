"""``gradconflict train``: train a built-in diffusion model or your own (``file.py:function``, ``diffusers:PATH``);
resumes when the output directory holds the same run."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    """Register the ``train`` subcommand."""
    from ..models import MODEL_NAMES
    from ..train.config import SCHEDULES, TrainConfig
    from ._data_flags import add_conditioning_flags, add_scale_flag

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help="train a diffusion model (writes checkpoint.pt, model.safetensors, losses.csv)",
        description="Train a built-in diffusion model or your own (--model file.py:function). Running again with a "
        "larger --steps on the same --out resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=d.data, help="mnist | digits | synthetic | path to .npy/.npz/image folder")
    p.add_argument("--model", default=d.model,
                   help=f"one of {', '.join(MODEL_NAMES)}, or your model: path/file.py:function (a function "
                        "returning an nn.Module, or (model, schedule, prediction); built with torch seeded by --seed, "
                        "called model(x_t, t[, y=labels], **conditioning), the data file's per-sample arrays such as "
                        "encoder_hidden_states by name, the rows of each batch's images), module:function, or "
                        "diffusers:PATH (a local folder, fine-tuned; e.g. a text-conditioned UNet2DConditionModel). "
                        "Its input must match --image-size and the data's channels; the run trains it with "
                        "--schedule, --T and --prediction. Built-in models take class labels only")
    p.add_argument("--weighting", default=d.weighting, help="loss weighting, e.g. constant, snr, max_snr:1, min_snr:5, or adaptive: pareto_online:10, "
                   "ugd_online:1, learned_uncertainty, pareto_fit:PATH.csv (gradconflict.adaptive)")
    p.add_argument("--prediction", default=d.prediction, choices=["eps", "x0", "v"], help="what the model predicts")
    p.add_argument("--schedule", default=d.schedule, choices=list(SCHEDULES), help="noise schedule")
    p.add_argument("--T", type=int, default=d.T, help="number of diffusion timesteps")
    p.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps (>= 1)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warm-up")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm clip, finite and > 0 (0 = off)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU intra-op threads (default: 1 on a machine with at most 4 cores, where the tiny models run "
                        "fastest with 1, else torch's default; torch's when OMP_NUM_THREADS is set). Bit-exact resume "
                        "on the CPU needs the same count in every segment")
    p.add_argument("--no-bf16", action="store_true", help="disable bfloat16 autocast on CUDA")
    p.add_argument("--image-size", type=int, default=d.image_size, help="pixels (height = width)")
    p.add_argument("--data-limit", type=int, default=None, help="use only the first N images")
    add_scale_flag(p)
    p.add_argument("--conditional", action="store_true", help="class-conditional model (needs labels)")
    add_conditioning_flags(p)
    p.add_argument("--model-overrides", default="{}", help='JSON dict of model config fields, e.g. \'{"depth": 4}\'')
    p.add_argument("--bins", type=int, default=d.bins, help="timestep bins for the per-bin loss log")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep the weights of every --checkpoint-every step as RUN/checkpoints/step{N}.safetensors "
                        "(raw + EMA); `gradconflict track --model RUN` tracks them all")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Build a TrainConfig from the arguments and train."""
    from ..train import TrainConfig, train
    from ._threads import default_threads

    try:
        overrides = json.loads(args.model_overrides)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-overrides is not valid JSON: {err}") from err
    if not isinstance(overrides, dict):
        raise ValueError("--model-overrides must be a JSON object such as '{\"depth\": 4}'")
    config = TrainConfig(
        data=args.data, model=args.model, weighting=args.weighting, prediction=args.prediction,
        schedule=args.schedule, T=args.T, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_clip=args.grad_clip,
        ema_decay=args.ema_decay, seed=args.seed, device=args.device, cpu_threads=args.threads if args.threads is not None else default_threads(), bf16=not args.no_bf16,
        image_size=args.image_size, data_limit=args.data_limit, scale=args.scale, conditional=args.conditional,
        model_overrides=overrides, bins=args.bins, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints, null_conditioning=args.null_conditioning, null_length=args.null_length,
    )
    from ..distributed import is_main, wait_for_all

    if not is_main():  # the trainer is single-process: under torchrun rank 0 trains, the others wait for it
        wait_for_all()
        return 0
    try:
        log = train(config, args.out, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"gradconflict train: interrupted; {_resume_hint(Path(args.out))}", file=sys.stderr)
        return 130
    wait_for_all()
    if len(log):
        print(_summary(log, config.log_every))
    kept = f", checkpoints/step*.safetensors (every {config.checkpoint_every} steps)" if config.keep_checkpoints else ""
    print(f"wrote {args.out}/model.safetensors, checkpoint.pt, log.csv, losses.csv{kept}")
    return 0


def _resume_hint(out: Path) -> str:
    """One sentence on how an interrupted run continues: from which checkpoint, with the same command."""
    from ..train.checkpoint import load_checkpoint

    try:
        step = int(load_checkpoint(out / "checkpoint.pt")["step"])
    except (FileNotFoundError, ValueError):
        return "no checkpoint was written yet, so running the same command again starts from step 0"
    return f"run the same command again to resume from the checkpoint of step {step} in {out}"


def _summary(log: Any, log_every: int) -> str:
    """The end-of-run line: mean loss of the last ``log_every`` steps, NaN/Inf included, not skipped; a
    run whose loss became non-finite is called diverged, with the first such step."""
    last = log.tail(min(len(log), log_every))
    mean = float(last["loss"].mean(skipna=False))
    line = f"step {int(log['step'].iloc[-1])}: loss {mean:.4f} (mean of the last {len(last)} steps)"
    bad = log[~log["loss"].map(math.isfinite)]
    if len(bad):
        line += (f"; DIVERGED: the loss is non-finite (first at step {int(bad['step'].iloc[0])}, {len(bad)} of "
                 f"{len(log)} steps), so the weights are unusable; train again in another --out with a lower --lr "
                 "or a --grad-clip")
    return line
