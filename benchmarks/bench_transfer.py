"""Batched (vmap over stacked parameters) vs sequential fine-tuning of K model copies, one per timestep bin.

    python benchmarks/bench_transfer.py                  # CPU: dit-tiny and unet-tiny, K = 10, 20 AdamW steps, batch 16
    python benchmarks/bench_transfer.py --device cuda    # the same on a GPU (goal: >= 10x)
    python benchmarks/bench_transfer.py --quick          # 5 steps
    GRADCONFLICT_STACKED_KERNELS=none python benchmarks/bench_transfer.py   # batched with vmap's own Linear /
                                                         # attention rules (default on CPU: transfer/kernels.py)
    GRADCONFLICT_STACKED_KERNELS=all python benchmarks/bench_transfer.py --device cuda   # kernels on a GPU too

Both paths fine-tune the same K copies on the same batches (each copy's own seeded stream); the table gives
the wall time of each (seconds, best of ``--repeats``), the ratio sequential / batched (runs interleaved), and the largest
parameter difference between the two results (float32 rounding only). Evaluation is not timed. On CUDA the
batched path replays a captured CUDA graph (``transfer/cudagraph.py``); the columns ``eager_s``,
``speedup_eager`` and ``graph_vs_eager_diff`` time the same batched step without graphs, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import pandas as pd
import torch

import gradconflict as gc
from gradconflict.data import load_dataset
from gradconflict.models import build_model
from gradconflict.transfer import BatchStream, TransferConfig, finetune_sequential, finetune_stacked
from gradconflict.transfer.cudagraph import cuda_graphs_enabled
from gradconflict.transfer.kernels import use_stacked_kernels
from gradconflict.transfer.stacked import sources_of


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(model_name: str, device: torch.device, K: int, steps: int, batch: int, repeats: int) -> dict:
    """Time both fine-tuning paths for one model; returns one table row."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device).eval()
    data = load_dataset("mnist", image_size=model.config.image_size, limit=1000).images.to(device)
    schedule = gc.NoiseSchedule.linear()
    bins = gc.TimestepBins.uniform(schedule.T, K)
    cfg = TransferConfig(steps=steps, lr=1e-4, batch_size=batch, progress=False)

    def streams() -> list[BatchStream]:
        return [BatchStream(s, 1000 + k, data, None, batch) for k, s in enumerate(sources_of(bins, include_all=False))]

    def eager(*args):  # the batched path without CUDA graphs (cudagraph.py), to show what replaying adds
        with _env("GRADCONFLICT_CUDA_GRAPHS", "0"):
            return finetune_stacked(*args)

    paths = [("sequential", finetune_sequential), ("batched", finetune_stacked)]
    if cuda_graphs_enabled(device, steps):
        paths.append(("batched_eager", eager))
    times = {name: float("inf") for name, _ in paths}
    results = {}
    warm = TransferConfig(steps=1, lr=1e-4, batch_size=batch, progress=False)
    for fn in (finetune_sequential, finetune_stacked):  # untimed: first-call costs (kernels, allocator) on neither side
        fn(model, streams()[:2], warm, schedule, model.config.prediction)
    for _ in range(repeats):  # interleaved, so that a load change on a shared machine hits every path
        for name, fn in paths:
            _sync(device)
            t0 = time.perf_counter()
            results[name] = fn(model, streams(), cfg, schedule, model.config.prediction)
            _sync(device)
            times[name] = min(times[name], time.perf_counter() - t0)
    seq, bat = results["sequential"].params, results["batched"].params
    diff = max(float((bat[n] - seq[n]).abs().max()) for n in bat)
    theta0 = dict(model.named_parameters())
    moved = max(float((seq[n] - theta0[n].detach().unsqueeze(0)).abs().max()) for n in seq)  # how far fine-tuning went
    row = {
        "model": model_name, "device": str(device), "copies": K, "steps": steps, "batch_per_copy": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "sequential_s": times["sequential"], "batched_s": times["batched"],
        "speedup": times["sequential"] / times["batched"], "max_param_diff": diff,
        "diff_over_movement": diff / moved if moved > 0 else float("nan"),  # << 1: same runs, not just close ones
    }
    if "batched_eager" in times:  # replays against the same step run eagerly (bit-level agreement expected)
        eager_diff = max(float((bat[n] - results["batched_eager"].params[n]).abs().max()) for n in bat)
        row.update(eager_s=times["batched_eager"], speedup_eager=times["sequential"] / times["batched_eager"],
                   graph_vs_eager_diff=eager_diff)
    return row


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", default="dit-tiny,unet-tiny")
    parser.add_argument("--copies", type=int, default=10, help="K copies (one per bin)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="samples per copy per step")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per path after an untimed warm-up (best kept)")
    parser.add_argument("--quick", action="store_true", help="5 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = 5 if args.quick else args.steps
    rows = [bench(m, device, args.copies, steps, args.batch, args.repeats) for m in args.models.split(",")]
    frame = pd.DataFrame(rows)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"stacked kernels: {'on' if use_stacked_kernels(device) else 'off'}, "
          f"CUDA graphs: {'on' if cuda_graphs_enabled(device, steps) else 'off'}"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(frame.to_string(index=False))


if __name__ == "__main__":
    main()
