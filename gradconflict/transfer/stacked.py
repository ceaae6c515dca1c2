"""Fine-tune several copies of one model, each on its own timestep range, as one batched computation.

Copy c starts from the model's parameters theta_0 and takes ``steps`` optimiser steps on

    L_c(theta) = (1/B) sum_{b < B} l(theta; x0_b, t_b, eps_b),   t_b ~ U{low_c, ..., high_c - 1},

with ``l`` the per-sample loss in x0 units (``engine.per_sample_losses``, data units squared), B the batch
size; with ``config.loss_space`` / ``config.weighting`` set, ``l = w(SNR_t) ||y - y_hat||^2`` in that space
(``ScheduleTables.weight``: the weight by table look-up). Only parameters with ``requires_grad`` are fine-tuned; frozen parameters and buffers are shared.

Batched (``finetune_stacked``): every trainable parameter becomes one leaf of shape ``(C, *p.shape)``; the
C copies run through ``torch.func.vmap`` over ``functional_call``, each copy with its own minibatch, and
``sum_c L_c`` is back-propagated once (copy c's leaf slice only receives ``grad L_c``). The optimiser
(``torch.optim.AdamW`` or ``SGD``) acts on the stacked leaves; both are elementwise, so this is exactly C
independent runs, each with a fresh optimiser state. Gradient clipping is per copy (global norm over that
copy's slices, as ``clip_grad_norm_``). On the CPU, Linear and attention run through copy-batched kernels
(``kernels.py``: fused-bias ``baddbmm`` and one flash SDPA call over all copies, instead of vmap's ``bmm`` +
bias add and math / per-copy-fallback attention); on CUDA attention runs with the math SDPA backend (fused
kernels fail in vmap's backward there). On CUDA the whole step (forward, backward, clipping, optimiser) is
captured as a CUDA graph after ``GRAPH_WARMUP`` eager steps and replayed (``cudagraph.py``): the tiny models'
steps are launch-bound, and replaying removes the per-kernel CPU cost. The stacked optimiser uses torch's
multi-tensor (foreach) implementation: the same elementwise update (on CUDA AdamW is made ``capturable``: its
bias corrections in float32, about 1e-5 relative from the sequential reference's first updates). ``finetune_sequential`` is the reference: a deep copy per copy,
one after the other, with the same batches (each copy draws from its own seeded CPU generator).

The model runs in eval mode (dropout off), so the copies are deterministic functions of their batches.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..adapters.conditioning import LABELS_ARG
from ..bins import TimestepBins
from ..engine import per_sample_losses
from ..schedule import NoiseSchedule
from .config import TransferConfig
from .cudagraph import GRAPH_WARMUP, GraphedStep, WarmupStream, cuda_graphs_enabled
from .kernels import StackedKernels, use_stacked_kernels

__all__ = [
    "Source",
    "sources_of",
    "derive_seed",
    "BatchStream",
    "ScheduleTables",
    "FineTuned",
    "clip_per_copy_",
    "finetune_copies",
    "finetune_sequential",
    "finetune_stacked",
]

ALL = -1  # source index of the "all bins" control copy


@dataclass(frozen=True)
class Source:
    """The timesteps a copy is fine-tuned on: ``low <= t < high``; ``index`` = bin index, or -1 for all bins."""

    index: int
    label: str
    low: int
    high: int


def sources_of(bins: TimestepBins, include_all: bool = True) -> list[Source]:
    """One source per bin, plus the "all" control (every binned timestep) when ``include_all``."""
    out = [Source(k, lab, int(lo), int(hi)) for k, (lab, lo, hi) in enumerate(zip(bins.labels, bins.lows, bins.highs))]
    if include_all:
        out.append(Source(ALL, "all", int(bins.edges[0]), int(bins.edges[-1])))
    return out


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (``numpy.random.SeedSequence``): independent streams per (seed, purpose, copy)."""
    state = np.random.SeedSequence([int(k) % 2**32 for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


class ScheduleTables:
    """``alpha(t)``, ``sigma(t)`` by plain table look-up (float64): usable inside ``vmap``, where the range
    checks of ``NoiseSchedule`` (``int(t.max())``) cannot run. Timesteps are validated when drawn."""

    def __init__(self, schedule: NoiseSchedule, device: torch.device, config: Optional[TransferConfig] = None) -> None:
        a = schedule.alphas_cumprod
        self._alpha = torch.from_numpy(np.sqrt(a)).to(device)
        self._sigma = torch.from_numpy(np.sqrt(1.0 - a)).to(device)
        self.loss_space = "x0" if config is None else config.loss_space
        self._weight = None
        if config is not None and config.weighting is not None:
            from ..weighting import by_name

            snr = schedule.snr(np.arange(schedule.T))
            self._weight = torch.from_numpy(np.asarray(by_name(config.weighting).weight(snr, target=self.loss_space),
                                                       dtype=np.float64)).to(device)

    def finetune_loss(self, call, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, prediction: str,
                      kw: dict) -> torch.Tensor:
        """Mean fine-tuning loss of one batch: ``mean_b w(SNR_t_b) ||y_b - y_hat_b||^2`` in ``loss_space``."""
        per = per_sample_losses(call, x0, t, noise, self, prediction=prediction, loss_space=self.loss_space,
                                model_kwargs=kw)
        return (per * self._weight[t].to(per.dtype)).mean() if self._weight is not None else per.mean()

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return self._alpha[t]

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self._sigma[t]


class BatchStream:
    """Fine-tuning batches of one copy: each ``next()`` draws ``batch_size`` images uniformly (with
    replacement), ``t ~ U{low..high-1}`` and ``eps ~ N(0, I)`` from a CPU generator seeded with ``seed``,
    so the sequence is the same on every device, in batched and in sequential runs. ``conditioning``: per-sample
    tensors ``{name: (N, ...)}`` on the images' device; the drawn rows go to the model by name (the draws are the
    same with or without them)."""

    def __init__(self, source: Source, seed: int, images: torch.Tensor, labels: Optional[torch.Tensor], batch_size: int,
                 conditioning: Optional[dict] = None) -> None:
        self.source, self.images, self.labels, self.batch_size = source, images, labels, batch_size
        self.conditioning = dict(conditioning or {})
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        x0, t, noise, kwargs = self.next_block(1)
        return x0[0], t[0], noise[0], {k: v[0] for k, v in kwargs.items()}

    def next_block(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """The next ``steps`` batches at once, stacked on a leading step dim: the same draws, in the same order,
        as ``steps`` calls of ``next()``, with one host-to-device copy per tensor instead of one per step."""
        g, n, dev = self.generator, self.batch_size, self.images.device
        idx, t, noise = [], [], []
        for _ in range(steps):
            idx.append(torch.randint(0, self.images.shape[0], (n,), generator=g))
            t.append(torch.randint(self.source.low, self.source.high, (n,), generator=g))
            noise.append(torch.randn((n, *self.images.shape[1:]), generator=g, dtype=torch.float64))
        idx_d = torch.stack(idx).to(dev)
        x0 = self.images[idx_d]
        kwargs = {LABELS_ARG: self.labels[idx_d]} if self.labels is not None else {}
        kwargs.update({k: v[idx_d] for k, v in self.conditioning.items()})
        return x0, torch.stack(t).to(dev), torch.stack(noise).to(device=dev, dtype=x0.dtype), kwargs


@dataclass
class FineTuned:
    """Final trainable parameters of C copies (``params[name]``: ``(C, *shape)``, detached), the training
    loss of every step (``losses``: ``(C, steps)``, x0 units), wall time and whether vmap was used."""

    params: dict[str, torch.Tensor]
    losses: np.ndarray
    seconds: float
    batched: bool

    def copy_params(self, c: int) -> dict[str, torch.Tensor]:
        """Copy c's parameters as a fresh dict of tensors (cloned: own, aligned storage)."""
        return {n: p[c].clone() for n, p in self.params.items()}


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter with ``requires_grad``; raises when there is none."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: there is nothing to fine-tune")
    return params


def _optimizer(params: list[torch.Tensor], config: TransferConfig, foreach: Optional[bool] = None,
               capturable: bool = False) -> torch.optim.Optimizer:
    """``config``'s optimiser on ``params``; ``foreach``: torch's multi-tensor implementation (None: torch's default);
    ``capturable``: AdamW keeps its step count on the device as a float32 tensor, so its step can be captured in
    a CUDA graph; its bias corrections ``1 - beta^t`` are then computed in float32, which moves the first updates
    by about 1e-5 relative against the usual form (Python floats), the one the sequential reference keeps. The
    stacked path uses it on every CUDA run; SGD has no step count. torch's warning that a capturable optimiser
    runs outside a graph (the warm-up steps) is silenced by ``finetune_stacked``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay, foreach=foreach)
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                             foreach=foreach, capturable=capturable)


def _check_loss(losses: torch.Tensor, sources: Sequence[Source], step: int) -> None:
    bad = ~torch.isfinite(losses.detach())
    if bool(bad.any()):
        which = [sources[int(c)].label for c in torch.nonzero(bad).flatten().tolist()]
        raise ValueError(
            f"the fine-tuning loss is NaN or Inf at step {step} for the copy fine-tuned on bin(s) {which[:5]}; "
            "lower lr, set grad_clip, or check the model and data"
        )


@torch.no_grad()
def clip_per_copy_(grads: Sequence[Optional[torch.Tensor]], max_norm: float) -> torch.Tensor:
    """Scale each copy's slice ``g[c]`` of the stacked gradients so that its global 2-norm (over all leaves)
    is at most ``max_norm``: factor ``min(1, max_norm / (||g[c]|| + 1e-6))`` as ``clip_grad_norm_``.
    Returns the pre-clip norms ``(C,)``."""
    present = [g for g in grads if g is not None]
    C = present[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(C, -1), dim=1) for g in present])  # (leaves, C)
    total = torch.linalg.vector_norm(norms, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in present:
        g.mul_(coef.to(g.dtype).reshape(C, *([1] * (g.ndim - 1))))
    return total


def finetune_sequential(model: nn.Module, streams: Sequence[BatchStream], config: TransferConfig,
                        schedule: NoiseSchedule, prediction: str, *, desc: str = "fine-tune") -> FineTuned:
    """Reference: fine-tune a deep copy of ``model`` per stream, one after the other (see the module docstring)."""
    start, sources = time.perf_counter(), [s.source for s in streams]
    names = [n for n, _ in trainable(model)]
    finals: list[list[torch.Tensor]] = []
    losses = np.zeros((len(streams), config.steps))
    bar = tqdm(total=config.steps * len(streams), desc=desc, disable=not config.progress, leave=False, dynamic_ncols=True)
    device = trainable(model)[0][1].device
    tables = ScheduleTables(schedule, device, config)  # as in the stacked path: no host synchronisation per step
    block = _block_steps(streams[:1], config.steps)
    for c, stream in enumerate(streams):
        clone = copy.deepcopy(model).eval()
        params = [p for _, p in trainable(clone)]
        opt = _optimizer(params, config)
        history = torch.zeros((1, config.steps), dtype=torch.float64, device=device)
        for first in range(0, config.steps, block):
            steps = min(block, config.steps - first)
            x0s, ts, noises, kws = stream.next_block(steps)  # the same draws as one next() per step
            for j in range(steps):
                kw = {k: v[j] for k, v in kws.items()}
                loss = tables.finetune_loss(clone, x0s[j], ts[j], noises[j], prediction, kw)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                opt.step()
                history[0, first + j] = loss.detach()
                bar.update(1)
            _check_history(history[:, first : first + steps], [sources[c]], first)  # one sync per block
        losses[c] = history[0].cpu().numpy()
        state = dict(clone.named_parameters())
        finals.append([state[n].detach() for n in names])
        del clone, opt
    bar.close()
    params = {n: torch.stack([f[i] for f in finals]) for i, n in enumerate(names)}
    return FineTuned(params, losses, time.perf_counter() - start, batched=False)


class VmapUnsupported(RuntimeError):
    """The model cannot run under ``torch.func.vmap`` (e.g. data-dependent Python control flow)."""


def finetune_stacked(model: nn.Module, streams: Sequence[BatchStream], config: TransferConfig,
                     schedule: NoiseSchedule, prediction: str, *, desc: str = "fine-tune") -> FineTuned:
    """Fine-tune C = ``len(streams)`` copies at once with stacked parameters (see the module docstring)."""
    start, sources, C = time.perf_counter(), [s.source for s in streams], len(streams)
    base = trainable(model)
    leaves = {n: p.detach().unsqueeze(0).repeat(C, *([1] * p.ndim)).requires_grad_(True) for n, p in base}
    device = base[0][1].device
    graphs = cuda_graphs_enabled(device, config.steps)  # capture the step after a warm-up (cudagraph.py)
    # capturable on every CUDA run, graphed or not (GRADCONFLICT_CUDA_GRAPHS=0), so both do the same arithmetic
    opt = _optimizer(list(leaves.values()), config, foreach=True, capturable=device.type == "cuda")
    tables = ScheduleTables(schedule, device, config)

    def one_copy(params: dict, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict) -> torch.Tensor:
        def call(x: torch.Tensor, tt: torch.Tensor, **k: torch.Tensor) -> torch.Tensor:
            return functional_call(model, params, (x, tt), k)

        return tables.finetune_loss(call, x0, t, noise, prediction, kw)

    batched_loss = vmap(one_copy, in_dims=(0, 0, 0, 0, 0))
    kernels = use_stacked_kernels(device)

    def train_step(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, kw: dict) -> torch.Tensor:
        """One step of every copy; the per-copy losses ``(C,)`` before the step. No host synchronisation."""
        # the math SDPA backend for attention left to vmap's rules (fused kernels have no batching rule for
        # their backward); StackedKernels' own attention op re-enables the fused backends on physical tensors
        with StackedKernels() if kernels else contextlib.nullcontext(), sdpa_kernel(SDPBackend.MATH):
            per_copy = batched_loss(leaves, x0, t, noise, kw)
            opt.zero_grad(set_to_none=True)
            per_copy.sum().backward()
        if config.grad_clip is not None:
            clip_per_copy_([p.grad for p in leaves.values()], config.grad_clip)
        with warnings.catch_warnings():  # torch warns once that a capturable optimiser steps outside a graph
            warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
            opt.step()
        return per_copy.detach()

    graphed: Optional[GraphedStep] = None
    warmup = WarmupStream(device) if graphs else None
    history = torch.zeros((C, config.steps), dtype=torch.float64, device=device)  # on device: no sync per step
    bar = tqdm(total=config.steps, desc=f"{desc} ({C} copies, vmap)", disable=not config.progress, leave=False, dynamic_ncols=True)
    block = _block_steps(streams, config.steps)
    for first in range(0, config.steps, block):
        steps = min(block, config.steps - first)
        draws = [s.next_block(steps) for s in streams]  # (steps, n, ...) per copy -> (steps, C, n, ...)
        x0s, ts, noises = (torch.stack([d[i] for d in draws], dim=1) for i in range(3))
        kws = {k: torch.stack([d[3][k] for d in draws], dim=1) for k in draws[0][3]}
        for j in range(steps):
            step = first + j
            args = (x0s[j], ts[j], noises[j], {k: v[j] for k, v in kws.items()})
            if graphed is not None:
                per_copy = graphed(*args)
            else:
                with warmup if warmup is not None else contextlib.nullcontext():
                    try:
                        per_copy = train_step(*args)
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except RuntimeError as err:
                        if step == 0:
                            raise VmapUnsupported(str(err)) from err
                        raise
                if step == 0:
                    _check_loss(per_copy, sources, step)  # fail fast on a broken model
                if warmup is not None and step + 1 == GRAPH_WARMUP:
                    graphed = GraphedStep.capture(train_step, *args, reset=lambda: opt.zero_grad(set_to_none=True))
                    warmup = None
            history[:, step] = per_copy
            bar.update(1)
        _check_history(history[:, first : first + steps], sources, first)  # one sync per block
    bar.close()
    params = {n: p.detach() for n, p in leaves.items()}
    return FineTuned(params, history.cpu().numpy(), time.perf_counter() - start, batched=True)


PREFETCH_BYTES = 256 * 2**20  # batches drawn ahead (all copies, all steps of a block) at most


def _block_steps(streams: Sequence[BatchStream], steps: int) -> int:
    """Steps per prefetched block: as many as fit in ``PREFETCH_BYTES`` (x0 and noise of every copy)."""
    s = streams[0]
    per_step = 2 * len(streams) * s.batch_size * s.images[0].numel() * s.images.element_size()
    return max(1, min(steps, PREFETCH_BYTES // max(per_step, 1)))


def _check_history(history: torch.Tensor, sources: Sequence[Source], first: int) -> None:
    """``_check_loss`` for a block of steps ``(C, steps)``: names the first step with a NaN or Inf loss."""
    bad = ~torch.isfinite(history)
    if bool(bad.any()):
        step = int(torch.nonzero(bad.any(dim=0)).flatten()[0])
        _check_loss(history[:, step], sources, first + step)


def finetune_copies(model: nn.Module, streams: Sequence[BatchStream], config: TransferConfig,
                    schedule: NoiseSchedule, prediction: str, *, desc: str = "fine-tune") -> FineTuned:
    """``finetune_stacked`` when ``config.batched`` (falling back, with a warning, to ``finetune_sequential``
    for models that vmap cannot run), else ``finetune_sequential``. The model is put in eval mode."""
    was_training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        if config.batched and len(streams) > 1:
            try:
                return finetune_stacked(model, streams, config, schedule, prediction, desc=desc)
            except VmapUnsupported as err:
                warnings.warn(f"batched fine-tuning is not possible for this model under torch.func.vmap ({err}); "
                              "fine-tuning the copies one after the other instead", RuntimeWarning, stacklevel=2)
                streams = [BatchStream(s.source, _initial_seed(s), s.images, s.labels, s.batch_size, s.conditioning)
                           for s in streams]
        return finetune_sequential(model, streams, config, schedule, prediction, desc=desc)
    finally:
        for m, mode in was_training:
            m.training = mode


def _initial_seed(stream: BatchStream) -> int:
    return int(stream.generator.initial_seed())
