"""The per-model stages of ``gradconflict reproduce`` beyond training and tracking, and the claims over models.

Per model (training seed s, folder ``runs/reproduce-<name>/seed<s>/``): every transfer run of
``ReproduceConfig.transfer_runs`` (``transfer-<run>.csv``), C3's control Grams of the final model under each binning
(and in the model's own loss space) (``grams-<variant>.npz``), the online C2 frame (``c2_online.csv``) and the
held-out per-bin loss against the trivial predictors (``learned.csv``). The claims then take the model as the
replication unit (``c1.claim_c1_models``, ``c2.claim_c2_models``, ``c3.claim_c3_models``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from ..bins import TimestepBins
from ..engine import sample_task_batch, task_gram
from ..targets import loss_factor
from ..weighting import by_name
from .c1 import c1_statistics

__all__ = ["control_variants", "control_grams", "learned_table", "c1_of_model", "LEARNED_FACTOR"]

LEARNED_FACTOR = 0.5  # a bin is "learned" when its held-out loss is below half of predicting zero (model's units)


def control_variants(config: Any, schedule: Any) -> dict[str, tuple[TimestepBins, str]]:
    """Name -> (bins, loss space) of C3's controls: each ``config.binnings`` name (x0 units) and, with
    ``config.own_space``, ``own_<prediction>_K<K>`` (uniform bins in the model's own loss space; under a bins file
    ``own_<prediction>_clustered_K<K>``, the file's bins)."""
    from .c3 import binning_variants

    Ks = sorted({int(name.rsplit("_K", 1)[1]) for name in config.binnings})
    known = binning_variants(schedule, Ks) if Ks else {}
    out = {}
    for name in config.binnings:
        if name not in known:
            raise ValueError(f"unknown binning {name!r}; use uniform_K<K> or log_snr_K<K>")
        out[name] = (known[name], "x0")
    if config.own_space:  # under a bins file (config.track.edges) in the file's bins
        space = config.train.prediction
        kind = "" if config.track.edges is None else "clustered_"
        out[f"own_{space}_{kind}K{config.track.bins}"] = (config.task_timestep_bins(), space)
    return out


def control_grams(model: torch.nn.Module, images: torch.Tensor, schedule: Any, prediction: str, bins: TimestepBins,
                  loss_space: str, per_task: int, resamples: int, seed: int) -> np.ndarray:
    """``resamples`` Grams (R, K, K) of ``model`` on independent batches of ``per_task`` samples per bin, in
    ``loss_space`` units squared per parameter squared (batch r seeded with ``(seed, r)``)."""
    grams = []
    for r in range(resamples):
        batch = sample_task_batch(images, bins, per_task, 7_000_003 * (seed + 1) + r)
        res = task_gram(model, batch.x0, batch.t, bins, schedule=schedule, prediction=prediction,
                        loss_space=loss_space, noise=batch.noise, model_kwargs=batch.model_kwargs)
        grams.append(res.gram.numpy())
    return np.stack(grams)


def learned_table(model: torch.nn.Module, held_out: torch.Tensor, schedule: Any, prediction: str, bins: TimestepBins,
                  per_bin: int = 64, seed: int = 0) -> pd.DataFrame:
    """Held-out per-bin loss against predicting zero in the model's own units (``y_hat = 0``: loss ``E||y||^2``
    per element, the bin's mean): 1 for eps, ``E x0^2`` for x0, ``alpha_t^2 + sigma_t^2 E x0^2`` for v.

    Columns of ``metrics.held_out_losses`` plus ``baseline`` (that loss, the model's units), ``ratio`` =
    loss_model / baseline (< ``LEARNED_FACTOR``: the bin is learned), ``learned`` and, for reference,
    ``ratio_x0_zero`` = loss_x0 / E x0^2 (against ``x0_hat = 0``: an eps model's x0 error is amplified by
    1 / SNR at high noise, so this one can exceed 1 there for a model that has learned)."""
    from ..metrics import held_out_losses
    from ..targets import normalize_prediction

    table = held_out_losses(model, held_out, schedule=schedule, prediction=prediction, bins=bins, per_bin=per_bin,
                            generator=torch.Generator().manual_seed(seed))
    x0_power = float(held_out.double().pow(2).mean())
    a = np.asarray(schedule.alphas_cumprod, dtype=np.float64)  # alpha_t^2
    per_t = {"eps": np.ones_like(a), "x0": np.full_like(a, x0_power), "v": a + (1.0 - a) * x0_power}
    zero = per_t[normalize_prediction(prediction)]
    table["baseline"] = [float(np.mean(zero[lo:hi])) for lo, hi in zip(bins.lows, bins.highs)]
    table["ratio"] = table["loss_model"] / table["baseline"]
    table["learned"] = table["ratio"] < LEARNED_FACTOR
    table["ratio_x0_zero"] = table["loss_x0"] / x0_power
    return table


def c1_of_model(transfer: pd.DataFrame, K: int, run: dict, track_gram: Optional[np.ndarray],
                schedule: Any, prediction: str, bins: Optional[TimestepBins] = None) -> dict:
    """:func:`c1.c1_statistics` of one model's transfer run (``transfer``: its tidy frame; mean over seeds), with
    the first-order prediction ``lr c_i G_ij / L_j`` (``G``: the tracked x0 Gram of the final model, mean over
    batches; ``L_j``: loss before; ``c_i``: the bin's mean x0-equivalent weight of the fine-tuning loss,
    ``w(SNR) * loss_factor(SNR, space)``, 1 for the plain x0 loss). With AdamW, ``lr`` is not an SGD step: only
    the correlations and signs of the prediction are meaningful, not its scale. ``bins``: the transfer run's K bins
    (default: K uniform bins)."""
    cells = transfer[transfer["source"].astype(int) >= 0]  # the "all bins" control copy has source -1
    M = cells.pivot_table(index="source", columns="target", values="transfer", aggfunc="mean").to_numpy()
    if track_gram is None or track_gram.shape != (K, K):
        return c1_statistics(M)
    L = cells.groupby("target")["loss_before"].mean().to_numpy()
    bins = TimestepBins.uniform(schedule.T, K) if bins is None else bins
    if bins.K != K:
        raise ValueError(f"the transfer matrix is {K} x {K} but bins has K = {bins.K}; pass the run's bins")
    snr = schedule.snr(np.arange(schedule.T))
    space = run.get("loss_space", "x0")
    w = np.ones(schedule.T) if run.get("weighting") is None else np.asarray(by_name(run["weighting"]).weight(snr, target=space))
    c = np.array([np.mean((w * np.asarray(loss_factor(snr, space)))[lo:hi]) for lo, hi in zip(bins.lows, bins.highs)])
    Z = float(run.get("lr", 1e-4)) * c[:, None] * track_gram / L[None, :]
    return c1_statistics(M, first_order=Z)


def save_grams(path: Path, grams: np.ndarray) -> None:
    """Write a (R, K, K) stack atomically."""
    from .._io import atomic_write

    atomic_write(path, lambda tmp: np.save(tmp, grams))
