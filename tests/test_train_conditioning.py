"""``gradconflict train`` with per-sample conditioning (issue #18): a user model gets the conditioning rows of
exactly the images of each batch by name (also in an online weighting's Gram batch), ``--null-conditioning``
gives zeros, the first step's loss equals a float64 recomputation, kill/resume is bit-exact, a saved
``UNet2DConditionModel`` trains through the CLI and is then tracked, and built-in models refuse text conditioning.
Tiny models, a 6-image data file, no network."""

from __future__ import annotations

import dataclasses
import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gradconflict.cli import main
from gradconflict.train import TrainConfig, train
from gradconflict.train import loop as loop_module

N, L, D, HW, T = 6, 3, 4, 8, 100
SPACING = 3.0  # image i is about SPACING * i everywhere: its row can be read back from x_t (see _which_image)

RECORDING_MODEL = '''
from types import SimpleNamespace

import torch
from torch import nn


class Net(nn.Module):
    """Records every (x_t, t, encoder_hidden_states, encoder_attention_mask) it is called with (when .record)."""

    def __init__(self, dim):
        super().__init__()
        self.config = SimpleNamespace(cross_attention_dim=dim)
        self.inp = nn.Conv2d(1, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.text = nn.Linear(dim, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)
        self.seen = []
        self.record = True

    def forward(self, x, t, encoder_hidden_states, encoder_attention_mask=None):
        if self.record:
            mask = None if encoder_attention_mask is None else encoder_attention_mask.detach().clone()
            self.seen.append((x.detach().clone(), t.detach().clone(), encoder_hidden_states.detach().clone(), mask))
        m = torch.ones(encoder_hidden_states.shape[:2], dtype=x.dtype) if encoder_attention_mask is None else encoder_attention_mask
        pooled = (encoder_hidden_states * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        h = self.inp(x) + self.time(t.to(x.dtype).view(-1, 1) / 100).view(-1, 8, 1, 1) + self.text(pooled).view(-1, 8, 1, 1)
        return self.out(torch.nn.functional.silu(h))


def build():
    return Net(4)
'''


def _spec(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "textnet.py").write_text(RECORDING_MODEL)
    return f"{folder / 'textnet.py'}:build"


def _data(path: Path, embeddings: bool = True) -> dict[str, np.ndarray]:
    """Images ``SPACING * i`` plus a small texture (floats kept as stored), embeddings (N, L, D), a float mask."""
    rng = np.random.default_rng(0)
    images = SPACING * np.arange(N, dtype=np.float32)[:, None, None, None] + 0.1 * rng.standard_normal((N, 1, HW, HW))
    arrays = {"images": images.astype(np.float32),
              "encoder_attention_mask": (np.arange(L)[None] < rng.integers(1, L + 1, (N, 1))).astype(np.float32)}
    if embeddings:
        arrays["encoder_hidden_states"] = rng.standard_normal((N, L, D)).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


def _abar() -> np.ndarray:
    """The linear schedule by hand: betas evenly spaced from 1e-4 to 0.02, alphabar = cumprod(1 - beta)."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T))


def _which_image(x_t: torch.Tensor, t: torch.Tensor) -> list[int]:
    """The data row of each noisy input: mean(x_t) / sqrt(abar_t) is SPACING * i give or take the mean noise
    (std <= 0.1 * sqrt((1 - abar) / abar) / 8 here, far below SPACING / 2)."""
    est = x_t.double().flatten(1).mean(1).numpy() / np.sqrt(_abar()[t.numpy()])
    rows = np.rint(est / SPACING).astype(int)
    assert np.all(np.abs(est - SPACING * rows) < 0.5 * SPACING) and np.all((rows >= 0) & (rows < N)), est
    return rows.tolist()


def _config(data: Path, spec: str, **kw) -> TrainConfig:
    base = dict(data=str(data), model=spec, image_size=HW, T=T, bins=2, batch_size=4, steps=3, lr=1e-3,
                warmup_steps=0, log_every=1, checkpoint_every=10, weighting="min_snr:5", cpu_threads=1, bf16=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def grab(monkeypatch):
    """The user model a run builds (``models[-1]``), with its initial weights (``initial[-1]``)."""
    models, initial = [], []
    original = loop_module.build_user_model

    def build(config, device):
        model = original(config, device)
        models.append(model)
        initial.append(copy.deepcopy(model))
        return model

    monkeypatch.setattr(loop_module, "build_user_model", build)
    return models, initial


def test_every_batch_passes_the_rows_of_its_images(tmp_path: Path, grab) -> None:
    arrays = _data(tmp_path / "cond.npz")
    train(_config(tmp_path / "cond.npz", _spec(tmp_path / "code")), tmp_path / "run", progress=False)
    seen = grab[0][-1].seen
    assert len(seen) == 3 and all(x.shape[0] == 4 for x, *_ in seen)
    drawn = []
    for x_t, t, emb, mask in seen:
        for row, e, m in zip(_which_image(x_t, t), emb, mask):
            np.testing.assert_array_equal(e.numpy(), arrays["encoder_hidden_states"][row])
            np.testing.assert_array_equal(m.numpy(), arrays["encoder_attention_mask"][row])
            drawn.append(row)
    assert sorted(drawn[:N]) == list(range(N))  # the first epoch: every image once, each with its own row


def test_null_conditioning_passes_zeros_and_keeps_the_mask_rows(tmp_path: Path, grab) -> None:
    arrays = _data(tmp_path / "plain.npz", embeddings=False)
    cfg = _config(tmp_path / "plain.npz", _spec(tmp_path / "code"), null_conditioning="zeros", null_length=L)
    train(cfg, tmp_path / "run", progress=False)
    for x_t, t, emb, mask in grab[0][-1].seen:
        assert emb.shape == (4, L, D) and not emb.any()  # L tokens to match the mask
        for row, m in zip(_which_image(x_t, t), mask):
            np.testing.assert_array_equal(m.numpy(), arrays["encoder_attention_mask"][row])
    used = json.loads((tmp_path / "run" / "config.json").read_text())["used"]
    assert used["conditioning"] == ["encoder_attention_mask", "encoder_hidden_states"]
    assert used["null_conditioning"] == "zeros" and used["null_length"] == L


def test_first_step_loss_equals_a_float64_recomputation(tmp_path: Path, grab, monkeypatch, capsys) -> None:
    """log.csv's step-1 loss = mean_i min(SNR_i, 5) / SNR_i * mean (f64(x_t, t, E[row_i], M[row_i]) - eps_i)^2
    with the drawn images, t and noise, the model's initial weights in float64 and the schedule by hand."""
    arrays = _data(tmp_path / "cond.npz")
    drawn = []
    original = loop_module.prediction_error

    def capture(model, x0, t, schedule, prediction, noise, y=None, **kw):
        drawn.append((x0.clone(), t.clone(), noise.clone()))
        return original(model, x0, t, schedule, prediction, noise, y, **kw)

    monkeypatch.setattr(loop_module, "prediction_error", capture)
    train(_config(tmp_path / "cond.npz", _spec(tmp_path / "code"), steps=1), tmp_path / "run", progress=False)
    x0, t, eps = (v.double() if v.is_floating_point() else v for v in drawn[0])
    rows = [int(np.flatnonzero((arrays["images"] == x.numpy()).all(axis=(1, 2, 3)))[0]) for x in drawn[0][0]]
    net = grab[1][-1].double()
    net.record = False
    a = torch.from_numpy(_abar()[t.numpy()]).view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        out = net(x_t, t, torch.from_numpy(arrays["encoder_hidden_states"][rows]).double(),
                  torch.from_numpy(arrays["encoder_attention_mask"][rows]).double())
    snr = (a / (1 - a)).flatten()
    want = float((torch.clamp(snr, max=5.0) / snr * (out - eps).pow(2).flatten(1).mean(1)).mean())
    got = float(pd.read_csv(tmp_path / "run" / "log.csv")["loss"].iloc[0])
    assert got == pytest.approx(want, rel=1e-5)
    # what the run says and records it used
    err = capsys.readouterr().err
    assert (f"train: schedule linear (T = {T}), eps prediction; data cond: {N} images of 1x{HW}x{HW}; conditioning "
            "encoder_attention_mask, encoder_hidden_states (rows of the data)") in err
    used = json.loads((tmp_path / "run" / "config.json").read_text())["used"]
    assert used["schedule"] == f"linear (T = {T})" and used["prediction"] == "eps" and used["null_conditioning"] is None
    assert used["conditioning"] == ["encoder_attention_mask", "encoder_hidden_states"]
    assert used["dataset"] == {"name": "cond", "path": str(tmp_path / "cond.npz"), "N": N, "shape": [1, HW, HW]}


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path: Path, interrupt_ema) -> None:
    _data(tmp_path / "cond.npz")
    full = _config(tmp_path / "cond.npz", _spec(tmp_path / "code"), steps=6, checkpoint_every=2, keep_checkpoints=True)
    train(full, tmp_path / "full", progress=False)
    interrupt_ema(5)
    with pytest.raises(KeyboardInterrupt):
        train(full, tmp_path / "int", progress=False)
    interrupt_ema(None)
    assert torch.load(tmp_path / "int" / "checkpoint.pt", weights_only=True)["step"] == 4
    train(full, tmp_path / "int", progress=False)
    for name in ("model.safetensors", "checkpoints/step2.safetensors", "checkpoints/step6.safetensors"):
        ref, got = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "int" / name))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    ref, got = pd.read_csv(tmp_path / "full" / "log.csv"), pd.read_csv(tmp_path / "int" / "log.csv")
    assert got["step"].tolist() == list(range(1, 7)) and np.array_equal(ref["loss"].to_numpy(), got["loss"].to_numpy())
    # other embeddings in the same file are other data: resuming on them is refused
    arrays = dict(np.load(tmp_path / "cond.npz"))
    np.savez(tmp_path / "cond.npz", **{**arrays, "encoder_hidden_states": arrays["encoder_hidden_states"] + 1})
    with pytest.raises(ValueError, match="trained on other data"):
        train(TrainConfig(**{**full.to_dict(), "steps": 8}), tmp_path / "int", progress=False)


def test_an_online_weighting_gets_the_conditioning_of_its_gram_batch(tmp_path: Path, grab, monkeypatch) -> None:
    from gradconflict.adaptive import online

    arrays = _data(tmp_path / "cond.npz")
    draws = []
    original = online._OnlineGram.draw

    def draw(self, x0, step, model_kwargs=None):
        got = original(self, x0, step, model_kwargs)
        draws.append(got)
        return got

    monkeypatch.setattr(online._OnlineGram, "draw", draw)
    monkeypatch.setattr(loop_module, "build_user_model", _no_recording(loop_module.build_user_model))
    log = train(_config(tmp_path / "cond.npz", _spec(tmp_path / "code"), weighting="pareto_online:2"),
                tmp_path / "run", progress=False)
    assert len(draws) == 2 and np.isfinite(log["loss"]).all()  # steps 0 and 2
    for xs, _, _, kwargs in draws:
        rows = [int(np.flatnonzero((arrays["images"] == x.numpy()).all(axis=(1, 2, 3)))[0]) for x in xs]
        np.testing.assert_array_equal(kwargs["encoder_hidden_states"].numpy(), arrays["encoder_hidden_states"][rows])
        np.testing.assert_array_equal(kwargs["encoder_attention_mask"].numpy(), arrays["encoder_attention_mask"][rows])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["weighting"]
    assert state["updates"] == 2 and not np.allclose(state["weights"].numpy(), 0.5)  # moved off uniform


def _no_recording(build):
    def wrapped(config, device):
        model = build(config, device)
        model.record = False  # the fused Gram calls it under torch.func transforms
        return model
    return wrapped


@pytest.mark.parametrize("extra", [[], ["--null-conditioning"]])
def test_builtin_models_refuse_text_conditioning(tmp_path: Path, capsys, extra: list[str]) -> None:
    _data(tmp_path / "cond.npz", embeddings=not extra)
    code = main(["train", "--model", "dit-tiny", "--data", str(tmp_path / "cond.npz"), "--image-size", str(HW),
                 "--steps", "1", "--T", str(T), "--bins", "2", "--quiet", *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "gradconflict train: error:" in err and not (tmp_path / "o").exists()
    assert "user model spec" in err and ("does not take" in err or "no cross-attention" in err)


try:
    import diffusers
except ImportError:  # the optional extra: gradconflict[diffusers]
    diffusers = None


@pytest.mark.skipif(diffusers is None, reason="needs diffusers (pip install gradconflict[diffusers])")
def test_a_saved_text_unet_trains_through_the_cli_and_is_tracked(tmp_path: Path, capsys, monkeypatch) -> None:
    torch.manual_seed(0)
    net = diffusers.UNet2DConditionModel(
        sample_size=HW, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=D, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    net.save_pretrained(tmp_path / "pipe" / "unet")
    diffusers.DDPMScheduler(num_train_timesteps=T, prediction_type="epsilon").save_pretrained(tmp_path / "pipe" / "scheduler")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "cond.npz", images=rng.standard_normal((N, 4, HW, HW)).astype(np.float32),
             encoder_hidden_states=rng.standard_normal((N, L, D)).astype(np.float32))
    run = tmp_path / "run"
    np.savez(tmp_path / "plain.npz", images=np.load(tmp_path / "cond.npz")["images"])
    assert main(["train", "--model", f"diffusers:{tmp_path / 'pipe'}", "--data", str(tmp_path / "plain.npz"),
                 "--image-size", str(HW), "--steps", "1", "--T", str(T), "--bins", "2", "--quiet", "--out", str(run)]) == 2
    assert "carries no encoder_hidden_states" in capsys.readouterr().err and not run.exists()
    assert main(["train", "--model", f"diffusers:{tmp_path / 'pipe'}", "--data", str(tmp_path / "cond.npz"),
                 "--image-size", str(HW), "--steps", "3", "--batch-size", "2", "--T", str(T), "--bins", "2",
                 "--warmup-steps", "0", "--checkpoint-every", "3", "--keep-checkpoints", "--quiet",
                 "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "conditioning encoder_hidden_states (rows of the data)" in err
    start = {f"model.{k}": v for k, v in net.state_dict().items()}
    raw = load_file(str(run / "model.safetensors"))
    assert not all(torch.equal(start[k], raw[k]) for k in start)  # trained
    assert main(["track", "--model", str(run), "--data", str(tmp_path / "cond.npz"), "--bins", "2", "--per-task",
                 "1", "--resamples", "1", "--ugd-steps", "2", "--strategies", "constant", "--out",
                 str(tmp_path / "track")]) == 0
    assert sorted(pd.read_csv(tmp_path / "track" / "track_objectives.csv")["step"].unique()) == [3]
    # sampling the trained text model: null (zero) embeddings unless given, with a note; given rows are used
    assert main(["sample", "--run", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert "unconditionally: encoder_hidden_states of zeros (2, 77, 4)" in capsys.readouterr().err
    assert (tmp_path / "grid.png").stat().st_size > 0
    from gradconflict.train import load_trained, sample

    model, schedule, prediction = load_trained(run)
    emb = torch.from_numpy(np.load(tmp_path / "cond.npz")["encoder_hidden_states"][:2])
    null = sample(model, schedule, prediction, 2, steps=2, model_kwargs={"encoder_hidden_states": torch.zeros(2, 77, D)})
    assert torch.equal(null, sample(model, schedule, prediction, 2, steps=2))  # the default is that null
    given = sample(model, schedule, prediction, 2, steps=2, model_kwargs={"encoder_hidden_states": emb})
    assert not torch.equal(null, given)
    # `sample --data`: sample i takes row i of the file's conditioning (the same samples as given above)
    import gradconflict.train as train_module

    drawn = []
    original = train_module.sample_grid_png
    monkeypatch.setattr(train_module, "sample_grid_png", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    capsys.readouterr()  # the notes of the Python calls above
    assert main(["sample", "--run", str(run), "--weights", "ema", "--n", "2", "--steps", "2", "--data",
                 str(tmp_path / "cond.npz"), "--out", str(tmp_path / "given.png")]) == 0
    err = capsys.readouterr().err
    assert "conditioning encoder_hidden_states: rows 0..1" in err and "unconditionally" not in err
    assert torch.equal(drawn[-1], given)
    record = json.loads((tmp_path / "given_config.json").read_text())
    assert record["conditioning"] == ["encoder_hidden_states"] and record["data"] == str(tmp_path / "cond.npz")
    # names the model does not take: one line, no traceback
    arrays = dict(np.load(tmp_path / "cond.npz"))
    np.savez(tmp_path / "other.npz", images=arrays["images"], pooled_text=arrays["encoder_hidden_states"][:, 0])
    assert main(["sample", "--run", str(run), "--n", "2", "--steps", "2", "--data", str(tmp_path / "other.npz"),
                 "--out", str(tmp_path / "other.png")]) == 2
    err = capsys.readouterr().err
    assert "pooled_text" in err and "Traceback" not in err
    assert main(["sample", "--run", str(run), "--n", "7", "--steps", "2", "--data", str(tmp_path / "cond.npz"),
                 "--out", str(tmp_path / "many.png")]) == 2
    assert f"has conditioning for {N} samples but --n 7" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--n", "2", "--steps", "2", "--data", str(tmp_path / "plain.npz"),
                 "--out", str(tmp_path / "plain.png")]) == 2
    assert "holds no per-sample conditioning" in capsys.readouterr().err
    # a run trained with --null-conditioning FILE is sampled with the null embedding it was trained with
    null_run, null_file = tmp_path / "null-run", tmp_path / "null.npy"
    null_emb = np.random.default_rng(2).standard_normal((3, D)).astype(np.float32)
    np.save(null_file, null_emb)
    assert main(["train", "--model", f"diffusers:{tmp_path / 'pipe'}", "--data", str(tmp_path / "plain.npz"),
                 "--null-conditioning", str(null_file), "--image-size", str(HW), "--steps", "1",
                 "--batch-size", "2", "--T", str(T), "--bins", "2", "--warmup-steps", "0", "--quiet",
                 "--out", str(null_run)]) == 0
    capsys.readouterr()
    assert main(["sample", "--run", str(null_run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "null.png")]) == 0
    err = capsys.readouterr().err
    assert f"the null conditioning {null_file} the run was trained with" in err and "unconditionally" not in err
    null_model, null_schedule, null_prediction = load_trained(null_run)
    trained_with = sample(null_model, null_schedule, null_prediction, 2, steps=2,
                          model_kwargs={"encoder_hidden_states": torch.from_numpy(null_emb).expand(2, 3, D)})
    assert torch.equal(drawn[-1], trained_with)
    assert not torch.equal(trained_with, sample(null_model, null_schedule, null_prediction, 2, steps=2))  # zeros


# A train_config.json written by `reproduce --standard` before the conditioning fields existed (verbatim).
_RECORDED_BEFORE_CONDITIONING = {
    "T": 1000, "batch_size": 64, "betas": [0.9, 0.999], "bf16": True, "bins": 10, "conditional": False,
    "data": "mnist", "data_limit": 4000, "ema_decay": 0.999, "grad_clip": 1.0, "image_size": 16, "lr": 0.001,
    "model": "unet-tiny", "model_overrides": {}, "prediction": "eps", "scale": "auto", "schedule": "linear",
    "seed": 0, "warmup_steps": 100, "weight_decay": 0.0, "weighting": "snr"}


def test_runs_recorded_before_the_conditioning_fields_still_match(tmp_path: Path) -> None:
    """The new fields at their defaults leave a run's identity as it was recorded (no retraining of cached runs);
    set, they enter it (a run with null conditioning is another run)."""
    from gradconflict._io import identity_changes

    path = tmp_path / "train_config.json"
    path.write_text(json.dumps(_RECORDED_BEFORE_CONDITIONING))
    config = TrainConfig(data="mnist", model="unet-tiny", weighting="snr", steps=3000, batch_size=64, lr=1e-3,
                         warmup_steps=100, image_size=16, data_limit=4000)
    assert identity_changes(path, config.identity()) == []
    spec = str(tmp_path / "m.py") + ":build"
    changed = dataclasses.replace(config, model=spec, null_conditioning="zeros")
    assert "null_conditioning" in identity_changes(path, changed.identity())


def test_null_length_counts_only_for_zero_embeddings(tmp_path: Path) -> None:
    """--null-length sets the length of zero embeddings; without them it changes nothing, so it is no other run."""
    spec = str(tmp_path / "m.py") + ":build"
    base = TrainConfig(data="mnist", model=spec)
    assert TrainConfig(data="mnist", model=spec, null_length=10).identity() == base.identity()
    zeros = TrainConfig(data="mnist", model=spec, null_conditioning="zeros")
    assert TrainConfig(data="mnist", model=spec, null_conditioning="zeros", null_length=10).identity() != zeros.identity()
