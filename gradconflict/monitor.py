"""``Monitor``: gradient conflicts between timestep bins, watched from inside your own training loop.

Every ``every`` steps, ``monitor.step(step, x0, **model_kwargs)`` draws ``per_task`` timesteps per bin over
samples of the batch ``x0``, computes the fused Gram ``G[k, l] = <g_k, g_l>`` of the per-bin gradients of the
x0-unit loss (:func:`gradconflict.task_gram`: one forward and one backward over ``K * per_task`` samples) and
appends to tidy CSVs in ``out`` (rewritten atomically; a rerun into the same folder skips the steps it holds):

* ``monitor_metrics.csv``: step, K, samples, mean_loss, mean/min cosine, conflict_share, norm_ratio_max_min,
  diag_min, diag_max, trace, lam_abs, pareto_objective ``f* = min_w w^T G w + lam_abs ||w||^2`` (w on the
  simplex, ``lam_abs = lam * trace(G) / K``), reg_share ``lam_abs ||w*||^2 / f*``, seconds
* ``monitor_weights.csv``: step, bin, label, weight (the exact optimum ``w*``)
* ``monitor_scores.csv``: step, strategy, objective ``f(w_s)``, ratio ``f(w_s) / f*``, excess ``f(w_s) - f*``
* ``monitor_grams.npz``: the Grams ``grams`` (N, K, K) with ``steps`` (N,) and the bins' ``labels``, ``t_low``,
  ``t_high`` (K,) as arrays (``gradconflict.gram_archive``; also under the older keys ``step{S}``); ``monitor_config.json``: what the results depend on

and, when TensorBoard is installed (``pip install gradconflict[monitor]``), the scalars and the cosine heatmap
under ``out/tensorboard``. The draw comes from the monitor's own generator seeded with ``(seed, step)``; the
model's ``.grad``, training modes, ``requires_grad`` flags and the global torch RNG are left exactly as found,
and the optimizer is never touched, so a run with the monitor trains bit for bit like one without it.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import conflict
from ._io import record_identity, write_csv
from .adaptive.base import preserve_state
from .bins import TimestepBins
from .engine import task_gram
from .gram_archive import read_gram_archive, write_gram_archive
from .engine.inputs import as_schedule
from .schedule import NoiseSchedule, prediction_type_of
from .targets import normalize_prediction
from .weighting import as_strategy, check_unique_names

__all__ = ["Monitor", "MONITOR_FILES"]

MONITOR_FILES = ("monitor_metrics.csv", "monitor_weights.csv", "monitor_scores.csv", "monitor_grams.npz")
DEFAULT_STRATEGIES = ("constant", "snr", "max_snr:1", "min_snr:5")


class Monitor:
    """Conflict metrics, exact Pareto weights and strategy scores every ``every`` steps of your training loop.

    Args:
        model: the model being trained, ``model(x_t, t, **model_kwargs)`` -> prediction shaped like ``x_t``
            (a diffusers ``.sample`` output is unwrapped).
        schedule: a :class:`~gradconflict.NoiseSchedule` or a diffusers scheduler (read from ``alphas_cumprod``).
        prediction: "eps", "x0" or "v"; None (default): the diffusers scheduler's prediction type, else "eps".
        bins: K uniform timestep bins (an int) or a :class:`~gradconflict.TimestepBins`.
        every: record at the steps with ``step % every == 0``.
        out: folder of the CSVs (None: keep the results in memory only, see :attr:`metrics`).
        lam: the Pareto regularizer relative to the Gram's scale, ``lam_abs = lam * trace(G) / K`` (as in track).
        strategies: weightings scored against the optimum (``weighting.by_name`` specs, strategy objects or
            functions ``snr -> x0-unit weight``; names must be unique).
        per_task: samples per bin in each Gram (``K * per_task`` samples, drawn from ``x0`` and cycled through
            it when it holds fewer).
        seed: seed of the monitor's own draw; step s uses ``seed * 1_000_003 + s``.
        loss_space: units of each bin's loss ("x0", as in the paper's analysis).
        tensorboard: None (default): log to ``out/tensorboard`` when tensorboard is installed and ``out`` is
            given; True: require it; False: never; or a ``SummaryWriter``-like object (``add_scalar``,
            ``add_image``).
        autocast_dtype: run the Gram's forward under ``torch.autocast`` with this dtype (e.g. torch.bfloat16).
    """

    def __init__(self, model: nn.Module, *, schedule: Any, prediction: Optional[str] = None,
                 bins: Union[int, TimestepBins] = 10, every: int = 100, out: Union[str, Path, None] = None,
                 lam: float = 0.1, strategies: Sequence[Any] = DEFAULT_STRATEGIES, per_task: int = 4, seed: int = 0,
                 loss_space: str = "x0", tensorboard: Any = None,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.schedule: NoiseSchedule = as_schedule(schedule)
        if prediction is None:
            prediction = "eps" if isinstance(schedule, NoiseSchedule) else prediction_type_of(schedule)
        self.prediction = normalize_prediction(prediction)
        self.loss_space = normalize_prediction(loss_space, "loss_space")
        self.bins = _as_bins(bins, self.schedule)
        for name, value in (("every", every), ("per_task", per_task)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0 (relative to trace(G)/K), got {lam!r}")
        self.every, self.per_task, self.seed, self.lam = int(every), int(per_task), int(seed), float(lam)
        self.strategies = [as_strategy(s) for s in strategies]
        check_unique_names([s.name for s in self.strategies])
        self.autocast_dtype = autocast_dtype
        self.out = Path(out) if out is not None else None
        self.grams: dict[int, np.ndarray] = {}
        self._metrics, self._weights, self._scores = _empty(), _empty(), _empty()
        if self.out is not None:
            record_identity(self.out / "monitor_config.json", self.identity(), "monitor results of another config",
                            f"use another out folder (or the options it was made with), or remove {self.out}")
            self._load()
        self._writer = _writer(tensorboard, self.out)

    # ------------------------------------------------------------------ results
    @property
    def metrics(self) -> pd.DataFrame:
        """One row per recorded step (the columns of ``monitor_metrics.csv``)."""
        return self._metrics.copy()

    @property
    def weights(self) -> pd.DataFrame:
        """The exact Pareto weights, one row per recorded step and bin."""
        return self._weights.copy()

    @property
    def scores(self) -> pd.DataFrame:
        """Each strategy's objective and ratio to the optimum, one row per recorded step and strategy."""
        return self._scores.copy()

    @property
    def steps(self) -> list[int]:
        """The steps recorded so far (including those found in ``out`` at start)."""
        return sorted(int(s) for s in self._metrics["step"]) if len(self._metrics) else []

    def identity(self) -> dict[str, Any]:
        """What the folder's results depend on, besides the model and the data (recorded in monitor_config.json)."""
        from .track.run import _strategy_identity  # the same strategy identity as track's folders

        a = np.ascontiguousarray(self.schedule.alphas_cumprod, dtype=np.float64)
        return {"every": self.every, "bin_edges": [int(e) for e in self.bins.edges], "per_task": self.per_task,
                "seed": self.seed, "lam": self.lam, "prediction": self.prediction, "loss_space": self.loss_space,
                "T": self.schedule.T, "schedule": hashlib.sha256(a.tobytes()).hexdigest()[:16],
                "strategies": [_strategy_identity(s) for s in self.strategies]}

    # ------------------------------------------------------------------ the step
    def due(self, step: int) -> bool:
        """True when ``step`` is a multiple of ``every`` and not recorded yet."""
        return int(step) % self.every == 0 and int(step) not in set(self.steps)

    def draw(self, x0: torch.Tensor, step: int, **model_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor, dict]:
        """``(x0_sub, t, noise, kwargs_sub)`` of the Gram at ``step``: ``per_task`` timesteps per bin, grouped by
        bin, samples of ``x0`` in a random order cycled as needed, Gaussian noise (float32, then ``x0``'s dtype);
        all from a CPU generator seeded with ``seed * 1_000_003 + step``. Tensor kwargs with ``len(x0)`` rows
        are indexed like ``x0``; other kwargs pass through."""
        if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or x0.shape[0] == 0 or not x0.is_floating_point():
            raise ValueError(f"x0 must be a floating tensor (N, ...) with N >= 1 samples, got "
                             f"{type(x0).__name__} {tuple(getattr(x0, 'shape', ()))}; pass the clean training batch")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        t, _ = self.bins.sample(self.per_task, generator=g)
        n, m = x0.shape[0], t.numel()
        idx = torch.randperm(n, generator=g)[torch.arange(m) % n]
        noise = torch.randn((m, *x0.shape[1:]), generator=g)
        dev_idx = idx.to(x0.device)
        kwargs = {k: v.detach()[dev_idx] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v
                  for k, v in model_kwargs.items()}
        return x0.detach()[dev_idx], t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype), kwargs

    def step(self, step: int, x0: torch.Tensor, **model_kwargs: Any) -> Optional[dict[str, Any]]:
        """Record ``step`` when due (see :meth:`due`): the row of ``monitor_metrics.csv`` it appended, else None.

        Cost: one forward and one backward over ``K * per_task`` samples (plus, on the first call, the fused
        method's one-off self-check), i.e. about ``K * per_task / batch_size`` training steps every ``every``."""
        if not self.due(step):
            return None
        step = int(step)
        xs, t, noise, kwargs = self.draw(x0, step, **model_kwargs)
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        start = time.perf_counter()
        try:
            with preserve_state(self.model):
                res = task_gram(self.model, xs, t, self.bins, schedule=self.schedule, prediction=self.prediction,
                                loss_space=self.loss_space, noise=noise, model_kwargs=kwargs,
                                autocast_dtype=self.autocast_dtype)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        seconds = time.perf_counter() - start
        G = res.gram.numpy().astype(np.float64)
        row, weight_rows, score_rows = self._analyze(step, G, float(res.losses.mean()), seconds, xs.shape[0])
        self.grams[step] = G
        self._metrics = _append(self._metrics, [row])
        self._weights = _append(self._weights, weight_rows)
        self._scores = _append(self._scores, score_rows)
        if self.out is not None:
            self._save()
        if self._writer is not None:
            self._log(step, row, G, score_rows)
        return row

    def _analyze(self, step: int, G: np.ndarray, mean_loss: float, seconds: float, samples: int
                 ) -> tuple[dict, list[dict], list[dict]]:
        """The metrics row and the weight and score rows of one Gram (the analysis of ``track``'s checkpoints)."""
        from .track.analyze import analyze_gram
        from .track.config import TrackConfig

        config = TrackConfig(bins=self.bins.K, per_task=self.per_task, resamples=1, lam=self.lam, solvers=("auto",),
                             strategies=(), loss_space=self.loss_space, seed=self.seed)
        weights, objectives = analyze_gram(G, self.bins, self.schedule, config, self.strategies)
        best = next(o for o in objectives if o["kind"] == "solver")
        w_star = np.array([w["weight"] for w in weights if w["kind"] == "solver"])
        f_star, lam_abs = float(best["objective"]), float(best["lam_abs"])
        summary = conflict.summary(G)
        diag = np.diag(G)
        row = {"step": step, "K": self.bins.K, "samples": int(samples), "mean_loss": mean_loss,
               "mean_cosine": summary["mean_cosine"], "min_cosine": summary["min_cosine"],
               "conflict_share": summary["conflict_share"], "norm_ratio_max_min": summary["norm_ratio_max_min"],
               "diag_min": float(diag.min()), "diag_max": float(diag.max()), "trace": float(np.trace(G)),
               "lam_abs": lam_abs, "pareto_objective": f_star,
               "reg_share": float(lam_abs * np.sum(w_star**2) / f_star) if f_star > 0 else float("nan"),
               "seconds": seconds}
        weight_rows = [{"step": step, "bin": w["bin"], "label": w["label"], "weight": w["weight"]}
                       for w in weights if w["kind"] == "solver"]
        score_rows = [{"step": step, "strategy": o["name"], "objective": o["objective"], "ratio": o["ratio"],
                       "excess": o["excess"]} for o in objectives if o["kind"] == "strategy"]
        return row, weight_rows, score_rows

    # ------------------------------------------------------------------ files
    def _load(self) -> None:
        """The results already in ``out``: a step counts once its metrics row is saved (written last)."""
        path = self.out / "monitor_metrics.csv"
        if not path.is_file():
            return
        self._metrics = pd.read_csv(path).drop_duplicates("step", keep="last").reset_index(drop=True)
        done = set(self._metrics["step"])
        for name, attr in (("monitor_weights.csv", "_weights"), ("monitor_scores.csv", "_scores")):
            if (self.out / name).is_file():
                frame = pd.read_csv(self.out / name)
                setattr(self, attr, frame[frame["step"].isin(done)].reset_index(drop=True))
        if (self.out / "monitor_grams.npz").is_file():
            archive = read_gram_archive(self.out / "monitor_grams.npz")  # new or older (keys only) archives
            self.grams = {key[0]: G for key, G in archive.as_dict().items() if key[0] in done}

    def _save(self) -> None:
        """Weights, scores and Grams first, the metrics last (the commit point of :meth:`_load`)."""
        write_csv(self._weights, self.out / "monitor_weights.csv")
        write_csv(self._scores, self.out / "monitor_scores.csv")
        write_gram_archive(self.out / "monitor_grams.npz", self.grams, self.bins, resamples=False)
        write_csv(self._metrics, self.out / "monitor_metrics.csv")

    def _log(self, step: int, row: dict, G: np.ndarray, score_rows: list[dict]) -> None:
        for key in ("mean_cosine", "min_cosine", "conflict_share", "pareto_objective", "reg_share", "mean_loss"):
            self._writer.add_scalar(f"conflict/{key}", row[key], step)
        for w in self._weights[self._weights["step"] == step].itertuples():
            self._writer.add_scalar(f"pareto_weight/{w.bin:02d}_{w.label}", w.weight, step)
        for s in score_rows:
            self._writer.add_scalar(f"strategy_ratio/{s['strategy']}", s["ratio"], step)
        self._writer.add_image("conflict/cosine", cosine_image(G, self.bins.labels, step), step, dataformats="HWC")
        if hasattr(self._writer, "flush"):
            self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer (if any)."""
        if self._writer is not None and hasattr(self._writer, "close"):
            self._writer.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor(K={self.bins.K}, every={self.every}, per_task={self.per_task}, lam={self.lam}, "
                f"out={str(self.out) if self.out else None!r}, steps={len(self.steps)})")


def cosine_image(G: np.ndarray, labels: Sequence[str], step: int) -> np.ndarray:
    """The cosine matrix of ``G`` as an RGB heatmap (H, W, 3) uint8, red = conflict (cosine < 0)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 3.6), dpi=80)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(conflict.cosine(G), cmap="RdBu", vmin=-1, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax.set_yticks(range(len(labels)), labels, fontsize=5)
    ax.set_title(f"cosine of bin gradients, step {step}", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _as_bins(bins: Union[int, TimestepBins], schedule: NoiseSchedule) -> TimestepBins:
    if isinstance(bins, TimestepBins):
        if bins.T != schedule.T:
            raise ValueError(f"the bins cover T = {bins.T} timesteps but the schedule has T = {schedule.T}; build "
                             "them with TimestepBins.uniform(schedule.T, K)")
        return bins
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 1 <= bins <= schedule.T:
        raise ValueError(f"bins must be a TimestepBins or a whole number of bins in [1, T = {schedule.T}], got {bins!r}")
    return TimestepBins.uniform(schedule.T, int(bins))


def _writer(tensorboard: Any, out: Optional[Path]) -> Any:
    """The SummaryWriter to log to, or None (see ``Monitor``'s ``tensorboard``)."""
    if tensorboard is False or (tensorboard is None and out is None):
        return None
    if tensorboard is not None and tensorboard is not True:
        if not hasattr(tensorboard, "add_scalar") or not hasattr(tensorboard, "add_image"):
            raise ValueError(f"tensorboard must be None, True, False or a SummaryWriter, got {type(tensorboard).__name__}")
        return tensorboard
    if out is None:
        raise ValueError("tensorboard=True needs an out folder (the logs go to out/tensorboard); pass out=...")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if tensorboard is True:
            raise ValueError("tensorboard=True but tensorboard is not installed; pip install gradconflict[monitor] "
                             "(or tensorboard), or leave tensorboard=None") from None
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _empty() -> pd.DataFrame:
    return pd.DataFrame()


def _append(frame: pd.DataFrame, rows: list[dict]) -> pd.DataFrame:
    new = pd.DataFrame(rows)
    return new if frame.empty else pd.concat([frame, new], ignore_index=True)
