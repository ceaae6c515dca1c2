"""Tests for gradconflict.weighting against the formulas of PAPER.md and the module docstring."""

import math

import numpy as np
import pytest
import torch

from gradconflict import weighting as W

FINITE_SNRS = [1e-3, 0.01, 0.3, 1.0, 2.5, 5.0, 7.0, 100.0, 1e4]
TARGETS = ["x0", "eps", "v"]


def _hand(x0_weight):
    """x0/eps/v weights by hand from an x0-unit weight function of a python float."""
    return {
        "x0": lambda s: x0_weight(s),
        "eps": lambda s: x0_weight(s) / s,
        "v": lambda s: x0_weight(s) / (s + 1.0),
    }


# PAPER.md table (+ the module docstring's extra strategies), each written out by hand
HAND = {
    "constant": (W.constant(), _hand(lambda s: 1.0)),
    "snr": (W.snr(), _hand(lambda s: s)),
    "max_snr_1": (W.max_snr(1.0), _hand(lambda s: max(s, 1.0))),
    "max_snr_3": (W.max_snr(3.0), _hand(lambda s: max(s, 3.0))),
    "min_snr_5": (W.min_snr(5.0), _hand(lambda s: min(s, 5.0))),
    "min_snr_2": (W.min_snr(2.0), _hand(lambda s: min(s, 2.0))),
    "soft_min_snr_5": (W.soft_min_snr(5.0), _hand(lambda s: s * 5.0 / (s + 5.0))),
    "inv_snr": (W.inv_snr(), _hand(lambda s: 1.0 / s)),
    "p2_1_1": (W.p2(1.0, 1.0), _hand(lambda s: s / (1.0 + s) ** 1.0)),
    "p2_0.5_2": (W.p2(0.5, 2.0), _hand(lambda s: s / (2.0 + s) ** 0.5)),
}


@pytest.mark.parametrize("key", sorted(HAND))
@pytest.mark.parametrize("tgt", TARGETS)
def test_table_values_at_finite_snr(key, tgt):
    strat, hand = HAND[key]
    for s in FINITE_SNRS:
        assert strat.weight(s, tgt) == pytest.approx(hand[tgt](s), rel=1e-12), (key, tgt, s)
    arr = strat.weight(np.array(FINITE_SNRS), tgt)
    np.testing.assert_allclose(arr, [hand[tgt](s) for s in FINITE_SNRS], rtol=1e-12)


def test_paper_table_spot_values():
    # SNR = 2, gamma = 5 (min) / 1 (max), written out
    assert W.constant().weight(2.0, "eps") == pytest.approx(0.5)
    assert W.constant().weight(2.0, "v") == pytest.approx(1 / 3)
    assert W.snr().weight(2.0, "eps") == pytest.approx(1.0)
    assert W.snr().weight(2.0, "v") == pytest.approx(2 / 3)
    assert W.max_snr(1.0).weight(0.5, "x0") == pytest.approx(1.0)
    assert W.max_snr(1.0).weight(0.5, "eps") == pytest.approx(2.0)
    assert W.max_snr(1.0).weight(0.5, "v") == pytest.approx(1 / 1.5)
    assert W.min_snr(5.0).weight(8.0, "x0") == pytest.approx(5.0)
    assert W.min_snr(5.0).weight(8.0, "eps") == pytest.approx(5 / 8)
    assert W.min_snr(5.0).weight(8.0, "v") == pytest.approx(5 / 9)
    assert W.min_snr(5.0).weight(2.0, "eps") == pytest.approx(1.0)
    # p2 (Choi et al.): eps weight 1/(k + SNR)^gamma
    assert W.p2(1.0, 1.0).weight(3.0, "eps") == pytest.approx(0.25)
    assert W.p2(2.0, 0.5).weight(3.0, "eps") == pytest.approx(1 / 3.5**2)


ALL_STRATEGIES = [
    W.constant(), W.snr(), W.max_snr(1.0), W.max_snr(5.0), W.min_snr(5.0), W.min_snr(0.5),
    W.soft_min_snr(5.0), W.inv_snr(), W.p2(1.0, 1.0), W.p2(0.5, 2.0), W.p2(0.0, 1.0), W.p2(2.0, 1.0),
    W.custom(np.sqrt, name="sqrt"), W.custom(lambda s: math.exp(-s) + 1.0, name="scalar_exp"),
]


@pytest.mark.parametrize("strat", ALL_STRATEGIES, ids=lambda s: s.name)
@pytest.mark.parametrize("tgt", TARGETS)
def test_finite_and_nonnegative_at_zero_and_inf(strat, tgt):
    for s in (0.0, math.inf):
        w = strat.weight(s, tgt)
        assert math.isfinite(w) and w >= 0, (strat.name, tgt, s, w)
    w = strat.weight(np.array([0.0, 1e-30, 1.0, 1e30, np.inf]), tgt)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)


@pytest.mark.parametrize(
    "strat, tgt, snr_value, expected",
    [
        (W.min_snr(5.0), "eps", 0.0, 1.0),
        (W.min_snr(5.0), "eps", math.inf, 0.0),
        (W.min_snr(5.0), "x0", math.inf, 5.0),
        (W.min_snr(3.0), "x0", math.inf, 3.0),
        (W.min_snr(5.0), "x0", 0.0, 0.0),
        (W.min_snr(5.0), "v", 0.0, 0.0),
        (W.min_snr(5.0), "v", math.inf, 0.0),
        (W.snr(), "v", math.inf, 1.0),
        (W.snr(), "v", 0.0, 0.0),
        (W.snr(), "eps", 0.0, 1.0),
        (W.snr(), "eps", math.inf, 1.0),
        (W.snr(), "x0", 0.0, 0.0),
        (W.constant(), "x0", 0.0, 1.0),
        (W.constant(), "x0", math.inf, 1.0),
        (W.constant(), "v", 0.0, 1.0),
        (W.constant(), "v", math.inf, 0.0),
        (W.constant(), "eps", math.inf, 0.0),
        (W.max_snr(1.0), "x0", 0.0, 1.0),
        (W.max_snr(2.0), "v", 0.0, 2.0),
        (W.max_snr(1.0), "eps", math.inf, 1.0),
        (W.soft_min_snr(5.0), "eps", 0.0, 1.0),
        (W.soft_min_snr(5.0), "eps", math.inf, 0.0),
        (W.soft_min_snr(5.0), "x0", 0.0, 0.0),
        (W.soft_min_snr(5.0), "v", 0.0, 0.0),
        (W.soft_min_snr(5.0), "v", math.inf, 0.0),
        (W.inv_snr(), "x0", math.inf, 0.0),
        (W.p2(1.0, 1.0), "eps", 0.0, 1.0),
        (W.p2(1.0, 2.0), "eps", 0.0, 0.5),
        (W.p2(1.0, 1.0), "eps", math.inf, 0.0),
        (W.p2(1.0, 1.0), "x0", 0.0, 0.0),
        (W.p2(0.0, 1.0), "eps", math.inf, 1.0),
    ],
)
def test_exact_limits(strat, tgt, snr_value, expected):
    assert strat.weight(snr_value, tgt) == expected


@pytest.mark.parametrize(
    "strat, tgt, snr_value, expected",
    [
        # limits that are reached only through the [1e-12, 1e12] clamp: equal up to ~1e-12 relative
        (W.max_snr(1.0), "v", math.inf, 1.0),
        (W.soft_min_snr(5.0), "x0", math.inf, 5.0),
        (W.p2(1.0, 1.0), "x0", math.inf, 1.0),
    ],
)
def test_limits_through_clamp(strat, tgt, snr_value, expected):
    assert strat.weight(snr_value, tgt) == pytest.approx(expected, rel=1e-9)


def test_divergent_weights_use_clamped_snr():
    # constant eps weight 1/SNR at SNR = 0 -> 1/SNR_MIN; inv_snr x0 weight -> 1/SNR_MIN
    assert W.SNR_MIN == 1e-12 and W.SNR_MAX == 1e12
    assert W.constant().weight(0.0, "eps") == pytest.approx(1e12, rel=1e-12)
    assert W.inv_snr().weight(0.0, "x0") == pytest.approx(1e12, rel=1e-12)
    assert W.max_snr(2.0).weight(0.0, "eps") == pytest.approx(2e12, rel=1e-12)
    assert W.snr().weight(math.inf, "x0") == pytest.approx(1e12, rel=1e-12)


@pytest.mark.parametrize("strat", ALL_STRATEGIES, ids=lambda s: s.name)
def test_eps_v_consistent_with_x0(strat):
    s = np.array(FINITE_SNRS)
    x0 = strat.weight(s, "x0")
    np.testing.assert_allclose(strat.weight(s, "eps") * s, x0, rtol=1e-12)
    np.testing.assert_allclose(strat.weight(s, "v") * (s + 1.0), x0, rtol=1e-12)


def test_target_aliases():
    st = W.min_snr(5.0)
    assert st.weight(8.0, "epsilon") == pytest.approx(5 / 8)
    assert st.weight(8.0, "v_prediction") == pytest.approx(5 / 9)
    assert st.weight(8.0, "sample") == pytest.approx(5.0)
    assert st(8.0) == pytest.approx(5.0)  # default target is x0, __call__ == weight
    with pytest.raises(ValueError):
        st.weight(8.0, "score")


# ----------------------------------------------------------------------------- custom
def test_custom_vectorized_and_scalar_only_agree():
    vec = W.custom(lambda s: np.sqrt(s) + 0.5)
    sca = W.custom(lambda s: math.sqrt(s) + 0.5)
    s = np.array([0.0, 0.04, 1.0, 4.0, 9.0, np.inf])
    for tgt in TARGETS:
        a, b = vec.weight(s, tgt), sca.weight(s, tgt)
        assert a.shape == s.shape and b.shape == s.shape
        np.testing.assert_allclose(a, b, rtol=1e-15)
    # by hand at finite s
    np.testing.assert_allclose(sca.weight(s[1:5], "x0"), [0.7, 1.5, 2.5, 3.5], rtol=1e-14)
    np.testing.assert_allclose(sca.weight(s[1:5], "eps"), [0.7 / 0.04, 1.5, 2.5 / 4, 3.5 / 9], rtol=1e-14)
    # SNR = 0 is clamped to SNR_MIN before the user function sees it
    assert sca.weight(0.0, "x0") == pytest.approx(math.sqrt(1e-12) + 0.5, rel=1e-14)


def test_custom_with_branching_scalar_fn_equals_min_snr():
    cust = W.custom(lambda s: s if s < 5.0 else 5.0, name="mymin")
    assert cust.name == "mymin"
    s = np.array(FINITE_SNRS)
    for tgt in TARGETS:
        np.testing.assert_allclose(cust.weight(s, tgt), W.min_snr(5.0).weight(s, tgt), rtol=1e-14)


def test_custom_name_defaults_to_function_name():
    def my_weight(s):
        return np.ones_like(s)

    assert W.custom(my_weight).name == "my_weight"


@pytest.mark.parametrize("fn", [lambda s: -np.ones_like(s), lambda s: s - 2.0, lambda s: math.nan, lambda s: math.inf])
def test_custom_negative_or_nonfinite_raises(fn):
    cust = W.custom(fn)
    with pytest.raises(ValueError):
        cust.weight(np.array([1.0, 3.0]), "x0")


def test_custom_not_callable_raises():
    with pytest.raises(TypeError):
        W.custom(3.0)


@pytest.mark.parametrize("strat", [W.constant(), W.min_snr(), W.custom(np.sqrt)], ids=lambda s: s.name)
@pytest.mark.parametrize("bad", [-1.0, -1e-300, np.array([1.0, -0.5]), math.nan, torch.tensor([2.0, -3.0])])
def test_negative_or_nan_snr_raises(strat, bad):
    for tgt in TARGETS:
        with pytest.raises(ValueError):
            strat.weight(bad, tgt)


@pytest.mark.parametrize("factory", [W.max_snr, W.min_snr, W.soft_min_snr])
@pytest.mark.parametrize("gamma", [0.0, -1.0, math.inf, math.nan])
def test_bad_gamma_raises(factory, gamma):
    with pytest.raises(ValueError):
        factory(gamma)


def test_bad_p2_parameters_raise():
    for kwargs in ({"k": 0.0}, {"k": -1.0}, {"gamma": -0.5}, {"gamma": math.inf}):
        with pytest.raises(ValueError):
            W.p2(**kwargs)


# ----------------------------------------------------------------------------- by_name
@pytest.mark.parametrize(
    "spec, snr_value, tgt, expected",
    [
        ("min_snr", 10.0, "x0", 5.0),  # default gamma = 5
        ("min_snr:3", 10.0, "x0", 3.0),
        ("MIN_SNR:3", 10.0, "eps", 0.3),
        ("min_snr_3", 10.0, "x0", 3.0),
        ("min-snr-2.5", 10.0, "x0", 2.5),
        ("max-snr-1", 0.5, "x0", 1.0),
        ("max_snr", 0.5, "x0", 1.0),  # default gamma = 1
        ("max_snr:4", 0.5, "eps", 8.0),
        ("soft_min_snr:5", 5.0, "x0", 2.5),
        ("soft-min-snr-5", 5.0, "x0", 2.5),
        ("p2:1,1", 3.0, "eps", 0.25),
        ("p2:2,0.5", 3.0, "eps", 1 / 3.5**2),
        ("p2_1_1", 3.0, "eps", 0.25),
        ("  constant ", 4.0, "eps", 0.25),
        ("snr", 4.0, "v", 0.8),
        ("inv_snr", 4.0, "x0", 0.25),
    ],
)
def test_by_name_parses(spec, snr_value, tgt, expected):
    assert W.by_name(spec).weight(snr_value, tgt) == pytest.approx(expected, rel=1e-12)


def test_by_name_names():
    assert W.by_name("min_snr:3").name == "min_snr_3"
    assert W.by_name("max-snr-1").name == "max_snr_1"
    assert W.by_name("p2:1,1").name == "p2_1_1"
    assert W.by_name("constant").name == "constant"


@pytest.mark.parametrize("spec", ["foo", "", "min_snr_x", "minsnr", "min_snr:abc", "min_snr:0", "min_snr:-1", "p2:-1", "snr2"])
def test_by_name_invalid_raises(spec):
    with pytest.raises(ValueError):
        W.by_name(spec)


def test_by_name_too_many_arguments_raises_value_error():
    # BUG (gradconflict/weighting.py, by_name): "min_snr:1,2" raises TypeError (min_snr() takes at most
    # one argument) instead of ValueError, so the CLI's `except ValueError` does not catch a malformed spec.
    with pytest.raises(ValueError):
        W.by_name("min_snr:1,2")


def test_default_strategies():
    names = [s.name for s in W.DEFAULT_STRATEGIES()]
    assert names == ["constant", "snr", "max_snr_1", "min_snr_5"]


# ----------------------------------------------------------------------------- kinds
def test_kind_in_kind_out():
    st = W.min_snr(5.0)
    ten = st.weight(torch.tensor([2.0, 10.0], dtype=torch.float32), "eps")
    assert isinstance(ten, torch.Tensor) and ten.dtype == torch.float64
    torch.testing.assert_close(ten, torch.tensor([1.0, 0.5], dtype=torch.float64))
    arr = st.weight(np.array([[2.0, 10.0]]), "v")
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 2) and arr.dtype == np.float64
    np.testing.assert_allclose(arr, [[2 / 3, 5 / 11]], rtol=1e-14)
    f = st.weight(10.0, "x0")
    assert isinstance(f, float) and f == 5.0
    assert isinstance(st.weight(10, "x0"), float)
    lst = st.weight([1.0, 10.0], "x0")
    np.testing.assert_allclose(lst, [1.0, 5.0])


def test_zero_dim_tensor_in_gives_zero_dim_tensor_out():
    # BUG (gradconflict/_arrays.py, like_input): np.ascontiguousarray turns a 0-d result into shape (1,),
    # so weight(torch.tensor(2.0)) returns a shape-(1,) tensor instead of a 0-d tensor.
    out = W.min_snr(5.0).weight(torch.tensor(2.0), "x0")
    assert isinstance(out, torch.Tensor)
    assert out.shape == torch.Size([])


def test_custom_scalar_only_fn_on_single_element_and_0d():
    cust = W.custom(math.sqrt)
    np.testing.assert_allclose(cust.weight(np.array([4.0]), "x0"), [2.0], rtol=1e-15)
    np.testing.assert_allclose(cust.weight(np.array([4.0, 9.0]), "x0"), [2.0, 3.0], rtol=1e-15)
    assert cust.weight(16.0, "eps") == pytest.approx(4.0 / 16.0, rel=1e-15)
