"""``kill -9`` at a random point of ``train``, ``track``, ``transfer`` and ``gram``, then the same command again.

Each command runs once uninterrupted (in this process: the reference), once as a real process killed outright
after a seeded random delay (no Python clean-up runs: only what was atomically written survives), and then once more
into the killed run's folder. The README promises: ``train`` resumes from its last checkpoint bit-identically on
the CPU with complete logs; ``track`` skips the checkpoints already done; ``transfer`` keeps every finished seed;
``gram`` rewrites its folder. So the rerun's results equal the reference's (timings aside), no temporary file of the
killed writer is left, and while the killed process ran it alone held the ``--out`` lock (read from
``/proc/locks``, which a probe cannot disturb), and a second lock on that folder was refused.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradconflict._io import LOCK_NAME, TMP_MARK, folder_lock
from gradconflict.cli import main

pytestmark = pytest.mark.skipif(not Path("/proc/locks").is_file() or not hasattr(signal, "SIGKILL"),
                                reason="needs kill -9 and Linux's /proc/locks")

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train", "--data", "synthetic", "--data-limit", "32", "--model", "dit-tiny", "--batch-size", "4",
         "--image-size", "8", "--quiet", "--threads", "1", "--model-overrides", '{"hidden_size": 32, "depth": 1}',
         "--steps", "40", "--checkpoint-every", "10", "--log-every", "5"]
TIMINGS = ["seconds"]  # wall-clock columns: the only ones a rerun may change


def _flock_holders(lock: Path) -> list[int]:
    """PIDs holding a ``flock`` on the file ``lock`` (by inode, from /proc/locks)."""
    inode = lock.stat().st_ino
    pids = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields:  # a waiter's entry ("1: -> FLOCK ..."): nobody waits here, but skip it
            continue
        if fields[1] == "FLOCK" and int(fields[5].rsplit(":", 1)[1]) == inode:
            pids.append(int(fields[4]))
    return pids


def _run_killed(args: list[str], out: Path, rng: random.Random, marker: str, window: float) -> bool:
    """Start ``gradconflict ARGS --out OUT`` as a process; once it holds the lock on OUT (and a second lock there is
    refused) and has written OUT/MARKER (its first unit of work), ``kill -9`` it after ``uniform(0, window)``
    seconds. True when it was killed before it finished."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gradconflict", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the process holds its --out (the lock comes before any work)
            assert proc.poll() is None, f"{args[0]} ended before taking its lock: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"{args[0]} never took its lock"
            lock = out / LOCK_NAME
            try:
                if _flock_holders(lock) == [proc.pid]:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        with pytest.raises(ValueError, match="in use by another gradconflict process"):
            with folder_lock(out):  # a second writer is refused while the first holds --out
                pass
        while not (out / marker).exists() and proc.poll() is None:
            assert time.monotonic() < deadline, f"{args[0]} never wrote {marker}"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, window))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code == -signal.SIGKILL:
        assert _flock_holders(out / LOCK_NAME) == []  # the kernel dropped the dead writer's lock
        return True
    assert code == 0, proc.stderr.read().decode()
    return False


def _timed(args: list[str]) -> float:
    start = time.perf_counter()
    assert main(args) == 0
    return time.perf_counter() - start


def _same_csv(a: Path, b: Path, sort: list[str] | None = None) -> None:
    """The two CSV files hold the same table, bit for bit (wall-clock columns aside)."""
    x, y = (pd.read_csv(p).drop(columns=TIMINGS, errors="ignore") for p in (a, b))
    if sort:
        x, y = (f.sort_values(sort, kind="stable").reset_index(drop=True) for f in (x, y))
    pd.testing.assert_frame_equal(x, y, check_exact=True)


def _no_leftovers(out: Path) -> None:
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name], "the killed writer's temporary files remain"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The uninterrupted training run (the model of the other commands too) and its duration in seconds."""
    run = tmp_path_factory.mktemp("train") / "ref"
    threads = torch.get_num_threads()
    try:
        seconds = _timed([*TRAIN, "--out", str(run)])
    finally:
        torch.set_num_threads(threads)
    return run, seconds


def _kill_and_rerun(args: list[str], ref: Path, cut: Path, marker: str, fraction: float, seed: int,
                    seconds: float | None = None) -> bool:
    """The reference run of ``args`` into ``ref`` (unless it took ``seconds`` already), a run into ``cut`` killed
    ``uniform(0, fraction * seconds)`` after it wrote ``marker``, and the rerun into ``cut``; True when the kill
    landed before the killed run finished."""
    if seconds is None:
        seconds = _timed([*args, "--out", str(ref)])
    killed = _run_killed(args, cut, random.Random(seed), marker, window=fraction * seconds)
    assert main([*args, "--out", str(cut)]) == 0
    _no_leftovers(cut)
    return killed


def test_train_killed_resumes_bit_identically(trained, tmp_path: Path) -> None:
    ref, seconds = trained
    cut = tmp_path / "cut"
    assert _kill_and_rerun(TRAIN, ref, cut, "checkpoint.pt", 0.5, seed=1, seconds=seconds)
    for name in ("log.csv", "losses.csv"):
        _same_csv(ref / name, cut / name)  # complete logs: every step once, the same numbers
    a, b = (torch.load(p / "checkpoint.pt", map_location="cpu", weights_only=False) for p in (ref, cut))
    _same_tensors(a, b)
    from safetensors.torch import load_file

    _same_tensors(load_file(ref / "model.safetensors"), load_file(cut / "model.safetensors"))


def _same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors, arrays and numbers, equal bit for bit (wall-clock entries aside)."""
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for k in set(a) - set(TIMINGS):
            _same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


def test_track_killed_skips_what_it_finished_and_gives_the_same_results(trained, tmp_path: Path) -> None:
    run, _ = trained
    args = _track_args(run, steps=8, resamples=2)
    assert _kill_and_rerun(args, tmp_path / "ref", tmp_path / "cut", "track_objectives.csv", 0.05, seed=2)
    for name in ("track_objectives.csv", "track_weights.csv"):
        _same_csv(tmp_path / "ref" / name, tmp_path / "cut" / name)
    with np.load(tmp_path / "ref" / "track_grams.npz") as a, np.load(tmp_path / "cut" / "track_grams.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _track_args(run: Path, steps: int, resamples: int) -> list[str]:
    """Two checkpoints, each given for every other step (steps 10, 20, ...): the same model at several steps."""
    return ["track", "--model", str(run), "--checkpoints", *[str(run / "checkpoint.pt"), str(run / "model.safetensors")]
            * (steps // 2), "--steps", *[str(10 * k) for k in range(1, steps + 1)], "--data", "synthetic",
            "--image-size", "8", "--bins", "4", "--per-task", "2", "--resamples", str(resamples), "--ugd-steps", "50"]


def test_track_stopped_after_a_step_resumes_with_a_checkpoint_given_for_two_steps(trained, tmp_path: Path,
                                                                                   monkeypatch, capsys) -> None:
    """Found by the kill test: a folder holding step 10 of a checkpoint that the same command gives for step 30 too
    refused its own rerun ("now given as step 30"), a check meant for a rerun that forgot --steps (still refused)."""
    import gradconflict.track.run as run_mod

    run, _ = trained
    args = [*_track_args(run, steps=4, resamples=1), "--out", str(tmp_path / "out")]
    real = run_mod.write_csv

    def stop_after_the_first_step(frame, path, *a, **k):
        if Path(path).name == "track_objectives.csv" and Path(path).exists():
            raise KeyboardInterrupt  # Ctrl-C before the second step is committed
        return real(frame, path, *a, **k)

    monkeypatch.setattr(run_mod, "write_csv", stop_after_the_first_step)
    assert main(args) == 130
    monkeypatch.setattr(run_mod, "write_csv", real)
    assert pd.read_csv(tmp_path / "out" / "track_objectives.csv")["step"].unique().tolist() == [10]
    steps = args.index("--steps")
    forgot = args[:steps] + args[steps + 5:]  # the same command without --steps 10 20 30 40 (steps 0, 1, 2, 3)
    capsys.readouterr()
    assert main(forgot) == 2
    assert "now given as step 0; pass the same --steps as before" in capsys.readouterr().err
    assert main(args) == 0
    assert sorted(pd.read_csv(tmp_path / "out" / "track_objectives.csv")["step"].unique()) == [10, 20, 30, 40]


def test_transfer_killed_keeps_its_finished_seeds_and_gives_the_same_rows(trained, tmp_path: Path) -> None:
    run, _ = trained
    args = ["transfer", "--model", str(run), "--data", "synthetic", "--image-size", "8", "--data-limit", "32",
            "--bins", "3", "--steps", "2", "--lr", "1e-3", "--eval-samples", "4", "--seeds", "3", "--quiet"]
    assert _kill_and_rerun(args, tmp_path / "ref", tmp_path / "cut", "transfer_seeds.csv", 0.3, seed=3)
    _same_csv(tmp_path / "ref" / "transfer.csv", tmp_path / "cut" / "transfer.csv", sort=["seed", "source", "target"])
    for name in ("transfer_matrix.csv", "transfer_summary.csv"):
        _same_csv(tmp_path / "ref" / name, tmp_path / "cut" / name)


def test_gram_killed_rewrites_its_folder(trained, tmp_path: Path) -> None:
    run, _ = trained
    args = ["gram", "--model", str(run), "--data", "synthetic", "--image-size", "8", "--bins", "4", "--per-task", "3",
            "--seed", "7"]
    _kill_and_rerun(args, tmp_path / "ref", tmp_path / "cut", "gram.csv", 0.3, seed=4)
    for name in ("gram.csv", "cosine.csv", "losses.csv", "pairs.csv"):
        _same_csv(tmp_path / "ref" / name, tmp_path / "cut" / name)
