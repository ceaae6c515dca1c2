"""``gradconflict reproduce``: the whole analysis end to end on the embedded default (MNIST, tiny DiT)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="train, track the Pareto problem, transfer matrix, all figures and REPORT.md",
        description="Regenerate every figure of the analysis into OUT/figures and write OUT/figures/REPORT.md "
        "with a verdict on each claim C1-C3 over independently trained models (the replication unit). Stages are cached in OUT/runs/: an interrupted run resumes, a "
        "changed config reruns only what depends on it.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="one tiny DiT on 16x16 MNIST, about 6 minutes on 2 CPU cores (default); one model: "
                           "every verdict stays undecided; its figures go to OUT/figures/quick/")
    size.add_argument("--standard", dest="preset", action="store_const", const="standard",
                      help="the committed figures: 3 unet-tiny models on 16x16 MNIST, transfer with AdamW and SGD in "
                           "the training loss, C3's binning controls (about 45 minutes on 2 CPU cores, at most 90)")
    size.add_argument("--gpu", dest="preset", action="store_const", const="gpu",
                      help="the standard analysis (3 unet-tiny models) sized for one GPU, about 8 minutes on an H100 "
                           "(implies --device cuda)")
    size.add_argument("--full", dest="preset", action="store_const", const="full", help="DiT-S/2-like at 32x32, for a GPU")
    size.add_argument("--toy", dest="preset", action="store_const", const="toy", help="seconds; a smoke test")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=".", help="folder that receives figures/ and runs/ (default: here)")
    p.add_argument("--only", nargs="+", default=None, metavar="FIGURE",
                   help="regenerate only these figures (fig2_transfer fig3_ugd_weights fig4_pareto_objective "
                        "lambda_sweep conflict_vs_distance cosine_final samples) and the stages they need")
    p.add_argument("--bins-file", default=None, metavar="BINS.csv",
                   help="redo the analysis (tracking Grams, transfer, C1-C3, Figs. 2-4, the lam path, held-out check) "
                        "under these bins (`gradconflict bins ... --out B` writes B/bins.csv) on the same trained models, "
                        "without retraining: figures into OUT/figures/clustered/, and a comparison with the uniform "
                        "bins in OUT/figures/REPORT.md and OUT/figures/clustered_vs_uniform.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for every stage (default: the preset's, 1 on the CPU presets, which is "
                        "fastest for their tiny models; torch's default for --gpu and --full)")
    p.set_defaults(handler=run, preset="quick")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from ..reproduce import preset, reproduce

    config = preset(args.preset, device=args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: use 1 or more")
        config = dataclasses.replace(config, cpu_threads=args.threads)
    if args.bins_file is not None:
        from ..clustering import read_bins_csv

        edges, T = read_bins_csv(args.bins_file)
        if T != config.train.T:
            raise ValueError(f"--bins-file {args.bins_file} covers T = {T} timesteps (0..{T - 1}) but the {args.preset} "
                             f"preset's schedule has T = {config.train.T}; make the bins from this run's model "
                             f"(gradconflict bins --model {Path(args.out) / 'runs' / f'reproduce-{config.name}' / 'seed0' / 'track' / 'run'} ...)")
        config = dataclasses.replace(config, bins_edges=tuple(int(e) for e in edges))
    reproduce(config, args.out, progress=not args.no_progress, only=args.only)
    figures = config.figures_dir(args.out) / ("clustered" if args.bins_file is not None else "")
    report = "" if args.only is not None else f"; the report: {figures / 'REPORT.md'}"
    from ._records import config_record, report_record

    train = config.train  # its models: tracked, fine-tuned and their Grams with raw weights; sampled with EMA
    report_record("reproduce", config_record(train.schedule, train.T, train.prediction, "raw (track, transfer, "
                                             "Grams) and ema (samples.png, held-out check)", train.data), weights=True)
    print(f"wrote the figures to {figures}{report} (cached stages in {Path(args.out) / 'runs'})")
    return 0
