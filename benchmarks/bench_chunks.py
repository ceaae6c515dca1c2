"""``task_gram(..., task_chunks=M)``: peak memory and time of the pair-of-groups passes against one pass.

    python benchmarks/bench_chunks.py                          # CPU: dit-s, K = 10, n = 4, M in {1, 2, 5, 10}
    python benchmarks/bench_chunks.py --device cuda --K 100 --n 8 --chunks 1 4 10

Every row is measured in the same run as the M = 1 baseline on the same batch: seconds, peak extra memory
(GiB: the CUDA allocator's peak, or the process's resident-memory growth on the CPU, as in ``bench_gram.py``),
the ratios to M = 1, and the Gram's relative difference from M = 1 (float32 rounding only).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch

import gradconflict as gc
from bench_gram import timed
from gradconflict.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="dit-s")
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--n", type=int, default=4, help="samples per task")
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 5, 10])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    t, task = gc.TimestepBins.uniform(1000, args.K).sample(args.n, g)
    x0 = torch.randn(len(t), cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    kw = dict(schedule=gc.NoiseSchedule.linear(), noise=torch.randn(x0.shape, generator=g).to(device), K=args.K,
              prediction=cfg.prediction)
    gc.task_gram(model, x0, t.to(device), task, **kw)  # untimed: first-call costs and the self-check
    rows, base = [], None
    for m in args.chunks:
        seconds, gib, res = timed(lambda: gc.task_gram(model, x0, t.to(device), task, task_chunks=m, **kw), device, 1)
        base = base or (seconds, gib, res.gram)
        rows.append(dict(model=args.model, K=args.K, n=args.n, task_chunks=m, seconds=seconds, peak_GiB=gib,
                         time_x=seconds / base[0], memory_x=gib / base[1],
                         gram_diff=float((res.gram - base[2]).norm() / base[2].norm())))
    print(f"torch {torch.__version__}, device {device}, {args.threads} thread(s)")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
