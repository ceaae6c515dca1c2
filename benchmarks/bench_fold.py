"""The fold ``G = J J^T`` alone: one full product against ``symmetric_product``'s blocks, at each precision.

    python benchmarks/bench_fold.py                       # CPU: K in {100, 1000}, 200k columns, one thread
    python benchmarks/bench_fold.py --device cuda --columns 2000000

For each K and fold precision (``engine/precision.py``), the seconds of the plain product (what the fold did
before the blocks), of the blocked product at every K (the engine blocks only from ``SYMMETRIC_MIN_K`` = 256
rows), their ratio
(blocked / plain: below 1 is a gain), and each one's relative error against float64. Best of ``--repeats``,
both measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from gradconflict.engine import precision


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # untimed warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--K", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--columns", type=int, default=200_000, help="coordinates of one layer's block of J")
    p.add_argument("--precisions", nargs="+", default=list(precision.GRAM_PRECISIONS), choices=precision.GRAM_PRECISIONS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="row blocks of the symmetric product to time (default: the engine's for the device, "
                        f"{precision.SYMMETRIC_BLOCKS} on the CPU, {precision.SYMMETRIC_BLOCKS_CUDA} on CUDA)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for K in args.K:
        J = torch.randn(K, args.columns, generator=torch.Generator().manual_seed(0)).to(device)
        ref = (J.double() @ J.double().T).cpu()
        err = lambda g: float((g.cpu() - ref).norm() / ref.norm())  # noqa: E731
        for prec in args.precisions:
            saved = (precision.SYMMETRIC_MIN_K, precision.SYMMETRIC_BLOCKS, precision.SYMMETRIC_BLOCKS_CUDA)
            try:
                precision.SYMMETRIC_MIN_K = 1 << 62  # the plain product
                plain_s, plain = _timed(lambda: precision.layer_gram(J, prec), device, args.repeats)
                precision.SYMMETRIC_MIN_K = 1  # blocked at every K
                for blocks in args.blocks or [saved[2][prec] if device.type == "cuda" else saved[1]]:
                    precision.SYMMETRIC_BLOCKS = blocks
                    precision.SYMMETRIC_BLOCKS_CUDA = dict.fromkeys(saved[2], blocks)
                    block_s, blocked = _timed(lambda: precision.layer_gram(J, prec), device, args.repeats)
                    rows.append(dict(K=K, columns=args.columns, precision=prec, blocks=blocks, plain_s=plain_s,
                                     blocked_s=block_s, ratio=block_s / plain_s, plain_err=err(plain),
                                     blocked_err=err(blocked)))
            finally:
                precision.SYMMETRIC_MIN_K, precision.SYMMETRIC_BLOCKS, precision.SYMMETRIC_BLOCKS_CUDA = saved
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {args.threads} thread(s)"))
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
