"""Training runs as tracking sources: kept checkpoints (``keep_checkpoints``) equal the weights of shorter runs,
survive a resume, and ``gradconflict track --model RUN`` tracks them all at their steps."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gradconflict.cli import main as cli_main
from gradconflict.train import TrainConfig, run_checkpoints, train
from gradconflict.train.checkpoint import weights_metadata

# a very small DiT on 8x8 synthetic images: a fraction of a second per step
SMALL = dict(data="synthetic", data_limit=32, model="dit-tiny", model_overrides={"hidden_size": 16, "depth": 1},
             image_size=8, batch_size=4, warmup_steps=2, log_every=1, checkpoint_every=2, bins=2, T=100)
TRACK = ["--data", "synthetic", "--image-size", "8", "--bins", "2", "--per-task", "1", "--resamples", "1",
         "--ugd-steps", "20", "--strategies", "constant", "min_snr:5"]


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_kept_checkpoints_equal_shorter_runs_and_survive_a_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**SMALL, steps=3, keep_checkpoints=True), run, progress=False)
    train(TrainConfig(**SMALL, steps=5, keep_checkpoints=True), run, progress=False)  # resume to 5
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step2.safetensors", "step4.safetensors"]
    for step in (2, 4):  # independent reference: a run trained to exactly that step
        ref = tmp_path / f"ref{step}"
        train(TrainConfig(**SMALL, steps=step), ref, progress=False)
        path = run / "checkpoints" / f"step{step}.safetensors"
        assert _same(path, ref / "model.safetensors")
        assert json.loads(weights_metadata(path)["step"]) == step
        assert any(k.startswith("ema.") for k in load_file(str(path)))
    assert not (tmp_path / "ref2" / "checkpoints").exists()  # off by default
    assert [(s, p.name) for s, p in run_checkpoints(run)] == [
        (2, "step2.safetensors"), (4, "step4.safetensors"), (5, "model.safetensors")]


def test_an_interrupted_save_gets_its_kept_copy_on_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(TrainConfig(**SMALL, steps=4, keep_checkpoints=True), run, progress=False)
    (run / "checkpoints" / "step4.safetensors").unlink()  # as if interrupted after model.safetensors
    train(TrainConfig(**SMALL, steps=4, keep_checkpoints=True), run, progress=False)
    assert _same(run / "checkpoints" / "step4.safetensors", run / "model.safetensors")


def test_cli_train_keep_checkpoints_then_track_the_run(tmp_path: Path, capsys) -> None:
    run, out = tmp_path / "run", tmp_path / "track"
    code = cli_main(["train", "--data", "synthetic", "--data-limit", "32", "--model", "dit-tiny", "--model-overrides",
                     '{"hidden_size": 16, "depth": 1}', "--image-size", "8", "--batch-size", "4", "--T", "100",
                     "--bins", "2", "--steps", "5", "--checkpoint-every", "2", "--keep-checkpoints", "--quiet",
                     "--out", str(run)])
    assert code == 0
    assert cli_main(["track", "--model", str(run), *TRACK, "--out", str(out)]) == 0
    assert "at steps [2, 4, 5]" in capsys.readouterr().err
    obj = pd.read_csv(out / "track_objectives.csv")
    assert sorted(obj["step"].unique()) == [2, 4, 5]


def test_track_without_checkpoints_needs_a_run(tmp_path: Path, capsys) -> None:
    assert cli_main(["track", "--model", "dit-tiny", *TRACK, "--out", str(tmp_path / "t")]) == 2
    assert "--checkpoints is missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        run_checkpoints(tmp_path)
