"""Per-task Gram: fused vs loop vs torch.func vmap, as ratios to one ordinary training step on the same batch.

    python benchmarks/bench_gram.py --quick            # CPU, tiny models, small K
    python benchmarks/bench_gram.py                    # K in {10, 100}, n in {1, 8}
    python benchmarks/bench_gram.py --device cuda --size s --bf16   # GPU sizes (DiT-S/2-like, UNet ~27M)

Every row is measured in the same run as its baseline (the training step: forward + backward over the same
K*n samples), because these machines are noisy. Errors are relative Frobenius errors against "loop" run on
the same model in float32 (autocast off): ``fused_err`` is the engine's own error (fused in float32),
``amp_err`` the fused Gram under ``--bf16`` autocast (what bf16 activations change), ``<p>_fold_err`` the
deviation of a reduced ``--gram-precision`` fold from the float32 fold on the same run.

Columns: ``fused_check_x`` runs the self-check on every call (``check=True``); ``fused_x`` is the default
(``check="once"``) after the model passed its check on an earlier call, which is what every call but the
first costs in a tracking run; ``fused_nocheck_x`` is ``check=False``. These three use the explicit float32 fold
(the ``"auto"`` default is the tf32 fold on a GPU: column ``fused_tf32_x``). Each row starts with an untimed training
step and fused call (first-call costs on neither side); the step, fused and its variants are best of
``--repeats``, loop and vmap one run each; everything timed runs with TF32 off (as the engine does, except the
tf32 fold and autocast's half-precision layers, see ``engine/precision.py``) and, with
``--bf16``, under the same autocast (the float32 loop is then only the error reference).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from typing import Callable

import pandas as pd
import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradconflict as gc
from gradconflict.engine import per_sample_losses
from gradconflict.engine.precision import tf32
from gradconflict.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _CpuPeak:
    """Peak resident memory growth of this process (Linux): the kernel's high-water mark ``VmHWM`` is reset
    through ``/proc/self/clear_refs`` and glibc is asked to return its cached free memory first
    (``malloc_trim``), so the growth counts what the measured call allocated. NaN where unsupported."""

    def __init__(self) -> None:
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            self._status("VmHWM")
            self.ok = os.access("/proc/self/clear_refs", os.W_OK)
        except (OSError, AttributeError, ValueError):
            self.ok = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise ValueError(key)

    def start(self) -> None:
        if self.ok:
            self._trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident size
            self._base = self._status("VmRSS")

    def gib(self) -> float:
        return (self._status("VmHWM") - self._base) / 2**30 if self.ok else float("nan")


_CPU_PEAK = _CpuPeak()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float, object]:
    """Best-of-``repeats`` seconds, peak extra memory (GiB: CUDA allocator peak, or the process's resident
    memory growth on the CPU) and the last result."""
    best, peak, out = float("inf"), float("nan"), None
    for _ in range(repeats):
        if device.type == "cuda":  # the caching allocator keeps its blocks (steady state); only the peak is reset
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _CPU_PEAK.start()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else _CPU_PEAK.gib()
    return best, peak, out


def vmap_gram(model, x0, t, task, K, noise, schedule, prediction, chunk: int) -> torch.Tensor:
    """Baseline: torch.func vmap over tasks of the gradient of the task-masked loss, then J J^T."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    counts = torch.bincount(task, minlength=K).to(x0.dtype)

    def loss_of(p, mask):
        def m(x_t, tt):
            return functional_call(model, p, (x_t, tt))

        losses = per_sample_losses(m, x0, t, noise, schedule, prediction=prediction)
        return (losses * mask).sum()

    g = vmap(grad(loss_of), in_dims=(None, 0), chunk_size=chunk)
    masks = (torch.nn.functional.one_hot(task, K).T.to(x0.dtype) / counts[:, None]).to(x0.device)
    # fused attention kernels fail under vmap's backward; the math backend works (measured on an H100; see benchmarks/results/README.md)
    with sdpa_kernel(SDPBackend.MATH):
        grads = g(params, masks)
    J = torch.cat([v.reshape(K, -1).float() for v in grads.values()], 1)
    return (J.double() @ J.double().T).cpu()


def _profile(fused: Callable[[], object], step: Callable[[], object], device: torch.device, top: int = 12) -> None:
    """Where the time goes: torch.profiler's operators sorted by device time (CPU time on the CPU), step then fused."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for title, fn in (("training step", step), ("fused", fused)):
        with profile(activities=activities) as prof:
            fn()
            _sync(device)
        print(f"-- profile: {title}", flush=True)
        for key in keys:  # the device-time key was renamed across torch versions
            try:
                print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48), flush=True)
                break
            except (AttributeError, KeyError, ValueError):
                continue


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _row(model, name: str, P: int, K: int, n: int, args: argparse.Namespace, device: torch.device, amp, schedule,
         phase: dict) -> dict:
    """One table row: the training step and every method on the same K * n samples (``phase["now"]``: the part
    running, reported if the row fails)."""
    cfg = model.config
    bins = gc.TimestepBins.uniform(schedule.T, K)
    g = torch.Generator().manual_seed(0)
    t, task = bins.sample(n, g)
    x0 = torch.randn(len(t), cfg.in_channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)
    t_d = t.to(device)

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

    def step():
        with tf32(False), amp_ctx():  # the engine's matmul precision (TF32 off), the same autocast
            l = per_sample_losses(model, x0, t_d, noise, schedule, prediction=cfg.prediction)
            l.mean().backward()
        model.zero_grad(set_to_none=True)

    # fused_x and fused_err: the float32 fold (explicit: the default "auto" is tf32 on a GPU, column fused_tf32_x)
    common = dict(schedule=schedule, prediction=cfg.prediction, noise=noise, K=K)
    fp32 = dict(common, gram_precision="fp32")
    phase["now"] = "step"
    step()  # untimed warm-up of both sides: kernels, allocator, and the fused self-check (cached after the first call)
    phase["now"] = "fused (first call)"
    gc.task_gram(model, x0, t_d, task, method="fused", autocast_dtype=amp, **fp32)
    phase["now"] = "step"
    base, base_mem, _ = timed(step, device, args.repeats)
    phase["now"] = "loop"
    small = K * n <= args.max_loop
    # loop: timed under the same autocast as the step (one run); the float32 loop is the untimed error reference
    ref_s, ref_mem, timed_loop = timed(lambda: gc.task_gram(model, x0, t_d, task, method="loop", autocast_dtype=amp,
                                                            **common), device, 1) if small else (float("nan"),) * 3
    ref = (timed_loop if amp is None else gc.task_gram(model, x0, t_d, task, method="loop", **common)) if small else None
    phase["now"] = "fused"
    c_s, c_mem, fused = timed(lambda: gc.task_gram(model, x0, t_d, task, method="fused", check=True,
                                                   autocast_dtype=amp, **fp32), device, args.repeats)
    f_s, f_mem, _ = timed(lambda: gc.task_gram(model, x0, t_d, task, method="fused",
                                               autocast_dtype=amp, **fp32), device, args.repeats)
    u_s, _, _ = timed(lambda: gc.task_gram(model, x0, t_d, task, method="fused", check=False,
                                           autocast_dtype=amp, **fp32), device, args.repeats)
    row = dict(model=name, params_M=P / 1e6, K=K, n=n, step_s=base, step_GiB=base_mem,
               fused_x=f_s / base, fused_check_x=c_s / base, fused_nocheck_x=u_s / base,
               fused_GiB=max(f_mem, c_mem), loop_x=ref_s / base)
    if ref is not None:  # the engine's own error: fused in float32 against loop in float32
        exact = fused if amp is None else gc.task_gram(model, x0, t_d, task, method="fused", **fp32)
        row["fused_err"] = _rel(exact.gram, ref.gram)
        if amp is not None:  # what bf16 activations add (the model, not the engine)
            row["amp_err"] = _rel(fused.gram, ref.gram)
    if args.profile:
        _profile(lambda: gc.task_gram(model, x0, t_d, task, method="fused", autocast_dtype=amp, **fp32), step, device)
    for prec in args.gram_precision:  # reduced fold precision: time, and deviation from the fp32 fold
        r_s, _, reduced = timed(lambda: gc.task_gram(model, x0, t_d, task, method="fused", autocast_dtype=amp,
                                                     gram_precision=prec, **common), device, args.repeats)
        row.update({f"fused_{prec}_x": r_s / base, f"{prec}_fold_err": _rel(reduced.gram, fused.gram)})
    if args.vmap and K * n <= args.max_loop:
        try:
            def vmapped():
                with tf32(False), amp_ctx():
                    return vmap_gram(model, x0, t_d, task.to(device), K, noise, schedule, cfg.prediction,
                                     args.vmap_chunk)

            v_s, v_mem, vg = timed(vmapped, device, 1)
            row.update(vmap_x=v_s / base, vmap_GiB=v_mem,
                       vmap_err=_rel(vg, ref.gram) if ref is not None else float("nan"))
        except (RuntimeError, NotImplementedError) as err_v:  # out of memory or unsupported op
            row.update(vmap_x=float("nan"), vmap_note=str(err_v).splitlines()[0][:60])
    return row


def run(args: argparse.Namespace) -> pd.DataFrame:
    device = torch.device(args.device)
    schedule = gc.NoiseSchedule.linear()
    rows = []
    amp = torch.bfloat16 if args.bf16 and device.type == "cuda" else None
    for arch in args.models:
        name = f"{arch}-{args.size}"
        torch.manual_seed(0)
        model = build_model(name).to(device)
        # adaLN-zero / zero-init output layers give exactly-zero gradients at init: perturb so every layer counts
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        P = sum(p.numel() for p in model.parameters())
        for K in args.K:
            for n in args.n:
                phase = {"now": "setup"}
                try:  # one failing row (e.g. out of memory at K = 1000) must not end the table
                    row = _row(model, name, P, K, n, args, device, amp, schedule, phase)
                except Exception as exc:  # noqa: BLE001 - reported in the table
                    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                    print(f"{name} K={K} n={n} failed in {phase['now']} (peak {peak:.1f} GiB): "
                          f"{type(exc).__name__}: {exc}", flush=True)
                    row = dict(model=name, params_M=P / 1e6, K=K, n=n,
                               error=f"{phase['now']}: {type(exc).__name__}: {exc}"[:120])
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.3g}"), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="tiny", choices=["tiny", "s"])
    p.add_argument("--models", nargs="+", default=["dit", "unet"])
    p.add_argument("--K", type=int, nargs="+", default=[10, 100])
    p.add_argument("--n", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-loop", type=int, default=800, help="skip loop/vmap above this many samples")
    p.add_argument("--vmap", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--vmap-chunk", type=int, default=10)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the step and fused (CUDA)")
    p.add_argument("--gram-precision", nargs="*", default=[], choices=["tf32", "bf16"],
                   help="also time the fused Gram folded at these reduced precisions (columns fused_<p>_x, <p>_fold_err)")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's busiest operators for one training step and one fused call per row")
    p.add_argument("--quick", action="store_true", help="K = 10, n = 8 only, one repeat")
    p.add_argument("--csv", default=None, help="also write the table here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.quick:
        args.K, args.n, args.repeats = [10], [8], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = run(args)
    print("\nratios are seconds / one training step (forward + backward) on the same batch, same run")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
