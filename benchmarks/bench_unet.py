"""The Gram of real UNets (issue #19): UNet-S and the SD-1.5 UNet, each conv weight-gradient route, one table.

    python benchmarks/bench_unet.py --device cuda          # the issue's table, about 6-8 minutes on an H100
    python benchmarks/bench_unet.py --smoke                # the same rows at toy sizes on the CPU (seconds)

Rows, most important first, each measured against its own training step (forward + backward over the same batch,
bf16 autocast on CUDA; micro-batched with gradient accumulation when the batch does not fit) in this run:

1. unet-s, 32 x 32 x 4, K = 100, n = 8, per route (``grouped``: cuDNN's grouped weight gradient; ``channels_last``
   the same on channels-last inputs; ``unfold``: im2col + batched GEMM; ``taps``: one GEMM per kernel tap over
   (tasks x positions), ``gradconflict/engine/conv_weight.py``): ``fused_x``, peak memory against the step's, and
   ``err_fp32loop`` (the fused bf16-autocast Gram against the float32 per-task loop), ``engine_err`` (fused in
   float32 against that loop), ``loop_x`` (the per-task loop under the same autocast);
2. sd15 (``sd_unet.py``: 860M parameters, 77 x 768 text embeddings, one per sample), K = 100, n = 2 on 16 x 16
   latents (the whole batch in one pass), per route;
3. sd15, K = 1000, n = 1 on 8 x 8 latents (the fold at K = 1000 for 860M parameters; ``fold_err``: the default
   fold against the float32 fold, ``--fold-check``), with the fastest route of row 2;
4. sd15, K = 100, n = 2 on 64 x 64 latents (the issue's size): the activations of 200 samples do not fit one
   GPU, so the step accumulates micro-batches and the Gram runs ``task_chunks`` pair passes; skipped when the
   projected time exceeds what is left;
5. the third-party route, TorchJD's autogram (a per-sample Gramian, pooled into tasks), when importable (install it
   in the benchmark's own environment only), on rows 1 and 2.

SD rows' ``loop_x`` is extrapolated from the first ``--loop-tasks`` tasks (the float64 loop Gram of 860M parameters
does not fit). Every row stops at the total ``--budget-s``; a failing row (out of memory) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import gc as garbage
import math
import os
import sys
import time
from typing import Callable, Iterator

import pandas as pd
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gradconflict as gc  # noqa: E402
from bench_gram import _rel, _sync, timed  # noqa: E402
from gradconflict.engine import per_sample_losses  # noqa: E402
from gradconflict.engine.precision import tf32  # noqa: E402
from gradconflict.models import build_model  # noqa: E402
from sd_unet import build_sd_unet, parameters_m, text_embeddings  # noqa: E402

ROUTES = {
    "grouped": {},
    "channels_last": {"GRADCONFLICT_CONV_LAYOUT": "channels_last"},
    "unfold": {"GRADCONFLICT_CONV_WEIGHT": "unfold"},
    "taps": {"GRADCONFLICT_CONV_WEIGHT": "taps"},
}
SCHEDULE = gc.NoiseSchedule.linear()
START = time.perf_counter()


@contextlib.contextmanager
def route(name: str) -> Iterator[None]:
    """The environment switches of one conv route, restored afterwards."""
    keys = ("GRADCONFLICT_CONV_WEIGHT", "GRADCONFLICT_CONV_LAYOUT")
    old = {k: os.environ.pop(k, None) for k in keys}
    os.environ.update(ROUTES[name])
    try:
        yield
    finally:
        for k in keys:
            os.environ.pop(k, None)
            if old[k] is not None:
                os.environ[k] = old[k]


class Batch:
    """K tasks of n samples: timesteps in K uniform bins, data, noise and (SD) per-sample text embeddings."""

    def __init__(self, model: torch.nn.Module, K: int, n: int, side: int, device: torch.device, amp) -> None:
        g = torch.Generator().manual_seed(0)
        self.K, self.n, self.amp, self.device = K, n, amp, device
        t, self.task = gc.TimestepBins.uniform(SCHEDULE.T, K).sample(n, g)
        c = model.config.in_channels
        self.x0 = torch.randn(len(t), c, side, side, generator=g).to(device)
        self.noise = torch.randn(self.x0.shape, generator=g).to(device)
        self.t = t.to(device)
        text = isinstance(getattr(model, "unet", None), torch.nn.Module)
        self.kwargs = {"encoder_hidden_states": text_embeddings(model, len(t), g).to(device)} if text else {}

    def amp_ctx(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def rows(self, sel: torch.Tensor) -> tuple:
        return self.x0[sel], self.t[sel], self.noise[sel], {k: v[sel] for k, v in self.kwargs.items()}


def step_fn(model, b: Batch, micro: int) -> Callable[[], None]:
    """One training step's forward + backward over the batch, ``micro`` samples at a time (gradient accumulation)."""
    N = len(b.t)

    def step() -> None:
        with tf32(False), b.amp_ctx():
            for lo in range(0, N, micro):
                x0, t, noise, kw = b.rows(torch.arange(lo, min(N, lo + micro), device=b.device))
                l = per_sample_losses(model, x0, t, noise, SCHEDULE, model_kwargs=kw)
                (l.sum() / N).backward()
        model.zero_grad(set_to_none=True)

    return step


def fused_fn(model, b: Batch, chunks: int = 1, **kw) -> Callable[[], object]:
    return lambda: gc.task_gram(model, b.x0, b.t, b.task, schedule=SCHEDULE, noise=b.noise, K=b.K,
                                model_kwargs=b.kwargs, autocast_dtype=b.amp, task_chunks=chunks, **kw)


def loop_seconds(model, b: Batch, tasks: int) -> float:
    """Seconds of the per-task loop (one backward per task, same autocast) extrapolated from its first ``tasks``."""
    params = [p for p in model.parameters() if p.requires_grad]
    _sync(b.device)
    t0 = time.perf_counter()
    for k in range(min(tasks, b.K)):
        x0, t, noise, kw = b.rows(torch.nonzero(b.task == k).flatten().to(b.device))
        with tf32(False), b.amp_ctx():
            loss = per_sample_losses(model, x0, t, noise, SCHEDULE, model_kwargs=kw).mean()
        torch.autograd.grad(loss, params)
    _sync(b.device)
    return (time.perf_counter() - t0) * b.K / min(tasks, b.K)


def torchjd_gram(model, b: Batch) -> torch.Tensor:
    """The ecosystem route: TorchJD autogram's per-sample Gramian ``Gs`` (N x N) pooled into tasks,
    ``G = M^T Gs M`` with ``M[i, k] = 1 / n_k`` for sample i of task k."""
    from torchjd.autogram import Engine

    engine = Engine(model, batch_dim=0)
    try:
        with tf32(False), b.amp_ctx():
            losses = per_sample_losses(model, b.x0, b.t, b.noise, SCHEDULE, model_kwargs=b.kwargs)
        gs = engine.compute_gramian(losses).double()
    finally:
        del engine  # its hooks go with it
        garbage.collect()
    M = torch.nn.functional.one_hot(b.task, b.K).double()
    M = (M / M.sum(0)).to(gs.device)
    return (M.T @ gs @ M).cpu()


def fits(device: torch.device, model, b: Batch, probes: tuple[int, int] = (2, 6)) -> int:
    """Samples per pass that fit in 60% of the free GPU memory, from the peaks of two probe steps (the slope is the
    memory per sample; the intercept the fixed part, e.g. the parameters' .grad); the batch size on the CPU."""
    if device.type != "cuda":
        return len(b.t)
    garbage.collect()
    torch.cuda.empty_cache()
    lo, hi = probes
    peak_lo = timed(_probe_step(model, b, lo), device, 1)[1]
    peak_hi = timed(_probe_step(model, b, hi), device, 1)[1]
    per_sample = max((peak_hi - peak_lo) / (hi - lo), 1e-3)
    fixed = max(peak_lo - lo * per_sample, 0.0)
    free = torch.cuda.mem_get_info()[0] / 2**30
    return max(1, int((0.6 * free - fixed) / per_sample))


def _probe_step(model, b: Batch, probe: int) -> Callable[[], None]:
    def run() -> None:
        with tf32(False), b.amp_ctx():
            x0, t, noise, kw = b.rows(torch.arange(probe, device=b.device))
            per_sample_losses(model, x0, t, noise, SCHEDULE, model_kwargs=kw).sum().backward()
        model.zero_grad(set_to_none=True)
    return run


class Table:
    def __init__(self, budget: float) -> None:
        self.rows: list[dict] = []
        self.deadline = START + budget

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)


def guarded(table: Table, base: dict, fn: Callable[[], dict], need_s: float = 5.0) -> None:
    """One row: ``fn()``'s columns added to ``base``, or the error (out of memory, no time left) in ``note``."""
    if table.left() < need_s:
        table.add(dict(base, note=f"skipped: {table.left():.0f} s left of --budget-s"))
        return
    try:
        table.add(dict(base, **fn()))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        table.add(dict(base, note=f"{type(exc).__name__}: {exc}".splitlines()[0][:110]))
    finally:
        if torch.cuda.is_available():
            garbage.collect()
            torch.cuda.empty_cache()


def route_rows(table: Table, model, name: str, b: Batch, routes: list[str], args, *, reference: bool,
               micro: int | None = None, chunks: int = 1, fold_check: bool = False) -> None:
    """The step, the loop, then one row per route (fused time, memory, errors) for one model and batch."""
    dev, N = b.device, len(b.t)
    micro = micro or N
    base = dict(model=name, params_M=parameters_m(model), side=b.x0.shape[-1], K=b.K, n=b.n)
    if table.left() < 20:
        table.add(dict(base, note=f"skipped: {table.left():.0f} s left of --budget-s"))
        return
    shared: dict = {}
    try:
        step = step_fn(model, b, micro)
        step()  # untimed warm-up
        shared["step_s"], shared["step_GiB"], _ = timed(step, dev, args.repeats)
        if micro < N:
            shared["micro"] = micro
        if chunks > 1:
            shared["task_chunks"] = chunks
        ref = None
        if chunks > 1:  # the pair passes process (chunks - 1) N samples: project before spending the time
            projected = shared["step_s"] * (chunks - 1) * 1.5 * (1 + args.repeats)
            if projected > table.left() - 10:
                table.add(dict(base, **shared, note=f"skipped: task_chunks={chunks} passes projected {projected:.0f} s, "
                                                    f"{table.left():.0f} s left"))
                return
        if reference:  # the per-task loop under the step's autocast (timed) and in float32 (the error reference)
            loop_s, _, _ = timed(lambda: gc.task_gram(model, b.x0, b.t, b.task, schedule=SCHEDULE, noise=b.noise,
                                                      K=b.K, method="loop", model_kwargs=b.kwargs,
                                                      autocast_dtype=b.amp), dev, 1)
            ref = gc.task_gram(model, b.x0, b.t, b.task, schedule=SCHEDULE, noise=b.noise, K=b.K, method="loop",
                               model_kwargs=b.kwargs).gram
            exact = gc.task_gram(model, b.x0, b.t, b.task, schedule=SCHEDULE, noise=b.noise, K=b.K,
                                 model_kwargs=b.kwargs, gram_precision="fp32").gram
            shared["engine_err"] = _rel(exact, ref)
        else:
            loop_s = loop_seconds(model, b, args.loop_tasks)
        shared["loop_x"] = loop_s / shared["step_s"]
    except Exception as exc:  # noqa: BLE001
        table.add(dict(base, note=f"step/loop: {type(exc).__name__}: {exc}".splitlines()[0][:110]))
        return
    best = (math.inf, routes[0])
    for r in routes:
        def one(r: str = r) -> dict:
            with route(r):
                fused = fused_fn(model, b, chunks)
                fused()  # first call: kernels, the self-check
                s, mem, out = timed(fused, dev, args.repeats)
                row = dict(shared, fused_x=s / shared["step_s"], fused_GiB=mem, mem_x=mem / shared["step_GiB"])
                if ref is not None:
                    row["err_fp32loop"] = _rel(out.gram, ref)
                if fold_check and table.left() > 60:
                    row["fold_err"] = _rel(out.gram, fused_fn(model, b, chunks, gram_precision="fp32")().gram)
            nonlocal best
            best = min(best, (row["fused_x"], r))
            return row
        guarded(table, dict(base, route=r), one, need_s=10)
    table.best_route = best[1]  # type: ignore[attr-defined]
    if args.torchjd and chunks == 1 and micro >= N:
        def jd() -> dict:
            jd_fn = lambda: torchjd_gram(model, b)  # noqa: E731
            jd_fn()
            s, mem, G = timed(jd_fn, dev, 1)
            row = dict(shared, fused_x=s / shared["step_s"], fused_GiB=mem, mem_x=mem / shared["step_GiB"])
            if ref is not None:
                row["err_fp32loop"] = _rel(G, ref)
            return row
        guarded(table, dict(base, route="torchjd-autogram"), jd, need_s=20)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: unet-tiny, sd15 at width 0.1")
    p.add_argument("--routes", nargs="+", default=list(ROUTES), choices=list(ROUTES))
    p.add_argument("--rows", nargs="+", default=["unet", "sd16", "sd1000", "sd64"],
                   choices=["unet", "sd16", "sd1000", "sd64"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loop-tasks", type=int, default=5, help="SD rows: tasks timed to extrapolate the loop")
    p.add_argument("--budget-s", type=float, default=float(os.environ.get("GRADCONFLICT_UNET_BUDGET_S", "450")))
    p.add_argument("--torchjd", action=argparse.BooleanOptionalAction, default=True,
                   help="also time TorchJD's autogram where it is importable")
    p.add_argument("--csv", default=None)
    args = p.parse_args()
    if args.smoke:
        args.device, args.repeats = "cpu", 1
    dev = torch.device(args.device)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    if args.torchjd:
        try:
            import torchjd  # noqa: F401
        except ImportError:
            print("torchjd not importable: its rows are skipped (pip install torchjd in this environment)", flush=True)
            args.torchjd = False
    table = Table(args.budget_s)
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}", flush=True)
    if "unet" in args.rows:
        name = "unet-tiny" if args.smoke else "unet-s"
        model = build_model(name).to(dev)
        _perturb(model)
        K, n = (3, 2) if args.smoke else (100, 8)
        b = Batch(model, K, n, model.config.image_size, dev, amp)
        route_rows(table, model, name, b, args.routes, args, reference=True)
        del model, b
    sd_rows = [r for r in ("sd16", "sd1000", "sd64") if r in args.rows]
    if sd_rows:
        scale, tokens = (0.1, 5) if args.smoke else (1.0, 77)
        with torch.device(dev):  # random initialisation on the device itself (860M parameters)
            model = build_sd_unet(scale, text_tokens=tokens)
        _perturb(model)
        name = f"sd15x{scale:g}"
        best = args.routes
        sizes = {"sd16": (3, 2, 8) if args.smoke else (100, 2, 16), "sd1000": (4, 1, 8) if args.smoke else (1000, 1, 8),
                 "sd64": (3, 2, 16) if args.smoke else (100, 2, 64)}
        for key in sd_rows:
            b = Batch(model, *sizes[key], dev, amp)
            micro = fits(dev, model, b) if table.left() > 30 else len(b.t)  # samples per pass that fit the card
            chunks = 1 if micro >= len(b.t) else min(b.K, math.ceil(2 * len(b.t) / micro))
            print(f"{key}: about {micro} samples per pass fit ({len(b.t)} in the batch): task_chunks={chunks}", flush=True)
            if args.smoke and key == "sd64":
                micro, chunks = 2, 2  # the micro-batched step and the pair passes, at toy size
            route_rows(table, model, name, b, args.routes if key == "sd16" else best, args, reference=False,
                       micro=min(micro, len(b.t)), chunks=chunks, fold_check=key == "sd1000")
            if key == "sd16":
                best = [getattr(table, "best_route", args.routes[0])]  # the later SD rows time the fastest route
    out = pd.DataFrame(table.rows)
    print("\nratios are seconds (or peak GiB) / one training step on the same batch, same run; "
          f"total {time.perf_counter() - START:.0f} s")
    print(out.to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    if args.csv:
        out.to_csv(args.csv, index=False)


def _perturb(model: torch.nn.Module) -> None:
    """Zero-initialised output layers give exactly-zero gradients at init: perturb so every layer counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)


if __name__ == "__main__":
    main()
