"""The layer shapes of a Stable-Diffusion UNet through the fused engine, each conv weight-gradient route (issue #19).

Every route of the conv rule (``GRADCONFLICT_CONV_WEIGHT`` = grouped / unfold / taps, the grouped one also with
``GRADCONFLICT_CONV_LAYOUT=channels_last``) against a float64 per-task autograd loop on the conv shapes an SD UNet
has (3x3 stride 1 padding 1, 1x1 shortcuts and projections, the 3x3 stride-2 downsample) plus a depthwise conv
(taps must hand it to the grouped route); GroupNorm at 32 groups; cross-attention q / k / v / out projections on
``(N, L, D)`` tokens with per-sample ``encoder_hidden_states``; and the SD-1.5 ``UNet2DConditionModel`` built at a
tiny width (``benchmarks/sd_unet.py``) end to end, fused Gram against the per-task loop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import gradconflict as gc
from gradconflict.engine import per_sample_losses, task_gram
from gradconflict.engine import rules
from gradconflict.engine.conv_weight import taps_weight
from gradconflict.engine.grouping import TaskIndex
from gradconflict.engine.rules import conv_rule, group_norm_rule, linear_rule

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

SCHEDULE = gc.NoiseSchedule.linear(T=1000)
F64 = torch.float64
ROUTES = {  # name -> environment
    "grouped": {},
    "channels_last": {"GRADCONFLICT_CONV_LAYOUT": "channels_last"},
    "unfold": {"GRADCONFLICT_CONV_WEIGHT": "unfold"},
    "taps": {"GRADCONFLICT_CONV_WEIGHT": "taps"},
}
# (c_in, c_out, Conv2d kwargs, side): the SD UNet's conv kinds at small widths
SD_CONVS = {
    "resnet_3x3": (8, 8, dict(kernel_size=3, padding=1), 8),
    "conv_in_3x3": (4, 8, dict(kernel_size=3, padding=1), 8),
    "shortcut_1x1": (8, 16, dict(kernel_size=1), 4),
    "proj_1x1_no_bias": (16, 16, dict(kernel_size=1, bias=False), 4),
    "downsample_3x3_s2": (8, 8, dict(kernel_size=3, stride=2, padding=1), 8),
    "downsample_odd_side": (8, 8, dict(kernel_size=3, stride=2, padding=1), 7),
    "depthwise_3x3": (8, 8, dict(kernel_size=3, padding=1, groups=8), 6),
}


def _set_route(monkeypatch, route: str) -> None:
    for name in ("GRADCONFLICT_CONV_WEIGHT", "GRADCONFLICT_CONV_LAYOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in ROUTES[route].items():
        monkeypatch.setenv(name, value)


def _tasks(equal: bool, K: int, g: torch.Generator) -> torch.Tensor:
    if equal:
        return torch.arange(K).repeat_interleave(2)
    task = torch.cat([torch.full((1 + k % 3,), k) for k in range(K)])  # 1, 2, 3, 1 samples, shuffled
    return task[torch.randperm(len(task), generator=g)]


def _per_task_autograd(module: nn.Module, x: torch.Tensor, b: torch.Tensor, task: torch.Tensor, K: int,
                       **kwargs) -> dict:
    """Task k's float64 gradients of ``sum_{i in k} <module(x_i), b_i>``, one task at a time."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    out: dict = {n: [] for n in names}
    for k in range(K):
        sel = torch.nonzero(task == k).flatten()
        extra = {key: v[sel] for key, v in kwargs.items()}
        grads = torch.autograd.grad((module(x[sel], **extra) * b[sel]).sum(), [module.get_parameter(n) for n in names])
        for n, gr in zip(names, grads):
            out[n].append(gr)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("equal", [True, False])
@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("name", sorted(SD_CONVS))
def test_conv_routes_equal_per_task_autograd(name: str, route: str, equal: bool, monkeypatch) -> None:
    _set_route(monkeypatch, route)
    c_in, c_out, kw, side = SD_CONVS[name]
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, **kw).double()
    K = 4
    task = _tasks(equal, K, g)
    x = torch.randn(len(task), c_in, side, side, generator=g, dtype=F64)
    b = torch.randn(conv(x).shape, generator=g, dtype=F64)
    ref = _per_task_autograd(conv, x, b, task, K)
    got = conv_rule(conv, (x,), b, TaskIndex(task, K), F64)
    assert sorted(got) == sorted(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    if conv.groups == 1:  # output-channel slices (the per-layer memory budget)
        piece = conv_rule(conv, (x,), b, TaskIndex(task, K), F64, rows=slice(2, 5))
        torch.testing.assert_close(piece["weight"], ref["weight"][:, 2:5], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("route", ["taps", "grouped"])
def test_conv_bf16_operands_give_float32_products_of_the_rounded_values(route: str, monkeypatch) -> None:
    """Under autocast the input and output gradient are bf16: the per-task gradients are the float64 products of
    those bf16 values up to float32 accumulation (no second rounding of the operands)."""
    _set_route(monkeypatch, route)
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    task = torch.arange(3).repeat_interleave(2)
    x = torch.randn(6, 8, 8, 8, generator=g).bfloat16()
    b = torch.randn(6, 8, 8, 8, generator=g).bfloat16()
    ref = _per_task_autograd(conv.double(), x.double(), b.double(), task, 3)
    got = conv_rule(conv.float(), (x,), b, TaskIndex(task, 3), torch.float32)
    assert got["weight"].dtype == torch.float32
    for n in ref:
        torch.testing.assert_close(got[n].double(), ref[n], rtol=2e-6, atol=1e-5)


def test_group_norm_at_32_groups_equals_per_task_autograd() -> None:
    g = torch.Generator().manual_seed(5)
    gn = nn.GroupNorm(32, 64).double()
    with torch.no_grad():
        gn.weight.copy_(torch.randn(64, generator=g, dtype=F64))
        gn.bias.copy_(torch.randn(64, generator=g, dtype=F64))
    task = _tasks(False, 4, g)
    x = torch.randn(len(task), 64, 4, 4, generator=g, dtype=F64) * 2 + 1
    b = torch.randn(len(task), 64, 4, 4, generator=g, dtype=F64)
    ref = _per_task_autograd(gn, x, b, task, 4)
    got = group_norm_rule(gn, (x,), b, TaskIndex(task, 4), F64)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)


def test_cross_attention_projections_equal_per_task_autograd() -> None:
    """to_k / to_v read the text tokens ``(N, 7, 12)``, to_q / to_out the image tokens ``(N, 16, 16)``."""
    g = torch.Generator().manual_seed(6)
    task = _tasks(False, 4, g)
    n = len(task)
    for d_in, tokens in ((12, 7), (16, 16)):
        lin = nn.Linear(d_in, 16).double()
        x = torch.randn(n, tokens, d_in, generator=g, dtype=F64)
        b = torch.randn(n, tokens, 16, generator=g, dtype=F64)
        ref = _per_task_autograd(lin, x, b, task, 4)
        got = linear_rule(lin, (x,), b, TaskIndex(task, 4), F64)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


def _loop_gram(model: nn.Module, x0, t, task, noise, K: int, text: torch.Tensor) -> torch.Tensor:
    """``G[k, l] = <grad L_k, grad L_l>`` from one autograd backward per task (``L_k``: task k's mean loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for k in range(K):
        sel = torch.nonzero(task == k).flatten()
        loss = per_sample_losses(model, x0[sel], t[sel], noise[sel], SCHEDULE,
                                 model_kwargs={"encoder_hidden_states": text[sel]}).mean()
        rows.append(torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(loss, params)]))
    J = torch.stack(rows)
    return J @ J.T


@pytest.fixture(scope="module")
def tiny_sd():
    pytest.importorskip("diffusers")
    from sd_unet import build_sd_unet, sd15_config, text_embeddings

    cfg = sd15_config(0.1, sample_size=8)
    assert cfg["block_out_channels"] == (32, 64, 128, 128) and cfg["norm_num_groups"] == 2
    model = build_sd_unet(0.1, sample_size=8, text_tokens=5).double().eval()
    with torch.no_grad():  # zero-initialised output layers would hide a wrong gradient: perturb every parameter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(7)
    task = torch.tensor([0, 1, 1, 2])
    t = torch.tensor([10, 400, 430, 900])
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=F64)
    noise = torch.randn(4, 4, 8, 8, generator=g, dtype=F64)
    text = text_embeddings(model, 4, g).double()
    return model, x0, t, task, noise, text, _loop_gram(model, x0, t, task, noise, 3, text)


@pytest.mark.parametrize("route", ["grouped", "taps"])
def test_tiny_sd15_unet_fused_gram_equals_per_task_loop(tiny_sd, route: str, monkeypatch) -> None:
    _set_route(monkeypatch, route)
    calls = []
    monkeypatch.setattr(rules, "taps_weight", lambda *a: calls.append(1) or taps_weight(*a))
    model, x0, t, task, noise, text, ref = tiny_sd
    got = task_gram(model, x0, t, task, schedule=SCHEDULE, noise=noise, K=3, check=False,
                    model_kwargs={"encoder_hidden_states": text})
    assert float((got.gram - ref).norm() / ref.norm()) < 1e-10
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(calls) == (n_convs if route == "taps" else 0)  # every conv of the UNet went the route asked for
    assert float(ref.diagonal().min()) > 0


def test_saved_half_input_is_the_copy_autograd_saved() -> None:
    """Under autocast the engine keeps the bf16 input autograd saved (same storage), equal to a fresh cast."""
    from gradconflict.engine.rules import saved_half_input

    g = torch.Generator().manual_seed(8)
    cases = [(nn.Conv2d(4, 8, 3, padding=1), torch.randn(2, 4, 5, 5, generator=g)),
             (nn.Conv2d(4, 8, 1), torch.randn(2, 4, 5, 5, generator=g)),
             (nn.Linear(6, 5), torch.randn(3, 6, generator=g)),
             (nn.Linear(6, 5), torch.randn(2, 7, 6, generator=g)),
             (nn.Linear(6, 5, bias=False), torch.randn(2, 7, 6, generator=g))]
    for module, x in cases:
        x.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        saved = saved_half_input(x.detach(), out)
        assert saved is not None and saved.shape == x.shape and saved.dtype == torch.bfloat16
        torch.testing.assert_close(saved, x.detach().bfloat16(), rtol=0, atol=0)
        # no copy: the tensor shares the storage autograd keeps for the backward pass
        kept, node = set(), out.grad_fn
        while node is not None:  # the product node and the views above it
            for attr in ("_saved_input", "_saved_mat1", "_saved_self"):
                t = getattr(node, attr, None)
                if isinstance(t, torch.Tensor):
                    kept.add(t.untyped_storage().data_ptr())
            node = node.next_functions[0][0] if node.next_functions else None
        assert saved.untyped_storage().data_ptr() in kept
    lin = nn.Linear(6, 5)
    assert saved_half_input(torch.randn(3, 6), lin(torch.randn(3, 6, requires_grad=True))) is None  # no autocast


def test_fused_under_autocast_with_and_without_the_saved_inputs_agree(tiny_sd, monkeypatch) -> None:
    from gradconflict.engine import fused

    model, x0, t, task, noise, text, _ = tiny_sd
    model = model.float()
    found = []
    real = fused.saved_half_input
    monkeypatch.setattr(fused, "saved_half_input", lambda x, out: found.append(real(x, out)) or found[-1])
    kw = dict(schedule=SCHEDULE, noise=noise.float(), K=3, check=False, autocast_dtype=torch.bfloat16,
              model_kwargs={"encoder_hidden_states": text.float()})
    try:
        with_saved = task_gram(model, x0.float(), t, task, **kw).gram
        assert found and sum(f is not None for f in found) >= 0.9 * len(found)
        monkeypatch.setattr(fused, "saved_half_input", lambda x, out: None)
        recast = task_gram(model, x0.float(), t, task, **kw).gram
    finally:
        model.double()
    assert float((with_saved - recast).norm() / recast.norm()) < 1e-6
