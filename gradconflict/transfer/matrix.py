"""The cross-bin transfer matrix (paper Fig. 2): fine-tune on one timestep bin, measure every bin's loss.

For each seed and source bin i (and an "all bins" control), a copy of the model starts from theta_0 and is
fine-tuned on timesteps of bin i only (``stacked.py``: ``steps`` AdamW steps, fresh optimiser state per
copy, loss = unweighted mean per-sample loss in x0 units, the paper's framing). Every bin j is evaluated
on one fixed set of samples shared by theta_0 and all copies (``evaluate.py``), and

    transfer[i, j] = (L_j(theta_0) - L_j(theta_i)) / L_j(theta_0)        (dimensionless)

is > 0 when fine-tuning on bin i lowered the loss of bin j. Seeds redraw both the fine-tuning batches and
the evaluation sets; ``matrix`` is the mean over seeds, ``stderr`` the standard error (NaN for one seed).

Lookahead mode (TAG, Fifty et al. 2021): one plain SGD step ``theta_i = theta_0 - lr g_i`` with ``g_i`` the
gradient of the mean loss on copy i's first fine-tuning batch. To first order

    transfer[i, j] ~= lr <g_i, grad L_j^eval(theta_0)> / L_j(theta_0),

with ``grad L_j^eval`` the gradient of the *evaluation* loss of bin j. ``first_order`` is computed from one
``task_gram`` call on the concatenation of the fine-tuning batches (tasks 0..C-1) and the evaluation set
(tasks C..C+K-1): the off-diagonal block ``G[:C, C:]`` holds exactly these cross inner products.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import distributed as dist
from ..bins import TimestepBins
from ..engine import check_samples_independent, task_gram
from ..schedule import NoiseSchedule
from ..targets import normalize_prediction
from .config import TransferConfig
from .resume import SeedLog, fingerprint
from .evaluate import EvalSet, base_params, draw_eval_set, evaluate_losses, relative_reduction
from .stacked import BatchStream, Source, derive_seed, finetune_copies, sources_of

__all__ = ["TransferResult", "transfer_matrix", "run_transfer"]

_FT, _EVAL = 1, 2  # seed purposes


@dataclass(frozen=True)
class TransferResult:
    """A transfer matrix with its per-seed data.

    * ``frame``: tidy, one row per (seed, source, target): ``seed``, ``source`` (bin index, -1 = all),
      ``source_label``, ``source_t_low``/``source_t_high`` (inclusive), ``target``, ``target_label``,
      ``target_t_low``/``target_t_high``, ``distance`` (target - source in bins; NaN for all), ``loss_before``,
      ``loss_after`` (x0 units), ``transfer`` (1), ``first_order`` (1; NaN when not computed).
    * ``matrix``/``stderr``: K x K mean and standard error over seeds (rows: fine-tuned on, columns:
      evaluated on); ``all_row``/``all_stderr``: the "all bins" control (K,), or None.
    * ``first_order``: K x K mean of ``lr <g_i, grad L_j> / L_j`` over seeds (None when not computed).
    """

    frame: pd.DataFrame
    labels: list[str]
    matrix: np.ndarray
    stderr: np.ndarray
    all_row: Optional[np.ndarray]
    all_stderr: Optional[np.ndarray]
    first_order: Optional[np.ndarray]
    config: TransferConfig
    seconds: float
    batched: bool

    @property
    def K(self) -> int:
        return len(self.labels)

    def matrix_frame(self, include_all: bool = False) -> pd.DataFrame:
        """Mean transfer as a labelled DataFrame (index "fine-tuned on", columns "evaluated on")."""
        rows, index = [self.matrix], list(self.labels)
        if include_all and self.all_row is not None:
            rows, index = [self.matrix, self.all_row[None]], index + ["all"]
        frame = pd.DataFrame(np.concatenate(rows), index=pd.Index(index, name="fine-tuned on"), columns=self.labels)
        frame.columns.name = "evaluated on"
        return frame

    def summary_frame(self) -> pd.DataFrame:
        """Tidy mean over seeds per (source, target): ``transfer_mean``, ``transfer_stderr``, ``n_seeds``,
        ``loss_before_mean``, ``loss_after_mean``, ``first_order_mean`` (only when the first-order prediction was
        computed), plus the label columns."""
        keys = ["source", "source_label", "source_t_low", "source_t_high", "target", "target_label",
                "target_t_low", "target_t_high", "distance"]
        g = self.frame.groupby(keys, sort=False, dropna=False)
        out = g.agg(transfer_mean=("transfer", "mean"), transfer_std=("transfer", "std"), n_seeds=("seed", "nunique"),
                    loss_before_mean=("loss_before", "mean"), loss_after_mean=("loss_after", "mean"),
                    first_order_mean=("first_order", "mean")).reset_index()
        out.insert(out.columns.get_loc("transfer_std"), "transfer_stderr", out["transfer_std"] / np.sqrt(out["n_seeds"]))
        out = out.drop(columns="transfer_std")
        return out if out["first_order_mean"].notna().any() else out.drop(columns="first_order_mean")

    def reach_frame(self) -> pd.DataFrame:
        """Per source bin i: the contiguous run of bins around i with mean transfer > 0 (``reach_first``,
        ``reach_last`` bin indices; -1 when bin i does not help itself), ``helps`` (bins with transfer > 0)
        and ``hurts`` (bins with transfer < 0)."""
        rows = []
        for i in range(self.K):
            pos = self.matrix[i] > 0
            lo = hi = i
            if pos[i]:
                while lo > 0 and pos[lo - 1]:
                    lo -= 1
                while hi < self.K - 1 and pos[hi + 1]:
                    hi += 1
            else:
                lo = hi = -1
            rows.append((i, self.labels[i], lo, hi, 0 if lo < 0 else hi - lo + 1, int(pos.sum()), int((self.matrix[i] < 0).sum())))
        return pd.DataFrame(rows, columns=["source", "source_label", "reach_first", "reach_last", "reach_bins", "helps", "hurts"])

    def reach_lines(self) -> list[str]:
        """One sentence per bin, e.g. ``"bin 200-299: helps bins 100-399 (3 bins), hurts 7 bins"``."""
        lines = []
        for r in self.reach_frame().itertuples():
            if r.reach_first < 0:
                text = f"bin {r.source_label}: does not lower its own loss; helps {r.helps} bins"
            else:
                lo = self.labels[r.reach_first].split("-")[0]
                hi = self.labels[r.reach_last].split("-")[-1]
                text = f"bin {r.source_label}: helps bins {lo}-{hi} ({r.reach_bins} bin{'s' if r.reach_bins > 1 else ''})"
                if r.helps > r.reach_bins:
                    text += f" and {r.helps - r.reach_bins} more elsewhere"
            lines.append(f"{text}, hurts {r.hurts} bin{'' if r.hurts == 1 else 's'}")
        return lines


def _as_data(data: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(data, torch.Tensor):
        images, labels = data, None
    elif hasattr(data, "images"):
        images, labels = data.images, getattr(data, "labels", None)
    else:
        raise ValueError(f"data must be an image tensor (N, C, H, W) or an ImageDataset, got {type(data).__name__}")
    if images.ndim < 2 or images.shape[0] == 0:
        raise ValueError(f"data must hold at least one image (N, C, H, W), got shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("the images contain NaN or Inf; clean the data first")
    return images, labels


def _first_order(model: nn.Module, streams: Sequence[BatchStream], eval_set: EvalSet, before: torch.Tensor,
                 schedule: NoiseSchedule, prediction: str, config: TransferConfig) -> np.ndarray:
    """``lr * G[c, C + j] / L_j(theta_0)`` (C x K) from one task_gram over fine-tuning batches + evaluation set.

    Each stream is replayed from its seed, so its first batch is the one the (first) step used."""
    C = len(streams)
    first = [BatchStream(s.source, int(s.generator.initial_seed()), s.images, s.labels, s.batch_size, s.conditioning).next()
             for s in streams]
    x0 = torch.cat([b[0] for b in first] + [eval_set.x0])
    t = torch.cat([b[1] for b in first] + [eval_set.t])
    noise = torch.cat([b[2] for b in first] + [eval_set.noise])
    task = torch.cat([torch.full((b[1].numel(),), c, dtype=torch.long) for c, b in enumerate(first)] + [C + eval_set.task.cpu()])
    kw = {k: torch.cat([b[3][k] for b in first] + [eval_set.model_kwargs[k]]) for k in eval_set.model_kwargs}
    mine = dist.shard(t.numel()).to(x0.device)  # under torchrun each rank takes its share; the Gram is of the union
    res = task_gram(model, x0[mine], t[mine], task[mine.cpu()], K=C + eval_set.K, schedule=schedule, prediction=prediction,
                    loss_space="x0", noise=noise[mine], model_kwargs={k: v[mine] for k, v in kw.items()},
                    method=config.gram_method)
    G = res.gram.numpy()
    return config.lr * G[:C, C:] / before.numpy()[None, :]


def run_transfer(model: nn.Module, data: Any, bins: TimestepBins, config: TransferConfig, *,
                 schedule: NoiseSchedule, prediction: Optional[str] = None,
                 resume_dir: Optional[Union[str, Path]] = None,
                 identity_extra: Optional[dict[str, Any]] = None) -> TransferResult:
    """The transfer matrix of ``model`` for ``config`` (see the module docstring and ``transfer_matrix``).

    ``resume_dir``: keep the rows of each finished seed there (``resume.py``), and skip the seeds already
    there when the run is started again with the same model, data and config. ``identity_extra``: more of what
    the rows depend on, recorded there too (e.g. ``{"weights": "ema"}``; a ``_names`` dict names values in a
    refusal, e.g. ``{"data": "mnist"}``)."""
    start = time.perf_counter()
    check_samples_independent(model)
    if prediction is None:
        prediction = getattr(getattr(model, "config", None), "prediction", None)
        if prediction is None:
            raise ValueError("pass prediction= ('eps', 'x0' or 'v'): the model has no config.prediction")
    prediction = normalize_prediction(prediction)
    if bins.T != schedule.T:
        raise ValueError(f"the bins cover T = {bins.T} timesteps but the schedule has T = {schedule.T}; build them from schedule.T")
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("the model has no parameters: there is nothing to fine-tune")
    device, dtype = first.device, first.dtype if first.is_floating_point() else torch.float32
    images, labels = _as_data(data)
    images = images.to(device, dtype)
    conditional = int(getattr(getattr(model, "config", None), "num_classes", 0) or 0) > 0
    use_labels = labels.to(device) if conditional and labels is not None and bool((labels >= 0).all()) else None
    conditioning = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                    for k, v in (getattr(data, "conditioning", None) or {}).items()}  # e.g. text embeddings, by name
    sources = sources_of(bins, config.include_all)
    C, K = len(sources), bins.K
    mine = [c for c in range(C) if c % dist.world_size() == dist.rank()]
    theta0 = base_params(model)
    frames, used_batched = [], config.batched
    seeds = config.seed_list()
    log, done = None, set()
    if resume_dir is not None:
        # a seed's rows depend on neither the other seeds nor how the copies are run (batched or not, chunks)
        skip = {"progress", "seeds", "seed", "batched", "eval_chunk"}
        identity = {**{k: v for k, v in config.to_dict().items() if k not in skip}, "bins": list(map(int, bins.edges)),
                    "T": schedule.T, "prediction": prediction, "model": fingerprint(theta0.values()),
                    "data": fingerprint([images, use_labels] + [conditioning[k] for k in sorted(conditioning)]),
                    **(identity_extra or {})}
        log = SeedLog(resume_dir, identity)
        previous, done = log.finished(seeds)
        if previous is not None:
            frames.append(previous)
    for seed in tqdm(seeds, desc="transfer seeds", disable=not config.progress or len(seeds) == 1 or not dist.is_main()):
        if seed in done:
            continue
        eval_set = draw_eval_set(images, use_labels, bins, config.eval_samples, derive_seed(seed, _EVAL),
                                 device=device, dtype=dtype, conditioning=conditioning)
        before = evaluate_losses(model, eval_set, schedule, prediction, theta0, chunk=config.eval_chunk)
        if not bool((before > 0).all()):
            raise ValueError(f"the loss of bin(s) {torch.nonzero(before <= 0).flatten().tolist()} is 0 at theta_0: "
                             "the relative reduction is undefined")
        streams = [BatchStream(sources[c], derive_seed(seed, _FT, sources[c].index + 1), images, use_labels, config.batch_size,
                               conditioning) for c in range(C)]
        after = torch.zeros(C, K, dtype=torch.float64)
        if mine:
            quiet = config if dist.is_main() else TransferConfig(**{**config.__dict__, "progress": False})
            ft = finetune_copies(model, [streams[c] for c in mine], quiet, schedule, prediction, desc=f"seed {seed}")
            used_batched = used_batched and ft.batched
            for local, c in enumerate(mine):
                after[c] = evaluate_losses(model, eval_set, schedule, prediction, ft.copy_params(local), chunk=config.eval_chunk)
        after = dist.all_reduce_sum(after)
        fo = (_first_order(model, streams, eval_set, before, schedule, prediction, config)
              if config.first_order else np.full((C, K), np.nan))
        frames.append(_rows(seed, sources, bins, before.numpy(), after.numpy(), fo))
        if log is not None:
            log.record(pd.concat(frames, ignore_index=True))
    return _result(pd.concat(frames, ignore_index=True), bins, config, time.perf_counter() - start, used_batched)


def _rows(seed: int, sources: list[Source], bins: TimestepBins, before: np.ndarray, after: np.ndarray, fo: np.ndarray) -> pd.DataFrame:
    C, K = after.shape
    src = np.repeat(np.arange(C), K)
    tgt = np.tile(np.arange(K), C)
    s_index = np.array([s.index for s in sources])[src]
    return pd.DataFrame({
        "seed": seed,
        "source": s_index,
        "source_label": [sources[c].label for c in src],
        "source_t_low": [sources[c].low for c in src],
        "source_t_high": [sources[c].high - 1 for c in src],
        "target": tgt,
        "target_label": [bins.labels[j] for j in tgt],
        "target_t_low": bins.lows[tgt],
        "target_t_high": bins.highs[tgt] - 1,
        "distance": np.where(s_index >= 0, tgt - s_index, np.nan),
        "loss_before": before[tgt],
        "loss_after": after.reshape(-1),
        "transfer": relative_reduction(before[None, :], after).reshape(-1),
        "first_order": fo.reshape(-1),
    })


def _result(frame: pd.DataFrame, bins: TimestepBins, config: TransferConfig, seconds: float, batched: bool) -> TransferResult:
    K = bins.K

    def stats(column: str, source: int) -> tuple[np.ndarray, np.ndarray]:
        sub = frame[frame["source"] == source].pivot(index="seed", columns="target", values=column).reindex(columns=range(K))
        values = sub.to_numpy(dtype=np.float64)
        n = values.shape[0]
        se = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(K, np.nan)
        return values.mean(axis=0), se

    rows = [stats("transfer", i) for i in range(K)]
    matrix, stderr = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    all_row = all_se = None
    if config.include_all:
        all_row, all_se = stats("transfer", -1)
    fo = np.stack([stats("first_order", i)[0] for i in range(K)]) if config.first_order else None
    return TransferResult(frame, list(bins.labels), matrix, stderr, all_row, all_se, fo, config, seconds, batched)


def result_from_frame(frame: pd.DataFrame, bins: TimestepBins, config: TransferConfig) -> TransferResult:
    """A ``TransferResult`` rebuilt from its tidy ``frame`` (e.g. read back from CSV by a cached pipeline)."""
    return _result(frame, bins, config, 0.0, config.batched)


def transfer_matrix(model: nn.Module, data: Any, bins: TimestepBins, *, steps: Optional[int] = None, lr: float,
                    optimizer: str = "adamw", eval_samples: int = 64, seeds: Union[int, Sequence[int]] = 1,
                    schedule: NoiseSchedule, prediction: Optional[str] = None, batch_size: int = 16,
                    weight_decay: float = 0.0, grad_clip: Optional[float] = None, include_all: bool = True,
                    mode: str = "finetune", batched: bool = True, progress: bool = True, seed: int = 0,
                    first_order: bool = False, gram_method: str = "fused", eval_chunk: int = 512,
                    resume_dir: Optional[Union[str, Path]] = None) -> TransferResult:
    """Cross-bin transfer matrix of ``model`` (see the module docstring; fields as ``TransferConfig``).

    Args:
        model: ``model(x_t, t, y=None)``, fine-tuned from its current parameters (theta_0; left unchanged).
        data: images ``(N, C, H, W)`` or an ``ImageDataset`` (its labels go to class-conditional models as y, its
            ``conditioning`` tensors to the model by name with their images).
        bins: the K timestep bins (sources and targets); ``schedule``: the model's noise schedule;
            ``prediction``: "eps", "x0" or "v" (default ``model.config.prediction``).
        steps, lr, optimizer, batch_size, weight_decay, grad_clip: fine-tuning of each copy.
        eval_samples: samples per bin in each seed's evaluation set; seeds: count or list (base ``seed``).
        mode: "finetune" or "lookahead" (one SGD step; also computes ``first_order``).
        batched: vmap over copies (else sequential); progress: tqdm bars.
        resume_dir: a folder that keeps each finished seed's rows; rerun with it to skip them (``resume.py``).

    Returns:
        ``TransferResult`` (``.frame``, ``.matrix``, ``.stderr``, ``.all_row``, ``.first_order``, ``.labels``).
    """
    config = TransferConfig(steps=steps, lr=lr, optimizer=optimizer, eval_samples=eval_samples, seeds=seeds, seed=seed,
                            batch_size=batch_size, weight_decay=weight_decay, grad_clip=grad_clip, include_all=include_all,
                            mode=mode, batched=batched, first_order=first_order, gram_method=gram_method,
                            eval_chunk=eval_chunk, progress=progress)
    return run_transfer(model, data, bins, config, schedule=schedule, prediction=prediction, resume_dir=resume_dir)
