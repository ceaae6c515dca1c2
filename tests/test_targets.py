"""Tests for gradconflict.targets: targets, conversions and the per-sample loss identities."""

import math

import numpy as np
import pytest
import torch

from gradconflict.schedule import NoiseSchedule
from gradconflict.targets import (
    PREDICTIONS,
    convert,
    expand_like,
    loss_factor,
    normalize_prediction,
    target,
    to_eps,
    to_x0,
)

N = 16
SHAPE = (N, 3, 4, 4)


@pytest.fixture
def batch():
    """Random float64 batch at timesteps spread over a linear schedule (SNR from ~1e4 down to ~4e-5)."""
    g = torch.Generator().manual_seed(1234)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    sch = NoiseSchedule.linear()
    t = torch.linspace(0, 999, N).round().long()
    alpha, sigma = sch.alpha(t), sch.sigma(t)
    a = alpha.reshape(N, 1, 1, 1)
    s = sigma.reshape(N, 1, 1, 1)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    snr = (alpha**2 / sigma**2)
    return dict(x0=x0, eps=eps, v=v, x_t=x_t, alpha=alpha, sigma=sigma, snr=snr, a=a, s=s, g=g)


def test_target_values(batch):
    b = batch
    assert torch.equal(target(b["x0"], b["eps"], b["alpha"], b["sigma"], "eps"), b["eps"])
    assert torch.equal(target(b["x0"], b["eps"], b["alpha"], b["sigma"], "x0"), b["x0"])
    v = target(b["x0"], b["eps"], b["alpha"], b["sigma"], "v")
    torch.testing.assert_close(v, b["a"] * b["eps"] - b["s"] * b["x0"], rtol=0, atol=1e-15)
    # diffusers aliases work too
    torch.testing.assert_close(target(b["x0"], b["eps"], b["alpha"], b["sigma"], "v_prediction"), v)


def test_target_v_hand_value():
    x0 = torch.tensor([[2.0]], dtype=torch.float64)
    eps = torch.tensor([[-1.0]], dtype=torch.float64)
    alpha = torch.tensor([0.6], dtype=torch.float64)
    sigma = torch.tensor([0.8], dtype=torch.float64)
    # v = 0.6 * (-1) - 0.8 * 2 = -2.2
    assert target(x0, eps, alpha, sigma, "v").item() == pytest.approx(-2.2, abs=1e-15)
    x_t = 0.6 * x0 + 0.8 * eps  # = 0.4
    # x0 = alpha x_t - sigma v = 0.24 + 1.76 = 2 ; eps = sigma x_t + alpha v = 0.32 - 1.32 = -1
    assert to_x0(torch.tensor([[-2.2]], dtype=torch.float64), x_t, alpha, sigma, "v").item() == pytest.approx(2.0, abs=1e-14)
    assert to_eps(torch.tensor([[-2.2]], dtype=torch.float64), x_t, alpha, sigma, "v").item() == pytest.approx(-1.0, abs=1e-14)


@pytest.mark.parametrize("source", ["eps", "x0", "v"])
def test_exact_target_recovers_everything(batch, source):
    b = batch
    truth = {"eps": b["eps"], "x0": b["x0"], "v": b["v"]}
    out = truth[source]
    args = (b["x_t"], b["alpha"], b["sigma"])
    # to_x0 via eps divides by alpha (~0.006 at the noisiest step): allow for that amplification
    tol_x0 = 1e-10 if source == "eps" else 1e-13
    torch.testing.assert_close(to_x0(out, *args, source), b["x0"], rtol=0, atol=tol_x0)
    # to_eps via x0 divides by sigma (~0.01 at the cleanest step)
    tol_eps = 1e-11 if source == "x0" else 1e-13
    torch.testing.assert_close(to_eps(out, *args, source), b["eps"], rtol=0, atol=tol_eps)
    for dst in PREDICTIONS:
        tol = max(tol_x0, tol_eps)
        torch.testing.assert_close(convert(out, *args, source=source, to=dst), truth[dst], rtol=0, atol=tol)


def test_convert_identity_returns_input(batch):
    b = batch
    out = torch.randn(SHAPE, generator=b["g"], dtype=torch.float64)
    for p in PREDICTIONS:
        assert torch.equal(convert(out, b["x_t"], b["alpha"], b["sigma"], source=p, to=p), out)


def test_convert_hand_formulas_for_arbitrary_output(batch):
    """Random x0 estimate -> eps and v estimates by the formulas written out here."""
    b = batch
    x0_hat = torch.randn(SHAPE, generator=b["g"], dtype=torch.float64)
    eps_hat = (b["x_t"] - b["a"] * x0_hat) / b["s"]
    v_hat = b["a"] * eps_hat - b["s"] * x0_hat
    args = (b["x_t"], b["alpha"], b["sigma"])
    torch.testing.assert_close(convert(x0_hat, *args, source="x0", to="eps"), eps_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(convert(x0_hat, *args, source="x0", to="v"), v_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(convert(v_hat, *args, source="v", to="x0"), x0_hat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(convert(v_hat, *args, source="v", to="eps"), eps_hat, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(convert(eps_hat, *args, source="eps", to="v"), v_hat, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("source", ["eps", "x0", "v"])
def test_per_sample_loss_identities(batch, source):
    """||eps - eps_hat||^2 = SNR ||x0 - x0_hat||^2 and ||v - v_hat||^2 = (SNR + 1) ||x0 - x0_hat||^2."""
    b = batch
    out = torch.randn(SHAPE, generator=b["g"], dtype=torch.float64)
    args = (b["x_t"], b["alpha"], b["sigma"])
    x0_hat = convert(out, *args, source=source, to="x0")
    eps_hat = convert(out, *args, source=source, to="eps")
    v_hat = convert(out, *args, source=source, to="v")
    dims = (1, 2, 3)
    e_x0 = ((b["x0"] - x0_hat) ** 2).sum(dims)
    e_eps = ((b["eps"] - eps_hat) ** 2).sum(dims)
    e_v = ((b["v"] - v_hat) ** 2).sum(dims)
    snr = b["snr"]
    assert (e_x0 > 0).all()
    torch.testing.assert_close(e_eps, snr * e_x0, rtol=1e-9, atol=0)
    torch.testing.assert_close(e_v, (snr + 1) * e_x0, rtol=1e-9, atol=0)
    # and loss_factor states the same factors
    torch.testing.assert_close(e_eps, loss_factor(snr, "eps") * e_x0, rtol=1e-9, atol=0)
    torch.testing.assert_close(e_v, loss_factor(snr, "v") * e_x0, rtol=1e-9, atol=0)
    torch.testing.assert_close(e_x0, loss_factor(snr, "x0") * e_x0, rtol=0, atol=0)


def test_loss_factor_values_and_kinds():
    assert loss_factor(3.0, "x0") == 1.0
    assert loss_factor(3.0, "eps") == 3.0
    assert loss_factor(3.0, "v") == 4.0
    assert isinstance(loss_factor(3.0, "v"), float)
    arr = loss_factor(np.array([0.0, 0.5, 2.0]), "v_prediction")
    assert isinstance(arr, np.ndarray)
    np.testing.assert_array_equal(arr, [1.0, 1.5, 3.0])
    np.testing.assert_array_equal(loss_factor(np.array([0.0, 0.5, 2.0]), "epsilon"), [0.0, 0.5, 2.0])
    np.testing.assert_array_equal(loss_factor(np.array([0.0, 0.5, 2.0]), "sample"), [1.0, 1.0, 1.0])
    ten = loss_factor(torch.tensor([1.0, 4.0], dtype=torch.float32), "v")
    assert isinstance(ten, torch.Tensor) and ten.dtype == torch.float64
    torch.testing.assert_close(ten, torch.tensor([2.0, 5.0], dtype=torch.float64))
    # the input is not modified in place
    s = np.array([1.0, 2.0])
    loss_factor(s, "eps")[0] = 99.0
    assert s[0] == 1.0


@pytest.mark.parametrize(
    "name, canon",
    [
        ("eps", "eps"), ("epsilon", "eps"), ("EPSILON", "eps"), ("noise", "eps"),
        ("x0", "x0"), ("sample", "x0"), ("x_0", "x0"), ("data", "x0"),
        ("v", "v"), ("v_prediction", "v"), ("velocity", "v"),
    ],
)
def test_normalize_prediction_aliases(name, canon):
    assert normalize_prediction(name) == canon


@pytest.mark.parametrize("bad", ["flow", "", "x1", "v-prediction"])
def test_normalize_prediction_unknown_raises(bad):
    with pytest.raises(ValueError):
        normalize_prediction(bad)
    with pytest.raises(ValueError):
        loss_factor(1.0, bad)


def test_unknown_prediction_in_target_and_convert_raises(batch):
    b = batch
    with pytest.raises(ValueError):
        target(b["x0"], b["eps"], b["alpha"], b["sigma"], "score")
    with pytest.raises(ValueError):
        convert(b["x0"], b["x_t"], b["alpha"], b["sigma"], source="x0", to="score")


def test_expand_like_shapes_and_mismatch():
    x = torch.zeros(3, 2, 5)
    c = expand_like(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), x)
    assert c.shape == (3, 1, 1) and c.dtype == x.dtype
    assert (c * torch.ones_like(x))[1].unique().item() == 2.0
    assert expand_like(torch.tensor(0.5), x).shape == ()
    with pytest.raises(ValueError):
        expand_like(torch.tensor([1.0, 2.0]), x)


def test_scalar_alpha_sigma_broadcast():
    x0 = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    eps = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    a, s = 0.8, 0.6
    ta, ts = torch.tensor(a, dtype=torch.float64), torch.tensor(s, dtype=torch.float64)
    v = target(x0, eps, ta, ts, "v")
    torch.testing.assert_close(v, torch.tensor([[0.8 * 0.5 - 0.6, 0.8 * 2.0 + 0.6]], dtype=torch.float64), rtol=0, atol=1e-15)
    x_t = a * x0 + s * eps
    back = to_x0(eps, x_t, ta, ts, "eps")
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-14)
    assert math.isclose(a**2 + s**2, 1.0)


def test_zero_terminal_snr_step_is_nan_free():
    """At alpha = 0 (zero terminal SNR): x_t = eps, v = -x0; conversions from x0/v stay exact, eps gives no NaN."""
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(4, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 3, generator=g, dtype=torch.float64)
    alpha = torch.zeros(4, dtype=torch.float64)
    sigma = torch.ones(4, dtype=torch.float64)
    x_t = eps.clone()
    v = target(x0, eps, alpha, sigma, "v")
    torch.testing.assert_close(v, -x0, rtol=0, atol=0)
    torch.testing.assert_close(to_x0(v, x_t, alpha, sigma, "v"), x0, rtol=0, atol=0)
    torch.testing.assert_close(to_eps(x0, x_t, alpha, sigma, "x0"), eps, rtol=0, atol=0)
    out = to_x0(eps + 0.1, x_t, alpha, sigma, "eps")
    assert not torch.isnan(out).any()
