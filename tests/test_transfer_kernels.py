"""Copy-batched Linear / attention kernels of the stacked fine-tuning (``gradconflict.transfer.kernels``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradconflict as gc
import gradconflict.transfer.kernels as kernels
from gradconflict.models import build_model
from gradconflict.transfer import BatchStream, TransferConfig, finetune_sequential, finetune_stacked
from gradconflict.transfer.kernels import StackedKernels
from gradconflict.transfer.stacked import sources_of

SCHEDULE = gc.NoiseSchedule.linear()
C = 3
_real_copy_linear = kernels.copy_linear


def _loop_vs_vmap(fn, args: tuple, in_dims: tuple) -> None:
    """``vmap(fn)`` under ``StackedKernels`` equals a Python loop over the copies, values and gradients."""
    leaves = [a for a in args if isinstance(a, torch.Tensor)]

    def loop() -> torch.Tensor:
        return torch.stack([fn(*(a if d is None else a.select(d, c) for a, d in zip(args, in_dims))) for c in range(C)])

    ref = loop()
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    with StackedKernels():
        out = torch.vmap(fn, in_dims=in_dims)(*args)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def _stacked(shape: tuple, dim) -> torch.Tensor:
    """A random tensor of per-copy ``shape`` with the copy dim at ``dim`` (None: shared by all copies)."""
    full = shape if dim is None else (*shape[:dim], C, *shape[dim:])
    return torch.randn(*full, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("dims", [(0, 0, 0), (0, 0, None), (None, 0, 0), (0, None, None), (1, 0, 0), (0, None, 0)])
@pytest.mark.parametrize("lead", [(), (4,), (2, 5)])
def test_copy_linear_equals_a_loop_over_copies(dims: tuple, lead: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "MIN_LINEAR_ROWS", 0)  # route even these small calls to copy_linear
    calls = []
    monkeypatch.setattr(kernels, "copy_linear", lambda *a: calls.append(1) or _real_copy_linear(*a))
    torch.manual_seed(0)
    args = (_stacked((*lead, 6), dims[0]), _stacked((5, 6), dims[1]), _stacked((5,), dims[2]))
    _loop_vs_vmap(F.linear, args, dims)
    _loop_vs_vmap(lambda x, w: F.linear(x, w), args[:2], dims[:2])
    assert len(calls) == 2


def test_small_linear_calls_keep_vmaps_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(kernels, "copy_linear", lambda *a: calls.append(1) or _real_copy_linear(*a))
    x, w = torch.randn(C, kernels.MIN_LINEAR_ROWS - 1, 6), torch.randn(C, 5, 6)
    with StackedKernels():
        torch.vmap(F.linear)(x, w)
        assert not calls
        torch.vmap(F.linear)(torch.randn(C, kernels.MIN_LINEAR_ROWS, 6), w)
    assert len(calls) == 1


@pytest.mark.parametrize("per_copy_ndim", [3, 4])
def test_copy_attention_equals_a_loop_over_copies(per_copy_ndim: int) -> None:
    torch.manual_seed(0)
    shape = (2, 3, 7, 4) if per_copy_ndim == 4 else (3, 7, 4)
    q, k, v = (_stacked(shape, 0) for _ in range(3))
    _loop_vs_vmap(F.scaled_dot_product_attention, (q, k, v), (0, 0, 0))
    _loop_vs_vmap(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3), (q, k, v), (0, 0, 0))


def test_plain_calls_inside_the_mode_are_untouched() -> None:
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6)
    with StackedKernels():
        out = F.linear(x, w)
    torch.testing.assert_close(out, x @ w.T)
    out.sum().backward()  # a custom op outside vmap would have no autograd formula
    assert x.grad is not None


def test_kernel_switch_by_device_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("GRADCONFLICT_STACKED_KERNELS", raising=False)
    assert kernels.use_stacked_kernels(cpu) and not kernels.use_stacked_kernels(cuda)
    monkeypatch.setenv("GRADCONFLICT_STACKED_KERNELS", "none")
    assert not kernels.use_stacked_kernels(cpu)
    monkeypatch.setenv("GRADCONFLICT_STACKED_KERNELS", "all")
    assert kernels.use_stacked_kernels(cuda)
    monkeypatch.setenv("GRADCONFLICT_STACKED_KERNELS", "gpu")
    with pytest.raises(ValueError, match="GRADCONFLICT_STACKED_KERNELS"):
        kernels.use_stacked_kernels(cpu)


@pytest.mark.parametrize("mode", ["cpu", "none"])
def test_stacked_dit_equals_sequential(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU stacked path, with the custom Linear / attention kernels (mode "cpu") and with vmap's own rules
    (mode "none"), gives the sequential parameters, with AdamW, weight decay and a per-copy clip that is active."""
    monkeypatch.setenv("GRADCONFLICT_STACKED_KERNELS", mode)
    torch.manual_seed(0)
    model = build_model("dit-tiny", image_size=8, hidden_size=32, depth=1, num_heads=2).double()
    with torch.no_grad():  # leave the adaLN-Zero start, so that every layer gets a gradient
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = torch.rand(24, 1, 8, 8, dtype=torch.float64) * 2 - 1
    bins = gc.TimestepBins.uniform(1000, C)
    cfg = TransferConfig(steps=3, lr=1e-2, batch_size=4, grad_clip=0.5, weight_decay=0.1, progress=False)

    def streams() -> list[BatchStream]:
        return [BatchStream(s, 7 + k, data, None, cfg.batch_size) for k, s in enumerate(sources_of(bins))]

    calls = {"linear": 0, "attention": 0}
    real_linear, real_attention = kernels.copy_linear, kernels.copy_attention

    def count(name: str, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)
        return wrapped

    monkeypatch.setattr(kernels, "copy_linear", count("linear", real_linear))
    monkeypatch.setattr(kernels, "copy_attention", count("attention", real_attention))
    seq = finetune_sequential(model, streams(), cfg, SCHEDULE, "eps")
    bat = finetune_stacked(model, streams(), cfg, SCHEDULE, "eps")
    if mode == "cpu":  # the kernels really ran
        assert calls["attention"] == cfg.steps and calls["linear"] > cfg.steps
    else:
        assert calls == {"linear": 0, "attention": 0}
    for name in seq.params:
        torch.testing.assert_close(bat.params[name], seq.params[name], rtol=0, atol=1e-10, msg=name)
    torch.testing.assert_close(torch.from_numpy(bat.losses), torch.from_numpy(seq.losses), rtol=0, atol=1e-10)
    free = finetune_stacked(model, streams(), TransferConfig(**{**cfg.__dict__, "grad_clip": None}), SCHEDULE, "eps")
    assert max(float((free.params[n] - bat.params[n]).abs().max()) for n in bat.params) > 1e-6  # the clip was active
    w = bat.params["blocks.0.attn.qkv.weight"]
    assert float((w[0] - w[1]).abs().max()) > 1e-6  # the copies differ
