"""`gradconflict compare` end to end on the toy preset: tidy results, resume, refusal of other settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from gradconflict.cli import main
from gradconflict.comparison import CompareConfig, compare, load_compare, preset, run_name


def _toy() -> CompareConfig:
    return dataclasses.replace(preset("toy"), seeds=1)


def test_compare_resumes_an_evaluation_bit_for_bit(tmp_path: Path) -> None:
    config = _toy()
    evals = compare(config, tmp_path, progress=False)
    assert sorted(evals["weighting"].unique()) == ["constant", "min_snr:5"]
    assert list(evals.groupby("weighting")["step"].apply(list)) == [[2, 4], [2, 4]]
    finite = ["loss_x0", "loss_model", "pareto_ratio", "diag_ratio", "reg_share", "seconds_per_step"]
    assert evals[finite].notna().all().all() and (evals["pareto_ratio"] >= 1 - 1e-9).all()
    _, per_bin = load_compare(tmp_path)
    assert len(per_bin) == 2 * 2 * config.bins  # weightings x evaluations x bins
    # the run's mean over bins is the row's total
    one = per_bin[(per_bin["weighting"] == "constant") & (per_bin["step"] == 4)]
    assert one["loss_x0"].mean() == pytest.approx(float(evals.query("weighting == 'constant' and step == 4")["loss_x0"].iloc[0]))
    # lose the last evaluation of one run (as if killed before writing it) and the training past step 2
    folder = tmp_path / "runs" / run_name("min_snr:5", 0)
    before = pd.read_csv(folder / "evals.csv")
    before.iloc[:1].to_csv(folder / "evals.csv", index=False)
    again = compare(config, tmp_path, progress=False)
    cols = ["loss_x0", "loss_model", "pareto_ratio", "diag_ratio"]
    after = again[again["weighting"] == "min_snr:5"].reset_index(drop=True)
    pd.testing.assert_frame_equal(after[cols], before[cols])


def test_compare_refuses_other_settings_in_the_same_folder(tmp_path: Path) -> None:
    compare(dataclasses.replace(_toy(), weightings=("constant",)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="lam"):
        compare(dataclasses.replace(_toy(), weightings=("constant",), lam=0.5), tmp_path, progress=False)


def test_config_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="eval_every"):
        CompareConfig(steps=10, eval_every=20)
    with pytest.raises(ValueError, match="same run folder"):
        CompareConfig(weightings=("min_snr:5", "min_snr_5"))
    with pytest.raises(ValueError, match="fd_samples"):
        CompareConfig(fd_samples=50)
    with pytest.raises(ValueError):
        CompareConfig(weightings=("no_such_weighting",))


def test_cli_writes_figures_claims_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["compare", "--toy", "--seeds", "1", "--weightings", "constant", "snr", "max_snr:1", "min_snr:5",
               "--out", str(tmp_path / "cmp"), "--no-progress"])
    assert rc == 0
    figures = tmp_path / "cmp" / "figures"
    for name in ("fig5_convergence", "fig6_loss_per_timestep", "score_vs_speed"):
        assert (figures / f"{name}.png").is_file() and (figures / f"{name}.csv").is_file()
    claims = pd.read_csv(figures / "claims.csv")
    assert list(claims.columns) == ["claim", "verdict", "statistic", "stderr", "n_models", "unit", "lam_rule", "notes"]
    assert {"C4 (loss_x0)", "C5 (loss_x0)"} <= set(claims["claim"])
    assert "<!-- compare:begin -->" in (figures / "REPORT.md").read_text()
    assert "C4 (loss_x0)" in capsys.readouterr().out


def test_report_only_leaves_out_incomplete_weightings_and_trains_nothing(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--toy", "--seeds", "1", "--weightings", "constant", "min_snr:5", "--out", str(out),
                 "--no-progress"]) == 0
    folder = out / "runs" / run_name("min_snr:5", 0)
    pd.read_csv(folder / "evals.csv").iloc[:1].to_csv(folder / "evals.csv", index=False)  # as if still training
    before = (folder / "checkpoint.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["compare", "--toy", "--seeds", "1", "--weightings", "constant", "min_snr:5", "--out", str(out),
                 "--figures", str(tmp_path / "fig"), "--report-only"]) == 0
    printed = capsys.readouterr().out
    assert "left out: min_snr:5" in printed
    table = pd.read_csv(tmp_path / "fig" / "fig5_convergence.csv")
    assert set(table["weighting"]) == {"constant"}
    assert (folder / "checkpoint.pt").stat().st_mtime_ns == before and len(pd.read_csv(folder / "evals.csv")) == 1
