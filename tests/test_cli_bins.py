"""`gradconflict bins` end to end on a tiny user model, checked against loop-reference Grams and brute force."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import gradconflict as gc
from gradconflict.cli import main

from test_cli_gram import _write_spec


def _best_cuts(G: np.ndarray, K: int) -> tuple[int, ...]:
    """The contiguous K-partition maximising sum_k (1 / |I_k|) * (sum of the cosines within I_k), by enumeration."""
    d = np.sqrt(np.diag(G))
    C = G / d[:, None] / d[None, :]
    M = len(G)
    score = {}
    for inner in itertools.combinations(range(1, M), K - 1):
        cuts = (0, *inner, M)
        score[cuts] = sum(C[a:b, a:b].sum() / (b - a) for a, b in zip(cuts[:-1], cuts[1:]))
    return max(score, key=score.get)


def test_bins_cli_clusters_the_mean_fine_gram(tmp_path: Path, capsys) -> None:
    spec = _write_spec(tmp_path)
    out = tmp_path / "out"
    code = main(["bins", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", "--fine", "10",
                 "--bins", "3", "--batches", "2", "--per-task", "2", "--seed", "3", "--out", str(out)])
    assert code == 0
    for name in ["bins.csv", "fine_cosine.png", "fine_cosine.csv", "boundary_stability.csv", "bins_config.json"]:
        assert (out / name).stat().st_size > 0
    # reference: the loop Gram of each batch (seeds 3 and 4), averaged, clustered by enumeration
    from gradconflict.data import load_dataset
    from gradconflict.engine import sample_task_batch
    from gradconflict.spec import load_model

    loaded = load_model(f"{spec}:build")
    fine = gc.TimestepBins.uniform(1000, 10)
    data = load_dataset("synthetic", image_size=8)
    grams = []
    for seed in (3, 4):
        b = sample_task_batch(data.images, fine, 2, seed)
        grams.append(gc.task_gram(loaded.model, b.x0, b.t, fine, schedule=gc.NoiseSchedule.cosine(), prediction="v",
                                  noise=b.noise, method="loop").gram.double().numpy())
    G = np.mean(grams, axis=0)
    edges = fine.edges[list(_best_cuts(G, 3))]
    frame = pd.read_csv(out / "bins.csv")
    assert list(frame.columns) == ["bin", "t_low", "t_high", "width", "label"]
    np.testing.assert_array_equal(frame["t_low"], edges[:-1])
    np.testing.assert_array_equal(frame["t_high"], edges[1:] - 1)
    np.testing.assert_array_equal(gc.TimestepBins.from_csv(out / "bins.csv", T=1000).edges, edges)
    d = np.sqrt(np.diag(G))
    cosine = pd.read_csv(out / "fine_cosine.csv", index_col=0).to_numpy()
    np.testing.assert_allclose(cosine, G / d[:, None] / d[None, :], rtol=1e-4, atol=1e-5)
    stab = pd.read_csv(out / "boundary_stability.csv")
    per_batch = np.array([fine.edges[list(_best_cuts(g, 3))][1:-1] for g in grams])
    np.testing.assert_array_equal(stab["t_boundary"], edges[1:-1])
    np.testing.assert_allclose(stab["mean"], per_batch.mean(0))
    np.testing.assert_allclose(stab["share_moved"], (per_batch != edges[1:-1]).mean(0))
    np.testing.assert_allclose(stab["mean_abs_shift"], np.abs(per_batch - edges[1:-1]).mean(0))
    assert json.loads((out / "bins_config.json").read_text())["edges"] == edges.tolist()
    assert "edges:" in capsys.readouterr().out


@pytest.mark.parametrize("flags, match", [
    (["--fine", "10", "--bins", "11"], "--bins 11: the clustered bins must number between 1 and --fine 10"),
    (["--fine", "10", "--bins", "4", "--min-width", "3"], "--bins 4 x --min-width 3 must be at most --fine 10"),
    (["--fine", "2000"], "--fine 2000"),
])
def test_bins_cli_refuses_bad_sizes(tmp_path: Path, capsys, flags, match) -> None:
    spec = _write_spec(tmp_path)
    code = main(["bins", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", *flags,
                 "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"gradconflict bins: error: {match}" in capsys.readouterr().err


def _bins_file(path: Path, edges) -> Path:
    bins = gc.TimestepBins.from_edges(edges, 1000)
    bins.to_frame().rename(columns={"task": "bin"}).to_csv(path, index=False)
    return path


def test_gram_bins_file_uses_the_file_bins(tmp_path: Path, capsys) -> None:
    spec = _write_spec(tmp_path)
    path = _bins_file(tmp_path / "bins.csv", [0, 100, 600, 1000])
    out = tmp_path / "g"
    assert main(["gram", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", "--bins-file",
                 str(path), "--per-task", "2", "--seed", "5", "--out", str(out)]) == 0
    gram = pd.read_csv(out / "gram.csv", index_col=0)
    assert list(gram.columns) == ["0-99", "100-599", "600-999"]
    from gradconflict.data import load_dataset
    from gradconflict.engine import sample_task_batch
    from gradconflict.spec import load_model

    bins = gc.TimestepBins.from_edges([0, 100, 600, 1000], 1000)
    b = sample_task_batch(load_dataset("synthetic", image_size=8).images, bins, 2, 5)
    ref = gc.task_gram(load_model(f"{spec}:build").model, b.x0, b.t, bins, schedule=gc.NoiseSchedule.cosine(),
                       prediction="v", noise=b.noise, method="loop")
    np.testing.assert_allclose(gram.to_numpy(), ref.gram.numpy(), rtol=1e-4, atol=1e-12)
    assert json.loads((out / "gram_config.json").read_text())["bins"] == 3
    capsys.readouterr()
    short = tmp_path / "short.csv"
    pd.DataFrame({"bin": [0, 1], "t_low": [0, 100], "t_high": [99, 499]}).to_csv(short, index=False)
    for file, flags, match in [(path, ["--binning", "log_snr"], "--bins-file and --binning log_snr both choose"),
                               (path, ["--bins", "4"], "--bins 4 but --bins-file"),
                               (short, [], "the bins end at t = 499 but the model's schedule has T = 1000")]:
        assert main(["gram", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", "--bins-file",
                     str(file), *flags, "--out", str(tmp_path / "x")]) == 2
        assert match in capsys.readouterr().err


def test_track_bins_file_uses_the_file_bins(tmp_path: Path) -> None:
    import torch

    from gradconflict.spec import load_model
    from gradconflict.track import TrackConfig, make_bins

    cfg = TrackConfig(bins=3, edges=(0, 100, 600, 1000))
    np.testing.assert_array_equal(make_bins(gc.NoiseSchedule.cosine(), cfg).edges, [0, 100, 600, 1000])
    assert "edges" not in TrackConfig().to_dict()  # folders recorded without edges keep their identity
    with pytest.raises(ValueError, match="edges hold 3 bins but bins = 10"):
        TrackConfig(edges=(0, 100, 600, 1000))
    spec = _write_spec(tmp_path)
    ck = tmp_path / "w.pt"
    torch.save(load_model(f"{spec}:build").model.state_dict(), ck)
    path = _bins_file(tmp_path / "bins.csv", [0, 100, 600, 1000])
    out = tmp_path / "t"
    assert main(["track", "--model", f"{spec}:build", "--checkpoints", str(ck), "--data", "synthetic", "--image-size",
                 "8", "--bins-file", str(path), "--per-task", "2", "--resamples", "1", "--strategies", "constant",
                 "--ugd-steps", "20", "--out", str(out)]) == 0
    record = json.loads((out / "track_config.json").read_text())
    assert record["edges"] == [0, 100, 600, 1000] and record["bins"] == 3  # a rerun with other bins is refused
    grams = np.load(out / "track_grams.npz")
    assert all(grams[k].shape[-1] == 3 for k in grams.files if grams[k].ndim >= 2)
