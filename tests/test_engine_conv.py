"""Conv and GroupNorm rules of the fused engine against per-task autograd, code path by code path.

The conv rule has three ways to the per-task weight gradients (grouped conv weight gradient, the CPU
per-sample product for pointwise convs, both with or without workspace memory and output-row chunks); the
GroupNorm rule two (autograd's saved group statistics, or a fresh normalisation). Each is compared with the
float64 autograd gradient of each task's samples, and end to end with ``method="loop"``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import gradconflict as gc
from gradconflict.engine import task_gram
from gradconflict.engine.grouping import TaskIndex
from gradconflict.engine.rules import (FORWARD_EXTRAS, _pointwise_bmm_ok, conv_rule, group_norm_rule,
                                       group_norm_saved_stats)
from gradconflict.engine import workspace as workspace_mod
from gradconflict.engine.workspace import Workspace, scratch, use_workspace

SCHEDULE = gc.NoiseSchedule.linear(T=1000)

# (dims, c_in, c_out, kwargs, spatial size)
CONVS = {
    "2d_3x3_pad1": (2, 3, 4, dict(kernel_size=3, padding=1), 7),
    "2d_stride2_dilation2": (2, 3, 4, dict(kernel_size=3, stride=2, padding=2, dilation=2), 9),
    "2d_groups_no_bias": (2, 4, 6, dict(kernel_size=3, padding=1, groups=2, bias=False), 6),
    "2d_same_reflect": (2, 2, 3, dict(kernel_size=(3, 2), padding="same", padding_mode="reflect"), 6),
    "2d_valid_rect": (2, 2, 3, dict(kernel_size=(2, 3), padding="valid", stride=(1, 2)), 7),
    "2d_out1": (2, 4, 1, dict(kernel_size=3, padding=1), 6),
    "2d_pointwise": (2, 5, 3, dict(kernel_size=1), 5),
    "2d_pointwise_no_bias": (2, 5, 3, dict(kernel_size=1, bias=False), 5),
    "2d_pointwise_stride2": (2, 5, 3, dict(kernel_size=1, stride=2), 6),
    "2d_pointwise_groups": (2, 4, 6, dict(kernel_size=1, groups=2), 5),
    "1d_dilation_pad": (1, 2, 5, dict(kernel_size=3, padding=2, dilation=2), 10),
    "1d_same_groups": (1, 4, 4, dict(kernel_size=3, padding="same", groups=2), 9),
    "1d_pointwise": (1, 6, 7, dict(kernel_size=1), 8),
    "1d_pointwise_same": (1, 6, 7, dict(kernel_size=1, padding="same", bias=False), 8),
    "3d_small": (3, 2, 3, dict(kernel_size=2, stride=1, padding=1), 4),
}
CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _tasks(kind: str, K: int, g: torch.Generator) -> torch.Tensor:
    if kind == "equal":
        return torch.arange(K).repeat_interleave(3)
    counts = [1 + (k % 3) for k in range(K)]  # unequal counts, shuffled order
    task = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return task[torch.randperm(len(task), generator=g)]


def _reference(module: nn.Module, x: torch.Tensor, b: torch.Tensor, task: torch.Tensor, K: int) -> dict:
    """Task k's gradients of ``sum_{i in k} <module(x_i), b_i>`` by autograd, one task at a time."""
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    out = {n: [] for n in names}
    for k in range(K):
        sel = torch.nonzero(task == k).flatten()
        grads = torch.autograd.grad((module(x[sel]) * b[sel]).sum(), [module.get_parameter(n) for n in names])
        for n, gr in zip(names, grads):
            out[n].append(gr)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("workspace", [False, True])
@pytest.mark.parametrize("tasks", ["equal", "unequal"])
@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_rule_equals_per_task_autograd(name: str, tasks: str, workspace: bool, monkeypatch) -> None:
    monkeypatch.setattr(workspace_mod, "_MIN_BYTES", 0)  # the workspace for these small tensors too
    dims, c_in, c_out, kw, size = CONVS[name]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    conv = CONV_TYPES[dims](c_in, c_out, **kw).double()
    K = 4
    task = _tasks(tasks, K, g)
    idx = TaskIndex(task, K)
    x = torch.randn(len(task), c_in, *([size] * dims), generator=g, dtype=torch.float64)
    b = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
    ref = _reference(conv, x, b, task, K)
    ws = Workspace() if workspace else None
    with use_workspace(ws):
        got = conv_rule(conv, (x,), b, idx, torch.float64)
        got_again = conv_rule(conv, (x,), b, idx, torch.float64)  # a second layer reusing the workspace
    assert sorted(got) == sorted(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_again[n], ref[n], rtol=1e-10, atol=1e-12)
    if conv.groups == 1:  # output-row chunks (the memory budget) give the same rows
        for start in range(0, c_out, 2):
            piece = conv_rule(conv, (x,), b, idx, torch.float64, rows=slice(start, start + 2))
            torch.testing.assert_close(piece["weight"], ref["weight"][:, start:start + 2], rtol=1e-10, atol=1e-12)
            if "bias" in ref:
                torch.testing.assert_close(piece["bias"], ref["bias"][:, start:start + 2], rtol=1e-10, atol=1e-12)


def test_pointwise_path_is_taken_where_intended() -> None:
    idx = TaskIndex(torch.arange(4).repeat_interleave(3), 4)
    x = torch.randn(12, 5, 6)
    assert _pointwise_bmm_ok(nn.Conv1d(5, 3, 1), x, 3, idx)
    assert _pointwise_bmm_ok(nn.Conv1d(5, 3, 1, padding="same"), x, 3, idx)
    assert not _pointwise_bmm_ok(nn.Conv1d(5, 3, 1, stride=2), x, 3, idx)
    assert not _pointwise_bmm_ok(nn.Conv1d(6, 4, 1, groups=2), torch.randn(12, 6, 6), 4, idx)
    assert not _pointwise_bmm_ok(nn.Conv1d(5, 3, 3), x, 3, idx)
    assert not _pointwise_bmm_ok(nn.Conv1d(5, 3, 1, padding=1), x, 3, idx)
    big = TaskIndex(torch.zeros(4096, dtype=torch.long), 1)  # N x c_out x c_in >> K x c_out x c_in and > 4M
    assert not _pointwise_bmm_ok(nn.Conv1d(64, 64, 1), torch.randn(4096, 64, 2), 64, big)


def test_workspace_reuses_memory_and_is_off_by_default() -> None:
    ws = Workspace()
    with use_workspace(ws):
        a = scratch("s", (400, 500), torch.float32, torch.device("cpu"))
        b = scratch("s", (300, 300), torch.float32, torch.device("cpu"))
        c = scratch("t", (200, 300), torch.float32, torch.device("cpu"))
    assert a.data_ptr() == b.data_ptr() and c.data_ptr() != a.data_ptr()
    d = scratch("s", (400, 500), torch.float32, torch.device("cpu"))
    assert d.data_ptr() != a.data_ptr()  # no active workspace: a fresh tensor


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tasks", ["equal", "unequal"])
def test_group_norm_rule_with_saved_stats_equals_per_task_autograd(tasks: str, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    gn = nn.GroupNorm(3, 6)
    with torch.no_grad():
        gn.weight.copy_(torch.randn(6, generator=g))
        gn.bias.copy_(torch.randn(6, generator=g))
    K = 4
    task = _tasks(tasks, K, g)
    idx = TaskIndex(task, K)
    x = torch.randn(len(task), 6, 5, 4, generator=g, dtype=torch.float64) * 3 + 2  # off-centre groups
    b = torch.randn(len(task), 6, 5, 4, generator=g, dtype=torch.float64)
    ref = _reference(gn.double(), x, b, task, K)
    gn = gn.to(dtype)
    xd, bd = x.to(dtype), b.to(dtype)
    out = gn(xd.clone().requires_grad_())
    extra = FORWARD_EXTRAS[group_norm_rule](gn, (xd,), out)
    assert set(extra) == {"stats"}  # autograd's statistics were found
    with_stats = group_norm_rule(gn, (xd,), bd, idx, dtype, **extra)
    fresh = group_norm_rule(gn, (xd,), bd, idx, dtype)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for n in ("weight", "bias"):
        torch.testing.assert_close(with_stats[n].double(), ref[n], **tol)
        torch.testing.assert_close(fresh[n].double(), ref[n], **tol)


def test_group_norm_stats_are_refused_when_they_do_not_match() -> None:
    gn = nn.GroupNorm(2, 4)
    x = torch.randn(3, 4, 5, requires_grad=True)
    assert group_norm_saved_stats(gn, (x,), gn(x) * 2) == {}  # not the GroupNorm's own output
    assert group_norm_saved_stats(nn.GroupNorm(4, 4), (x,), gn(x)) == {}  # other number of groups
    with torch.no_grad():
        assert group_norm_saved_stats(gn, (x,), gn(x)) == {}  # no graph


class ConvZoo(nn.Module):
    """Every conv configuration the rule distinguishes, in one model (float64, GroupNorm between)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False)
        self.c = nn.Conv2d(6, 6, 1)  # pointwise
        self.d = nn.Conv1d(6, 6, 1, bias=False)  # pointwise over flattened positions
        self.e = nn.Conv1d(6, 4, 3, padding="same", padding_mode="reflect")
        self.t = nn.Linear(1, 4)
        self.out = nn.Conv2d(4, 1, 1, stride=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + self.t(t[:, None].to(x.dtype) / 1000)[:, :, None, None]
        h = self.b(F.silu(self.gn(h)))
        h = F.silu(self.c(h))
        n, c, H, W = h.shape
        s = self.e(F.silu(self.d(h.reshape(n, c, H * W))))
        s = s.reshape(n, -1, H, W)
        return self.out(F.interpolate(s, size=x.shape[-2:]))


@pytest.mark.parametrize("budget", [None, 30])
@pytest.mark.parametrize("shuffle", [False, True])
def test_conv_zoo_fused_equals_loop(shuffle: bool, budget, monkeypatch) -> None:
    monkeypatch.setattr(workspace_mod, "_MIN_BYTES", 0)
    torch.manual_seed(0)
    model = ConvZoo().double()
    g = torch.Generator().manual_seed(3)
    K = 5
    t, task = gc.TimestepBins.uniform(1000, K).sample(3, g)
    if shuffle:
        keep = torch.ones(len(t), dtype=torch.bool)
        keep[(task == 1).nonzero()[0]] = False  # task 1 one sample short
        perm = torch.randperm(int(keep.sum()), generator=g)
        t, task = t[keep][perm], task[keep][perm]
    x0 = torch.randn(len(t), 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    args = dict(schedule=SCHEDULE, noise=noise, K=K)
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, max_chunk_elements=budget, **args)
    assert float((got.gram - ref.gram).norm() / ref.gram.norm()) <= 1e-10


@pytest.mark.parametrize("kind", ["float64", "bf16-autocast", "float64-pieces"])
def test_unfold_conv_weights_equal_the_grouped_ones_and_the_loop(kind: str, monkeypatch) -> None:
    """GRADCONFLICT_CONV_WEIGHT=unfold builds Conv2d per-task weight gradients by im2col and batched products:
    the float64 loop's Gram (padding, stride 2, a skip), and under bf16 autocast the grouped path's Gram."""
    from zoo import UNetLike

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    t, task = gc.TimestepBins.uniform(1000, 4).sample(3, g)
    x0 = torch.randn(len(t), 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    args = dict(schedule=gc.NoiseSchedule.linear(), K=4, check=True)
    if kind == "float64-pieces":  # the im2col copy built one task at a time (its memory cap), same Gram
        from gradconflict.engine import rules

        monkeypatch.setattr(rules, "UNFOLD_MAX_ELEMENTS", 1)
    if kind.startswith("float64"):
        model = UNetLike().double()
        ref = task_gram(model, x0, t, task, method="loop", noise=noise, **args).gram
        monkeypatch.setenv("GRADCONFLICT_CONV_WEIGHT", "unfold")
        got = task_gram(model, x0, t, task, noise=noise, **args).gram
        assert float((got - ref).norm() / ref.norm()) <= 1e-12
    else:
        model = UNetLike()
        kw = dict(noise=noise.float(), autocast_dtype=torch.bfloat16, **args)
        ref = task_gram(model, x0.float(), t, task, **kw).gram
        monkeypatch.setenv("GRADCONFLICT_CONV_WEIGHT", "unfold")
        got = task_gram(model, x0.float(), t, task, **kw).gram
        assert float((got - ref).norm() / ref.norm()) <= 1e-5
    monkeypatch.setenv("GRADCONFLICT_CONV_WEIGHT", "im2col")
    with pytest.raises(ValueError, match="GRADCONFLICT_CONV_WEIGHT must be"):
        dt = next(model.parameters()).dtype
        task_gram(model, x0.to(dt), t, task, noise=noise.to(dt), **args)
