"""Two gloo processes under torchrun give the single-process Gram; a failing rank fails the run, no hang."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradconflict as gc

from zoo import UNetLike, seeded_problem

HERE = Path(__file__).parent


def _torchrun(out: Path, mode: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "scripts" / "dist_gram.py"), str(out), str(HERE), mode]
    env = {**__import__("os").environ, "GRADCONFLICT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    aborted = "terminate called without an active exception" in proc.stderr or "SIGABRT" in proc.stderr
    worker_error = "]: Traceback" in proc.stderr or 'dist_gram.py", line' in proc.stderr
    if proc.returncode != 0 and mode != "fail" and aborted and not worker_error:
        # a rank killed by a signal with no Python error (e.g. gloo aborting at start-up on a loaded machine):
        # one retry; a real failure fails again
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc


def _single() -> gc.TaskGradients:
    model, x0, t, task, noise = seeded_problem()
    return gc.task_gram(model, x0, t, task, K=4, schedule=gc.NoiseSchedule.linear(), noise=noise, sketch_dim=64)


@pytest.mark.parametrize("method", ["fused", "loop"])
def test_two_ranks_equal_one_process(tmp_path: Path, method: str) -> None:
    out = tmp_path / "res.pt"
    proc = _torchrun(out, method)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    ref = _single()
    assert float((got["gram"] - ref.gram).norm() / ref.gram.norm()) <= 1e-10
    torch.testing.assert_close(got["losses"], ref.losses, rtol=1e-12, atol=0)
    assert got["counts"].tolist() == [3, 3, 3, 3]
    torch.testing.assert_close(got["sketch"], ref.sketch, rtol=1e-9, atol=1e-12)


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path: Path) -> None:
    proc = _torchrun(tmp_path / "res.pt", "fail", timeout=200)
    assert proc.returncode != 0
    assert "rank 1 failed on purpose" in proc.stderr + proc.stdout
    assert not (tmp_path / "res.pt").exists()


def test_tracking_under_two_ranks_equals_one_process(tmp_path: Path) -> None:
    from gradconflict.track import TrackConfig, track_models

    out = tmp_path / "track.pt"
    proc = _torchrun(out, "track")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    torch.manual_seed(0)
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = track_models([(0, UNetLike().double())], images, gc.NoiseSchedule.linear(), "eps",
                       TrackConfig(bins=4, per_task=3, resamples=2, ugd_steps=50, fw_max_iter=50), progress=False)
    for key, G in ref.grams.items():
        assert float(abs(got["grams"][key] - G).max() / abs(G).max()) <= 1e-10
    import numpy as np

    obj = got["objectives"]
    auto = [o for o, n in zip(obj["objective"], obj["name"]) if n == "min_snr_5"]
    np.testing.assert_allclose(auto, ref.objectives[ref.objectives["name"] == "min_snr_5"]["objective"], rtol=1e-9)


def test_reproduce_toy_under_torchrun_equals_the_plain_run(tmp_path: Path) -> None:
    import os

    import pandas as pd

    from gradconflict.cli import main

    env = {**os.environ, "GRADCONFLICT_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gradconflict",
           "reproduce", "--toy", "--out", str(tmp_path / "dist"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["reproduce", "--toy", "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    dist = pd.read_csv(tmp_path / "dist" / "figures" / "claims.csv")
    plain = pd.read_csv(tmp_path / "plain" / "figures" / "claims.csv")
    assert list(dist["claim"]) == list(plain["claim"]) and list(dist["verdict"]) == list(plain["verdict"])
    for column in ["statistic", "stderr", "n_models"]:
        pd.testing.assert_series_equal(dist[column], plain[column], rtol=1e-6)


def test_a_long_wait_for_rank_0_outlasts_the_collective_timeout(tmp_path: Path) -> None:
    """Under torchrun the trainer runs on rank 0 alone while the others wait: that wait must not be bound by
    GRADCONFLICT_DIST_TIMEOUT (here 3 s against an 8 s wait)."""
    import os

    out = tmp_path / "wait.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "scripts" / "dist_gram.py"), str(out), str(HERE), "slow_wait"]
    env = {**os.environ, "GRADCONFLICT_DIST_TIMEOUT": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out)["ok"]


def test_resumed_tracking_agrees_on_done_steps_across_ranks(tmp_path: Path) -> None:
    """Rank 0's folder decides which steps are done: ranks that see another folder (no shared disk) must not
    compute a step rank 0 skips, or the all-reduces would mix two checkpoints."""
    from gradconflict.track import TrackConfig, track_models

    torch.manual_seed(0)
    models = [(0, UNetLike().double()), (5, UNetLike().double())]
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = TrackConfig(bins=4, per_task=3, resamples=2, ugd_steps=50, fw_max_iter=50)
    out = tmp_path / "res.pt"
    track_models(models[:1], images, gc.NoiseSchedule.linear(), "eps", cfg, out_dir=f"{out}_rank0", progress=False)
    ref = track_models(models, images, gc.NoiseSchedule.linear(), "eps", cfg, progress=False)
    proc = _torchrun(out, "track_resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=False)["grams"]
    for key in [(5, 0), (5, 1)]:
        assert float(abs(got[key] - ref.grams[key]).max() / abs(ref.grams[key]).max()) <= 1e-10


def test_timeout_variables_are_read_when_used_and_checked(monkeypatch) -> None:
    """A bad GRADCONFLICT_DIST_TIMEOUT / _WAIT crashed `import gradconflict` (read at import time) with a bare
    float() error, and 0 or a negative value reached torch; now they are read when a process group starts."""
    import os

    from gradconflict import distributed

    env = {**os.environ, "GRADCONFLICT_DIST_TIMEOUT": "10m", "GRADCONFLICT_DIST_WAIT": "abc"}
    run = subprocess.run([sys.executable, "-c", "import gradconflict"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    for bad in ("10m", "0", "-5", "nan", "inf"):
        monkeypatch.setenv("GRADCONFLICT_DIST_TIMEOUT", bad)
        with pytest.raises(ValueError, match=r"GRADCONFLICT_DIST_TIMEOUT=.* must be a positive number of seconds"):
            distributed._seconds("GRADCONFLICT_DIST_TIMEOUT", 600.0)
    monkeypatch.setenv("GRADCONFLICT_DIST_TIMEOUT", "15")
    assert distributed._seconds("GRADCONFLICT_DIST_TIMEOUT", 600.0) == 15.0
    monkeypatch.delenv("GRADCONFLICT_DIST_TIMEOUT")
    assert distributed._seconds("GRADCONFLICT_DIST_TIMEOUT", 600.0) == 600.0


def test_a_user_error_under_torchrun_names_each_rank(tmp_path: Path) -> None:
    import os

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "gradconflict",
           "gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "0", "--out", str(tmp_path / "g")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    for r in (0, 1):
        assert f"gradconflict gram (rank {r} of 2): error: K must be >= 1" in proc.stderr, proc.stderr[-1500:]
    assert not (tmp_path / "g").exists()


def test_a_numbered_gpu_under_torchrun_is_refused(monkeypatch) -> None:
    """`torchrun ... --device cuda:0` put every rank on GPU 0 while NCCL used cuda:LOCAL_RANK."""
    from gradconflict import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.local_device("cuda") == torch.device("cuda", 1)
    assert distributed.local_device("cuda:1") == torch.device("cuda", 1)  # its own GPU, named: fine
    assert distributed.local_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="would put every rank on GPU 0; pass --device cuda"):
        distributed.local_device("cuda:0")
