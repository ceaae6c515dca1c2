"""The fused per-task Gram against the float64 autograd loop over tasks (BackPACK-style problem list)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradconflict as gc
from gradconflict.engine import task_gram

from zoo import Conv1dNet, DiTBlocks, TokenNet, UNetLike, frozen

SCHEDULE = gc.NoiseSchedule.linear(T=1000)


def _tokens(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 6, 11, generator=g)


PROBLEMS = {
    "dit": (lambda: DiTBlocks(), lambda n, g: torch.randn(n, 1, 8, 8, generator=g), None),
    "dit_class_cond": (lambda: DiTBlocks(num_classes=3), lambda n, g: torch.randn(n, 1, 8, 8, generator=g),
                       lambda n, g: {"y": torch.randint(0, 4, (n,), generator=g)}),
    "unet": (lambda: UNetLike(), lambda n, g: torch.randn(n, 1, 8, 8, generator=g), None),
    "unet_class_cond": (lambda: UNetLike(num_classes=3), lambda n, g: torch.randn(n, 1, 8, 8, generator=g),
                        lambda n, g: {"y": torch.randint(0, 3, (n,), generator=g)}),
    "conv1d": (lambda: Conv1dNet(), lambda n, g: torch.randn(n, 2, 10, generator=g), None),
    "tied_embedding_mha": (lambda: TokenNet(), _tokens, None),
    "frozen": (lambda: frozen(DiTBlocks(), ("embed", "blocks.0.qkv.weight", "t_mlp.0")),
               lambda n, g: torch.randn(n, 1, 8, 8, generator=g), None),
}


def _batch(name: str, K: int = 4, n: int = 3, seed: int = 0, dtype=torch.float64, shuffle: bool = False):
    make_model, make_x, make_kw = PROBLEMS[name]
    torch.manual_seed(seed)
    model = make_model().to(dtype)
    g = torch.Generator().manual_seed(seed)
    bins = gc.TimestepBins.uniform(1000, K)
    t, task = bins.sample(n, g)
    if shuffle:
        perm = torch.randperm(len(t), generator=g)
        t, task = t[perm], task[perm]
    x0 = make_x(len(t), g).to(dtype)
    kw = make_kw(len(t), g) if make_kw else None
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(dtype)
    return model, x0, t, task, noise, kw


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_fused_equals_loop_float64(name: str, prediction: str) -> None:
    model, x0, t, task, noise, kw = _batch(name)
    args = dict(schedule=SCHEDULE, prediction=prediction, noise=noise, model_kwargs=kw, K=4)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, method="fused", **args)
    assert ref.gram.dtype == torch.float64 and got.gram.shape == (4, 4)
    assert _rel(got.gram, ref.gram) <= 1e-10
    torch.testing.assert_close(got.losses, ref.losses, rtol=1e-12, atol=0)
    assert float(ref.gram.abs().max()) > 0


@pytest.mark.parametrize("name", ["dit", "unet", "tied_embedding_mha"])
def test_fused_equals_loop_float32(name: str) -> None:
    model, x0, t, task, noise, kw = _batch(name, dtype=torch.float32)
    args = dict(schedule=SCHEDULE, noise=noise, model_kwargs=kw, K=4)
    ref32 = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, method="fused", **args)
    assert _rel(got.gram, ref32.gram) <= 1e-4
    model64 = model.double()
    ref64 = task_gram(model64, x0.double(), t, task, method="loop", schedule=SCHEDULE, noise=noise.double(),
                      model_kwargs=kw, K=4)
    assert _rel(got.gram, ref64.gram) <= 1e-4


@pytest.mark.parametrize("loss_space", ["x0", "eps", "v"])
def test_unequal_shuffled_tasks_and_loss_spaces(loss_space: str) -> None:
    model, x0, t, task, noise, kw = _batch("unet", K=5, n=2, shuffle=True)
    keep = torch.ones(len(t), dtype=torch.bool)
    keep[(task == 2).nonzero()[0]] = False  # task 2 has one sample fewer
    x0, t, task, noise = x0[keep], t[keep], task[keep], noise[keep]
    args = dict(schedule=SCHEDULE, prediction="x0", loss_space=loss_space, noise=noise, K=5)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, method="fused", **args)
    assert _rel(got.gram, ref.gram) <= 1e-10
    assert got.counts.tolist() == [2, 2, 1, 2, 2]


def test_return_gradients_match_loop_rows() -> None:
    model, x0, t, task, noise, kw = _batch("tied_embedding_mha")
    args = dict(schedule=SCHEDULE, noise=noise, K=4, return_gradients=True)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, method="fused", **args)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert got.gradients.shape == (4, P)
    torch.testing.assert_close(got.gradients, ref.gradients, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.gradients @ got.gradients.T, got.gram, rtol=1e-10, atol=1e-14)


def test_bins_as_task_and_labels_and_cosine() -> None:
    model, x0, t, _, noise, _ = _batch("dit")
    bins = gc.TimestepBins.uniform(1000, 4)
    res = task_gram(model, x0, t, bins, schedule=SCHEDULE, noise=noise)
    assert res.task_labels() == bins.labels
    cos = res.cosine()
    torch.testing.assert_close(torch.diagonal(cos), torch.ones(4, dtype=torch.float64))
    n = res.norms
    torch.testing.assert_close(cos * torch.outer(n, n), res.gram)
    frame = res.losses_frame()
    assert list(frame.columns) == ["task", "label", "loss", "count", "grad_norm"]


def test_seeded_noise_is_reproducible() -> None:
    model, x0, t, task, _, _ = _batch("dit")
    a = task_gram(model, x0, t, task, schedule=SCHEDULE, generator=torch.Generator().manual_seed(5), K=4)
    b = task_gram(model, x0, t, task, schedule=SCHEDULE, generator=torch.Generator().manual_seed(5), K=4)
    c = task_gram(model, x0, t, task, schedule=SCHEDULE, generator=torch.Generator().manual_seed(6), K=4)
    assert torch.equal(a.gram, b.gram)
    assert not torch.equal(a.gram, c.gram)


def test_dropout_is_off_by_default_so_fused_equals_loop() -> None:
    class WithDropout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.d, self.b = nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 8)

        def forward(self, x, t):
            return self.b(self.d(F.silu(self.a(x))))

    torch.manual_seed(0)
    model = WithDropout().double().train()
    x0 = torch.randn(8, 8, dtype=torch.float64)
    t, task = torch.tensor([5, 10, 300, 320, 600, 610, 900, 990]), torch.arange(4).repeat_interleave(2)
    noise = torch.randn_like(x0)
    ref = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, method="loop")
    got = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise)
    assert _rel(got.gram, ref.gram) <= 1e-10
    assert model.training  # mode restored


def test_batchnorm_in_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 3, padding=1))

    def f(x, t):
        return model(x)

    wrapper = nn.Module()
    wrapper.net = model
    wrapper.forward = f  # type: ignore[method-assign]
    x0 = torch.randn(4, 1, 4, 4)
    t, task = torch.tensor([1, 2, 800, 900]), torch.tensor([0, 0, 1, 1])
    model.train()
    with pytest.raises(ValueError, match="BatchNorm"):
        task_gram(wrapper, x0, t, task, schedule=SCHEDULE, train_mode=True)
    with pytest.raises(ValueError, match="BatchNorm"):  # eval mode is what the engine uses by default ...
        task_gram(_BN(track=False), x0, t, task, schedule=SCHEDULE)  # ... but batch statistics still mix samples
    res = task_gram(_BN(track=True), x0, t, task, schedule=SCHEDULE)  # running statistics: fine
    assert res.K == 2


class _BN(nn.Module):
    def __init__(self, track: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=track)
        self.o = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t):
        return self.o(self.bn(self.c(x)))


def test_empty_task_is_refused() -> None:
    model, x0, t, task, noise, _ = _batch("dit")
    with pytest.raises(ValueError, match=r"task\(s\) \[4\] have no samples"):
        task_gram(model, x0, t, task, schedule=SCHEDULE, K=5)


class _NaNForLateT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        out = self.lin(x)
        return out + torch.where(t[:, None] > 600, torch.nan, 0.0)


class _InfGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.lin(x)
        early = (t[:, None] <= 600).to(h.dtype)
        spike = torch.sqrt(h - h.detach() + early)  # infinite derivative only for late t (sqrt at 0)
        return h + spike


@pytest.mark.parametrize("method", ["fused", "loop"])
def test_nan_loss_and_inf_gradient_name_the_task(method: str) -> None:
    x0 = torch.randn(6, 4)
    t, task = torch.tensor([1, 2, 500, 510, 700, 800]), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"NaN or Inf .*task\(s\) \[2\]"):
        task_gram(_NaNForLateT(), x0, t, task, schedule=SCHEDULE, method=method)
    with pytest.raises(ValueError, match=r"gradient of task(\(s\) \[| )2\]? is NaN or Inf"):
        task_gram(_InfGrad(), x0, t, task, schedule=SCHEDULE, method=method)


def test_parameter_used_outside_its_module_is_refused_not_wrong() -> None:
    class Sneaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)

        def forward(self, x, t):
            return self.b(self.a(x)) + F.linear(x, self.a.weight)  # a.weight used without calling a

    x0 = torch.randn(4, 4, dtype=torch.float64)
    t, task = torch.tensor([1, 2, 800, 900]), torch.tensor([0, 0, 1, 1])
    model = Sneaky().double()
    with pytest.raises(ValueError, match="do not add up|used outside"):
        task_gram(model, x0, t, task, schedule=SCHEDULE)
    task_gram(model, x0, t, task, schedule=SCHEDULE, method="loop")  # the reference still works
    with pytest.raises(ValueError, match="do not add up|used outside"):  # a failed check is not remembered
        task_gram(model, x0, t, task, schedule=SCHEDULE, check="once")


def test_check_once_runs_the_self_check_once_per_model_and_signature() -> None:
    model, x0, t, task, noise, kw = _batch("dit", K=4, n=2)
    args = dict(schedule=SCHEDULE, noise=noise, model_kwargs=kw, K=4)
    accumulated = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: accumulated.append(1))
               for p in model.parameters() if p.requires_grad]
    first = task_gram(model, x0, t, task, **args)  # default "once": this call checks
    assert accumulated
    accumulated.clear()
    second = task_gram(model, x0, t, task, **args)
    assert not accumulated  # same model and signature: trusted, parameter-free backward
    assert torch.equal(first.gram, second.gram)
    half = torch.arange(0, len(t), 2)  # one sample of each task: batch size is not in the signature
    small_kw = {k: v[half] for k, v in kw.items()} if kw else None
    task_gram(model, x0[half], t[half], task[half], **{**args, "noise": noise[half], "model_kwargs": small_kw})
    assert not accumulated
    frozen = next(p for p in model.parameters() if p.requires_grad)
    frozen.requires_grad_(False)  # another set of trainable parameters: checked again
    task_gram(model, x0, t, task, **args)
    assert accumulated
    frozen.requires_grad_(True)
    accumulated.clear()
    task_gram(model, x0, t, task, check=True, **args)  # True: every call
    assert accumulated
    for h in handles:
        h.remove()
    with pytest.raises(ValueError, match="check must be True, False or 'once'"):
        task_gram(model, x0, t, task, check="always", **args)


def test_bad_inputs() -> None:
    model, x0, t, task, noise, _ = _batch("dit")
    with pytest.raises(ValueError, match="unknown method"):
        task_gram(model, x0, t, task, schedule=SCHEDULE, method="magic")
    with pytest.raises(ValueError, match="NaN or Inf"):
        task_gram(model, torch.full_like(x0, float("nan")), t, task, schedule=SCHEDULE)
    with pytest.raises(ValueError, match="one timestep per sample"):
        task_gram(model, x0, t[:-1], task, schedule=SCHEDULE)
    with pytest.raises(ValueError, match="noise has shape"):
        task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise[:-1])


def test_countsketch_is_unbiased_within_its_stated_error() -> None:
    model, x0, t, task, noise, _ = _batch("unet", K=4, n=2)
    d = 256
    exact = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=4).gram
    ests = []
    for seed in range(8):
        res = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=4, sketch_dim=d, sketch_seed=seed)
        ests.append(res.sketch @ res.sketch.T)
    ests = torch.stack(ests)
    diag = torch.diagonal(exact)
    sd = torch.sqrt((torch.outer(diag, diag) + exact**2) / d)  # bound on each entry's standard deviation
    assert torch.all((ests - exact).abs() <= 6 * sd)
    assert torch.all((ests.mean(0) - exact).abs() <= 6 * sd / 8**0.5)
    assert not torch.allclose(ests[0], exact, rtol=1e-6)  # it is an estimate, not the exact Gram
    # fused and loop build the same sketch (same hashes per parameter)
    ref = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=4, sketch_dim=d, method="loop")
    got = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=4, sketch_dim=d)
    torch.testing.assert_close(got.sketch, ref.sketch, rtol=1e-9, atol=1e-12)


def test_existing_grads_are_left_untouched() -> None:
    model, x0, t, task, noise, _ = _batch("dit")
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=4)
    assert all(torch.all(p.grad == 7.0) for p in model.parameters())


def test_diffusers_unet2d_if_installed() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    t, task = torch.tensor([3, 40, 400, 450, 800, 999]), torch.tensor([0, 0, 1, 1, 2, 2])
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    ref = task_gram(unet, x0, t, task, schedule=SCHEDULE, noise=noise, method="loop")
    got = task_gram(unet, x0, t, task, schedule=SCHEDULE, noise=noise)
    assert _rel(got.gram, ref.gram) <= 1e-10


@pytest.mark.parametrize("name", ["dit", "unet", "conv1d", "tied_embedding_mha"])
def test_memory_budget_chunks_give_the_same_gram(name: str) -> None:
    model, x0, t, task, noise, kw = _batch(name)
    args = dict(schedule=SCHEDULE, noise=noise, model_kwargs=kw, K=4)
    whole = task_gram(model, x0, t, task, **args)
    pieces = task_gram(model, x0, t, task, max_chunk_elements=40, **args)  # a few rows of a layer at a time
    assert _rel(pieces.gram, whole.gram) <= 1e-12
    ref = task_gram(model, x0, t, task, method="loop", **args)
    assert _rel(pieces.gram, ref.gram) <= 1e-10


def test_float32_gram_is_exactly_symmetric_and_accepted_by_the_solver() -> None:
    from gradconflict import pareto

    model, x0, t, task, noise, kw = _batch("dit", K=6, n=4, dtype=torch.float32)
    res = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=6)
    assert torch.equal(res.gram, res.gram.T)
    pareto.solve(res.gram, lam=0.1 * float(torch.trace(res.gram)) / 6)  # strict symmetry check passes


@pytest.mark.parametrize("name", ["dit", "unet", "tied_embedding_mha", "frozen"])
def test_unchecked_parameter_free_backward_gives_the_same_gram(name: str) -> None:
    model, x0, t, task, noise, kw = _batch(name)
    args = dict(schedule=SCHEDULE, noise=noise, model_kwargs=kw, K=4)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    accumulated = []
    handles = [p.register_post_accumulate_grad_hook(lambda p: accumulated.append(1))
               for p in model.parameters() if p.requires_grad]
    fast = task_gram(model, x0, t, task, check=False, **args)
    assert _rel(fast.gram, ref.gram) <= 1e-10
    assert not accumulated  # autograd formed no parameter gradient
    task_gram(model, x0, t, task, check=True, **args)
    assert accumulated  # the checked path does (it needs the full gradient for the self-check)
    for h in handles:
        h.remove()


def test_check_once_sees_flags_kwargs_and_replaced_modules() -> None:
    """What can switch a model onto a code path the hooks cannot see must trigger a new check."""

    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.mid = nn.Identity()
            self.sneaky = False

        def forward(self, x, t, sneaky=False):
            y = self.b(self.mid(self.a(x)))
            return y + F.linear(x, self.a.weight) if (sneaky or self.sneaky) else y

    class UsesA(nn.Module):
        def __init__(self, a: nn.Linear) -> None:
            super().__init__()
            self.w = [a]  # not registered: a.weight is used outside its module

        def forward(self, h):
            return h + F.linear(h, self.w[0].weight)

    x0 = torch.randn(4, 4, dtype=torch.float64)
    t, task = torch.tensor([1, 2, 800, 900]), torch.tensor([0, 0, 1, 1])
    model = Flag().double()
    task_gram(model, x0, t, task, schedule=SCHEDULE, model_kwargs={"sneaky": False})  # checked, passes
    with pytest.raises(ValueError, match="do not add up|used outside"):  # a kwarg value
        task_gram(model, x0, t, task, schedule=SCHEDULE, model_kwargs={"sneaky": True})
    task_gram(model, x0, t, task, schedule=SCHEDULE)
    model.sneaky = True  # a module attribute
    with pytest.raises(ValueError, match="do not add up|used outside"):
        task_gram(model, x0, t, task, schedule=SCHEDULE)
    model.sneaky = False
    task_gram(model, x0, t, task, schedule=SCHEDULE)
    model.mid = UsesA(model.a).double()  # a replaced submodule (its id may be the freed one's)
    with pytest.raises(ValueError, match="do not add up|used outside"):
        task_gram(model, x0, t, task, schedule=SCHEDULE)


@pytest.mark.parametrize("name", ["dit", "unet"])
def test_bf16_autocast_passes_its_self_check_and_stays_close_to_float32(name: str) -> None:
    """Under bf16 autocast autograd's full gradient comes from bf16 products while the per-task gradients are
    built in float32: the self-check must allow bf16 rounding (and still be far below a missing term)."""
    model, x0, t, task, noise, kw = _batch(name, K=4, n=4, dtype=torch.float32)
    args = dict(schedule=SCHEDULE, noise=noise, model_kwargs=kw, K=4)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, autocast_dtype=torch.bfloat16, check=True, **args)
    assert got.gram.dtype == torch.float64
    assert _rel(got.gram, ref.gram) <= 1e-2  # bf16 activations: about 2-3 significant digits (measured 1e-3)


def test_nonfinite_gradient_with_finite_loss_is_reported_with_its_task_and_parameter() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, t):
            y = self.lin(x)
            gate = (t > 500).to(y.dtype).view(-1, 1)
            return y + torch.sqrt((y * gate) ** 2)  # gate 0: sqrt(0) -> gradient inf * 0 = NaN, loss finite

    model = Gate().double()
    x0 = torch.randn(4, 4, dtype=torch.float64)
    t, task = torch.tensor([1, 2, 800, 900]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"task\(s\) \[0\] is NaN or Inf in parameter 'lin\.(weight|bias)'"):
        task_gram(model, x0, t, task, schedule=SCHEDULE, check=False)
