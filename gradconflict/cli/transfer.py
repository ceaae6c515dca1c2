"""``gradconflict transfer``: the cross-bin fine-tuning transfer matrix of a model (paper Fig. 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._data_flags import add_model_data_flags
from ._records import model_record, report_record, write_record
from ._weights import record_legacy_weights, report_weights, weights_for_folder
from ._threads import add_threads_flag

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``transfer`` subcommand."""
    p = sub.add_parser(
        "transfer",
        help="cross-bin transfer matrix: fine-tune on one timestep bin, relative loss change of every bin",
        description="For each of K timestep bins, fine-tune a copy of the model on that bin only (all copies in "
        "one batched computation) and measure the relative loss reduction of every bin on a fixed evaluation "
        "set shared by all copies (common random numbers). Writes transfer.csv (tidy, per seed), "
        "transfer_matrix.csv (K x K mean), transfer_summary.csv and transfer.png into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_data_flags(p)
    p.add_argument("--data-limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--bins", type=int, default=10, help="number of timestep bins K")
    p.add_argument("--binning", choices=["uniform", "log_snr"], default="uniform", help="equal widths in t or in log-SNR")
    p.add_argument("--mode", choices=["finetune", "lookahead"], default="finetune",
                   help="finetune: --steps optimiser steps per bin; lookahead: one plain SGD step (TAG) plus the first-order Gram prediction")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per copy (finetune; default 50)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="fine-tuning optimiser (finetune mode)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per copy per step")
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay (AdamW)")
    p.add_argument("--grad-clip", type=float, default=None, help="per-copy global gradient-norm clip (default off)")
    p.add_argument("--eval-samples", type=int, default=64, help="evaluation samples per bin (fixed, shared by all copies)")
    p.add_argument("--seeds", type=int, default=1, help="repetitions (fresh batches and evaluation sets each)")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--no-all", action="store_true", help="skip the 'all bins' control copy")
    p.add_argument("--first-order", action="store_true", help="also compute the first-order prediction lr<g_i, g_j>/L_j")
    p.add_argument("--sequential", action="store_true", help="fine-tune the copies one after the other (no vmap)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_flag(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Compute the transfer matrix and write its files; prints how far each bin's positive transfer reaches."""
    from ..bins import TimestepBins
    from ..distributed import is_main, local_device
    from .._io import write_csv
    from ..adapters.conditioning import model_conditioning
    from ..spec import load_model, model_data
    from ..transfer import TransferConfig, plot_transfer, run_transfer
    from ..transfer.plot import describe_setup

    device = local_device(args.device)
    stamp = Path(args.out) / "transfer_resume.json"
    # a folder written before --weights existed: a run folder given as --model used its EMA weights, a training
    # checkpoint given as --checkpoint its raw ones; it resumes with those
    old = "ema" if args.checkpoint is None and Path(args.model).is_dir() else "raw"
    loaded = load_model(args.model, args.checkpoint, device=device, weights=weights_for_folder(stamp, (), args.weights, old),
                        seed=args.seed, verbose=is_main())
    if is_main():
        report_weights("transfer", loaded.weights, args.checkpoint or args.model)
        record_legacy_weights(stamp, (), loaded.weights, old)
    model, schedule = loaded.model, loaded.schedule
    model.eval()
    data, size = model_data(model, args.data, args.image_size, limit=args.data_limit, scale=args.scale)
    record = model_record(loaded, args.weights, data, args.data)
    if is_main():
        report_record("transfer", record)
    data.conditioning = model_conditioning(model, data, args.null_conditioning, args.null_length)
    bins = TimestepBins.uniform(schedule.T, args.bins) if args.binning == "uniform" else TimestepBins.log_snr_uniform(schedule, args.bins)
    steps = args.steps if args.steps is not None or args.mode == "lookahead" else 50
    cfg = TransferConfig(steps=steps, lr=args.lr, optimizer=args.optimizer if args.mode == "finetune" else "sgd",
                         eval_samples=args.eval_samples, seeds=args.seeds, seed=args.seed, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, grad_clip=args.grad_clip, include_all=not args.no_all,
                         mode=args.mode, batched=not args.sequential, first_order=args.first_order,
                         progress=not args.quiet)
    # each finished seed is kept in --out: an interrupted run continues with the next seed when rerun
    result = run_transfer(model, data, bins, cfg, schedule=schedule, prediction=loaded.prediction,
                          resume_dir=Path(args.out), identity_extra={
                              "weights": loaded.weights,
                              "_names": {"data": str(args.data), "model": f"{loaded.source}, {loaded.weights} weights"}})
    if not is_main():
        return 0
    out = Path(args.out)
    write_csv(result.frame, out / "transfer.csv")
    write_csv(result.matrix_frame(), out / "transfer_matrix.csv", index=True)
    write_csv(result.summary_frame(), out / "transfer_summary.csv")
    if result.first_order is not None:
        fo = result.matrix_frame().copy()
        fo.loc[:, :] = result.first_order
        write_csv(fo, out / "first_order_matrix.csv", index=True)
    write_record(out / "transfer_config.json", vars(args), record, model_source=loaded.source, data_name=data.name,
                 image_size=size)
    plot_transfer(result, out / "transfer.png", setup=describe_setup(result, loaded.source, data.name), csv=False)
    print(f"K = {bins.K} bins, {describe_setup(result)}; {'batched' if result.batched else 'sequential'}, {result.seconds:.1f} s")
    for line in result.reach_lines():
        print(line)
    if result.all_row is not None:
        print(f"all bins (control): mean relative loss reduction {float(result.all_row.mean()):+.4f}")
    print(f"wrote {out / 'transfer.csv'}, transfer_matrix.csv, transfer_summary.csv, transfer.png, "
          "transfer_config.json")
    return 0
