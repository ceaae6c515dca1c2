"""``task_gram``: per-task gradients of a diffusion model and their Gram matrix."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Iterator, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from .. import distributed as dist_utils
from ..bins import TimestepBins
from ..schedule import NoiseSchedule
from ..targets import normalize_prediction
from .budget import check_budget, chunk_budget
from .checks import check_coverage, check_samples_independent, first_line, task_signs
from .chunked import check_task_chunks, pair_passes
from .coverage import check_due, mark_checked, normalize_check
from .fused import FusedGram
from .grouping import TaskIndex
from .inputs import as_schedule as _as_schedule, prepare as _prepare
from .precision import check_gram_precision, resolve_gram_precision, tf32
from .loss import check_data, forward_dtype, per_sample_losses
from .result import TaskGradients
from .sketch import CountSketch

__all__ = ["task_gram", "METHODS"]

METHODS = ("fused", "loop")


def task_gram(
    model: nn.Module,
    x0: torch.Tensor,
    t: torch.Tensor,
    task: Union[torch.Tensor, TimestepBins],
    *,
    schedule: NoiseSchedule,
    prediction: str = "eps",
    loss_space: str = "x0",
    noise: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    model_kwargs: Optional[dict] = None,
    method: str = "fused",
    K: Optional[int] = None,
    labels: Optional[list[str]] = None,
    return_gradients: bool = False,
    sketch_dim: Optional[int] = None,
    sketch_seed: int = 0,
    train_mode: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
    max_chunk_elements: Union[int, str, None] = "auto",
    check: Union[bool, str] = "once",
    gram_precision: str = "auto",
    task_chunks: int = 1,
) -> TaskGradients:
    """Gram matrix of the per-task gradients of ``model`` on one batch.

    Per sample i: ``x_t = alpha_t x0 + sigma_t noise`` and ``l_i`` = mean squared error in ``loss_space``
    (x0 by default). Task k's loss is ``L_k = (1/n_k) sum_{i in k} l_i`` and its gradient
    ``g_k = grad_theta L_k`` over every parameter with ``requires_grad``; ``gram[k, l] = <g_k, g_l>``.

    Args:
        model: ``model(x_t, t, **model_kwargs)`` returning a tensor shaped like ``x_t`` (a diffusers
            ``.sample`` output is unwrapped). Samples must not interact (no BatchNorm in training mode).
        x0: clean floating data ``(N, ...)`` (integer images are refused: scale them to [-1, 1] first); data
            coarser than the model (float16 for a float64 model) is noised in the model's dtype. t: integer
            timesteps ``(N,)``; task: task id per sample ``(N,)`` in ``[0, K)``, or a ``TimestepBins`` (task = bin
            of t, labels from the bins). Floating or bool tensors for t and task are refused (``.long()`` would
            truncate 0.7 to 0); lists and arrays may hold whole-number floats.
        prediction: what the model predicts, "eps", "x0" or "v".
        noise: the Gaussian noise ``(N, ...)``; drawn on the CPU from ``generator`` when None (so a seed
            gives the same batch on every device).
        method: "fused" (one forward and one backward; default) or "loop" (reference: one backward per task).
        return_gradients: also return the K x P gradients (float64, CPU; parameter order of
            ``model.named_parameters()``).
        sketch_dim: also return a seeded CountSketch (K x d) of the gradients (see ``sketch.py``).
        train_mode: keep the model's training mode (dropout active); by default the model runs in eval
            mode, so dropout is off and "fused" and "loop" see the same function.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g. torch.bfloat16 on a
            GPU); per-task gradients are then formed in float32 (in bfloat16 directly with
            ``gram_precision="bf16"``, see ``precision.py``) and folded into a float64 Gram.
        max_chunk_elements: memory budget of the fused method: a Linear or Conv layer whose K per-task
            gradients hold more elements than this is built and folded a few output rows at a time (same
            result; shared parameters and grouped convs are built whole). ``"auto"`` (default): on a GPU, 2% of
            the GPU memory free when the call starts, torch's cached blocks counted as free (about 1.5 GiB of an
            idle 80 GB card, which splits a DiT's 384 -> 2304 modulation layer at K = 1000 into a few pieces);
            no budget on the CPU. ``None``: no budget anywhere.
        check: the fused method's self-check, ``r^T G r = ||grad sum_k r_k L_k||^2`` for fixed signs ``r_k = +-1``
            against autograd's own gradient from one more plain forward and backward pass. It catches parameters
            used outside the modules that own them, samples that interact and layers whose dim 0 is not the
            batch. ``"once"`` (default) runs it
            on the first call for a model and call signature (see ``coverage.py``) and trusts it afterwards;
            ``True`` runs it on every call (models with data-dependent branches); ``False`` never. The fused
            backward pass itself runs w.r.t. the layer outputs only, so autograd does not form the parameter
            gradients (a full backward when a layer's output was changed in place, e.g. ``out += x``).
        gram_precision: how the fused method folds ``G += J J^T``: ``"fp32"`` (float32 products, each layer
            summed in float64, relative error about 1e-7), ``"tf32"`` or ``"bf16"`` (J rounded to that format,
            float32 accumulation: measured 4e-6 to 4e-5 (tf32) and 5e-5 (bf16) relative error in G against the
            fp32 fold on an H100, much faster on a GPU when the fold dominates, as at K ~ 1000). ``"auto"``
            (default): ``"tf32"`` for float32 / half models on a GPU, ``"fp32"`` otherwise. See
            ``precision.py``; the loop reference always folds in float64.
        task_chunks: memory budget for the activations (fused method): split the K tasks into this many groups
            (balanced by sample count) and run one fused pass per pair of groups, each over about
            ``2 N / task_chunks`` samples (unless one task dominates); the
            passes process ``(task_chunks - 1) N`` samples in all, and give the same Gram (``chunked.py``).
            1 (default): one pass over the whole batch. Not with ``return_gradients``, ``sketch_dim``,
            ``train_mode`` or torchrun (there each rank already holds 1 / world of the batch).

    Returns:
        TaskGradients with ``gram`` (K x K float64 on the CPU), ``losses``, ``counts``, ``norms``,
        ``cosine()``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    check = normalize_check(check)
    schedule = _as_schedule(schedule)
    check_budget(max_chunk_elements)
    gram_precision = check_gram_precision(gram_precision, allow_auto=True)
    if method == "loop" and gram_precision not in ("fp32", "auto"):
        raise ValueError(f"gram_precision={gram_precision!r} applies to method='fused'; the loop reference always "
                         "folds in float64 (leave gram_precision at 'auto' or 'fp32')")
    prediction = normalize_prediction(prediction)
    loss_space = normalize_prediction(loss_space, "loss_space")
    x0, t, task_ids, K, labels = _prepare(x0, t, task, K, labels)
    if isinstance(task, TimestepBins) and task.T != schedule.T:
        raise ValueError(f"the bins cover T = {task.T} timesteps but the schedule has T = {schedule.T}; build them "
                         "from schedule.T")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= schedule.T):
        raise ValueError(f"t out of range: timesteps must lie in [0, {schedule.T - 1}] (the schedule's T = {schedule.T}), "
                         f"got min {int(t.min())} and max {int(t.max())}")
    device = x0.device
    if noise is None:  # drawn in the dtype the model sees x_t in (loss.forward_dtype), not coarser
        dtype = forward_dtype(model, x0)
        noise = torch.randn(x0.shape, generator=generator, dtype=dtype if dtype != torch.bfloat16 else torch.float32)
        noise = noise.to(device=device, dtype=dtype)
    elif not isinstance(noise, torch.Tensor):
        check_data(noise, "noise")
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but x0 has {tuple(x0.shape)}")
    check_data(noise, "noise")
    if noise.device != device:
        raise ValueError(f"noise is on {noise.device} but x0 is on {device}; move it: noise = noise.to(x0.device)")
    for name, v in (("x0", x0), ("noise", noise)):
        if not torch.isfinite(v).all():
            raise ValueError(f"{name} contains NaN or Inf; clean the data before computing gradients")
    global_counts = None
    if dist_utils.is_distributed():
        global_counts = dist_utils.all_reduce_sum(torch.bincount(task_ids.cpu(), minlength=K))
    idx = TaskIndex(task_ids.cpu(), K, global_counts)
    model_kwargs = dict(model_kwargs or {})
    for key, v in model_kwargs.items():
        if isinstance(v, np.ndarray):  # not split by task in the loop and the paired passes: wrong rows, silently
            raise ValueError(f"model_kwargs[{key!r}] is a NumPy array {v.shape}; pass per-sample conditioning as a "
                             f"torch.Tensor (N, ...), e.g. torch.as_tensor(model_kwargs[{key!r}]), on x0's device")
        if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] != x0.shape[0]:
            raise ValueError(f"model_kwargs[{key!r}] has batch size {v.shape[0]}, expected {x0.shape[0]} (per-sample conditioning)")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: there is no gradient to compare")
    kw = dict(schedule=schedule, prediction=prediction, loss_space=loss_space)
    gram_precision = resolve_gram_precision(gram_precision if method == "fused" else "fp32", device, params[0][1].dtype)
    if gram_precision == "tf32" and device.type != "cuda":
        gram_precision = "fp32"  # the same arithmetic off the GPU (no TF32), and the self-check's float32 tolerance
    if method == "fused":
        # per-task gradients are float64 for float64 models, else float32 (half-precision models included)
        max_chunk_elements = chunk_budget(max_chunk_elements, device, max(4, params[0][1].element_size()))
    sketch = CountSketch(K, sketch_dim, sketch_seed, {n: i for i, (n, _) in enumerate(params)}) if sketch_dim else None
    task_chunks = check_task_chunks(task_chunks, K)
    if task_chunks > 1 and method != "fused":
        raise ValueError(f"task_chunks applies to method='fused' (the loop already runs one task at a time); got "
                         f"method={method!r} with task_chunks={task_chunks}")
    if task_chunks > 1 and (return_gradients or sketch_dim or dist_utils.is_distributed() or train_mode):
        raise ValueError("task_chunks > 1 works only in one process, in eval mode, for the Gram alone: it cannot "
                         "return per-task gradients or a sketch, cannot run under torchrun (there each rank already "
                         "holds 1 / world of the batch: add ranks to save memory instead), and cannot keep training "
                         "mode (each pass would draw its own dropout masks); use task_chunks=1, or method='loop' for "
                         "the gradients")
    start = time.perf_counter()
    with _mode(model, train_mode), _saved_grads(params), tf32(False):  # TF32 rounds to 10 mantissa bits
        check_samples_independent(model)
        if method == "loop":
            gram, losses, grads = _loop(model, x0, t, noise, idx, params, model_kwargs, autocast_dtype, sketch, kw)
        else:
            run_check, signature = check_due(check, model, params, x0, model_kwargs, autocast_dtype)
            fused = dict(params=params, autocast_dtype=autocast_dtype, kw=kw, max_chunk_elements=max_chunk_elements,
                         gram_precision=gram_precision)
            if task_chunks > 1:
                gram, losses, grads = _fused_pairs(model, x0, t, noise, idx, model_kwargs, task_chunks,
                                                   check is True, run_check, fused)
            else:
                gram, losses, grads = _fused(model, x0, t, noise, idx, model_kwargs=model_kwargs, sketch=sketch,
                                             return_gradients=return_gradients, check=run_check, **fused)
            if run_check:
                mark_checked(model, signature)  # reached only when the check passed
    seconds = time.perf_counter() - start
    return TaskGradients(
        gram=gram,
        losses=losses,
        counts=idx.counts.clone(),
        method=method,
        seconds=seconds,
        labels=labels,
        gradients=grads if return_gradients else None,
        sketch=sketch.finish() if sketch is not None else None,
    )


@contextlib.contextmanager
def _mode(model: nn.Module, train_mode: bool) -> Iterator[None]:
    states = [(m, m.training) for m in model.modules()]
    if not train_mode:
        model.eval()
    try:
        yield
    finally:
        for m, s in states:
            m.training = s


@contextlib.contextmanager
def _saved_grads(params: list) -> Iterator[None]:
    saved = [p.grad for _, p in params]
    for _, p in params:
        p.grad = None
    try:
        yield
    finally:
        for (_, p), g in zip(params, saved):
            p.grad = g


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_losses(losses: torch.Tensor, task: torch.Tensor) -> None:
    """Raise, naming the tasks, when a per-sample loss is NaN or Inf (``task``: the task id of each sample)."""
    bad = ~torch.isfinite(losses.detach().cpu())
    if bool(bad.any()):
        tasks = sorted(set(task.cpu()[bad].tolist()))
        raise ValueError(
            f"the loss is NaN or Inf for {int(bad.sum())} sample(s) of task(s) {tasks[:10]}; check the model "
            "output and the schedule (eps-prediction cannot recover x0 where alpha = 0; use x0 or v prediction)"
        )


def _loop(model, x0, t, noise, idx, params, model_kwargs, autocast_dtype, sketch, kw):
    rows, losses = [], []
    for k in range(idx.K):
        sel = torch.nonzero(idx.task == k).flatten().to(x0.device)
        if sel.numel() == 0:  # possible on one rank under torch.distributed: contributes nothing
            rows.append(torch.zeros(sum(p.numel() for _, p in params), dtype=torch.float64))
            losses.append(0.0)
            continue
        kw_k = {key: (v[sel] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for key, v in model_kwargs.items()}
        with _autocast(x0.device, autocast_dtype):
            l = per_sample_losses(model, x0[sel], t[sel], noise[sel], model_kwargs=kw_k, **kw)
        _check_losses(l, torch.full((len(sel),), k))
        L = l.sum() / float(idx.counts[k])
        with _reentrant_checkpoint_hint():
            grads = torch.autograd.grad(L, [p for _, p in params], allow_unused=True)
        flat = []
        for (name, p), g in zip(params, grads):
            g = torch.zeros_like(p) if g is None else g
            if not torch.isfinite(g).all():
                raise ValueError(f"the gradient of task {k} is NaN or Inf in parameter {name!r}")
            flat.append(g.detach().to("cpu", torch.float64).reshape(-1))
        rows.append(torch.cat(flat))
        losses.append(float(L.detach()))
    J = dist_utils.all_reduce_sum(torch.stack(rows))
    losses = dist_utils.all_reduce_sum(torch.tensor(losses, dtype=torch.float64)).tolist()
    if sketch is not None:
        offset = 0
        for name, p in params:
            n = p.numel()
            sketch.add(name, J[:, offset : offset + n])
            offset += n
    return J @ J.T, torch.tensor(losses, dtype=torch.float64), J


def _fused_pairs(model, x0, t, noise, idx, model_kwargs, chunks, check_every_pass, first_check, fused):
    """``_fused`` once per pair of task groups (``chunked.py``): the same Gram, less activation memory per pass."""

    def run(sel, local_task, tasks, check):
        sub = TaskIndex(local_task, len(tasks))
        kw_sel = {key: (v[sel.to(v.device)] if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
                  for key, v in model_kwargs.items()}
        s = sel.to(x0.device)
        if check:  # the self-check compares with this pass's full gradient, so none may be left from the last pass
            for _, p in fused["params"]:
                p.grad = None
        gram, losses, _ = _fused(model, x0[s], t[s], noise[s], sub, model_kwargs=kw_sel, check=check, task_ids=tasks,
                                 **fused)
        return gram, losses

    gram, losses = pair_passes(idx.task, idx.K, chunks, run, check_every_pass, first_check)
    return gram, losses, None


def _fused(model, x0, t, noise, idx, params, model_kwargs, autocast_dtype, kw, sketch=None, return_gradients=False,
           max_chunk_elements=None, check=True, gram_precision="fp32", task_ids=None):
    """One fused pass; ``task_ids``: the caller's ids of this pass's tasks 0..K-1 (named in errors), default 0..K-1."""
    named = (lambda local: local) if task_ids is None else (lambda local: [int(task_ids[i]) for i in local])
    # each layer's per-task gradients are summed over ranks in their own buffer (no second K x P copy)
    reduce = functools.partial(dist_utils.all_reduce_sum, inplace=True) if dist_utils.is_distributed() else None
    fg = FusedGram(model, idx, keep_gradients=return_gradients, sketch=sketch, reduce=reduce,
                   max_chunk_elements=max_chunk_elements, gram_precision=gram_precision)
    rng = _rng_state(x0.device) if check else None  # the check's own forward must draw the same dropout masks
    with fg:
        with _autocast(x0.device, autocast_dtype):
            l = per_sample_losses(model, x0, t, noise, model_kwargs=model_kwargs, **kw)
        _check_losses(l, idx.task if task_ids is None else task_ids[idx.task])
        scale = (1.0 / idx.counts.to(l.device, l.dtype))[idx.task.to(l.device)]
        total = (l * scale).sum()
        if fg.outputs_modified():
            total.backward()
        elif fg.outputs:  # gradients w.r.t. the layer outputs only: the hooks fire, no parameter gradients
            with _reentrant_checkpoint_hint():
                torch.autograd.grad(total, fg.outputs, allow_unused=True)
        fg.release_outputs()
        fg.finish()
    losses = torch.zeros(idx.K, dtype=torch.float64).index_add_(0, idx.task, l.detach().to("cpu", torch.float64))
    losses = dist_utils.all_reduce_sum(losses) / idx.counts.to(torch.float64)
    if fg.nonfinite:
        name, tasks = next(iter(fg.nonfinite.items()))
        raise ValueError(f"the gradient of task(s) {named(tasks[:10])} is NaN or Inf in parameter {name!r}")
    if check:
        signs = task_signs(idx.K)
        _signed_gradient(model, x0, t, noise, idx, params, model_kwargs, autocast_dtype, kw, scale, signs, rng)
        check_coverage(fg, params, signs, autocast_dtype, gram_precision)
    grads = None
    if return_gradients:
        grads = torch.cat([fg.gradients.get(id(p), torch.zeros(idx.K, p.numel(), dtype=torch.float64)) for _, p in params], 1)
    return fg.gram, losses, grads


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _signed_gradient(model, x0, t, noise, idx, params, model_kwargs, autocast_dtype, kw, scale, signs, rng) -> None:
    """The self-check's reference: autograd's own gradient of ``sum_k r_k L_k`` (``r_k = +-1``) in ``p.grad``, from
    a plain forward and backward (no hooks) that replays the fused pass's random numbers (dropout in train mode);
    ``fork_rng`` leaves the caller's random stream where the fused pass left it."""
    for _, p in params:
        p.grad = None
    with torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], x0.device)
        with _autocast(x0.device, autocast_dtype):
            l = per_sample_losses(model, x0, t, noise, model_kwargs=model_kwargs, **kw)
        (l * scale * signs.to(l.device, l.dtype)[idx.task.to(l.device)]).sum().backward()


@contextlib.contextmanager
def _reentrant_checkpoint_hint() -> Iterator[None]:
    """torch.utils.checkpoint with use_reentrant=True supports only ``backward()``, not ``autograd.grad``."""
    try:
        yield
    except RuntimeError as exc:
        if "use_reentrant" not in str(exc):
            raise
        raise ValueError(f"the model uses torch.utils.checkpoint with use_reentrant=True ({first_line(exc)}); "
                         "pass use_reentrant=False, which PyTorch recommends and the engine supports") from exc
