"""#18 point 6: the documented Python API (``gc.load_model``, ``gc.load_data``, ``gc.plots``) and Gram archives
that carry their steps and bins as data (older archives still load)."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradconflict as gc
from gradconflict.data import load_dataset
from gradconflict.gram_archive import read_gram_archive, write_gram_archive
from gradconflict.spec import load_model as spec_load_model
from gradconflict.track import TrackConfig, load_track, track_models

from zoo import UNetLike

ROOT = Path(__file__).resolve().parents[1]
BINS = gc.TimestepBins.uniform(1000, 4)


def _gram(K: int = 4, seed: int = 0) -> np.ndarray:
    A = np.random.default_rng(seed).normal(size=(K, 12))
    return A @ A.T


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ load_model / load_data
def test_load_model_and_load_data_are_the_cli_loaders() -> None:
    for mine, theirs in ((gc.load_model, spec_load_model), (gc.load_data, load_dataset)):
        assert inspect.signature(mine).parameters.keys() == inspect.signature(theirs).parameters.keys()
        assert all(inspect.signature(mine).parameters[k].default == p.default
                   for k, p in inspect.signature(theirs).parameters.items())
        assert "Example" in mine.__doc__
    a, b = gc.load_model("dit-tiny"), spec_load_model("dit-tiny")
    assert (a.prediction, a.schedule.T, a.weights) == (b.prediction, b.schedule.T, b.weights)
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)  # the same seeded initial weights
    d, e = gc.load_data("synthetic", image_size=8, limit=6, seed=3), load_dataset("synthetic", image_size=8, limit=6, seed=3)
    assert d.images.shape == (6, e.images.shape[1], 8, 8) and torch.equal(d.images, e.images)
    with pytest.raises(ValueError, match="unknown model"):
        gc.load_model("no-such-model")


def test_import_gradconflict_stays_light() -> None:
    code = ("import sys, gradconflict as gc; assert 'matplotlib' not in sys.modules and 'gradconflict.spec' not in "
            "sys.modules; gc.load_model; gc.plots; assert 'matplotlib' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ------------------------------------------------------------------ plots
def test_cosine_heatmap_writes_the_cosine_of_the_gram(tmp_path: Path) -> None:
    G = _gram()
    n = np.sqrt(np.diag(G))
    want = G / np.outer(n, n)
    frame = gc.plots.cosine_heatmap(torch.tensor(G), BINS, tmp_path / "cos.png", title="mine")
    csv = pd.read_csv(tmp_path / "cos.csv", index_col=0)
    assert list(csv.columns) == BINS.labels and list(csv.index) == BINS.labels
    np.testing.assert_allclose(csv.to_numpy(), want, rtol=1e-12)
    np.testing.assert_allclose(frame.to_numpy(), want, rtol=1e-12)
    assert _is_png(tmp_path / "cos.png")
    gc.plots.cosine_heatmap(want, ["a", "b", "c", "d"], tmp_path / "again")  # a cosine is its own cosine
    np.testing.assert_allclose(pd.read_csv(tmp_path / "again.csv", index_col=0).to_numpy(), want, rtol=1e-12)
    with pytest.raises(ValueError, match="3 labels for 4 bins"):
        gc.plots.cosine_heatmap(G, ["a", "b", "c"], tmp_path / "bad.png")


def test_conflict_vs_distance_one_point_per_pair_and_gram(tmp_path: Path) -> None:
    grams = [_gram(seed=0), _gram(seed=1)]
    gc.plots.conflict_vs_distance(grams, BINS, gc.NoiseSchedule.linear(), tmp_path / "cd.png")
    csv = pd.read_csv(tmp_path / "cd.csv")
    assert len(csv) == 2 * 6 and _is_png(tmp_path / "cd.png")
    for row in csv.itertuples():
        G = grams[row.gram]
        assert row.cosine == pytest.approx(G[row.task_i, row.task_j] / np.sqrt(G[row.task_i, row.task_i] * G[row.task_j, row.task_j]))
        assert row.t_distance == 250 * (row.task_j - row.task_i)


def test_pareto_weights_csv_holds_the_weights_and_shares(tmp_path: Path) -> None:
    w = np.array([0.1, 0.2, 0.3, 0.4])
    gc.plots.pareto_weights(w, BINS, tmp_path / "w.png", strategies={"snr": [8.0, 4.0, 2.0, 2.0]})
    csv = pd.read_csv(tmp_path / "w.csv")
    assert list(csv.columns) == ["bin", "label", "name", "weight", "share"] and _is_png(tmp_path / "w.png")
    np.testing.assert_array_equal(csv[csv["name"] == "pareto_optimum"]["weight"], w)
    np.testing.assert_allclose(csv[csv["name"] == "snr"]["share"], [0.5, 0.25, 0.125, 0.125])
    assert list(csv["label"][:4]) == BINS.labels
    with pytest.raises(ValueError, match="non-negative"):
        gc.plots.pareto_weights([0.5, -0.5, 1.0, 0.0], BINS, tmp_path / "bad.png")


def test_transfer_matrix_csv_equals_the_matrix(tmp_path: Path) -> None:
    m = np.random.default_rng(2).normal(size=(4, 4)) * 0.1
    gc.plots.transfer_matrix(m, BINS, tmp_path / "t.png")
    csv = pd.read_csv(tmp_path / "t.csv", index_col=0)
    np.testing.assert_allclose(csv.to_numpy(), m, rtol=1e-12)
    assert list(csv.index) == BINS.labels and _is_png(tmp_path / "t.png")
    gc.plots.transfer_matrix(m[:3, :3], ["a", "b", "c"], tmp_path / "free")  # any labels: no distance panel
    assert _is_png(tmp_path / "free.png")


# ------------------------------------------------------------------ Gram archives
def test_gram_archive_round_trip_and_older_keyed_archives(tmp_path: Path) -> None:
    grams = {(5, 1): _gram(seed=1), (0, 0): _gram(seed=2), (5, 0): _gram(seed=3)}
    write_gram_archive(tmp_path / "new.npz", grams, BINS, resamples=True)
    with np.load(tmp_path / "new.npz") as z:  # plain arrays, no pickle, no key parsing needed
        assert list(z["steps"]) == [0, 5, 5] and list(z["resamples"]) == [0, 0, 1]
        assert list(z["labels"]) == BINS.labels and list(z["t_low"]) == [0, 250, 500, 750]
        assert list(z["t_high"]) == [249, 499, 749, 999]
        np.testing.assert_array_equal(z["grams"][2], grams[(5, 1)])
        np.testing.assert_array_equal(z["step5_r1"], grams[(5, 1)])
    np.savez(tmp_path / "old.npz", **{f"step{s}_r{r}": G for (s, r), G in grams.items()})
    for name in ("new.npz", "old.npz"):
        archive = read_gram_archive(tmp_path / name)
        assert list(archive.index.columns) == ["step", "resample"]
        assert sorted(archive.as_dict()) == sorted(grams)
        for key, G in archive.as_dict().items():
            np.testing.assert_array_equal(G, grams[key])
    assert read_gram_archive(tmp_path / "old.npz").labels is None
    np.savez(tmp_path / "mon.npz", step10=grams[(0, 0)], step2=grams[(5, 0)])  # a monitor's older archive
    assert list(read_gram_archive(tmp_path / "mon.npz").as_dict()) == [(2,), (10,)]


def test_track_writes_steps_and_bins_and_reads_an_older_archive(tmp_path: Path) -> None:
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrackConfig(bins=2, per_task=1, resamples=2, ugd_steps=5, fw_max_iter=20, solvers=("ugd",),
                      strategies=("constant",))
    torch.manual_seed(0)
    res = track_models([(3, UNetLike())], images, gc.NoiseSchedule.linear(), "eps", cfg, out_dir=tmp_path, progress=False)
    with np.load(tmp_path / "track_grams.npz") as z:
        assert list(z["steps"]) == [3, 3] and list(z["resamples"]) == [0, 1]
        assert list(z["labels"]) == ["0-499", "500-999"] and list(z["t_high"]) == [499, 999]
        np.testing.assert_array_equal(z["grams"][1], res.grams[(3, 1)])
        old = {k: z[k] for k in ("step3_r0", "step3_r1")}
    np.savez(tmp_path / "track_grams.npz", **old)  # as written before the arrays existed
    loaded = load_track(tmp_path)
    assert sorted(loaded.grams) == [(3, 0), (3, 1)]
    np.testing.assert_array_equal(loaded.grams[(3, 1)], res.grams[(3, 1)])


def test_the_readme_python_conflict_example_runs_as_written(tmp_path: Path) -> None:
    from test_readme import _run, _section_code

    code = _section_code("The conflict matrix in Python")
    assert "gc.load_model(" in code and "gc.plots.cosine_heatmap(" in code
    _run(code, tmp_path)
    cos = pd.read_csv(tmp_path / "runs" / "python" / "cosine.csv", index_col=0)
    assert cos.shape == (5, 5) and np.allclose(np.diag(cos.to_numpy()), 1.0)
    assert _is_png(tmp_path / "runs" / "python" / "cosine.png")
    assert (ROOT / "docs" / "formats.md").is_file() and "docs/formats.md" in (ROOT / "README.md").read_text()
