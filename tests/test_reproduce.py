"""`gradconflict reproduce --toy` (2 models): every output exists and parses, REPORT.md agrees with claims.csv (one
row per claim, CLAIM_COLUMNS, verdicts over models), the compare rows and section are kept, stages cache per model."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gradconflict.cli import main
from gradconflict.comparison.report import CLAIM_COLUMNS
from gradconflict.reproduce import claim_c1, claim_c2, claim_c3
from gradconflict.reproduce.claims import c3_lambda_sensitivity

FIGURES = ["fig2_transfer", "fig3_ugd_weights", "fig4_pareto_objective", "lambda_sweep", "conflict_vs_distance",
           "cosine_final", "c3_lam_path", "c3_gamma_sweep", "fig2_transfer_sgd", "fig3_online_weights"]
COMPARE_ROW = "C4 (loss_x0),holds,2.5,0.3,3,independently trained model (training seed),,kept from compare"
COMPARE_SECTION = "<!-- compare:begin -->\n## Convergence under each weighting (C4-C6)\nkept\n<!-- compare:end -->"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repro")
    fig = out / "figures"
    fig.mkdir()  # what `gradconflict compare` wrote before: its rows and report section must survive
    (fig / "claims.csv").write_text("claim,verdict,statistic,stderr,n_models,unit,lam_rule,notes\n" + COMPARE_ROW + "\n")
    (fig / "REPORT.md").write_text("# Report\n\n" + COMPARE_SECTION + "\n")
    assert main(["reproduce", "--toy", "--out", str(out), "--no-progress"]) == 0
    return out


def test_every_figure_and_csv_exists_and_parses(toy_run: Path) -> None:
    fig = toy_run / "figures"
    for name in FIGURES:
        png = fig / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        frame = pd.read_csv(fig / f"{name}.csv")
        assert len(frame) > 0, name
    assert (fig / "samples.png").stat().st_size > 0
    claims = pd.read_csv(fig / "claims.csv")
    assert tuple(claims.columns) == CLAIM_COLUMNS
    assert list(claims["claim"]) == ["C1", "C2", "C3", "C1 (sgd)", "C4 (loss_x0)"]  # the compare row kept
    assert (claims["n_models"].iloc[:4] == 2).all()
    for name in ("c1_models", "c2_models", "c3_binning", "learned"):
        assert len(pd.read_csv(fig / f"{name}.csv")) > 0, name
    runs = toy_run / "runs" / "reproduce-toy"
    for s in (0, 1):  # one cached folder per independently trained model
        assert (runs / f"seed{s}" / "transfer-adamw.csv").is_file() and (runs / f"seed{s}" / "transfer-sgd.csv").is_file()


def test_report_verdicts_agree_with_the_csvs(toy_run: Path) -> None:
    fig = toy_run / "figures"
    report = (fig / "REPORT.md").read_text()
    claims = pd.read_csv(fig / "claims.csv").set_index("claim")
    for claim in ["C1", "C2", "C3", "C1 (sgd)"]:
        row = re.search(rf"^\| {re.escape(claim)} \|.*$", report, flags=re.M).group(0)
        assert f"**{claims.loc[claim, 'verdict']}**" in row, claim
        assert claims.loc[claim, "verdict"] == "undecided"  # 2 models: below the 3 a verdict needs
    assert "no claim can be decided" in report and "docs/claims.md" in report
    assert report.count("<!-- compare:begin -->") == 1 and "\nkept\n" in report  # compare's section kept
    # C1's statistic recomputed from the per-model transfer CSVs: mean over models of the far cells' mean
    far = []
    for s in (0, 1):
        t = pd.read_csv(toy_run / "runs" / "reproduce-toy" / f"seed{s}" / "transfer-adamw.csv")
        t = t[t["source"] >= 0]
        M = t.pivot_table(index="source", columns="target", values="transfer", aggfunc="mean").to_numpy()
        i, j = np.indices(M.shape)
        far.append(M[np.abs(i - j) >= 2].mean())
    assert claims.loc["C1", "statistic"] == pytest.approx(np.mean(far), rel=1e-9)
    assert claims.loc["C1", "stderr"] == pytest.approx(np.std(far, ddof=1) / np.sqrt(2), rel=1e-9)
    # the C3 lam path's CSV holds every paper strategy at every lam of the grid
    path = pd.read_csv(fig / "c3_lam_path.csv")
    assert set(path["strategy"]) == {"constant", "snr", "max_snr_1", "min_snr_5"} and (path["n_models"] == 2).all()


def test_rerun_uses_the_cache(toy_run: Path, capsys) -> None:
    assert main(["reproduce", "--toy", "--out", str(toy_run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for stage in ("seed0/track", "seed1/track", "seed1/transfer-adamw", "seed1/transfer-sgd", "seed1/c2"):
        assert f"[{stage}] cached" in out, stage


def test_claim_c1_and_c3_on_constructed_inputs() -> None:
    K = 6
    i, j = np.indices((K, K))
    M = 0.1 - 0.05 * np.abs(i - j)  # helps neighbours (0.05), hurts far bins (<= -0.05)
    c1 = claim_c1(M, np.full((K, K), 0.001))
    assert c1["holds"] and c1["significant"]
    assert not claim_c1(-M, np.full((K, K), 0.001))["holds"]
    rows = []
    for step in range(3):
        for r in range(2):
            for name, ratio in [("constant", 5.0), ("snr", 3.0), ("max_snr_1", 2.9), ("min_snr_5", 2.0 + 0.01 * r)]:
                rows.append(dict(step=step, resample=r, name=name, kind="strategy", ratio=ratio))
    c3 = claim_c3(pd.DataFrame(rows))
    assert c3["holds"] and c3["best"] == "min_snr_5" and c3["win_share"] == 1.0


def test_claim_c1_significance_counts_the_spread_over_cells_and_reports_each_side() -> None:
    """Seeds that agree closely (tiny per-cell errors) must not make an effect that varies wildly across cells
    significant; and the far transfer is split by the side of the tuned bin."""
    K = 6
    i, j = np.indices((K, K))
    M = np.where(np.abs(i - j) == 1, 0.05, 0.0)
    M[(i - j) >= 3] = -1.0   # distant bins at smaller t: hurt a lot
    M[(j - i) >= 3] = 0.9    # distant bins at larger t: helped
    c1 = claim_c1(M, np.full((K, K), 1e-6))
    assert c1["far"] == pytest.approx(-0.05) and c1["holds"]  # far mean (-1 * 6 + 0.9 * 6) / 12 < 0 < near
    assert c1["far_smaller_t"] == pytest.approx(-1.0) and c1["far_larger_t"] == pytest.approx(0.9)
    assert c1["far_se"] > 0.2 and not c1["significant"]  # the cells' spread, not the seeds' 1e-6


def test_claim_c2_says_how_many_ugd_solves_converged() -> None:
    rows, objs = [], []
    for step in range(2):
        for r in range(2):
            for name, w in (("auto", [0.5, 0.5]), ("ugd", [0.5 + 0.1 * r, 0.5 - 0.1 * r])):
                rows += [dict(step=step, resample=r, name=name, bin=b, weight=x) for b, x in enumerate(w)]
            objs.append(dict(step=step, resample=r, name="ugd", converged=r == 0, gap=1e-3 * r, objective=1.0))
    c2 = claim_c2(pd.DataFrame(rows), objectives=pd.DataFrame(objs))
    assert "ugd converged on 2 of 4 Grams (largest gap / objective 1.0e-03)" in c2["measured"]


def test_c3_lambda_sensitivity_against_hand_computed_ratios() -> None:
    """Two bins, G = diag(1, 4): the optimum at lam_abs has weights proportional to 1 / (G_ii + lam_abs)."""
    G = np.diag([1.0, 4.0])
    strategies = ("constant", "snr", "max_snr_1", "min_snr_5")
    bins_w = {"constant": [0.5, 0.5], "snr": [0.9, 0.1], "max_snr_1": [0.8, 0.2], "min_snr_5": [0.6, 0.4]}
    weights = pd.DataFrame([dict(step=0, resample=0, name=s, bin=b, weight=x)
                            for s, w in bins_w.items() for b, x in enumerate(w)])
    table = c3_lambda_sensitivity(weights, {(0, 0): G}, lams=(0.0, 1.0), strategies=strategies).set_index(
        ["lam", "strategy"])
    for lam in (0.0, 1.0):
        lam_abs = lam * np.trace(G) / 2
        d = np.diag(G) + lam_abs
        f_star = 1.0 / np.sum(1.0 / d)  # min of sum d_i w_i^2 on the simplex
        for s, w in bins_w.items():
            f = float(np.sum(d * np.square(w)))
            assert table.loc[(lam, s), "mean_ratio"] == pytest.approx(f / f_star, rel=1e-12)
    assert table.loc[(0.0, "max_snr_1"), "wins"] == 1.0  # the optimum at lam = 0 is (0.8, 0.2), max_snr_1's weights


def test_a_changed_config_reruns_what_depends_on_it(tmp_path: Path, capsys) -> None:
    """A changed training config removes the cached run and tracking results and recomputes them (was: stale
    results kept under the new config); a changed tracking config keeps the training run."""
    from dataclasses import replace

    from gradconflict.reproduce import preset, reproduce

    base = preset("toy")
    reproduce(base, tmp_path, progress=False, only=["fig4_pareto_objective"])
    track = tmp_path / "runs" / "reproduce-toy" / "seed0" / "track"
    before = pd.read_csv(track / "track" / "track_objectives.csv")
    snapshot = (track / "snapshots" / "step3.safetensors").read_bytes()
    capsys.readouterr()
    retrack = replace(base, track=replace(base.track, per_task=3))
    reproduce(retrack, tmp_path, progress=False, only=["fig4_pareto_objective"])
    assert "the tracking config changed" in capsys.readouterr().out
    assert (track / "snapshots" / "step3.safetensors").read_bytes() == snapshot  # training kept
    retrain = replace(retrack, train=replace(base.train, lr=base.train.lr * 10))
    reproduce(retrain, tmp_path, progress=False, only=["fig4_pareto_objective"])
    assert "the training config changed" in capsys.readouterr().out
    after = pd.read_csv(track / "track" / "track_objectives.csv")
    assert (track / "snapshots" / "step3.safetensors").read_bytes() != snapshot  # retrained
    assert not np.allclose(after["objective"].to_numpy(), before["objective"].to_numpy()[: len(after)])


def test_fewer_steps_or_another_cadence_retrain_instead_of_reusing_the_longer_run(tmp_path: Path, capsys) -> None:
    """Training steps are not part of the training identity (a longer run resumes), so a shorter run must be
    caught by the trained step itself, and a new tracking cadence by its missing snapshots."""
    from dataclasses import replace

    from gradconflict.reproduce import preset, reproduce
    from gradconflict.track.run import _trained_step

    base = preset("toy")  # 6 steps, tracked every 3
    reproduce(base, tmp_path, progress=False, only=["fig4_pareto_objective"])
    run = tmp_path / "runs" / "reproduce-toy" / "seed0" / "track" / "run" / "model.safetensors"
    shorter = replace(base, train=replace(base.train, steps=3))
    reproduce(shorter, tmp_path, progress=False, only=["fig4_pareto_objective"])
    assert "the training config changed" in capsys.readouterr().out
    assert _trained_step(run) == 3  # retrained to the asked length, not the step-6 model
    steps = pd.read_csv(tmp_path / "runs" / "reproduce-toy" / "seed0" / "track" / "track" / "track_objectives.csv")["step"]
    assert sorted(steps.unique()) == [3]
    cadence = replace(base, every=2)  # checkpoints 2, 4, 6 of a run that has none of them yet
    reproduce(cadence, tmp_path, progress=False, only=["fig4_pareto_objective"])
    steps = pd.read_csv(tmp_path / "runs" / "reproduce-toy" / "seed0" / "track" / "track" / "track_objectives.csv")["step"]
    assert sorted(steps.unique()) == [2, 4, 6]


def test_a_cached_run_of_the_single_model_layout_becomes_model_0(tmp_path: Path, capsys) -> None:
    """Earlier versions cached one model in runs/reproduce-<preset>/track: it is moved to seed0/ and reused."""
    from gradconflict.reproduce import preset, reproduce

    base = preset("toy")
    reproduce(base, tmp_path, progress=False, only=["fig4_pareto_objective"])
    runs = tmp_path / "runs" / "reproduce-toy"
    snapshot = (runs / "seed0" / "track" / "snapshots" / "step3.safetensors").read_bytes()
    (runs / "seed0" / "track").rename(runs / "track")
    for f in (runs / "seed0").iterdir():
        f.unlink()
    (runs / "seed0").rmdir()
    capsys.readouterr()
    reproduce(base, tmp_path, progress=False, only=["fig4_pareto_objective"])
    assert "moved the cached run" in capsys.readouterr().out
    assert not (runs / "track").exists()
    assert (runs / "seed0" / "track" / "snapshots" / "step3.safetensors").read_bytes() == snapshot


def test_gpu_preset_is_the_standard_analysis_on_cuda() -> None:
    from gradconflict.reproduce import preset

    gpu, standard = preset("gpu"), preset("standard")
    assert gpu.train.device == "cuda" and gpu.name == "gpu"
    assert gpu.seeds == standard.seeds >= 3 and gpu.track == standard.track and gpu.train.model == standard.train.model
    assert gpu.train.steps > standard.train.steps  # a GPU affords a longer run of the same model


def test_the_quick_preset_never_overwrites_the_committed_figures(tmp_path: Path) -> None:
    """The committed figures/ are the standard preset's; the README's main job (quick) writes figures/quick/."""
    from gradconflict.reproduce.config import preset

    assert preset("quick").figures_dir(tmp_path) == tmp_path / "figures" / "quick"
    for kind in ("standard", "toy", "full"):
        assert preset(kind).figures_dir(tmp_path) == tmp_path / "figures"


@pytest.mark.parametrize("where, link", [("figures", "../docs/claims.md"), ("figures/quick", "../../docs/claims.md"),
                                         ("figures/clustered", "../../docs/claims.md"), ("elsewhere", "../docs/claims.md")])
def test_the_report_links_the_claims_document_from_where_it_lies(tmp_path: Path, where: str, link: str) -> None:
    from gradconflict.reproduce.report import _claims_link

    assert _claims_link(tmp_path / where / "REPORT.md") == link
    if where.startswith("figures"):  # the link resolves to the file in this repository's layout
        repo = Path(__file__).resolve().parents[1]
        assert (repo / where / link).resolve() == (repo / "docs" / "claims.md").resolve()
