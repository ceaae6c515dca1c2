"""Cost of online Pareto weighting: wall-clock of one training step with ``pareto_online`` (every 1 and every
10 steps) and ``ugd_online`` (every step) against a plain Min-SNR-5 step, same model, batch and run.

Usage: ``python benchmarks/bench_online.py [--rounds 5] [--batch-size 64] [--bins 10] [--per-task 2]
[--models dit-tiny unet-tiny] [--threads 2]``.

Each round times a block of 10 steps of every strategy in turn (interleaved, so a busy machine slows all of
them alike); a strategy's step time is the median over rounds of its block time / 10, and ``ratio`` is that
over the plain step's. An online update draws ``per_task`` timesteps per bin from the batch (``bins * per_task``
samples) and computes the fused x0-unit Gram, then solves the K x K problem. Goal (#17): ratio <= 1.15 at
every = 10 on 2 CPU cores for the tiny models.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd
import torch

from gradconflict.adaptive import by_name
from gradconflict.bins import TimestepBins
from gradconflict.models import build_model
from gradconflict.schedule import NoiseSchedule
from gradconflict.train import prediction_error

BLOCK = 10
SPECS = ("min_snr:5", "pareto_online:10", "pareto_online:1", "ugd_online:1")


def bench(name: str, rounds: int, batch_size: int, K: int, per_task: int) -> list[dict]:
    """Rows (model, strategy, seconds per step, ratio to the plain step)."""
    torch.manual_seed(0)
    model = build_model(name)
    cfg = model.config
    schedule = NoiseSchedule.linear()
    bins = TimestepBins.uniform(schedule.T, K)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    strategies = {spec: by_name(spec, bins=bins, schedule=schedule, **({} if spec == "min_snr:5" else {"per_task": per_task}))
                  for spec in SPECS}
    counter = {spec: 0 for spec in SPECS}

    def step(spec: str) -> None:
        strategy, i = strategies[spec], counter[spec]
        counter[spec] += 1
        strategy.step(model, x0, step=i)
        t = torch.randint(0, schedule.T, (batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        err = prediction_error(model, x0, t, schedule, cfg.prediction, noise)
        loss = strategy.loss(err, t, schedule=schedule, prediction=cfg.prediction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for spec in SPECS:  # warm-up: the first update also runs the engine's one-time self-check
        for _ in range(2):
            step(spec)
        counter[spec] = 0
    times: dict[str, list[float]] = {spec: [] for spec in SPECS}
    for _ in range(rounds):
        for spec in SPECS:
            start = time.perf_counter()
            for _ in range(BLOCK):
                step(spec)
            times[spec].append((time.perf_counter() - start) / BLOCK)
    plain = float(np.median(times["min_snr:5"]))
    return [{"model": name, "strategy": spec, "batch": batch_size, "K": K, "gram samples": K * per_task,
             "ms/step": 1e3 * float(np.median(times[spec])), "ratio": float(np.median(times[spec])) / plain}
            for spec in SPECS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--per-task", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=["dit-tiny", "unet-tiny"])
    parser.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (the goal is stated for 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in bench(name, args.rounds, args.batch_size, args.bins, args.per_task)]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {args.threads} threads")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
