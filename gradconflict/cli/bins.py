"""``gradconflict bins``: timestep bins that follow the conflict structure, clustered from a fine-grained Gram."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._data_flags import add_model_data_flags
from ._records import model_record, report_record, write_record
from ._weights import report_weights
from ._threads import add_threads_flag

__all__ = ["add_parser", "run", "boundary_stability"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bins",
        help="timestep bins clustered from a fine-grained Gram (tasks that follow the conflict structure)",
        description="Compute the Gram of M fine uniform timestep bins with the fused engine over several batches, "
        "average it, and split [0, T) into the K contiguous intervals that maximise the size-normalised "
        "within-interval affinity (exact dynamic programming; see gradconflict.clustering). Writes bins.csv (use "
        "it with --bins-file), fine_cosine.png/.csv with the boundaries drawn, boundary_stability.csv (how the "
        "boundaries move when each batch is clustered on its own) and bins_config.json into --out.",
    )
    add_model_data_flags(p)
    p.add_argument("--fine", type=int, default=100, help="number of fine uniform bins M (default 100)")
    p.add_argument("--bins", type=int, default=10, help="number of clustered bins K (default 10)")
    p.add_argument("--affinity", choices=["cosine", "gram"], default="cosine",
                   help="cluster the cosines (default) or the raw Gram (large gradients then dominate)")
    p.add_argument("--min-width", type=int, default=1, help="fewest fine bins per clustered bin (default 1)")
    p.add_argument("--batches", type=int, default=3, help="independent batches whose fine Grams are averaged (default 3)")
    p.add_argument("--per-task", type=int, default=2, help="samples per fine bin per batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of batch 0 (batch b uses seed + b)")
    p.add_argument("--loss-space", choices=["x0", "eps", "v"], default="x0", help="units of each task's loss (default x0)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", required=True, help="output folder")
    add_threads_flag(p)
    p.set_defaults(handler=run)


def boundary_stability(edges: np.ndarray, per_batch: np.ndarray) -> pd.DataFrame:
    """One row per interior boundary k = 1..K-1: its timestep on the averaged Gram (``t_boundary``, the first
    timestep of bin k) and, over the B per-batch clusterings (``per_batch``, B x (K + 1) edges), the mean, std
    (ddof 0), min and max of boundary k, the share of batches where it differs from ``t_boundary`` and the mean
    absolute shift (timesteps)."""
    inner = per_batch[:, 1:-1].astype(np.float64)
    ref = np.asarray(edges[1:-1], dtype=np.float64)
    return pd.DataFrame({
        "boundary": np.arange(1, len(edges) - 1),
        "t_boundary": np.asarray(edges[1:-1], dtype=np.int64),
        "mean": inner.mean(0), "std": inner.std(0), "min": inner.min(0), "max": inner.max(0),
        "share_moved": (inner != ref).mean(0), "mean_abs_shift": np.abs(inner - ref).mean(0),
    })


def _check(args: argparse.Namespace, T: int) -> None:
    if not 1 <= args.fine <= T:
        raise ValueError(f"--fine {args.fine}: the fine bins must number between 1 and T = {T} timesteps")
    if not 1 <= args.bins <= args.fine:
        raise ValueError(f"--bins {args.bins}: the clustered bins must number between 1 and --fine {args.fine}")
    if args.min_width < 1 or args.bins * args.min_width > args.fine:
        raise ValueError(f"--bins {args.bins} x --min-width {args.min_width} must be at most --fine {args.fine} "
                         "(and --min-width >= 1); lower one of them or raise --fine")
    if args.batches < 1 or args.per_task < 1:
        raise ValueError(f"--batches ({args.batches}) and --per-task ({args.per_task}) must be >= 1")


def _heatmap(cosine: np.ndarray, fine: Any, edges: np.ndarray, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    fig, ax = plt.subplots(figsize=(7.4, 6))
    lo, hi = fine.edges[0], fine.edges[-1]
    im = ax.imshow(cosine, cmap="RdBu_r", vmin=-1, vmax=1, extent=(lo, hi, hi, lo), interpolation="nearest")
    for e in edges[1:-1]:
        ax.axvline(e, color="k", lw=1.0)
        ax.axhline(e, color="k", lw=1.0)
    fig.colorbar(im, ax=ax, label="cosine similarity (1)")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("timestep t (fine bins)")
    ax.set_ylabel("timestep t (fine bins)")
    save_figure(fig, path)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from .. import TimestepBins
    from .._io import write_csv
    from ..clustering import affinity_matrix, cluster_intervals
    from ..engine import sample_task_batch, task_gram
    from ..models import MODEL_NAMES
    from ..adapters.conditioning import model_conditioning
    from ..spec import BUILTIN_INIT_SEED, conditional, forward_hint, load_model, model_data

    start = time.perf_counter()
    device = torch.device(args.device)
    loaded = load_model(args.model, args.checkpoint, device=device, verbose=True, weights=args.weights, seed=args.seed)
    if args.checkpoint is None and str(args.model) in MODEL_NAMES:
        print(f"gradconflict bins: note: no --checkpoint, so these are the bins of an untrained {args.model} (random "
              f"init, seed {BUILTIN_INIT_SEED}); for trained weights pass --checkpoint FILE or --model RUN_FOLDER",
              file=sys.stderr)
    report_weights("bins", loaded.weights, args.checkpoint or args.model)
    model, schedule = loaded.model, loaded.schedule
    _check(args, schedule.T)
    data, size = model_data(model, args.data, args.image_size, scale=args.scale)
    record = model_record(loaded, args.weights, data, args.data)
    report_record("bins", record)
    fine = TimestepBins.uniform(schedule.T, args.fine)
    cond = conditional(model, data.labels, verbose=True)
    conditioning = model_conditioning(model, data, args.null_conditioning, args.null_length)
    dtype = next(model.parameters()).dtype
    grams = []
    for b in tqdm(range(args.batches), desc=f"fine Grams ({args.fine} bins)", unit="batch"):
        batch = sample_task_batch(data.images, fine, args.per_task, args.seed + b, labels=data.labels, conditional=cond,
                                  conditioning=conditioning)
        batch = batch.to(device, dtype if dtype in (torch.float32, torch.float64) else None)
        with forward_hint(model, size, args.image_size):
            res = task_gram(model, batch.x0, batch.t, fine, schedule=schedule, prediction=loaded.prediction,
                            loss_space=args.loss_space, noise=batch.noise, model_kwargs=batch.model_kwargs)
        grams.append(res.gram.double().cpu().numpy())
    G = np.mean(grams, axis=0)
    cuts, F = cluster_intervals(affinity_matrix(G, args.affinity), args.bins, args.min_width)
    bins = TimestepBins(fine.edges[cuts], fine.T)
    per_batch = np.stack([fine.edges[cluster_intervals(affinity_matrix(g, args.affinity), args.bins,
                                                       args.min_width)[0]] for g in grams])
    cos_each = np.stack([affinity_matrix(g, "cosine") for g in grams])
    cosine = affinity_matrix(G, "cosine")
    off = ~np.eye(args.fine, dtype=bool)
    spread = float(cos_each.std(0)[off].mean()) if args.batches > 1 and args.fine > 1 else float("nan")

    out = Path(args.out)
    frame = bins.to_frame().rename(columns={"task": "bin"})[["bin", "t_low", "t_high", "width", "label"]]
    write_csv(frame, out / "bins.csv")
    write_csv(pd.DataFrame(cosine, index=fine.labels, columns=fine.labels), out / "fine_cosine.csv", index=True)
    write_csv(pd.DataFrame(cos_each.std(0), index=fine.labels, columns=fine.labels), out / "fine_cosine_std.csv",
              index=True)
    stability = boundary_stability(bins.edges, per_batch)
    write_csv(stability, out / "boundary_stability.csv")
    seconds = time.perf_counter() - start
    write_record(out / "bins_config.json", vars(args), record, model_source=loaded.source, data_name=data.name,
                 image_size=size, edges=bins.edges.tolist(), fine_edges=fine.edges.tolist(), association=F,
                 per_batch_edges=per_batch.tolist(), mean_cosine_std_across_batches=spread, seconds=seconds)
    _heatmap(cosine, fine, bins.edges, out / "fine_cosine.png",
             f"Cosine between {args.fine} fine task gradients (mean Gram of {args.batches} batches x "
             f"{args.per_task}/bin)\n{loaded.source}, {data.name}; lines: the {args.bins} clustered bins")
    print(f"clustered {args.fine} fine bins into K = {args.bins} ({args.affinity} affinity, association {F:.4g}); "
          f"edges: {bins.edges.tolist()}")
    print(f"spread over {args.batches} batches: mean std of a fine cosine {spread:.3f}; boundaries moved in "
          f"{stability['share_moved'].mean():.0%} of batch clusterings, by {stability['mean_abs_shift'].mean():.1f} "
          f"timesteps on average ({seconds:.1f} s)")
    print(f"wrote {out / 'bins.csv'}, fine_cosine.png, fine_cosine.csv, fine_cosine_std.csv, boundary_stability.csv, "
          "bins_config.json")
    return 0
