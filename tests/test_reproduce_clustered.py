"""`gradconflict reproduce --toy --bins-file` after the uniform toy run in the same folder (issue #20): the trained
models are reused (no retraining), every bin-dependent output follows the file's bins, the clustered results sit
beside the uniform ones (the uniform rerun is all cached), and the comparison agrees with the two claims.csv."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import re
from pathlib import Path

import matplotlib.figure
import numpy as np
import pandas as pd
import pytest

from gradconflict.cli import main
from gradconflict.comparison.report import CLAIM_COLUMNS
from gradconflict.reproduce import preset
from gradconflict.reproduce.clustered import BEGIN, END, write_clustered_comparison
from gradconflict.reproduce.pipeline import _track_snapshots
from gradconflict.track import load_track

EDGES = [0, 100, 300, 550, 800, 1000]  # K = 5 uneven bins of the toy schedule (T = 1000); the uniform run has K = 4
COMPARE_SECTION = "<!-- compare:begin -->\n## Convergence under each weighting (C4-C6)\nkept\n<!-- compare:end -->"
CLAIMS = ["C1", "C2", "C3", "C1 (sgd)"]


def _no_render(fig, fname, *args, **kwargs) -> None:  # noqa: ANN001
    """Stand-in for ``Figure.savefig``: an empty file instead of a rendered PNG (rendering takes most of a toy
    run's time; tests/test_reproduce.py checks the PNGs themselves)."""
    if hasattr(fname, "write"):
        fname.write(b"")
    else:
        Path(fname).write_bytes(b"")


def _run(*args: str) -> tuple[int, str]:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "savefig", _no_render)
        code = main(["reproduce", "--toy", "--no-progress", *args])
    return code, buffer.getvalue()


def _fingerprint(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file of a training run and its snapshots."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("clustered")
    (out / "figures").mkdir()
    (out / "figures" / "REPORT.md").write_text("# Report\n\n" + COMPARE_SECTION + "\n")
    code, uniform_log = _run("--out", str(out))
    assert code == 0
    bins = out / "bins.csv"
    pd.DataFrame({"bin": range(5), "t_low": EDGES[:-1], "t_high": [e - 1 for e in EDGES[1:]],
                  "label": [f"b{k}" for k in range(5)]}).to_csv(bins, index=False)
    trained = {s: _fingerprint(out / "runs" / "reproduce-toy" / f"seed{s}" / "track" / "run") for s in (0, 1)}
    snaps = {s: _fingerprint(out / "runs" / "reproduce-toy" / f"seed{s}" / "track" / "snapshots") for s in (0, 1)}
    code, clustered_log = _run("--out", str(out), "--bins-file", str(bins))
    assert code == 0
    return {"out": out, "bins": bins, "uniform_log": uniform_log, "clustered_log": clustered_log, "trained": trained,
            "snaps": snaps, "key": dataclasses.replace(preset("toy"), bins_edges=tuple(EDGES)).bins_key}


def test_the_bins_file_run_reuses_the_trained_models(runs: dict) -> None:
    log, out = runs["clustered_log"], runs["out"]
    for s in (0, 1):
        assert f"[seed{s}/track] cached" in log  # the training (and its uniform tracking) did not run again
        assert f"[clustered-{runs['key']}/seed{s}/track] done" in log  # the tracking recomputed from the snapshots
        assert _fingerprint(out / "runs" / "reproduce-toy" / f"seed{s}" / "track" / "run") == runs["trained"][s]
        assert _fingerprint(out / "runs" / "reproduce-toy" / f"seed{s}" / "track" / "snapshots") == runs["snaps"][s]


def test_the_clustered_outputs_follow_the_files_bins(runs: dict) -> None:
    out = runs["out"]
    fig = out / "figures" / "clustered"
    claims = pd.read_csv(fig / "claims.csv")
    assert tuple(claims.columns) == CLAIM_COLUMNS and list(claims["claim"]) == CLAIMS
    assert (claims["n_models"] == 2).all()
    for name in ("fig2_transfer", "fig2_transfer_sgd"):  # the transfer matrix is K_file x K_file on the file's bins
        t = pd.read_csv(fig / f"{name}.csv")
        t = t[t["source"] >= 0]  # (source -1: the "all bins" control)
        assert len(t) == 25 and sorted(t["source"].unique()) == list(range(5))
        lows = t.drop_duplicates("target").sort_values("target")
        assert list(lows["target_t_low"]) == EDGES[:-1] and list(lows["target_t_high"]) == [e - 1 for e in EDGES[1:]]
    cache = out / "runs" / "reproduce-toy" / f"clustered-{runs['key']}"
    for s in (0, 1):
        track = load_track(cache / f"seed{s}" / "track" / "track")
        assert {G.shape for G in track.grams.values()} == {(5, 5)} and len(track.grams) == 4  # 2 steps x 2 batches
        assert len(np.load(cache / f"seed{s}" / "grams-own_eps_clustered_K5.npy")[0]) == 5
        assert pd.read_csv(cache / f"seed{s}" / "learned.csv")["t_lo"].tolist() == EDGES[:-1]
        assert set(pd.read_csv(cache / f"seed{s}" / "c2_online.csv")["bin"]) == set(range(5))
    assert (pd.read_csv(fig / "c1_models.csv")["K"] == 5).all()
    assert pd.read_csv(fig / "cosine_final.csv", index_col=0).shape == (5, 5)
    assert not (cache / "seed0" / "grams-log_snr_K4.npy").exists()  # C3's binning controls skipped, and said so
    report = (fig / "REPORT.md").read_text()
    assert str(EDGES) in report and "binning controls (log-SNR / other K) are skipped" in report
    # the uniform results are untouched: still K = 4
    assert pd.read_csv(out / "figures" / "fig2_transfer.csv").query("source >= 0")["source"].nunique() == 4


def test_tracking_from_snapshots_reproduces_the_tracking_of_the_training(runs: dict, tmp_path: Path) -> None:
    """Under the uniform K = 4 edges the recomputed Grams equal, bit for bit, those the training's own tracking
    stored: the snapshots are the models that were tracked."""
    config = dataclasses.replace(preset("toy"), bins_edges=(0, 250, 500, 750, 1000)).clustered()
    seed_dir = runs["out"] / "runs" / "reproduce-toy" / "seed1"
    _track_snapshots(config, 1, seed_dir / "track", tmp_path, progress=False, log=lambda _: None)
    again = load_track(tmp_path / "track" / "track").grams
    tracked = load_track(seed_dir / "track" / "track").grams
    assert sorted(again) == sorted(tracked) == [(3, 0), (3, 1), (6, 0), (6, 1)]
    for key in tracked:
        np.testing.assert_array_equal(again[key], tracked[key])


def test_an_interrupted_tracking_of_retrained_models_starts_again(runs: dict, tmp_path: Path) -> None:
    """Partial clustered tracking (no stamp: interrupted) whose snapshots were replaced since (the models trained
    again) is removed and recomputed from the new snapshots; before, the rerun was refused in a dead end."""
    import shutil

    config = dataclasses.replace(preset("toy"), bins_edges=(0, 250, 500, 750, 1000)).clustered()
    seeds = runs["out"] / "runs" / "reproduce-toy"
    _track_snapshots(config, 0, seeds / "seed0" / "track", tmp_path, progress=False, log=lambda _: None)
    (tmp_path / "track.done.json").unlink()  # as if interrupted before the stage finished
    retrained = tmp_path / "retrained"
    shutil.copytree(seeds / "seed1" / "track" / "snapshots", retrained / "snapshots")  # other models, same steps
    lines: list[str] = []
    _track_snapshots(config, 0, retrained, tmp_path, progress=False, log=lines.append)
    assert any("snapshots changed since the interrupted tracking" in line for line in lines), lines
    again = load_track(tmp_path / "track" / "track").grams
    expected = load_track(seeds / "seed1" / "track" / "track").grams  # seed 1's models, tracked by its training
    assert sorted(again) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(again[key], expected[key])


def test_the_comparison_agrees_with_both_claims_files(runs: dict) -> None:
    fig = runs["out"] / "figures"
    table = pd.read_csv(fig / "clustered_vs_uniform.csv")
    assert list(table.columns) == ["claim", "binning", "verdict", "statistic", "stderr", "n_models"]
    for binning, path in (("uniform", fig / "claims.csv"), ("clustered", fig / "clustered" / "claims.csv")):
        claims = pd.read_csv(path).set_index("claim")
        mine = table[table["binning"] == binning].set_index("claim")
        for claim in CLAIMS:
            assert mine.loc[claim, "verdict"] == claims.loc[claim, "verdict"]
            assert mine.loc[claim, "statistic"] == pytest.approx(claims.loc[claim, "statistic"], rel=1e-12)
            assert mine.loc[claim, "stderr"] == pytest.approx(claims.loc[claim, "stderr"], rel=1e-12)
            assert mine.loc[claim, "n_models"] == claims.loc[claim, "n_models"]
        assert set(mine.loc["C3 ranking", "verdict"].split(" < ")) == {"constant", "snr", "max_snr_1", "min_snr_5"}
    # C1 near under the clustered bins, from the per-model transfer CSVs: mean over models of the |i - j| = 1 cells
    near = []
    for s in (0, 1):
        t = pd.read_csv(runs["out"] / "runs" / "reproduce-toy" / f"clustered-{runs['key']}" / f"seed{s}" /
                        "transfer-adamw.csv")
        M = t[t["source"] >= 0].pivot_table(index="source", columns="target", values="transfer", aggfunc="mean").to_numpy()
        i, j = np.indices(M.shape)
        near.append(M[np.abs(i - j) == 1].mean())
    row = table[(table["binning"] == "clustered") & (table["claim"] == "C1 near")].iloc[0]
    assert row["statistic"] == pytest.approx(np.mean(near), rel=1e-9)
    assert row["stderr"] == pytest.approx(np.std(near, ddof=1) / np.sqrt(2), rel=1e-9)


def _section(report: str) -> str:
    assert report.count(BEGIN) == 1 and report.count(END) == 1
    return report[report.index(BEGIN):report.index(END)]


def test_the_report_section_is_replaced_and_survives_the_uniform_rerun(runs: dict) -> None:
    fig = runs["out"] / "figures"
    section = _section((fig / "REPORT.md").read_text())
    assert str(EDGES) in section and "| C1 far transfer |" in section and "| C3 ranking at the lam rule |" in section
    write_clustered_comparison(fig, EDGES)  # what a rerun of the bins-file command does last
    assert _section((fig / "REPORT.md").read_text()) == section
    assert pd.read_csv(fig / "clustered" / "bins.csv")["t_low"].tolist() == EDGES[:-1]  # the edges it used
    # a stale section (as if the uniform analysis had changed since) is rebuilt by the uniform command, not kept
    text = (fig / "REPORT.md").read_text()
    (fig / "REPORT.md").write_text(text.replace(section, section.replace("| C1 far transfer |", "| STALE |")))
    (fig / "clustered_vs_uniform.csv").write_text("stale\n")
    code, log = _run("--out", str(runs["out"]))  # the uniform command again: everything cached, the section rebuilt
    assert code == 0
    stages = re.findall(r"^\[(seed\d/[^\]]+)\] (\w+)", log, flags=re.M)
    assert len(stages) == 14 and all(state == "cached" for _, state in stages), stages
    report = (fig / "REPORT.md").read_text()
    assert _section(report) == section and report.count("<!-- compare:begin -->") == 1 and "STALE" not in report
    assert "claim" in pd.read_csv(fig / "clustered_vs_uniform.csv").columns
    assert "Preset `toy`" in report  # the uniform report itself was rewritten around the kept sections


def test_without_uniform_claims_the_section_says_so(runs: dict, tmp_path: Path) -> None:
    (tmp_path / "clustered").mkdir()
    for name in ("claims.csv", "c1_models.csv", "c3_lam_path.csv"):
        (tmp_path / "clustered" / name).write_bytes((runs["out"] / "figures" / "clustered" / name).read_bytes())
    frame = write_clustered_comparison(tmp_path, EDGES)
    assert set(frame["binning"]) == {"clustered"}
    assert "There is no uniform `claims.csv`" in _section((tmp_path / "REPORT.md").read_text())


def test_a_bins_file_of_another_schedule_is_refused(tmp_path: Path, capsys) -> None:
    bins = tmp_path / "bins.csv"
    bins.write_text("bin,t_low,t_high\n0,0,99\n1,100,299\n2,300,499\n")
    assert main(["reproduce", "--toy", "--out", str(tmp_path / "o"), "--bins-file", str(bins)]) == 2
    err = capsys.readouterr().err
    assert "gradconflict reproduce: error:" in err and "covers T = 500" in err and "T = 1000" in err
    assert not (tmp_path / "o" / "runs").exists()  # refused before anything ran
    with pytest.raises(ValueError, match="K >= 3"):
        dataclasses.replace(preset("toy"), bins_edges=(0, 500, 1000))
    with pytest.raises(ValueError, match="T = 1000"):
        dataclasses.replace(preset("toy"), bins_edges=(0, 10, 20, 999))
