"""Adaptive weightings (#17): online Pareto / UGD weights against a float64 reference, the learned weighting's
closed-form optimum, the Pareto fit's recovery of a known function, the state guards of step(), specs, and
bit-exact resume of a training run with an adaptive weighting."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from gradconflict.adaptive import (
    FixedWeighting, ParetoOnline, UGDOnline, by_name, check_spec, learned_uncertainty, pareto_fit, pareto_online,
    relative_lam, ugd_online,
)
from gradconflict.bins import TimestepBins
from gradconflict.models import build_model
from gradconflict.schedule import NoiseSchedule
from gradconflict.track import absolute_lam
from gradconflict.train import TrainConfig, train
from gradconflict.weighting import by_name as fixed_by_name

SCHEDULE = NoiseSchedule.linear()
BINS3 = TimestepBins.uniform(1000, 3)


def tiny_model(seed: int = 0, prediction: str = "eps"):
    torch.manual_seed(seed)
    return build_model("dit-tiny", image_size=8, in_channels=1, hidden_size=32, depth=1, prediction=prediction)


def batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_gram(model, x0, t, noise, K: int, prediction: str) -> np.ndarray:
    """float64 copy of the model, one autograd backward per task of the x0-unit loss, G_kl = <g_k, g_l>."""
    m = copy.deepcopy(model).double().eval()
    ab = torch.from_numpy(SCHEDULE.alphas_cumprod.copy())[t]
    a, s = ab.sqrt().view(-1, 1, 1, 1), (1 - ab).sqrt().view(-1, 1, 1, 1)
    x0, noise = x0.double(), noise.double()
    task = torch.as_tensor(BINS3.task_of(t.numpy()))
    grads = []
    for k in range(K):
        sel = task == k
        xt = a[sel] * x0[sel] + s[sel] * noise[sel]
        out = m(xt, t[sel])
        x0_hat = {"eps": (xt - s[sel] * out) / a[sel], "x0": out, "v": a[sel] * xt - s[sel] * out}[prediction]
        loss = ((x0_hat - x0[sel]) ** 2).flatten(1).mean(1).mean()
        g = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad], allow_unused=True)
        grads.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).flatten()
                                for gi, p in zip(g, [p for p in m.parameters() if p.requires_grad])]))
    J = torch.stack(grads)
    return (J @ J.T).numpy()


def brute_force_simplex_qp(Q: np.ndarray) -> np.ndarray:
    """min w^T Q w on the simplex by enumerating supports S: Q_SS w_S = mu 1, sum w_S = 1, KKT checked."""
    K = Q.shape[0]
    best, best_f = None, np.inf
    for r in range(1, K + 1):
        for S in itertools.combinations(range(K), r):
            S = list(S)
            A = np.zeros((r + 1, r + 1))
            A[:r, :r], A[:r, r], A[r, :r] = 2 * Q[np.ix_(S, S)], -1.0, 1.0
            try:
                sol = np.linalg.solve(A, np.r_[np.zeros(r), 1.0])
            except np.linalg.LinAlgError:
                continue
            w = np.zeros(K)
            w[S] = sol[:r]
            if np.all(w >= -1e-12) and w @ Q @ w < best_f:
                best, best_f = np.maximum(w, 0) / np.maximum(w, 0).sum(), w @ Q @ w
    return best


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_pareto_online_weights_match_a_float64_reference(prediction):
    model, x0 = tiny_model(prediction=prediction), batch()
    strategy = pareto_online(BINS3, SCHEDULE, every=1, per_task=3, lam_rel=0.1, seed=7)
    strategy.step(model, x0, step=5)
    xs, t, noise, _ = strategy.draw(x0, 5)
    assert np.bincount(BINS3.task_of(t.numpy()), minlength=3).tolist() == [3, 3, 3]  # stratified
    G = reference_gram(model, xs, t, noise, 3, prediction)
    np.testing.assert_allclose(strategy.last_gram, G, rtol=2e-4, atol=1e-8 * np.abs(G).max())
    lam = 0.1 * np.trace(G) / 3
    w_ref = brute_force_simplex_qp(G + lam * np.eye(3))
    np.testing.assert_allclose(strategy.bin_weights(), w_ref, atol=2e-4)
    # x0-unit sample weight K * w_k, eps weight K * w_k / SNR
    tt = torch.tensor([0, 400, 999])
    w = strategy.loss_weights(tt, schedule=SCHEDULE, prediction="eps").numpy()
    np.testing.assert_allclose(w, 3 * w_ref[[0, 1, 2]] / SCHEDULE.snr(tt.numpy()), rtol=2e-4)


def test_uniform_online_weights_are_the_constant_strategy():
    strategy = pareto_online(BINS3, SCHEDULE)  # before any update: w = 1/K
    t = torch.arange(0, 1000, 37)
    for prediction in ("eps", "x0", "v"):
        expected = fixed_by_name("constant").weight(SCHEDULE.snr(t.numpy()), prediction)
        np.testing.assert_allclose(strategy.loss_weights(t, schedule=SCHEDULE, prediction=prediction).numpy(), expected)


def test_relative_lam_is_the_analysis_rule():
    G = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 9.0]])
    assert relative_lam(G, 0.3) == pytest.approx(absolute_lam(G, 0.3)) == pytest.approx(0.3 * 15 / 3)


def test_ugd_online_update_is_a_hand_written_softmax_gradient_step():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(3, 5))
    G = A @ A.T
    strategy = UGDOnline(BINS3, SCHEDULE, ugd_steps=1, lr=0.7, lam_rel=0.2)
    beta = np.zeros(3)
    for _ in range(3):  # warm-started: each update continues from the previous beta
        got = strategy.update(G)
        Q = (G + 0.2 * np.trace(G) / 3 * np.eye(3))
        Q = Q / np.max(np.diag(Q))
        w = np.exp(beta) / np.exp(beta).sum()
        jac = np.diag(w) - np.outer(w, w)  # d softmax / d beta
        beta = beta - 0.7 * jac @ (2 * Q @ w)  # d(w^T Q w)/d beta
        np.testing.assert_allclose(got, np.exp(beta) / np.exp(beta).sum(), rtol=1e-12)
    # on a model: the update uses the Gram of the drawn batch
    model, x0 = tiny_model(), batch()
    online = ugd_online(BINS3, SCHEDULE, every=1, ugd_steps=2, lr=1.0)
    online.step(model, x0, step=0)
    check = UGDOnline(BINS3, SCHEDULE, ugd_steps=2, lr=1.0)
    np.testing.assert_allclose(online.bin_weights(), check.update(online.last_gram), rtol=1e-12)


def test_step_leaves_grads_mode_and_rng_untouched():
    model, x0 = tiny_model(), batch()
    model.train()
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    for strategy in (pareto_online(BINS3, SCHEDULE, every=1), ugd_online(BINS3, SCHEDULE)):
        strategy.step(model, x0, step=0)
        assert model.training and all(m.training for m in model.modules())
        assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
        assert all(p.grad is None for p in params[1:])
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    off = pareto_online(BINS3, SCHEDULE, every=10)
    off.step(model, x0, step=3)  # not an update step
    assert off.updates == 0 and off.last_gram is None


def test_learned_uncertainty_reaches_the_closed_form_optimum():
    strategy = learned_uncertainty(hidden=32)
    t = torch.tensor([10, 250, 600, 950])
    err = torch.tensor([0.05, 0.3, 1.2, 4.0])
    u0 = strategy.log_variance(t, SCHEDULE).detach()
    assert torch.equal(u0, torch.zeros(4))  # starts as the plain eps loss
    loss = strategy.loss(err, t, schedule=SCHEDULE, prediction="eps")
    assert float(loss.detach()) == pytest.approx(float(err.mean()))
    opt = torch.optim.Adam(strategy.parameters(), lr=2e-2)
    for _ in range(600):
        opt.zero_grad()
        strategy.loss(err, t, schedule=SCHEDULE, prediction="eps").backward()
        opt.step()
    u = strategy.log_variance(t, SCHEDULE).detach().double()
    np.testing.assert_allclose(u.numpy(), np.log(err.double().numpy()), atol=2e-2)  # d/du (e e^-u + u) = 0
    # the effective weight is base * exp(-u); base = eps-loss weight: 1 (eps), SNR (x0)
    snr = SCHEDULE.snr(t.numpy())
    np.testing.assert_allclose(strategy.loss_weights(t, schedule=SCHEDULE, prediction="x0").numpy(),
                               snr * np.exp(-u.numpy()), rtol=1e-6)


def test_pareto_fit_recovers_a_known_function_from_its_bin_weights(tmp_path):
    lam = SCHEDULE.log_snr(np.arange(1000))
    w_true = np.exp(0.4 - 0.05 * (lam - 2.0) ** 2)  # log-quadratic in log-SNR: degree 2 holds it exactly
    bins = TimestepBins.uniform(1000, 8)
    W = np.array([w_true[lo:hi].sum() for lo, hi in zip(bins.lows, bins.highs)])
    W = W / W.sum()
    fitted = pareto_fit(W, bins, SCHEDULE, degree=2)
    got = fitted.weight(SCHEDULE.snr(np.arange(1000)), "x0")
    np.testing.assert_allclose(got, w_true / w_true.mean(), rtol=1e-6)  # normalized: mean over t = 1
    # from a track-style CSV, through the spec parser (other solvers' rows and several steps are handled)
    rows = [dict(step=s, name=n, kind="solver", bin=k, label=lab, weight=W[k] if n == "auto" else 1 / 8)
            for s in (0, 10) for n in ("auto", "ugd") for k, lab in enumerate(bins.labels)]
    pd.DataFrame(rows).to_csv(tmp_path / "track_weights.csv", index=False)
    strategy = by_name(f"pareto_fit:{tmp_path / 'track_weights.csv'}", schedule=SCHEDULE)
    t = torch.tensor([0, 500, 999])
    expected = (w_true / w_true.mean())[t.numpy()] / SCHEDULE.snr(t.numpy())
    np.testing.assert_allclose(strategy.loss_weights(t, schedule=SCHEDULE, prediction="eps").numpy(), expected,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="degree"):
        pareto_fit(W, bins, SCHEDULE, degree=8)


def test_specs():
    assert isinstance(by_name("min_snr:5"), FixedWeighting)
    t = torch.tensor([0, 999])
    np.testing.assert_array_equal(by_name("min_snr:5").loss_weights(t, schedule=SCHEDULE, prediction="v").numpy(),
                                  fixed_by_name("min_snr:5").weight(SCHEDULE.snr(t), "v").numpy())
    online = by_name("pareto_online:4", bins=BINS3, schedule=SCHEDULE)
    assert isinstance(online, ParetoOnline) and online.every == 4 and online.spec == "pareto_online:4"
    assert by_name("ugd_online", bins=BINS3, schedule=SCHEDULE).every == 1
    assert by_name("learned_uncertainty").parameters()
    for bad, message in (("pareto_online:0", "positive integer"), ("nope", "unknown weighting"),
                         ("pareto_fit:/no/such.csv", "existing CSV")):
        with pytest.raises(ValueError, match=message):
            check_spec(bad)
    with pytest.raises(ValueError, match="bins="):
        by_name("pareto_online")
    with pytest.raises(ValueError, match="positive integer"):
        TrainConfig(weighting="ugd_online:x")


SMALL = dict(data="synthetic", data_limit=64, model="dit-tiny", model_overrides={"hidden_size": 32, "depth": 1},
             image_size=8, batch_size=8, warmup_steps=3, log_every=2, checkpoint_every=4, bins=3)


def tensors(run):
    return load_file(str(run / "model.safetensors"))


@pytest.mark.parametrize("weighting", ["pareto_online:3", "learned_uncertainty"])
def test_trainer_resumes_bit_exactly_with_an_adaptive_weighting(tmp_path, weighting):
    full = TrainConfig(**SMALL, weighting=weighting, steps=8)
    train(full, tmp_path / "full", progress=False)
    train(TrainConfig(**SMALL, weighting=weighting, steps=5), tmp_path / "ext", progress=False)
    train(full, tmp_path / "ext", progress=False)
    ref, other = tensors(tmp_path / "full"), tensors(tmp_path / "ext")
    assert ref.keys() == other.keys() and all(torch.equal(ref[k], other[k]) for k in ref)
    logs = [pd.read_csv(tmp_path / r / "log.csv") for r in ("full", "ext")]
    assert np.array_equal(logs[0]["loss"].to_numpy(), logs[1]["loss"].to_numpy())
    state = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["weighting"]
    if weighting.startswith("pareto"):
        assert state["updates"] == 3 and not torch.allclose(state["weights"], torch.full((3,), 1 / 3, dtype=torch.float64))
    else:
        assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith("2.weight"))  # u has learned
    # the adaptive run differs from a fixed one on the same seed
    train(TrainConfig(**SMALL, weighting="constant", steps=8), tmp_path / "fixed", progress=False)
    fixed = tensors(tmp_path / "fixed")
    assert not all(torch.equal(ref[k], fixed[k]) for k in ref)
