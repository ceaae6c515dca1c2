"""C4-C6 statistics of the convergence comparison, against hand-computed curves."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from gradconflict.comparison import claim_c4, claim_c5, claim_c6, speedup, steps_to


def test_steps_to_interpolates_the_first_crossing() -> None:
    steps = np.array([100, 200, 300, 400])
    values = np.array([10.0, 6.0, 2.0, 3.0])
    assert steps_to(steps, values, 4.0) == pytest.approx(250.0)  # 6 -> 2 between 200 and 300: halfway
    assert steps_to(steps, values, 2.0) == pytest.approx(300.0)
    assert steps_to(steps, values, 11.0) == 100.0  # already below at the first evaluation
    assert steps_to(steps, values, 1.0) == float("inf")


def test_speedup_of_a_curve_twice_as_fast_is_two() -> None:
    steps = np.arange(1, 11) * 100.0
    slow = 100.0 / steps  # reaches level L at step 100 / L
    fast = 100.0 / (2 * steps)  # reaches it at 50 / L
    # both end at their own final value; the level both reach is the slow one's: 0.1, at 1000 vs 500 steps
    assert speedup(steps, fast[None], steps, slow[None]) == pytest.approx(2.0, rel=1e-12)
    assert speedup(steps, slow[None], steps, fast[None]) == pytest.approx(0.5, rel=1e-12)


def _evals(curves: dict[str, list[np.ndarray]], steps: np.ndarray, extra: dict | None = None) -> pd.DataFrame:
    rows = []
    for weighting, per_seed in curves.items():
        for seed, curve in enumerate(per_seed):
            for step, value in zip(steps, curve):
                row = {"weighting": weighting, "seed": seed, "step": int(step), "fd_mnist": float(value),
                       "loss_x0": float(value), "seconds_per_step": 0.1, "pareto_ratio": np.nan, "diag_ratio": np.nan}
                row.update((extra or {}).get(weighting, {}))
                rows.append(row)
    return pd.DataFrame(rows)


def test_c4_holds_when_min_snr_is_faster_on_every_seed_and_is_refuted_when_slower() -> None:
    steps = np.arange(1, 9) * 50.0
    rng = np.random.default_rng(0)
    base = lambda k: [100.0 / (k * steps) * (1 + 0.01 * rng.standard_normal(steps.size)) for _ in range(3)]  # noqa: E731
    evals = _evals({"min_snr:5": base(3.0), "constant": base(1.0), "snr": base(1.5), "max_snr:1": base(1.2)}, steps)
    row, pairs = claim_c4(evals)
    assert row["verdict"] == "holds" and row["n_models"] == 3
    assert pairs.set_index("b").loc["constant", "speedup"] == pytest.approx(3.0, rel=0.05)
    assert pairs.set_index("b").loc["snr", "speedup"] == pytest.approx(2.0, rel=0.05)
    assert (pairs["ci_low"] > 1).all()
    slow = _evals({"min_snr:5": base(0.5), "constant": base(1.0), "snr": base(1.5), "max_snr:1": base(1.2)}, steps)
    assert claim_c4(slow)[0]["verdict"] == "refuted"


def test_c4_names_the_missing_weighting() -> None:
    steps = np.array([1.0, 2.0])
    with pytest.raises(ValueError, match="max_snr:1"):
        claim_c4(_evals({"min_snr:5": [steps], "constant": [steps], "snr": [steps]}, steps))


def test_c5_spearman_against_a_hand_computed_ranking() -> None:
    steps = np.array([100.0, 200.0])
    # four strategies: auc ordered a < b < c < d; Pareto ratios ordered the same; the diagonal null reversed
    aucs = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    ratios = {"a": 1.1, "b": 1.3, "c": 2.0, "d": 5.0}
    nulls = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.5}
    curves = {k: [np.full(2, v + 0.01 * s) for s in range(3)] for k, v in aucs.items()}
    extra = {k: {"pareto_ratio": ratios[k], "diag_ratio": nulls[k]} for k in aucs}
    row, table = claim_c5(_evals(curves, steps, extra))
    assert row["statistic"] == pytest.approx(1.0)  # identical ranks
    assert "null -1.00" in row["notes"]  # reversed ranks
    assert row["verdict"] == "holds"
    assert table.set_index("weighting").loc["c", "auc_fd_mnist"] == pytest.approx(3.01)


def test_c6_reports_steps_and_wallclock() -> None:
    steps = np.arange(1, 5) * 100.0
    evals = _evals({"pareto_online:10": [100 / (2 * steps)] * 3, "min_snr:5": [100 / steps] * 3}, steps)
    evals.loc[evals["weighting"] == "pareto_online:10", "seconds_per_step"] = 0.25  # 2.5x slower per step
    row, pairs = claim_c6(evals, references=("min_snr:5",))
    assert pairs["speedup"].iloc[0] == pytest.approx(2.0)
    assert pairs["wallclock_speedup"].iloc[0] == pytest.approx(0.8)


def test_c5_needs_a_ranking_better_than_chance_and_three_models() -> None:
    from gradconflict.comparison.claims import _permutation_p

    assert _permutation_p([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1 / 24)  # one of 24 orders is perfect
    assert _permutation_p([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(1.0)
    steps = np.array([100.0, 200.0])
    curves = {k: [np.full(2, v + 0.01 * s) for s in range(2)] for k, v in {"a": 1.0, "b": 2.0, "c": 3.0}.items()}
    extra = {k: {"pareto_ratio": r, "diag_ratio": 1.0} for k, r in {"a": 1.1, "b": 1.2, "c": 1.3}.items()}
    row, _ = claim_c5(_evals(curves, steps, extra))
    assert row["n_models"] == 2 and row["verdict"] == "undecided" and "only 2 model" in row["notes"]


def test_a_speedup_reached_at_the_first_evaluation_is_reported_as_a_bound() -> None:
    steps = np.arange(1, 6) * 100.0
    fast = [np.full(5, 1.0) + 0.01 * s for s in range(3)]  # at its final level from the first evaluation on
    slow = [np.linspace(10.0, 2.0, 5) + 0.01 * s for s in range(3)]
    evals = _evals({"min_snr:5": fast, "constant": slow, "snr": slow, "max_snr:1": slow}, steps)
    row, pairs = claim_c4(evals)
    assert (pairs["bound"] == ">=").all() and pairs["speedup"].iloc[0] == pytest.approx(5.0)  # 500 / 100 steps
    assert ">= 5.00x" in row["notes"]
