"""``gradconflict gram``: the per-task gradient Gram and cosine matrix of a model, written to a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._data_flags import add_model_data_flags
from ._records import describe_schedule, model_record, report_record, write_record  # noqa: F401 - describe_schedule: public here
from ._weights import report_weights
from ._threads import add_threads_flag

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gram",
        help="Gram and cosine matrix of per-bin task gradients of a model",
        description="Bin the timesteps into K tasks, draw N samples per task from the data, and compute the "
        "exact Gram matrix of the task gradients with one combined backward pass. Writes gram.csv, "
        "cosine.csv, losses.csv, pairs.csv and cosine.png into --out.",
    )
    add_model_data_flags(p)
    p.add_argument("--bins", type=int, default=10, help="number of timestep bins K (default 10)")
    p.add_argument("--binning", choices=["uniform", "log_snr"], default="uniform", help="equal widths in t or in log-SNR")
    p.add_argument("--bins-file", default=None,
                   help="bins from a CSV (t_low, t_high per row, as `gradconflict bins` writes DIR/bins.csv) instead "
                        "of --bins/--binning; they must cover the model's 0..T-1")
    p.add_argument("--per-task", type=int, default=8, help="samples per task (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch (x0, t, noise), and of torch while your "
                   "build function runs (its initial weights); the same on every device")
    p.add_argument("--method", choices=["fused", "loop"], default="fused", help="fused (default) or the per-task loop reference")
    p.add_argument("--loss-space", choices=["x0", "eps", "v"], default="x0", help="units of each task's loss (default x0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                   help="run the model under torch.autocast in this dtype (e.g. bf16 on a GPU; default none)")
    p.add_argument("--gram-precision", choices=["auto", "fp32", "tf32", "bf16"], default="auto",
                   help="fold precision of the fused Gram: fp32 (~1e-7 relative error), tf32 / bf16 (~1e-5, "
                        "faster on a GPU with many bins); auto (default): tf32 on a GPU, fp32 on the CPU")
    p.add_argument("--task-chunks", type=int, default=1,
                   help="when the batch does not fit in memory: split the bins into this many groups and run one pass "
                        "per pair of groups (about 2/M of the batch each, the same Gram; default 1: one pass)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    add_threads_flag(p)
    p.set_defaults(handler=run)


def bins_from_file(args: argparse.Namespace, T: int):
    """The ``TimestepBins`` of ``--bins-file`` (checked to cover 0..T-1); refuses a --binning other than uniform or
    a --bins other than the default 10 that disagrees with the file, and records the file's K in ``args.bins``."""
    from ..bins import TimestepBins

    if args.binning != "uniform":
        raise ValueError(f"--bins-file and --binning {args.binning} both choose the bins; give one of them")
    bins = TimestepBins.from_csv(args.bins_file, T)
    if args.bins not in (10, bins.K):
        raise ValueError(f"--bins {args.bins} but --bins-file {args.bins_file} holds {bins.K} bins; drop --bins")
    args.bins = bins.K
    return bins


PROGRESS_DELAY_S = 1.0  # the progress line appears once a run takes longer than this (quick errors stay one line)


def run(args: argparse.Namespace) -> int:
    """Compute and write the Gram (see the command's description), with a progress line on stderr."""
    from tqdm.auto import tqdm

    from ..distributed import is_main

    bar = tqdm(total=4, desc="gram", disable=args.no_progress or not is_main(), dynamic_ncols=True, leave=False,
               delay=PROGRESS_DELAY_S)
    try:
        return _run(args, bar)
    finally:
        bar.close()


def _stage(bar, text: str) -> None:
    """Show what the command does now on the progress line (once the line is due: after ``PROGRESS_DELAY_S``)."""
    import time

    bar.set_postfix_str(text, refresh=False)
    if not bar.disable and time.time() - bar.start_t >= PROGRESS_DELAY_S:
        bar.refresh()


def _run(args: argparse.Namespace, bar) -> int:
    import torch

    from .. import conflict
    from ..bins import TimestepBins
    from ..engine import sample_task_batch, task_gram
    from ..plots import matrix_heatmap, write_csv
    from ..track import file_source
    from ..models import MODEL_NAMES
    from ..spec import BUILTIN_INIT_SEED, conditional, forward_hint, load_model, model_data, resolve_checkpoint

    from ..adapters.conditioning import model_conditioning
    from ..distributed import is_main, local_device, shard

    device = local_device(args.device)
    _stage(bar, "loading the model")
    loaded = load_model(args.model, args.checkpoint, device=device, verbose=is_main(), weights=args.weights,
                        seed=args.seed)
    if args.checkpoint is None and str(args.model) in MODEL_NAMES and is_main():
        print(f"gradconflict gram: note: no --checkpoint, so this is the Gram of an untrained {args.model} (random "
              f"init, seed {BUILTIN_INIT_SEED}); for trained weights pass --checkpoint FILE (.pt / .safetensors) or "
              "--model RUN_FOLDER", file=sys.stderr)
    elif is_main() and loaded.weights == "init":
        print(f"gradconflict gram: note: no --checkpoint: {args.model} was called with torch seeded from --seed "
              f"{args.seed}, so its initial weights (and this Gram) are the same in every run with this seed",
              file=sys.stderr)
    if is_main():
        report_weights("gram", loaded.weights, args.checkpoint or args.model)
    model, schedule = loaded.model, loaded.schedule
    bar.update(1)
    _stage(bar, "loading the data")
    data, size = model_data(model, args.data, args.image_size, scale=args.scale)
    bar.update(1)
    record = model_record(loaded, args.weights, data, args.data)
    if is_main():
        bar.clear()
        report_record("gram", record)
    if args.bins_file is not None:
        bins = bins_from_file(args, schedule.T)
    else:
        bins = TimestepBins.uniform(schedule.T, args.bins) if args.binning == "uniform" else TimestepBins.log_snr_uniform(schedule, args.bins)
    batch = sample_task_batch(data.images, bins, args.per_task, args.seed, labels=data.labels,
                              conditional=conditional(model, data.labels, verbose=is_main()),
                              conditioning=model_conditioning(model, data, args.null_conditioning, args.null_length))
    # under torchrun every rank draws the same batch and keeps its share; the Gram is over the union
    dtype = next(model.parameters()).dtype
    batch = batch.shard(shard(batch.t.numel())).to(device, dtype if dtype in (torch.float32, torch.float64) else None)
    _stage(bar, f"Gram of {bins.K} bins x {args.per_task} samples ({args.method})")
    with forward_hint(model, size, args.image_size):
        res = task_gram(model, batch.x0, batch.t, bins, schedule=schedule, prediction=loaded.prediction,
                        loss_space=args.loss_space, noise=batch.noise, model_kwargs=batch.model_kwargs, method=args.method,
                        autocast_dtype={"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.autocast],
                        gram_precision=args.gram_precision, task_chunks=args.task_chunks)
    bar.update(1)
    if not is_main():
        return 0
    _stage(bar, "writing")
    out = Path(args.out)
    write_csv(res.gram_frame(), out / "gram.csv", index=True)
    write_csv(res.cosine_frame(), out / "cosine.csv", index=True)
    write_csv(res.losses_frame(), out / "losses.csv")
    write_csv(conflict.pairwise_frame(res.gram.numpy(), bins, schedule), out / "pairs.csv")
    # a rerun rewrites the folder: what these files were computed from is saved beside them
    write_record(out / "gram_config.json", vars(args), record, model_source=loaded.source, data_name=data.name,
                 image_size=size, checkpoint_content=None if args.checkpoint is None else
                 file_source(resolve_checkpoint(args.checkpoint)).split(" ")[0])
    matrix_heatmap(
        res.cosine_frame(), out / "cosine.png",
        title=f"Cosine between per-bin task gradients\n{loaded.source}, {data.name}, {args.per_task} samples/bin",
        xlabel="timestep bin (t range)", ylabel="timestep bin (t range)", colorbar="cosine similarity (1)",
        vmin=-1.0, vmax=1.0,
    )
    bar.update(1)
    bar.close()  # before the summary lines
    s = conflict.summary(res.gram.numpy())
    print(f"K = {bins.K} bins x {args.per_task} samples, method {res.method}, {res.seconds:.3f} s")
    if bins.K > 1:
        print(f"conflicting pairs: {s['conflict_share']:.1%}; mean off-diagonal cosine {s['mean_cosine']:.3f}, "
              f"min {s['min_cosine']:.3f}; gradient norm ratio max/min {s['norm_ratio_max_min']:.3g}")
    else:
        print("one bin: no pairs to compare (use --bins 2 or more for conflicts)")
    print(f"wrote {out / 'gram.csv'}, cosine.csv, losses.csv, pairs.csv, cosine.png, gram_config.json")
    return 0
