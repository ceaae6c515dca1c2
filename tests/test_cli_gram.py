"""`gradconflict gram` end to end on a user model spec (a file:function) and the synthetic dataset."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

import gradconflict as gc
from gradconflict.cli import main


def _write_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "mymodel.py"
    spec.write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        import gradconflict as gc

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.c1 = nn.Conv2d(1, 4, 3, padding=1)
                self.n = nn.GroupNorm(2, 4)
                self.t = nn.Embedding(1000, 4)
                self.c2 = nn.Conv2d(4, 1, 3, padding=1)

            def forward(self, x, t):
                return self.c2(torch.nn.functional.silu(self.n(self.c1(x)) + self.t(t)[:, :, None, None]))

        def build():
            return Net(), gc.NoiseSchedule.cosine(), "v"
    """))
    return spec


def test_gram_cli_writes_labelled_outputs_equal_to_the_api(tmp_path: Path, capsys) -> None:
    spec = _write_spec(tmp_path)
    out = tmp_path / "out"
    code = main(["gram", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", "--bins", "4",
                 "--per-task", "3", "--seed", "7", "--out", str(out)])
    assert code == 0
    for name in ["gram.csv", "cosine.csv", "losses.csv", "pairs.csv", "cosine.png"]:
        assert (out / name).stat().st_size > 0
    gram = pd.read_csv(out / "gram.csv", index_col=0)
    assert list(gram.columns) == ["0-249", "250-499", "500-749", "750-999"]
    assert "conflicting pairs" in capsys.readouterr().out
    # the same seed through the API with the loop reference gives the same Gram
    from gradconflict.data import load_dataset
    from gradconflict.engine import sample_task_batch
    from gradconflict.spec import load_model

    loaded = load_model(f"{spec}:build")
    bins = gc.TimestepBins.uniform(1000, 4)
    data = load_dataset("synthetic", image_size=8)
    b = sample_task_batch(data.images, bins, 3, 7)
    ref = gc.task_gram(loaded.model, b.x0, b.t, bins, schedule=gc.NoiseSchedule.cosine(), prediction="v",
                       noise=b.noise, method="loop")
    np.testing.assert_allclose(gram.to_numpy(), ref.gram.numpy(), rtol=1e-4, atol=1e-12)


def test_gram_cli_help_and_errors(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "gradconflict", "gram", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--per-task" in res.stdout
    code = main(["gram", "--model", "no-such-model", "--data", "synthetic", "--out", str(tmp_path)])
    assert code == 2


def test_builtin_model_without_checkpoint_is_the_same_in_every_run() -> None:
    """A built-in name is initialised under a fixed seed (so `gradconflict gram --model dit-tiny` is reproducible)
    without touching the caller's random stream."""
    import torch

    from gradconflict.spec import load_model

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_model("dit-tiny").model.state_dict()
    after = torch.rand(3)
    torch.manual_seed(7)
    b = load_model("dit-tiny").model.state_dict()
    assert torch.equal(before, after)  # the global generator is where it was
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gram_cli_autocast_and_gram_precision_flags(tmp_path: Path) -> None:
    """--autocast bf16 with --gram-precision bf16 runs the model under bf16 autocast and folds in bf16: close to
    the float32 run (about 1e-2 here: bf16 activations) but not equal to it (the flags take effect)."""
    spec = _write_spec(tmp_path)
    common = ["gram", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", "--bins", "4",
              "--per-task", "3", "--seed", "7"]
    assert main([*common, "--out", str(tmp_path / "fp32")]) == 0
    assert main([*common, "--autocast", "bf16", "--gram-precision", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    a = pd.read_csv(tmp_path / "fp32" / "gram.csv", index_col=0).to_numpy()
    b = pd.read_csv(tmp_path / "bf16" / "gram.csv", index_col=0).to_numpy()
    err = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 1e-6 < err < 5e-2


def test_gram_cli_task_chunks_give_the_same_gram(tmp_path: Path) -> None:
    spec = _write_spec(tmp_path)
    common = ["gram", "--model", f"{spec}:build", "--data", "synthetic", "--image-size", "8", "--bins", "4",
              "--per-task", "3", "--seed", "7"]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert main([*common, "--task-chunks", "4", "--out", str(tmp_path / "pairs")]) == 0
    a = pd.read_csv(tmp_path / "one" / "gram.csv", index_col=0).to_numpy()
    b = pd.read_csv(tmp_path / "pairs" / "gram.csv", index_col=0).to_numpy()
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)  # float32 model: the same samples, other batches
    assert main([*common, "--task-chunks", "9", "--out", str(tmp_path / "bad")]) != 0


def test_one_bin_prints_no_nan_summary(tmp_path, capsys):
    from gradconflict.cli import main

    assert main(["gram", "--model", "dit-tiny", "--data", "synthetic", "--bins", "1", "--per-task", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "one bin: no pairs to compare" in out and "cosine nan" not in out


def test_gram_saves_what_it_was_computed_from(tmp_path):
    import json

    import torch

    from gradconflict.cli import main
    from gradconflict.models import build_model

    ckpt = tmp_path / "w.pt"
    torch.save(build_model("dit-tiny").state_dict(), ckpt)
    args = ["gram", "--model", "dit-tiny", "--checkpoint", str(ckpt), "--data", "synthetic", "--bins", "3",
            "--per-task", "2", "--seed", "4", "--out", str(tmp_path / "g")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "g" / "gram_config.json").read_text())
    assert (saved["bins"], saved["per_task"], saved["seed"], saved["data"]) == (3, 2, 4, "synthetic")
    assert saved["checkpoint_content"].startswith("sha256:") and saved["image_size"] == 16
