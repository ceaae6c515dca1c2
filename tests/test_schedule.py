"""Tests for gradconflict.schedule against closed forms written out by hand."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gradconflict.schedule import NoiseSchedule, prediction_type_of, rescale_zero_terminal_snr

T = 1000


def _linear_alphabar_by_hand(T=1000, b0=1e-4, b1=0.02):
    out, prod = [], 1.0
    for i in range(T):
        beta = b0 + (b1 - b0) * i / (T - 1)
        prod *= 1.0 - beta
        out.append(prod)
    return np.array(out)


def _cosine_f(u, s=0.008):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


# ----------------------------------------------------------------------------- constructors
def test_linear_matches_hand_product():
    sch = NoiseSchedule.linear()
    assert sch.T == T
    np.testing.assert_allclose(sch.alphas_cumprod, _linear_alphabar_by_hand(), rtol=1e-12, atol=0)
    # spot values: alphabar_0 = 1 - 1e-4, alphabar_1 = (1 - 1e-4)(1 - (1e-4 + 0.0199/999))
    assert sch.alphas_cumprod[0] == pytest.approx(0.9999, rel=1e-14)
    assert sch.alphas_cumprod[1] == pytest.approx(0.9999 * (1 - (1e-4 + 0.0199 / 999)), rel=1e-14)
    # betas recovered
    np.testing.assert_allclose(sch.betas, np.linspace(1e-4, 0.02, T), rtol=1e-9, atol=1e-15)


def test_linear_custom_range_and_T():
    sch = NoiseSchedule.linear(T=5, beta_start=0.1, beta_end=0.5)
    expected = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.6, 0.9 * 0.8 * 0.7 * 0.6 * 0.5]
    np.testing.assert_allclose(sch.alphas_cumprod, expected, rtol=1e-14)


def test_scaled_linear_matches_hand_product():
    sch = NoiseSchedule.scaled_linear()
    r0, r1 = math.sqrt(0.00085), math.sqrt(0.012)
    prod, exp = 1.0, []
    for i in range(T):
        beta = (r0 + (r1 - r0) * i / (T - 1)) ** 2
        prod *= 1.0 - beta
        exp.append(prod)
    np.testing.assert_allclose(sch.alphas_cumprod, exp, rtol=1e-12)
    assert sch.betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert sch.betas[-1] == pytest.approx(0.012, rel=1e-9)


def test_cosine_matches_closed_form_where_cap_inactive():
    sch = NoiseSchedule.cosine()
    f0 = _cosine_f(0.0)
    checked = 0
    for i in range(T):
        # beta_i by hand; the 0.999 cap only matters where this reaches it
        beta_i = 1 - _cosine_f((i + 1) / T) / _cosine_f(i / T)
        if beta_i >= 0.999:
            break
        alphabar = _cosine_f((i + 1) / T) / f0  # alphas_cumprod[i] = alphabar((i + 1) / T)
        assert sch.alphas_cumprod[i] == pytest.approx(alphabar, rel=1e-9, abs=1e-15)
        checked += 1
    assert checked >= T - 2
    # the last beta is capped at max_beta
    assert sch.betas[-1] == pytest.approx(0.999, rel=1e-9)


def test_cosine_small_T_hand_values():
    T4 = 4
    sch = NoiseSchedule.cosine(T=T4, s=0.0, max_beta=0.999)
    # s = 0: f(u) = cos^2(u pi/2); f(0) = 1
    for i in range(T4 - 1):
        assert sch.alphas_cumprod[i] == pytest.approx(math.cos((i + 1) / T4 * math.pi / 2) ** 2, rel=1e-12)
    # last beta capped: alphabar_3 = alphabar_2 * (1 - 0.999)
    assert sch.alphas_cumprod[3] == pytest.approx(math.cos(0.75 * math.pi / 2) ** 2 * 0.001, rel=1e-9)


def test_from_betas_and_from_alphas_cumprod_inputs():
    betas = [0.1, 0.2, 0.5]
    exp = [0.9, 0.72, 0.36]
    for b in (betas, np.array(betas), torch.tensor(betas, dtype=torch.float64)):
        np.testing.assert_allclose(NoiseSchedule.from_betas(b).alphas_cumprod, exp, rtol=1e-14)
    for a in (exp, np.array(exp), torch.tensor(exp, dtype=torch.float32)):
        sch = NoiseSchedule.from_alphas_cumprod(a)
        assert sch.alphas_cumprod.dtype == np.float64
        np.testing.assert_allclose(sch.alphas_cumprod, exp, rtol=1e-6)
    assert sch.T == 3


@pytest.mark.parametrize("betas", [[], [0.1, float("nan")], [0.0, 0.1], [-0.1], [0.5, 1.5]])
def test_from_betas_rejects_bad_betas(betas):
    with pytest.raises(ValueError):
        NoiseSchedule.from_betas(betas)


@pytest.mark.parametrize(
    "alphas_cumprod",
    [
        [0.5, 0.6, 0.4],  # increasing somewhere
        [1.2, 0.5],  # > 1
        [1.0, 0.5],  # = 1: no noise
        [0.9, float("nan"), 0.1],
        [0.9, float("inf")],
        [0.9, -0.1],
        [],
        [0.9, 0.0, 0.0],  # zero before the last step
    ],
)
def test_bad_alphas_cumprod_raise(alphas_cumprod):
    with pytest.raises(ValueError):
        NoiseSchedule.from_alphas_cumprod(alphas_cumprod)


@pytest.mark.parametrize("T_bad", [0, -3, 2.5])
def test_bad_T_raises(T_bad):
    with pytest.raises(ValueError):
        NoiseSchedule.linear(T=T_bad)
    with pytest.raises(ValueError):
        NoiseSchedule.cosine(T=T_bad)


def test_from_diffusers_duck_typed():
    a = torch.tensor([0.9, 0.72, 0.36], dtype=torch.float32)
    fake = SimpleNamespace(alphas_cumprod=a, config=SimpleNamespace(prediction_type="v_prediction"))
    sch = NoiseSchedule.from_diffusers(fake)
    np.testing.assert_allclose(sch.alphas_cumprod, [0.9, 0.72, 0.36], rtol=1e-6)
    assert sch.T == 3
    assert prediction_type_of(fake) == "v"


def test_from_diffusers_zero_terminal_and_missing_attr():
    fake = SimpleNamespace(alphas_cumprod=np.array([0.9, 0.5, 0.1]), config=SimpleNamespace())
    sch = NoiseSchedule.from_diffusers(fake, zero_terminal_snr=True)
    assert sch.snr(2) == 0.0
    with pytest.raises(ValueError):
        NoiseSchedule.from_diffusers(SimpleNamespace(config=None))


@pytest.mark.parametrize(
    "sched, expected",
    [
        (SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon")), "eps"),
        (SimpleNamespace(config=SimpleNamespace(prediction_type="sample")), "x0"),
        (SimpleNamespace(config=SimpleNamespace(prediction_type="v_prediction")), "v"),
        (SimpleNamespace(config={"prediction_type": "sample"}), "x0"),
        (SimpleNamespace(prediction_type="v_prediction"), "v"),
        (SimpleNamespace(), "eps"),  # diffusers' default
    ],
)
def test_prediction_type_of(sched, expected):
    assert prediction_type_of(sched) == expected


def test_prediction_type_of_unknown_raises():
    with pytest.raises(ValueError):
        prediction_type_of(SimpleNamespace(config=SimpleNamespace(prediction_type="flow")))


# ----------------------------------------------------------------------------- quantities
@pytest.mark.parametrize("factory", [NoiseSchedule.linear, NoiseSchedule.scaled_linear, NoiseSchedule.cosine])
def test_alpha_sigma_snr_identities(factory):
    sch = factory()
    t = np.arange(sch.T)
    a, s = sch.alpha(t), sch.sigma(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(a**2, sch.alphas_cumprod, rtol=1e-14)
    snr = sch.snr(t)
    np.testing.assert_allclose(snr, a**2 / s**2, rtol=1e-10)
    np.testing.assert_allclose(sch.log_snr(t), np.log(a**2 / s**2), rtol=1e-10, atol=1e-10)
    assert np.all(np.diff(snr) < 0)  # noise grows with t


def test_hand_values_small_schedule():
    sch = NoiseSchedule.from_alphas_cumprod([0.9, 0.8, 0.5, 0.2])
    assert sch.alpha(0) == pytest.approx(math.sqrt(0.9), rel=1e-15)
    assert sch.sigma(2) == pytest.approx(math.sqrt(0.5), rel=1e-15)
    np.testing.assert_allclose(sch.snr([0, 1, 2, 3]), [9.0, 4.0, 1.0, 0.25], rtol=1e-13)
    np.testing.assert_allclose(sch.log_snr([0, 1, 2, 3]), [math.log(9), math.log(4), 0.0, math.log(0.25)], atol=1e-13)
    np.testing.assert_allclose(sch.betas, [0.1, 1 - 0.8 / 0.9, 1 - 0.5 / 0.8, 1 - 0.2 / 0.5], rtol=1e-13)


def test_kind_in_kind_out():
    sch = NoiseSchedule.linear()
    exp = math.sqrt(_linear_alphabar_by_hand()[7])
    # tensor in -> float64 tensor out
    tt = torch.tensor([7, 7, 3])
    out = sch.alpha(tt)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.shape == (3,)
    assert out[0].item() == pytest.approx(exp, rel=1e-12)
    for method in (sch.alpha, sch.sigma, sch.snr, sch.log_snr):
        assert method(tt).dtype == torch.float64
        # numpy in -> numpy out
        arr = method(np.array([[1, 2], [3, 4]]))
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.shape == (2, 2)
        # int in -> python float out
        v = method(7)
        assert isinstance(v, float) and not isinstance(v, np.ndarray)
    assert sch.alpha(7) == pytest.approx(exp, rel=1e-12)
    assert isinstance(sch.alpha([1, 2]), np.ndarray)


def test_zero_dim_tensor_in_gives_zero_dim_tensor_out():
    # BUG (gradconflict/_arrays.py, like_input): np.ascontiguousarray promotes 0-d to shape (1,),
    # so a 0-d tensor timestep returns a shape-(1,) tensor instead of a 0-d tensor.
    sch = NoiseSchedule.linear()
    out = sch.alpha(torch.tensor(5))
    assert isinstance(out, torch.Tensor)
    assert out.shape == torch.Size([])


@pytest.mark.parametrize("bad", [-1, T, 10_000, [0, T], np.array([-2, 3])])
def test_out_of_range_t_raises(bad):
    sch = NoiseSchedule.linear()
    for method in (sch.alpha, sch.sigma, sch.snr, sch.log_snr):
        with pytest.raises(ValueError):
            method(bad)
    with pytest.raises(ValueError):
        sch.snr(torch.tensor([0, T]))


@pytest.mark.parametrize(
    "bad", [2.5, np.array([0.5, 1.0]), torch.tensor([1.0, 2.0]), torch.tensor(3.0), float("nan"), np.array(["a"])]
)
def test_float_t_raises(bad):
    sch = NoiseSchedule.linear()
    with pytest.raises(ValueError):
        sch.alpha(bad)


# ----------------------------------------------------------------------------- zero terminal SNR
@pytest.mark.parametrize("factory", [NoiseSchedule.linear, NoiseSchedule.scaled_linear, NoiseSchedule.cosine])
def test_zero_terminal_snr_defining_properties(factory):
    base = factory()
    z = factory(zero_terminal_snr=True)
    assert z.T == base.T
    assert z.snr(z.T - 1) == 0.0
    assert z.alpha(z.T - 1) == 0.0
    assert z.sigma(z.T - 1) == 1.0
    assert z.alpha(0) == pytest.approx(base.alpha(0), rel=1e-14)
    # sqrt(alphabar_new) is an affine function of sqrt(alphabar_old)
    r_old, r_new = np.sqrt(base.alphas_cumprod), np.sqrt(z.alphas_cumprod)
    A, B = np.polyfit(r_old, r_new, 1)
    assert np.max(np.abs(A * r_old + B - r_new)) < 1e-12
    # the affine map fixed by the two endpoint conditions
    A_exp = r_old[0] / (r_old[0] - r_old[-1])
    assert A == pytest.approx(A_exp, rel=1e-9)
    assert B == pytest.approx(-A_exp * r_old[-1], rel=1e-7, abs=1e-12)
    # log-SNR: -inf at the last step only
    lam = z.log_snr(np.arange(z.T))
    assert lam[-1] == -np.inf
    assert np.all(np.isfinite(lam[:-1]))
    assert np.all(np.diff(lam[:-1]) < 0)
    # the same via rescaled_zero_terminal_snr() and the free function
    np.testing.assert_allclose(base.rescaled_zero_terminal_snr().alphas_cumprod, z.alphas_cumprod, rtol=1e-14, atol=0)
    np.testing.assert_allclose(rescale_zero_terminal_snr(base.alphas_cumprod), z.alphas_cumprod, rtol=1e-14, atol=0)


def test_zero_terminal_snr_hand_values():
    # sqrt(alphabar) = [0.9, 0.5, 0.3] -> (r - 0.3) * 0.9 / 0.6 = [0.9, 0.3, 0]
    z = NoiseSchedule.from_alphas_cumprod([0.81, 0.25, 0.09], zero_terminal_snr=True)
    np.testing.assert_allclose(z.alphas_cumprod, [0.81, 0.09, 0.0], rtol=1e-13, atol=1e-15)
    assert z.log_snr(2) == -math.inf
    assert math.isfinite(z.log_snr(1))
    assert z.snr(1) == pytest.approx(0.09 / 0.91, rel=1e-12)


def test_zero_terminal_snr_of_constant_raises():
    with pytest.raises(ValueError):
        NoiseSchedule.from_alphas_cumprod([0.5, 0.5, 0.5], zero_terminal_snr=True)


def test_alphas_cumprod_is_read_only():
    sch = NoiseSchedule.linear(T=10)
    with pytest.raises(ValueError):
        sch.alphas_cumprod[0] = 0.5
