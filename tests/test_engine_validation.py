"""``task_gram`` inputs (#15): every dtype / kind of x0, t, task, noise and model_kwargs either gives the Gram of an
independent float64 loop over tasks, or is refused with a ValueError that names the argument and the fix."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradconflict as gc
from gradconflict.engine import per_sample_losses, sample_task_batch, task_gram

SCHEDULE = gc.NoiseSchedule.linear(T=1000)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Tiny(nn.Module):
    """``lin(x) * (1 + emb(t) + scale)``: 32 parameters, depends on t; ``cast`` feeds x in the parameters' dtype
    (as models that call ``x.to(self.dtype)`` do), so coarse data reaches it without a dtype error."""

    def __init__(self, cast: bool = False) -> None:
        super().__init__()
        self.cast = cast
        self.lin = nn.Linear(4, 4)
        self.emb = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | float = 0.0) -> torch.Tensor:
        w = self.lin.weight
        x = x.to(w.dtype) if self.cast else x
        ang = t.to(w.dtype)[:, None] / 1000.0
        gate = 1 + self.emb(torch.cat([ang.sin(), ang.cos()], 1))
        if isinstance(scale, torch.Tensor) and scale.ndim > 0:
            scale = scale.to(w.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.lin(x) * (gate.reshape(x.shape[0], *([1] * (x.ndim - 2)), 4) + scale)


def reference_gram(model: nn.Module, x0, t, task, noise, K: int, scale=None) -> torch.Tensor:
    """float64 loop over tasks: x_t from the schedule's alphabar in NumPy, eps prediction read in x0 units,
    ``L_k`` = mean over task k's samples of the per-element mean squared x0 error, ``G = J J^T``."""
    m = copy.deepcopy(model).double()
    x0, noise = torch.as_tensor(x0).double(), torch.as_tensor(noise).double()
    t, task = torch.as_tensor(np.asarray(t, dtype=np.float64)).long(), torch.as_tensor(np.asarray(task)).long()
    abar = torch.tensor(SCHEDULE.alphas_cumprod)[t]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha, sigma = abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)
    rows = []
    for k in range(K):
        s = task == k
        kw = {} if scale is None else {"scale": scale[s] if scale.ndim else scale}
        x_t = alpha[s] * x0[s] + sigma[s] * noise[s]
        x0_hat = (x_t - sigma[s] * m(x_t, t[s], **kw)) / alpha[s]
        L = (x0_hat - x0[s]).pow(2).reshape(int(s.sum()), -1).mean(1).mean()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(L, list(m.parameters()))]))
    J = torch.stack(rows)
    return J @ J.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _problem(seed: int = 0, n: int = 3, K: int = 2):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n * K, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (n * K,), generator=g)
    task = torch.arange(K).repeat_interleave(n)
    return x0, t, task, noise


# ------------------------------------------------------------------ 3. floating-point timesteps
@pytest.mark.parametrize("method", ["fused", "loop"])
def test_fractional_timesteps_are_refused_not_truncated(method: str) -> None:
    x0, _, task, noise = _problem()
    t = torch.tensor([0.7, 0.2, 0.9, 500.0, 800.0, 900.0])  # .long() made every t in [0, 1) timestep 0
    with pytest.raises(ValueError, match=r"t has dtype torch.float32 \(values such as \[0.7, 0.2, 0.9\]\).*t.long\(\)"):
        task_gram(Tiny().double(), x0, t, task, schedule=SCHEDULE, noise=noise, method=method)
    with pytest.raises(ValueError, match=r"t must hold integer timesteps, got non-integer values such as \[0.7"):
        task_gram(Tiny().double(), x0, t.tolist(), task, schedule=SCHEDULE, noise=noise, method=method)
    with pytest.raises(ValueError, match=r"t has dtype torch.bool"):
        task_gram(Tiny().double(), x0, t > 1, task, schedule=SCHEDULE, noise=noise, method=method)


def test_integral_float_timesteps_in_a_list_match_the_reference() -> None:
    x0, t, task, noise = _problem()
    model = Tiny().double()
    got = task_gram(model, x0, [float(v) for v in t], task, schedule=SCHEDULE, noise=noise)
    assert _rel(got.gram, reference_gram(model, x0, t, task, noise, 2)) <= 1e-10


def test_per_sample_losses_refuses_float_timesteps() -> None:
    x0, t, _, noise = _problem()
    with pytest.raises(ValueError, match=r"t has dtype torch.float64.*t.long\(\)"):
        per_sample_losses(Tiny().double(), x0, t.double() + 0.5, noise, SCHEDULE)


# ------------------------------------------------------------------ 4. fractional task ids
@pytest.mark.parametrize("method", ["fused", "loop"])
def test_fractional_task_ids_are_refused(method: str) -> None:
    x0, t, _, noise = _problem()
    task = torch.tensor([0.0, 0.0, 0.0, 1.7, 1.0, 1.0])  # 1.7 became task 1
    with pytest.raises(ValueError, match=r"task has dtype torch.float32 \(values such as \[1.7\]\).*task.long\(\)"):
        task_gram(Tiny().double(), x0, t, task, schedule=SCHEDULE, noise=noise, method=method)
    with pytest.raises(ValueError, match=r"task must hold integer task ids, got non-integer values such as \[1.7\]"):
        task_gram(Tiny().double(), x0, t, task.numpy(), schedule=SCHEDULE, noise=noise, method=method)
    with pytest.raises(ValueError, match=r"task has dtype torch.bool"):
        task_gram(Tiny().double(), x0, t, task > 0.5, schedule=SCHEDULE, noise=noise, method=method)


@pytest.mark.parametrize("K", [2.5, True, "2", 0])
def test_a_non_integer_task_count_is_refused(K) -> None:
    x0, t, task, noise = _problem()
    with pytest.raises(ValueError, match=r"K must be a positive integer number of tasks, got"):
        task_gram(Tiny().double(), x0, t, task, schedule=SCHEDULE, noise=noise, K=K)


def test_a_task_count_that_contradicts_the_bins_is_refused() -> None:
    x0, t, _, noise = _problem()
    bins = gc.TimestepBins.uniform(1000, 2)
    with pytest.raises(ValueError, match=r"K = 5 but the bins define K = 2 tasks"):  # was ignored
        task_gram(Tiny().double(), x0, t, bins, schedule=SCHEDULE, noise=noise, K=5)


# ------------------------------------------------------------------ 5. integer x0
@pytest.mark.parametrize("method", ["fused", "loop"])
def test_uint8_images_are_refused_with_the_scaling(method: str) -> None:
    x0, t, task, noise = _problem()
    pixels = ((x0 + 1) * 127.5).round().to(torch.uint8)  # cast to uint8 alpha and sigma became 0 and x_t = 0
    with pytest.raises(ValueError, match=r"x0 has dtype torch.uint8; .*x0 = x0.float\(\) / 127.5 - 1"):
        task_gram(Tiny().double(), pixels, t, task, schedule=SCHEDULE, noise=noise, method=method)


@pytest.mark.parametrize("method", ["fused", "loop"])
def test_int64_x0_without_noise_is_refused_not_a_torch_error(method: str) -> None:
    x0, t, task, _ = _problem()
    with pytest.raises(ValueError, match=r"x0 has dtype torch.int64; .*x0.float\(\) / 127.5 - 1"):
        task_gram(Tiny().double(), (x0 * 100).long(), t, task, schedule=SCHEDULE, method=method,
                  generator=torch.Generator().manual_seed(0))


def test_integer_data_is_refused_by_the_shared_loss_and_the_batch_sampler() -> None:
    x0, t, _, noise = _problem()
    with pytest.raises(ValueError, match=r"x0 has dtype torch.uint8"):
        per_sample_losses(Tiny().double(), x0.to(torch.uint8), t, noise, SCHEDULE)
    with pytest.raises(ValueError, match=r"noise has dtype torch.int64.*torch.randn_like\(x0\)"):
        per_sample_losses(Tiny().double(), x0, t, noise.long(), SCHEDULE)
    with pytest.raises(ValueError, match=r"images have dtype torch.uint8.*127.5 - 1"):
        sample_task_batch(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), gc.TimestepBins.uniform(1000, 2), 1, 0)


# ------------------------------------------------------------------ 6. coarse x0, fine model
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("method", ["fused", "loop"])
def test_coarse_data_is_noised_in_the_models_precision(dtype: torch.dtype, method: str) -> None:
    x0, t, task, noise = _problem()
    x0, noise = x0.to(dtype), noise.to(dtype)  # the float64 reference uses these values exactly
    model = Tiny(cast=True).double()
    got = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, method=method)
    ref = reference_gram(model, x0, t, task, noise, 2)
    assert _rel(got.gram, ref) <= 1e-10  # coefficients in the data dtype moved it by 2e-7 (float32) to 4e-3 (bfloat16)


def test_per_sample_losses_applies_the_coefficients_in_the_models_precision() -> None:
    x0, t, _, noise = _problem()
    model = Tiny(cast=True).double()
    got = per_sample_losses(model, x0.half(), t, noise.half(), SCHEDULE)
    x0, noise = x0.half().double(), noise.half().double()
    a = torch.tensor(np.sqrt(SCHEDULE.alphas_cumprod))[t][:, None]
    s = torch.tensor(np.sqrt(1 - SCHEDULE.alphas_cumprod))[t][:, None]
    x_t = a * x0 + s * noise
    with torch.no_grad():
        ref = ((x_t - s * model(x_t, t)) / a - x0).pow(2).mean(1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach(), ref, rtol=1e-12, atol=0)


def test_noise_on_another_device_is_refused() -> None:
    x0, t, task, noise = _problem()
    with pytest.raises(ValueError, match=r"noise is on meta but x0 is on cpu.*noise.to\(x0.device\)"):
        task_gram(Tiny().double(), x0, t, task, schedule=SCHEDULE, noise=noise.to("meta"))


# ------------------------------------------------------------------ model_kwargs
def test_numpy_conditioning_is_refused() -> None:
    x0, t, task, noise = _problem()
    scale = np.linspace(0, 1, 6)  # the loop would hand all 6 rows to each task's 3 samples
    with pytest.raises(ValueError, match=r"model_kwargs\['scale'\] is a NumPy array \(6,\).*torch.as_tensor"):
        task_gram(Tiny().double(), x0, t, task, schedule=SCHEDULE, noise=noise, model_kwargs={"scale": scale},
                  method="loop")


# ------------------------------------------------------------------ property: match the reference or refuse
X0_DTYPES = FLOATS + (torch.uint8, torch.int64, torch.bool)
KINDS = ("long", "int32", "float_tensor", "list_int", "list_float", "list_frac", "numpy_int", "numpy_frac")


def _as_kind(ids: torch.Tensor, kind: str, frac: float):
    """``ids`` (long) in the given form; the "frac" kinds add ``frac`` (in (0, 1)) to the first entry."""
    if kind == "long":
        return ids
    if kind == "int32":
        return ids.int()
    if kind == "float_tensor":
        return ids.float()
    if kind == "list_int":
        return ids.tolist()
    if kind == "list_float":
        return [float(v) for v in ids]
    if kind == "list_frac":
        return [float(v) + (frac if i == 0 else 0.0) for i, v in enumerate(ids)]
    if kind == "numpy_int":
        return ids.numpy().astype(np.int32)
    return ids.numpy().astype(np.float64) + np.eye(1, len(ids))[0] * frac


@st.composite
def problems(draw):
    K = draw(st.integers(2, 4))
    counts = draw(st.lists(st.integers(1, 3), min_size=K, max_size=K))
    N = sum(counts)
    task = torch.arange(K).repeat_interleave(torch.tensor(counts))
    perm = torch.tensor(draw(st.permutations(range(N))))
    t = torch.tensor(draw(st.lists(st.integers(0, 999), min_size=N, max_size=N)))
    mid = draw(st.sampled_from([(), (2,)]))
    seed = draw(st.integers(0, 2**16))
    return dict(
        K=K, N=N, task=task[perm], t=t, shape=(N, *mid, 4), seed=seed,
        x0_dtype=draw(st.sampled_from(X0_DTYPES)),
        noise_dtype=draw(st.sampled_from(FLOATS + (torch.int64,))),
        t_kind=draw(st.sampled_from(KINDS)), task_kind=draw(st.sampled_from(KINDS)),
        frac=draw(st.sampled_from([0.25, 0.5, 0.7])),
        t_out_of_range=draw(st.sampled_from([None, -1, 1000])),
        kwargs=draw(st.sampled_from(["none", "per_sample", "scalar", "wrong_batch", "numpy"])),
        method=draw(st.sampled_from(["fused", "loop"])),
        model_dtype=draw(st.sampled_from([torch.float64, torch.float32])),
    )


def _refusal(p: dict) -> str | None:
    """The message pattern expected for the drawn problem, or None when it must be computed (independent rules:
    integer data and noise, float tensors or fractional values for t and task, t outside [0, T), NumPy or wrongly
    batched conditioning, data finer than a float32 model)."""
    if not p["x0_dtype"].is_floating_point:
        return rf"x0 has dtype {p['x0_dtype']}; .*127.5 - 1"
    for name in ("t", "task"):
        kind = p[f"{name}_kind"]
        if kind == "float_tensor":
            return rf"{name} has dtype torch.float32 .*{name}.long\(\)"
        if kind in ("list_frac", "numpy_frac"):
            return rf"{name} must hold integer .* non-integer values such as \["
    if p["t_out_of_range"] is not None:
        return r"t out of range: timesteps must lie in \[0, 999\]"
    if not p["noise_dtype"].is_floating_point:
        return r"noise has dtype torch.int64.*randn_like"
    if p["kwargs"] == "numpy":
        return r"model_kwargs\['scale'\] is a NumPy array"
    if p["kwargs"] == "wrong_batch":
        return r"model_kwargs\['scale'\] has batch size"
    if p["model_dtype"] == torch.float32 and p["x0_dtype"] == torch.float64:
        return r"x_t of dtype torch.float64.*parameters are torch.float32"
    return None


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_any_input_matches_the_float64_loop_or_is_refused(p: dict) -> None:
    g = torch.Generator().manual_seed(p["seed"])
    x0 = torch.rand(p["shape"], generator=g, dtype=torch.float64) * 2 - 1
    x0 = (x0 * 100).to(p["x0_dtype"]) if not p["x0_dtype"].is_floating_point else x0.to(p["x0_dtype"])
    noise = torch.randn(p["shape"], generator=g, dtype=torch.float64).to(p["noise_dtype"])
    t = p["t"].clone()
    if p["t_out_of_range"] is not None:
        t[0] = p["t_out_of_range"]
        t = t.long()
    scale = {"none": None, "per_sample": torch.rand(p["N"], generator=g, dtype=torch.float64),
             "scalar": torch.tensor(0.3, dtype=torch.float64), "wrong_batch": torch.rand(p["N"] + 1, generator=g),
             "numpy": np.linspace(0, 1, p["N"])}[p["kwargs"]]
    torch.manual_seed(p["seed"])
    model = Tiny().to(p["model_dtype"])
    args = dict(schedule=SCHEDULE, noise=noise, method=p["method"], model_kwargs=None if scale is None else {"scale": scale})
    t_in, task_in = _as_kind(t, p["t_kind"], p["frac"]), _as_kind(p["task"], p["task_kind"], p["frac"])
    expected = _refusal(p)
    if expected is not None:
        with pytest.raises(ValueError, match=expected):
            task_gram(model, x0, t_in, task_in, **args)
        return
    got = task_gram(model, x0, t_in, task_in, **args)
    ref = reference_gram(model, x0, t, p["task"], noise, p["K"], None if scale is None else scale.double())
    tol = 1e-9 if p["model_dtype"] == torch.float64 else 2e-3
    assert got.gram.shape == (p["K"], p["K"])
    assert _rel(got.gram, ref) <= tol, (_rel(got.gram, ref), p)
