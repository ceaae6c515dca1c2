"""The fused engine against models that break its assumptions: outputs changed in place after a hooked layer, samples
that interact, layers whose dim 0 is not the batch. Each is compared with the float64 per-task loop or must fail
with an error that names the problem (never a silently wrong Gram)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

import gradconflict as gc

SCHEDULE = gc.NoiseSchedule.linear()


def _inputs(n: int = 6, shape: tuple[int, ...] = (4,)):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    return x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), torch.arange(1, n + 1) * 130, \
        torch.arange(n) % 3  # interleaved tasks


class _TwoLinear(nn.Module):
    """Linear(4, 8) -> ... -> Linear(8, 4); ``kind`` picks what happens between them (the subclass's forward)."""

    def __init__(self, kind: str):
        super().__init__()
        self.l1, self.l2, self.kind = nn.Linear(4, 8), nn.Linear(8, 4), kind


class InPlace(_TwoLinear):
    """A Linear whose output is changed in place before the next layer (``h.mul_``, ``relu_``, ``h += ...``)."""

    def forward(self, x, t):
        h = self.l1(x)
        if self.kind == "mul_":
            h.mul_(2.0)
        elif self.kind == "relu_":
            torch.relu_(h)
        else:
            h += t[:, None].to(h.dtype) / 1000
        return self.l2(torch.tanh(h))


class Residual(nn.Module):
    """``out = conv(x); out += x``: the ResNet pattern."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)

    def forward(self, x, t):
        out = self.conv(x)
        out += x
        return self.head(torch.tanh(out))


@pytest.mark.parametrize("model", [InPlace("mul_"), InPlace("relu_"), InPlace("add_"), Residual()],
                         ids=["mul_", "relu_", "add_", "residual"])
def test_outputs_changed_in_place_give_the_loop_gram_on_every_call(model):
    """The first call runs the self-check (a full backward); later calls skip it and backpropagate only to the layer
    outputs, which used to stop at the modified version and give a wrong Gram (12-27% off) with no error."""
    model = model.double()
    x0, noise, t, task = _inputs(shape=(2, 5, 5) if isinstance(model, Residual) else (4,))
    kw = dict(schedule=SCHEDULE, noise=noise)
    ref = gc.task_gram(model, x0, t, task, method="loop", **kw).gram
    for call in range(3):  # check="once": the self-check runs on the first call only
        G = gc.task_gram(model, x0, t, task, **kw).gram
        assert float((G - ref).norm() / ref.norm()) < 1e-10, call


class Mixing(_TwoLinear):
    """Samples that interact between the two layers: centred over the batch, batch statistics, or the batch flipped."""

    def forward(self, x, t):
        h = self.l1(x)
        if self.kind == "center":
            h = h - h.mean(0, keepdim=True)
        elif self.kind == "batch_norm":
            h = nn.functional.batch_norm(h, None, None, training=True)
        else:  # "flip": the batch reversed, then restored after a layer
            h = self.l2(torch.tanh(h.flip(0))).flip(0)
            return h
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize("how", ["center", "batch_norm", "flip"])
@pytest.mark.parametrize("check", [True, "once"])
def test_samples_that_interact_are_refused(how, check):
    """The sum check 1^T G 1 = ||sum_k g_k||^2 cannot see gradient moved between tasks; the split check with
    random signs can (these gave Grams 7e-2 to 1.3 off, silently)."""
    model = Mixing(how).double()
    x0, noise, t, task = _inputs()
    with pytest.raises(ValueError, match="samples interact"):
        gc.task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, check=check)


def test_a_sequence_first_layer_is_refused_even_when_its_length_equals_the_batch():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 4)

        def forward(self, x, t):  # x: (N, L, E) -> (L, N, E) through the Linear -> back
            return self.l1(torch.tanh(x.transpose(0, 1))).transpose(0, 1)

    x0, noise, t, task = _inputs(n=6, shape=(6, 4))  # L = N = 6: shapes cannot tell the layouts apart
    with pytest.raises(ValueError, match="dim 0 is not the batch"):
        gc.task_gram(SeqFirst().double(), x0, t, task, schedule=SCHEDULE, noise=noise)


def test_independent_samples_pass_the_split_check_at_float32():
    model = InPlace("add_").float()
    x0, noise, t, task = _inputs()
    res = gc.task_gram(model, x0.float(), t, task, schedule=SCHEDULE, noise=noise.float(), check=True)
    ref = gc.task_gram(model.double(), x0, t, task, schedule=SCHEDULE, noise=noise, method="loop").gram
    assert float((res.gram - ref).norm() / ref.norm()) < 1e-4


def test_batchnorm_without_running_statistics_says_why_eval_mode_is_not_enough():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, t):
            return self.net(x)

    x0, noise, t, task = _inputs()
    with pytest.raises(ValueError, match="track_running_stats=True"):
        gc.task_gram(Wrap().double(), x0, t, task, schedule=SCHEDULE, noise=noise)


def test_functional_call_with_a_derived_weight_is_a_clear_error():
    from torch.func import functional_call

    class Derived(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x, t):
            return functional_call(self.a, {"weight": 2 * self.a.weight}, (x,))

    x0, noise, t, task = _inputs()
    with pytest.raises(ValueError, match="ran with a tensor in place of its parameters.*method='loop'"):
        gc.task_gram(Derived().double(), x0, t, task, schedule=SCHEDULE, noise=noise)


def test_the_check_replays_dropout_masks_and_leaves_the_random_stream_as_an_unchecked_call_does():
    """train_mode=True with dropout: the check's own forward must draw the fused pass's masks (else it would be a
    false alarm), and the caller's RNG must end where an unchecked call leaves it."""

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.drop, self.l2 = nn.Linear(4, 16), nn.Dropout(0.5), nn.Linear(16, 4)

        def forward(self, x, t):
            return self.l2(self.drop(torch.tanh(self.l1(x))))

    model = Drop().double()
    x0, noise, t, task = _inputs()
    after = {}
    for check in (True, False):
        torch.manual_seed(123)
        res = gc.task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, train_mode=True, check=check)
        after[check] = (res.gram, torch.rand(5))
    assert torch.equal(after[True][0], after[False][0])  # the same masks in the fused pass
    assert torch.equal(after[True][1], after[False][1])  # and the same stream afterwards


@pytest.mark.parametrize("method", ["fused", "loop"])
def test_reentrant_activation_checkpointing_names_the_fix(method):
    from torch.utils.checkpoint import checkpoint

    class Reentrant(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1, self.l2 = nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x, t):  # the checkpointed block's input requires grad (it comes out of l0)
            return self.l2(checkpoint(lambda h: torch.tanh(self.l1(h)), self.l0(x), use_reentrant=True))

    model = Reentrant().double()
    x0, noise, t, task = _inputs()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        for _ in range(2):  # the fused engine's first call runs the self-check (full backward), the 2nd does not
            gc.task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, method=method)


class _PositionTable(nn.Module):
    """A learned position table looked up once (``shared``) or once per sample (``expanded``), plus a class label."""

    def __init__(self, lookup: str) -> None:
        super().__init__()
        self.lookup = lookup
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 4)
        self.pos, self.label = nn.Embedding(16, 8), nn.Embedding(3, 8)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.inp(x.reshape(n, 4, 16).transpose(1, 2)) + self.label(y).reshape(-1, 1, 8)
        ids = torch.arange(16) if self.lookup == "shared" else torch.arange(16).expand(n, 16)
        h = torch.tanh(h + self.pos(ids))
        return self.out(h).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("lookup,label", [("expanded", "per_sample"), ("shared", "per_sample"), ("expanded", "0-dim")])
def test_a_layer_that_does_not_see_the_batch_is_refused_with_the_fix(lookup: str, label: str) -> None:
    """A lookup shared by every sample (its output gradient is already summed over them) or a 0-dim class label:
    a ValueError naming the layer's input shape and the fix, not a shape error from inside a rule; the per-sample
    form equals the float64 loop."""
    torch.manual_seed(0)
    model = _PositionTable(lookup).double()
    x0, noise, t, task = _inputs(shape=(4, 4, 4))
    y = torch.tensor([0, 1, 2, 0, 1, 2]) if label == "per_sample" else torch.tensor(1)
    kw = dict(schedule=SCHEDULE, K=3, noise=noise, model_kwargs={"y": y})
    if lookup == "expanded" and label == "per_sample":
        ref = gc.task_gram(model, x0, t, task, method="loop", **kw)
        got = gc.task_gram(model, x0, t, task, **kw)
        assert float((got.gram - ref.gram).norm() / ref.gram.norm()) <= 1e-10
        return
    shape = "(16,)" if lookup == "shared" else "()"
    with pytest.raises(ValueError, match=rf"Embedding ran on an input of shape {re.escape(shape)}, not on the batch of 6"):
        gc.task_gram(model, x0, t, task, **kw)


class _Flattened(nn.Module):
    """Tokens flattened to (N * L, E) before a Linear: the batch is no longer dim 0 there."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return self.lin(x.reshape(n, 4, 16).transpose(1, 2).reshape(-1, 4)).reshape(n, 16, 4).transpose(1, 2).reshape(x.shape)


def test_flattened_tokens_are_refused_with_their_own_fix() -> None:
    model = _Flattened().double()
    x0, noise, t, task = _inputs(shape=(4, 4, 4))
    with pytest.raises(ValueError, match=r"input of shape \(96, 4\).*tokens flattened to \(N \* L, E\)"):
        gc.task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=3)


class _UnusedAux(nn.Module):
    """A layer run on a slice of the batch whose output never reaches the loss (unused, or detached)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.aux = nn.Linear(64, 64), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        self.aux(x.reshape(n, -1)[:3, :4])
        self.aux(x.reshape(n, -1)[:3, :4]).detach()
        return self.lin(x.reshape(n, -1)).reshape(x.shape)


def test_a_layer_off_the_batch_whose_output_never_reaches_the_loss_is_no_concern() -> None:
    model = _UnusedAux().double()
    x0, noise, t, task = _inputs(shape=(4, 4, 4))
    kw = dict(schedule=SCHEDULE, K=3, noise=noise)
    ref = gc.task_gram(model, x0, t, task, method="loop", **kw)
    got = gc.task_gram(model, x0, t, task, **kw)
    assert float((got.gram - ref.gram).norm() / ref.gram.norm()) <= 1e-10
