"""Modules whose output is not a plain tensor (tuples with None, dicts, dataclasses, diffusers ``*Output``) and that
own parameters directly: the fused engine folds them through the generic fallback, against the float64 loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import gradconflict as gc
from gradconflict.engine import task_gram

SCHEDULE = gc.NoiseSchedule.linear(T=1000)


@dataclasses.dataclass
class Out:
    sample: torch.Tensor
    extra: torch.Tensor | None = None


class Inner(nn.Module):
    """Owns a bare parameter (like diffusers' ``scale_shift_table``) and returns a structure, not a tensor."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, 6))

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        h = torch.tanh(self.lin(x)) * self.scale + self.shift * (t[:, None] / 1000.0)
        if self.kind == "tuple_with_none":
            return h, None
        if self.kind == "dict":
            return {"sample": h, "aux": h.sum(-1)}
        return Out(sample=h, extra=None)


class Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inner = Inner(kind)
        self.head = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.inner(x, t)
        h = out[0] if isinstance(out, tuple) else out["sample"] if isinstance(out, dict) else out.sample
        return self.head(h)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("kind", ["tuple_with_none", "dict", "dataclass"])
def test_structured_outputs_with_direct_parameters_match_the_loop(kind: str) -> None:
    torch.manual_seed(0)
    model = Model(kind).double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    t = torch.randint(0, 1000, (8,), generator=g)
    task = torch.arange(8) % 4
    args = dict(schedule=SCHEDULE, K=4, noise=torch.randn(8, 6, generator=g, dtype=torch.float64))
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, check=True, **args)
    assert _rel(got.gram, ref.gram) <= 1e-10


def test_diffusers_transformer_with_a_scale_shift_table_matches_the_loop() -> None:
    diffusers = pytest.importorskip("diffusers")
    from gradconflict.adapters import DiffusersModel

    torch.manual_seed(0)
    net = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=2, num_layers=1, sample_size=4,
        patch_size=2, norm_type="ada_norm_single", cross_attention_dim=8, caption_channels=None,
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    )
    model = DiffusersModel(net).double()
    assert any("scale_shift_table" in n for n, _ in model.named_parameters())  # the case under test
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 300, 600, 900])
    kw = {"encoder_hidden_states": torch.randn(4, 3, 8, generator=g, dtype=torch.float64),
          "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    args = dict(schedule=SCHEDULE, K=2, noise=torch.randn(x0.shape, generator=g, dtype=torch.float64), model_kwargs=kw)
    task = torch.tensor([0, 0, 1, 1])
    ref = task_gram(model, x0, t, task, method="loop", **args)
    got = task_gram(model, x0, t, task, check=True, **args)
    assert _rel(got.gram, ref.gram) <= 1e-8
