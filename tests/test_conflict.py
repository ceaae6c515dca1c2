"""Conflict metrics against values computed by hand from explicit gradient vectors."""

from __future__ import annotations

import numpy as np
import pytest

import gradconflict as gc
from gradconflict import conflict

G_VECS = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


def test_cosine_magnitude_and_ratios_from_vectors() -> None:
    G = G_VECS @ G_VECS.T
    c = conflict.cosine(G)
    assert c[0, 1] == pytest.approx(1 / np.sqrt(2))
    assert c[0, 2] == pytest.approx(-1.0)
    assert c[1, 2] == pytest.approx(-1 / np.sqrt(2))
    assert c[3, 0] == 0.0 and c[3, 3] == 0.0  # zero gradient: cosine defined as 0
    m = conflict.magnitude_similarity(G)
    assert m[0, 2] == pytest.approx(2 * 1 * 2 / (1 + 4))
    r = conflict.norm_ratios(G)
    assert r[2, 0] == pytest.approx(2.0) and r[0, 2] == pytest.approx(0.5)
    # pairs among the first three tasks: (0,1) +, (0,2) -, (1,2) -; with task 3: cosine 0 is not a conflict
    assert conflict.conflict_share(G[:3, :3]) == pytest.approx(2 / 3)
    assert conflict.conflict_share(G) == pytest.approx(2 / 6)


def test_pairwise_frame_distances() -> None:
    schedule = gc.NoiseSchedule.linear(T=100)
    bins = gc.TimestepBins.uniform(100, 4)
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 6))
    df = conflict.pairwise_frame(A @ A.T, bins, schedule)
    assert len(df) == 6
    row = df[(df.task_i == 0) & (df.task_j == 3)].iloc[0]
    assert row.t_distance == pytest.approx(75.0)
    lam = np.asarray(schedule.log_snr(np.arange(100)))
    # log-SNR decreases with t: a bin's centre is the midpoint of its first and last timestep's log-SNR
    assert row.log_snr_distance == pytest.approx(abs((lam[75] + lam[99]) / 2 - (lam[0] + lam[24]) / 2))
    snr_bins = gc.TimestepBins.log_snr_uniform(schedule, 4)
    gaps = conflict.pairwise_frame(A @ A.T, snr_bins, schedule).query("task_j == task_i + 1")["log_snr_distance"]
    step = np.abs(np.diff(lam)).max()  # bins end on whole timesteps: equal up to one timestep's log-SNR step
    assert gaps.max() - gaps.min() <= 2 * step
    cos = (A[0] @ A[3]) / np.linalg.norm(A[0]) / np.linalg.norm(A[3])
    assert row.cosine == pytest.approx(cos)
    assert row.label_i == "0-24"


def test_bad_gram() -> None:
    with pytest.raises(ValueError, match="square"):
        conflict.cosine(np.ones((2, 3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        conflict.cosine(np.array([[np.nan]]))
    with pytest.raises(ValueError, match="bins define"):
        conflict.pairwise_frame(np.eye(3), gc.TimestepBins.uniform(10, 2))


def test_summary_of_one_task_has_no_pair_statistics() -> None:
    s = conflict.summary(np.array([[2.0]]))
    assert s["K"] == 1 and np.isnan(s["mean_cosine"]) and np.isnan(s["min_cosine"])


def test_a_heatmap_of_many_bins_labels_every_nth_bin_on_both_axes(tmp_path) -> None:
    import matplotlib.pyplot as plt
    import pandas as pd

    from gradconflict.plots import MAX_TICK_LABELS, matrix_heatmap

    K = 200
    labels = [f"{5 * k}-{5 * k + 4}" for k in range(K)]
    frame = pd.DataFrame(np.eye(K), index=labels, columns=labels)
    seen = {}
    real = plt.Figure.savefig

    def spy(self, *args, **kwargs):  # read the tick labels off the figure being saved
        ax = self.axes[0]
        seen["x"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["y"] = [t.get_text() for t in ax.get_yticklabels()]
        return real(self, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        matrix_heatmap(frame, tmp_path / "h.png", title="t", xlabel="x", ylabel="y", colorbar="c")
    finally:
        plt.Figure.savefig = real
    assert seen["x"] == seen["y"] and 0 < len(seen["x"]) <= MAX_TICK_LABELS
    assert seen["x"][0] == "0-4" and seen["x"][1] == labels[int(np.ceil(K / MAX_TICK_LABELS))]
