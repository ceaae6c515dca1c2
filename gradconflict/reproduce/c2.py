"""C2 (UGD instability) as the paper means it: UGD run online, as a trainer runs it, against sampling noise.

A trainer that weights its loss with UGD keeps ``beta`` (K logits, ``w = softmax(beta)``) and, every training
iteration, computes the Gram ``G`` (K x K, (x0 loss units)^2 / param^2) of that iteration's own small batch and takes
a few Adam steps on ``beta`` for the regularized Pareto objective

    f(w) = w^T (G + lam_abs I) w,   lam_abs = lam trace(G) / K              (1)

with ``d f / d beta = J^T (2 (G + lam_abs I) w)``, ``J = diag(w) - w w^T``
(= ``2 w * (g - f)``, ``g = (G + lam_abs I) w``).
:func:`ugd_online_step` is that step: warm-started from the previous iteration's ``beta`` and Adam moments
(persistent optimizer state, like an ``nn.Parameter`` with its own Adam; ``reset_moments=True`` restarts the moments
every iteration, which equals ``pareto.ugd(Q, steps, beta0=beta, tol=0)``), on ``Q = (G + lam_abs I) / s``,
``s = max_i (G_ii + lam_abs)`` like ``pareto.solve`` (an x0-unit Gram shrinks by decades during training; the
normalized Q keeps Adam's moments comparable between iterations), and with no stopping test (a trainer runs its
fixed number of steps).

:func:`c2_online` runs it through a training run's checkpoints and separates three sources of movement:

* UGD's own dynamics: consecutive-iteration L1 of the online UGD weights minus that of the exact optimum of the
  same small batches (``solve(method="auto")``) at the same checkpoint (``l1_excess``; the model is fixed
  there, so the exact optimum moves only by sampling noise);
* sampling noise: the consecutive-iteration L1 of the exact small-batch optimum;
* drift over training: the L1 between consecutive checkpoints' large-batch optima (and between the checkpoint
  means of the online weights).

What movement costs is the regret of the weights used, scored on an independent LARGE batch of the same checkpoint
(``eval_per_task`` samples per bin, its Gram ``G_big`` and its ``lam_abs``):

    regret(w) = (f_big(w) - f_big(w*_big)) / f_big(w*_big)     (2, >= 0; 0 for the large-batch optimum)

The replication unit is the independently trained model; checkpoints and iterations are nested inside it
(:func:`claim_c2_models`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine import sample_task_batch, task_gram
from ..pareto import solve
from ..pareto.ugd import softmax
from .c1 import MIN_MODELS, UNIT, _sign_verdict, over_models

__all__ = ["UGDState", "ugd_online_step", "pareto_regret", "c2_online", "c2_iterations", "c2_statistics",
           "c2_table", "claim_c2_models", "SOURCES"]

SOURCES = ("ugd_online", "exact_small", "exact_big", "exact_big_prev", "uniform")
ModelAt = Union[nn.Module, Callable[[], nn.Module]]


@dataclass(frozen=True)
class UGDState:
    """Online UGD's state between iterations: logits ``beta`` (K,), Adam's moments ``m``, ``v`` (K,) and its step
    count ``t`` (for the bias correction)."""

    beta: np.ndarray
    m: np.ndarray
    v: np.ndarray
    t: int = 0

    @classmethod
    def uniform(cls, K: int) -> "UGDState":
        """``beta = 0`` (uniform weights), zero moments."""
        return cls(np.zeros(K), np.zeros(K), np.zeros(K), 0)


def _normalized(G: np.ndarray, lam_abs: float) -> np.ndarray:
    Q = np.asarray(G, dtype=np.float64) + lam_abs * np.eye(G.shape[0])
    s = float(np.max(np.diag(Q)))
    return Q / (s if s > 0 else 1.0)


def ugd_online_step(G: np.ndarray, lam_abs: float, state: UGDState, *, steps: int = 5, lr: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-12,
                    reset_moments: bool = False) -> tuple[np.ndarray, UGDState]:
    """``steps`` Adam steps on ``beta`` for (1) on one iteration's Gram, from ``state``; returns ``(w, new_state)``
    with ``w = softmax(beta)`` after the steps (the weights the iteration trains with).

    Per step k (``t`` counts every step since the state was made): ``w = softmax(beta)``, ``g = Q w``,
    ``grad = 2 w * (g - w^T g)``, ``m = b1 m + (1 - b1) grad``, ``v = b2 v + (1 - b2) grad^2``,
    ``beta -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)``, on ``Q = (G + lam_abs I) / max diag``.
    ``reset_moments``: start from zero moments and ``t = 0`` (Adam restarted every iteration)."""
    G = np.asarray(G, dtype=np.float64)
    K = G.shape[0]
    if G.shape != (K, K) or state.beta.shape != (K,):
        raise ValueError(f"G must be K x K and beta (K,), got G {G.shape} and beta {state.beta.shape}")
    if int(steps) < 0 or not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"need steps >= 0 and a finite lr > 0, got steps={steps}, lr={lr}")
    Q = _normalized(G, float(lam_abs))
    b1, b2 = betas
    beta = state.beta.astype(np.float64).copy()
    m, v, t = (np.zeros(K), np.zeros(K), 0) if reset_moments else (state.m.copy(), state.v.copy(), state.t)
    for _ in range(int(steps)):
        w = softmax(beta)
        g = Q @ w
        grad = 2.0 * w * (g - w @ g)
        t += 1
        m = b1 * m + (1.0 - b1) * grad
        v = b2 * v + (1.0 - b2) * grad * grad
        beta = beta - lr * (m / (1.0 - b1 ** t)) / (np.sqrt(v / (1.0 - b2 ** t)) + eps)
    return softmax(beta), UGDState(beta, m, v, t)


def pareto_regret(G: np.ndarray, lam_abs: float, w: np.ndarray, f_star: float) -> float:
    """(2): ``(f(w) - f*) / f*`` with ``f(w) = w^T (G + lam_abs I) w``; 0 when both are 0, inf when only f* is;
    clipped at 0 (rounding below the optimum is no gain on it)."""
    w = np.asarray(w, dtype=np.float64)
    f = float(w @ np.asarray(G, dtype=np.float64) @ w + lam_abs * (w @ w))
    if f_star <= 0:
        return 0.0 if f <= 0 else float("inf")
    return max(f / f_star - 1.0, 0.0)


def _seed(seed: int, step: int, kind: int, i: int) -> int:
    """A distinct batch seed per (seed, checkpoint step, kind 0 = small / 1 = large, iteration)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step) & 0xFFFFFFFF, kind, i]).generate_state(1)[0])


def _gram(model: nn.Module, images: torch.Tensor, bins: Any, schedule: Any, prediction: str, per_task: int,
          seed: int, labels: Optional[torch.Tensor], conditional: bool, device: Any) -> np.ndarray:
    batch = sample_task_batch(images, bins, per_task, seed, labels=labels, conditional=conditional)
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = p.dtype if p is not None and p.dtype in (torch.float32, torch.float64) else None
    batch = batch.to(torch.device(device), dtype)
    res = task_gram(model, batch.x0, batch.t, bins, schedule=schedule, prediction=prediction, loss_space="x0",
                    noise=batch.noise, model_kwargs=batch.model_kwargs)
    return res.gram.numpy().astype(np.float64)


def c2_online(models: Union[Iterable[tuple[int, ModelAt]], Callable[[], Iterable[tuple[int, ModelAt]]]],
              images: torch.Tensor, schedule: Any, prediction: str, bins: Any, *, per_task: int = 2, iters: int = 8,
              burn_in: int = 16, warmup: int = 64, ugd_steps: int = 5, ugd_lr: float = 0.05, lam: float = 0.1,
              eval_per_task: int = 64,
              reset_moments: bool = False, seed: int = 0, labels: Optional[torch.Tensor] = None,
              conditional: bool = False, device: Any = "cpu", progress: bool = False) -> pd.DataFrame:
    """Online UGD through the checkpoints of ONE training run, beside the exact optima, with regrets (2).

    ``models``: ``(step, model)`` pairs in training order (a model or a zero-argument function that loads it), or a
    function returning them. At each checkpoint: ``burn_in`` unrecorded iterations (``warmup + burn_in`` at the
    first, so that the recorded iterations show UGD's steady state, not its transient from uniform weights; a
    trainer has run many iterations before any checkpoint), then ``iters`` recorded ones;
    an iteration draws its own batch of ``per_task`` samples per bin (``sample_task_batch``; seed from
    ``(seed, step, iteration)``), computes its Gram (``task_gram``, x0 units) and ``lam_abs = lam trace(G) / K``,
    and takes ``ugd_steps`` online UGD steps (:func:`ugd_online_step`, learning rate ``ugd_lr``). The state starts
    uniform at the first checkpoint and carries over between checkpoints (the trainer never restarts); the
    burn-in lets it settle on each checkpoint's model. One independent batch of ``eval_per_task`` samples per bin
    per checkpoint gives ``G_big`` and the reference optimum ``w*_big``.

    Tidy rows ``(step, iter, source, bin, weight, regret)``, one per bin of each weight vector; ``regret`` (2) is the
    vector's, scored on that checkpoint's large batch. Sources: ``ugd_online`` (the weights the iteration trains
    with), ``exact_small`` (exact optimum of the iteration's small Gram), ``exact_big`` (the reference, repeated
    per iteration, regret 0), ``exact_big_prev`` (the previous checkpoint's reference: an exact solve once per
    checkpoint; absent at the first) and ``uniform`` (1/K). Settings are in ``frame.attrs``.
    """
    if per_task < 1 or eval_per_task < 1 or iters < 2 or burn_in < 0 or warmup < 0:
        raise ValueError(f"need per_task >= 1, eval_per_task >= 1, iters >= 2 (movement needs two iterations), "
                         f"burn_in >= 0 and warmup >= 0; got {per_task}, {eval_per_task}, {iters}, {burn_in}, {warmup}")
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite relative regularizer >= 0 (x trace(G)/K), got {lam!r}")
    items = list(models() if callable(models) else models)
    steps_given = [int(s) for s, _ in items]
    if not items or len(set(steps_given)) != len(steps_given):
        raise ValueError(f"give at least one checkpoint and each its own step; got steps {steps_given}")
    K = int(bins.K)
    state = UGDState.uniform(K)
    uniform = np.full(K, 1.0 / K)
    rows: list[dict] = []
    prev_big: Optional[np.ndarray] = None
    bar = tqdm(total=len(items) * (burn_in + iters) + warmup, desc="C2 online UGD", disable=not progress,
               dynamic_ncols=True)
    for c, (step, model_at) in enumerate(items):
        skip = burn_in + (warmup if c == 0 else 0)
        model = model_at if isinstance(model_at, nn.Module) else model_at()
        model.to(device)
        args = (images, bins, schedule, prediction)
        G_big = _gram(model, *args, eval_per_task, _seed(seed, step, 1, 0), labels, conditional, device)
        lam_big = float(lam * np.trace(G_big) / K)
        best = solve(G_big, lam_big, method="auto")
        w_big, f_star = np.asarray(best.weights, dtype=np.float64), float(best.objective)
        for i in range(skip + iters):
            G = _gram(model, *args, per_task, _seed(seed, step, 0, i), labels, conditional, device)
            lam_abs = float(lam * np.trace(G) / K)
            w_ugd, state = ugd_online_step(G, lam_abs, state, steps=ugd_steps, lr=ugd_lr, reset_moments=reset_moments)
            bar.update(1)
            if i < skip:
                continue
            vectors = {"ugd_online": w_ugd, "exact_small": np.asarray(solve(G, lam_abs, method="auto").weights),
                       "exact_big": w_big, "uniform": uniform}
            if prev_big is not None:
                vectors["exact_big_prev"] = prev_big
            for source, w in vectors.items():
                r = pareto_regret(G_big, lam_big, w, f_star)
                rows += [dict(step=int(step), iter=i - skip, source=source, bin=k, weight=float(w[k]), regret=r)
                         for k in range(K)]
        prev_big = w_big
    bar.close()
    frame = pd.DataFrame(rows)
    frame.attrs.update(lam=float(lam), per_task=int(per_task), iters=int(iters), burn_in=int(burn_in),
                       warmup=int(warmup),
                       ugd_steps=int(ugd_steps), ugd_lr=float(ugd_lr), eval_per_task=int(eval_per_task),
                       reset_moments=bool(reset_moments), seed=int(seed))
    return frame


def _vectors(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """(step, iter) x bin weights of one source, sorted."""
    part = frame[frame["source"] == source]
    return part.pivot_table(index=["step", "iter"], columns="bin", values="weight").sort_index()


def _moves(w: pd.DataFrame) -> pd.Series:
    """L1 between consecutive iterations at the same checkpoint (NaN at each checkpoint's first iteration)."""
    diff = w.groupby(level="step").diff().abs().sum(axis=1, min_count=1)
    return diff


def c2_iterations(frame: pd.DataFrame) -> pd.DataFrame:
    """The per-(step, iter) table of a :func:`c2_online` frame: ``global_iter`` (0.. across checkpoints),
    ``l1_ugd`` / ``l1_exact_small`` (L1 to the previous iteration at the same checkpoint; NaN at iter 0),
    ``l1_ugd_to_exact_small`` (online UGD vs the same batch's exact optimum), ``l1_ugd_to_big`` and
    ``l1_exact_small_to_big`` (vs the checkpoint's reference) and ``regret_<source>`` for every source present."""
    missing = {"step", "iter", "source", "bin", "weight", "regret"} - set(frame.columns)
    if missing:
        raise ValueError(f"not a c2_online frame: columns {sorted(missing)} are missing")
    ugd, small, big = (_vectors(frame, s) for s in ("ugd_online", "exact_small", "exact_big"))
    if ugd.empty or small.empty or big.empty:
        raise ValueError("the frame needs sources ugd_online, exact_small and exact_big; run c2_online")
    out = pd.DataFrame(index=ugd.index)
    out["l1_ugd"] = _moves(ugd)
    out["l1_exact_small"] = _moves(small)
    out["l1_ugd_to_exact_small"] = (ugd - small).abs().sum(axis=1)
    out["l1_ugd_to_big"] = (ugd - big).abs().sum(axis=1)
    out["l1_exact_small_to_big"] = (small - big).abs().sum(axis=1)
    regrets = frame.groupby(["step", "iter", "source"])["regret"].first().unstack("source")
    for source in [s for s in SOURCES if s in regrets.columns]:
        out[f"regret_{source}"] = regrets[source].reindex(out.index)
    out = out.reset_index()
    out.insert(2, "global_iter", np.arange(len(out)))
    return out


def _drift(w: pd.DataFrame) -> float:
    """Mean L1 between consecutive checkpoints' mean weights (NaN with one checkpoint)."""
    means = w.groupby(level="step").mean()
    return float(means.diff().abs().sum(axis=1).iloc[1:].mean()) if len(means) > 1 else float("nan")


def c2_statistics(frame: pd.DataFrame) -> dict:
    """C2's numbers for ONE model's :func:`c2_online` frame (means over its checkpoints x iterations):

    ``l1_ugd`` (consecutive-iteration L1 of online UGD), ``l1_exact_small`` (of the exact small-batch optimum:
    sampling noise), ``l1_excess = l1_ugd - l1_exact_small`` (UGD's own dynamics beyond sampling noise; < 0: UGD
    smooths the noise), ``l1_ugd_to_exact_small``, ``l1_exact_small_to_big``; drift between consecutive
    checkpoints ``drift_exact_big`` (the reference optimum's), ``drift_ugd`` and ``drift_exact_small`` (checkpoint
    means); ``regret_<source>_mean`` / ``_max`` for ugd_online, exact_small, exact_big_prev, uniform; counts
    and the settings of ``frame.attrs`` (lam, per_task, ugd_steps, ...)."""
    table = c2_iterations(frame)
    moved = table.dropna(subset=["l1_ugd", "l1_exact_small"])
    out: dict = {"n_checkpoints": int(table["step"].nunique()), "n_iterations": int(len(table)),
                 "l1_ugd": float(moved["l1_ugd"].mean()), "l1_exact_small": float(moved["l1_exact_small"].mean())}
    out["l1_excess"] = out["l1_ugd"] - out["l1_exact_small"]
    out["l1_ugd_to_exact_small"] = float(table["l1_ugd_to_exact_small"].mean())
    out["l1_exact_small_to_big"] = float(table["l1_exact_small_to_big"].mean())
    big = _vectors(frame, "exact_big").groupby(level="step").first()
    out["drift_exact_big"] = float(big.diff().abs().sum(axis=1).iloc[1:].mean()) if len(big) > 1 else float("nan")
    out["drift_ugd"] = _drift(_vectors(frame, "ugd_online"))
    out["drift_exact_small"] = _drift(_vectors(frame, "exact_small"))
    for source in ("ugd_online", "exact_small", "exact_big_prev", "uniform"):
        col = table.get(f"regret_{source}")
        vals = col.dropna() if col is not None else pd.Series(dtype=float)
        out[f"regret_{source}_mean"] = float(vals.mean()) if len(vals) else float("nan")
        out[f"regret_{source}_max"] = float(vals.max()) if len(vals) else float("nan")
    out.update({k: v for k, v in frame.attrs.items() if np.isscalar(v)})
    return out


def c2_table(per_model: Sequence[dict]) -> pd.DataFrame:
    """One tidy row per model (``model`` = its position) of :func:`c2_statistics`: the CSV beside the C2 row."""
    return pd.DataFrame([{"model": m, **s} for m, s in enumerate(per_model)])


def claim_c2_models(per_model: Sequence[dict], lam: Optional[float] = None) -> dict:
    """The C2 row (``comparison.report.CLAIM_COLUMNS``) from :func:`c2_statistics` of each trained model.

    Claim: "online UGD adds instability beyond sampling noise". Each model gives ``l1_excess``; the claim holds
    when the 95% t-interval over models lies above 0, is refuted when it lies below 0 (UGD moves less than the
    exact optimum of the same batches: it smooths the noise), else (or with fewer than ``MIN_MODELS`` models)
    undecided. ``statistic`` / ``stderr``: mean ``l1_excess`` over models and its se. The notes give both
    movements, the drift, and what the movement costs: the regrets (2) of online UGD, of the exact small-batch
    optimum (with their paired difference over models), of the previous checkpoint's optimum and of uniform
    weights. ``lam``: the relative regularizer used (default: the models' ``lam``)."""
    if not per_model:
        raise ValueError("claim_c2_models needs c2_statistics of at least one model; got none")
    n = len(per_model)
    s = {k: over_models([m.get(k, float("nan")) for m in per_model])
         for k in ("l1_excess", "l1_ugd", "l1_exact_small", "drift_exact_big", "drift_ugd", "l1_ugd_to_exact_small",
                   "regret_ugd_online_mean", "regret_exact_small_mean", "regret_exact_big_prev_mean",
                   "regret_uniform_mean")}
    regret_diff = over_models([m["regret_ugd_online_mean"] - m["regret_exact_small_mean"] for m in per_model])
    verdict = _sign_verdict(s["l1_excess"], +1, n)
    worst = max(m.get("regret_ugd_online_max", float("nan")) for m in per_model)
    fmt = lambda x: f"{x['mean']:.4g} +- {x['se']:.2g} [{x['lo']:.4g}, {x['hi']:.4g}]"  # noqa: E731
    pct = lambda x: f"{100 * x['mean']:.2f}% +- {100 * x['se']:.2g}%"  # noqa: E731
    lam = per_model[0].get("lam", float("nan")) if lam is None else float(lam)
    keys = ("per_task", "ugd_steps", "ugd_lr", "iters", "burn_in", "warmup", "eval_per_task", "reset_moments")
    setting = ", ".join(f"{k} {per_model[0][k]}" for k in keys if k in per_model[0])
    notes = [f"consecutive-iteration L1 at a fixed checkpoint: online UGD {fmt(s['l1_ugd'])}, exact optimum of the "
             f"same small batches (sampling noise) {fmt(s['l1_exact_small'])}; excess (UGD's own dynamics) "
             f"{fmt(s['l1_excess'])} ({verdict}); mean +- se over models [95% t-interval]",
             f"drift between consecutive checkpoints: large-batch optimum {fmt(s['drift_exact_big'])}, online UGD "
             f"(checkpoint means) {fmt(s['drift_ugd'])}; online UGD vs the same batch's exact optimum "
             f"{fmt(s['l1_ugd_to_exact_small'])} L1",
             f"cost (regret on an independent large batch, mean over iterations then models): online UGD "
             f"{pct(s['regret_ugd_online_mean'])} (worst iteration {100 * worst:.2f}%), exact small-batch optimum "
             f"{pct(s['regret_exact_small_mean'])}, paired UGD - exact small {100 * regret_diff['mean']:+.2f}% "
             f"[{100 * regret_diff['lo']:+.2f}%, {100 * regret_diff['hi']:+.2f}%], previous checkpoint's optimum "
             f"{pct(s['regret_exact_big_prev_mean'])}, uniform weights {pct(s['regret_uniform_mean'])}"]
    if setting:
        notes.append("settings: " + setting)
    if n < MIN_MODELS:
        notes.append(f"only {n} model(s): a verdict needs >= {MIN_MODELS} independently trained models")
    return {"claim": "C2", "verdict": verdict, "statistic": s["l1_excess"]["mean"], "stderr": s["l1_excess"]["se"],
            "n_models": n, "unit": UNIT, "lam_rule": f"lam = {lam:g} x trace(G)/K per Gram (x0 units)",
            "notes": "; ".join(notes) + "; statistic = mean excess L1 (online UGD - exact small-batch optimum) per "
                                        "iteration (> 0: UGD adds instability beyond sampling noise)"}
