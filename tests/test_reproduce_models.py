"""Per-model helpers of `gradconflict reproduce` (#16): the held-out check against the trivial predictors, C1's
first-order prediction from a transfer frame (hand-computed), and C3's control variants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import gradconflict as gc
from gradconflict.reproduce.config import preset
from gradconflict.reproduce.models import c1_of_model, control_variants, learned_table

SCHEDULE = gc.NoiseSchedule.linear()


class Zero(nn.Module):
    """Predicts 0 (eps_hat = 0: x0_hat = x_t / alpha_t)."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x * 0 + self.p * 0


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_model_that_predicts_zero_has_not_learned(prediction: str) -> None:
    """y_hat = 0 has loss E||y||^2, the baseline itself: ratio about 1 in every bin; for eps its x0 loss is
    (1/SNR_t) mean(eps^2), about the bin's mean 1/SNR."""
    torch.manual_seed(0)
    x0 = torch.rand(32, 1, 4, 4) * 2 - 1
    bins = gc.TimestepBins.uniform(1000, 5)
    table = learned_table(Zero(), x0, SCHEDULE, prediction, bins, per_bin=400, seed=1)
    a = np.array(SCHEDULE.alphas_cumprod)
    power = float((x0.double() ** 2).mean())
    expected = {"eps": np.ones(5), "x0": np.full(5, power),
                "v": [np.mean(a[lo:hi] + (1 - a[lo:hi]) * power) for lo, hi in zip(bins.lows, bins.highs)]}[prediction]
    np.testing.assert_allclose(table["baseline"], expected, rtol=1e-12)
    np.testing.assert_allclose(table["ratio"], 1.0, rtol=0.25)  # 400 draws of unit-variance noise per bin
    assert not table["learned"].any()
    if prediction == "eps":
        snr = SCHEDULE.snr(np.arange(1000))
        inv = np.array([np.mean(1 / snr[lo:hi]) for lo, hi in zip(bins.lows, bins.highs)])
        np.testing.assert_allclose(table["loss_x0"], inv, rtol=0.35)
        np.testing.assert_allclose(table["ratio_x0_zero"], table["loss_x0"] / power, rtol=1e-12)


def _frame(M: np.ndarray, L: np.ndarray) -> pd.DataFrame:
    K = M.shape[0]
    rows = [dict(seed=s, source=i, target=j, transfer=M[i, j] + (0.01 if s else -0.01), loss_before=L[j])
            for s in (0, 1) for i in range(K) for j in range(K)]
    rows += [dict(seed=0, source=-1, target=j, transfer=9.0, loss_before=L[j]) for j in range(K)]  # the "all" copy
    return pd.DataFrame(rows)


def test_c1_of_model_first_order_prediction_by_hand() -> None:
    M = np.array([[0.5, 0.2, -0.1], [0.3, 0.6, 0.1], [-0.4, 0.05, 0.7]])
    G = np.array([[4.0, 1.0, -2.0], [1.0, 9.0, -3.0], [-2.0, -3.0, 16.0]])
    L = np.array([2.0, 4.0, 8.0])
    plain = c1_of_model(_frame(M, L), 3, {"lr": 0.5}, G, SCHEDULE, "eps")
    np.testing.assert_allclose(plain["first_order"], 0.5 * G / L[None, :], rtol=1e-15)  # lr G_ij / L_j
    assert plain["far_mean"] == pytest.approx(-0.25)  # the mean over seeds (+-0.01 cancel), the "all" row left out
    # in the training loss: row i scaled by the bin's mean x0-equivalent weight, min(SNR, 5) / SNR * SNR = min(SNR, 5)
    snr = SCHEDULE.snr(np.arange(1000))
    c = np.array([np.mean(np.minimum(snr[lo:hi], 5.0)) for lo, hi in ((0, 333), (333, 667), (667, 1000))])
    own = c1_of_model(_frame(M, L), 3, {"lr": 0.5, "loss_space": "eps", "weighting": "min_snr:5"}, G, SCHEDULE, "eps")
    np.testing.assert_allclose(own["first_order"], 0.5 * c[:, None] * G / L[None, :], rtol=1e-12)
    assert "pearson" not in c1_of_model(_frame(M, L), 3, {"lr": 0.5}, None, SCHEDULE, "eps")  # no Gram: no prediction


def test_control_variants_of_the_standard_preset() -> None:
    config = preset("standard")
    variants = control_variants(config, SCHEDULE)
    assert set(variants) == {"log_snr_K10", "uniform_K50", "log_snr_K50", "own_eps_K10"}
    assert variants["uniform_K50"][0].K == 50 and variants["own_eps_K10"][1] == "eps"
    assert variants["log_snr_K10"][1] == "x0"
    with pytest.raises(ValueError, match="unknown binning"):
        from dataclasses import replace
        control_variants(replace(config, binnings=("quantile_K10",)), SCHEDULE)
