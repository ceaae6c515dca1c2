"""Fine-tuning in the model's own loss (#16): one SGD step of each copy equals a hand-written float64 step on
``mean_b w(SNR_t_b) ||eps_b - eps_hat_b||^2`` (Min-SNR-5 in eps units), in the batched and the sequential path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import gradconflict as gc
from gradconflict.transfer import BatchStream, TransferConfig, finetune_sequential, finetune_stacked
from gradconflict.transfer.stacked import sources_of

SCHEDULE = gc.NoiseSchedule.linear()


class Linear(nn.Module):
    """eps_hat = W x_t + b t / 1000 (flattened 2x2 images): small enough to differentiate by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 4, dtype=torch.float64) * 0.3)
        self.b = nn.Parameter(torch.randn(4, dtype=torch.float64) * 0.3)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], 4)
        return (flat @ self.W.T + self.b[None] * t.to(x.dtype)[:, None] / 1000).reshape(x.shape)


def _hand_step(model: Linear, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, lr: float,
               gamma: float | None) -> dict[str, torch.Tensor]:
    """One SGD step by hand: Min-SNR-gamma in eps units is min(SNR, gamma) / SNR (1 for gamma None)."""
    a = torch.from_numpy(np.array(SCHEDULE.alphas_cumprod))[t]
    snr = a / (1 - a)
    w = torch.ones_like(snr) if gamma is None else torch.minimum(snr, torch.tensor(gamma, dtype=snr.dtype)) / snr
    W, b = model.W.detach().clone().requires_grad_(True), model.b.detach().clone().requires_grad_(True)
    x_t = a.sqrt()[:, None] * x0.reshape(-1, 4) + (1 - a).sqrt()[:, None] * noise.reshape(-1, 4)
    eps_hat = x_t @ W.T + b[None] * t.double()[:, None] / 1000
    loss = (w * ((eps_hat - noise.reshape(-1, 4)) ** 2).mean(1)).mean()
    gW, gb = torch.autograd.grad(loss, (W, b))
    return {"W": model.W.detach() - lr * gW, "b": model.b.detach() - lr * gb}


@pytest.mark.parametrize("run", [finetune_stacked, finetune_sequential])
@pytest.mark.parametrize("weighting", [None, "min_snr:5"])
def test_one_sgd_step_in_the_training_loss_equals_the_hand_step(run, weighting: str | None) -> None:
    torch.manual_seed(0)
    model = Linear()
    data = torch.rand(12, 1, 2, 2, dtype=torch.float64) * 2 - 1
    bins = gc.TimestepBins.uniform(1000, 3)
    cfg = TransferConfig(steps=1, lr=0.5, optimizer="sgd", batch_size=6, include_all=False, loss_space="eps",
                         weighting=weighting, progress=False)
    streams = [BatchStream(s, 7 + k, data, None, cfg.batch_size) for k, s in enumerate(sources_of(bins, False))]
    replay = [BatchStream(s, 7 + k, data, None, cfg.batch_size).next() for k, s in enumerate(sources_of(bins, False))]
    tuned = run(model, streams, cfg, SCHEDULE, "eps")
    gamma = None if weighting is None else 5.0
    for c, (x0, t, noise, _) in enumerate(replay):
        ref = _hand_step(model, x0, t, noise, cfg.lr, gamma)
        for name in ("W", "b"):
            torch.testing.assert_close(tuned.params[name][c], ref[name], rtol=0, atol=1e-12)
    # the weighting matters: Min-SNR-5 in eps units and the plain eps loss end in different places (bin 0 has SNR > 5)
    x0, t, noise, _ = replay[0]
    assert float((_hand_step(model, x0, t, noise, 0.5, 5.0)["W"] - _hand_step(model, x0, t, noise, 0.5, None)["W"])
                 .abs().max()) > 1e-4


def test_the_default_is_the_plain_x0_loss_and_bad_settings_are_refused() -> None:
    cfg = TransferConfig(steps=1)
    assert cfg.loss_space == "x0" and cfg.weighting is None
    with pytest.raises(ValueError, match="first-order"):
        TransferConfig(steps=1, loss_space="eps", first_order=True)
    with pytest.raises(ValueError, match="loss_space"):
        TransferConfig(steps=1, loss_space="score")
    with pytest.raises(ValueError):
        TransferConfig(steps=1, weighting="no_such_weighting")
    assert np.isfinite(TransferConfig(steps=1, loss_space="v", weighting="snr").lr)
