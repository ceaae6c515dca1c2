"""C1 and C3 over independently trained models (#16): hand-computed transfer matrices, the first-order Gram
prediction, verdicts over synthetic models, closed forms on diagonal Grams, the lam rule, and the figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradconflict.bins import TimestepBins
from gradconflict.comparison.report import CLAIM_COLUMNS
from gradconflict.figures.lam_path import gamma_sweep_figure, lam_path_figure
from gradconflict.reproduce.c1 import c1_statistics, c1_table, claim_c1_models
from gradconflict.reproduce.c3 import (binning_variants, c3_binning_table, c3_controls, claim_c3_models, gamma_sweep,
                                       lam_rule, lam_rule_models)
from gradconflict.schedule import NoiseSchedule
from gradconflict.weighting import min_snr

T975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (table value)

M3 = np.array([[0.5, 0.2, -0.1],
               [0.3, 0.6, 0.1],
               [-0.4, 0.05, 0.7]])


def test_c1_statistics_3x3_by_hand() -> None:
    s = c1_statistics(M3)
    # near: (0,1) .2, (1,0) .3, (1,2) .1, (2,1) .05; far (|i-j| >= 2): (0,2) -.1, (2,0) -.4
    assert s["far_distance"] == 2 and s["near_cells"] == 4 and s["far_cells"] == 2
    assert s["near_mean"] == pytest.approx(0.1625) and s["near_median"] == pytest.approx(0.15)
    assert s["near_smaller_mean"] == pytest.approx(0.175) and s["near_larger_mean"] == pytest.approx(0.15)
    assert s["far_mean"] == pytest.approx(-0.25) and s["far_median"] == pytest.approx(-0.25)
    assert s["far_smaller_mean"] == pytest.approx(-0.4) and s["far_larger_mean"] == pytest.approx(-0.1)
    assert s["diagonal_mean"] == pytest.approx(0.6)


def test_c1_statistics_4x4_and_5x5_by_hand() -> None:
    M = np.array([[1.0, 0.1, -0.2, -0.3],
                  [0.4, 1.0, 0.2, -0.5],
                  [-0.1, 0.3, 1.0, 0.0],
                  [-0.6, 0.8, 0.5, 1.0]])
    s = c1_statistics(M)
    assert s["near_mean"] == pytest.approx(0.25) and s["near_median"] == pytest.approx(0.25)
    assert s["near_smaller_mean"] == pytest.approx(0.4) and s["near_larger_median"] == pytest.approx(0.1)
    # far cells (0,2) -.2 (0,3) -.3 (1,3) -.5 (2,0) -.1 (3,0) -.6 (3,1) .8
    assert s["far_mean"] == pytest.approx(-0.15) and s["far_median"] == pytest.approx(-0.25)
    assert s["far_smaller_mean"] == pytest.approx(0.1 / 3) and s["far_smaller_median"] == pytest.approx(-0.1)
    assert s["far_larger_mean"] == pytest.approx(-1 / 3) and s["far_larger_median"] == pytest.approx(-0.3)
    five = c1_statistics(np.eye(5))  # K = 5: far means |i-j| >= ceil(5/2) = 3: pairs (0,3) (0,4) (1,4), both ways
    assert five["far_distance"] == 3 and five["far_cells"] == 6 and five["near_cells"] == 8


def test_first_order_prediction_on_a_hand_gram() -> None:
    G = np.array([[4.0, 1.0, -2.0], [1.0, 9.0, -3.0], [-2.0, -3.0, 16.0]])
    s = c1_statistics(M3, G, np.array([2.0, 4.0, 8.0]), 0.5)
    Z = np.array([[1.0, 0.125, -0.125], [0.25, 1.125, -0.1875], [-0.5, -0.375, 1.0]])  # 0.5 G_ij / L_j
    np.testing.assert_allclose(s["first_order"], Z, rtol=1e-15)
    assert s["sign_disagree"] == 2 and s["sign_disagree_cells"] == [(1, 2), (2, 1)]
    assert s["spearman"] == pytest.approx(29 / 35)  # 1 - 6 * sum d^2 / (n (n^2 - 1)), sum d^2 = 6, n = 6
    off = ~np.eye(3, dtype=bool)
    assert s["pearson"] == pytest.approx(np.corrcoef(Z[off], M3[off])[0, 1])
    again = c1_statistics(M3, first_order=Z)
    assert again["spearman"] == pytest.approx(29 / 35) and again["sign_disagree"] == 2
    with pytest.raises(ValueError, match="gram, losses and lr together"):
        c1_statistics(M3, G)
    with pytest.raises(ValueError, match="K >= 3"):
        c1_statistics(np.eye(2))


def _model(a: float, far_small: float, far_large: float) -> dict:
    """K = 3, near cells a; far cells (2,0) (toward smaller t) and (0,2) (toward larger t)."""
    return c1_statistics(np.array([[1.0, a, far_large], [a, 1.0, a], [far_small, a, 1.0]]))


def test_claim_c1_over_three_models() -> None:
    far = [-0.2, -0.1, -0.15]
    row = claim_c1_models([_model(a, b, b) for a, b in zip([0.10, 0.12, 0.14], far)])
    assert tuple(row) == CLAIM_COLUMNS
    assert row["verdict"] == "holds" and row["n_models"] == 3
    assert row["statistic"] == pytest.approx(-0.15) and row["stderr"] == pytest.approx(0.05 / np.sqrt(3))
    hi = -0.15 + T975_2 * 0.05 / np.sqrt(3)
    assert f"{hi:+.4f}]" in row["notes"] and "distant harm holds on both sides" in row["notes"]
    assert claim_c1_models([_model(a, b, b) for a, b in zip([-0.10, -0.12, -0.14], far)])["verdict"] == "refuted"
    wide = [_model(a, b, b) for a, b in zip([0.10, 0.12, 0.14], [-0.3, 0.1, 0.05])]
    assert claim_c1_models(wide)["verdict"] == "undecided"
    two = claim_c1_models([_model(a, b, b) for a, b in zip([0.10, 0.12], [-0.2, -0.1])])
    assert two["verdict"] == "undecided" and "needs >= 3" in two["notes"]
    one_side = claim_c1_models([_model(0.1 + e, 0.2 + e, -0.3 + e) for e in (0.0, 0.01, 0.02)])
    assert "distant harm holds on larger t" in one_side["notes"]
    table = c1_table([_model(a, b, b) for a, b in zip([0.10, 0.12, 0.14], far)])
    assert list(table["model"]) == [0, 1, 2] and table["far_mean"].tolist() == pytest.approx(far)


SCHEDULE = NoiseSchedule.linear()


def _closed_form(d: np.ndarray, lam_abs: float, w: np.ndarray) -> tuple[float, float]:
    """Ratio and reg share for G = diag(d): w*_k = (1/(d_k+lam)) / sum, f* = 1 / sum 1/(d_k + lam)."""
    inv = 1.0 / (d + lam_abs)
    f_star, w_star = 1.0 / inv.sum(), inv / inv.sum()
    return float(w @ ((d + lam_abs) * w)) / f_star, lam_abs * float(w_star @ w_star) / f_star


def test_c3_on_a_diagonal_gram_matches_the_closed_form() -> None:
    bins = TimestepBins.uniform(SCHEDULE.T, 4)
    d1, d2 = np.array([1.0, 2.0, 4.0, 8.0]), np.array([0.5, 3.0, 3.0, 9.0])
    strategies = {"uniform": np.full(4, 0.25), "tilted": np.array([0.4, 0.3, 0.2, 0.1]), "min_snr_5": min_snr(5.0)}
    c = c3_controls([[np.diag(d1), np.diag(d2)]], bins, SCHEDULE, strategies, lams=(0.1, 0.5))
    w_min_snr = bins.strategy_weights(min_snr(5.0), SCHEDULE)
    for lam in (0.1, 0.5):
        for name, w in (("uniform", np.full(4, 0.25)), ("tilted", np.array([0.4, 0.3, 0.2, 0.1])),
                        ("min_snr_5", w_min_snr)):
            r1, s1 = _closed_form(d1, lam * d1.sum() / 4, w)
            r2, s2 = _closed_form(d2, lam * d2.sum() / 4, w)
            row = c[(c["lam"] == lam) & (c["strategy"] == name)].iloc[0]
            assert row["ratio"] == pytest.approx((r1 + r2) / 2, rel=1e-9)  # mean over the model's Grams
            assert row["diag_ratio"] == pytest.approx(row["ratio"], rel=1e-9)  # no conflicts: null == measured
            assert row["reg_share"] == pytest.approx((s1 + s2) / 2, rel=1e-9)
        assert c.loc[c["lam"] == lam, "diag_min"].iloc[0] == 0.5 and c.loc[c["lam"] == lam, "diag_max"].iloc[0] == 9.0
    assert set(c["rank"]) == {1, 2, 3} and (c["rank"] == c["diag_rank"]).all()


def test_reg_share_by_hand() -> None:
    # G = diag(1, 3), lam = 1 x trace/K = 2: w* = (5/8, 3/8), f* = 15/8, share = 2 (34/64) / (15/8) = 17/30
    c = c3_controls([[np.diag([1.0, 3.0])]], TimestepBins.uniform(SCHEDULE.T, 2), SCHEDULE,
                    {"uniform": np.array([0.5, 0.5])}, lams=(1.0,))
    assert c["reg_share"].iloc[0] == pytest.approx(17 / 30, rel=1e-9)
    assert c["ratio"].iloc[0] == pytest.approx((0.25 * 3 + 0.25 * 5) / (15 / 8), rel=1e-9)


def test_lam_rule_on_a_gram_with_a_known_threshold() -> None:
    # G = [[1, 1], [1, 4]]: w*_2 = L / (3 + 2 L) with L = lam trace/K = 2.5 lam; w*_2 > tau iff L > 3 tau / (1 - 2 tau)
    G = np.array([[1.0, 1.0], [1.0, 4.0]])
    grid = np.logspace(-5, 0, 51)
    root = 3 * 5e-4 / (1 - 1e-3) / 2.5  # tau = 1e-3 / K = 5e-4: 6.006e-4
    assert lam_rule([G], grid) == pytest.approx(grid[grid > root][0]) == pytest.approx(10 ** -3.2)
    assert lam_rule([G], grid, threshold=0.1) == pytest.approx(grid[grid > 0.375 / 2.5][0])
    assert np.isnan(lam_rule([G], [1e-6, 1e-5]))
    value, per = lam_rule_models([[G], [G * 3.0]], grid)  # scaling G leaves the relative rule unchanged
    assert per == [pytest.approx(10 ** -3.2)] * 2 and value == pytest.approx(10 ** -3.2)


def _controls(lams: tuple, means: dict) -> pd.DataFrame:
    """Synthetic controls: three models, ratio = means[lam][strategy] + model offset (paired across strategies)."""
    rows = []
    for m, off in enumerate((0.0, 0.02, 0.05)):
        for lam in lams:
            for s, v in means[lam].items():
                rows.append(dict(model=m, lam=lam, strategy=s, ratio=v + off + (0.01 * m if s == "constant" else 0),
                                 diag_ratio=means[lam][s] if s != "snr" else 0.5, reg_share=0.3, diag_min=1e-3,
                                 diag_max=1e4))
    return pd.DataFrame(rows)


def test_claim_c3_over_models_and_lam_range() -> None:
    base = {"constant": 1.5, "snr": 3.0, "max_snr_1": 2.5, "min_snr_5": 1.2}
    means = {0.01: {**base, "constant": 1.1}, 0.1: base, 1.0: base}
    c = _controls((0.01, 0.1, 1.0), means)
    row = claim_c3_models(c, [0.05, 0.1, 0.02])  # largest per-model rule 0.1, on the grid
    assert tuple(row) == CLAIM_COLUMNS and row["verdict"] == "holds" and row["n_models"] == 3
    diffs = np.array([0.3, 0.31, 0.32])  # constant - min_snr_5 per model
    assert row["statistic"] == pytest.approx(diffs.mean()) and row["stderr"] == pytest.approx(0.01 / np.sqrt(3))
    assert "holds for lam in [0.1, 1]" in row["notes"] and "lam = 0.1 x trace(G)/K" in row["lam_rule"]
    assert "conflicts change the ranking" in row["notes"]  # the null puts snr first
    assert "diag(G) spans 0.001 .. 1e+04" in row["notes"] and "share of the optimum's objective 0.30" in row["notes"]
    refuted = claim_c3_models(c, 0.01)
    assert refuted["verdict"] == "refuted" and refuted["statistic"] == pytest.approx(np.mean([-0.1, -0.09, -0.08]))
    assert "lam = 0.1 " in claim_c3_models(c, 0.05)["lam_rule"]  # off the grid: the next larger grid lam
    two = claim_c3_models(c[c["model"] < 2], 0.1)
    assert two["verdict"] == "undecided" and "needs >= 3" in two["notes"]


def test_gamma_sweep_and_binning_table() -> None:
    bins = TimestepBins.uniform(SCHEDULE.T, 4)
    d = np.array([1.0, 2.0, 4.0, 8.0])
    sweep = gamma_sweep([[np.diag(d)]], bins, SCHEDULE, gammas=(0.1, 5.0), lam=0.5)
    assert set(sweep["family"]) == {"min_snr", "soft_min_snr", "reference"}
    assert sweep.loc[sweep["family"] == "reference", "gamma"].isna().all()
    assert set(sweep.loc[sweep["family"] == "reference", "strategy"]) == {"p2_1_1"}  # soft-Min-SNR-5 is swept
    assert "soft_min_snr_5" in set(gamma_sweep([[np.diag(d)]], bins, SCHEDULE, gammas=(0.1,), lam=0.5)
                                   .query("family == 'reference'")["strategy"])
    row = sweep[(sweep["family"] == "min_snr") & (sweep["gamma"] == 5.0)].iloc[0]
    assert row["ratio"] == pytest.approx(_closed_form(d, 0.5 * 15 / 4, bins.strategy_weights(min_snr(5.0), SCHEDULE))[0])
    variants = binning_variants(SCHEDULE, Ks=(4,))
    assert set(variants) == {"uniform_K4", "log_snr_K4"} and all(b.K == 4 for b in variants.values())
    table = c3_binning_table({n: (b, [[np.diag(d)]] * 3) for n, b in variants.items()}, SCHEDULE, lam=0.5)
    for name, b in variants.items():
        t = table[table["binning"] == name].set_index("strategy")
        exact = pd.Series({s: _closed_form(d, 0.5 * 15 / 4, b.strategy_weights(s, SCHEDULE))[0] for s in t.index})
        np.testing.assert_allclose(t["ratio"], exact[t.index], rtol=1e-9)
        assert (t["rank"] == exact.rank(method="min").astype(int)[t.index]).all()


def test_figures_write_png_and_csv(tmp_path) -> None:
    bins = TimestepBins.uniform(SCHEDULE.T, 4)
    rng = np.random.default_rng(0)
    grams = [[(lambda A: A @ A.T)(rng.normal(size=(4, 6)) * np.array([3.0, 1.0, 0.3, 0.1])[:, None])
              for _ in range(2)] for _ in range(3)]
    c = c3_controls(grams, bins, SCHEDULE, lams=(0.01, 0.1, 1.0))
    table = lam_path_figure(c, tmp_path / "lam_path", "\nsmoke test", lam_rule=0.1)
    assert (tmp_path / "lam_path.png").stat().st_size > 10_000
    csv = pd.read_csv(tmp_path / "lam_path.csv")
    assert {"lam", "strategy", "ratio_mean", "ratio_se", "ratio_min", "ratio_max", "diag_ratio_mean", "rank",
            "reg_share_mean", "diag_min", "diag_max", "n_models"} <= set(csv.columns)
    assert len(csv) == 3 * 4 and (csv["n_models"] == 3).all() and len(table) == len(csv)
    gamma_sweep_figure(gamma_sweep(grams, bins, SCHEDULE, gammas=(1.0, 5.0), lam=0.1), tmp_path / "gamma")
    assert (tmp_path / "gamma.png").stat().st_size > 10_000
    assert {"family", "strategy", "gamma", "ratio_mean", "n_models", "lam"} <= set(pd.read_csv(tmp_path / "gamma.csv").columns)
