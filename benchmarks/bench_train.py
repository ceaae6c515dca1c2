"""Training throughput of the built-in models: optimiser steps per second (forward, backward, AdamW).

Usage: ``python benchmarks/bench_train.py [--steps 20] [--batch-size 64] [--models dit-tiny unet-tiny] [--threads 1 2]``.
On the CPU the tiny models are timed; with CUDA the S-sizes are timed too (bf16 autocast). Inputs are
random images at each model's size; the loss is the Min-SNR-5 eps loss of ``gradconflict.train``.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import nullcontext

import pandas as pd
import torch

from gradconflict.models import build_model, model_summary
from gradconflict.schedule import NoiseSchedule
from gradconflict.train import diffusion_loss
from gradconflict.weighting import by_name


def bench(name: str, device: torch.device, steps: int, batch_size: int, warmup: int = 3) -> dict:
    """Time ``steps`` optimiser steps after ``warmup`` untimed ones; returns one table row."""
    torch.manual_seed(0)
    model = build_model(name).to(device)
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule, strategy = NoiseSchedule.linear(), by_name("min_snr:5")
    x0 = torch.rand(batch_size, cfg.in_channels, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step() -> None:
        t = torch.randint(0, 1000, (batch_size,), device=device)
        with amp:
            loss, _ = diffusion_loss(model, x0, t, schedule, "eps", strategy, torch.randn_like(x0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "model": name, "device": str(device), "params": model_summary(model)["parameters"],
        "input": f"{cfg.image_size}x{cfg.image_size}x{cfg.in_channels}", "batch": batch_size,
        "steps/s": steps / seconds, "images/s": steps * batch_size / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--threads", type=int, nargs="*", default=None,
                        help="CPU intra-op thread counts to compare (default: torch's current setting)")
    args = parser.parse_args()
    rows = []
    default_threads = torch.get_num_threads()
    for threads in args.threads or [default_threads]:
        torch.set_num_threads(threads)
        for name in args.models or ["dit-tiny", "unet-tiny"]:
            rows.append({**bench(name, torch.device("cpu"), args.steps, args.batch_size), "threads": threads})
    torch.set_num_threads(default_threads)
    if torch.cuda.is_available():
        for name in args.models or ["dit-tiny", "unet-tiny", "dit-s", "unet-s"]:
            rows.append({**bench(name, torch.device("cuda"), args.steps, args.batch_size), "threads": default_threads})
    table = pd.DataFrame(rows)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
