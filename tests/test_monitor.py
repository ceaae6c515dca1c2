"""``gradconflict.Monitor`` in a plain training loop (#18 point 4): it leaves training bit for bit as it was,
its Gram and Pareto weights match an independent float64 computation, it resumes without duplicates, logs to a
TensorBoard-like writer, and the README's example runs as written."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import cvxpy as cp
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import gradconflict as gc
from gradconflict.models import build_model

SCHEDULE = gc.NoiseSchedule.linear(T=100)


class Net(nn.Module):
    """A tiny DiT with dropout on its output: a monitor that left eval mode or used the global RNG would change
    the training run."""

    def __init__(self) -> None:
        super().__init__()
        self.dit = build_model("dit-tiny", hidden_size=16, depth=1, num_heads=2, image_size=8, in_channels=1,
                               patch_size=4)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.drop(self.dit(x, t, **kwargs))


def _images(n: int = 24) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _train(monitor_kwargs: dict | None, tmp_path: Path, steps: int = 6):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images = _images()
    monitor = gc.Monitor(model, schedule=SCHEDULE, **monitor_kwargs) if monitor_kwargs is not None else None
    model.train()
    for step in range(steps):
        x0 = images[torch.randint(0, len(images), (8,))]
        t = torch.randint(0, SCHEDULE.T, (8,))
        noise = torch.randn_like(x0)
        a, s = SCHEDULE.alpha(t).float()[:, None, None, None], SCHEDULE.sigma(t).float()[:, None, None, None]
        loss = ((model(a * x0 + s * noise, t) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if monitor is not None:  # between backward and the optimizer step: the grads must survive it
            monitor.step(step, x0)
        opt.step()
    return model, opt, monitor


def test_training_with_the_monitor_equals_training_without_it_bit_for_bit(tmp_path: Path) -> None:
    plain, plain_opt, _ = _train(None, tmp_path)
    watched, watched_opt, monitor = _train(dict(bins=4, every=2, per_task=2, out=tmp_path / "m"), tmp_path)
    assert monitor.steps == [0, 2, 4]  # it did record
    for (name, p), q in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), name
    for sa, sb in zip(plain_opt.state_dict()["state"].values(), watched_opt.state_dict()["state"].values()):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key
    assert watched.training and watched.drop.training
    assert all(p.requires_grad for p in watched.parameters())


def test_the_global_rng_grads_mode_and_flags_are_left_as_found() -> None:
    torch.manual_seed(0)
    model = Net()
    list(model.parameters())[-1].requires_grad_(False)  # a frozen layer stays frozen
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    model.drop.eval()  # a mixed mode, to be restored as it is
    first = next(p for p in model.parameters() if p.requires_grad)
    first.grad = torch.full_like(first, 3.0)
    state = torch.get_rng_state()
    monitor = gc.Monitor(model, schedule=SCHEDULE, bins=3, every=1, per_task=2, tensorboard=False)
    assert monitor.step(0, _images(5)) is not None
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.grad, torch.full_like(first, 3.0))
    assert all(p.grad is None for p in model.parameters() if p is not first)
    assert model.training and not model.drop.training
    assert [p.requires_grad for p in model.parameters()] == flags


def _cvxpy_simplex_qp(G: np.ndarray, lam: float) -> np.ndarray:
    K = G.shape[0]
    Q = (G + G.T) / 2 + lam * np.eye(K)
    w = cp.Variable(K)
    scale = float(np.max(np.diag(Q)))
    cp.Problem(cp.Minimize(cp.quad_form(w, cp.psd_wrap(Q / scale))), [w >= 0, cp.sum(w) == 1]).solve(
        solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return np.clip(w.value, 0, None) / np.clip(w.value, 0, None).sum()


def test_gram_weights_and_scores_match_an_independent_float64_computation() -> None:
    torch.manual_seed(0)
    model = Net()
    x0 = _images(7)  # fewer samples than K * per_task = 12: cycled
    monitor = gc.Monitor(model, schedule=SCHEDULE, bins=4, every=5, per_task=3, lam=0.1, strategies=("constant", "snr"))
    assert monitor.step(3, x0) is None  # not due
    row = monitor.step(5, x0)
    xs, t, noise, _ = monitor.draw(x0, 5)
    assert xs.shape[0] == 12 and torch.equal(torch.bincount(t // 25, minlength=4), torch.full((4,), 3))
    # the float64 autograd loop on a float64 copy of the model (eval mode: dropout off), one backward per bin
    ref = copy.deepcopy(model).double().eval()
    grads = []
    for k in range(4):
        sel = (t // 25) == k
        a, s = SCHEDULE.alpha(t[sel])[:, None, None, None], SCHEDULE.sigma(t[sel])[:, None, None, None]
        x_t = a * xs[sel].double() + s * noise[sel].double()
        x0_hat = (x_t - s * ref(x_t, t[sel])) / a  # eps prediction -> x0 units
        loss = ((x0_hat - xs[sel].double()) ** 2).flatten(1).mean(1).mean()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(ref.parameters()))]))
    J = torch.stack(grads).numpy()
    G_ref = J @ J.T
    G = monitor.grams[5]
    np.testing.assert_allclose(G, G_ref, rtol=2e-4, atol=1e-6 * np.abs(G_ref).max())
    lam_abs = 0.1 * np.trace(G) / 4
    w_ref = _cvxpy_simplex_qp(G, lam_abs)
    w = monitor.weights.query("step == 5").sort_values("bin")["weight"].to_numpy()
    np.testing.assert_allclose(w, w_ref, atol=1e-5)
    f_star = w_ref @ G @ w_ref + lam_abs * w_ref @ w_ref
    assert row["pareto_objective"] == pytest.approx(f_star, rel=1e-6)
    assert row["reg_share"] == pytest.approx(lam_abs * w_ref @ w_ref / f_star, rel=1e-5)
    w_const = np.full(4, 0.25)  # constant weighting on 4 equal bins
    score = monitor.scores.set_index("strategy").loc["constant"]
    assert score["objective"] == pytest.approx(w_const @ G @ w_const + lam_abs * 0.25, rel=1e-9)
    assert score["ratio"] == pytest.approx(score["objective"] / f_star, rel=1e-6)
    c = G_ref / np.sqrt(np.outer(np.diag(G_ref), np.diag(G_ref)))
    off = c[~np.eye(4, dtype=bool)]
    assert row["mean_cosine"] == pytest.approx(off.mean(), abs=1e-4)
    assert row["conflict_share"] == pytest.approx(np.mean(c[np.triu_indices(4, 1)] < 0))
    assert row["trace"] == pytest.approx(np.trace(G_ref), rel=2e-4)


def test_a_second_monitor_on_the_same_folder_resumes_without_duplicates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x0 = Net(), _images(8)
    kw = dict(schedule=SCHEDULE, bins=3, every=2, per_task=2, out=tmp_path, tensorboard=False)
    first = gc.Monitor(model, **kw)
    rows = [first.step(s, x0) for s in range(5)]
    assert [r is not None for r in rows] == [True, False, True, False, True]
    before = pd.read_csv(tmp_path / "monitor_metrics.csv")
    second = gc.Monitor(model, **kw)
    assert second.steps == [0, 2, 4]
    assert [second.step(s, x0) is not None for s in range(7)] == [False] * 6 + [True]
    metrics = pd.read_csv(tmp_path / "monitor_metrics.csv")
    assert list(metrics["step"]) == [0, 2, 4, 6]
    pd.testing.assert_frame_equal(metrics.iloc[:3].drop(columns="seconds"), before.drop(columns="seconds"))
    weights = pd.read_csv(tmp_path / "monitor_weights.csv")
    scores = pd.read_csv(tmp_path / "monitor_scores.csv")
    assert not weights.duplicated(["step", "bin"]).any() and len(weights) == 4 * 3
    assert not scores.duplicated(["step", "strategy"]).any() and len(scores) == 4 * 4
    with np.load(tmp_path / "monitor_grams.npz") as z:  # steps and bins as data, the older step{S} keys kept
        assert list(z["steps"]) == [0, 2, 4, 6] and list(z["labels"]) == ["0-32", "33-66", "67-99"]
        assert sorted(k for k in z.files if k.startswith("step") and k != "steps") == ["step0", "step2", "step4", "step6"]
    with pytest.raises(ValueError, match="monitor results of another config"):
        gc.Monitor(model, **{**kw, "lam": 0.5})


class Recorder:
    """A stand-in for ``torch.utils.tensorboard.SummaryWriter`` (tensorboard is an optional extra)."""

    def __init__(self) -> None:
        self.scalars: dict[str, list] = {}
        self.images: list = []

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.setdefault(tag, []).append((step, value))

    def add_image(self, tag, image, step, dataformats="CHW") -> None:
        self.images.append((tag, image, step, dataformats))


def test_tensorboard_gets_the_scalars_and_the_cosine_heatmap() -> None:
    torch.manual_seed(0)
    writer = Recorder()
    monitor = gc.Monitor(Net(), schedule=SCHEDULE, bins=3, every=1, per_task=2, tensorboard=writer)
    row = monitor.step(0, _images(6))
    assert writer.scalars["conflict/mean_cosine"] == [(0, row["mean_cosine"])]
    assert set(writer.scalars) >= {"strategy_ratio/min_snr_5", "conflict/conflict_share"}
    assert sum(t.startswith("pareto_weight/") for t in writer.scalars) == 3
    (tag, image, step, fmt), = writer.images
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and fmt == "HWC"
    with pytest.raises(ValueError, match="needs an out folder"):
        gc.Monitor(Net(), schedule=SCHEDULE, tensorboard=True)


def test_bad_arguments_get_a_clear_error() -> None:
    with pytest.raises(ValueError, match="every must be a whole number"):
        gc.Monitor(Net(), schedule=SCHEDULE, every=0)
    with pytest.raises(ValueError, match="bins must be"):
        gc.Monitor(Net(), schedule=SCHEDULE, bins=0)
    with pytest.raises(ValueError, match="x0 must be a floating tensor"):
        gc.Monitor(Net(), schedule=SCHEDULE, every=1).step(0, torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
