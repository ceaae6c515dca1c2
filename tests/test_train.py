"""Training: the loss against a hand computation, learning on MNIST, bit-exact resume, refusal of a
foreign run, reloading in a fresh process, samplers against analytic denoisers, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gradconflict.cli import main as cli_main
from gradconflict.schedule import NoiseSchedule
from gradconflict.train import (
    TrainConfig, ddim_sample, ddpm_sample, diffusion_loss, load_trained, sample_grid_png, train,
)
from gradconflict.train import loop as loop_module
from gradconflict.weighting import by_name

# a very small DiT so that runs take a fraction of a second per step
SMALL = dict(data="synthetic", data_limit=64, model="dit-tiny", model_overrides={"hidden_size": 32, "depth": 1},
             image_size=8, batch_size=8, warmup_steps=3, log_every=2, checkpoint_every=4, bins=4)


def linear_alphabar(T: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


class Affine(nn.Module):
    """f(x_t, t) = a * x_t + b * t / T: a fixed, hand-computable 'model'."""

    def forward(self, x, t, y=None):
        return 0.7 * x + 0.3 * (t.float() / 1000).view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_diffusion_loss_by_hand(prediction):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(5, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 300, 700, 999])
    loss, per = diffusion_loss(Affine(), x0, t, NoiseSchedule.linear(), prediction, by_name("min_snr:5"), noise)
    ab = linear_alphabar()[t.numpy()]
    a, s, snr = np.sqrt(ab), np.sqrt(1 - ab), ab / (1 - ab)
    X, E = x0.double().numpy(), noise.double().numpy()
    xt = a[:, None, None, None] * X + s[:, None, None, None] * E
    out = 0.7 * xt + 0.3 * (t.numpy() / 1000)[:, None, None, None]
    tgt = {"eps": E, "x0": X, "v": a[:, None, None, None] * E - s[:, None, None, None] * X}[prediction]
    w = {"eps": np.minimum(snr, 5) / snr, "x0": np.minimum(snr, 5), "v": np.minimum(snr, 5) / (snr + 1)}[prediction]
    expected = w * ((out - tgt) ** 2).reshape(5, -1).mean(axis=1)
    assert np.allclose(per.detach().numpy(), expected, rtol=1e-5)
    assert math.isclose(float(loss), expected.mean(), rel_tol=1e-5)


def eval_batch(n=128, image_size=16):
    from gradconflict.data import load_dataset

    ds = load_dataset("mnist", image_size=image_size)
    g = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(ds), generator=g)[:n]
    return ds.images[idx], torch.randint(0, 1000, (n,), generator=g), torch.randn(n, 1, image_size, image_size, generator=g)


def eval_loss(model, batch):
    with torch.no_grad():
        loss, _ = diffusion_loss(model, *batch[:2], NoiseSchedule.linear(), "eps", by_name("constant"), batch[2])
    return float(loss)


def test_training_lowers_loss_on_mnist(tmp_path):
    cfg = TrainConfig(data="mnist", data_limit=1000, model="dit-tiny", steps=80, batch_size=32, lr=1e-3,
                      warmup_steps=10, weighting="min_snr:5", log_every=10, checkpoint_every=1000)
    log = train(cfg, tmp_path, progress=False)
    assert list(log["step"]) == list(range(1, 81)) and np.isfinite(log["loss"]).all()
    assert log["loss"].tail(10).mean() < 0.5 * log["loss"].head(10).mean()
    batch = eval_batch()
    before = eval_loss(loop_module._build(cfg, torch.device("cpu"))[1], batch)  # the seeded initial model
    model, schedule, prediction = load_trained(tmp_path, ema=False)
    after = eval_loss(model, batch)
    assert after < 0.7 * before, (before, after)
    bins = pd.read_csv(tmp_path / "losses.csv")
    assert set(bins.columns) >= {"step", "bin", "loss", "count"}
    last = bins[bins["step"] == 80]
    assert len(last) == 11 and last.loc[last["bin"] == -1, "count"].item() == 10 * 32
    assert last.loc[last["bin"] >= 0, "count"].sum() == 10 * 32


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_resume_is_bit_exact(tmp_path, interrupt_ema):
    full = TrainConfig(**SMALL, steps=12)
    train(full, tmp_path / "full", progress=False)
    # extend: 6 steps, then the same run to 12 steps
    train(TrainConfig(**SMALL, steps=6), tmp_path / "ext", progress=False)
    train(full, tmp_path / "ext", progress=False)
    # interrupt after 7 optimiser steps (last checkpoint at step 4), then resume
    interrupt_ema(7)
    with pytest.raises(KeyboardInterrupt):
        train(full, tmp_path / "int", progress=False)
    interrupt_ema(None)
    assert torch.load(tmp_path / "int" / "checkpoint.pt", weights_only=True)["step"] == 4
    train(full, tmp_path / "int", progress=False)
    ref = tensors(tmp_path / "full")
    assert any(k.startswith("ema.") for k in ref)
    for run in ("ext", "int"):
        other = tensors(tmp_path / run)
        assert ref.keys() == other.keys()
        assert all(torch.equal(ref[k], other[k]) for k in ref), run
        log_ref, log_run = pd.read_csv(tmp_path / "full" / "log.csv"), pd.read_csv(tmp_path / run / "log.csv")
        assert log_run["step"].tolist() == list(range(1, 13))
        assert np.array_equal(log_ref["loss"].to_numpy(), log_run["loss"].to_numpy())
    ck = [torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("full", "int")]
    assert all(torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in zip(ck[0]["optimizer"]["state"].values(), ck[1]["optimizer"]["state"].values()))


def test_refuses_a_different_run(tmp_path):
    train(TrainConfig(**SMALL, steps=2), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="lr"):
        train(TrainConfig(**SMALL, steps=4, lr=1e-3), tmp_path, progress=False)
    with pytest.raises(ValueError, match="weighting"):
        train(TrainConfig(**{**SMALL, "log_every": 1}, steps=4, weighting="snr"), tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # cadence and steps may change
    log = train(TrainConfig(**{**SMALL, "log_every": 1, "checkpoint_every": 1}, steps=3), tmp_path, progress=False)
    assert log["step"].tolist() == [1, 2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 3


def test_checkpoint_loads_in_fresh_process(tmp_path):
    train(TrainConfig(**SMALL, steps=5, prediction="v", schedule="cosine"), tmp_path / "run", progress=False)
    g = torch.Generator().manual_seed(5)
    batch = {"x0": torch.rand(16, 1, 8, 8, generator=g) * 2 - 1, "t": torch.randint(0, 1000, (16,), generator=g),
             "noise": torch.randn(16, 1, 8, 8, generator=g)}
    torch.save(batch, tmp_path / "batch.pt")
    model, schedule, prediction = load_trained(tmp_path / "run")
    assert prediction == "v" and schedule.name == "cosine"
    with torch.no_grad():
        here = float(diffusion_loss(model, batch["x0"], batch["t"], schedule, prediction, by_name("min_snr:5"), batch["noise"])[0])
    script = (
        "import sys, torch\n"
        "from gradconflict.train import load_trained, diffusion_loss\n"
        "from gradconflict.weighting import by_name\n"
        "b = torch.load(sys.argv[2])\n"
        "for src in (sys.argv[1] + '/model.safetensors', sys.argv[1] + '/checkpoint.pt'):\n"
        "    m, s, p = load_trained(src)\n"
        "    with torch.no_grad():\n"
        "        print(repr(float(diffusion_loss(m, b['x0'], b['t'], s, p, by_name('min_snr:5'), b['noise'])[0])))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(tmp_path / "batch.pt")],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    values = [float(v) for v in out.stdout.split()]
    assert len(values) == 2 and all(math.isclose(v, here, rel_tol=1e-6) for v in values), (values, here)
    raw, _, _ = load_trained(tmp_path / "run" / "checkpoint.pt", ema=False)
    assert not all(torch.equal(a, b) for a, b in zip(raw.parameters(), model.parameters()))


class GaussianOracle(nn.Module):
    """Exact denoiser for data x0 ~ N(mu, tau^2 I): E[x0 | x_t] = mu + a tau^2 / (a^2 tau^2 + s^2) (x_t - a mu)."""

    def __init__(self, schedule: NoiseSchedule, prediction: str, mu: float, tau: float):
        super().__init__()
        self.schedule, self.prediction, self.mu, self.tau = schedule, prediction, mu, tau
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        a = self.schedule.alpha(t).float().view(-1, 1, 1, 1)
        s = self.schedule.sigma(t).float().view(-1, 1, 1, 1)
        x0 = self.mu + a * self.tau**2 / (a**2 * self.tau**2 + s**2) * (x - a * self.mu)
        eps = (x - a * x0) / s
        return {"x0": x0, "eps": eps, "v": a * eps - s * x0}[self.prediction]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_samplers_reproduce_a_gaussian(prediction):
    """With the exact denoiser of N(mu, tau^2) data, every sampler must return samples of N(mu, tau^2)
    (8000 values: standard error of the mean ~0.006; small step counts would shrink the spread)."""
    schedule = NoiseSchedule.linear()
    mu, tau = 0.3, 0.5
    oracle = GaussianOracle(schedule, prediction, mu, tau)
    shape = (2000, 1, 2, 2)
    for run in (
        lambda g: ddim_sample(oracle, schedule, prediction, shape, steps=250, generator=g, clip=False),
        lambda g: ddim_sample(oracle, schedule, prediction, shape, steps=250, eta=1.0, generator=g, clip=False),
        lambda g: ddpm_sample(oracle, schedule, prediction, shape, generator=g, clip=False),
    ):
        x = run(torch.Generator().manual_seed(0))
        assert x.shape == shape and torch.isfinite(x).all()
        assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - tau) < 0.015


def test_ddpm_equals_ddim_eta_one():
    schedule = NoiseSchedule.cosine()
    oracle = GaussianOracle(schedule, "eps", 0.0, 0.5)
    a = ddpm_sample(oracle, schedule, "eps", (4, 1, 3, 3), steps=30, generator=torch.Generator().manual_seed(2))
    b = ddim_sample(oracle, schedule, "eps", (4, 1, 3, 3), steps=30, eta=1.0, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(a, b, atol=1e-5)


def test_sample_grid_png_with_a_real_model(tmp_path):
    from gradconflict.models import build_model

    model = build_model("unet-tiny", num_classes=4, image_size=8, channel_mult=(1, 2), attention_resolutions=(4,))
    for p in model.parameters():
        nn.init.normal_(p, std=0.02) if p.ndim > 1 else None
    out = sample_grid_png(model, NoiseSchedule.linear(), "v", tmp_path / "g.png", n=6, steps=4, seed=1)
    assert out.shape == (6, 1, 8, 8) and torch.isfinite(out).all() and out.abs().max() <= 1
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_and_sample(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--help"])
    assert info.value.code == 0 and "--weighting" in capsys.readouterr().out
    run = tmp_path / "run"
    args = ["train", "--data", "synthetic", "--data-limit", "32", "--model", "dit-tiny", "--weighting", "min_snr",
            "--steps", "3", "--seed", "1", "--batch-size", "4", "--image-size", "8", "--out", str(run), "--quiet",
            "--model-overrides", '{"hidden_size": 32, "depth": 1}']
    assert cli_main(args) == 0
    assert {"model.safetensors", "checkpoint.pt", "losses.csv", "config.json", "log.csv"} <= {p.name for p in run.iterdir()}
    assert cli_main(["sample", "--run", str(run), "--out", str(tmp_path / "grid.png"), "--n", "4", "--steps", "3"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert cli_main(args + ["--lr", "0.1"]) == 2  # a different run in the same directory is refused
    assert "different config" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="sigmoid")
    with pytest.raises(ValueError, match="weighting"):
        TrainConfig(weighting="max_entropy")
    with pytest.raises(ValueError, match="prediction"):
        TrainConfig(prediction="score")
    cfg = TrainConfig(prediction="epsilon")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---- crash safety, validation, refusals and Ctrl-C --------------------------------------------------------

CRASH = dict(SMALL, steps=10, cpu_threads=1)  # saves at steps 4, 8 and (final) 10


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    train(TrainConfig(**CRASH), out, progress=False)
    return out


# (writer in loop.py, its call that raises): write_csv runs twice per save (log.csv, then losses.csv)
@pytest.mark.parametrize("writer, call", [
    ("save_checkpoint", 2), ("write_csv", 3), ("write_csv", 4), ("save_weights", 2),  # inside the save of step 8
    ("write_csv", 5), ("save_weights", 3),  # inside the final save (step 10)
])
def test_interrupted_save_resumes_with_complete_logs(tmp_path, monkeypatch, uninterrupted, writer, call):
    original = getattr(loop_module, writer)
    calls = {"n": 0}

    def crash(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(loop_module, writer, crash)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**CRASH), tmp_path, progress=False)
    monkeypatch.setattr(loop_module, writer, original)
    log = train(TrainConfig(**CRASH), tmp_path, progress=False)
    assert log["step"].tolist() == list(range(1, 11))
    ref_log, run_log = pd.read_csv(uninterrupted / "log.csv"), pd.read_csv(tmp_path / "log.csv")
    drop = ["seconds"]  # wall-clock time is the only column that may differ
    pd.testing.assert_frame_equal(ref_log.drop(columns=drop), run_log.drop(columns=drop))
    assert run_log["seconds"].is_monotonic_increasing
    pd.testing.assert_frame_equal(pd.read_csv(uninterrupted / "losses.csv"), pd.read_csv(tmp_path / "losses.csv"))
    ref, mine = tensors(uninterrupted), tensors(tmp_path)
    assert ref.keys() == mine.keys() and all(torch.equal(ref[k], mine[k]) for k in ref)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["step"]) == 10


@pytest.mark.parametrize("field, value, message", [
    ("lr", float("inf"), "lr must be a finite number > 0"),
    ("lr", float("nan"), "lr must be a finite number > 0"),
    ("lr", 0.0, "lr must be a finite number > 0"),
    ("grad_clip", float("nan"), "grad_clip must be a finite number > 0"),
    ("grad_clip", float("inf"), "grad_clip must be a finite number > 0"),
    ("grad_clip", -1.0, "grad_clip must be a finite number > 0"),
    ("steps", 0, "steps must be a positive integer"),
    ("weight_decay", float("nan"), "weight_decay must be a finite number"),
])
def test_config_rejects_bad_optimiser_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


def test_grad_clip_off_spellings_are_one_run():
    assert TrainConfig(grad_clip=None) == TrainConfig(grad_clip=0) == TrainConfig(grad_clip=0.0)
    assert TrainConfig(grad_clip=None).grad_clip == 0.0 and TrainConfig(grad_clip=2).grad_clip == 2.0


CLI_RUN = ["train", "--data", "synthetic", "--data-limit", "32", "--model", "dit-tiny", "--batch-size", "4",
           "--image-size", "8", "--quiet", "--threads", "1", "--model-overrides", '{"hidden_size": 32, "depth": 1}']


@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "lr must be a finite"), (["--grad-clip", "nan"], "grad_clip must be a finite"),
    (["--steps", "0"], "steps must be a positive integer"),
])
def test_cli_bad_values_fail_without_creating_out(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert cli_main(CLI_RUN + ["--out", str(out), "--steps", "2"] + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_failed_setup_leaves_no_out_dir(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(**{**SMALL, "data": str(tmp_path / "missing.npy")}, steps=2), out, progress=False)
    assert not out.exists()


def test_summary_reports_non_finite_losses():
    from gradconflict.cli.train import _summary

    log = pd.DataFrame({"step": [1, 2, 3, 4], "loss": [1.0, 2.0, float("nan"), 4.0]})
    line = _summary(log, log_every=2)
    assert "loss nan" in line and "DIVERGED" in line and "first at step 3" in line and "1 of 4" in line
    finite = _summary(log.iloc[:2], log_every=2)
    assert finite.startswith("step 2: loss 1.5000") and "DIVERGED" not in finite


def test_cli_reports_a_diverged_run(tmp_path, capsys):
    assert cli_main(CLI_RUN + ["--out", str(tmp_path / "run"), "--steps", "3", "--lr", "1e30", "--grad-clip", "0",
                               "--warmup-steps", "0"]) == 0
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    assert not np.isfinite(log["loss"]).all()  # the premise: this learning rate does diverge
    assert "DIVERGED" in capsys.readouterr().out


def test_refuses_fewer_steps_than_the_checkpoint(tmp_path):
    train(TrainConfig(**SMALL, steps=6), tmp_path, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="already trained to step 6.*steps=3"):
        train(TrainConfig(**SMALL, steps=3), tmp_path, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert train(TrainConfig(**SMALL, steps=6), tmp_path, progress=False)["step"].tolist() == list(range(1, 7))


def test_refuses_run_outputs_without_checkpoint(tmp_path):
    train(TrainConfig(**SMALL, steps=4), tmp_path / "run", progress=False)
    (tmp_path / "run" / "checkpoint.pt").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="no checkpoint.pt"):
        train(TrainConfig(**SMALL, steps=8), tmp_path / "run", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    # a folder with nothing of a run (here only the config.json written before the first step) trains
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "config.json").write_text(json.dumps(TrainConfig(**SMALL, steps=2).to_dict()))
    assert train(TrainConfig(**SMALL, steps=2), tmp_path / "fresh", progress=False)["step"].tolist() == [1, 2]


def test_cli_ctrl_c_prints_one_line_and_resumes(tmp_path, interrupt_ema, capsys):
    out = tmp_path / "run"
    args = CLI_RUN + ["--out", str(out), "--steps", "8", "--checkpoint-every", "4"]

    def cli(argv):
        try:
            return cli_main(argv)
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt escaped `gradconflict train`")

    interrupt_ema(2)  # before the first checkpoint
    assert cli(args) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "step 0" in err
    interrupt_ema(6)  # step 6 of 8, after the checkpoint of step 4
    assert cli(args) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "same command" in err and "step 4" in err
    interrupt_ema(None)
    assert cli(args) == 0
    assert pd.read_csv(out / "log.csv")["step"].tolist() == list(range(1, 9))


def test_resuming_on_data_rewritten_in_place_is_refused(tmp_path):
    """The data is recorded by content in the checkpoint: the same file name with other arrays is other data."""
    data = tmp_path / "imgs.npy"
    np.save(data, np.random.default_rng(0).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32))
    base = {**SMALL, "data": str(data)}
    train(TrainConfig(**base, steps=4), tmp_path / "run", progress=False)
    train(TrainConfig(**base, steps=6), tmp_path / "run", progress=False)  # the same data: resumes
    np.save(data, np.random.default_rng(1).uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32))
    with pytest.raises(ValueError, match="trained on other data"):
        train(TrainConfig(**base, steps=8), tmp_path / "run", progress=False)
