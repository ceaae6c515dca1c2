"""Pareto weights recomputed during training: ``pareto_online`` (exact) and ``ugd_online`` (the paper's UGD).

Every ``every`` steps, on the current batch:

1. draw ``per_task`` timesteps per bin (``bins.sample``, stratified), ``per_task * K`` images of the batch
   (a random choice without replacement, with replacement when the batch is smaller) and their noise, all
   from a generator seeded by ``(seed, step)``: the trainer's RNG streams are untouched and a resumed run
   draws the same samples;
2. ``G = task_gram(model, ..., loss_space="x0")``: the Gram of the per-bin gradients of the **x0-unit**
   loss, the space in which the paper poses the Pareto problem (fused engine; model in eval mode);
3. ``lam_abs = lam_rel * trace(G) / K`` (the analysis' rule, ``track.absolute_lam``) and
   ``w = argmin_{w in simplex} w^T (G + lam_abs I) w``: exactly with ``pareto.solve(method="auto")``
   (``pareto_online``), or by ``ugd_steps`` plain gradient steps on ``beta`` with ``w = softmax(beta)``,
   warm-started from the previous ``beta`` (``ugd_online``, the paper's strategy 5).

**Normalization.** Until the next update, a sample at timestep t in bin k gets the x0-unit weight
``K * w_k`` (piecewise constant in t), so the mean weight over the bins is 1: uniform Pareto weights
``w = 1/K`` give exactly the ``constant`` strategy, and the effective learning rate stays that of a loss
whose weights average 1 over bins. In the model's units the weight is ``K w_k / c(SNR_t)`` (``base.py``).
Before the first update the weights are uniform.

What the model predicts: ``prediction=`` if given, else ``model.config.prediction`` (the built-in models), else
"eps". ``step()`` leaves the model's ``.grad``, its train/eval mode and the global torch RNG exactly as found.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..bins import TimestepBins
from ..engine.gram import task_gram
from ..pareto import solve
from ..pareto.solver import normalize
from ..pareto.ugd import softmax
from ..schedule import NoiseSchedule
from ..targets import normalize_prediction
from .base import AdaptiveWeighting, preserve_state

__all__ = ["ParetoOnline", "UGDOnline", "pareto_online", "ugd_online", "relative_lam"]


def relative_lam(G: np.ndarray, lam_rel: float) -> float:
    """``lam_abs = lam_rel * trace(G) / K``: the ridge relative to the mean squared task-gradient norm."""
    G = np.asarray(G, dtype=np.float64)
    return float(lam_rel * np.trace(G) / G.shape[-1])


class _OnlineGram(AdaptiveWeighting):
    """Shared machinery: the seeded draw, the fused Gram and the piecewise-constant bin weights."""

    kind = "online"

    def __init__(self, bins: TimestepBins, schedule: NoiseSchedule, *, every: int, per_task: int, lam_rel: float,
                 seed: int = 0, autocast_dtype: Optional[torch.dtype] = None, gram_check: Any = "once",
                 prediction: Optional[str] = None) -> None:
        if not isinstance(bins, TimestepBins):
            raise ValueError(f"{self.kind} needs the TimestepBins of its tasks, got {bins!r}; pass "
                             "bins=TimestepBins.uniform(T, K)")
        if schedule is None or schedule.T != bins.T:
            raise ValueError(f"{self.kind} needs the NoiseSchedule of the bins (T = {bins.T}), got {schedule!r}")
        for label, value in (("every", every), ("per_task", per_task)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if not (np.isfinite(lam_rel) and lam_rel >= 0):
            raise ValueError(f"lam_rel must be a finite number >= 0 (relative to trace(G)/K), got {lam_rel!r}")
        self.bins, self.schedule = bins, schedule
        self.every, self.per_task, self.lam_rel, self.seed = int(every), int(per_task), float(lam_rel), int(seed)
        self.autocast_dtype, self.gram_check = autocast_dtype, gram_check
        self.prediction = None if prediction is None else normalize_prediction(prediction)
        self.weights = np.full(bins.K, 1.0 / bins.K)  # simplex weights per bin, x0 units
        self.updates = 0
        self.last_gram: Optional[np.ndarray] = None
        self._task_of = torch.as_tensor(np.asarray(bins.task_of(np.arange(bins.T))))

    # ------------------------------------------------------------------ weights
    def x0_weights(self, t: torch.Tensor, *, schedule: NoiseSchedule) -> torch.Tensor:
        """``K * w_k`` for the bin k of each timestep (float64, CPU)."""
        per_bin = torch.from_numpy(self.bins.K * self.weights)
        return per_bin[self._task_of[t.detach().cpu().long()]]

    def bin_weights(self) -> np.ndarray:
        """The current simplex weights per bin (x0 units), a copy."""
        return self.weights.copy()

    # ------------------------------------------------------------------ online update
    def draw(self, x0: torch.Tensor, step: int, model_kwargs: Optional[dict] = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        """``(x0_sub, t, noise, kwargs_sub)`` of the update at ``step``: ``per_task`` timesteps per bin, grouped
        by bin, from the generator seeded with ``(seed, step)`` (CPU draw, moved to ``x0``'s device)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(step))
        t, _ = self.bins.sample(self.per_task, generator=g)
        n, m = x0.shape[0], t.numel()
        idx = torch.randperm(n, generator=g)[:m] if n >= m else torch.randint(0, n, (m,), generator=g)
        noise = torch.randn((m, *x0.shape[1:]), generator=g, dtype=torch.float64)
        dev_idx = idx.to(x0.device)
        kwargs = {k: v[dev_idx] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v
                  for k, v in (model_kwargs or {}).items()}
        return x0[dev_idx], t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype), kwargs

    def gram(self, model: nn.Module, x0: torch.Tensor, step: int, model_kwargs: Optional[dict] = None) -> np.ndarray:
        """The x0-unit Gram (K x K, float64) of the update at ``step`` on the batch ``x0``."""
        xs, t, noise, kwargs = self.draw(x0, step, model_kwargs)
        prediction = self.prediction or getattr(getattr(model, "config", None), "prediction", None) or "eps"
        with preserve_state(model):
            res = task_gram(model, xs, t, self.bins, schedule=self.schedule, prediction=prediction, loss_space="x0",
                            noise=noise, model_kwargs=kwargs, autocast_dtype=self.autocast_dtype, check=self.gram_check)
        return res.gram.numpy().astype(np.float64)

    def step(self, model: nn.Module, x0: torch.Tensor, *, step: int, model_kwargs: Optional[dict] = None) -> None:
        """Recompute the weights from the current batch when ``step % every == 0``; otherwise nothing."""
        if int(step) % self.every:
            return
        G = self.gram(model, x0, step, model_kwargs)
        self.last_gram = G
        self.weights = self.update(G)
        self.updates += 1

    def update(self, G: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"weights": torch.from_numpy(self.weights.copy()), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        w = state["weights"].detach().cpu().double().numpy().copy()
        if w.shape != (self.bins.K,):
            raise ValueError(f"the saved {self.kind} state holds {w.shape[0]} bin weights but these bins have K = "
                             f"{self.bins.K}; resume with the same bins")
        self.weights, self.updates = w, int(state["updates"])


class ParetoOnline(_OnlineGram):
    """Exact regularized Pareto weights of the current batch, recomputed every ``every`` steps (module docstring)."""

    kind = "pareto_online"

    def __init__(self, bins: TimestepBins, schedule: NoiseSchedule, *, every: int = 10, per_task: int = 2,
                 lam_rel: float = 0.1, **kw: Any) -> None:
        super().__init__(bins, schedule, every=every, per_task=per_task, lam_rel=lam_rel, **kw)
        self.name = f"pareto_online_{self.every}"
        self.spec = f"pareto_online:{self.every}"

    def update(self, G: np.ndarray) -> np.ndarray:
        """``argmin_{w in simplex} w^T (G + lam_abs I) w``, ``lam_abs = lam_rel trace(G) / K`` (exact, active set)."""
        return np.asarray(solve(G, relative_lam(G, self.lam_rel), method="auto").weights, dtype=np.float64)


class UGDOnline(_OnlineGram):
    """The paper's UGD recomputed online: ``ugd_steps`` gradient steps per update on ``beta``, ``w = softmax(beta)``,
    warm-started from the previous ``beta``.

    With ``Q = (G + lam_abs I) / s``, ``s = max_k (G_kk + lam_abs)`` (``pareto.solve``'s scale-free normalization),
    ``g = Q w`` and ``f = w^T g``, one step is ``beta <- beta - lr * 2 w * (g - f)`` (plain gradient descent;
    ``lr = 10`` is ``pareto.ugd``'s SGD default on the normalized problem).
    """

    kind = "ugd_online"

    def __init__(self, bins: TimestepBins, schedule: NoiseSchedule, *, every: int = 1, per_task: int = 2,
                 lam_rel: float = 0.1, ugd_steps: int = 10, lr: float = 10.0, **kw: Any) -> None:
        super().__init__(bins, schedule, every=every, per_task=per_task, lam_rel=lam_rel, **kw)
        if not isinstance(ugd_steps, (int, np.integer)) or ugd_steps < 1:
            raise ValueError(f"ugd_steps must be a positive integer, got {ugd_steps!r}")
        if not (np.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        self.ugd_steps, self.lr = int(ugd_steps), float(lr)
        self.beta = np.zeros(bins.K)
        self.name = f"ugd_online_{self.every}"
        self.spec = f"ugd_online:{self.every}"

    def update(self, G: np.ndarray) -> np.ndarray:
        Q, _ = normalize(np.array(G, dtype=np.float64)[None], relative_lam(G, self.lam_rel))
        Q = Q[0]
        beta = self.beta.copy()
        for _ in range(self.ugd_steps):
            w = softmax(beta)
            g = Q @ w
            beta -= self.lr * 2.0 * w * (g - w @ g)
        self.beta = beta - beta.max()  # softmax is shift-invariant: keep beta bounded
        return softmax(self.beta)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "beta": torch.from_numpy(self.beta.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.beta = state["beta"].detach().cpu().double().numpy().copy()


def pareto_online(bins: TimestepBins, schedule: NoiseSchedule, *, every: int = 10, per_task: int = 2,
                  lam_rel: float = 0.1, seed: int = 0, **kw: Any) -> ParetoOnline:
    """Exact Pareto weights recomputed every ``every`` steps from the fused x0-unit Gram of ``per_task`` timesteps per
    bin of the current batch; ridge ``lam_rel * trace(G) / K``. Sample weight ``K * w_k`` in x0 units (see module)."""
    return ParetoOnline(bins, schedule, every=every, per_task=per_task, lam_rel=lam_rel, seed=seed, **kw)


def ugd_online(bins: TimestepBins, schedule: NoiseSchedule, *, every: int = 1, per_task: int = 2, lam_rel: float = 0.1,
               ugd_steps: int = 10, lr: float = 10.0, seed: int = 0, **kw: Any) -> UGDOnline:
    """Warm-started UGD weights (the paper's strategy 5), ``ugd_steps`` steps of size ``lr`` per update."""
    return UGDOnline(bins, schedule, every=every, per_task=per_task, lam_rel=lam_rel, ugd_steps=ugd_steps, lr=lr,
                     seed=seed, **kw)
