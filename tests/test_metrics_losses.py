"""Held-out per-bin losses against closed forms: models whose prediction is known exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gradconflict import NoiseSchedule, TimestepBins
from gradconflict.metrics import LOSS_COLUMNS, held_out_losses

SCHEDULE = NoiseSchedule.cosine(8)  # log-SNR from 3.1 down to -10.2
ONE_STEP_BINS = TimestepBins.uniform(8, 8)  # every bin is a single timestep, so its SNR is known exactly


class Zeros(nn.Module):
    """Predicts 0 whatever the input (one parameter, so eval mode and gradients can be checked)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(()))
        self.drop = nn.Dropout(0.5)

    def forward(self, x, t):
        return self.drop(torch.ones_like(x)) * self.scale


class PosteriorMeanEps(nn.Module):
    """For x0 ~ N(0, I): E[x0 | x_t] = alpha x_t, hence E[eps | x_t] = sigma_t x_t (closed form in t)."""

    def forward(self, x, t):
        return SCHEDULE.sigma(t).to(x.dtype).reshape(-1, 1, 1, 1) * x


def run(model, x0, prediction, bins=ONE_STEP_BINS, per_bin=64, seed=0, **kw) -> pd.DataFrame:
    return held_out_losses(model, x0, schedule=SCHEDULE, prediction=prediction, bins=bins, per_bin=per_bin,
                           generator=torch.Generator().manual_seed(seed), **kw)


def gaussian_images(n=256, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_columns_and_bins():
    frame = run(Zeros(), torch.zeros(10, 1, 4, 4), "x0", bins=TimestepBins.uniform(8, 2), per_bin=3)
    assert list(frame.columns) == list(LOSS_COLUMNS)
    assert frame["bin"].tolist() == [0, 1] and frame["t_lo"].tolist() == [0, 4] and frame["t_hi"].tolist() == [3, 7]
    assert frame["n"].tolist() == [3, 3]
    np.testing.assert_allclose(frame["log_snr_mid"], np.log(SCHEDULE.snr(np.array([1, 5]))))


def test_x0_zero_model_on_constant_images_is_exact():
    # predicting x0 = 0 for images that are all c: squared error c^2 at every pixel, timestep and noise
    c = 0.75  # exact in float32
    frame = run(Zeros(), torch.full((5, 1, 4, 4), c), "x0", per_bin=7)
    np.testing.assert_allclose(frame["loss_x0"], c**2, rtol=1e-12)
    np.testing.assert_allclose(frame["loss_model"], c**2, rtol=1e-12)
    np.testing.assert_allclose(frame["loss_x0_se"], 0.0, atol=1e-12)


def test_eps_zero_model_units_relation_and_value():
    # eps_hat = 0: loss_eps = mean eps^2 (about 1) and x0_hat = x_t / alpha, so loss_x0 = loss_eps / SNR_t
    frame = run(Zeros(), gaussian_images(), "eps")
    snr = SCHEDULE.snr(np.arange(8))
    np.testing.assert_allclose(frame["loss_model"], snr * frame["loss_x0"], rtol=1e-5)  # x_t is float32
    np.testing.assert_allclose(frame["loss_model"], 1.0, atol=0.06)  # 64 x 64 unit-variance squares per bin


def test_v_zero_model_is_the_posterior_mean_of_gaussian_data():
    # x0 ~ N(0, I): E[v | x_t] = 0, so loss_v = E v^2 = alpha^2 + sigma^2 = 1 and loss_x0 = sigma_t^2
    frame = run(Zeros(), gaussian_images(), "v", per_bin=128)
    sigma2 = SCHEDULE.sigma(np.arange(8)) ** 2
    np.testing.assert_allclose(frame["loss_model"], 1.0, atol=0.05)
    np.testing.assert_allclose(frame["loss_x0"], sigma2, rtol=0.05)
    np.testing.assert_allclose(frame["loss_model"], (SCHEDULE.snr(np.arange(8)) + 1) * frame["loss_x0"], rtol=1e-5)  # x_t is float32


def test_eps_posterior_mean_model_in_both_units():
    # eps_hat = sigma x_t: loss_x0 = sigma^2 and loss_eps = SNR sigma^2 = alpha^2 in expectation
    frame = run(PosteriorMeanEps(), gaussian_images(), "eps", per_bin=128)
    t = np.arange(8)
    np.testing.assert_allclose(frame["loss_x0"], SCHEDULE.sigma(t) ** 2, rtol=0.05)
    np.testing.assert_allclose(frame["loss_model"], SCHEDULE.alpha(t) ** 2, rtol=0.05)


def test_deterministic_eval_mode_no_grad_and_batch_size_free():
    model = Zeros()
    with torch.no_grad():
        model.scale.fill_(0.3)
    model.train()
    x0 = gaussian_images(40)
    first = run(model, x0, "eps", per_bin=9, batch_size=5)
    second = run(model, x0, "eps", per_bin=9, batch_size=1000)
    pd.testing.assert_frame_equal(first, second)  # dropout off (eval), same draws whatever the batch size
    assert model.training and model.drop.training  # flags restored
    assert model.scale.grad is None
    assert not run(model, x0, "eps", per_bin=9, seed=1).equals(first)


class LabelEcho(nn.Module):
    """x0-prediction model that outputs its class label at every pixel."""

    def forward(self, x, t, y):
        return y.to(x.dtype).reshape(-1, 1, 1, 1).expand_as(x)


def test_per_image_model_kwargs_follow_their_images():
    labels = torch.arange(6)
    x0 = labels.float().reshape(-1, 1, 1, 1).expand(6, 1, 3, 3).clone()  # image i is all i
    frame = run(LabelEcho(), x0, "x0", per_bin=10, model_kwargs={"y": labels})
    np.testing.assert_allclose(frame["loss_x0"], 0.0, atol=1e-12)
    shuffled = run(LabelEcho(), x0, "x0", per_bin=10, model_kwargs={"y": labels.flip(0)})
    assert (shuffled["loss_x0"] > 1).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"x0": torch.full((4, 1, 4, 4), float("nan"))}, "finite"),
    ({"x0": np.zeros((4, 1, 4, 4))}, "must be a tensor"),
    ({"x0": torch.zeros(0, 1, 4, 4)}, "at least one held-out image"),
    ({"bins": TimestepBins.uniform(10, 2)}, "T = 10 timesteps but the schedule has T = 8"),
    ({"per_bin": 0}, "per_bin must be a positive integer"),
    ({"prediction": "score"}, "unknown prediction type"),
])
def test_bad_inputs_are_refused(kwargs, match):
    args = {"x0": torch.zeros(4, 1, 4, 4), "prediction": "eps", "bins": ONE_STEP_BINS, "per_bin": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        run(Zeros(), **args)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_matches_the_trainers_prediction_error_with_the_documented_draws(prediction):
    # the documented draw order (timesteps, image permutation, noise) replayed by hand through the trainer's
    # own per-sample error, sample by sample, with labels for a class-conditional DiT
    from gradconflict.models import build_model
    from gradconflict.targets import loss_factor
    from gradconflict.train.loop import prediction_error

    torch.manual_seed(0)
    model = build_model("dit-tiny", image_size=8, depth=1, prediction=prediction, num_classes=10).eval()
    schedule, bins, per_bin = NoiseSchedule.linear(100), TimestepBins.uniform(100, 3), 4
    x0, labels = gaussian_images(5).clamp(-1, 1), torch.tensor([3, 1, 4, 1, 5])
    frame = held_out_losses(model, x0, schedule=schedule, prediction=prediction, bins=bins, per_bin=per_bin,
                            generator=torch.Generator().manual_seed(2), model_kwargs={"y": labels}, batch_size=5)
    g = torch.Generator().manual_seed(2)
    t, _ = bins.sample(per_bin, g)
    perm = torch.randperm(5, generator=g)
    noise = torch.randn((t.numel(), 1, 8, 8), generator=g)
    idx = perm[torch.arange(per_bin) % 5].repeat(3)
    with torch.no_grad():
        err = torch.stack([prediction_error(model, x0[i : i + 1], t[j : j + 1], schedule, prediction, noise[j : j + 1],
                                            labels[i : i + 1])[0] for j, i in enumerate(idx.tolist())]).double()
    err_x0 = err / torch.as_tensor(loss_factor(schedule.snr(t.numpy()), prediction))
    np.testing.assert_allclose(frame["loss_model"], err.reshape(3, per_bin).mean(1).numpy(), rtol=1e-4)
    np.testing.assert_allclose(frame["loss_x0"], err_x0.reshape(3, per_bin).mean(1).numpy(), rtol=1e-4)
